//! Backfills: a cursor range loaded as windows, shared by any number of
//! workers in any number of processes on any number of machines.
//!
//! The windows live in `_idemload_windows`, next to the data, so the
//! destination database is the only coordinator. A worker claims a window
//! with a conditional update (the row must still be as the worker read it:
//! of two workers that pick one window, one wins), loads it as a run of its
//! own ([`Pipeline::run_window`]: the source is asked for the window's range
//! only, every batch fences on the claim, the last batch marks the window
//! done in its transaction), and claims the next. The claim's lease is
//! renewed in the background while the window loads; a worker that dies
//! leaves its window to be claimed again once the lease runs out (at once
//! when it was a process of this host that is gone), and the reload is
//! harmless because the load is idempotent. The pipeline's checkpoint is
//! never moved.
//!
//! A process ends when every window of its range is done or failed: with
//! nothing left to claim it waits for windows other workers are loading
//! (and takes them over if their worker dies), so each process's exit
//! status speaks for the whole range.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::mode::Mode;
use crate::pipeline::{NoProgress, Pipeline, RunOptions};
use crate::state::{format_time, LockHolder};
use crate::stats::{RunStats, RunStatus};
use crate::stop::StopToken;
use crate::windows::{self, Span, Window, WindowClaim, WindowEntry, WindowRow, WindowStatus};

/// What `idemload backfill` asks.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// The range `[from, to)`: integers, dates or RFC 3339 timestamps.
    pub from: String,
    pub to: String,
    /// The span of a window; `None`: `[load] window`.
    pub window: Option<Span>,
    /// Claimers in this process.
    pub workers: usize,
    /// Load again the windows that were done when the backfill started.
    pub redo: bool,
    pub stop: StopToken,
}

/// Where a backfill stands, for a progress view.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackfillProgress {
    pub windows: usize,
    pub done: usize,
    pub running: usize,
    pub failed: usize,
    /// Rows read by this process so far.
    pub read: u64,
    /// Windows this process loaded.
    pub loaded: usize,
}

/// Observes a backfill.
pub trait BackfillObserver: Send + Sync {
    fn update(&self, _progress: &BackfillProgress) {}
}

impl BackfillObserver for NoProgress {}

/// What a backfill did: its `--json` object.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillReport {
    pub pipeline: String,
    pub status: RunStatus,
    pub from: String,
    pub to: String,
    pub window: String,
    pub workers: usize,
    /// Windows in the range.
    pub windows: usize,
    /// Done at the end (by anyone).
    pub windows_done: usize,
    /// Loaded by this process.
    pub windows_loaded: usize,
    /// Done without this process loading them: before it started, or by
    /// other workers.
    pub windows_skipped: usize,
    pub windows_failed: usize,
    /// Sums over the windows this process loaded.
    #[serde(flatten)]
    pub stats: RunStats,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    /// The first failure, when a window failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The windows of a pipeline by status: `--status`.
#[derive(Debug, Clone, Serialize)]
pub struct WindowsStatus {
    pub pipeline: String,
    pub pending: usize,
    pub running: usize,
    pub done: usize,
    pub failed: usize,
    /// Rejected records over the done windows, and how many of those an
    /// earlier run had rejected already.
    pub rejected: u64,
    pub known_rejects: u64,
    pub windows: Vec<WindowRow>,
}

impl WindowsStatus {
    /// 0 every window done, 4 done with new rejects, 1 otherwise (one
    /// failed, or some are pending or running).
    pub fn exit_code(&self) -> i32 {
        if self.windows.is_empty() || self.done < self.windows.len() {
            1
        } else if self.rejected > self.known_rejects {
            4
        } else {
            0
        }
    }
}

