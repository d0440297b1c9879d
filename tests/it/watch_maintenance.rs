//! `watch --reset`, `--dead-letters` and `--redrive` (spec: "Shapes,
//! tolerances and monitors", issue 18), on every seen store: SQLite,
//! PostgreSQL and Redis.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::common::{http_server, idemload_in as idemload, HttpResponse};

/// The store URL of a kind, or None (skipped) when its service is unset.
fn store(kind: &str) -> Option<String> {
    let var = match kind {
        "sqlite" => return Some("sqlite://seen.db".into()),
        "postgres" => "IDEMLOAD_TEST_POSTGRES",
        _ => "IDEMLOAD_TEST_REDIS",
    };
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{var} is unset but IDEMLOAD_REQUIRE_SERVICES=1"
            );
            eprintln!("SKIPPED (set {var})");
            None
        }
    }
}

fn write_items(dir: &Path, ids: &[i64]) {
    let text: String = ids
        .iter()
        .map(|id| {
            format!(
                "{{\"id\":{id},\"updated_at\":\"2025-01-{:02}T00:00:00Z\"}}\n",
                id % 28 + 1
            )
        })
        .collect();
    std::fs::write(dir.join("items.jsonl"), text).unwrap();
}

/// A trigger pipeline with a unique name (stores are shared between tests).
fn pipeline(dir: &Path, trigger: &str) {
    let name = format!("maint_{}", rand::random::<u32>());
    std::fs::write(
        dir.join("w.toml"),
        format!("name = \"{name}\"\n[source]\ntype = \"file\"\npath = \"items.jsonl\"\n[trigger]\norder_by = \"updated_at\"\nbackoff = \"10ms\"\n{trigger}\n"),
    )
    .unwrap();
}

/// Runs `watch w.toml ARGS`, asserting the exit code; returns stdout.
#[track_caller]
fn watch(dir: &Path, args: &[&str], code: i32) -> String {
    let mut all = vec!["watch", "w.toml"];
    all.extend_from_slice(args);
    let out = idemload(dir, &all);
    assert_eq!(
        out.status.code(),
        Some(code),
        "watch {args:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ids of the items a stdout trigger fired.
fn fired(stdout: &str) -> Vec<i64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("idempotency_key").is_some())
        .map(|v| v["item"]["id"].as_i64().unwrap())
        .collect()
}

fn reset_forgets_and_the_next_poll_primes_again(kind: &str) {
    let Some(store) = store(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, &format!("store = \"{store}\"\nprime = true"));
    write_items(d, &[1, 2]);
    assert_eq!(fired(&watch(d, &["--once"], 0)), Vec::<i64>::new());
    write_items(d, &[1, 2, 3]);
    assert_eq!(fired(&watch(d, &["--once"], 0)), vec![3]);

    let out = watch(d, &["--reset", "--json"], 0);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["forgotten"], 3, "{report}");

    write_items(d, &[1, 2, 3, 4]);
    assert_eq!(
        fired(&watch(d, &["--once"], 0)),
        Vec::<i64>::new(),
        "the first poll after a reset primes again"
    );
    write_items(d, &[1, 2, 3, 4, 5]);
    assert_eq!(fired(&watch(d, &["--once"], 0)), vec![5]);
}

#[test]
fn reset_forgets_and_the_next_poll_primes_again_sqlite() {
    reset_forgets_and_the_next_poll_primes_again("sqlite");
}

#[test]
fn reset_forgets_and_the_next_poll_primes_again_postgres() {
    reset_forgets_and_the_next_poll_primes_again("postgres");
}

#[test]
fn reset_forgets_and_the_next_poll_primes_again_redis() {
    reset_forgets_and_the_next_poll_primes_again("redis");
}

fn parked_items_are_listed_and_redriven_once_more(kind: &str) {
    let Some(store) = store(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let receiver = http_server(move |_| {
        if flag.load(Ordering::SeqCst) {
            HttpResponse::status(500)
        } else {
            HttpResponse::status(200)
        }
    });
    pipeline(
        d,
        &format!(
            "store = \"{store}\"\nprime = false\nattempts = 2\n[trigger.emit]\ntype = \"webhook\"\nurl = \"{}/hook\"",
            receiver.base
        ),
    );
    write_items(d, &[1, 2]);
    watch(d, &["--once"], 0);
    assert_eq!(receiver.requests().len(), 4, "two attempts per item");

    let listed: Vec<Value> = watch(d, &["--dead-letters", "--json"], 0)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<i64> = listed
        .iter()
        .map(|l| l["item"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2], "{listed:?}");
    assert!(
        listed[0]["error"].as_str().unwrap().contains("500"),
        "{listed:?}"
    );
    assert_eq!(listed[0]["attempts"], 2);

    // Still down: the redrive fails, both stay parked.
    watch(d, &["--redrive"], 1);
    assert_eq!(
        watch(d, &["--dead-letters", "--json"], 0).lines().count(),
        2
    );

    down.store(false, Ordering::SeqCst);
    let before = receiver.requests().len();
    let out = watch(d, &["--redrive", "--json"], 0);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["redriven"], 2, "{report}");
    let sent = &receiver.requests()[before..];
    assert_eq!(sent.len(), 2, "each parked item once more");
    let keys: Vec<&str> = sent
        .iter()
        .map(|r| r.headers["idempotency-key"].as_str())
        .collect();
    let parked_keys: Vec<&str> = listed
        .iter()
        .map(|l| l["key_hash"].as_str().unwrap())
        .collect();
    assert_eq!(keys, parked_keys, "the original idempotency keys");

    assert_eq!(watch(d, &["--dead-letters", "--json"], 0).trim(), "");
    watch(d, &["--redrive"], 0);
    watch(d, &["--once"], 0);
    assert_eq!(
        receiver.requests().len(),
        before + 2,
        "nothing fired again once redriven"
    );
}

#[test]
fn parked_items_are_listed_and_redriven_once_more_sqlite() {
    parked_items_are_listed_and_redriven_once_more("sqlite");
}

#[test]
fn parked_items_are_listed_and_redriven_once_more_postgres() {
    parked_items_are_listed_and_redriven_once_more("postgres");
}

#[test]
fn parked_items_are_listed_and_redriven_once_more_redis() {
    parked_items_are_listed_and_redriven_once_more("redis");
}
