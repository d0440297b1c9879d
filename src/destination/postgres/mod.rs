//! The PostgreSQL destination (`postgres://…`, `postgresql://…`), on
//! tokio-postgres.
//!
//! Each batch is one transaction: the lease is fenced, every value is checked
//! against its column in Rust (a value that does not fit is a reject, never a
//! failed batch), the rows go by binary COPY into a temporary table, and one
//! statement merges them: a plain `INSERT` of the keys the table lacks, an
//! `UPDATE … WHERE … IS DISTINCT FROM …` of the rows that really differ (and
//! are not older by cursor), a `DELETE` for `delete_field`, and the exact
//! counts of each. An unchanged row is never written nor even locked, so an
//! identical re-run writes (almost) no WAL. Into a table that was empty when
//! the run began, rows whose integer key the run has not met yet are copied
//! straight into it. The rejects, the checkpoint and, for the last batch,
//! the run's ending commit with it.
//!
//! The run lock is a session advisory lock held on this connection for the
//! whole run (so two machines can never write the same pipeline at once,
//! and a dead holder's lock frees with its connection), plus the lease row in
//! `_idemload_locks` that says who holds it and since when. The table and
//! the bookkeeping tables live in one schema: `?schema=NAME` in the URL or
//! `[destination] schema`, else the connection's current schema.

mod ahead;
mod books;
mod copy;
mod ddl;
mod files;
pub(crate) mod inspect;
mod lock;
mod merge;
mod requests;
mod stage;
mod statements;
mod windows;
mod write;
#[cfg(test)]
mod write_tests;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::Client;

use crate::connect::postgres::PgConfig;

use super::sql::quote;
use super::{Books, Commit, Destination, Lookahead, Target, WindowBooks};
use crate::batch::PlannedBatch;
use crate::error::{Error, Result};
use crate::redact::redact;
use crate::state::{LockHolder, RejectRecord, RunInfo, RunRecord};
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus};

use self::ddl::PgSchema;

/// Longest identifier PostgreSQL keeps (longer ones are cut silently).
const MAX_IDENTIFIER: usize = 63;

/// Ingest requests committed in one transaction at most. Each request's
/// rows copied straight into the table take a savepoint (a subtransaction);
/// past 64 in one transaction PostgreSQL's snapshots grow slower for every
/// session.
const MAX_GROUP: usize = 32;

/// A PostgreSQL database and the schema idemload writes in.
pub struct PostgresDestination {
    pub(crate) client: Client,
    pub(crate) schema: String,
    run: Option<Run>,
    /// The lock this session holds: (pipeline, run id, lease, advisory key).
    lock: Option<(String, String, Duration, i64)>,
    /// The `CREATE` of the temporary batch table as of the last commit.
    batch_table: Option<String>,
    /// How to open another connection (to read batches ahead).
    config: PgConfig,
    /// The run's reads ahead, once the run asked for them.
    ahead: Option<std::sync::Arc<ahead::Ahead>>,
    /// What this connection has prepared.
    statements: statements::Statements,
}

/// The run in progress on this connection.
struct Run {
    info: RunInfo,
    target: Target,
    /// `replace`/`window`: the staging table batches go to.
    stage: Option<String>,
    /// What a table idemload did not create fills in itself.
    fills: crate::destination::fills::Fills,
    /// Columns of the table batches go to, as last read.
    schema: Option<PgSchema>,
    /// The run's key set exists (made with the first batch's key types).
    run_keys: bool,
    /// The run's key set, kept here instead when the key is one integer.
    seen: Option<crate::destination::seen::SeenKeys>,
    /// The table held no rows when the run first wrote to it.
    empty_at_start: Option<bool>,
    /// When a batch last committed (and with it the lease's expiry).
    renewed: std::time::Instant,
    /// The shape a group of ingest requests last read stored rows with:
    /// the next group reads its rows with it as it takes its keys.
    probed: Option<ahead::Shape>,
}

