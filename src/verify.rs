//! `verify`: prove a pipeline idempotent before trusting it.
//!
//! Runs the pipeline twice into a scratch destination of the pipeline's own
//! backend (a temporary file on SQLite, a temporary schema on PostgreSQL, a
//! temporary database on MySQL/MariaDB, each removed afterwards), snapshots
//! the table after the first run, and compares row counts and a content
//! digest after the second. An HTTP destination has no scratch copy, so
//! verify refuses it rather than send the records to the API. A difference names the keys that
//! changed and a likely cause: a field whose value changes on every read
//! (a fetch time) inside the key or a `hash_key`, or records without a key.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{DestinationConfig, TableDestination};
use crate::destination::inspect::{Dialect, Inspect};
use crate::error::{Error, Result};
use crate::key::{canonical_json, KeySpec, HASH_KEY_COLUMN};
use crate::pipeline::{NoProgress, Pipeline, RunOptions, RunReport};
use crate::source::{Source, SourceQuery};

const FIRST: &str = "_idemload_verify_first";

/// The verdict (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub pipeline: String,
    pub pass: bool,
    pub rows_first: u64,
    pub rows_second: u64,
    pub digest_first: String,
    pub digest_second: String,
    pub second_run: RunReport,
    /// Keys whose rows differ between the runs (a sample).
    pub differing_keys: Vec<Value>,
    /// Likely causes, most specific first.
    pub hints: Vec<String>,
}

/// Verifies a pipeline with its configured source.
pub async fn verify(pipeline: &Pipeline) -> Result<VerifyReport> {
    let config = pipeline.config.source.clone();
    verify_with(pipeline, move |query| {
        let config = config.clone();
        async move { crate::source::open(&config, &query).await }
    })
    .await
}

/// Verifies a pipeline whose source the caller opens (twice).
pub async fn verify_with<F, Fut>(pipeline: &Pipeline, open_source: F) -> Result<VerifyReport>
where
    F: Fn(SourceQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn Source>>>,
{
    let database = match &pipeline.config.destination {
        DestinationConfig::Table(database) => database,
        DestinationConfig::Http(_) => return Err(Error::config(format!(
            "pipeline {:?}: verify runs the pipeline twice into a scratch copy of a database destination; an HTTP destination has no scratch copy and verify sends nothing to the API (check idempotence on a staging API instead)",
            pipeline.name()
        ))),
        DestinationConfig::Absent => return Err(Error::config(format!(
            "pipeline {:?} has no [destination] to verify (a watch-only pipeline)",
            pipeline.name()
        ))),
    };
    let scratch_db = Scratch::create(&database.url).await?;
    let result = verify_in(pipeline, &scratch_db, open_source).await;
    let dropped = scratch_db.remove().await;
    let report = result?;
    dropped?;
    Ok(report)
}

/// A scratch destination on the pipeline's own backend.
enum Scratch {
    Sqlite(#[allow(dead_code)] tempfile::TempDir, String),
    /// The pipeline's URL (to drop the schema) and the scratch URL.
    Postgres {
        admin: String,
        schema: String,
        url: String,
    },
    Mysql {
        admin: String,
        database: String,
        url: String,
    },
}

impl Scratch {
    async fn create(url: &str) -> Result<Scratch> {
        let scheme = url.split("://").next().unwrap_or_default();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let name = format!("_idemload_verify_{}", &id[id.len() - 12..]);
        match scheme {
            "postgres" | "postgresql" => {
                let (base, query) = url.split_once('?').unwrap_or((url, ""));
                let mut params: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.is_empty() && !p.starts_with("schema="))
                    .collect();
                let schema_param = format!("schema={name}");
                params.push(&schema_param);
                let scratch = format!("{base}?{}", params.join("&"));
                let mut admin = crate::destination::open_inspect(url, false).await?;
                admin
                    .execute(&format!("CREATE SCHEMA {}", admin.dialect().quote(&name)))
                    .await?;
                Ok(Scratch::Postgres {
                    admin: url.to_string(),
                    schema: name,
                    url: scratch,
                })
            }
            "mysql" => {
                let mut parsed = url::Url::parse(url)
                    .map_err(|e| Error::config(format!("{}: {e}", crate::redact::redact(url))))?;
                parsed.set_path(&format!("/{name}"));
                let mut admin = crate::destination::open_inspect(url, false).await?;
                admin
                    .execute(&format!("CREATE DATABASE {}", admin.dialect().quote(&name)))
                    .await?;
                Ok(Scratch::Mysql {
                    admin: url.to_string(),
                    database: name,
                    url: parsed.to_string(),
                })
            }
            _ => {
                let dir = tempfile::tempdir().map_err(|e| Error::Source {
                    location: "verify".into(),
                    message: format!("cannot create a scratch directory: {e}"),
                })?;
                let url = format!("sqlite://{}", dir.path().join("verify.db").display());
                Ok(Scratch::Sqlite(dir, url))
            }
        }
    }

    fn url(&self) -> &str {
        match self {
            Scratch::Sqlite(_, url)
            | Scratch::Postgres { url, .. }
            | Scratch::Mysql { url, .. } => url,
        }
    }

    /// Drops the scratch schema or database (the file goes with its directory).
    async fn remove(self) -> Result<()> {
        let (admin, sql) = match &self {
            Scratch::Sqlite(..) => return Ok(()),
            Scratch::Postgres { admin, schema, .. } => (
                admin,
                format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    Dialect::Postgres.quote(schema)
                ),
            ),
            Scratch::Mysql {
                admin, database, ..
            } => (
                admin,
                format!("DROP DATABASE IF EXISTS {}", Dialect::Mysql.quote(database)),
            ),
        };
        let mut conn = crate::destination::open_inspect(admin, false).await?;
        conn.execute(&sql).await
    }
}

