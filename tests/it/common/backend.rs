//! The destinations under test, and how a test reads what a run left there.
//!
//! SQLite is a real file in the test's temp dir. PostgreSQL and MySQL come
//! from `IDEMLOAD_TEST_POSTGRES` / `IDEMLOAD_TEST_MYSQL`: each test gets its
//! own uniquely named schema (PostgreSQL) or database (MySQL), dropped when
//! the test ends. Rows come back as normalised JSON objects so that tables
//! compare across backends: booleans become 0/1, integral floats integers,
//! timestamps UTC RFC 3339, JSON values their canonical text, nulls absent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Map, Value};

/// Which destination a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
    Mysql,
}

/// A destination of one test.
pub struct Backend {
    pub kind: BackendKind,
    url: String,
    inner: Inner,
}

enum Inner {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        rt: tokio::runtime::Runtime,
        client: tokio_postgres::Client,
        schema: String,
    },
    Mysql {
        rt: tokio::runtime::Runtime,
        /// Server URL without a database.
        server: String,
        /// This test's database.
        db: String,
    },
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test process) uses: `it_<test>_<pid>_<n>`.
fn unique_name(test: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let suffix = format!("_{}_{n}", std::process::id());
    let mut stem: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    stem.truncate(60 - suffix.len() - 3);
    format!("it_{stem}{suffix}")
}

/// The server URL of a backend, or `None` (skip) when its variable is unset.
pub fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{var} is not set, and IDEMLOAD_REQUIRE_SERVICES=1 requires it");
            }
            eprintln!("SKIPPED (set {var})");
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `mysql://u@h:3306/db?x=1` -> (`mysql://u@h:3306`, `?x=1`).
fn split_mysql_url(url: &str) -> (String, String) {
    let (without_query, query) = match url.find('?') {
        Some(i) => (&url[..i], url[i..].to_string()),
        None => (url, String::new()),
    };
    let authority_start = without_query.find("://").map_or(0, |i| i + 3);
    let server = match without_query[authority_start..].find('/') {
        Some(i) => &without_query[..authority_start + i],
        None => without_query,
    };
    (server.to_string(), query)
}

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn my_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

