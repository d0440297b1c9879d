//! The embedded SQLite destination (`sqlite://PATH`), no server needed.
//!
//! The rusqlite connection is blocking: it moves into `spawn_blocking` for a
//! whole batch (BEGIN, merge, rejects, checkpoint, COMMIT in one call), so no
//! transaction spans an `.await`. The database runs in WAL mode with
//! `synchronous = NORMAL`: a killed process never loses a committed batch,
//! and a batch is all or nothing. The bookkeeping tables live in the same
//! file and commit with the data.

pub(crate) mod books;
mod ddl;
mod files;
pub mod inspect;
pub(crate) mod lock;
mod requests;
mod run_keys;
mod stage;
mod windows;
pub(crate) mod worker;
mod write;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use serde_json::Value;

use super::schema::{Column, ColumnType, TableSchema};
use super::{Books, Commit, Destination, Target, WindowBooks};
use crate::batch::PlannedBatch;
use crate::error::{Error, Result};
use crate::files::LoadedFile;
use crate::state::{LockHolder, RejectRecord, RunInfo, RunRecord};
use crate::stats::{RunStats, RunStatus};
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus};

use self::lock::Heartbeat;
use self::worker::{blocking, Worker};

/// A SQLite database file.
pub struct SqliteDestination {
    path: PathBuf,
    inner: Worker<Inner>,
    heartbeat: Option<Heartbeat>,
}

/// What moves onto the blocking thread: the connection and the run.
struct Inner {
    conn: Connection,
    run: Option<Run>,
    /// The lock this connection holds: (pipeline, run id, lease).
    lock: Option<(String, String, Duration)>,
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
    schema: Option<TableSchema>,
    /// Whether that table was empty when the run started (known from the
    /// run's first rows on).
    fresh: Option<bool>,
    /// Keys the run wrote, for counting duplicates across batches.
    keys: run_keys::RunKeys,
}

impl SqliteDestination {
    /// Opens (creating if needed) the database of a `sqlite://` URL.
    pub async fn open(url: &str) -> Result<SqliteDestination> {
        let path = path_of(url)?;
        let open_path = path.clone();
        let conn = blocking(move || books::connect(&open_path)).await?;
        Ok(SqliteDestination::with(path, conn))
    }

    /// Opens the database of a `sqlite://` URL for reading only: `None` when
    /// the file does not exist or no run has written to it. Creates nothing.
    pub async fn open_existing(url: &str) -> Result<Option<SqliteDestination>> {
        let path = path_of(url)?;
        let open_path = path.clone();
        let conn = blocking(move || {
            let Some(conn) = books::connect_read_only(&open_path)? else {
                return Ok(None);
            };
            Ok(books::has_books(&conn)?.then_some(conn))
        })
        .await?;
        Ok(conn.map(|conn| SqliteDestination::with(path, conn)))
    }

    fn with(path: PathBuf, conn: Connection) -> SqliteDestination {
        let inner = Inner {
            conn,
            run: None,
            lock: None,
        };
        SqliteDestination {
            inner: Worker::new(path.display().to_string(), inner),
            path,
            heartbeat: None,
        }
    }

    fn check_heartbeat(&self) -> Result<()> {
        match (&self.heartbeat, self.inner.state()) {
            (Some(hb), Some(inner)) if hb.lost() => Err(Error::LockLost {
                pipeline: inner.lock.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
            }),
            _ => Ok(()),
        }
    }
}

/// `sqlite://data/w.db` is relative to the working directory,
/// `sqlite:///var/lib/w.db` absolute.
pub(crate) fn path_of(url: &str) -> Result<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| Error::config(format!("{url}: a SQLite URL starts with sqlite://")))?;
    let rest = rest.split('?').next().unwrap_or_default();
    if rest.is_empty() {
        return Err(Error::config(
            "sqlite:// needs a path, e.g. sqlite://data/warehouse.db",
        ));
    }
    Ok(PathBuf::from(rest))
}

#[async_trait]
impl Books for SqliteDestination {
    async fn lock(
        &mut self,
        pipeline: &str,
        holder: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        let (p, h) = (pipeline.to_string(), holder.clone());
        let held = self
            .inner
            .run(move |inner| {
                let held = lock::try_lock(&mut inner.conn, &p, &h, lease)?;
                if held.is_none() {
                    inner.lock = Some((p, h.run_id.clone(), lease));
                }
                Ok(held)
            })
            .await?;
        if held.is_none() {
            self.heartbeat = Some(Heartbeat::start(
                &self.path,
                pipeline,
                &holder.run_id,
                lease,
            )?);
        }
        Ok(held)
    }

