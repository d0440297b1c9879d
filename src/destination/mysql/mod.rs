//! The MySQL and MariaDB destination (`mysql://user:pass@host:port/db`).
//!
//! Each batch is checked in Rust first (a value that does not fit its column
//! is a reject, never a failed batch), loaded into a temporary table with
//! `LOAD DATA LOCAL INFILE` from memory (or multi-row `INSERT`s where the
//! server refuses local files), then merged into the target with set-based
//! SQL in one transaction together with its rejects and checkpoint: rows
//! are classified against the stored ones first (`<=>` comparisons), so
//! unchanged rows cause no write at all and every count is exact.
//!
//! MySQL commits implicitly before any DDL, so tables and columns are
//! created before the batch transaction opens, idempotently: a crash between
//! the two leaves at most an empty column, never half a batch.
//!
//! The run lock is `GET_LOCK` on this connection for the whole run (the
//! server frees it when the session ends), plus the lease row in
//! `_idemload_locks` that names the holder and is re-checked in every batch.
//! Everything is utf8mb4; text columns use a binary no-pad collation so that
//! `a`, `A` and `a ` stay three keys.

mod batch;
mod books;
mod ddl;
mod files;
pub(crate) mod inspect;
mod lock;
mod requests;
mod stage;
mod windows;
mod write;

#[cfg(test)]
mod tests;

use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use serde_json::Value;

use super::{Books, Commit, Destination, Target, WindowBooks};
use crate::batch::PlannedBatch;
use crate::error::{Error, Result};
use crate::redact::redact;
use crate::state::{LockHolder, RejectRecord, RunInfo, RunRecord};
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus};

use self::ddl::Table;
use self::lock::Heartbeat;

/// A MySQL or MariaDB database.
pub struct MysqlDestination {
    /// The URL without its password, for messages.
    shown: String,
    opts: Opts,
    pub(crate) conn: Conn,
    server: Server,
    run: Option<Run>,
    lock: Option<Lock>,
    heartbeat: Option<Heartbeat>,
    /// False once the server refused `LOAD DATA LOCAL`: use `INSERT`s.
    local_infile: bool,
}

/// What the server is, as far as SQL text depends on it.
#[derive(Debug, Clone)]
struct Server {
    mariadb: bool,
    /// Binary, no-pad utf8mb4 collation for text (trailing spaces count).
    collation: String,
}

/// The run lock this connection holds.
#[derive(Debug, Clone)]
struct Lock {
    pipeline: String,
    run_id: String,
    /// The `GET_LOCK` name.
    name: String,
    lease: Duration,
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
    schema: Option<Table>,
    /// The run's key set, kept here instead of in the run's key table when
    /// the key is one integer column (decided with the first rows).
    seen: Option<Option<crate::destination::seen::SeenKeys>>,
    /// The table held no rows when the run first wrote to it.
    empty_at_start: Option<bool>,
}

impl MysqlDestination {
    /// Connects to the database of a `mysql://` URL.
    pub async fn open(url: &str) -> Result<MysqlDestination> {
        Ok(Self::connect(url, true).await?.0)
    }

    /// Connects for reading only: `None` when no run has written to the
    /// database. Creates nothing.
    pub async fn open_existing(url: &str) -> Result<Option<MysqlDestination>> {
        let (dest, books) = Self::connect(url, false).await?;
        Ok(books.then_some(dest))
    }

    /// Connects; with `create`, makes the bookkeeping tables. Says whether
    /// they are there.
    pub(crate) async fn connect(url: &str, create: bool) -> Result<(MysqlDestination, bool)> {
        let shown = redact(url);
        let config = crate::connect::mysql::MysqlConfig::parse(url)?;
        if config.opts().db_name().is_none_or(str::is_empty) {
            return Err(Error::config(format!(
                "{shown}: name the database, e.g. mysql://user:pass@host:3306/warehouse"
            )));
        }
        let (mut conn, opts, _encrypted) = config.map_opts(session_opts).connect().await?;
        let server = probe(&mut conn)
            .await
            .map_err(|e| Error::destination(format!("mysql {shown}"), e))?;
        let books = if create {
            books::create_tables(&mut conn, &server)
                .await
                .map(|()| true)
        } else {
            books::has_books(&mut conn).await
        }
        .map_err(|e| Error::destination(format!("mysql {shown}"), e))?;
        let dest = MysqlDestination {
            shown,
            opts,
            conn,
            server,
            run: None,
            lock: None,
            heartbeat: None,
            local_infile: true,
        };
        Ok((dest, books))
    }

