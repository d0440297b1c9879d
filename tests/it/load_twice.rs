//! Guarantee 1, idempotence: running a load again over the same input
//! changes nothing and reports `inserted 0, updated 0`.

use serde_json::{json, Value};

use crate::common::assert_rows;

fn contacts(n: u64) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            json!({
                "id": i,
                "email": format!("c{i}@example.com"),
                "name": format!("Contact {i}"),
                "score": (i * 37 % 101) as f64 / 4.0,
                "active": i % 3 != 0,
                "tags": {"tier": i % 4, "labels": ["a", "b"]},
                "updated_at": format!("2024-05-{:02}T10:{:02}:00Z", 1 + i % 28, i % 60),
            })
        })
        .collect()
}

idemtest!(rerun_changes_nothing, |env| {
    let records = contacts(50);
    env.write_jsonl("contacts.jsonl", &records);
    let first = env
        .load("contacts", &["contacts.jsonl"], &["--cursor", "updated_at"])
        .code(0)
        .report();
    assert_eq!(first.changes(), (50, 0, 0, 0));
    let table_1 = env.rows("contacts");
    let checkpoint_1 = env.backend.checkpoint("contacts");
    assert_eq!(checkpoint_1, Some(json!("2024-05-28T10:27:00Z")));
    assert_rows(&table_1, &records);

    let second = env
        .load("contacts", &["contacts.jsonl"], &["--cursor", "updated_at"])
        .code(0)
        .report();
    assert_eq!(second.changes(), (0, 0, 50, 0), "{}", second.raw);
    assert_eq!(second.status, "succeeded");
    assert_rows(&env.rows("contacts"), &table_1);
    assert_eq!(env.backend.checkpoint("contacts"), checkpoint_1);
    assert_eq!(second.checkpoint_before(), second.checkpoint_after());
});

idemtest!(rerun_of_a_pipeline_changes_nothing, |env| {
    let records = contacts(40);
    env.write_jsonl("data/contacts.jsonl", &records);
    let p = env.pipeline("contacts", "data/*.jsonl", "cursor = \"updated_at\"");
    let first = env.run(&p, &[]).code(0).report();
    assert_eq!(first.changes(), (40, 0, 0, 0));
    let table_1 = env.rows("contacts");
    let checkpoint_1 = env.backend.checkpoint("contacts");

    // The file is logged as loaded and has not changed: the re-run leaves
    // it unread (incremental reads from the checkpoint are in
    // incremental.rs).
    let second = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (second.read, second.files_skipped),
        (0, 1),
        "{}",
        second.raw
    );
    assert_eq!(second.changes(), (0, 0, 0, 0));
    assert_rows(&env.rows("contacts"), &table_1);
    assert_eq!(env.backend.checkpoint("contacts"), checkpoint_1);

    // A full refresh reads everything and still changes nothing.
    let third = env.run(&p, &["--full-refresh"]).code(0).report();
    assert_eq!(third.changes(), (0, 0, 40, 0), "{}", third.raw);
    assert_rows(&env.rows("contacts"), &table_1);
    assert_eq!(env.backend.checkpoint("contacts"), checkpoint_1);
});

idemtest!(rerun_without_cursor_changes_nothing, |env| {
    let records = contacts(30);
    env.write_jsonl("contacts.jsonl", &records);
    env.load("contacts", &["contacts.jsonl"], &["--batch-size", "7"])
        .code(0);
    let table_1 = env.rows("contacts");
    let again = env
        .load("contacts", &["contacts.jsonl"], &["--batch-size", "7"])
        .code(0)
        .report();
    assert_eq!(again.changes(), (0, 0, 30, 0));
    assert_rows(&env.rows("contacts"), &table_1);
    assert_eq!(env.backend.checkpoint("contacts"), None);
});

/// "Leave equal rows untouched (no write at all)": a trigger that logs every
/// write to the table stays silent during the re-run (SQLite only: trigger
/// syntax differs per database).
#[test]
fn rerun_writes_no_row_sqlite() {
    crate::common::with_backend(
        "rerun_writes_no_row",
        crate::common::BackendKind::Sqlite,
        |env| {
            let records = contacts(20);
            env.write_jsonl("contacts.jsonl", &records);
            env.load("contacts", &["contacts.jsonl"], &["--cursor", "updated_at"])
                .code(0);
            env.backend.execute(
                "CREATE TABLE writes (what TEXT);
                 CREATE TRIGGER log_update AFTER UPDATE ON contacts BEGIN INSERT INTO writes VALUES ('update'); END;
                 CREATE TRIGGER log_insert AFTER INSERT ON contacts BEGIN INSERT INTO writes VALUES ('insert'); END;
                 CREATE TRIGGER log_delete AFTER DELETE ON contacts BEGIN INSERT INTO writes VALUES ('delete'); END;",
            );
            let again = env
                .load("contacts", &["contacts.jsonl"], &["--cursor", "updated_at"])
                .code(0)
                .report();
            assert_eq!(again.changes(), (0, 0, 20, 0));
            assert_eq!(env.backend.count("writes"), 0, "{:?}", env.rows("writes"));

            // One changed record: exactly one write.
            let mut changed = records.clone();
            changed[3]["name"] = json!("Renamed");
            env.write_jsonl("contacts.jsonl", &changed);
            let r = env
                .load("contacts", &["contacts.jsonl"], &["--cursor", "updated_at"])
                .code(0)
                .report();
            assert_eq!(r.changes(), (0, 1, 19, 0));
            assert_eq!(env.rows("writes"), vec![json!({"what": "update"})]);
        },
    );
}
