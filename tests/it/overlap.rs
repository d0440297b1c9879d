//! Overlapping windows: exports whose date ranges overlap (the same
//! `(service_line_id, usage_date)` in two of them, once corrected) never
//! double a row, and the latest version wins.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::assert_rows;

/// Usage rows of days `from..=to` of May 2024 for two service lines,
/// exported at `exported` (the cursor), with `bump` added to the usage.
fn export(from: u32, to: u32, exported: &str, bump: u64) -> Vec<Value> {
    let mut rows = Vec::new();
    for day in from..=to {
        for line in ["SL-1", "SL-2"] {
            rows.push(json!({
                "service_line_id": line,
                "usage_date": format!("2024-05-{day:02}"),
                "gb": day as u64 * 10 + bump,
                "updated_at": exported,
            }));
        }
    }
    rows
}

/// The latest version of each key (greatest cursor, later on ties).
fn fold(loads: &[&[Value]]) -> Vec<Value> {
    let mut latest: BTreeMap<(String, String), Value> = BTreeMap::new();
    for load in loads {
        for r in *load {
            let key = (
                r["service_line_id"].as_str().unwrap().to_string(),
                r["usage_date"].as_str().unwrap().to_string(),
            );
            let newer = latest.get(&key).is_none_or(|old| {
                r["updated_at"].as_str().unwrap() >= old["updated_at"].as_str().unwrap()
            });
            if newer {
                latest.insert(key, r.clone());
            }
        }
    }
    latest.into_values().collect()
}

const KEY: &str = "service_line_id,usage_date";

idemtest!(later_export_over_a_wider_window_wins, |env| {
    // [T1, T2] = days 10..20, then [T0, T2] = days 5..20 with corrections.
    let first = export(10, 20, "2024-05-21T00:00:00Z", 0);
    let second = export(5, 20, "2024-05-22T00:00:00Z", 1);
    env.write_jsonl("usage-1.jsonl", &first);
    env.write_jsonl("usage-2.jsonl", &second);
    let args = ["--key", KEY, "--cursor", "updated_at"];
    let r1 = env
        .load("usage", &["usage-1.jsonl"], &args)
        .code(0)
        .report();
    assert_eq!(r1.changes(), (22, 0, 0, 0));
    let r2 = env
        .load("usage", &["usage-2.jsonl"], &args)
        .code(0)
        .report();
    assert_eq!(r2.changes(), (10, 22, 0, 0), "{}", r2.raw);
    assert_eq!(env.backend.count("usage"), 32);
    assert_eq!(
        env.backend
            .count_distinct("usage", &["service_line_id", "usage_date"]),
        32
    );
    assert_rows(&env.rows("usage"), &fold(&[&first, &second]));
});

idemtest!(
    older_export_loaded_late_never_overwrites_newer_rows,
    |env| {
        // The corrected export arrives first, the older, wider one after it.
        let newer = export(10, 20, "2024-05-22T00:00:00Z", 1);
        let older = export(5, 20, "2024-05-21T00:00:00Z", 0);
        env.write_jsonl("new.jsonl", &newer);
        env.write_jsonl("old.jsonl", &older);
        let args = ["--key", KEY, "--cursor", "updated_at"];
        env.load("usage", &["new.jsonl"], &args).code(0);
        let r = env.load("usage", &["old.jsonl"], &args).code(0).report();
        assert_eq!(r.changes(), (10, 0, 0, 0), "{}", r.raw);
        assert_eq!(r.skipped, 22, "stale versions are skipped: {}", r.raw);
        assert_rows(&env.rows("usage"), &fold(&[&newer, &older]));
    }
);

idemtest!(overlapping_exports_in_one_run_never_double, |env| {
    let first = export(10, 20, "2024-05-21T00:00:00Z", 0);
    let second = export(5, 20, "2024-05-22T00:00:00Z", 1);
    env.write_jsonl("exports/usage-1.jsonl", &first);
    env.write_jsonl("exports/usage-2.jsonl", &second);
    let p = env.pipeline(
        "usage",
        "exports/usage-*.jsonl",
        "key = [\"service_line_id\", \"usage_date\"]\ncursor = \"updated_at\"\nbatch_size = 5",
    );
    let r = env.run(&p, &[]).code(0).report();
    assert_eq!(r.inserted, 32);
    assert_eq!(r.duplicates, 22);
    assert_rows(&env.rows("usage"), &fold(&[&first, &second]));
    assert_eq!(
        env.backend.checkpoint("usage"),
        Some(json!("2024-05-22T00:00:00Z"))
    );
});
