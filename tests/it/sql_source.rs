//! SQL sources (spec: "HTTP sources", SQL paragraph; issue 4): a table or a
//! query of SQLite, PostgreSQL or MariaDB loaded into SQLite, incrementally,
//! with the cursor filter pushed into the source query (asserted through
//! `read`: rows below the bound never leave the database).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

// ---- helpers ----------------------------------------------------------------

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().to_path_buf();
    Dir { _tmp: tmp, path }
}

impl Dir {
    fn db(&self) -> PathBuf {
        self.path.join("w.db")
    }

    fn pipeline(&self, source: &str, load: &str) -> PathBuf {
        let file = self.path.join("p.toml");
        let text = format!(
            "name = \"sql\"\n[source]\ntype = \"sql\"\n{source}\n[destination]\nurl = \"sqlite://{}\"\ntable = \"t\"\n[load]\n{load}\n",
            self.db().display()
        );
        std::fs::write(&file, text).unwrap();
        file
    }
}

fn run_ok(pipeline: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_idemload"))
        .arg("run")
        .arg(pipeline)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "run failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rows(db: &Path, sql: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let cells: Vec<String> = (0..n)
            .map(|i| match row.get_ref(i).unwrap() {
                rusqlite::types::ValueRef::Null => "NULL".into(),
                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                rusqlite::types::ValueRef::Real(v) => v.to_string(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                rusqlite::types::ValueRef::Blob(_) => "BLOB".into(),
            })
            .collect();
        out.push(cells.join("|"));
    }
    out
}

fn eq_rows(got: Vec<String>, expected: Vec<String>) {
    if got != expected {
        panic!(
            "\nexpected:\n{}\n\ngot:\n{}\n",
            expected.join("\n"),
            got.join("\n")
        );
    }
}

/// The service URL, or `None` after printing SKIPPED (a panic under
/// IDEMLOAD_REQUIRE_SERVICES=1).
fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{var} is not set and IDEMLOAD_REQUIRE_SERVICES=1");
            }
            eprintln!("SKIPPED (set {var})");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

fn day(i: i64) -> String {
    (chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap() + chrono::Duration::days(i))
        .format("%Y-%m-%dT09:00:00Z")
        .to_string()
}

// ---- SQLite -------------------------------------------------------------------

fn sqlite_source(d: &Dir) -> (PathBuf, rusqlite::Connection) {
    let path = d.path.join("src.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, name TEXT, version INTEGER, amount REAL, updated_at TEXT);",
    )
    .unwrap();
    (path, conn)
}

fn insert_sqlite(conn: &rusqlite::Connection, ids: std::ops::RangeInclusive<i64>, tag: &str) {
    for i in ids {
        conn.execute(
            "INSERT OR REPLACE INTO events VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![i, format!("{tag}{i}"), i * 10, i as f64 / 4.0, day(i)],
        )
        .unwrap();
    }
}

