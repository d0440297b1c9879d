//! The MySQL destination against a real server (`IDEMLOAD_TEST_MYSQL`),
//! each test in its own database, dropped afterwards. Every scenario also
//! runs on SQLite, the reference: the counts must be the same.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use serde_json::{json, Value};

use crate::destination;
use crate::record::{Item, Record, SourceRef};
use crate::source::Source;
use crate::state::LockHolder;
use crate::stats::{RunStats, RunStatus};
use crate::{Error, NoProgress, Pipeline, PipelineConfig, RunOptions, RunReport};

/// A database of its own, dropped when the test ends.
struct TestDb {
    url: String,
    name: String,
    admin: String,
}

impl TestDb {
    async fn create(test: &str) -> Option<TestDb> {
        let Ok(base) = std::env::var("IDEMLOAD_TEST_MYSQL") else {
            if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("IDEMLOAD_REQUIRE_SERVICES=1 but IDEMLOAD_TEST_MYSQL is not set");
            }
            eprintln!("SKIPPED (set IDEMLOAD_TEST_MYSQL)");
            return None;
        };
        let name = format!(
            "idemload_{test}_{}_{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
        );
        let mut conn = Conn::new(Opts::from_url(&base).expect("IDEMLOAD_TEST_MYSQL"))
            .await
            .expect("connect to IDEMLOAD_TEST_MYSQL");
        conn.query_drop(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
        ))
        .await
        .unwrap();
        conn.disconnect().await.unwrap();
        let (head, tail) = base.split_at(base.find("://").unwrap() + 3);
        let path_at = tail.find('/').map_or(base.len(), |i| head.len() + i);
        let query = base[path_at..].find('?').map(|i| &base[path_at + i..]);
        let url = format!("{}/{name}{}", &base[..path_at], query.unwrap_or(""));
        Some(TestDb {
            url,
            name,
            admin: base,
        })
    }

    async fn conn(&self) -> Conn {
        Conn::new(Opts::from_url(&self.url).unwrap()).await.unwrap()
    }

    /// The table's rows as text, ordered by the first column.
    async fn dump(&self, table: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        let rows: Vec<mysql_async::Row> = conn
            .exec(format!("SELECT * FROM `{table}` ORDER BY 1"), ())
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| v.as_sql(false))
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut c) = Conn::new(Opts::from_url(&admin).unwrap()).await {
                    let _ = c
                        .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                        .await;
                    let _ = c.disconnect().await;
                }
            });
        })
        .join();
    }
}

/// A source that yields the given batches as they are.
struct Batches(VecDeque<Vec<Value>>);

#[async_trait]
impl Source for Batches {
    async fn next_batch(&mut self) -> crate::Result<Option<Vec<Item>>> {
        Ok(self.0.pop_front().map(|batch| {
            batch
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    Item::Record(Record::new(
                        crate::record::Fields::try_from(v.clone()).unwrap_or_default(),
                        SourceRef::Other(format!("test:{i}").into()),
                    ))
                })
                .collect()
        }))
    }
}

fn pipeline(url: &str, load: &str) -> Pipeline {
    let text = format!(
        "name = \"p\"\n[source]\ntype = \"file\"\npath = \"unused.jsonl\"\n\
         [destination]\nurl = \"{url}\"\ntable = \"items\"\n[load]\n{load}\n"
    );
    Pipeline::new(PipelineConfig::from_toml(&text).unwrap()).unwrap()
}

async fn run(url: &str, load: &str, batches: Vec<Vec<Value>>) -> crate::Result<RunReport> {
    pipeline(url, load)
        .run_with(
            &RunOptions::default(),
            &NoProgress,
            move |_query| async move { Ok(Box::new(Batches(batches.into())) as Box<dyn Source>) },
        )
        .await
}

/// Runs the same loads on SQLite and MySQL; the stats must be equal run by
/// run. Returns MySQL's.
async fn same_as_sqlite(db: &TestDb, load: &str, runs: Vec<Vec<Vec<Value>>>) -> Vec<RunStats> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/ref.db", dir.path().display());
    let mut out = Vec::new();
    for (n, batches) in runs.into_iter().enumerate() {
        let expected = run(&sqlite, load, batches.clone()).await.unwrap();
        let got = run(&db.url, load, batches).await.unwrap();
        assert_eq!(
            expected.stats,
            got.stats,
            "run {}: SQLite (expected) and MySQL (got) differ",
            n + 1
        );
        assert_eq!(expected.status, got.status);
        assert_eq!(expected.checkpoint_after, got.checkpoint_after);
        assert!(got.stats.is_balanced(), "unbalanced: {:?}", got.stats);
        out.push(got.stats);
    }
    out
}

