//! Writing back to an API (issue 7): a fake CRM on 127.0.0.1 that has no
//! bulk upsert, loses create answers, ignores Idempotency-Key and rate
//! limits; idemload must never create a contact twice.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{idemload_in as idemload, kill_after, with_backend, BackendKind, Env};

/// How the fake CRM misbehaves.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Percent of creates that are committed and then answered with a
    /// dropped connection or a 500.
    lost_create_percent: u32,
    /// Answer 429 (Retry-After: 1) to the first requests of each second
    /// beyond this many.
    per_second_limit: Option<usize>,
}

#[derive(Default)]
struct Crm {
    contacts: HashMap<u64, Value>,
    next_id: u64,
    creates: usize,
    /// Creates committed whose answer was lost (500 or dropped).
    lost: usize,
    searches: usize,
    updates: usize,
    requests: usize,
    /// Start times of the requests that were served (not 429).
    served_at: Vec<Instant>,
    window: (Option<Instant>, usize),
}

impl Crm {
    fn by_email(&self, email: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .contacts
            .iter()
            .filter(|(_, c)| c["email"] == email)
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(faults: Faults, seed: u64) -> (String, Arc<Mutex<Crm>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let crm = Arc::new(Mutex::new(Crm {
        next_id: 1000,
        ..Default::default()
    }));
    let state = crm.clone();
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (crm, rng) = (state.clone(), rng.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).unwrap_or(0) == 0 {
                    return;
                }
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let mut parts = first.split_whitespace();
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, answer, drop_it) = {
                    let mut c = crm.lock().unwrap();
                    c.requests += 1;
                    let now = Instant::now();
                    if let Some(limit) = faults.per_second_limit {
                        let (start, _) = c.window;
                        if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
                            c.window = (Some(now), 0);
                        }
                        c.window.1 += 1;
                        if c.window.1 > limit {
                            drop(c);
                            let _ = stream.write_all(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                            return;
                        }
                    }
                    c.served_at.push(now);
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if method == "GET" && target.starts_with("/contacts/search?email=") {
                        c.searches += 1;
                        let email = decode(&target["/contacts/search?email=".len()..]);
                        let results: Vec<Value> = c
                            .by_email(&email)
                            .into_iter()
                            .map(|id| json!({"id": id}))
                            .collect();
                        (200, json!({"results": results}), false)
                    } else if method == "POST" && target == "/contacts" {
                        c.creates += 1;
                        c.next_id += 1;
                        let id = c.next_id;
                        let mut contact = body.clone();
                        contact["id"] = json!(id);
                        c.contacts.insert(id, contact.clone());
                        let lose =
                            rng.lock().unwrap().gen_range(0..100) < faults.lost_create_percent;
                        if lose {
                            c.lost += 1;
                        }
                        if lose && rng.lock().unwrap().gen_bool(0.5) {
                            (500, json!({"error": "internal"}), false)
                        } else {
                            (201, contact, lose)
                        }
                    } else if method == "PATCH" && target.starts_with("/contacts/") {
                        c.updates += 1;
                        let id: u64 = target["/contacts/".len()..].parse().unwrap_or(0);
                        match c.contacts.get_mut(&id) {
                            Some(contact) => {
                                if let (Some(obj), Some(new)) =
                                    (contact.as_object_mut(), body.as_object())
                                {
                                    for (k, v) in new {
                                        obj.insert(k.clone(), v.clone());
                                    }
                                }
                                (200, contact.clone(), false)
                            }
                            None => (404, json!({"error": "no such contact"}), false),
                        }
                    } else {
                        (
                            400,
                            json!({"error": format!("unexpected {method} {target}")}),
                            false,
                        )
                    }
                };
                if drop_it {
                    return;
                }
                let text = answer.to_string();
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}", text.len()).as_bytes(),
                );
            });
        }
    });
    (base, crm)
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn contacts(dir: &Path, n: usize, version: &str) {
    let text: String = (1..=n)
        .map(|i| format!("{{\"id\":{i},\"email\":\"person{i}+tag@example.com\",\"name\":\"Person {i} {version}\"}}\n"))
        .collect();
    std::fs::write(dir.join("contacts.jsonl"), text).unwrap();
}

fn pipeline(dir: &Path, base: &str, extra: &str) {
    std::fs::write(
        dir.join("crm.toml"),
        format!(
            r#"name = "crm_sync"
[source]
type = "file"
path = "contacts.jsonl"
[load]
key = ["email"]
batch_size = 200
[destination]
type = "http"
base_url = "{base}"
lookup = {{ method = "GET", path = "/contacts/search?email={{email}}", id = "results.0.id" }}
create = {{ method = "POST", path = "/contacts", body = {{ email = "{{email}}", name = "{{name}}" }} }}
update = {{ method = "PATCH", path = "/contacts/{{remote_id}}", body = {{ name = "{{name}}" }} }}
ledger = "sqlite://ledger.db"
retry = {{ attempts = 8, backoff = "20ms" }}
{extra}
"#
        ),
    )
    .unwrap();
}

