//! The harness itself, on every backend whose server is configured: rows
//! come back normalised the same way, checkpoints and lease rows are read
//! and written, and each test's schema or database is its own. These run
//! even while the server destinations are switched off in `idemtest!`.

use serde_json::json;

use crate::common::{assert_rows, with_backend, BackendKind, Env};

fn round_trip(env: &Env) {
    let b = &env.backend;
    b.execute(
        "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT, ok BOOLEAN, score DOUBLE PRECISION, at TEXT)",
    );
    b.execute(
        "INSERT INTO things VALUES (1, 'a', TRUE, 1.5, '2024-01-01T02:00:00+02:00'), (2, NULL, FALSE, 2.0, NULL)",
    );
    assert!(b.tables().iter().any(|t| t == "things"));
    assert_rows(
        &b.rows("things"),
        &[
            json!({"id": 1, "name": "a", "ok": true, "score": 1.5, "at": "2024-01-01T00:00:00Z"}),
            json!({"id": 2, "ok": false, "score": 2}),
        ],
    );
    assert_eq!(b.count("things"), 2);
    assert_eq!(b.count_distinct("things", &["ok"]), 2);
    assert_eq!(b.count("absent"), 0);
    assert!(b.rows("absent").is_empty());

    assert_eq!(b.checkpoint("p"), None);
    b.execute("CREATE TABLE _idemload_state (pipeline TEXT, checkpoint TEXT)");
    b.execute("INSERT INTO _idemload_state VALUES ('p', '42'), ('q', '\"2024-05-01T00:00:00Z\"')");
    assert_eq!(b.checkpoint("p"), Some(json!(42)));
    assert_eq!(b.checkpoint("q"), Some(json!("2024-05-01T00:00:00Z")));

    b.execute(
        "CREATE TABLE _idemload_locks (pipeline TEXT, run_id TEXT, host TEXT, pid INTEGER, since TEXT, expires_at BIGINT)",
    );
    b.insert_lock("p", "r1", "elsewhere.invalid", 7, 1);
    assert_eq!(b.count("_idemload_locks"), 1);
    assert!(b.url().starts_with(match b.kind {
        BackendKind::Sqlite => "sqlite://",
        BackendKind::Postgres => "postgres",
        BackendKind::Mysql => "mysql://",
    }));
}

#[test]
fn backend_round_trip_sqlite() {
    with_backend("backend_round_trip", BackendKind::Sqlite, round_trip);
}

#[test]
fn backend_round_trip_postgres() {
    with_backend("backend_round_trip", BackendKind::Postgres, round_trip);
}

#[test]
fn backend_round_trip_mysql() {
    with_backend("backend_round_trip", BackendKind::Mysql, round_trip);
}