#[test]
fn sqlite_table_loads_incrementally_reading_only_rows_near_the_checkpoint() {
    let d = dir();
    let (src, conn) = sqlite_source(&d);
    insert_sqlite(&conn, 1..=100, "e");
    let p = d.pipeline(
        &format!("url = \"sqlite://{}\"\ntable = \"events\"", src.display()),
        "cursor = \"updated_at\"\nbatch_size = 7",
    );
    let first = run_ok(&p);
    assert_eq!(first["read"], 100);
    assert_eq!(first["checkpoint_after"], day(100));
    insert_sqlite(&conn, 101..=110, "e");
    insert_sqlite(&conn, 100..=100, "changed");
    let second = run_ok(&p);
    // Timestamps compare as text in SQLite: the pushed-down bound is the
    // day before the checkpoint, so day 99 is read (and skipped) too; the
    // other 98 rows below it never leave the source.
    assert_eq!(second["read"], 12, "{second}");
    assert_eq!(second["skipped"], 1, "{second}");
    assert_eq!(second["inserted"], 10);
    assert_eq!(second["updated"], 1);
    let want: Vec<String> = (1..=110)
        .map(|i| {
            let tag = if i == 100 { "changed" } else { "e" };
            format!("{i}|{tag}{i}|{}|{}", i * 10, i as f64 / 4.0)
        })
        .collect();
    eq_rows(
        rows(
            &d.db(),
            "SELECT id, name, version, amount FROM t ORDER BY id",
        ),
        want,
    );
    let again = run_ok(&p);
    assert_eq!(
        (again["inserted"].as_u64(), again["updated"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn sqlite_query_with_an_integer_cursor_filters_exactly_at_the_source() {
    let d = dir();
    let (src, conn) = sqlite_source(&d);
    insert_sqlite(&conn, 1..=50, "e");
    let p = d.pipeline(
        &format!(
            "url = \"sqlite://{}\"\nquery = \"SELECT id, name, version FROM events WHERE id % 10 <> 0\"",
            src.display()
        ),
        "cursor = \"version\"\nlookback = 5",
    );
    let first = run_ok(&p);
    assert_eq!(first["read"], 45);
    assert_eq!(first["checkpoint_after"], 490);
    insert_sqlite(&conn, 51..=55, "e");
    let second = run_ok(&p);
    // version >= 490 - 5: 490 and the five new rows.
    assert_eq!(second["read"], 6, "{second}");
    assert_eq!(second["skipped"], 0);
    assert_eq!(second["inserted"], 5);
    assert_eq!(rows(&d.db(), "SELECT count(*) FROM t"), ["50"]);
}

// ---- PostgreSQL ----------------------------------------------------------------

fn pg(url: &str, sql: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
    });
}

struct PgSchema {
    url: String,
    name: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        pg(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

#[test]
fn postgres_table_loads_incrementally_with_the_cursor_pushed_down() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    let schema = PgSchema {
        name: unique("idemload_src"),
        url: url.clone(),
    };
    let s = &schema.name;
    pg(
        &url,
        &format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.events (id bigint PRIMARY KEY, name text, price numeric(10,2),
                 active boolean, tags jsonb, seen timestamp, updated_at timestamptz NOT NULL);
             INSERT INTO {s}.events
                 SELECT i, 'e' || i, i * 1.25, i % 2 = 0, jsonb_build_object('n', i),
                        timestamp '2024-01-01 00:00:00' + i * interval '1 hour',
                        timestamptz '2024-01-01 09:00:00+00' + i * interval '1 day'
                 FROM generate_series(1, 100) i;"
        ),
    );
    let d = dir();
    let p = d.pipeline(
        &format!("url = \"{url}\"\ntable = \"{s}.events\""),
        "cursor = \"updated_at\"\nbatch_size = 9",
    );
    let first = run_ok(&p);
    assert_eq!(first["read"], 100);
    pg(
        &url,
        &format!(
            "INSERT INTO {s}.events
                 SELECT i, 'e' || i, i * 1.25, i % 2 = 0, jsonb_build_object('n', i),
                        timestamp '2024-01-01 00:00:00' + i * interval '1 hour',
                        timestamptz '2024-01-01 09:00:00+00' + i * interval '1 day'
                 FROM generate_series(101, 104) i;"
        ),
    );
    let second = run_ok(&p);
    // Exactly the row at the checkpoint and the four new ones.
    assert_eq!(second["read"], 5, "{second}");
    assert_eq!(second["skipped"], 0);
    assert_eq!(second["inserted"], 4);
    eq_rows(
        rows(&d.db(), "SELECT id, name, price, active, tags, seen, updated_at FROM t WHERE id IN (1, 104) ORDER BY id"),
        vec![
            "1|e1|1.25|0|{\"n\":1}|2024-01-01T01:00:00Z|2024-01-02T09:00:00+00:00".into(),
            "104|e104|130|1|{\"n\":104}|2024-01-05T08:00:00Z|2024-04-14T09:00:00+00:00".into(),
        ],
    );
    assert_eq!(rows(&d.db(), "SELECT count(*) FROM t"), ["104"]);
}

#[test]
fn postgres_source_takes_a_schema_and_shows_the_servers_message() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    let schema = PgSchema {
        name: unique("idemload_src"),
        url: url.clone(),
    };
    let s = &schema.name;
    pg(
        &url,
        &format!(
            "CREATE SCHEMA {s}; CREATE TABLE {s}.items (id bigint PRIMARY KEY, name text);
             INSERT INTO {s}.items VALUES (1, 'a'), (2, 'b');"
        ),
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    let in_schema = format!("{url}{sep}schema={s}");
    let d = dir();
    let p = d.pipeline(&format!("url = \"{in_schema}\"\ntable = \"items\""), "");
    let first = run_ok(&p);
    assert_eq!(first["inserted"], 2, "{first}");

    // A missing table: the server's own message and SQLSTATE, not "db error".
    let p = d.pipeline(
        &format!("url = \"{in_schema}\"\ntable = \"no_such_items\""),
        "",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_idemload"))
        .arg("run")
        .arg(&p)
        .arg("-v")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("relation \"no_such_items\" does not exist") && stderr.contains("42P01"),
        "the server's message and code are missing:\n{stderr}"
    );
}

// ---- MariaDB / MySQL -------------------------------------------------------------

fn my(url: &str, sql: &str) {
    use mysql_async::prelude::Queryable;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = mysql_async::Conn::from_url(url).await.unwrap();
        conn.query_drop(sql).await.unwrap();
        conn.disconnect().await.unwrap();
    });
}