    fn context(&self) -> String {
        format!("mysql {}", self.shown)
    }

    fn check_heartbeat(&self) -> Result<()> {
        match (&self.heartbeat, &self.lock) {
            (Some(hb), Some(lock)) if hb.lost() => Err(Error::LockLost {
                pipeline: lock.pipeline.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// The session every connection uses: utf8mb4, UTC, strict, and the SQL
/// dialect our statements are written in (backticks, backslash escapes).
fn session_opts(opts: Opts) -> Opts {
    OptsBuilder::from_opts(opts)
        .init(vec![
            "SET NAMES utf8mb4",
            "SET time_zone = '+00:00'",
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'",
        ])
        .stmt_cache_size(64)
        .into()
}

/// Finds out whether this is MariaDB and which no-pad collation it has.
async fn probe(conn: &mut Conn) -> std::result::Result<Server, mysql_async::Error> {
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    let mariadb = version.unwrap_or_default().contains("MariaDB");
    let available: Vec<String> = conn
        .query(
            "SELECT COLLATION_NAME FROM information_schema.COLLATIONS
             WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')",
        )
        .await?;
    // MySQL 5.7 has neither: utf8mb4_bin pads, so `a` and `a ` are one key there.
    let collation = available
        .into_iter()
        .next()
        .unwrap_or_else(|| "utf8mb4_bin".to_string());
    Ok(Server { mariadb, collation })
}

/// A database error with its context.
fn db(context: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
    let context = context.into();
    move |e| Error::destination(context, e)
}

#[async_trait]
impl Books for MysqlDestination {
    async fn lock(
        &mut self,
        pipeline: &str,
        holder: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        let ctx = self.context();
        let name = lock::lock_name(self.opts.db_name().unwrap_or_default(), pipeline);
        let held = lock::try_lock(&mut self.conn, &name, pipeline, holder, lease)
            .await
            .map_err(db(ctx))?;
        if held.is_none() {
            self.lock = Some(Lock {
                pipeline: pipeline.to_string(),
                run_id: holder.run_id.clone(),
                name,
                lease,
            });
            self.heartbeat = Some(Heartbeat::start(
                self.opts.clone(),
                pipeline,
                &holder.run_id,
                lease,
            ));
        }
        Ok(held)
    }

    async fn unlock(&mut self) -> Result<()> {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop().await;
        }
        let ctx = self.context();
        match self.lock.take() {
            Some(lock) => lock::unlock(&mut self.conn, &lock).await.map_err(db(ctx)),
            None => Ok(()),
        }
    }

    async fn checkpoint(&mut self, pipeline: &str) -> Result<Option<Value>> {
        let ctx = self.context();
        books::checkpoint(&mut self.conn, pipeline)
            .await
            .map_err(db(ctx))
    }

    async fn set_checkpoint(&mut self, pipeline: &str, value: Option<Value>) -> Result<()> {
        let ctx = self.context();
        books::write_checkpoint(&mut self.conn, pipeline, value.as_ref(), "manual")
            .await
            .map_err(db(ctx.clone()))?;
        files::forget_files(&mut self.conn, pipeline)
            .await
            .map_err(db(ctx))
    }

    async fn fail(&mut self, run_id: &str, stats: &RunStats, error: &str) -> Result<()> {
        let ctx = self.context();
        // A failed statement may have left a transaction open.
        let _ = self.conn.query_drop("ROLLBACK").await;
        if books::fail(&mut self.conn, run_id, stats, error)
            .await
            .is_ok()
        {
            return Ok(());
        }
        // The connection itself may be what failed: record it on a new one.
        let mut conn = Conn::new(self.opts.clone())
            .await
            .map_err(db(ctx.clone()))?;
        let recorded = books::fail(&mut conn, run_id, stats, error).await;
        let _ = conn.disconnect().await;
        recorded.map_err(db(ctx))
    }

    async fn interrupt(
        &mut self,
        run_id: &str,
        stats: &RunStats,
        checkpoint: Option<&Value>,
    ) -> Result<()> {
        let ctx = self.context();
        books::finish(
            &mut self.conn,
            run_id,
            crate::stats::RunStatus::Interrupted,
            stats,
            checkpoint,
            None,
        )
        .await
        .map_err(db(ctx))
    }

    async fn history(&mut self, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>> {
        let ctx = self.context();
        books::history(&mut self.conn, pipeline, limit)
            .await
            .map_err(db(ctx))
    }

    async fn rejects(
        &mut self,
        pipeline: &str,
        run_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RejectRecord>> {
        let ctx = self.context();
        books::rejects(&mut self.conn, pipeline, run_id, limit)
            .await
            .map_err(db(ctx))
    }
}

#[async_trait]
impl WindowBooks for MysqlDestination {
    async fn add_windows(&mut self, pipeline: &str, list: &[Window]) -> Result<()> {
        windows::add(&mut self.conn, &self.server, pipeline, list).await
    }

    async fn windows(
        &mut self,
        pipeline: &str,
        range: Option<(i64, i64)>,
        open_only: bool,
    ) -> Result<Vec<WindowRow>> {
        windows::list(&mut self.conn, pipeline, range, open_only).await
    }

    async fn claim_window(
        &mut self,
        claim: &WindowClaim,
        window: &Window,
        seen: &WindowRow,
    ) -> Result<bool> {
        windows::claim(&mut self.conn, claim, window, seen).await
    }

    async fn renew_windows(
        &mut self,
        pipeline: &str,
        run_ids: &[String],
        lease: Duration,
    ) -> Result<()> {
        windows::renew(&mut self.conn, pipeline, run_ids, lease).await
    }

    async fn release_window(
        &mut self,
        entry: &WindowEntry,
        status: WindowStatus,
        error: Option<&str>,
        stats: Option<&RunStats>,
    ) -> Result<()> {
        windows::release(&mut self.conn, entry, status, error, stats).await
    }
}

#[async_trait]
impl Destination for MysqlDestination {
    async fn begin(&mut self, run: &RunInfo, target: &Target) -> Result<()> {
        let fills = ddl::existing_table(&mut self.conn, &target.table, &target.key_columns).await?;
        let ctx = self.context();
        let stage = books::begin(&mut self.conn, &self.server, run, target)
            .await
            .map_err(db(ctx))?;
        self.run = Some(Run {
            info: run.clone(),
            target: target.clone(),
            stage,
            fills,
            schema: None,
            seen: None,
            empty_at_start: None,
        });
        Ok(())
    }

    async fn write(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats> {
        self.check_heartbeat()?;
        write::write_batch(self, batch, commit).await
    }

    async fn loaded_files(&mut self) -> Result<Vec<crate::files::LoadedFile>> {
        let Some(run) = &self.run else {
            return Ok(Vec::new());
        };
        files::loaded_files(&mut self.conn, &run.info.pipeline, &run.target.table)
            .await
            .map_err(|e| Error::destination("mysql bookkeeping", e))
    }

    async fn serve(
        &mut self,
        pipeline: &str,
        target: &Target,
        _claim_lease: std::time::Duration,
    ) -> Result<()> {
        requests::create_table(&mut self.conn, &self.server).await?;
        let fills = ddl::existing_table(&mut self.conn, &target.table, &target.key_columns).await?;
        self.run = Some(Run {
            info: RunInfo::serving(pipeline),
            target: target.clone(),
            stage: None,
            fills,
            schema: None,
            seen: None,
            // Other processes write the table at the same time: never
            // load rows straight in on the belief that it was empty.
            empty_at_start: Some(false),
        });
        Ok(())
    }

    async fn stored_request(
        &mut self,
        pipeline: &str,
        key: &str,
    ) -> Result<Option<crate::request::StoredRequest>> {
        requests::stored(&mut self.conn, pipeline, key).await
    }

    async fn insert_claim(&mut self, claim: &crate::request::Claim) -> Result<bool> {
        requests::insert_claim(&mut self.conn, claim).await
    }

    async fn take_over_claim(
        &mut self,
        claim: &crate::request::Claim,
        from: &str,
        status: &str,
    ) -> Result<bool> {
        requests::take_over(&mut self.conn, claim, from, status).await
    }

    async fn release_claim(&mut self, pipeline: &str, key: &str, claim: &str) -> Result<()> {
        requests::release(&mut self.conn, pipeline, key, claim).await
    }

    async fn expire_requests(&mut self, pipeline: &str, now_ms: i64) -> Result<u64> {
        requests::expire(&mut self.conn, pipeline, now_ms).await
    }
}

impl Drop for MysqlDestination {
    fn drop(&mut self) {
        if let Some(hb) = self.heartbeat.take() {
            hb.abort();
        }
    }
}