/// One contact per email, every email present, names as expected.
fn assert_one_per_email(crm: &Crm, n: usize, version: &str) {
    for i in 1..=n {
        let ids = crm.by_email(&format!("person{i}+tag@example.com"));
        assert_eq!(ids.len(), 1, "person{i}: {} contacts", ids.len());
        assert_eq!(
            crm.contacts[&ids[0]]["name"],
            format!("Person {i} {version}")
        );
    }
    assert_eq!(crm.contacts.len(), n);
}

#[test]
fn a_second_writeback_sends_no_request_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (base, crm) = serve(Faults::default(), 1);
    pipeline(dir.path(), &base, "concurrency = 8");
    contacts(dir.path(), 1000, "v1");
    let first = report(&idemload(dir.path(), &["run", "crm.toml", "--json"]));
    assert_eq!(first["inserted"], 1000);
    assert_eq!(first["looked_up_api"], 1000);
    let before = crm.lock().unwrap().requests;
    let second = report(&idemload(dir.path(), &["run", "crm.toml", "--json"]));
    assert_eq!(
        (
            second["inserted"].as_u64(),
            second["updated"].as_u64(),
            second["unchanged"].as_u64()
        ),
        (Some(0), Some(0), Some(1000))
    );
    let c = crm.lock().unwrap();
    assert_eq!(
        c.requests, before,
        "zero writes and zero lookups on the re-run"
    );
    assert_one_per_email(&c, 1000, "v1");
}