/// A `postgres://` URL split into the driver's config and idemload's own
/// `schema` parameter.
#[derive(Debug)]
struct PgUrl {
    config: PgConfig,
    schema: Option<String>,
}

/// Reads the libpq URL forms: `postgres://user:pw@host:5432/db`,
/// `postgres://root@%2Fvar%2Frun%2Fpostgresql/db`,
/// `postgres:///db?host=/var/run/postgresql`, plus `?schema=NAME`.
fn parse_url(url: &str) -> Result<PgUrl> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut schema = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("schema=") {
            Some(v) => schema = Some(percent_decode(v)),
            None => kept.push(pair),
        }
    }
    let text = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let config = PgConfig::parse(&text)?;
    if matches!(&schema, Some(s) if s.is_empty() || s.len() > MAX_IDENTIFIER) {
        return Err(Error::config(format!(
            "{}: schema must be 1 to {MAX_IDENTIFIER} bytes",
            redact(url)
        )));
    }
    Ok(PgUrl { config, schema })
}

/// The `?schema=NAME` of a `postgres://` URL, if it has one.
pub(crate) fn url_schema(url: &str) -> Result<Option<String>> {
    Ok(parse_url(url)?.schema)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Wraps a driver error with where it happened.
pub(crate) fn pg_error(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |e| Error::destination(context, e)
}

impl PostgresDestination {
    /// Connects, creates the schema and the bookkeeping tables if missing.
    /// `schema` (from `[destination] schema`) must agree with `?schema=`.
    pub async fn open(url: &str, schema: Option<&str>) -> Result<PostgresDestination> {
        Ok(Self::connect(url, schema, true).await?.0)
    }

    /// Connects for reading only: `None` when no run has written to the
    /// schema. Creates nothing.
    pub async fn open_existing(
        url: &str,
        schema: Option<&str>,
    ) -> Result<Option<PostgresDestination>> {
        let (dest, books) = Self::connect(url, schema, false).await?;
        Ok(books.then_some(dest))
    }

    /// Connects; with `create`, makes the schema and bookkeeping tables.
    /// Says whether the bookkeeping tables are there.
    pub(crate) async fn connect(
        url: &str,
        schema: Option<&str>,
        create: bool,
    ) -> Result<(PostgresDestination, bool)> {
        let parsed = parse_url(url)?;
        let shown = redact(url);
        let schema = match (parsed.schema, schema) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::config(format!(
                    "{shown}: ?schema={a} disagrees with [destination] schema = {b:?}"
                )))
            }
            (Some(a), _) => Some(a),
            (None, b) => b.map(String::from),
        };
        let config = parsed.config;
        let (client, _encrypted) = config.connect().await?;
        client
            .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET temp_buffers = '64MB'")
            .await
            .map_err(pg_error(shown.clone()))?;
        let schema = match schema {
            Some(s) => s,
            None => client
                .query_one("SELECT coalesce(current_schema(), 'public')", &[])
                .await
                .map_err(pg_error(shown.clone()))?
                .get(0),
        };
        let books = if create {
            books::create_tables(&client, &schema).await.map(|()| true)
        } else {
            books::has_books(&client, &schema).await
        }
        .map_err(|e| match e {
            Error::Destination { message, .. } => {
                Error::destination(format!("{shown}, schema {schema:?}"), message)
            }
            other => other,
        })?;
        let dest = PostgresDestination {
            client,
            schema,
            run: None,
            lock: None,
            batch_table: None,
            config,
            ahead: None,
            statements: Default::default(),
        };
        Ok((dest, books))
    }
}

/// `"schema"."name"`.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote(schema), quote(name))
}