    async fn unlock(&mut self) -> Result<()> {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop();
        }
        self.inner
            .run(|inner| match inner.lock.take() {
                Some((pipeline, run_id, _)) => lock::unlock(&inner.conn, &pipeline, &run_id),
                None => Ok(()),
            })
            .await
    }

    async fn checkpoint(&mut self, pipeline: &str) -> Result<Option<Value>> {
        let p = pipeline.to_string();
        self.inner
            .run(move |inner| books::checkpoint(&inner.conn, &p))
            .await
    }

    async fn set_checkpoint(&mut self, pipeline: &str, value: Option<Value>) -> Result<()> {
        let p = pipeline.to_string();
        self.inner
            .run(move |inner| {
                let tx = inner.conn.transaction()?;
                books::write_checkpoint(&tx, &p, value.as_ref(), "manual")?;
                files::forget_files(&tx, &p)?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn fail(&mut self, run_id: &str, stats: &RunStats, error: &str) -> Result<()> {
        let (r, s, e) = (run_id.to_string(), *stats, error.to_string());
        self.inner
            .run(move |inner| books::fail(&inner.conn, &r, &s, &e))
            .await
    }

    async fn interrupt(
        &mut self,
        run_id: &str,
        stats: &RunStats,
        checkpoint: Option<&Value>,
    ) -> Result<()> {
        let (r, s, c) = (run_id.to_string(), *stats, checkpoint.cloned());
        self.inner
            .run(move |inner| {
                books::finish(
                    &inner.conn,
                    &r,
                    RunStatus::Interrupted,
                    &s,
                    c.as_ref(),
                    None,
                )
            })
            .await
    }

    async fn history(&mut self, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>> {
        let p = pipeline.to_string();
        self.inner
            .run(move |inner| books::history(&inner.conn, &p, limit))
            .await
    }

    async fn rejects(
        &mut self,
        pipeline: &str,
        run_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RejectRecord>> {
        let (p, r) = (pipeline.to_string(), run_id.map(String::from));
        self.inner
            .run(move |inner| books::rejects(&inner.conn, &p, r.as_deref(), limit))
            .await
    }
}

#[async_trait]
impl WindowBooks for SqliteDestination {
    async fn add_windows(&mut self, pipeline: &str, list: &[Window]) -> Result<()> {
        let (p, list) = (pipeline.to_string(), list.to_vec());
        self.inner
            .run(move |inner| windows::add(&mut inner.conn, &p, &list))
            .await
    }

    async fn windows(
        &mut self,
        pipeline: &str,
        range: Option<(i64, i64)>,
        open_only: bool,
    ) -> Result<Vec<WindowRow>> {
        let p = pipeline.to_string();
        self.inner
            .run(move |inner| windows::list(&inner.conn, &p, range, open_only))
            .await
    }

    async fn claim_window(
        &mut self,
        claim: &WindowClaim,
        window: &Window,
        seen: &WindowRow,
    ) -> Result<bool> {
        let (c, w, s) = (claim.clone(), window.clone(), seen.clone());
        self.inner
            .run(move |inner| windows::claim(&mut inner.conn, &c, &w, &s))
            .await
    }

    async fn renew_windows(
        &mut self,
        pipeline: &str,
        run_ids: &[String],
        lease: Duration,
    ) -> Result<()> {
        let (p, r) = (pipeline.to_string(), run_ids.to_vec());
        self.inner
            .run(move |inner| windows::renew(&inner.conn, &p, &r, lease))
            .await
    }

    async fn release_window(
        &mut self,
        entry: &WindowEntry,
        status: WindowStatus,
        error: Option<&str>,
        stats: Option<&RunStats>,
    ) -> Result<()> {
        let (e, er, st) = (entry.clone(), error.map(String::from), stats.copied());
        self.inner
            .run(move |inner| windows::release(&inner.conn, &e, status, er.as_deref(), st.as_ref()))
            .await
    }
}

#[async_trait]
impl Destination for SqliteDestination {
    async fn begin(&mut self, run: &RunInfo, target: &Target) -> Result<()> {
        let (run, target) = (run.clone(), target.clone());
        self.inner
            .run(move |inner| {
                let (stage, fills) = books::begin(&mut inner.conn, &run, &target)?;
                inner.run = Some(Run {
                    info: run,
                    stage,
                    fills,
                    schema: None,
                    // Other workers of a backfill write the table too.
                    fresh: target.window.as_ref().map(|_| false),
                    keys: Default::default(),
                    target,
                });
                Ok(())
            })
            .await
    }

    async fn loaded_files(&mut self) -> Result<Vec<LoadedFile>> {
        self.inner
            .run(move |inner| match &inner.run {
                Some(run) => {
                    files::loaded_files(&inner.conn, &run.info.pipeline, &run.target.table)
                }
                None => Ok(Vec::new()),
            })
            .await
    }

    async fn write(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats> {
        self.check_heartbeat()?;
        self.inner
            .run(move |inner| write::write_batch(inner, batch, commit))
            .await
    }

    async fn serve(
        &mut self,
        pipeline: &str,
        target: &Target,
        _claim_lease: std::time::Duration,
    ) -> Result<()> {
        let (pipeline, target) = (pipeline.to_string(), target.clone());
        self.inner
            .run(move |inner| {
                requests::create_table(&inner.conn)?;
                let fills = ddl::existing_table(&inner.conn, &target.table, &target.key_columns)?;
                inner.run = Some(Run {
                    info: RunInfo::serving(&pipeline),
                    target,
                    stage: None,
                    fills,
                    schema: None,
                    // Other processes may write the file too.
                    fresh: Some(false),
                    keys: Default::default(),
                });
                Ok(())
            })
            .await
    }

    async fn stored_request(
        &mut self,
        pipeline: &str,
        key: &str,
    ) -> Result<Option<crate::request::StoredRequest>> {
        let (p, k) = (pipeline.to_string(), key.to_string());
        self.inner
            .run(move |inner| requests::stored(&inner.conn, &p, &k))
            .await
    }

    async fn insert_claim(&mut self, claim: &crate::request::Claim) -> Result<bool> {
        let c = claim.clone();
        self.inner
            .run(move |inner| requests::insert_claim(&inner.conn, &c))
            .await
    }

    async fn take_over_claim(
        &mut self,
        claim: &crate::request::Claim,
        from: &str,
        status: &str,
    ) -> Result<bool> {
        let (c, f, s) = (claim.clone(), from.to_string(), status.to_string());
        self.inner
            .run(move |inner| requests::take_over(&inner.conn, &c, &f, &s))
            .await
    }

    async fn release_claim(&mut self, pipeline: &str, key: &str, claim: &str) -> Result<()> {
        let (p, k, c) = (pipeline.to_string(), key.to_string(), claim.to_string());
        self.inner
            .run(move |inner| requests::release(&inner.conn, &p, &k, &c))
            .await
    }

    async fn expire_requests(&mut self, pipeline: &str, now_ms: i64) -> Result<u64> {
        let p = pipeline.to_string();
        self.inner
            .run(move |inner| requests::expire(&inner.conn, &p, now_ms))
            .await
    }
}

impl Drop for SqliteDestination {
    fn drop(&mut self) {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop();
        }
    }
}

/// The SQLite type a column is declared with.
fn declared_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Integer => "INTEGER",
        ColumnType::Float => "REAL",
        // SQLite has no exact number beyond 64 bits, and a NUMERIC column
        // turns such text into a rounded REAL: a declared type that contains
        // TEXT keeps the digits (text affinity) and still reads back as
        // an exact number column.
        ColumnType::Decimal => "DECIMAL_TEXT",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::Text => "TEXT",
        ColumnType::Json => "JSON",
        ColumnType::Any => "",
    }
}

/// The column type of a declared SQLite type (of a table idemload may not
/// have created).
fn column_type(declared: &str) -> ColumnType {
    match declared.to_ascii_uppercase().as_str() {
        "INTEGER" | "INT" | "BIGINT" => ColumnType::Integer,
        "REAL" | "DOUBLE" | "FLOAT" | "DOUBLE PRECISION" => ColumnType::Float,
        "DECIMAL_TEXT" => ColumnType::Decimal,
        "BOOLEAN" | "BOOL" => ColumnType::Boolean,
        "TIMESTAMP" | "TIMESTAMPTZ" | "DATETIME" => ColumnType::Timestamp,
        "TEXT" => ColumnType::Text,
        "JSON" | "JSONB" => ColumnType::Json,
        _ => ColumnType::Any,
    }
}

/// The columns of a table, or `None` when it does not exist.
fn read_schema(conn: &Connection, table: &str) -> Result<Option<TableSchema>> {
    let mut stmt = conn.prepare_cached("SELECT name, type FROM pragma_table_info(?1)")?;
    let columns = stmt
        .query_map([table], |row| {
            Ok(Column {
                name: row.get(0)?,
                ty: column_type(&row.get::<_, String>(1)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((!columns.is_empty()).then_some(TableSchema { columns }))
}