/// The windows of `[from, to)` for this pipeline, checked.
pub fn plan(
    pipeline: &Pipeline,
    from: &str,
    to: &str,
    span: Option<Span>,
) -> Result<(Vec<Window>, Span)> {
    let s = &pipeline.settings;
    if s.cursor.is_none() {
        return Err(Error::config(
            "a backfill loads ranges of the cursor: set `cursor` in [load]",
        ));
    }
    if s.mode == Mode::Replace {
        return Err(Error::config(
            "mode = \"replace\" swaps the whole table with each load, so windows would undo each other: backfill with mode = \"merge\", \"insert_new\" or \"window\"",
        ));
    }
    let span = match (span, s.window) {
        (Some(span), _) | (None, Some(span)) => span,
        (None, None) => {
            return Err(Error::config(
                "how wide is a window? pass --window (e.g. --window 1d, or a number for an integer cursor) or set `window` in [load]",
            ))
        }
    };
    Ok((windows::windows(from, to, span)?, span))
}

/// `idemload backfill --status`: the pipeline's windows (those of `[from,
/// to)` with `range`), none when no backfill ran.
pub async fn status(
    pipeline: &Pipeline,
    range: Option<(&str, &str, Option<Span>)>,
) -> Result<WindowsStatus> {
    let grid = match range {
        Some((from, to, span)) => Some(plan(pipeline, from, to, span)?.0),
        None => None,
    };
    let rows = match pipeline.books().await? {
        Some(mut books) => {
            let positions = grid.as_ref().map(|g| positions(g));
            let rows = books.windows(pipeline.name(), positions, false).await?;
            match &grid {
                Some(g) => in_grid(rows, g).into_iter().map(|(_, r)| r).collect(),
                None => rows,
            }
        }
        None => Vec::new(),
    };
    let count = |s: WindowStatus| rows.iter().filter(|r| r.status == s).count();
    let done: Vec<RunStats> = rows
        .iter()
        .filter(|r| r.status == WindowStatus::Done)
        .filter_map(WindowRow::run_stats)
        .collect();
    Ok(WindowsStatus {
        pipeline: pipeline.name().to_string(),
        pending: count(WindowStatus::Pending),
        running: count(WindowStatus::Running),
        done: count(WindowStatus::Done),
        failed: count(WindowStatus::Failed),
        rejected: done.iter().map(|s| s.rejected).sum(),
        known_rejects: done.iter().map(|s| s.known_rejects).sum(),
        windows: rows,
    })
}

/// The positions `[first, last]` of a grid, as a half-open range.
fn positions(grid: &[Window]) -> (i64, i64) {
    let first = grid.first().map_or(0, |w| w.position);
    let last = grid.last().map_or(0, |w| w.position);
    (first, last.saturating_add(1))
}

/// The rows that are windows of `grid` (same start and end), with theirs.
fn in_grid(rows: Vec<WindowRow>, grid: &[Window]) -> Vec<(Window, WindowRow)> {
    let by_bounds: HashMap<(String, String), &Window> = grid
        .iter()
        .map(|w| ((w.start_text(), w.end_text()), w))
        .collect();
    rows.into_iter()
        .filter_map(|r| {
            let w = by_bounds.get(&(r.start.clone(), r.end.clone()))?;
            Some(((*w).clone(), r))
        })
        .collect()
}

/// What the workers of this process share.
struct Shared {
    /// The connection claims, lease renewals and releases go through.
    books: Mutex<Box<dyn Destination>>,
    /// Run ids of the windows this process is loading (their leases are
    /// renewed).
    held: std::sync::Mutex<HashSet<String>>,
    /// Windows this process failed: not tried again by it.
    failed_here: std::sync::Mutex<HashSet<(String, String)>>,
    /// Conflicts each window met in this process (retried up to
    /// [`CONFLICT_RETRIES`] times).
    conflicts: std::sync::Mutex<HashMap<(String, String), u32>>,
    /// Windows this process loaded (with --redo, not loaded twice).
    loaded_here: std::sync::Mutex<HashSet<(String, String)>>,
    totals: std::sync::Mutex<(RunStats, usize)>,
    first_error: std::sync::Mutex<Option<Error>>,
}

