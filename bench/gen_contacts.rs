//! Deterministic CRM contact records for the benchmarks in `bench/`.
//!
//! `cargo run --release --example gen_contacts -- --rows N --out DIR` writes
//! `contacts_N.jsonl` and `contacts_N.csv` (ids 1..=N), and
//! `contacts_N_changed.jsonl` / `.csv`: the same rows where every tenth id
//! has a new score and city and a later `updated_at`, followed by N/20 new
//! ids. The same N always gives byte-identical files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Lisa",
    "Daniel",
    "Nancy",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Kenneth",
    "Carol",
    "Kevin",
    "Amanda",
    "Brian",
    "Dorothy",
    "George",
    "Melissa",
    "Timothy",
    "Deborah",
    "Amelie",
    "Lukas",
    "Sofia",
    "Mateo",
    "Chloe",
    "Hugo",
    "Yuki",
    "Aarav",
    "Ingrid",
    "Olu",
    "Priya",
    "Lars",
    "Noor",
    "Jose",
];
const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Muller",
    "Schmidt",
    "Rossi",
    "Dubois",
    "Tanaka",
    "Sato",
    "Kowalski",
    "Novak",
    "Andersen",
    "Okafor",
    "Patel",
    "Silva",
    "Jensen",
    "Larsen",
];
const COMPANY_A: &[&str] = &[
    "Northwind",
    "Contoso",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Vandelay",
    "Stark",
    "Wayne",
    "Acme",
    "Tyrell",
    "Soylent",
    "Cyberdyne",
    "Aperture",
    "Massive",
    "Pied Piper",
];
const COMPANY_B: &[&str] = &[
    "Traders",
    "Systems",
    "Labs",
    "Industries",
    "Logistics",
    "Analytics",
    "Holdings",
    "Partners",
];
const PLACES: &[(&str, &str)] = &[
    ("New York", "US"),
    ("San Francisco", "US"),
    ("Chicago", "US"),
    ("Austin", "US"),
    ("Seattle", "US"),
    ("Toronto", "CA"),
    ("Vancouver", "CA"),
    ("London", "GB"),
    ("Manchester", "GB"),
    ("Dublin", "IE"),
    ("Paris", "FR"),
    ("Lyon", "FR"),
    ("Berlin", "DE"),
    ("Munich", "DE"),
    ("Hamburg", "DE"),
    ("Amsterdam", "NL"),
    ("Madrid", "ES"),
    ("Barcelona", "ES"),
    ("Lisbon", "PT"),
    ("Rome", "IT"),
    ("Milan", "IT"),
    ("Zurich", "CH"),
    ("Vienna", "AT"),
    ("Stockholm", "SE"),
    ("Copenhagen", "DK"),
    ("Oslo", "NO"),
    ("Warsaw", "PL"),
    ("Prague", "CZ"),
    ("Tokyo", "JP"),
    ("Osaka", "JP"),
    ("Singapore", "SG"),
    ("Sydney", "AU"),
    ("Melbourne", "AU"),
    ("Auckland", "NZ"),
    ("Sao Paulo", "BR"),
    ("Mexico City", "MX"),
    ("Bangalore", "IN"),
    ("Lagos", "NG"),
    ("Nairobi", "KE"),
    ("Cape Town", "ZA"),
];

/// 2020-01-01T00:00:00Z.
const EPOCH_2020: i64 = 1_577_836_800;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small deterministic stream of random numbers for one row.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

struct Contact {
    id: u64,
    email: String,
    first: &'static str,
    last: &'static str,
    company: String,
    city: &'static str,
    country: &'static str,
    /// Hundredths.
    score: u64,
    active: bool,
    created: i64,
    updated: i64,
}