async fn verify_in<F, Fut>(
    pipeline: &Pipeline,
    scratch_db: &Scratch,
    open_source: F,
) -> Result<VerifyReport>
where
    F: Fn(SourceQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn Source>>>,
{
    let url = scratch_db.url().to_string();
    let mut scratch = pipeline.clone();
    let table = scratch.config.destination.table().to_string();
    scratch.config.destination = DestinationConfig::Table(TableDestination::new(&url, &table));
    let options = RunOptions::default();

    let _first = scratch
        .run_with(&options, &NoProgress, &open_source)
        .await?;
    let mut conn = crate::destination::open_inspect(&url, true).await?;
    let columns = conn.columns(&table).await?;
    let d = conn.dialect();
    let (t, f) = (d.quote(&table), d.quote(FIRST));
    if !columns.is_empty() {
        conn.execute(&format!("CREATE TABLE {f} AS SELECT * FROM {t}"))
            .await?;
    }
    let second = scratch
        .run_with(&options, &NoProgress, &open_source)
        .await?;
    let columns_after = conn.columns(&table).await?;

    let key_columns = scratch.settings.key.columns();
    let (rows_first, digest_first) = digest(conn.as_mut(), FIRST, &columns, &key_columns).await?;
    let (rows_second, digest_second) =
        digest(conn.as_mut(), &table, &columns, &key_columns).await?;
    let mut differing_keys = Vec::new();
    let mut hints = Vec::new();
    if !columns.is_empty() {
        let keys = key_columns
            .iter()
            .map(|k| d.quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let cols = columns
            .iter()
            .map(|c| d.quote(c))
            .collect::<Vec<_>>()
            .join(", ");
        differing_keys = conn
            .query(&format!(
                "SELECT DISTINCT {keys} FROM ({}) x LIMIT 20",
                differing_rows(&cols, &t, &f)
            ))
            .await
            .unwrap_or_default()
            .into_iter()
            .map(Value::Array)
            .collect();
        hints = causes(
            conn.as_mut(),
            &scratch.settings.key,
            &columns,
            &table,
            &second,
        )
        .await;
    }
    if columns_after.len() > columns.len() {
        hints.push(format!(
            "the second run added columns {}: records differ between reads",
            columns_after[columns.len()..].join(", ")
        ));
    }
    let pass = rows_first == rows_second
        && digest_first == digest_second
        && second.stats.inserted == 0
        && second.stats.updated == 0
        && second.stats.deleted == 0;
    if !pass && hints.is_empty() {
        hints.push("the source returned different records on the two reads".into());
    }
    Ok(VerifyReport {
        pipeline: pipeline.name().to_string(),
        pass,
        rows_first,
        rows_second,
        digest_first,
        digest_second,
        second_run: second,
        differing_keys,
        hints,
    })
}

/// The rows (of `cols`) in one table and not the other, both ways. Each
/// `EXCEPT` is its own subquery: written flat, `A EXCEPT B UNION ALL B
/// EXCEPT A` binds left to right and finds only the rows the first run had
/// and the second lost.
fn differing_rows(cols: &str, t: &str, f: &str) -> String {
    format!(
        "SELECT * FROM (SELECT {cols} FROM {t} EXCEPT SELECT {cols} FROM {f}) a
         UNION ALL SELECT * FROM (SELECT {cols} FROM {f} EXCEPT SELECT {cols} FROM {t}) b"
    )
}

/// Row count and SHA-256 of the rows (canonical JSON) in key order.
async fn digest(
    conn: &mut dyn Inspect,
    table: &str,
    columns: &[String],
    key: &[String],
) -> Result<(u64, String)> {
    if columns.is_empty() {
        return Ok((0, hex::encode(Sha256::digest(b""))));
    }
    let d = conn.dialect();
    let cols = columns
        .iter()
        .map(|c| d.quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let order = key
        .iter()
        .map(|k| d.quote(k))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = conn
        .query(&format!(
            "SELECT {cols} FROM {} ORDER BY {order}",
            d.quote(table)
        ))
        .await?;
    let mut hasher = Sha256::new();
    for row in &rows {
        hasher.update(canonical_json(&Value::Array(row.clone())).as_bytes());
        hasher.update(b"\n");
    }
    Ok((rows.len() as u64, hex::encode(hasher.finalize())))
}

/// Looks for the usual reasons a second run changes the table.
async fn causes(
    conn: &mut dyn Inspect,
    key: &KeySpec,
    columns: &[String],
    table: &str,
    second: &RunReport,
) -> Vec<String> {
    let d = conn.dialect();
    let (t, f) = (d.quote(table), d.quote(FIRST));
    let mut hints = Vec::new();
    // A column is volatile when the two snapshots agree once it is left out.
    let agree_without = |skip: &[&str]| {
        let cols = columns
            .iter()
            .filter(|c| !skip.contains(&c.as_str()))
            .map(|c| d.quote(c))
            .collect::<Vec<_>>()
            .join(", ");
        format!("SELECT count(*) FROM ({}) x", differing_rows(&cols, &t, &f))
    };
    for column in columns {
        if column == HASH_KEY_COLUMN {
            continue;
        }
        let sql = agree_without(&[column.as_str(), HASH_KEY_COLUMN]);
        let differing = crate::audit::as_u64(
            conn.query(&sql)
                .await
                .ok()
                .and_then(|r| r.into_iter().next())
                .as_ref()
                .and_then(|r| r.first()),
        );
        if differing == 0 && second.stats.inserted + second.stats.updated > 0 {
            let hint = match key {
                KeySpec::Hash(fields) if fields.is_empty() || fields.contains(column) => format!(
                    "hash_key covers field {column:?}, whose value changes on every read (a volatile field such as a fetch time): each run creates new keys; leave it out of hash_key"
                ),
                KeySpec::Fields(fields) if fields.contains(column) => format!(
                    "key field {column:?} changes on every read (a volatile field such as a fetch time): each run creates new rows; leave it out of the key"
                ),
                _ => format!(
                    "field {column:?} changes on every read (a volatile field such as a fetch time): every run rewrites those rows; drop the field or accept the updates"
                ),
            };
            hints.push(hint);
        }
    }
    if second.stats.rejected > 0 {
        hints.push(format!(
            "{} records were rejected (e.g. records without a key); see `idemload rejects`",
            second.stats.rejected
        ));
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;
    use crate::record::{Item, Record, SourceRef};
    use async_trait::async_trait;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Three records whose `fetched_at` differs on every read.
    struct Volatile {
        read: Arc<AtomicU64>,
        done: bool,
    }

    #[async_trait]
    impl Source for Volatile {
        async fn next_batch(&mut self) -> crate::Result<Option<Vec<Item>>> {
            if self.done {
                return Ok(None);
            }
            self.done = true;
            let n = self.read.fetch_add(1, Ordering::SeqCst);
            let items = (1..=3)
                .map(|id| {
                    let v = json!({"id": id, "name": format!("n{id}"), "fetched_at": format!("2025-01-01T00:00:0{n}Z")});
                    Item::Record(Record::new(v.try_into().unwrap(), SourceRef::Other("test".into())))
                })
                .collect();
            Ok(Some(items))
        }
    }

    fn pipeline(load: &str) -> Pipeline {
        let text = format!(
            "name = \"p\"\n[source]\ntype = \"file\"\npath = \"unused.jsonl\"\n[destination]\nurl = \"sqlite://unused.db\"\ntable = \"t\"\n[load]\n{load}\n"
        );
        Pipeline::new(PipelineConfig::from_toml(&text).unwrap()).unwrap()
    }

    async fn run(load: &str) -> VerifyReport {
        let read = Arc::new(AtomicU64::new(0));
        verify_with(&pipeline(load), |_q| {
            let read = read.clone();
            async move { Ok(Box::new(Volatile { read, done: false }) as Box<dyn Source>) }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn hash_key_over_a_volatile_field_fails_and_names_it() {
        let report = run("hash_key = [\"*\"]").await;
        assert!(!report.pass);
        assert_eq!(report.rows_first, 3);
        assert_eq!(report.rows_second, 6, "each run creates new keys");
        assert!(
            report
                .hints
                .iter()
                .any(|h| h.contains("hash_key covers field \"fetched_at\"")),
            "{:?}",
            report.hints
        );
    }

    #[tokio::test]
    async fn a_volatile_non_key_field_fails_with_updates() {
        let report = run("key = [\"id\"]").await;
        assert!(!report.pass);
        assert_eq!(report.second_run.stats.updated, 3);
        assert_eq!(report.differing_keys.len(), 3);
        assert!(
            report
                .hints
                .iter()
                .any(|h| h.contains("field \"fetched_at\" changes on every read")),
            "{:?}",
            report.hints
        );
    }

    #[tokio::test]
    async fn hash_key_without_the_volatile_field_passes() {
        let report = run("hash_key = [\"id\", \"name\"]").await;
        assert_eq!(report.second_run.stats.inserted, 0);
        // fetched_at still changes, so the rows are updated: verify says so.
        assert!(!report.pass);
        assert!(report.hints.iter().any(|h| h.contains("fetched_at")));
    }
}
