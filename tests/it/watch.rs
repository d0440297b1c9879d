//! watch (issue 6): each item fires once, with a stable idempotency key,
//! through failures, kills and a second watcher.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::{idemload_in as idemload, kill_after};

fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v.get("idempotency_key").is_some())
        .collect()
}

fn write_items(dir: &Path, items: &[(i64, &str, &str)]) {
    let text: String = items
        .iter()
        .map(|(id, updated, name)| {
            format!("{{\"id\":{id},\"updated_at\":\"{updated}\",\"name\":\"{name}\"}}\n")
        })
        .collect();
    std::fs::write(dir.join("items.jsonl"), text).unwrap();
}

/// A trigger pipeline; its name is unique, so that tests sharing a Redis
/// store never see each other's keys.
fn pipeline(dir: &Path, trigger: &str) {
    let name = format!("items_{}", rand::random::<u32>());
    std::fs::write(
        dir.join("w.toml"),
        format!("name = \"{name}\"\n[source]\ntype = \"file\"\npath = \"items.jsonl\"\n[trigger]\norder_by = \"updated_at\"\nbackoff = \"10ms\"\n{trigger}\n"),
    )
    .unwrap();
}

#[test]
fn prime_then_two_new_items_fire_once_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), "store = \"sqlite://seen.db\"");
    let mut items = vec![
        (1, "2025-01-01T00:00:00Z", "a"),
        (2, "2025-01-02T00:00:00Z", "b"),
    ];
    write_items(dir.path(), &items);
    let prime = idemload(dir.path(), &["watch", "w.toml", "--once"]);
    assert_eq!(
        prime.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&prime.stderr)
    );
    assert!(
        events(&prime).is_empty(),
        "the first poll only records what exists"
    );

    // Listed newest first, as APIs often do.
    items.insert(0, (4, "2025-01-04T00:00:00Z", "d"));
    items.insert(0, (3, "2025-01-03T00:00:00Z", "c"));
    items.swap(0, 1);
    write_items(dir.path(), &items);
    let fired = events(&idemload(dir.path(), &["watch", "w.toml", "--once"]));
    let ids: Vec<i64> = fired
        .iter()
        .map(|e| e["item"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 4], "exactly the two new items, oldest first");
    assert!(
        events(&idemload(dir.path(), &["watch", "w.toml", "--once"])).is_empty(),
        "the next poll fires nothing"
    );
}

#[test]
fn updated_item_trigger_fires_again_only_when_updated_at_changes() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(
        dir.path(),
        "store = \"sqlite://seen.db\"\nkey = [\"id\", \"updated_at\"]",
    );
    write_items(
        dir.path(),
        &[
            (1, "2025-01-01T00:00:00Z", "a"),
            (2, "2025-01-01T00:00:00Z", "b"),
        ],
    );
    assert!(events(&idemload(dir.path(), &["watch", "w.toml", "--once"])).is_empty());
    // Item 1 is updated; item 2 changes a field but not its update time.
    write_items(
        dir.path(),
        &[
            (1, "2025-02-01T00:00:00Z", "a2"),
            (2, "2025-01-01T00:00:00Z", "b2"),
        ],
    );
    let fired = events(&idemload(dir.path(), &["watch", "w.toml", "--once"]));
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["item"]["name"], "a2");
    assert!(events(&idemload(dir.path(), &["watch", "w.toml", "--once"])).is_empty());
}

/// What a webhook receiver saw: per idempotency key, the item ids posted.
#[derive(Default)]
struct Received {
    by_key: HashMap<String, HashSet<i64>>,
    requests: usize,
}

/// A webhook receiver on 127.0.0.1 that answers 500 to a share of requests
/// and drops the connection after processing another share.
fn receiver(fail_percent: u32, drop_percent: u32, seed: u64) -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Received::default()));
    let state = seen.clone();
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut length, mut key, mut complete) = (0usize, String::new(), false);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("idempotency-key:") {
                    key = line["idempotency-key:".len()..].trim().to_string();
                }
                if line == "\r\n" {
                    complete = true;
                    break;
                }
            }
            let mut body = vec![0; length];
            // A request cut off by a killed sender never reached the receiver.
            if !complete || reader.read_exact(&mut body).is_err() {
                continue;
            }
            let roll = rng.gen_range(0..100);
            if roll < fail_percent {
                let _ = stream.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                continue;
            }
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_i64())
                .unwrap_or(-1);
            {
                let mut s = state.lock().unwrap();
                s.requests += 1;
                s.by_key.entry(key).or_default().insert(id);
            }
            if roll < fail_percent + drop_percent {
                // Processed, but the answer is lost.
                drop(stream);
                continue;
            }
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

fn many_items(n: i64) -> Vec<(i64, String)> {
    (1..=n)
        .map(|i| (i, format!("2025-01-01T00:{:02}:{:02}Z", i / 60, i % 60)))
        .collect()
}

fn write_many(dir: &Path, items: &[(i64, String)]) {
    let refs: Vec<(i64, &str, &str)> = items.iter().map(|(i, t)| (*i, t.as_str(), "x")).collect();
    write_items(dir, &refs);
}

/// Each item reached the receiver under exactly one idempotency key, and no
/// key was used for two items.
fn assert_exactly_once(received: &Received, ids: impl Iterator<Item = i64>) {
    let mut keys_per_item: HashMap<i64, HashSet<&String>> = HashMap::new();
    for (key, items) in &received.by_key {
        assert_eq!(items.len(), 1, "key {key} carried several items: {items:?}");
        for id in items {
            keys_per_item.entry(*id).or_default().insert(key);
        }
    }
    for id in ids {
        let keys = keys_per_item.get(&id).map_or(0, HashSet::len);
        assert_eq!(keys, 1, "item {id} arrived under {keys} idempotency keys");
    }
}