impl Backend {
    /// The backend of one test, or `None` when its server is not configured.
    pub fn new(kind: BackendKind, test: &str, dir: &Path) -> Option<Backend> {
        match kind {
            BackendKind::Sqlite => {
                let path = dir.join("warehouse.db");
                Some(Backend {
                    kind,
                    url: format!("sqlite://{}", path.display()),
                    inner: Inner::Sqlite { path },
                })
            }
            BackendKind::Postgres => {
                let base = server_url("IDEMLOAD_TEST_POSTGRES")?;
                let schema = unique_name(test);
                let rt = runtime();
                let (client, connection) = rt
                    .block_on(tokio_postgres::connect(&base, tokio_postgres::NoTls))
                    .unwrap_or_else(|e| panic!("connect to IDEMLOAD_TEST_POSTGRES: {e:?}"));
                rt.spawn(async move {
                    let _ = connection.await;
                });
                rt.block_on(client.batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {s} CASCADE; CREATE SCHEMA {s}; SET search_path TO {s}",
                    s = pg_ident(&schema)
                )))
                .unwrap_or_else(|e| panic!("create schema {schema}: {e}"));
                let sep = if base.contains('?') { '&' } else { '?' };
                Some(Backend {
                    kind,
                    url: format!("{base}{sep}schema={schema}"),
                    inner: Inner::Postgres { rt, client, schema },
                })
            }
            BackendKind::Mysql => {
                let base = server_url("IDEMLOAD_TEST_MYSQL")?;
                let (server, query) = split_mysql_url(&base);
                let db = unique_name(test);
                let rt = runtime();
                rt.block_on(async {
                    use mysql_async::prelude::Queryable;
                    let mut conn = mysql_async::Conn::from_url(format!("{server}{query}")).await?;
                    conn.query_drop(format!("DROP DATABASE IF EXISTS {}", my_ident(&db)))
                        .await?;
                    conn.query_drop(format!("CREATE DATABASE {}", my_ident(&db)))
                        .await?;
                    conn.disconnect().await
                })
                .unwrap_or_else(|e| panic!("create database {db}: {e}"));
                Some(Backend {
                    kind,
                    url: format!("{server}/{db}{query}"),
                    inner: Inner::Mysql { rt, server, db },
                })
            }
        }
    }

    /// The destination URL runs use.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The SQLite file (SQLite backend only).
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.inner {
            Inner::Sqlite { path } => Some(path),
            _ => None,
        }
    }

    /// Every row of a table as raw JSON objects (unnormalised, unsorted);
    /// empty when the table does not exist.
    pub fn raw_rows(&self, table: &str) -> Vec<Value> {
        if !self.tables().iter().any(|t| t == table) {
            return Vec::new();
        }
        match &self.inner {
            Inner::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                let mut stmt = conn
                    .prepare(&format!("SELECT * FROM {}", pg_ident(table)))
                    .expect("select");
                let names: Vec<String> =
                    stmt.column_names().iter().map(|s| s.to_string()).collect();
                let rows = stmt
                    .query_map([], |r| {
                        let mut obj = Map::new();
                        for (i, name) in names.iter().enumerate() {
                            use rusqlite::types::Value as S;
                            let v = match r.get::<_, S>(i)? {
                                S::Null => Value::Null,
                                S::Integer(i) => Value::from(i),
                                S::Real(f) => Value::from(f),
                                S::Text(t) => Value::String(t),
                                S::Blob(b) => Value::String(String::from_utf8_lossy(&b).into()),
                            };
                            obj.insert(name.clone(), v);
                        }
                        Ok(Value::Object(obj))
                    })
                    .expect("query")
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .expect("rows");
                rows
            }
            Inner::Postgres { rt, client, schema } => {
                let sql = format!(
                    "SELECT row_to_json(t)::text FROM {}.{} t",
                    pg_ident(schema),
                    pg_ident(table)
                );
                rt.block_on(client.query(&sql, &[]))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .iter()
                    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).expect("row json"))
                    .collect()
            }
            Inner::Mysql { .. } => self
                .mysql_rows(&format!("SELECT * FROM {}", my_ident(table)))
                .into_iter()
                .collect(),
        }
    }

    /// Every row of a table, normalised and sorted (see the module docs).
    pub fn rows(&self, table: &str) -> Vec<Value> {
        norm_rows(self.raw_rows(table))
    }

    /// Number of rows in a table (0 when it does not exist).
    pub fn count(&self, table: &str) -> u64 {
        if !self.tables().iter().any(|t| t == table) {
            return 0;
        }
        let sql = format!("SELECT count(*) FROM {}", self.ident(table));
        self.scalar_i64(&sql).unwrap_or(0) as u64
    }

    /// How many rows more than distinct keys the table holds (0 when no key
    /// appears twice), read in one statement, so in one snapshot: a killed
    /// client's last COMMIT may still land between two separate reads.
    pub fn doubled(&self, table: &str, key: &[&str]) -> i64 {
        if !self.tables().iter().any(|t| t == table) {
            return 0;
        }
        let cols = key
            .iter()
            .map(|k| self.ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let t = self.ident(table);
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t}) - (SELECT count(*) FROM (SELECT DISTINCT {cols} FROM {t}) d)"
        );
        self.scalar_i64(&sql).unwrap_or(0)
    }

    /// Number of distinct values of the key columns (equal to `count` when
    /// no key appears twice).
    pub fn count_distinct(&self, table: &str, key: &[&str]) -> u64 {
        if !self.tables().iter().any(|t| t == table) {
            return 0;
        }
        let cols = key
            .iter()
            .map(|k| self.ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT count(*) FROM (SELECT DISTINCT {cols} FROM {}) d",
            self.ident(table)
        );
        self.scalar_i64(&sql).unwrap_or(0) as u64
    }

    /// The pipeline's checkpoint as stored in `_idemload_state`.
    pub fn checkpoint(&self, pipeline: &str) -> Option<Value> {
        if !self.tables().iter().any(|t| t == "_idemload_state") {
            return None;
        }
        let quoted = pipeline.replace('\'', "''");
        let text = match &self.inner {
            Inner::Sqlite { .. } => self.scalar_text(&format!(
                "SELECT checkpoint FROM _idemload_state WHERE pipeline = '{quoted}'"
            )),
            Inner::Postgres { .. } => self.scalar_text(&format!(
                "SELECT checkpoint::text FROM _idemload_state WHERE pipeline = '{quoted}'"
            )),
            Inner::Mysql { .. } => self.scalar_text(&format!(
                "SELECT CAST(checkpoint AS CHAR) FROM _idemload_state WHERE pipeline = '{quoted}'"
            )),
        }?;
        Some(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Table names of the database (schema) under test.
    pub fn tables(&self) -> Vec<String> {
        match &self.inner {
            Inner::Sqlite { path } => {
                if !path.exists() {
                    return Vec::new();
                }
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                let mut stmt = conn
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                    .expect("tables");
                let names = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .expect("tables")
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .expect("tables");
                names
            }
            Inner::Postgres { rt, client, schema } => rt
                .block_on(client.query(
                    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
                    &[schema],
                ))
                .expect("tables")
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect(),
            Inner::Mysql { db, .. } => self
                .mysql_rows(&format!(
                    "SELECT CAST(table_name AS CHAR) AS t FROM information_schema.tables WHERE table_schema = '{db}' ORDER BY 1"
                ))
                .into_iter()
                .filter_map(|r| r["t"].as_str().map(String::from))
                .collect(),
        }
    }

    /// Runs one statement (bare identifiers resolve in the test's schema).
    pub fn execute(&self, sql: &str) {
        match &self.inner {
            Inner::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                conn.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Inner::Postgres { rt, client, .. } => {
                rt.block_on(client.batch_execute(sql))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Inner::Mysql { rt, .. } => {
                let url = self.url();
                rt.block_on(async {
                    use mysql_async::prelude::Queryable;
                    let mut conn = mysql_async::Conn::from_url(url).await?;
                    conn.query_drop(sql).await?;
                    conn.disconnect().await
                })
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// Writes a lease row into `_idemload_locks` by hand, as another run
    /// (of another host, say) would have left it.
    pub fn insert_lock(
        &self,
        pipeline: &str,
        run_id: &str,
        host: &str,
        pid: u32,
        expires_at_ms: i64,
    ) {
        let since = match &self.inner {
            Inner::Mysql { db, .. } => {
                let ty = self
                    .mysql_rows(&format!(
                        "SELECT CAST(data_type AS CHAR) AS t FROM information_schema.columns WHERE table_schema = '{db}' AND table_name = '_idemload_locks' AND column_name = 'since'"
                    ))
                    .first()
                    .and_then(|r| r["t"].as_str().map(str::to_ascii_lowercase))
                    .unwrap_or_default();
                if ty.contains("date") || ty.contains("time") {
                    "2024-01-01 00:00:00"
                } else {
                    "2024-01-01T00:00:00.000Z"
                }
            }
            // Text and timestamptz both take this literal.
            _ => "2024-01-01T00:00:00.000Z",
        };
        self.execute(&format!(
            "INSERT INTO _idemload_locks (pipeline, run_id, host, pid, since, expires_at) VALUES ('{pipeline}', '{run_id}', '{host}', {pid}, '{since}', {expires_at_ms})"
        ));
    }

    fn ident(&self, name: &str) -> String {
        match self.kind {
            BackendKind::Mysql => my_ident(name),
            _ => pg_ident(name),
        }
    }

    /// The first column of the first row of a query, as an integer.
    pub fn scalar_i64(&self, sql: &str) -> Option<i64> {
        match &self.inner {
            Inner::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Inner::Postgres { rt, client, .. } => rt
                .block_on(client.query_one(sql, &[]))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<_, Option<i64>>(0),
            Inner::Mysql { .. } => self
                .mysql_rows(sql)
                .first()
                .and_then(|r| r.as_object()?.values().next()?.as_i64()),
        }
    }

    pub fn scalar_text(&self, sql: &str) -> Option<String> {
        match &self.inner {
            Inner::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let mut rows = stmt.query([]).unwrap_or_else(|e| panic!("{sql}: {e}"));
                match rows.next().unwrap_or_else(|e| panic!("{sql}: {e}")) {
                    Some(r) => r.get::<_, Option<String>>(0).expect("text"),
                    None => None,
                }
            }
            Inner::Postgres { rt, client, .. } => rt
                .block_on(client.query_opt(sql, &[]))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .and_then(|r| r.get::<_, Option<String>>(0)),
            Inner::Mysql { .. } => self
                .mysql_rows(sql)
                .first()
                .and_then(|r| r.as_object()?.values().next()?.as_str().map(String::from)),
        }
    }

    /// The first column of every row of a query, as text (`None` for
    /// NULL); the query casts to text itself where the backend needs it.
    pub fn texts(&self, sql: &str) -> Vec<Option<String>> {
        match &self.inner {
            Inner::Sqlite { path } => {
                let conn = rusqlite::Connection::open(path).expect("open sqlite");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                stmt.query_map([], |r| r.get::<_, Option<String>>(0))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Inner::Postgres { rt, client, .. } => rt
                .block_on(client.query(sql, &[]))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| r.get::<_, Option<String>>(0))
                .collect(),
            Inner::Mysql { .. } => self
                .mysql_rows(sql)
                .iter()
                .map(|r| {
                    let v = r.as_object()?.values().next()?;
                    v.as_str().map(String::from)
                })
                .collect(),
        }
    }

    /// Rows of a MySQL query as JSON objects (binary protocol, so values
    /// come typed).
    fn mysql_rows(&self, sql: &str) -> Vec<Value> {
        let Inner::Mysql { rt, server, db } = &self.inner else {
            unreachable!("mysql_rows on another backend");
        };
        let (_, query) = split_mysql_url(&self.url);
        let url = format!("{server}/{db}{query}");
        let rows: Vec<mysql_async::Row> = rt
            .block_on(async {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_async::Conn::from_url(url).await?;
                let rows = conn.exec(sql, ()).await?;
                conn.disconnect().await?;
                Ok::<_, mysql_async::Error>(rows)
            })
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter()
            .map(|row| {
                let mut obj = Map::new();
                for (i, col) in row.columns_ref().iter().enumerate() {
                    let v = row.as_ref(i).map_or(Value::Null, |v| mysql_value(v, col));
                    obj.insert(col.name_str().into_owned(), v);
                }
                Value::Object(obj)
            })
            .collect()
    }
}

fn mysql_value(v: &mysql_async::Value, col: &mysql_async::Column) -> Value {
    use mysql_async::consts::ColumnType as T;
    use mysql_async::Value as M;
    match v {
        M::NULL => Value::Null,
        M::Int(i) => Value::from(*i),
        M::UInt(u) => Value::from(*u),
        M::Float(f) => Value::from(*f as f64),
        M::Double(f) => Value::from(*f),
        M::Bytes(b) => {
            let text = String::from_utf8_lossy(b).into_owned();
            match col.column_type() {
                T::MYSQL_TYPE_DECIMAL | T::MYSQL_TYPE_NEWDECIMAL => text
                    .parse::<f64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(text)),
                T::MYSQL_TYPE_JSON => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                _ => Value::String(text),
            }
        }
        M::Date(y, mo, d, h, mi, s, us) => Value::String(format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"
        )),
        M::Time(neg, d, h, mi, s, us) => Value::String(format!(
            "{}{}:{mi:02}:{s:02}.{us:06}",
            if *neg { "-" } else { "" },
            *d as u64 * 24 + *h as u64
        )),
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        match &self.inner {
            Inner::Sqlite { .. } => {}
            Inner::Postgres { rt, client, schema } => {
                if let Err(e) = rt.block_on(client.batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    pg_ident(schema)
                ))) {
                    eprintln!("could not drop schema {schema}: {e}");
                }
            }
            Inner::Mysql { rt, server, db } => {
                let (_, query) = split_mysql_url(&self.url);
                let url = format!("{server}{query}");
                let result = rt.block_on(async {
                    use mysql_async::prelude::Queryable;
                    let mut conn = mysql_async::Conn::from_url(url).await?;
                    conn.query_drop(format!("DROP DATABASE IF EXISTS {}", my_ident(db)))
                        .await?;
                    conn.disconnect().await
                });
                if let Err(e) = result {
                    eprintln!("could not drop database {db}: {e}");
                }
            }
        }
    }
}

