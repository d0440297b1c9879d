//! Destinations: where rows land, with the bookkeeping that makes a load
//! idempotent.
//!
//! A [`Destination`] locks a pipeline, tells its checkpoint, and commits a
//! planned batch together with its rejects and (when the run reaches it) its
//! checkpoint, in one transaction. It reports what it did as [`RunStats`].
//! [`open`] picks an implementation by URL scheme. How a batch commits is
//! written once, in `commit.rs`, over each backend's transaction.

pub(crate) mod commit;
pub mod compare;
pub mod config;
pub(crate) mod fills;
pub mod http;
pub mod inspect;
pub mod mysql;
pub mod postgres;
pub mod schema;
pub(crate) mod seen;
pub mod sql;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use self::config::DestinationConfig;
use crate::batch::PlannedBatch;
use crate::connect::Backend;
use crate::error::{Error, Result};
use crate::mode::Mode;
use crate::redact::redact;
use crate::state::{Finish, LockHolder, RejectRecord, RunInfo, RunRecord};
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus};

/// The table a run writes and how.
#[derive(Debug, Clone)]
pub struct Target {
    pub table: String,
    pub key_columns: Vec<String>,
    pub cursor: Option<String>,
    pub mode: Mode,
    pub window_field: Option<String>,
    /// A backfill window: in `window` mode its bounds (not the data's
    /// range) say which stored rows the load replaces.
    pub window: Option<Window>,
    /// When a stored row counts as unchanged (`loaded_at`, `tolerance`).
    pub compare: compare::Compare,
}

/// What commits with a batch besides its rows and rejects.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// Move the checkpoint here (sources ordered by cursor, batch by batch).
    pub checkpoint: Option<Value>,
    /// This is the run's last batch: finish the run in the same transaction.
    pub finish: Option<Finish>,
    /// An ingest request (`serve`): the batch fences on the request's claim
    /// instead of the run lock, and marks the request done with its
    /// response in the same transaction.
    pub request: Option<crate::request::RequestEntry>,
    /// A backfill window: the batch fences on the window's claim instead of
    /// the run lock, and the run's last batch marks the window done.
    pub window: Option<crate::windows::WindowEntry>,
}