struct MyDatabase {
    url: String,
    name: String,
}

impl Drop for MyDatabase {
    fn drop(&mut self) {
        my(&self.url, &format!("DROP DATABASE IF EXISTS {}", self.name));
    }
}

#[test]
fn mysql_query_loads_incrementally_with_the_cursor_pushed_down() {
    let Some(url) = service("IDEMLOAD_TEST_MYSQL") else {
        return;
    };
    let db = MyDatabase {
        name: unique("idemload_src"),
        url: url.clone(),
    };
    my(&url, &format!("CREATE DATABASE {}", db.name));
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let src = format!("{base}/{}", db.name);
    let insert = |from: i64, to: i64| {
        let values: Vec<String> = (from..=to)
            .map(|i| {
                format!(
                    "({i}, 'e{i}', {}.50, {}, DATE_ADD('2024-01-01 09:00:00', INTERVAL {i} DAY))",
                    i,
                    i % 2
                )
            })
            .collect();
        my(
            &src,
            &format!("INSERT INTO events VALUES {}", values.join(",")),
        );
    };
    my(
        &src,
        "CREATE TABLE events (id BIGINT PRIMARY KEY, name VARCHAR(50), price DECIMAL(10,2), active BOOLEAN, updated_at DATETIME NOT NULL)",
    );
    insert(1, 100);
    let d = dir();
    let p = d.pipeline(
        &format!(
            "url = \"{src}\"\nquery = \"SELECT id, name, price, active, updated_at FROM events\""
        ),
        "cursor = \"updated_at\"\nbatch_size = 9",
    );
    let first = run_ok(&p);
    assert_eq!(first["read"], 100);
    assert_eq!(first["checkpoint_after"], "2024-04-10T09:00:00Z");
    insert(101, 103);
    let second = run_ok(&p);
    // A DATETIME cursor is filtered exactly: the row at the checkpoint and
    // the three new ones.
    assert_eq!(second["read"], 4, "{second}");
    assert_eq!(second["skipped"], 0);
    assert_eq!(second["inserted"], 3);
    eq_rows(
        rows(
            &d.db(),
            "SELECT id, name, price, active, updated_at FROM t WHERE id IN (1, 102) ORDER BY id",
        ),
        vec![
            "1|e1|1.5|1|2024-01-02T09:00:00Z".into(),
            "102|e102|102.5|0|2024-04-12T09:00:00Z".into(),
        ],
    );
}
