//! `[load] tolerance` and `[load] loaded_at` (spec: "Shapes, tolerances and
//! monitors", issue 18): a corrected figure within the tolerance of the
//! stored one counts as unchanged and is not written; the load-time column
//! moves only for rows that really changed. Both in `merge` (row by row and
//! set-based) and in `replace` (the stage's swap).

use serde_json::{json, Value};

fn day(id: u32, gb: f64, note: &str) -> Value {
    json!({"id": id, "day": format!("2025-01-{id:02}"), "gb": gb, "note": note})
}

/// The first export: four days.
fn first_export() -> Vec<Value> {
    vec![
        day(1, 12.34, "a"),
        day(2, 30.0, "a"),
        day(3, 7.5, "a"),
        day(4, 1.0, "a"),
    ]
}

/// Corrections: day 1 within 0.01, day 2 the same, day 3 beyond 0.01, day 4
/// within 0.01 but with another column changed.
fn corrected_export() -> Vec<Value> {
    vec![
        day(1, 12.341, "a"),
        day(2, 30.0, "a"),
        day(3, 7.52, "a"),
        day(4, 1.009, "b"),
    ]
}

fn count(env: &crate::common::Env, table: &str, filter: &str) -> i64 {
    env.backend
        .scalar_i64(&format!("SELECT count(*) FROM {table} WHERE {filter}"))
        .unwrap_or(-1)
}

fn corrections_within_the_tolerance_are_unchanged(env: &crate::common::Env, mode: &str) {
    let table = format!("daily_{mode}");
    env.write_jsonl("export.jsonl", &first_export());
    let pipeline = env.pipeline(
        &table,
        "export.jsonl",
        &format!("key = \"id\"\nmode = \"{mode}\"\ntolerance = {{ gb = 0.01 }}"),
    );
    let first = env.run(&pipeline, &[]).code(0).report();
    assert_eq!(first.changes(), (4, 0, 0, 0), "{}", first.raw);

    env.write_jsonl("export.jsonl", &corrected_export());
    let second = env.run(&pipeline, &[]).code(0).report();
    // (inserted, updated, unchanged, deleted)
    assert_eq!(second.changes(), (0, 2, 2, 0), "{}", second.raw);
    // Day 1 keeps the stored figure: a change within the tolerance is
    // not written.
    assert_eq!(count(env, &table, "id = 1 AND gb < 12.3405"), 1);
    assert_eq!(count(env, &table, "id = 3 AND gb > 7.515"), 1);
    // A row updated for another column takes every new value.
    assert_eq!(
        count(env, &table, "id = 4 AND gb > 1.005 AND note = 'b'"),
        1
    );

    // Exactly the tolerance apart (12.35 against 12.34) is still unchanged,
    // though the doubles differ by a hair more.
    let mut edge = corrected_export();
    edge[0] = day(1, 12.35, "a");
    env.write_jsonl("export.jsonl", &edge);
    let third = env.run(&pipeline, &[]).code(0).report();
    assert_eq!(third.changes(), (0, 0, 4, 0), "{}", third.raw);
    assert_eq!(count(env, &table, "id = 1 AND gb < 12.3405"), 1);

    // Beyond it by a thousandth: updated.
    edge[0] = day(1, 12.351, "a");
    env.write_jsonl("export.jsonl", &edge);
    let fourth = env.run(&pipeline, &[]).code(0).report();
    assert_eq!(fourth.changes(), (0, 1, 3, 0), "{}", fourth.raw);
    assert_eq!(count(env, &table, "id = 1 AND gb > 12.3505"), 1);
}

idemtest!(
    merge_counts_a_correction_within_the_tolerance_as_unchanged,
    |env| {
        corrections_within_the_tolerance_are_unchanged(env, "merge");
    }
);

idemtest!(
    replace_counts_a_correction_within_the_tolerance_as_unchanged,
    |env| {
        corrections_within_the_tolerance_are_unchanged(env, "replace");
    }
);

idemtest!(
    a_tolerance_over_a_composite_key_is_applied_by_the_merge,
    |env| {
        // Two key columns: every backend classifies such rows in SQL.
        let rows = |gb: f64| {
            vec![
                json!({"line": "SL-1", "day": "2025-01-01", "gb": gb}),
                json!({"line": "SL-2", "day": "2025-01-01", "gb": 5.0}),
            ]
        };
        env.write_jsonl("export.jsonl", &rows(10.0));
        let pipeline = env.pipeline(
            "per_line",
            "export.jsonl",
            "key = [\"line\", \"day\"]\ntolerance = { gb = 0.5 }",
        );
        env.run(&pipeline, &[]).code(0);
        env.write_jsonl("export.jsonl", &rows(10.4));
        let within = env.run(&pipeline, &[]).code(0).report();
        assert_eq!(within.changes(), (0, 0, 2, 0), "{}", within.raw);
        env.write_jsonl("export.jsonl", &rows(9.4));
        let beyond = env.run(&pipeline, &[]).code(0).report();
        assert_eq!(beyond.changes(), (0, 1, 1, 0), "{}", beyond.raw);
        assert_eq!(count(env, "per_line", "line = 'SL-1' AND gb < 9.5"), 1);
    }
);