/// Runs a backfill to the end of its range.
pub async fn backfill(
    pipeline: &Pipeline,
    options: &BackfillOptions,
    observer: &dyn BackfillObserver,
) -> Result<BackfillReport> {
    let (grid, span) = plan(pipeline, &options.from, &options.to, options.window)?;
    let name = pipeline.name().to_string();
    let started = Instant::now();
    let started_at = Utc::now();
    let mut books = pipeline.destination().await?;
    books.add_windows(&name, &grid).await?;
    let lease = pipeline.settings.lock_lease;
    let shared = Shared {
        books: Mutex::new(books),
        held: Default::default(),
        failed_here: Default::default(),
        loaded_here: Default::default(),
        conflicts: Default::default(),
        totals: Default::default(),
        first_error: Default::default(),
    };
    tracing::info!(pipeline = %name, windows = grid.len(), window = %span, workers = options.workers, "Backfill started.");
    let workers = (0..options.workers.max(1))
        .map(|_| worker(pipeline, options, &grid, &shared, started_at, observer));
    let heartbeat = renew_leases(&shared, &name, lease, &options.stop);
    let work = futures_util::future::join_all(workers);
    let results = tokio::select! {
        results = work => results,
        () = heartbeat => unreachable!("the heartbeat runs until the workers end"),
    };
    // A configuration error stops every worker: report it as such.
    for r in results {
        r?;
    }
    let rows = {
        let mut books = shared.books.lock().await;
        books.windows(&name, Some(positions(&grid)), false).await?
    };
    let rows = in_grid(rows, &grid);
    let done = rows
        .iter()
        .filter(|(_, r)| r.status == WindowStatus::Done)
        .count();
    let failed = rows
        .iter()
        .filter(|(_, r)| r.status == WindowStatus::Failed)
        .count();
    let (stats, loaded) = *shared.totals.lock().map_err(poisoned)?;
    let first_error = shared.first_error.lock().map_err(poisoned)?.take();
    let status = if options.stop.is_stopped() && done + failed < grid.len() {
        RunStatus::Interrupted
    } else if failed > 0 || done < grid.len() {
        RunStatus::Failed
    } else if stats.rejected > stats.known_rejects {
        RunStatus::SucceededWithRejects
    } else {
        RunStatus::Succeeded
    };
    let report = BackfillReport {
        pipeline: name,
        status,
        from: options.from.clone(),
        to: options.to.clone(),
        window: span.to_string(),
        workers: options.workers.max(1),
        windows: grid.len(),
        windows_done: done,
        windows_loaded: loaded,
        windows_skipped: done.saturating_sub(loaded),
        windows_failed: failed,
        stats,
        started_at: format_time(started_at),
        finished_at: format_time(Utc::now()),
        duration_ms: started.elapsed().as_millis() as u64,
        error: first_error.map(|e| e.to_string()).or_else(|| {
            rows.iter()
                .find(|(_, r)| r.status == WindowStatus::Failed)
                .map(|(w, r)| {
                    format!(
                        "window [{}, {}): {}",
                        w.start_text(),
                        w.end_text(),
                        r.error.clone().unwrap_or_default()
                    )
                })
        }),
    };
    tracing::info!(pipeline = %report.pipeline, done, failed, loaded, "Backfill finished.");
    Ok(report)
}

fn poisoned<T>(_: T) -> Error {
    Error::destination("backfill", "a worker panicked")
}