fn typed_rows(range: std::ops::Range<i64>) -> Vec<Value> {
    range
        .map(|i| {
            json!({
                "id": i,
                "name": format!("contact \t{i}\n\\ é 😀"),
                "score": i as f64 / 3.0,
                "active": i % 2 == 0,
                "updated_at": format!("2024-05-0{}T10:00:00.123456+02:00", 1 + i % 9),
                "tags": {"b": [1, 2], "a": i},
                "note": null,
            })
        })
        .collect()
}

#[tokio::test]
async fn run_twice_changes_nothing() {
    let Some(db) = TestDb::create("twice").await else {
        return;
    };
    let batches = vec![typed_rows(0..40), typed_rows(40..90), typed_rows(90..100)];
    let stats = same_as_sqlite(&db, "", vec![batches.clone(), batches]).await;
    assert_eq!(stats[0].inserted, 100);
    assert_eq!((stats[1].inserted, stats[1].updated), (0, 0));
    assert_eq!(stats[1].unchanged, 100);
    let before = db.dump("items").await;
    run(&db.url, "", vec![typed_rows(0..100)]).await.unwrap();
    assert_eq!(before, db.dump("items").await);
    let mut conn = db.conn().await;
    let types: Vec<(String, String)> = conn
        .query(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'items' ORDER BY ORDINAL_POSITION",
        )
        .await
        .unwrap();
    assert_eq!(
        types,
        [
            ("id", "bigint(20)"),
            ("name", "longtext"),
            ("score", "double"),
            ("active", "tinyint(1)"),
            ("updated_at", "datetime(6)"),
            ("tags", "longtext"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // Stored in UTC; the JSON canonical; the text exactly as it came.
    let row: (String, String, String) = conn
        .query_first("SELECT CAST(updated_at AS CHAR), tags, name FROM items WHERE id = 1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.0, "2024-05-02 08:00:00.123456");
    assert_eq!(row.1, r#"{"a":1,"b":[1,2]}"#);
    assert_eq!(row.2, "contact \t1\n\\ é 😀");
}

#[tokio::test]
async fn counts_match_sqlite_for_updates_deletes_and_duplicates() {
    let Some(db) = TestDb::create("counts").await else {
        return;
    };
    let load = "delete_field = \"_deleted\"";
    let first: Vec<Value> = (1..=5).map(|i| json!({"id": i, "v": i})).collect();
    let second = vec![
        vec![
            json!({"id": 1, "v": 100}),
            json!({"id": 2, "v": 2}),
            json!({"id": 3, "_deleted": true}),
            json!({"id": 9, "_deleted": true}),
            json!({"id": 4, "v": 4, "w": "new column"}),
            json!({"id": 6, "v": 6}),
            json!({"id": 6, "v": 7}),
        ],
        vec![json!({"id": 1, "v": 101}), json!({"id": 7, "v": 7})],
    ];
    let stats = same_as_sqlite(&db, load, vec![vec![first], second]).await;
    let s = stats[1];
    assert_eq!(
        (s.inserted, s.updated, s.unchanged, s.deleted, s.duplicates),
        (2, 2, 2, 1, 2),
        "{s:?}"
    );
    assert_eq!(
        db.dump("items").await,
        [
            "1 | 101 | NULL",
            "2 | 2 | NULL",
            "4 | 4 | 'new column'",
            "5 | 5 | NULL",
            "6 | 7 | NULL",
            "7 | 7 | NULL",
        ]
    );
}

#[tokio::test]
async fn an_older_version_never_overwrites_a_newer_row() {
    let Some(db) = TestDb::create("stale").await else {
        return;
    };
    let load = "cursor = \"updated_at\"\ndelete_field = \"_deleted\"";
    let runs = vec![
        vec![vec![
            json!({"id": 1, "v": "new", "updated_at": "2024-01-01T10:00:00Z"}),
            json!({"id": 2, "v": "b", "updated_at": "2024-01-01T10:00:00Z"}),
        ]],
        vec![
            vec![
                // 09:00Z: older, although its text sorts after the stored one.
                json!({"id": 1, "v": "old", "updated_at": "2024-01-01T11:00:00+02:00"}),
                json!({"id": 2, "v": "b2", "updated_at": "2024-01-01T10:00:00.5Z"}),
            ],
            vec![json!({"id": 3, "v": "c", "updated_at": "2024-01-02T00:00:00Z"})],
        ],
        vec![vec![
            // A stale delete is skipped like a stale update; a newer one deletes.
            json!({"id": 2, "_deleted": true, "updated_at": "2023-01-01T00:00:00Z"}),
            json!({"id": 3, "_deleted": true, "updated_at": "2025-01-01T00:00:00Z"}),
        ]],
    ];
    let stats = same_as_sqlite(&db, load, runs).await;
    assert_eq!(
        (stats[1].skipped, stats[1].updated, stats[1].inserted),
        (1, 1, 1)
    );
    let v: Vec<String> = db
        .conn()
        .await
        .query("SELECT v FROM items ORDER BY id")
        .await
        .unwrap();
    assert_eq!(v, ["new", "b2"]);
    assert_eq!((stats[2].skipped, stats[2].deleted), (1, 1));
}

#[tokio::test]
async fn values_that_do_not_fit_are_rejected_and_the_batch_loads() {
    let Some(db) = TestDb::create("rejects").await else {
        return;
    };
    let long_key = "k".repeat(300);
    let runs = vec![
        vec![vec![
            json!({"id": "a", "n": 1, "t": "2024-01-01T00:00:00Z"}),
        ]],
        vec![vec![
            json!({"id": "b", "n": "7", "t": "2024-01-01T00:00:00Z"}),
            json!({"id": "c", "n": 2.5}),
            json!({"id": "d", "n": 3, "t": "tomorrow"}),
            json!({"id": "e", "n": 4}),
        ]],
    ];
    let stats = same_as_sqlite(&db, "", runs).await;
    assert_eq!((stats[1].rejected, stats[1].inserted), (3, 1));
    // MySQL-only limits: a key column holds 255 characters, DATETIME years 1000-9999.
    let report = run(
        &db.url,
        "",
        vec![vec![
            json!({"id": long_key, "n": 1}),
            json!({"id": "f", "t": "0500-01-01T00:00:00Z"}),
            json!({"id": "g", "Id": 1}),
            json!({"id": "h", "n": 5}),
        ]],
    )
    .await
    .unwrap();
    assert_eq!(report.status, RunStatus::SucceededWithRejects);
    assert_eq!((report.stats.rejected, report.stats.inserted), (3, 1));
    let mut dest = destination::open(&db.url).await.unwrap();
    let rejects = dest.rejects("p", None, 10).await.unwrap();
    let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    for expected in [
        "longer than the column's 255 characters",
        "outside a MySQL DATETIME",
        "fields \"id\" and \"Id\" would be one column",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected:?} not in {reasons:?}"
        );
    }
    assert!(rejects.iter().any(|r| r.raw.contains("kkkk")));
}

#[tokio::test]
async fn replace_and_window_write_only_the_differences() {
    let Some(db) = TestDb::create("replace").await else {
        return;
    };
    let snapshot: Vec<Value> = (1..=6).map(|i| json!({"id": i, "v": i})).collect();
    let mut changed = snapshot.clone();
    changed.remove(0);
    changed[0] = json!({"id": 2, "v": 20});
    changed.push(json!({"id": 7, "v": 7, "extra": true}));
    let stats = same_as_sqlite(
        &db,
        "mode = \"replace\"",
        vec![
            vec![snapshot[..3].to_vec(), snapshot[3..].to_vec()],
            vec![snapshot.clone()],
            vec![changed[..2].to_vec(), changed[2..].to_vec()],
            vec![],
        ],
    )
    .await;
    assert_eq!(stats[0].inserted, 6);
    assert_eq!(
        (stats[1].inserted, stats[1].updated, stats[1].deleted),
        (0, 0, 0)
    );
    assert_eq!(
        (
            stats[2].inserted,
            stats[2].updated,
            stats[2].deleted,
            stats[2].removed
        ),
        (1, 1, 0, 1)
    );
    assert_eq!((stats[3].deleted, stats[3].removed), (0, 6));

    let Some(db) = TestDb::create("window").await else {
        return;
    };
    let day = |d: i64, id: i64, v: i64| json!({"id": id, "day": d, "v": v});
    let stats = same_as_sqlite(
        &db,
        "mode = \"window\"\nwindow_field = \"day\"",
        vec![
            vec![vec![day(1, 1, 1), day(2, 2, 2), day(3, 3, 3)]],
            vec![vec![day(2, 4, 4)], vec![day(3, 3, 30)]],
        ],
    )
    .await;
    assert_eq!(
        (stats[1].inserted, stats[1].updated, stats[1].removed),
        (1, 1, 1)
    );
    assert_eq!(
        db.dump("items").await,
        ["1 | 1 | 1", "3 | 3 | 30", "4 | 2 | 4"]
    );
}

#[tokio::test]
async fn a_second_run_is_refused_naming_the_holder() {
    let Some(db) = TestDb::create("lock").await else {
        return;
    };
    let mut first = destination::open(&db.url).await.unwrap();
    let me = LockHolder::this_process("run-a");
    let lease = Duration::from_secs(30);
    assert!(first.lock("p", &me, lease).await.unwrap().is_none());
    let mut second = destination::open(&db.url).await.unwrap();
    let held = second
        .lock("p", &LockHolder::this_process("run-b"), lease)
        .await
        .unwrap()
        .expect("locked");
    assert_eq!(held.run_id, "run-a");
    let err = run(&db.url, "", vec![vec![json!({"id": 1})]])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().contains("run-a"), "{err}");
    // Another pipeline is not blocked.
    assert!(second
        .lock("other", &LockHolder::this_process("run-c"), lease)
        .await
        .unwrap()
        .is_none());
    second.unlock().await.unwrap();
    // A holder whose session ends frees the lock at once.
    drop(first);
    let mut took = None;
    for _ in 0..50 {
        took = second
            .lock("p", &LockHolder::this_process("run-b"), lease)
            .await
            .unwrap();
        if took.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took.is_none(), "still held by {took:?}");
    second.unlock().await.unwrap();
}

#[tokio::test]
async fn keys_differing_by_case_or_trailing_space_stay_distinct() {
    let Some(db) = TestDb::create("keys").await else {
        return;
    };
    let rows = vec![
        json!({"id": "a", "v": "1"}),
        json!({"id": "A", "v": "2"}),
        json!({"id": "a ", "v": "3"}),
        json!({"id": "b", "v": "x"}),
        json!({"id": "b ", "v": "x "}),
    ];
    let stats = same_as_sqlite(&db, "", vec![vec![rows.clone()], vec![rows]]).await;
    assert_eq!(stats[0].inserted, 5);
    assert_eq!((stats[1].unchanged, stats[1].updated), (5, 0));
    let n: Option<i64> = db
        .conn()
        .await
        .query_first("SELECT COUNT(*) FROM items")
        .await
        .unwrap();
    assert_eq!(n, Some(5));
    // A value that only gains a trailing space, or changes case, is a change.
    let report = run(
        &db.url,
        "",
        vec![vec![
            json!({"id": "a", "v": "1 "}),
            json!({"id": "b", "v": "X"}),
        ]],
    )
    .await
    .unwrap();
    assert_eq!(report.stats.updated, 2);
}

#[tokio::test]
async fn hash_keys_and_checkpoints_match_sqlite() {
    let Some(db) = TestDb::create("hash").await else {
        return;
    };
    let load = "hash_key = [\"a\", \"b\"]\ncursor = \"n\"";
    let rows: Vec<Value> = (0..30)
        .map(|i| json!({"a": i % 7, "b": format!("x{}", i % 3), "n": i}))
        .collect();
    let stats = same_as_sqlite(
        &db,
        load,
        vec![
            vec![rows[..10].to_vec(), rows[10..].to_vec()],
            vec![rows.clone()],
        ],
    )
    .await;
    assert_eq!(stats[0].inserted + stats[0].duplicates, 30);
    // The second run reads from the checkpoint (29) on.
    assert_eq!((stats[1].skipped, stats[1].unchanged), (29, 1));
    let mut dest = destination::open(&db.url).await.unwrap();
    assert_eq!(dest.checkpoint("p").await.unwrap(), Some(json!(29)));
    let history = dest.history("p", 5).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].status, "succeeded");
}