fn loaded_at_moves_only_with_a_real_change(env: &crate::common::Env, mode: &str) {
    let table = format!("stamped_{mode}");
    env.write_jsonl("export.jsonl", &first_export());
    let pipeline = env.pipeline(
        &table,
        "export.jsonl",
        &format!("key = \"id\"\nmode = \"{mode}\"\nloaded_at = \"_loaded_at\"\nbatch_size = 2"),
    );
    env.run(&pipeline, &[]).code(0);
    assert_eq!(count(env, &table, "_loaded_at IS NULL"), 0);
    let newest = format!("(SELECT max(_loaded_at) FROM {table})");
    let before = count(env, &table, &format!("_loaded_at = {newest}"));
    assert!(before >= 2, "one time per batch of two");

    // Read again, nothing changed: every row keeps its time.
    let again = env.run(&pipeline, &["--full-refresh"]).code(0).report();
    assert_eq!(again.changes(), (0, 0, 4, 0), "{}", again.raw);
    assert_eq!(
        count(env, &table, &format!("_loaded_at = {newest}")),
        before
    );

    // Day 3 changes: only its row gets a new time, the newest.
    let mut changed = first_export();
    changed[2] = day(3, 8.0, "a");
    env.write_jsonl("export.jsonl", &changed);
    let third = env.run(&pipeline, &[]).code(0).report();
    assert_eq!(third.changes(), (0, 1, 3, 0), "{}", third.raw);
    assert_eq!(count(env, &table, &format!("_loaded_at = {newest}")), 1);
    assert_eq!(
        count(env, &table, &format!("id = 3 AND _loaded_at = {newest}")),
        1
    );
}

idemtest!(merge_stamps_loaded_at_only_on_rows_that_change, |env| {
    loaded_at_moves_only_with_a_real_change(env, "merge");
});

idemtest!(replace_stamps_loaded_at_only_on_rows_that_change, |env| {
    loaded_at_moves_only_with_a_real_change(env, "replace");
});

idemtest!(a_record_carrying_the_loaded_at_field_is_rejected, |env| {
    env.write_jsonl(
        "export.jsonl",
        &[
            json!({"id": 1, "gb": 1.0}),
            json!({"id": 2, "gb": 2.0, "_loaded_at": "2020-01-01T00:00:00Z"}),
        ],
    );
    let pipeline = env.pipeline("carried", "export.jsonl", "loaded_at = \"_loaded_at\"");
    let out = env.run(&pipeline, &[]);
    out.code(4);
    let report = out.report();
    assert_eq!((report.inserted, report.rejected), (1, 1), "{}", report.raw);
    let rejects = env.idemload(&["rejects", &pipeline, "--json"]);
    assert!(
        rejects.stdout.contains("load-time column"),
        "{}",
        rejects.stdout
    );
});

#[test]
fn tolerance_and_loaded_at_mistakes_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "key = \"id\"\ntolerance = { id = 1 }",
            "always compared exactly",
        ),
        ("tolerance = { gb = \"small\" }", "not a number"),
        ("tolerance = { gb = -0.5 }", "0 or more"),
        ("cursor = \"at\"\nloaded_at = \"at\"", "name of its own"),
    ];
    for (load, expected) in cases {
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            format!(
                "name = \"p\"\n[source]\ntype = \"file\"\npath = \"x.jsonl\"\n[destination]\nurl = \"sqlite://t.db\"\ntable = \"t\"\n[load]\n{load}\n"
            ),
        )
        .unwrap();
        let out = crate::common::idemload_in(dir.path(), &["check", "p.toml"]);
        // `check` prints its verdicts on stdout.
        let stderr = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{load}: {stderr}");
        assert!(stderr.contains(expected), "{load}: {stderr}");
        assert!(stderr.contains("p.toml:"), "names the file: {stderr}");
    }
    // An API keeps its own times and compares whole records.
    let file = dir.path().join("api.toml");
    std::fs::write(
        &file,
        "name = \"api\"\n[source]\ntype = \"file\"\npath = \"x.jsonl\"\n[destination]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:9\"\nupsert = { method = \"PUT\", path = \"/c/{id}\" }\nledger = \"sqlite://l.db\"\n[load]\nloaded_at = \"_at\"\n",
    )
    .unwrap();
    let out = crate::common::idemload_in(dir.path(), &["check", "api.toml"]);
    let stderr = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("table destination"), "{stderr}");
}