/// Renews the leases of the windows this process holds, every third of a
/// lease, until the process ends.
async fn renew_leases(shared: &Shared, pipeline: &str, lease: Duration, stop: &StopToken) {
    let every = (lease / 3).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        let held: Vec<String> = match shared.held.lock() {
            Ok(h) => h.iter().cloned().collect(),
            Err(_) => continue,
        };
        if held.is_empty() {
            continue;
        }
        let mut books = shared.books.lock().await;
        if let Err(e) = books.renew_windows(pipeline, &held, lease).await {
            // A batch fence renews too; a worker that lost its window finds
            // out at its next batch.
            tracing::warn!(pipeline, error = %e, stopping = stop.is_stopped(), "Could not renew the window leases.");
        }
    }
}

/// One claimer: claims a window, loads it, and again, until none is left.
async fn worker(
    pipeline: &Pipeline,
    options: &BackfillOptions,
    grid: &[Window],
    shared: &Shared,
    started_at: chrono::DateTime<Utc>,
    observer: &dyn BackfillObserver,
) -> Result<()> {
    let name = pipeline.name();
    let lease = pipeline.settings.lock_lease;
    let mut dest: Option<Box<dyn Destination>> = None;
    let mut waiting_logged = false;
    loop {
        if options.stop.is_stopped() {
            return Ok(());
        }
        let run_id = uuid::Uuid::now_v7().to_string();
        let claim = WindowClaim {
            pipeline: name.to_string(),
            holder: LockHolder::this_process(&run_id),
            lease,
        };
        let (claimed, progress) =
            claim_next(shared, &claim, grid, options.redo, started_at).await?;
        observer.update(&progress);
        let Some(window) = claimed else {
            // Nothing claimable and nothing running elsewhere: every window
            // is done, or failed here.
            if progress.running == 0 {
                return Ok(());
            }
            if !waiting_logged {
                tracing::info!(pipeline = %name, running = progress.running, "Waiting for windows other workers are loading.");
                waiting_logged = true;
            }
            let pause = tokio::time::sleep(Duration::from_millis(500));
            if options.stop.unless_stopped(pause).await.is_none() {
                return Ok(());
            }
            continue;
        };
        waiting_logged = false;
        let entry = WindowEntry {
            pipeline: name.to_string(),
            window,
            run_id: run_id.clone(),
            lease,
        };
        let bounds = (entry.start(), entry.end());
        shared.held.lock().map_err(poisoned)?.insert(run_id.clone());
        tracing::info!(pipeline = %name, start = %bounds.0, end = %bounds.1, run_id = %run_id, "Window claimed.");
        let d = match dest.as_mut() {
            Some(d) => d,
            None => dest.insert(pipeline.destination().await?),
        };
        let run_options = RunOptions {
            full_refresh: false,
            wait: None,
            stop: options.stop.clone(),
        };
        let result = pipeline
            .run_window(d.as_mut(), &entry, &run_options, &NoProgress)
            .await;
        shared.held.lock().map_err(poisoned)?.remove(&run_id);
        let mut books = shared.books.lock().await;
        match result {
            Ok(report) if report.status == RunStatus::Interrupted => {
                books
                    .release_window(&entry, WindowStatus::Pending, None, None)
                    .await?;
                return Ok(());
            }
            Ok(report) => {
                tracing::info!(pipeline = %name, start = %bounds.0, end = %bounds.1, stats = %report.stats, "Window done.");
                shared.loaded_here.lock().map_err(poisoned)?.insert(bounds);
                let mut totals = shared.totals.lock().map_err(poisoned)?;
                totals.0 += report.stats;
                totals.1 += 1;
            }
            Err(e @ Error::WindowLost { .. }) => {
                // Another worker took the window over: it loads it.
                tracing::warn!(pipeline = %name, error = %e, "Window taken over by another worker.");
                dest = None;
            }
            Err(e) if retry_again(shared, &bounds, &e)? => {
                // Workers racing on one table (creating it, adding a column,
                // a deadlock): the window goes back to pending, to be loaded
                // again from its start; nothing of a rolled-back batch stays.
                tracing::warn!(pipeline = %name, start = %bounds.0, end = %bounds.1, error = %e, "Window loads again after a conflict.");
                books
                    .release_window(&entry, WindowStatus::Pending, Some(&e.to_string()), None)
                    .await?;
                dest = None;
            }
            Err(e) => {
                tracing::error!(pipeline = %name, start = %bounds.0, end = %bounds.1, error = %e, "Window failed.");
                books
                    .release_window(&entry, WindowStatus::Failed, Some(&e.to_string()), None)
                    .await?;
                shared.failed_here.lock().map_err(poisoned)?.insert(bounds);
                // A connection that failed mid-batch is not trusted again.
                dest = None;
                if matches!(e, Error::Config(_)) {
                    // Every window would fail the same way.
                    options.stop.stop();
                    return Err(e);
                }
                let mut first = shared.first_error.lock().map_err(poisoned)?;
                first.get_or_insert(e);
            }
        }
    }
}

