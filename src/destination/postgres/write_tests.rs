//! Batches written to a real PostgreSQL: counts, stale versions, rejects,
//! staged modes and read-ahead, each compared with what SQLite does.

use serde_json::{json, Value};

use super::testing::{server, TestSchema};

use crate::stats::RunStats;
use crate::RunStatus;

/// Runs the same input into SQLite and PostgreSQL: the stats must agree.
async fn both(pg: &TestSchema, dir: &std::path::Path, records: &[Value], load: &str) -> RunStats {
    let sqlite = format!("sqlite://{}", dir.join("ref.db").display());
    let expected = pg.run(dir, Some(&sqlite), records, load).await.unwrap();
    let got = pg.run(dir, None, records, load).await.unwrap();
    assert_eq!(
        got.stats, expected.stats,
        "\nexpected (sqlite):\n{:?}\ngot (postgres):\n{:?}",
        expected.stats, got.stats
    );
    assert_eq!(got.status, expected.status);
    assert!(got.stats.is_balanced(), "{:?}", got.stats);
    got.stats
}

async fn xmins(pg: &TestSchema) -> Vec<String> {
    pg.client
        .query(
            &format!(
                "SELECT xmin::text FROM {}.t ORDER BY id",
                super::quote(&pg.name)
            ),
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Rows whose columns all travel as their own types are compared with
/// their stored versions byte for byte, in Rust: what is settled there
/// must be counted exactly as the merge statement would.
#[tokio::test]
async fn rows_settled_against_their_stored_versions_count_like_the_merge() {
    let Some(url) = server("rows_settled_against_their_stored_versions_count_like_the_merge")
    else {
        return;
    };
    let pg = TestSchema::new(&url, "settled").await;
    let dir = tempfile::tempdir().unwrap();
    let record = |i: i64| {
        json!({
            "id": i * 1000, "name": format!("n{i}"), "score": i as f64 / 7.0,
            "ok": i % 3 == 0, "at": format!("2024-05-01T10:{:02}:00.5+02:00", i % 60),
        })
    };
    let mut records: Vec<Value> = (0..40).map(record).collect();
    records[4]["score"] = json!(0.0);
    records[5]["name"] = Value::Null;
    let load = "batch_size = 6";
    let first = both(&pg, dir.path(), &records, load).await;
    assert_eq!(first.inserted, 40);
    let before = xmins(&pg).await;
    // The same rows, some spelled differently, and keys met again in
    // later batches (sparse keys: each batch probes key by key).
    let mut again = records.clone();
    again[1] = json!({"at": "2024-05-01T10:01:00.5+02:00", "ok": false, "score": 1.0 / 7.0,
                      "name": "n1", "id": 1000});
    again[6].as_object_mut().unwrap().remove("ok");
    again[6]["ok"] = json!(true);
    again.push(records[2].clone());
    again.push(records[30].clone());
    let stats = both(&pg, dir.path(), &again, load).await;
    assert_eq!(
        (
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.duplicates
        ),
        (0, 0, 40, 2),
        "{stats:?}"
    );
    assert_eq!(xmins(&pg).await, before, "an identical re-run wrote rows");
    // -0.0 differs in bytes but not in value: still unchanged; a field
    // left out is a null, a change; a new key goes straight in; a key
    // met again in a later batch is a duplicate, and its later version
    // is written.
    let mut changed = records.clone();
    changed[4]["score"] = json!(-0.0);
    changed[7].as_object_mut().unwrap().remove("name");
    changed.push(record(99));
    changed.push(
        json!({"id": 12000, "name": "twice", "score": 1.5, "ok": true,
                        "at": "2024-05-01T10:12:00Z"}),
    );
    let stats = both(&pg, dir.path(), &changed, load).await;
    assert_eq!(
        (
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.duplicates
        ),
        (1, 1, 39, 1),
        "{stats:?}"
    );
    let rows = pg.rows("id").await;
    assert_eq!(rows.len(), 41);
    assert_eq!(rows[7]["name"], Value::Null);
    assert_eq!(rows[12]["name"], json!("twice"));
    assert_eq!(rows[4]["score"].as_f64(), Some(0.0));
    let insert_new = both(
        &pg,
        dir.path(),
        &records,
        "mode = \"insert_new\"\nbatch_size = 6",
    )
    .await;
    assert_eq!((insert_new.inserted, insert_new.unchanged), (0, 40));
    pg.drop().await;
}

/// The next batch's stored rows are read ahead, before the batch being
/// written commits: a key changed in one batch and changed back in the
/// next must end with the later version, not be settled as equal to
/// what was stored before the run.
#[tokio::test]
async fn rows_read_ahead_never_hide_the_previous_batch_writes() {
    let Some(url) = server("rows_read_ahead_never_hide_the_previous_batch_writes") else {
        return;
    };
    let pg = TestSchema::new(&url, "ahead").await;
    let dir = tempfile::tempdir().unwrap();
    let record = |i: i64, name: &str| json!({"id": i, "name": name, "n": i * 3});
    let records: Vec<Value> = (0..40).map(|i| record(i, &format!("n{i}"))).collect();
    let load = "batch_size = 4";
    assert_eq!(both(&pg, dir.path(), &records, load).await.inserted, 40);
    // Batch b changes key 4b and puts back key 4(b-1), which batch b-1
    // changed; the last batch puts back key 36.
    let mut input = Vec::new();
    for b in 0..10i64 {
        input.push(record(4 * b, "changed"));
        input.push(records[4 * b as usize + 1].clone());
        input.push(records[4 * b as usize + 2].clone());
        input.push(match b {
            0 => records[3].clone(),
            _ => records[4 * (b - 1) as usize].clone(),
        });
    }
    input.push(records[36].clone());
    let stats = both(&pg, dir.path(), &input, load).await;
    assert_eq!(
        (stats.inserted, stats.updated, stats.duplicates),
        (0, 10, 10),
        "{stats:?}"
    );
    assert_eq!(
        pg.rows("id").await,
        records,
        "a key put back was left changed"
    );
    // A column added by one batch: the next batch's rows read ahead
    // without it are not trusted, and the run still counts exactly.
    let mut wider = records.clone();
    for r in wider.iter_mut().skip(8) {
        r["extra"] = json!(1);
    }
    let stats = both(&pg, dir.path(), &wider, load).await;
    assert_eq!((stats.updated, stats.unchanged), (32, 8), "{stats:?}");
    let stats = both(&pg, dir.path(), &wider, load).await;
    assert_eq!(stats.unchanged, 40, "{stats:?}");
    pg.drop().await;
}

#[tokio::test]
async fn run_twice_changes_nothing_and_counts_exactly() {
    let Some(url) = server("run_twice_changes_nothing_and_counts_exactly") else {
        return;
    };
    let pg = TestSchema::new(&url, "run_twice").await;
    let dir = tempfile::tempdir().unwrap();
    let mut records: Vec<Value> = (0..50)
        .map(|i| {
            json!({
                "id": i, "name": format!("n{i}"), "score": i as f64 / 3.0, "ok": i % 2 == 0,
                "at": format!("2024-05-01T10:{:02}:00.123456789+02:00", i % 60),
                "meta": {"b": [1, 2, {"z": null}], "a": "x"},
            })
        })
        .collect();
    // An in-input duplicate in the same batch: the later version wins.
    records.insert(
        5,
        json!({"id": 3, "name": "three", "score": 1.0, "ok": true,
        "at": "2024-05-01T10:00:00Z", "meta": {"a": 1}}),
    );
    let load = "batch_size = 7";
    let first = both(&pg, dir.path(), &records, load).await;
    assert_eq!((first.inserted, first.duplicates), (50, 1));
    let before = xmins(&pg).await;
    let again = both(&pg, dir.path(), &records, load).await;
    assert_eq!((again.inserted, again.updated, again.unchanged), (0, 0, 50));
    assert_eq!(xmins(&pg).await, before, "an identical re-run wrote rows");
    // The same instants written with another offset, the same object
    // with its keys in another order: still unchanged.
    let respelled: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r["id"] == json!(5) {
                r["at"] = json!("2024-05-01T08:05:00.123457Z");
                r["meta"] = json!({"a": "x", "b": [1, 2, {"z": null}]});
            }
            r
        })
        .collect();
    let pg_only = pg.run(dir.path(), None, &respelled, load).await.unwrap();
    assert_eq!((pg_only.stats.updated, pg_only.stats.unchanged), (0, 50));
    // One change, one new key, one new field.
    records[11]["name"] = json!("changed"); // id 10
    records.push(json!({"id": 100, "name": "new", "extra": 18_000_000_000_000_000_000u64}));
    // (SQLite rejects the integer beyond 64 bits; PostgreSQL makes the
    // new column numeric.)
    let changed = pg
        .run(dir.path(), None, &records, load)
        .await
        .unwrap()
        .stats;
    assert_eq!(
        (
            changed.inserted,
            changed.updated,
            changed.unchanged,
            changed.rejected
        ),
        (1, 1, 49, 0)
    );
    let rows = pg.rows("id").await;
    assert_eq!(rows.len(), 51);
    assert_eq!(rows[3]["name"], json!("three"));
    assert_eq!(rows[10]["name"], json!("changed"));
    assert_eq!(rows[50]["extra"], json!(18_000_000_000_000_000_000u64));
    let types: Vec<(String, String)> = pg
        .client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = 't' ORDER BY ordinal_position",
            &[&pg.name],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = types.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        names,
        [
            "bigint",
            "text",
            "double precision",
            "boolean",
            "timestamp with time zone",
            "jsonb",
            "numeric"
        ]
    );
    pg.drop().await;
}

