//! Write modes: `merge`, `insert_new`, `replace`, `window`, and
//! `delete_field`. The statistics describe the logical change.

use serde_json::{json, Value};

use crate::common::assert_rows;

fn people(ids: std::ops::RangeInclusive<u64>, suffix: &str) -> Vec<Value> {
    ids.map(|i| json!({"id": i, "name": format!("p{i}{suffix}")}))
        .collect()
}

idemtest!(replace_with_identical_snapshot_reports_no_change, |env| {
    env.write_jsonl("snap.jsonl", &people(1..=10, ""));
    let first = env
        .load(
            "p",
            &["snap.jsonl"],
            &["--mode", "replace", "--batch-size", "3"],
        )
        .code(0)
        .report();
    assert_eq!(first.changes(), (10, 0, 0, 0));
    let again = env
        .load(
            "p",
            &["snap.jsonl"],
            &["--mode", "replace", "--batch-size", "3"],
        )
        .code(0)
        .report();
    assert_eq!(again.changes(), (0, 0, 10, 0), "{}", again.raw);
    assert_rows(&env.rows("p"), &people(1..=10, ""));
    assert!(
        !env.backend
            .tables()
            .iter()
            .any(|t| t.starts_with("_idemload_stage")),
        "the stage is dropped"
    );
});

idemtest!(replace_with_smaller_snapshot_removes_rows, |env| {
    env.write_jsonl("big.jsonl", &people(1..=10, ""));
    env.load("p", &["big.jsonl"], &["--mode", "replace"])
        .code(0);
    let mut small = people(1..=7, "");
    small[0]["name"] = json!("renamed");
    env.write_jsonl("small.jsonl", &small);
    let r = env
        .load(
            "p",
            &["small.jsonl"],
            &["--mode", "replace", "--batch-size", "2"],
        )
        .code(0)
        .report();
    // Removed rows are `removed`, not `deleted` (no record deleted them).
    assert_eq!(r.changes(), (0, 1, 6, 0), "{}", r.raw);
    assert_eq!(r.removed, 3);
    assert_rows(&env.rows("p"), &small);
});

fn usage(days: std::ops::RangeInclusive<u32>, gb: u64) -> Vec<Value> {
    let mut rows = Vec::new();
    for day in days {
        for line in ["SL-1", "SL-2"] {
            rows.push(json!({"line": line, "day": format!("2024-05-{day:02}"), "gb": gb}));
        }
    }
    rows
}

idemtest!(window_reloads_only_the_loaded_range, |env| {
    let all = usage(1..=5, 1);
    env.write_jsonl("all.jsonl", &all);
    let args = [
        "--mode",
        "window",
        "--window-field",
        "day",
        "--key",
        "line,day",
    ];
    env.load("u", &["all.jsonl"], &args).code(0);
    // Days 3..4 recomputed: SL-2 of day 3 is gone, the rest changed.
    let mut reload: Vec<Value> = usage(3..=4, 2);
    reload.retain(|r| !(r["line"] == "SL-2" && r["day"] == "2024-05-03"));
    env.write_jsonl("reload.jsonl", &reload);
    let r = env.load("u", &["reload.jsonl"], &args).code(0).report();
    assert_eq!(r.changes(), (0, 3, 0, 0), "{}", r.raw);
    assert_eq!(r.removed, 1);
    let mut expected: Vec<Value> = all
        .into_iter()
        .filter(|r| !matches!(r["day"].as_str(), Some("2024-05-03" | "2024-05-04")))
        .collect();
    expected.extend(reload);
    assert_rows(&env.rows("u"), &expected);
});

idemtest!(insert_new_never_touches_existing_rows, |env| {
    env.write_jsonl("a.jsonl", &people(1..=5, ""));
    env.load("p", &["a.jsonl"], &["--mode", "insert_new"])
        .code(0);
    env.write_jsonl("b.jsonl", &people(3..=8, "-changed"));
    let r = env
        .load("p", &["b.jsonl"], &["--mode", "insert_new"])
        .code(0)
        .report();
    assert_eq!(r.changes(), (3, 0, 3, 0), "{}", r.raw);
    let mut expected = people(1..=5, "");
    expected.extend(people(6..=8, "-changed"));
    assert_rows(&env.rows("p"), &expected);
});

idemtest!(delete_field_deletes_the_row_with_its_key, |env| {
    env.write_jsonl("a.jsonl", &people(1..=4, ""));
    env.load("p", &["a.jsonl"], &["--delete-field", "_deleted"])
        .code(0);
    env.write_jsonl(
        "b.jsonl",
        &[
            json!({"id": 2, "_deleted": true}),
            json!({"id": 3, "name": "p3", "_deleted": false}),
            json!({"id": 9, "_deleted": true}),
        ],
    );
    let r = env
        .load("p", &["b.jsonl"], &["--delete-field", "_deleted"])
        .code(0)
        .report();
    assert_eq!(r.deleted, 1, "{}", r.raw);
    assert_eq!(r.unchanged, 2, "{}", r.raw);
    assert_rows(
        &env.rows("p"),
        &[
            json!({"id": 1, "name": "p1"}),
            json!({"id": 3, "name": "p3"}),
            json!({"id": 4, "name": "p4"}),
        ],
    );
    // Running the deletions again changes nothing.
    let again = env
        .load("p", &["b.jsonl"], &["--delete-field", "_deleted"])
        .code(0)
        .report();
    assert_eq!(again.changes(), (0, 0, 3, 0), "{}", again.raw);
});

idemtest!(delete_field_outside_merge_is_a_configuration_error, |env| {
    env.write_jsonl("a.jsonl", &people(1..=2, ""));
    let out = env.load(
        "p",
        &["a.jsonl"],
        &["--mode", "replace", "--delete-field", "_deleted"],
    );
    out.code(2);
    assert!(out.stderr.contains("delete_field"), "{}", out.stderr);
});

idemtest!(new_fields_add_columns_and_keep_earlier_rows, |env| {
    env.write_jsonl("a.jsonl", &people(1..=2, ""));
    env.load("p", &["a.jsonl"], &[]).code(0);
    env.write_jsonl(
        "b.jsonl",
        &[
            json!({"id": 3, "name": "p3", "city": null}),
            json!({"id": 4, "name": "p4", "city": "Oslo", "meta": {"b": [1, 2], "a": true}}),
        ],
    );
    let r = env.load("p", &["b.jsonl"], &[]).code(0).report();
    assert_eq!(r.changes(), (2, 0, 0, 0));
    let mut expected = people(1..=3, "");
    expected.push(json!({"id": 4, "name": "p4", "city": "Oslo", "meta": {"a": true, "b": [1, 2]}}));
    assert_rows(&env.rows("p"), &expected);

    // A snapshot without a field sets it to null in replace mode.
    env.write_jsonl("c.jsonl", &[json!({"id": 4, "name": "p4"})]);
    let r = env
        .load("p", &["c.jsonl"], &["--mode", "replace"])
        .code(0)
        .report();
    assert_eq!(r.changes(), (0, 1, 0, 0), "{}", r.raw);
    assert_eq!(r.removed, 3, "{}", r.raw);
    assert_rows(&env.rows("p"), &[json!({"id": 4, "name": "p4"})]);
});