/// How often one window is loaded again after a conflict with another
/// worker before it counts as failed.
const CONFLICT_RETRIES: u32 = 5;

/// Whether a window that failed with `e` is loaded again: a conflict
/// between writers (deadlock, serialization, a concurrent `CREATE`, a lost
/// connection), fewer than [`CONFLICT_RETRIES`] times.
fn retry_again(shared: &Shared, bounds: &(String, String), e: &Error) -> Result<bool> {
    let conflict = e.is_retryable()
        || matches!(
            e,
            Error::Destination {
                kind: crate::error::ErrorKind::UniqueViolation,
                ..
            }
        );
    if !conflict {
        return Ok(false);
    }
    let mut conflicts = shared.conflicts.lock().map_err(poisoned)?;
    let n = conflicts.entry(bounds.clone()).or_default();
    *n += 1;
    Ok(*n <= CONFLICT_RETRIES)
}

/// Claims the first claimable window of the grid; says where the range
/// stands.
async fn claim_next(
    shared: &Shared,
    claim: &WindowClaim,
    grid: &[Window],
    redo: bool,
    started_at: chrono::DateTime<Utc>,
) -> Result<(Option<Window>, BackfillProgress)> {
    let mut books = shared.books.lock().await;
    // Without --redo a done window is never claimed again: only the open
    // ones are read, and every window of the grid not among them is done.
    let rows = in_grid(
        books
            .windows(&claim.pipeline, Some(positions(grid)), !redo)
            .await?,
        grid,
    );
    let now_ms = Utc::now().timestamp_millis();
    let started = format_time(started_at);
    let mut progress = BackfillProgress {
        windows: grid.len(),
        done: if redo { 0 } else { grid.len() - rows.len() },
        ..Default::default()
    };
    {
        let totals = shared.totals.lock().map_err(poisoned)?;
        progress.read = totals.0.read;
        progress.loaded = totals.1;
    }
    let mut claimable = Vec::new();
    {
        let failed_here = shared.failed_here.lock().map_err(poisoned)?;
        let loaded_here = shared.loaded_here.lock().map_err(poisoned)?;
        for (window, row) in rows {
            let bounds = (row.start.clone(), row.end.clone());
            let redo_this = redo
                && !loaded_here.contains(&bounds)
                && row
                    .finished_at
                    .as_deref()
                    .is_some_and(|f| f < started.as_str());
            match row.status {
                WindowStatus::Done if redo_this => claimable.push((window, row)),
                WindowStatus::Done => progress.done += 1,
                WindowStatus::Failed if failed_here.contains(&bounds) => progress.failed += 1,
                WindowStatus::Running if !row.abandoned(now_ms) => progress.running += 1,
                _ => claimable.push((window, row)),
            }
        }
    }
    for (window, row) in &claimable {
        if books.claim_window(claim, window, row).await? {
            progress.running += 1;
            return Ok((Some(window.clone()), progress));
        }
    }
    // Every candidate went to another worker meanwhile: they run.
    progress.running += claimable.len();
    Ok((None, progress))
}