#[test]
fn lost_create_answers_never_become_second_contacts() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let (base, crm) = serve(
        Faults {
            lost_create_percent: 20,
            ..Default::default()
        },
        seed,
    );
    pipeline(dir.path(), &base, "concurrency = 4");
    contacts(dir.path(), 300, "v1");
    let out = idemload(dir.path(), &["run", "crm.toml", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rerun = idemload(dir.path(), &["run", "crm.toml", "--json"]);
    assert_eq!(
        rerun.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let c = crm.lock().unwrap();
    assert!(c.lost > 0, "the fault injection lost some create answers");
    assert_eq!(
        c.creates, 300,
        "each lost answer was found by a lookup, not created again"
    );
    assert_one_per_email(&c, 300, "v1");
}

#[test]
fn killed_writebacks_create_nothing_twice_and_miss_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (base, crm) = serve(Faults::default(), seed);
    pipeline(dir.path(), &base, "concurrency = 4");
    contacts(dir.path(), 400, "v1");
    for round in 0..12 {
        if round == 6 {
            contacts(dir.path(), 400, "v2");
        }
        kill_after(
            dir.path(),
            &["run", "crm.toml"],
            Duration::from_millis(rng.gen_range(0..500)),
        );
    }
    let out = idemload(dir.path(), &["run", "crm.toml", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_per_email(&crm.lock().unwrap(), 400, "v2");
}

#[test]
fn lookup_table_spares_the_search_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (base, crm) = serve(Faults::default(), 3);
    contacts(dir.path(), 50, "v1");
    // The CRM already holds contacts 1..=30; a synced copy knows their ids.
    let sync = rusqlite::Connection::open(dir.path().join("warehouse.db")).unwrap();
    sync.execute_batch("CREATE TABLE crm_contacts (id INTEGER PRIMARY KEY, email TEXT)")
        .unwrap();
    {
        let mut c = crm.lock().unwrap();
        for i in 1..=30u64 {
            let id = 5000 + i;
            c.contacts.insert(
                id,
                json!({"id": id, "email": format!("person{i}+tag@example.com"), "name": "old"}),
            );
            sync.execute(
                "INSERT INTO crm_contacts VALUES (?1, ?2)",
                rusqlite::params![id, format!("person{i}+tag@example.com")],
            )
            .unwrap();
        }
    }
    pipeline(
        dir.path(),
        &base,
        "lookup_table = { url = \"sqlite://warehouse.db\", table = \"crm_contacts\", match = \"email\", id = \"id\" }",
    );
    let r = report(&idemload(dir.path(), &["run", "crm.toml", "--json"]));
    assert_eq!(r["looked_up_table"], 30);
    assert_eq!(
        r["looked_up_api"], 20,
        "only the 20 keys the table does not know"
    );
    let c = crm.lock().unwrap();
    assert_eq!(c.searches, 20);
    assert_eq!(
        (r["updated"].as_u64(), r["inserted"].as_u64()),
        (Some(30), Some(20))
    );
    assert_one_per_email(&c, 50, "v1");
}

#[test]
fn a_429_storm_slows_the_run_down_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (base, crm) = serve(
        Faults {
            per_second_limit: Some(25),
            ..Default::default()
        },
        4,
    );
    pipeline(
        dir.path(),
        &base,
        "concurrency = 4\nrate_limit = { requests_per_second = 20 }",
    );
    contacts(dir.path(), 40, "v1");
    let out = idemload(dir.path(), &["run", "crm.toml", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = crm.lock().unwrap();
    assert_one_per_email(&c, 40, "v1");
    // No one-second window saw more than the configured 20 served requests
    // (plus one for the window's edge).
    let times = &c.served_at;
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 21, "{in_window} requests within one second");
    }
}

#[test]
fn a_template_field_the_records_lack_stops_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let (base, crm) = serve(Faults::default(), 5);
    pipeline(dir.path(), &base, "");
    let toml = std::fs::read_to_string(dir.path().join("crm.toml"))
        .unwrap()
        .replace("{name}", "{full_name}");
    std::fs::write(dir.path().join("crm.toml"), toml).unwrap();
    contacts(dir.path(), 5, "v1");
    let out = idemload(dir.path(), &["run", "crm.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("full_name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(crm.lock().unwrap().requests, 0);
}

/// A synced copy as the warehouse holds it: contacts 1..=`known` with
/// their CRM ids (`5000 + i`), plus stale rows for contacts
/// `known+1..=known+stale` whose ids (`9000 + i`) the CRM deleted.
fn synced_copy(env: &Env, crm: &Arc<Mutex<Crm>>, known: u64, stale: u64) {
    env.backend.execute(
        "CREATE TABLE crm_contacts (crm_id BIGINT PRIMARY KEY, email VARCHAR(200), person BIGINT)",
    );
    let mut c = crm.lock().unwrap();
    let mut rows = Vec::new();
    for i in 1..=known + stale {
        let email = format!("person{i}+tag@example.com");
        let id = if i <= known { 5000 + i } else { 9000 + i };
        if i <= known {
            c.contacts
                .insert(id, json!({"id": id, "email": email, "name": "old"}));
        }
        rows.push(format!("({id}, '{email}', {i})"));
    }
    env.backend.execute(&format!(
        "INSERT INTO crm_contacts (crm_id, email, person) VALUES {}",
        rows.join(", ")
    ));
}

fn lookup_table_on(env: &Env) {
    let dir = env.root();
    let (base, crm) = serve(Faults::default(), 6);
    contacts(dir, 40, "v1");
    // 20 contacts the copy knows, 10 it still lists but the CRM deleted,
    // and one of those (person 21) the CRM holds again under a new id.
    synced_copy(env, &crm, 20, 10);
    crm.lock().unwrap().contacts.insert(
        7021,
        json!({"id": 7021, "email": "person21+tag@example.com", "name": "old"}),
    );
    let url = env.backend.url();
    pipeline(
        dir,
        &base,
        &format!("lookup_table = {{ url = \"{url}\", table = \"crm_contacts\", match = \"email\", id = \"crm_id\" }}"),
    );
    let out = idemload(dir, &["run", "crm.toml", "--json"]);
    let r = report(&out);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(
        (r["updated"].as_u64(), r["inserted"].as_u64()),
        (Some(21), Some(19)),
        "20 found in the copy, person 21 found by the API after its stale id; 9 stale and 10 unknown created: {r}"
    );
    assert_eq!(r["looked_up_table"], 30, "{r}");
    assert_eq!(
        r["looked_up_api"], 20,
        "the 10 stale and 10 unknown keys: {r}"
    );
    {
        let c = crm.lock().unwrap();
        assert_eq!(c.searches, 20);
        assert_eq!(c.creates, 19);
        assert_one_per_email(&c, 40, "v1");
    }
    // The ledger now knows every key: a re-run sends nothing, and a
    // copy that still lists stale ids no longer matters.
    let before = crm.lock().unwrap().requests;
    let again = report(&idemload(dir, &["run", "crm.toml", "--json"]));
    assert_eq!(again["unchanged"], 40, "{again}");
    assert_eq!(crm.lock().unwrap().requests, before);

    // Matching on an integer column binds the value in the column's type.
    contacts(dir, 40, "v2");
    std::fs::remove_file(dir.join("ledger.db")).unwrap();
    let toml = std::fs::read_to_string(dir.join("crm.toml"))
        .unwrap()
        .replace("match = \"email\"", "match = \"id\"")
        .replace("table = \"crm_contacts\"", "table = \"by_person\"");
    std::fs::write(dir.join("crm.toml"), toml).unwrap();
    env.backend
        .execute("CREATE TABLE by_person (id BIGINT PRIMARY KEY, crm_id VARCHAR(20))");
    let ids: Vec<String> = {
        let c = crm.lock().unwrap();
        (1..=40)
            .map(|i| {
                let id = c.by_email(&format!("person{i}+tag@example.com"))[0];
                format!("({i}, '{id}')")
            })
            .collect()
    };
    env.backend.execute(&format!(
        "INSERT INTO by_person (id, crm_id) VALUES {}",
        ids.join(", ")
    ));
    let searches = crm.lock().unwrap().searches;
    let third = report(&idemload(dir, &["run", "crm.toml", "--json"]));
    assert_eq!(
        (third["updated"].as_u64(), third["looked_up_table"].as_u64()),
        (Some(40), Some(40)),
        "{third}"
    );
    let c = crm.lock().unwrap();
    assert_eq!(c.searches, searches, "no search: every id was in the copy");
    assert_one_per_email(&c, 40, "v2");
}

mod lookup_table_in_any_database {
    use super::*;

    #[test]
    fn sqlite() {
        with_backend("lookup_table_sqlite", BackendKind::Sqlite, lookup_table_on);
    }

    #[test]
    fn postgres() {
        with_backend("lookup_table_pg", BackendKind::Postgres, lookup_table_on);
    }

    #[test]
    fn mysql() {
        with_backend("lookup_table_my", BackendKind::Mysql, lookup_table_on);
    }
}

#[test]
fn a_lookup_table_that_does_not_exist_stops_before_any_request() {
    with_backend("lookup_table_missing", BackendKind::Postgres, |env| {
        let (base, crm) = serve(Faults::default(), 7);
        contacts(env.root(), 5, "v1");
        env.backend
            .execute("CREATE TABLE crm_contacts (crm_id BIGINT, email TEXT)");
        let url = env.backend.url();
        for (table, column) in [("crm_contact", "email"), ("crm_contacts", "e_mail")] {
            pipeline(
                env.root(),
                &base,
                &format!("lookup_table = {{ url = \"{url}\", table = \"{table}\", match = \"{column}\", id = \"crm_id\" }}"),
            );
            let out = idemload(env.root(), &["run", "crm.toml"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains("lookup_table")
                    && stderr.contains(table)
                    && stderr.contains(column),
                "{stderr}"
            );
        }
        assert_eq!(crm.lock().unwrap().requests, 0);
    });
}

/// The ledger's budget row set back a day, as tomorrow would find it.
fn next_day(dir: &Path) {
    let ledger = rusqlite::Connection::open(dir.join("ledger.db")).unwrap();
    let moved = ledger
        .execute("UPDATE _idemload_budget SET day = '2000-01-01'", [])
        .unwrap();
    assert_eq!(moved, 1, "the budget is kept in the ledger");
}

#[test]
fn a_spent_daily_budget_defers_the_rest_to_the_next_day() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (base, crm) = serve(Faults::default(), 8);
    contacts(dir, 30, "v1");
    pipeline(dir, &base, "rate_limit = { requests_per_day = 25 }");
    let toml = std::fs::read_to_string(dir.join("crm.toml"))
        .unwrap()
        .replace("key = [\"email\"]", "key = [\"email\"]\ncursor = \"id\"");
    std::fs::write(dir.join("crm.toml"), toml).unwrap();

    // Each new contact costs a search and a create: 12 fit in 25
    // requests, the 13th's search spends the last one.
    let out = idemload(dir, &["run", "crm.toml", "--json"]);
    let first = crate::common::Report::parse(
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{}", first.raw);
    assert_eq!((first.inserted, first.deferred), (12, 18), "{}", first.raw);
    assert_eq!(first.raw["api_requests"], 25);
    assert_eq!(
        first.checkpoint_after(),
        Value::Null,
        "the checkpoint stays before the deferred records"
    );
    assert_eq!(crm.lock().unwrap().requests, 25);

    // The same day: nothing more is sent; the human summary says why.
    let out = idemload(dir, &["run", "crm.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("18 deferred") && stderr.contains("requests_per_day"),
        "{stderr}"
    );
    assert_eq!(crm.lock().unwrap().requests, 25);

    // Each next day goes on where the last one stopped.
    let mut days = 1;
    loop {
        next_day(dir);
        days += 1;
        let before = crm.lock().unwrap().requests;
        let out = idemload(dir, &["run", "crm.toml", "--json"]);
        let r = crate::common::Report::parse(
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{}", r.raw);
        assert!(crm.lock().unwrap().requests - before <= 25);
        if r.deferred == 0 {
            assert_eq!(r.checkpoint_after(), json!(30), "{}", r.raw);
            break;
        }
        assert!(days < 5, "still deferring on day {days}: {}", r.raw);
    }
    assert_eq!(days, 3, "30 contacts × 2 requests fit in three days of 25");
    let c = crm.lock().unwrap();
    assert_eq!(c.creates, 30);
    assert_one_per_email(&c, 30, "v1");
}