/// Normalises a row (object) or a scalar so values compare across backends.
pub fn norm(value: &Value) -> Value {
    match value {
        Value::Object(obj) => {
            let mut names: Vec<&String> = obj.keys().collect();
            names.sort();
            let mut out = Map::new();
            for name in names {
                let v = &obj[name];
                let v = match v {
                    Value::Null => continue,
                    Value::Object(_) | Value::Array(_) => {
                        Value::String(serde_jcs::to_string(v).expect("jcs"))
                    }
                    other => norm(other),
                };
                out.insert(name.clone(), v);
            }
            Value::Object(out)
        }
        Value::Bool(b) => Value::from(*b as i64),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => value.clone(),
        },
        Value::String(s) => {
            if (s.starts_with('{') || s.starts_with('[')) && s.len() > 1 {
                if let Ok(v @ (Value::Object(_) | Value::Array(_))) =
                    serde_json::from_str::<Value>(s)
                {
                    return Value::String(serde_jcs::to_string(&v).expect("jcs"));
                }
            }
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                return Value::String(
                    t.with_timezone(&chrono::Utc)
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                );
            }
            value.clone()
        }
        Value::Array(items) => Value::Array(items.iter().map(norm).collect()),
        Value::Null => Value::Null,
    }
}

/// Normalised rows, sorted by their text.
pub fn norm_rows(rows: Vec<Value>) -> Vec<Value> {
    let mut rows: Vec<Value> = rows.iter().map(norm).collect();
    rows.sort_by_cached_key(|r| r.to_string());
    rows
}