#[tokio::test]
async fn secrets_never_reach_errors() {
    let Some(db) = TestDb::create("secret").await else {
        return;
    };
    let url = db
        .url
        .replacen("://", "://idemload_nobody:hunter2secret@", 1)
        .replacen("root@", "", 1);
    let err = match destination::open(&url).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a wrong password connected"),
    };
    assert!(!err.contains("hunter2secret"), "{err}");
    assert!(err.contains("***"), "{err}");
}

/// Servers that refuse `LOAD DATA LOCAL` (MySQL 8's default) get the same
/// batch through multi-row `INSERT`s.
#[tokio::test]
async fn batches_load_the_same_without_local_infile() {
    use crate::destination::{Books as _, Commit, Destination as _, Target};
    use crate::key::KeySpec;
    use crate::mode::Mode;
    use crate::pipeline::plan::Planner;
    use crate::state::{Finish, RunInfo};

    let Some(db) = TestDb::create("insert").await else {
        return;
    };
    let mut dumps = Vec::new();
    for local_infile in [true, false] {
        let mut dest = super::MysqlDestination::open(&db.url).await.unwrap();
        dest.local_infile = local_infile;
        let run_id = format!("run-{local_infile}");
        let me = LockHolder::this_process(&run_id);
        assert!(dest
            .lock("p", &me, Duration::from_secs(30))
            .await
            .unwrap()
            .is_none());
        let target = Target {
            table: format!("items_{local_infile}"),
            key_columns: vec!["id".into()],
            cursor: None,
            mode: Mode::Merge,
            window_field: None,
            window: None,
            compare: Default::default(),
        };
        let info = RunInfo {
            pipeline: "p".into(),
            run_id: run_id.clone(),
            started_at: chrono::Utc::now(),
            checkpoint_before: None,
            lease: Duration::from_secs(30),
        };
        dest.begin(&info, &target).await.unwrap();
        let planner = Planner {
            key: KeySpec::Fields(vec!["id".into()]),
            cursor: None,
            low: None,
            high: None,
            delete_field: None,
            window_field: None,
            max_value_bytes: usize::MAX,
            loaded_at: None,
        };
        let items = Batches(vec![typed_rows(0..50)].into())
            .next_batch()
            .await
            .unwrap()
            .unwrap();
        let finish = Finish {
            prior: RunStats::default(),
            max_rejects: None,
            checkpoint: None,
        };
        let stats = dest
            .write(
                planner.plan(items),
                Commit {
                    checkpoint: None,
                    finish: Some(finish),
                    request: None,
                    window: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(stats.inserted, 50);
        assert_eq!(dest.local_infile, local_infile);
        dest.unlock().await.unwrap();
        dumps.push(db.dump(&target.table).await);
    }
    assert_eq!(dumps[0], dumps[1]);
}

/// With one integer key, rows equal to their stored versions are settled
/// in Rust and new keys go straight in: the counts must still be the
/// classifying statement's.
#[tokio::test]
async fn rows_settled_against_their_stored_versions_count_like_sqlite() {
    let Some(db) = TestDb::create("settled").await else {
        return;
    };
    let rows = |ids: std::ops::Range<i64>| -> Vec<Value> {
        ids.map(|i| json!({"id": i * 1000, "name": format!("n{i}"), "score": i as f64 / 7.0}))
            .collect()
    };
    let first = vec![rows(0..6), rows(6..12), rows(12..20)];
    let mut again = first.clone();
    // Fields in another order, a key met again in a later batch.
    again[0][1] = json!({"score": 1.0 / 7.0, "name": "n1", "id": 1000});
    again[2].push(first[0][2].clone());
    let mut changed = first.clone();
    changed[0][4]["score"] = json!(-0.0 * 4.0 / 7.0);
    changed[0][5].as_object_mut().unwrap().remove("name");
    changed[1].push(json!({"id": 99_000, "name": "new", "score": 1.0}));
    changed[2].push(json!({"id": 7000, "name": "twice", "score": 2.0}));
    let stats = same_as_sqlite(&db, "", vec![first.clone(), again, changed]).await;
    assert_eq!(stats[0].inserted, 20);
    let s = stats[1];
    assert_eq!(
        (s.inserted, s.updated, s.unchanged, s.duplicates),
        (0, 0, 20, 1),
        "{s:?}"
    );
    let s = stats[2];
    assert_eq!(
        (s.inserted, s.updated, s.unchanged, s.duplicates),
        (1, 2, 18, 1),
        "{s:?}"
    );
    let dump = db.dump("items").await;
    assert_eq!(dump.len(), 21);
    assert!(
        dump.contains(&"5000 | NULL | 0.7142857142857143".to_string()),
        "{dump:?}"
    );
    assert!(dump.contains(&"7000 | 'twice' | 2".to_string()), "{dump:?}");
    // (Against this table only: the SQLite reference would start empty.)
    let insert_new = run(&db.url, "mode = \"insert_new\"", first).await.unwrap();
    assert_eq!(
        (insert_new.stats.inserted, insert_new.stats.unchanged),
        (0, 20)
    );
    assert_eq!(db.dump("items").await, dump);
}