#[tokio::test]
async fn older_versions_never_overwrite_newer_rows() {
    let Some(url) = server("older_versions_never_overwrite_newer_rows") else {
        return;
    };
    let pg = TestSchema::new(&url, "stale").await;
    let dir = tempfile::tempdir().unwrap();
    let load = "cursor = \"updated_at\"\nbatch_size = 2";
    let newer = [
        json!({"id": 1, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
        json!({"id": 2, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
        json!({"id": 3, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
    ];
    both(&pg, dir.path(), &newer, load).await;
    // 1: older (02:00+03:00 is 23:00Z the day before); 2: the same instant
    // with another offset and another value; 3: newer.
    let mixed = [
        json!({"id": 1, "v": "old", "updated_at": "2024-05-02T02:00:00+03:00"}),
        json!({"id": 2, "v": "tie", "updated_at": "2024-05-02T02:00:00+02:00"}),
        json!({"id": 3, "v": "newest", "updated_at": "2024-05-03T00:00:00Z"}),
        json!({"id": 4, "v": "fresh", "updated_at": "2024-05-01T00:00:00Z"}),
    ];
    let stats = both(
        &pg,
        dir.path(),
        &mixed,
        &format!("{load}\nlookback = \"30d\""),
    )
    .await;
    assert_eq!(
        (stats.skipped, stats.updated, stats.inserted),
        (1, 2, 1),
        "{stats:?}"
    );
    let v: Vec<Value> = pg.rows("id").await.iter().map(|r| r["v"].clone()).collect();
    assert_eq!(
        v,
        [json!("new"), json!("tie"), json!("newest"), json!("fresh")]
    );
    pg.drop().await;
}

#[tokio::test]
async fn values_that_do_not_fit_are_rejected_not_fatal() {
    let Some(url) = server("values_that_do_not_fit_are_rejected_not_fatal") else {
        return;
    };
    let pg = TestSchema::new(&url, "rejects").await;
    let dir = tempfile::tempdir().unwrap();
    let records = [
        json!({"id": 1, "n": 5, "t": "a"}),
        json!({"id": 2, "n": "five", "t": "b"}),
        json!({"id": 3, "n": 7.5, "t": "c"}),
        json!({"id": 4, "n": 9, "t": {"nested": true}}),
        json!({"id": 5, "n": 10, "t": "nul\u{0}byte"}),
        json!({"id": 6, "n": 18_000_000_000_000_000_000u64, "t": "big"}),
    ];
    let report = pg.run(dir.path(), None, &records, "").await.unwrap();
    assert_eq!(report.status, RunStatus::SucceededWithRejects);
    assert_eq!((report.stats.inserted, report.stats.rejected), (1, 5));
    assert!(report.stats.is_balanced());
    let mut dest = crate::destination::open(&pg.url()).await.unwrap();
    let rejects = dest.rejects("p", None, 100).await.unwrap();
    let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(
        reasons[0].contains("\"n\" is text, but the column is integer"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("is a float"), "{reasons:?}");
    assert!(reasons[2].contains("object or array"), "{reasons:?}");
    assert!(reasons[3].contains("NUL"), "{reasons:?}");
    assert!(reasons[4].contains("64-bit range"), "{reasons:?}");
    assert_eq!(
        rejects[0].source_ref,
        format!("{}:2", dir.path().join("in.jsonl").display())
    );
    let history = dest.history("p", 10).await.unwrap();
    assert_eq!(history[0].status, "succeeded_with_rejects");
    assert_eq!(history[0].stats.unwrap().rejected, 5);
    // Again in batches of two: the batches that change no row still
    // keep their rejects (they commit, not roll back).
    let again = pg
        .run(dir.path(), None, &records, "batch_size = 2")
        .await
        .unwrap();
    assert_eq!((again.stats.unchanged, again.stats.rejected), (1, 5));
    let rejects = dest.rejects("p", Some(&again.run_id), 100).await.unwrap();
    assert_eq!(rejects.len(), 5, "{rejects:?}");
    pg.drop().await;
}

#[tokio::test]
async fn deletes_and_insert_new_count_like_sqlite() {
    let Some(url) = server("deletes_and_insert_new_count_like_sqlite") else {
        return;
    };
    let pg = TestSchema::new(&url, "deletes").await;
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<Value> = (0..6).map(|i| json!({"id": i, "v": i})).collect();
    both(&pg, dir.path(), &base, "delete_field = \"_deleted\"").await;
    let batch = [
        json!({"id": 1, "_deleted": true}),
        json!({"id": 9, "_deleted": true}),
        json!({"id": 2, "v": 20}),
        json!({"id": 1, "_deleted": true}),
        json!({"id": 3, "v": 3}),
    ];
    let stats = both(
        &pg,
        dir.path(),
        &batch,
        "delete_field = \"_deleted\"\nbatch_size = 3",
    )
    .await;
    assert_eq!(
        (stats.deleted, stats.updated, stats.duplicates),
        (1, 1, 1),
        "{stats:?}"
    );
    let insert_new = [json!({"id": 2, "v": 99}), json!({"id": 50, "v": 50})];
    let stats = both(&pg, dir.path(), &insert_new, "mode = \"insert_new\"").await;
    assert_eq!((stats.inserted, stats.unchanged), (1, 1));
    let ids: Vec<Value> = pg.rows("id").await.iter().map(|r| r["v"].clone()).collect();
    assert_eq!(
        ids,
        [json!(0), json!(20), json!(3), json!(4), json!(5), json!(50)]
    );
    pg.drop().await;
}

#[tokio::test]
async fn replace_and_window_write_only_the_difference() {
    let Some(url) = server("replace_and_window_write_only_the_difference") else {
        return;
    };
    let pg = TestSchema::new(&url, "replace").await;
    let dir = tempfile::tempdir().unwrap();
    let load = "mode = \"replace\"\nbatch_size = 2";
    let a: Vec<Value> = (0..5).map(|i| json!({"id": i, "v": i})).collect();
    let first = both(&pg, dir.path(), &a, load).await;
    assert_eq!(first.inserted, 5);
    let before = xmins(&pg).await;
    let same = both(&pg, dir.path(), &a, load).await;
    assert_eq!(
        (same.inserted, same.updated, same.deleted, same.unchanged),
        (0, 0, 0, 5)
    );
    assert_eq!(xmins(&pg).await, before);
    let b = [
        json!({"id": 0, "v": 0}),
        json!({"id": 1, "v": 100}),
        json!({"id": 3, "v": 3, "w": "new"}),
        json!({"id": 7, "v": 7}),
    ];
    let changed = both(&pg, dir.path(), &b, load).await;
    assert_eq!(
        (
            changed.inserted,
            changed.updated,
            changed.deleted,
            changed.removed
        ),
        (1, 2, 0, 2),
        "{changed:?}"
    );
    assert_eq!(pg.rows("id").await.len(), 4);
    let empty = both(&pg, dir.path(), &[], load).await;
    assert_eq!((empty.deleted, empty.removed), (0, 4));

    let window = "mode = \"window\"\nwindow_field = \"day\"\nkey = [\"id\"]";
    let days: Vec<Value> = (0..6)
        .map(|i| json!({"id": i, "day": format!("2024-05-0{}T00:00:00Z", i % 3 + 1), "v": i}))
        .collect();
    pg.client
        .batch_execute(&format!("DROP TABLE {}.t", super::quote(&pg.name)))
        .await
        .unwrap();
    both(&pg, dir.path(), &days, window).await;
    let reload = [
        json!({"id": 1, "day": "2024-05-02T00:00:00Z", "v": 10}),
        json!({"id": 2, "day": "2024-05-03T00:00:00Z", "v": 2}),
    ];
    let stats = both(&pg, dir.path(), &reload, window).await;
    // Days 2 and 3 are reloaded: ids 4 and 5 go, 1 changes, 2 stays.
    assert_eq!(
        (stats.updated, stats.unchanged, stats.deleted, stats.removed),
        (1, 1, 0, 2),
        "{stats:?}"
    );
    assert_eq!(pg.rows("id").await.len(), 4);
    pg.drop().await;
}

#[tokio::test]
async fn a_statement_timeout_fails_the_run_naming_pipeline_and_batch() {
    let Some(url) = server("a_statement_timeout_fails_the_run_naming_pipeline_and_batch") else {
        return;
    };
    let pg = TestSchema::new(&url, "timeout").await;
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = (0..10).map(|i| json!({"id": i, "v": i})).collect();
    pg.run(dir.path(), None, &records[..1], "").await.unwrap();
    // Another session holds the table: the batch's merge waits, and the
    // server cancels it after 300 ms.
    pg.client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {}.t IN ACCESS EXCLUSIVE MODE",
            super::quote(&pg.name)
        ))
        .await
        .unwrap();
    let timed = format!("{}&options=-c%20statement_timeout%3D300", pg.url());
    let err = pg
        .run(dir.path(), Some(&timed), &records, "")
        .await
        .unwrap_err();
    pg.client.batch_execute("ROLLBACK").await.unwrap();
    let message = err.to_string();
    assert_eq!(err.exit_code(), 1);
    assert!(message.contains("pipeline \"p\", batch 1"), "{message}");
    assert!(message.contains("statement timeout"), "{message}");
    let report = pg.run(dir.path(), None, &records, "").await.unwrap();
    assert_eq!((report.stats.inserted, report.stats.unchanged), (9, 1));
    assert_eq!(pg.rows("id").await.len(), 10);
    pg.drop().await;
}

#[tokio::test]
async fn text_and_composite_keys_count_duplicates_across_batches() {
    let Some(url) = server("text_and_composite_keys_count_duplicates_across_batches") else {
        return;
    };
    let pg = TestSchema::new(&url, "textkeys").await;
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = (0..12)
        .map(|i| json!({"line": format!("L{}", i % 5), "day": format!("2024-05-0{}T00:00:00Z", 1 + i % 2), "n": i}))
        .collect();
    let load = "key = [\"line\", \"day\"]\nbatch_size = 4";
    let first = both(&pg, dir.path(), &records, load).await;
    assert!(first.duplicates > 0, "{first:?}");
    let again = both(&pg, dir.path(), &records, load).await;
    assert_eq!(again.inserted, 0);
    pg.client
        .batch_execute(&format!("DROP TABLE {}.t", super::quote(&pg.name)))
        .await
        .unwrap();
    std::fs::remove_file(dir.path().join("ref.db")).unwrap();
    let hashed = both(
        &pg,
        dir.path(),
        &records,
        "hash_key = [\"line\"]\nbatch_size = 4",
    )
    .await;
    assert_eq!((hashed.inserted, hashed.duplicates), (5, 7), "{hashed:?}");
    pg.drop().await;
}
