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

use crate::common::{idemload_in as idemload, kill_after};

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