impl Contact {
    fn new(id: u64) -> Contact {
        let mut rng = Rng(mix(id ^ 0x1de3_10ad));
        let first = *rng.pick(FIRST);
        let last = *rng.pick(LAST);
        let a = *rng.pick(COMPANY_A);
        let b = *rng.pick(COMPANY_B);
        let n = rng.below(100);
        let company = format!("{a} {b} {n}");
        let domain: String = a.chars().filter(|c| !c.is_whitespace()).collect();
        let email = format!(
            "{}.{}{id}@{}.example.com",
            first.to_ascii_lowercase(),
            last.to_ascii_lowercase(),
            domain.to_ascii_lowercase()
        );
        let &(city, country) = rng.pick(PLACES);
        let created = EPOCH_2020 + rng.below(4 * 365 * 86_400) as i64;
        let updated = created + rng.below(365 * 86_400) as i64;
        Contact {
            id,
            email,
            first,
            last,
            company,
            city,
            country,
            score: rng.below(10_000),
            active: rng.below(5) != 0,
            created,
            updated,
        }
    }

    /// A later version: new score and city, `updated_at` days later.
    fn changed(mut self) -> Contact {
        let mut rng = Rng(mix(self.id ^ 0xc4a2_6ed0));
        self.score = (self.score + 1 + rng.below(5_000)) % 10_000;
        let &(city, country) = rng.pick(PLACES);
        self.city = city;
        self.country = country;
        self.updated += 86_400 * (400 + rng.below(30) as i64);
        self
    }

    fn jsonl(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            r#"{{"id":{},"email":"{}","first_name":"{}","last_name":"{}","company":"{}","city":"{}","country":"{}","score":{}.{:02},"active":{},"created_at":"{}","updated_at":"{}"}}"#,
            self.id,
            self.email,
            self.first,
            self.last,
            self.company,
            self.city,
            self.country,
            self.score / 100,
            self.score % 100,
            self.active,
            Rfc3339(self.created),
            Rfc3339(self.updated),
        )
    }

    fn csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{}.{:02},{},{},{}",
            self.id,
            self.email,
            self.first,
            self.last,
            self.company,
            self.city,
            self.country,
            self.score / 100,
            self.score % 100,
            self.active,
            Rfc3339(self.created),
            Rfc3339(self.updated),
        )
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
struct Rfc3339(i64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (days, secs) = (self.0.div_euclid(86_400), self.0.rem_euclid(86_400));
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

const CSV_HEADER: &str =
    "id,email,first_name,last_name,company,city,country,score,active,created_at,updated_at";

fn write_files(dir: &Path, stem: &str, rows: impl Iterator<Item = Contact>) -> std::io::Result<()> {
    let jsonl = File::create(dir.join(format!("{stem}.jsonl")))?;
    let csv = File::create(dir.join(format!("{stem}.csv")))?;
    let mut jsonl = BufWriter::with_capacity(1 << 20, jsonl);
    let mut csv = BufWriter::with_capacity(1 << 20, csv);
    writeln!(csv, "{CSV_HEADER}")?;
    for c in rows {
        c.jsonl(&mut jsonl)?;
        c.csv(&mut csv)?;
    }
    jsonl.flush()?;
    csv.flush()
}

fn main() -> std::io::Result<()> {
    let mut rows: u64 = 1_000_000;
    let mut out = PathBuf::from("bench/out");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rows" => rows = args.next().and_then(|v| v.parse().ok()).unwrap_or(rows),
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            other => {
                eprintln!("usage: gen_contacts [--rows N] [--out DIR] (unknown argument {other})");
                std::process::exit(2);
            }
        }
    }
    std::fs::create_dir_all(&out)?;
    let stem = format!("contacts_{rows}");
    write_files(&out, &stem, (1..=rows).map(Contact::new))?;
    let changed = (1..=rows)
        .map(|id| {
            let c = Contact::new(id);
            if id % 10 == 7 {
                c.changed()
            } else {
                c
            }
        })
        .chain((rows + 1..=rows + rows / 20).map(Contact::new));
    write_files(&out, &format!("{stem}_changed"), changed)?;
    eprintln!(
        "wrote {}/{stem}.{{jsonl,csv}} ({rows} rows) and {stem}_changed.{{jsonl,csv}} ({} rows: {} changed, {} new)",
        out.display(),
        rows + rows / 20,
        rows / 10,
        rows / 20
    );
    Ok(())
}