/// `name` cut to what PostgreSQL keeps, at a character boundary.
fn identifier(name: &str) -> String {
    let mut end = name.len().min(MAX_IDENTIFIER);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

#[async_trait]
impl Books for PostgresDestination {
    async fn lock(
        &mut self,
        pipeline: &str,
        holder: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        if let Some((p, r, ..)) = &self.lock {
            if p == pipeline && *r == holder.run_id {
                return Ok(None);
            }
        }
        let key = ddl::advisory_key(&self.schema, pipeline);
        let held =
            lock::try_lock(&mut self.client, &self.schema, pipeline, holder, lease, key).await?;
        if held.is_none() {
            self.lock = Some((pipeline.to_string(), holder.run_id.clone(), lease, key));
        }
        Ok(held)
    }

    async fn unlock(&mut self) -> Result<()> {
        match self.lock.take() {
            Some((pipeline, run_id, _, key)) => {
                lock::unlock(&self.client, &self.schema, &pipeline, &run_id, key).await
            }
            None => Ok(()),
        }
    }

    async fn checkpoint(&mut self, pipeline: &str) -> Result<Option<Value>> {
        books::checkpoint(&self.client, &self.schema, pipeline).await
    }

    async fn set_checkpoint(&mut self, pipeline: &str, value: Option<Value>) -> Result<()> {
        let schema = self.schema.clone();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(pg_error("set checkpoint"))?;
        books::write_checkpoint(&tx, &schema, pipeline, value.as_ref(), "manual").await?;
        files::forget_files(&tx, &schema, pipeline).await?;
        tx.commit().await.map_err(pg_error("set checkpoint"))?;
        Ok(())
    }

    async fn fail(&mut self, run_id: &str, stats: &RunStats, error: &str) -> Result<()> {
        books::fail(&self.client, &self.schema, run_id, stats, error).await
    }

    async fn interrupt(
        &mut self,
        run_id: &str,
        stats: &RunStats,
        checkpoint: Option<&Value>,
    ) -> Result<()> {
        books::finish(
            &self.client,
            &self.schema,
            run_id,
            crate::stats::RunStatus::Interrupted,
            stats,
            checkpoint,
            None,
        )
        .await
    }

    async fn history(&mut self, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>> {
        books::history(&self.client, &self.schema, pipeline, limit).await
    }

    async fn rejects(
        &mut self,
        pipeline: &str,
        run_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RejectRecord>> {
        books::rejects(&self.client, &self.schema, pipeline, run_id, limit).await
    }
}

#[async_trait]
impl WindowBooks for PostgresDestination {
    async fn add_windows(&mut self, pipeline: &str, list: &[Window]) -> Result<()> {
        windows::add(&mut self.client, &self.schema, pipeline, list).await
    }

    async fn windows(
        &mut self,
        pipeline: &str,
        range: Option<(i64, i64)>,
        open_only: bool,
    ) -> Result<Vec<WindowRow>> {
        windows::list(&self.client, &self.schema, pipeline, range, open_only).await
    }

    async fn claim_window(
        &mut self,
        claim: &WindowClaim,
        window: &Window,
        seen: &WindowRow,
    ) -> Result<bool> {
        windows::claim(&self.client, &self.schema, claim, window, seen).await
    }

    async fn renew_windows(
        &mut self,
        pipeline: &str,
        run_ids: &[String],
        lease: Duration,
    ) -> Result<()> {
        windows::renew(&self.client, &self.schema, pipeline, run_ids, lease).await
    }

    async fn release_window(
        &mut self,
        entry: &WindowEntry,
        status: WindowStatus,
        error: Option<&str>,
        stats: Option<&RunStats>,
    ) -> Result<()> {
        windows::release(&self.client, &self.schema, entry, status, error, stats).await
    }
}

#[async_trait]
impl Destination for PostgresDestination {
    async fn begin(&mut self, run: &RunInfo, target: &Target) -> Result<()> {
        if target.table.len() > MAX_IDENTIFIER {
            return Err(Error::config(format!(
                "table name {:?} is longer than PostgreSQL's {MAX_IDENTIFIER} bytes",
                target.table
            )));
        }
        let fills = ddl::existing_table(
            &self.client,
            &self.schema,
            &target.table,
            &target.key_columns,
        )
        .await?;
        let stage = books::begin(&mut self.client, &self.schema, run, target).await?;
        // A read ahead belongs to one run: the run asks for its own.
        self.ahead = None;
        self.run = Some(Run {
            info: run.clone(),
            target: target.clone(),
            stage,
            fills,
            schema: None,
            run_keys: false,
            seen: None,
            empty_at_start: None,
            renewed: std::time::Instant::now(),
            probed: None,
        });
        Ok(())
    }

    async fn write(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats> {
        write::write_batch(self, batch, commit).await
    }

    fn max_group(&self) -> usize {
        MAX_GROUP
    }

    fn claims_in_transaction(&self) -> bool {
        true
    }

    async fn write_requests(
        &mut self,
        group: Vec<(PlannedBatch, &crate::request::RequestEntry)>,
    ) -> Result<Vec<crate::request::Landed>> {
        write::write_requests(self, group).await
    }

    async fn loaded_files(&mut self) -> Result<Vec<crate::files::LoadedFile>> {
        match &self.run {
            Some(run) => {
                files::loaded_files(
                    &self.client,
                    &self.schema,
                    &run.info.pipeline,
                    &run.target.table,
                )
                .await
            }
            None => Ok(Vec::new()),
        }
    }

    fn lookahead(&mut self) -> Option<Box<dyn Lookahead>> {
        let ahead = ahead::Ahead::new(self.config.clone());
        self.ahead = Some(ahead.clone());
        Some(Box::new(ahead::ReadAhead(ahead)))
    }

    async fn serve(
        &mut self,
        pipeline: &str,
        target: &Target,
        claim_lease: std::time::Duration,
    ) -> Result<()> {
        if target.table.len() > MAX_IDENTIFIER {
            return Err(Error::config(format!(
                "table name {:?} is longer than PostgreSQL's {MAX_IDENTIFIER} bytes",
                target.table
            )));
        }
        requests::create_table(&self.client, &self.schema).await?;
        // Requests run the same prepared statements over a table that grows
        // from empty: a plan made once for all would be made for the empty
        // table (a scan). Each execution is planned for the table as it is.
        //
        // A request holds its key as long as its transaction is open; a
        // transaction left open (a serve process stopped, or cut off from
        // the server without the connection closing) is ended by the server
        // once idle for `claim_lease`, which frees the key.
        self.client
            .batch_execute(&format!(
                "SELECT set_config('plan_cache_mode', 'force_custom_plan', false)
                 WHERE current_setting('server_version_num')::int >= 120000;
                 SET idle_in_transaction_session_timeout = {}",
                claim_lease.as_millis().min(i32::MAX as u128)
            ))
            .await
            .map_err(pg_error("preparing the connection for requests"))?;
        let fills = ddl::existing_table(
            &self.client,
            &self.schema,
            &target.table,
            &target.key_columns,
        )
        .await?;
        self.ahead = None;
        self.run = Some(Run {
            info: RunInfo::serving(pipeline),
            target: target.clone(),
            stage: None,
            fills,
            schema: None,
            run_keys: false,
            seen: None,
            // Other processes write the table at the same time: never
            // copy rows straight in on the belief that it was empty.
            empty_at_start: Some(false),
            renewed: std::time::Instant::now(),
            probed: None,
        });
        Ok(())
    }

    async fn stored_request(
        &mut self,
        pipeline: &str,
        key: &str,
    ) -> Result<Option<crate::request::StoredRequest>> {
        requests::stored(&self.client, &self.statements, &self.schema, pipeline, key).await
    }

    async fn expire_requests(&mut self, pipeline: &str, now_ms: i64) -> Result<u64> {
        requests::expire(&self.client, &self.schema, pipeline, now_ms).await
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A real server for tests: `IDEMLOAD_TEST_POSTGRES`, one schema each.

    use super::*;

    /// The test server's URL, or `None` (printed as SKIPPED) when unset;
    /// panics when `IDEMLOAD_REQUIRE_SERVICES=1`.
    pub fn server(test: &str) -> Option<String> {
        match std::env::var("IDEMLOAD_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!(
                        "{test}: IDEMLOAD_TEST_POSTGRES is not set but IDEMLOAD_REQUIRE_SERVICES=1"
                    );
                }
                eprintln!("{test}: SKIPPED (set IDEMLOAD_TEST_POSTGRES)");
                None
            }
        }
    }

    /// A uniquely named schema, dropped when the guard goes.
    pub struct TestSchema {
        pub url: String,
        pub name: String,
        pub client: Client,
    }

    impl TestSchema {
        pub async fn new(url: &str, test: &str) -> TestSchema {
            let name = format!(
                "t_{}_{}_{}",
                test.chars().take(30).collect::<String>(),
                std::process::id(),
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            );
            let parsed = parse_url(url).unwrap();
            let (client, _) = parsed.config.connect().await.unwrap();
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&name)))
                .await
                .unwrap();
            TestSchema {
                url: url.to_string(),
                name,
                client,
            }
        }

        /// The destination URL with `?schema=`.
        pub fn url(&self) -> String {
            let sep = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}schema={}", self.url, self.name)
        }

        /// Runs a pipeline over `records` (written as JSONL into `dir`) into
        /// this schema's table `t`, or into `url` when given (SQLite, to
        /// compare); `load` is the TOML body of `[load]`.
        pub async fn run(
            &self,
            dir: &std::path::Path,
            url: Option<&str>,
            records: &[serde_json::Value],
            load: &str,
        ) -> crate::Result<crate::RunReport> {
            let input = dir.join("in.jsonl");
            let text: String = records.iter().map(|r| format!("{r}\n")).collect();
            std::fs::write(&input, text).unwrap();
            let toml = format!(
                "name = \"p\"\n[source]\ntype = \"file\"\npath = {input:?}\n[destination]\nurl = {url:?}\ntable = \"t\"\n[load]\n{load}\n",
                input = input.display().to_string(),
                url = url.map(String::from).unwrap_or_else(|| self.url()),
            );
            let config = crate::PipelineConfig::from_toml(&toml)?;
            crate::Pipeline::new(config)?
                .run(&crate::RunOptions::default(), &crate::NoProgress)
                .await
        }

        /// The table `t` as JSON rows ordered by `order`.
        pub async fn rows(&self, order: &str) -> Vec<serde_json::Value> {
            self.client
                .query(
                    &format!(
                        "SELECT to_jsonb(x) FROM {}.t x ORDER BY {order}",
                        quote(&self.name)
                    ),
                    &[],
                )
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.get(0))
                .collect()
        }

        pub async fn drop(self) {
            self.client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    quote(&self.name)
                ))
                .await
                .unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_the_libpq_forms_and_a_schema() {
        let u = parse_url("postgres://root@%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(
            u.config.get_hosts(),
            &[tokio_postgres::config::Host::Unix(
                "/var/run/postgresql".into()
            )]
        );
        assert_eq!(u.config.get_dbname(), Some("db"));
        let u = parse_url("postgresql://root@/db?host=/var/run/postgresql&schema=s%201").unwrap();
        assert_eq!(
            u.config.get_hosts(),
            &[tokio_postgres::config::Host::Unix(
                "/var/run/postgresql".into()
            )]
        );
        assert_eq!(u.schema.as_deref(), Some("s 1"));
        let u = parse_url("postgres://u:pw@h:6543/db?schema=raw").unwrap();
        assert_eq!(u.config.get_ports(), &[6543]);
        assert_eq!(u.schema.as_deref(), Some("raw"));
        let err = parse_url("postgres://u:topsecret@h/db?nonsense=1").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[tokio::test]
    async fn bad_server_errors_name_it_without_the_password() {
        let err = PostgresDestination::open("postgres://u:topsecret@127.0.0.1:1/db", None)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot connect"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
    }
}