/// The bookkeeping kept next to the data (`_idemload_*` tables): the run
/// lock, the checkpoint, the runs and their rejects. Commands that only
/// read or set these (`state`, `history`, `rejects`) need nothing else.
#[async_trait]
pub trait Books: Send {
    /// Takes the pipeline's run lock for `holder`, or returns who holds it.
    /// The lease is renewed in the background until [`Books::unlock`].
    async fn lock(
        &mut self,
        pipeline: &str,
        holder: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>>;

    /// Releases the lock this connection holds.
    async fn unlock(&mut self) -> Result<()>;

    /// The pipeline's checkpoint.
    async fn checkpoint(&mut self, pipeline: &str) -> Result<Option<Value>>;

    /// Sets (or with `None` clears) the checkpoint and forgets the files the
    /// pipeline logged as loaded (the next run reads from the new checkpoint
    /// in every file); the caller holds the lock.
    async fn set_checkpoint(&mut self, pipeline: &str, value: Option<Value>) -> Result<()>;

    /// Records a failed run (best effort: the destination may be gone).
    async fn fail(&mut self, run_id: &str, stats: &RunStats, error: &str) -> Result<()>;

    /// Records a run stopped on request after its last committed batch as
    /// `interrupted`, with the stats and the checkpoint of what it committed.
    async fn interrupt(
        &mut self,
        run_id: &str,
        stats: &RunStats,
        checkpoint: Option<&Value>,
    ) -> Result<()>;

    /// The pipeline's latest runs, newest first.
    async fn history(&mut self, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>>;

    /// The pipeline's rejects (of one run, or of the latest run with rejects).
    async fn rejects(
        &mut self,
        pipeline: &str,
        run_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RejectRecord>>;
}

/// The windows of backfills (`_idemload_windows`, see [`crate::windows`]):
/// claimed with a lease, renewed while loaded, marked done by the window's
/// last batch ([`Commit::window`]).
/// The books of runs whose rows go elsewhere (an API): each run's record,
/// its rejects, the files it finished, its checkpoint and its ending,
/// committed through the one commit path. Every SQL destination keeps
/// them; the HTTP destination holds nothing more of its ledger database.
#[async_trait]
pub trait RunBooks: Books {
    /// Records the start of a run (the ledger keeps no table of rows).
    async fn begin_run(&mut self, run: &RunInfo, target: &Target) -> Result<()>;

    /// Commits a batch's bookkeeping; `batch` carries no rows (they were
    /// written elsewhere), only rejects, stats, cursor and files.
    async fn commit_books(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats>;
}

#[async_trait]
impl<D: Destination> RunBooks for D {
    async fn begin_run(&mut self, run: &RunInfo, target: &Target) -> Result<()> {
        self.begin(run, target).await
    }

    async fn commit_books(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats> {
        debug_assert!(batch.rows.is_empty(), "bookkeeping carries no rows");
        self.write(batch, commit).await
    }
}

#[async_trait]
pub trait WindowBooks: Send {
    /// Makes `_idemload_windows` when missing and adds the windows it lacks
    /// as pending.
    async fn add_windows(&mut self, _pipeline: &str, _windows: &[Window]) -> Result<()> {
        Err(no_windows())
    }

    /// The pipeline's windows whose position lies in `range` (all with
    /// `None`), in order, leaving out the done ones when `open_only`; none
    /// when no backfill ran here.
    async fn windows(
        &mut self,
        _pipeline: &str,
        _range: Option<(i64, i64)>,
        _open_only: bool,
    ) -> Result<Vec<WindowRow>> {
        Ok(Vec::new())
    }

    /// Claims `window` if its row is still as `seen` (same status, same
    /// run id); false when another worker changed it first.
    async fn claim_window(
        &mut self,
        _claim: &WindowClaim,
        _window: &Window,
        _seen: &WindowRow,
    ) -> Result<bool> {
        Err(no_windows())
    }

    /// Renews the leases of the windows the runs `run_ids` hold.
    async fn renew_windows(
        &mut self,
        _pipeline: &str,
        _run_ids: &[String],
        _lease: Duration,
    ) -> Result<()> {
        Err(no_windows())
    }

    /// Gives a window up, if `entry` still holds it: `pending` again (its
    /// run stopped) or `failed` with the error.
    async fn release_window(
        &mut self,
        _entry: &WindowEntry,
        _status: WindowStatus,
        _error: Option<&str>,
        _stats: Option<&RunStats>,
    ) -> Result<()> {
        Err(no_windows())
    }
}

fn no_windows() -> Error {
    Error::config(
        "idemload backfill writes into SQLite, PostgreSQL and MySQL/MariaDB destinations; this destination is not supported",
    )
}

/// A place rows land, with its bookkeeping.
#[async_trait]
pub trait Destination: Books + WindowBooks {
    /// Records the start of a run and prepares the target.
    async fn begin(&mut self, run: &RunInfo, target: &Target) -> Result<()>;

    /// Writes one batch, its rejects, and what `commit` asks, in one
    /// transaction (see `commit.rs` for the order). Returns the batch's
    /// stats as the destination saw them (inserted, updated, unchanged,
    /// deleted, skipped as stale, duplicates across batches, rejected
    /// values).
    async fn write(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats>;

    /// The files earlier runs of the pipeline loaded completely into the
    /// run's table (see [`crate::files`]), asked after [`Destination::begin`];
    /// none when the table is missing or empty. The default: none, so every
    /// file is read.
    async fn loaded_files(&mut self) -> Result<Vec<crate::files::LoadedFile>> {
        Ok(Vec::new())
    }

    /// A hook the run calls with each batch once it is planned, before it
    /// is written, so the destination can start reading what that write
    /// will need while the batch before it is written. `None` (the default)
    /// when the destination has no use for it.
    fn lookahead(&mut self) -> Option<Box<dyn Lookahead>> {
        None
    }

    /// Prepares this connection to write ingest requests (`idemload
    /// serve`) into `target`: makes `_idemload_requests` when missing and
    /// checks an existing table, like [`Destination::begin`], but records no
    /// run and takes no lock. Each later write carries its request
    /// (`Commit::request`, or [`Destination::write_requests`]), whose claim
    /// or key fences the batch instead of the run lock, and counts its
    /// duplicates and rejects as a run of its own. `claim_lease` bounds how
    /// long a stalled request keeps its key (see `[serve] claim_lease`).
    async fn serve(
        &mut self,
        _pipeline: &str,
        _target: &Target,
        _claim_lease: std::time::Duration,
    ) -> Result<()> {
        Err(not_serving())
    }

    /// How many ingest requests [`Destination::write_requests`] commits in
    /// one transaction (1: each request commits alone).
    fn max_group(&self) -> usize {
        1
    }

    /// Whether this destination claims an ingest request's key inside the
    /// request's own transaction ([`Destination::write_requests`] then
    /// answers replays, conflicts and 409s itself), rather than before it
    /// with [`Destination::insert_claim`].
    fn claims_in_transaction(&self) -> bool {
        false
    }

    /// Writes a group of ingest requests (at most
    /// [`Destination::max_group`]) in one transaction, as if committed one
    /// after another in order (see `commit.rs`): all or none. How each
    /// request landed, in order; each written request's answer is set once
    /// the group committed.
    async fn write_requests(
        &mut self,
        group: Vec<(PlannedBatch, &crate::request::RequestEntry)>,
    ) -> Result<Vec<crate::request::Landed>> {
        if group.len() > self.max_group() {
            return Err(Error::config(
                "this destination commits one ingest request per transaction",
            ));
        }
        let mut landed = Vec::with_capacity(group.len());
        for (batch, request) in group {
            let commit = Commit {
                request: Some(request.clone()),
                ..Default::default()
            };
            landed.push(crate::request::Landed::Written(
                self.write(batch, commit).await?,
            ));
        }
        Ok(landed)
    }

    /// The stored request with `key`, if any.
    async fn stored_request(
        &mut self,
        _pipeline: &str,
        _key: &str,
    ) -> Result<Option<crate::request::StoredRequest>> {
        Err(not_serving())
    }

    /// Claims a key no row holds yet (in a transaction of its own); false
    /// when a row exists.
    async fn insert_claim(&mut self, _claim: &crate::request::Claim) -> Result<bool> {
        Err(not_serving())
    }

    /// Takes over the row of a key that was seen with claim `from` and
    /// status `status` (a lease or retention that ran out); false when the
    /// row changed meanwhile.
    async fn take_over_claim(
        &mut self,
        _claim: &crate::request::Claim,
        _from: &str,
        _status: &str,
    ) -> Result<bool> {
        Err(not_serving())
    }

    /// Deletes a claim that is still processing (its request failed before
    /// committing), so the client's retry need not wait for its lease.
    async fn release_claim(&mut self, _pipeline: &str, _key: &str, _claim: &str) -> Result<()> {
        Err(not_serving())
    }

    /// Deletes the done requests whose retention ended before `now_ms`, and
    /// processing claims long dead; returns how many.
    async fn expire_requests(&mut self, _pipeline: &str, _now_ms: i64) -> Result<u64> {
        Err(not_serving())
    }
}

fn not_serving() -> Error {
    Error::config(
        "idemload serve writes into SQLite, PostgreSQL and MySQL/MariaDB destinations; this destination is not supported",
    )
}

/// See [`Destination::lookahead`].
pub trait Lookahead: Send + Sync {
    /// The batch that will be written next (after the one being written).
    fn planned(&self, batch: &PlannedBatch);
}

/// Opens the destination a pipeline's `[destination]` describes.
pub async fn open_config(
    pipeline: &str,
    config: &DestinationConfig,
) -> Result<Box<dyn Destination>> {
    match config {
        DestinationConfig::Http(http) => {
            http.check()?;
            let http = http::HttpDestination::open(pipeline, (**http).clone()).await?;
            Ok(Box::new(http))
        }
        DestinationConfig::Table(table) => open_in(&table.url, table.schema.as_deref()).await,
        DestinationConfig::Absent => Err(no_destination()),
    }
}

fn no_destination() -> Error {
    Error::config(format!("[destination]: {}", config::MISSING_URL))
}

/// Opens a pipeline's bookkeeping for reading only: `None` when no run has
/// written to its destination. Creates nothing: `history`, `rejects`,
/// `state` and `check` use it, so a mistyped URL or a pipeline that never
/// ran leaves no database file, schema or table behind.
pub async fn open_existing(
    pipeline: &str,
    config: &DestinationConfig,
) -> Result<Option<Box<dyn Destination>>> {
    fn boxed<D: Destination + 'static>(d: Option<D>) -> Option<Box<dyn Destination>> {
        d.map(|d| Box::new(d) as Box<dyn Destination>)
    }
    let table = match config {
        DestinationConfig::Http(http) => {
            http.check()?;
            let ledger = http::ledger_url(pipeline, http);
            return Ok(boxed(
                sqlite::SqliteDestination::open_existing(&ledger).await?,
            ));
        }
        DestinationConfig::Table(table) => table,
        DestinationConfig::Absent => return Err(no_destination()),
    };
    let url = table.url.as_str();
    match Backend::of_url(url) {
        Ok(Backend::Sqlite) => Ok(boxed(sqlite::SqliteDestination::open_existing(url).await?)),
        Ok(Backend::Mysql) => Ok(boxed(mysql::MysqlDestination::open_existing(url).await?)),
        Ok(Backend::Postgres) => Ok(boxed(
            postgres::PostgresDestination::open_existing(url, table.schema.as_deref()).await?,
        )),
        _ => Err(unsupported(url)),
    }
}

fn unsupported(url: &str) -> Error {
    Error::config(format!(
        "unsupported destination URL {}: use sqlite://PATH, postgres://USER@HOST/DB or mysql://USER:PASS@HOST:PORT/DB",
        redact(url)
    ))
}

/// Opens the destination an URL names.
pub async fn open(url: &str) -> Result<Box<dyn Destination>> {
    open_in(url, None).await
}

/// Opens the destination an URL names, in `schema` (`[destination] schema`)
/// where the database has schemas.
pub async fn open_in(url: &str, schema: Option<&str>) -> Result<Box<dyn Destination>> {
    match Backend::of_url(url) {
        Ok(Backend::Sqlite) => Ok(Box::new(sqlite::SqliteDestination::open(url).await?)),
        Ok(Backend::Mysql) => Ok(Box::new(mysql::MysqlDestination::open(url).await?)),
        Ok(Backend::Postgres) => Ok(Box::new(
            postgres::PostgresDestination::open(url, schema).await?,
        )),
        _ => Err(unsupported(url)),
    }
}

/// Connects to the database an URL names. With `write` false (`audit`) it
/// creates nothing: no database file, schema or bookkeeping table.
pub async fn open_inspect(url: &str, write: bool) -> Result<Box<dyn inspect::Inspect>> {
    match Backend::of_url(url) {
        Ok(Backend::Sqlite) => Ok(Box::new(
            sqlite::inspect::SqliteInspect::open(url, write).await?,
        )),
        Ok(Backend::Postgres) => Ok(Box::new(
            postgres::inspect::PostgresInspect::open(url, write).await?,
        )),
        Ok(Backend::Mysql) => Ok(Box::new(
            mysql::inspect::MysqlInspect::open(url, write).await?,
        )),
        _ => Err(Error::config(format!(
            "audit, dedupe and verify do not support {}: use sqlite://, postgres:// or mysql://",
            redact(url)
        ))),
    }
}
