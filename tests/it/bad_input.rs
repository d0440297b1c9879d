//! Guarantee 5, bad input never stops good input: each bad record goes to
//! `_idemload_rejects` with its source reference and a reason, the good
//! ones load, nothing is dropped silently, no table is harmed; exit 4, or
//! exit 1 past `max_rejects`.

use serde_json::{json, Value};

use crate::common::{assert_rows, Env};

const INJECTION: &str = "x\"; DROP TABLE contacts; --";

/// Writes the corpus under `data/`; returns the good records and the
/// expected rejects as (source_ref, a fragment of the reason).
fn corpus(env: &Env) -> (Vec<Value>, Vec<(&'static str, String)>) {
    let good = |id: u64| {
        json!({"id": id, "email": format!("c{id}@example.com"), "age": 30 + id,
               "updated_at": format!("2024-05-01T10:00:{id:02}Z")})
    };
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut push = |v: &Value| lines.push(v.to_string().into_bytes());
    push(&good(1));
    lines.push(br#"{"id": 2, "email": "trunc@exa"#.to_vec());
    lines.push(b"{\"id\": 3, \"email\": \"bad \xff\xfe utf8\", \"age\": 3, \"updated_at\": \"2024-05-01T10:00:03Z\"}".to_vec());
    lines.push(
        br#"{"email": "nokey@example.com", "age": 4, "updated_at": "2024-05-01T10:00:04Z"}"#
            .to_vec(),
    );
    lines.push(br#"{"id": 5, "email": "nocursor@example.com", "age": 5}"#.to_vec());
    lines.push(br#"{"id": 6, "email": "type@example.com", "age": "thirty", "updated_at": "2024-05-01T10:00:06Z"}"#.to_vec());
    lines.push(
        json!({"id": 7, "email": "big@example.com", "bio": "x".repeat(10 << 20),
               "updated_at": "2024-05-01T10:00:07Z"})
        .to_string()
        .into_bytes(),
    );
    lines.push(
        json!({"id": 8, INJECTION: 1, "updated_at": "2024-05-01T10:00:08Z"})
            .to_string()
            .into_bytes(),
    );
    lines.push(good(9).to_string().into_bytes());
    let mut text = lines.join(&b'\n');
    text.push(b'\n');
    env.write("data/contacts.jsonl", text);
    env.write("data/empty.jsonl", "");
    env.write(
        "data/more.csv",
        "id,email,age,updated_at\r\n\
         10,c10@example.com,40,2024-05-01T10:00:10Z\r\n\
         11,ragged@example.com\r\n\
         12,ragged2@example.com,42,2024-05-01T10:00:12Z,extra\r\n\
         13,c13@example.com,43,2024-05-01T10:00:13Z\r\n",
    );
    let good_rows = vec![
        good(1),
        good(9),
        json!({"id": 10, "email": "c10@example.com", "age": 40, "updated_at": "2024-05-01T10:00:10Z"}),
        json!({"id": 13, "email": "c13@example.com", "age": 43, "updated_at": "2024-05-01T10:00:13Z"}),
    ];
    let rejects = vec![
        ("data/contacts.jsonl:2", "malformed JSON".to_string()),
        ("data/contacts.jsonl:3", "invalid UTF-8".to_string()),
        (
            "data/contacts.jsonl:4",
            "missing key field \"id\"".to_string(),
        ),
        (
            "data/contacts.jsonl:5",
            "missing cursor field \"updated_at\"".to_string(),
        ),
        (
            "data/contacts.jsonl:6",
            "value \"thirty\" of field \"age\" is text, but the column is integer".to_string(),
        ),
        (
            "data/contacts.jsonl:7",
            "value of field \"bio\" is 10485760 bytes, more than max_value_bytes".to_string(),
        ),
        ("data/contacts.jsonl:8", "cannot be a column".to_string()),
        ("data/empty.jsonl:0", "file is empty".to_string()),
        (
            "data/more.csv:3",
            "row has 2 fields, the header has 4".to_string(),
        ),
        (
            "data/more.csv:4",
            "row has 5 fields, the header has 4".to_string(),
        ),
    ];
    (good_rows, rejects)
}

const SOURCES: &str = "[\"data/contacts.jsonl\", \"data/empty.jsonl\", \"data/more.csv\"]";

fn pipeline(env: &Env, name: &str, extra: &str) -> String {
    let file = format!("{name}.toml");
    env.write(
        &file,
        format!(
            "name = \"{name}\"\n[source]\ntype = \"file\"\npath = {SOURCES}\n[destination]\nurl = \"{}\"\ntable = \"contacts\"\n[load]\ncursor = \"updated_at\"\nbatch_size = 3\n{extra}\n",
            env.url()
        ),
    );
    file
}

idemtest!(each_bad_record_is_rejected_and_good_ones_load, |env| {
    // Rows already in the table must survive the bad input.
    env.write_jsonl(
        "seed.jsonl",
        &[json!({"id": 100, "email": "kept@example.com", "age": 50, "updated_at": "2024-04-01T00:00:00Z"})],
    );
    env.load(
        "contacts",
        &["seed.jsonl"],
        &["--cursor", "updated_at", "--name", "seed"],
    )
    .code(0);
    let (good, rejects) = corpus(env);
    let p = pipeline(env, "contacts", "");
    let out = env.run(&p, &[]);
    out.code(4);
    let r = out.report();
    assert_eq!(r.status, "succeeded_with_rejects");
    assert_eq!(r.read, 14, "{}", r.raw);
    assert_eq!(r.inserted, 4, "{}", r.raw);
    assert_eq!(r.rejected, rejects.len() as u64, "{}", r.raw);

    // The good records and the rows from before, nothing else.
    let mut expected = good.clone();
    expected.push(json!({"id": 100, "email": "kept@example.com", "age": 50, "updated_at": "2024-04-01T00:00:00Z"}));
    assert_rows(&env.rows("contacts"), &expected);
    let tables = env.backend.tables();
    assert!(tables.iter().any(|t| t == "contacts"), "{tables:?}");
    assert!(
        !tables.iter().any(|t| t.contains("DROP")),
        "no table named after the injection: {tables:?}"
    );

    // One reject row each, with its source reference and a useful reason.
    let stored: Vec<Value> = env
        .backend
        .raw_rows("_idemload_rejects")
        .into_iter()
        .filter(|r| r["pipeline"] == "contacts")
        .collect();
    assert_eq!(stored.len(), rejects.len(), "{stored:#?}");
    for (source_ref, reason) in &rejects {
        let row = stored
            .iter()
            .find(|r| r["source_ref"] == *source_ref)
            .unwrap_or_else(|| panic!("no reject for {source_ref}: {stored:#?}"));
        let text = row["reason"].as_str().unwrap_or_default();
        assert!(
            text.contains(reason.as_str()),
            "{source_ref}: reason {text:?} lacks {reason:?}"
        );
        assert_eq!(row["run_id"], json!(r.run_id()));
    }
    // The injection-shaped field name is kept as data in the raw record.
    let injected = stored
        .iter()
        .find(|r| r["source_ref"] == "data/contacts.jsonl:8")
        .unwrap();
    assert!(injected["raw"]
        .as_str()
        .unwrap_or_default()
        .contains("DROP TABLE"));

    // `rejects --json` lists the same.
    let listed = env.idemload(&["rejects", &p, "--json"]);
    listed.code(0);
    let listed = listed.json();
    let listed = listed["rejects"].as_array().expect("rejects array");
    assert_eq!(listed.len(), rejects.len());
    for (source_ref, _) in &rejects {
        assert!(
            listed
                .iter()
                .any(|l| l["source_ref"] == *source_ref && l["reason"].is_string()),
            "rejects --json lacks {source_ref}"
        );
    }

    // Running again rejects the same records again, as known ones (exit 0),
    // and changes nothing else.
    let again = env.run(&p, &["--full-refresh"]);
    again.code(0);
    let again = again.report();
    assert_eq!((again.inserted, again.updated), (0, 0), "{}", again.raw);
    assert_eq!(again.raw["known_rejects"], again.rejected, "{}", again.raw);
    assert_rows(&env.rows("contacts"), &expected);
});

idemtest!(more_rejects_than_max_rejects_fail_the_run, |env| {
    corpus(env);
    let p = pipeline(env, "strict", "max_rejects = 3");
    let out = env.run(&p, &[]);
    out.code(1);
    assert!(out.stderr.contains("max_rejects = 3"), "{}", out.stderr);
    // The batches committed before stay, and are correct.
    let runs = env.history(&p);
    assert_eq!(runs[0]["status"], "failed", "{runs:#?}");
    assert_eq!(
        env.backend.checkpoint("strict"),
        None,
        "a failed run moves no checkpoint"
    );
    for row in env.rows("contacts") {
        assert!(row["email"].as_str().unwrap().starts_with('c'), "{row}");
    }
});

// A line nobody can fix is rejected on every run; only the first run that
// meets it says exit 4, the later ones count it as known and exit 0.
idemtest!(
    a_record_rejected_again_is_known_and_alone_gives_exit_0,
    |env| {
        let good: String = (1..=3).map(|i| format!("{{\"id\":{i}}}\n")).collect();
        env.write("in.jsonl", format!("{good}{{\"id\": 4, broken\n"));
        let first = env.load("t", &["in.jsonl"], &[]).code(4).report();
        assert_eq!((first.inserted, first.rejected), (3, 1));
        assert_eq!(first.raw["known_rejects"], 0);

        let again = env.load("t", &["in.jsonl"], &[]).code(0).report();
        assert_eq!((again.rejected, again.status.as_str()), (1, "succeeded"));
        assert_eq!(again.raw["known_rejects"], 1);
        let listed = env.idemload(&["rejects", "--url", &env.url(), "--table", "t", "--json"]);
        let listed = listed.code(0).json();
        assert_eq!(listed["rejects"][0]["known"], true, "{listed}");
        assert_eq!(listed["rejects"][0]["source_ref"], "in.jsonl:4");

        // A new bad line (or a changed one) is news again.
        env.write(
            "in.jsonl",
            format!("{good}{{\"id\": 4, broken\n{{\"id\": 5, also broken\n"),
        );
        let third = env.load("t", &["in.jsonl"], &[]).code(4).report();
        assert_eq!(third.rejected, 2);
        assert_eq!(third.raw["known_rejects"], 1);
    }
);

// One line larger than MySQL's max_allowed_packet once broke the
// bookkeeping insert on every run and the good lines never loaded: the
// stored raw text is bounded (prefix, length, digest) on every backend.
idemtest!(
    a_huge_rejected_line_is_stored_bounded_and_good_lines_load,
    |env| {
        let huge = format!(
            "{{\"id\": 2, \"blob\": \"{}\" oops}}\n",
            "x".repeat(17 << 20)
        );
        env.write("big.jsonl", format!("{{\"id\":1}}\n{huge}{{\"id\":3}}\n"));
        let r = env.load("big", &["big.jsonl"], &[]).code(4).report();
        assert_eq!((r.inserted, r.rejected), (2, 1));
        let listed = env.idemload(&["rejects", "--url", &env.url(), "--table", "big", "--json"]);
        let raw = listed.code(0).json()["rejects"][0]["raw"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(raw.len() < 9000, "stored raw is {} bytes", raw.len());
        assert!(
            raw.contains(&format!("{} bytes in all, sha256 ", huge.len() - 1)),
            "{}",
            &raw[raw.len() - 120..]
        );
        // And again: the same line is known, nothing else changes.
        let r = env.load("big", &["big.jsonl"], &[]).code(0).report();
        assert_eq!(
            (r.inserted, r.rejected, r.raw["known_rejects"].as_u64()),
            (0, 1, Some(1))
        );
    }
);