#[test]
fn flaky_webhook_receives_every_item_exactly_once_by_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let (url, received) = receiver(30, 10, seed);
    pipeline(
        dir.path(),
        &format!("store = \"sqlite://seen.db\"\nprime = false\nattempts = 30\n[trigger.emit]\ntype = \"webhook\"\nurl = \"{url}\"\ntimeout = \"2s\""),
    );
    let items = many_items(60);
    write_many(dir.path(), &items);
    let out = idemload(dir.path(), &["watch", "w.toml", "--once", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = received.lock().unwrap();
    assert_eq!(r.by_key.len(), 60, "every item delivered");
    assert!(r.requests >= 60);
    assert_exactly_once(&r, 1..=60);
}

#[test]
fn killed_watcher_loses_nothing_and_refires_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (url, received) = receiver(0, 0, seed);
    pipeline(
        dir.path(),
        &format!("store = \"sqlite://seen.db\"\nprime = false\n[trigger.emit]\ntype = \"webhook\"\nurl = \"{url}\""),
    );
    let items = many_items(400);
    write_many(dir.path(), &items);
    for _ in 0..20 {
        kill_after(
            dir.path(),
            &["watch", "w.toml", "--once"],
            Duration::from_millis(rng.gen_range(0..400)),
        );
    }
    let out = idemload(dir.path(), &["watch", "w.toml", "--once"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = received.lock().unwrap();
    assert_eq!(r.by_key.len(), 400, "no item lost");
    assert_exactly_once(&r, 1..=400);
    eprintln!("requests {} for 400 items", r.requests);
}

fn two_watchers_fire_nothing_twice(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (url, received) = receiver(0, 0, 1);
    pipeline(
        dir.path(),
        &format!("store = \"{store}\"\nprime = false\n[trigger.emit]\ntype = \"webhook\"\nurl = \"{url}\""),
    );
    let items = many_items(200);
    write_many(dir.path(), &items);
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_idemload"))
            .args(["watch", "w.toml", "--once", "--wait", "60s"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r = received.lock().unwrap();
    assert_eq!(r.requests, 200, "each item fired once in all");
    assert_exactly_once(&r, 1..=200);
}

#[test]
fn two_watchers_on_a_sqlite_store_fire_nothing_twice() {
    two_watchers_fire_nothing_twice("sqlite://seen.db");
}

#[test]
fn two_watchers_on_a_redis_store_fire_nothing_twice() {
    let Ok(url) = std::env::var("IDEMLOAD_TEST_REDIS") else {
        assert!(
            std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "IDEMLOAD_TEST_REDIS is unset but IDEMLOAD_REQUIRE_SERVICES=1"
        );
        eprintln!("SKIPPED (set IDEMLOAD_TEST_REDIS)");
        return;
    };
    two_watchers_fire_nothing_twice(&url);
}

#[test]
fn two_watchers_on_a_postgres_store_fire_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let Some(backend) = crate::common::Backend::new(
        crate::common::BackendKind::Postgres,
        "watch_store",
        dir.path(),
    ) else {
        return;
    };
    two_watchers_fire_nothing_twice(&backend.url());
}

/// An API on 127.0.0.1 that lists `items` two per page, each page shuffled,
/// every page after the first repeating the last item of the one before.
fn shuffling_api(items: Arc<Mutex<Vec<(i64, String)>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let page: usize = first
                .split(['?', '&', ' '])
                .find_map(|p| p.strip_prefix("page="))
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let all = items.lock().unwrap().clone();
            let start = (page - 1) * 2;
            let mut chunk: Vec<Value> = all
                .iter()
                .skip(start.saturating_sub(1))
                .take(if page == 1 { 2 } else { 3 })
                .map(|(id, t)| serde_json::json!({"id": id, "updated_at": t}))
                .collect();
            if start >= all.len() {
                chunk.clear();
            }
            for i in (1..chunk.len()).rev() {
                chunk.swap(i, rng.gen_range(0..=i));
            }
            let body = serde_json::json!({"data": chunk}).to_string();
            let _ = stream.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                    .as_bytes(),
            );
        }
    });
    base
}

#[test]
fn an_api_with_shuffled_overlapping_pages_fires_each_new_item_once_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let ts = |i: i64| format!("2025-01-01T00:00:{i:02}Z");
    let items = Arc::new(Mutex::new((1..=7).map(|i| (i, ts(i))).collect::<Vec<_>>()));
    let base = shuffling_api(items.clone());
    std::fs::write(
        dir.path().join("w.toml"),
        format!(
            "name = \"api_{}\"\n[source]\ntype = \"http\"\nurl = \"{base}/items\"\nrecords = \"data\"\n[source.pagination]\ntype = \"page\"\npage_param = \"page\"\n[trigger]\nstore = \"sqlite://seen.db\"\norder_by = \"updated_at\"\n",
            rand::random::<u32>()
        ),
    )
    .unwrap();
    let prime = idemload(dir.path(), &["watch", "w.toml", "--once"]);
    assert_eq!(
        prime.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&prime.stderr)
    );
    assert!(events(&prime).is_empty());
    items.lock().unwrap().extend((8..=12).map(|i| (i, ts(i))));
    let fired: Vec<i64> = events(&idemload(dir.path(), &["watch", "w.toml", "--once"]))
        .iter()
        .map(|e| e["item"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        fired,
        vec![8, 9, 10, 11, 12],
        "each new item once, oldest first, whatever the page order"
    );
    assert!(events(&idemload(dir.path(), &["watch", "w.toml", "--once"])).is_empty());
}
