//! Running a pipeline: lock, read the checkpoint, stream batches from the
//! source through the planner into the destination, finish.
//!
//! The order of the steps is the crash-safety argument. The lock is taken
//! before anything is read, so one run at a time. Each batch commits its rows,
//! rejects and (when the source is ordered by cursor) its checkpoint in one
//! transaction; otherwise the checkpoint moves only with the last batch, so
//! a run killed anywhere leaves a checkpoint that is never ahead of the data
//! and a re-run that reads from it again, where merge makes the overlap free.
//! The last batch is known when it is written: the source says it is at its
//! end (a file source peeks one small chunk), or, for a source that cannot
//! tell, one more batch is read ahead.

pub mod plan;
pub use crate::stats;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use self::plan::{PlannedBatch, Planner};
use crate::config::{LoadSettings, PipelineConfig};
use crate::destination::{self, Commit, Destination, Target};
use crate::error::{Error, Result};
use crate::files::FileLog;
use crate::key::Cursor;
use crate::source::{self, Source, SourceProgress, SourceQuery};
use crate::state::{format_time, Finish, LockHolder, RunInfo};
use crate::stats::{RunStats, RunStatus};
use crate::stop::StopToken;
use crate::windows::WindowEntry;

/// How this process runs a pipeline (the pipeline's meaning is in its file).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Ignore the checkpoint for this run: read everything.
    pub full_refresh: bool,
    /// Wait this long for a lock held by another run instead of failing.
    pub wait: Option<Duration>,
    /// Stops the run cleanly when asked (keep a clone and call
    /// [`StopToken::stop`]): the batch being written commits, the run is
    /// recorded as `interrupted` and its lock released.
    pub stop: StopToken,
}

/// Observes a run; the binary draws a progress bar with it.
pub trait Progress: Send + Sync {
    /// A batch committed: the run's stats so far and the source's progress.
    fn batch_committed(&self, _stats: &RunStats, _source: SourceProgress) {}
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What a run did: the `--json` object of the spec.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub run_id: String,
    pub status: RunStatus,
    #[serde(flatten)]
    pub stats: RunStats,
    pub checkpoint_before: Option<Value>,
    pub checkpoint_after: Option<Value>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
}

/// A checked pipeline, ready to run.
///
/// ```no_run
/// # async fn demo() -> idemload::Result<()> {
/// use idemload::{NoProgress, Pipeline, PipelineConfig, RunOptions};
///
/// let config = PipelineConfig::from_file("pipelines/usage.toml".as_ref())?;
/// let report = Pipeline::new(config)?.run(&RunOptions::default(), &NoProgress).await?;
/// println!("inserted {} updated {}", report.stats.inserted, report.stats.updated);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub config: PipelineConfig,
    pub settings: LoadSettings,
}

impl Pipeline {
    /// Checks the configuration. A pipeline with a `[trigger]` may have no
    /// `[destination]` (it is only watched); running it then fails when the
    /// destination is opened, with the same message.
    pub fn new(config: PipelineConfig) -> Result<Pipeline> {
        if config.trigger.is_none() {
            config.require_destination()?;
        }
        let settings = config.load.settings()?;
        if settings.delete_field.is_some() && settings.mode != crate::mode::Mode::Merge {
            return Err(Error::config(
                "`delete_field` applies to mode = \"merge\"; in replace and window modes a row the load no longer holds is removed, and insert_new never touches a stored row",
            ));
        }
        Ok(Pipeline { config, settings })
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The destination table and how it is written.
    pub fn target(&self) -> Target {
        Target {
            table: self.config.destination.table().to_string(),
            key_columns: self.settings.key.columns(),
            cursor: self.settings.cursor.clone(),
            mode: self.settings.mode,
            window_field: self.settings.window_field.clone(),
            window: None,
            compare: self.settings.compare.clone(),
        }
    }

    /// Opens the pipeline's destination.
    pub async fn destination(&self) -> Result<Box<dyn Destination>> {
        destination::open_config(&self.config.name, &self.config.destination).await
    }

    /// The pipeline's bookkeeping, opened for reading only: `None` when no
    /// run has written to its destination. Creates nothing.
    pub async fn books(&self) -> Result<Option<Box<dyn Destination>>> {
        destination::open_existing(&self.config.name, &self.config.destination).await
    }

    /// Sets (or with `None` clears) the pipeline's checkpoint, under its run
    /// lock: waits for a running run as long as `wait` allows, else fails
    /// with [`Error::Locked`] naming the holder.
    pub async fn set_checkpoint(&self, value: Option<Value>, wait: Option<Duration>) -> Result<()> {
        let mut dest = self.destination().await?;
        let me = LockHolder::this_process(&format!("state-{}", uuid::Uuid::now_v7()));
        lock(
            dest.as_mut(),
            self.name(),
            &me,
            self.settings.lock_lease,
            wait,
            &StopToken::new(),
        )
        .await?;
        let result = dest.set_checkpoint(self.name(), value).await;
        dest.unlock().await?;
        result
    }

    /// Runs the pipeline with the source of its configuration.
    pub async fn run(&self, options: &RunOptions, progress: &dyn Progress) -> Result<RunReport> {
        let config = self.config.source.clone();
        self.run_with(options, progress, move |query| async move {
            source::open(&config, &query).await
        })
        .await
    }

    /// Runs the pipeline with a source the caller opens once the run knows
    /// its cursor low bound (a library user's own source).
    pub async fn run_with<F, Fut>(
        &self,
        options: &RunOptions,
        progress: &dyn Progress,
        open_source: F,
    ) -> Result<RunReport>
    where
        F: FnOnce(SourceQuery) -> Fut,
        Fut: std::future::Future<Output = Result<Box<dyn Source>>>,
    {
        let run_id = uuid::Uuid::now_v7().to_string();
        let name = self.name().to_string();
        let mut dest = self.destination().await?;
        let holder = LockHolder::this_process(&run_id);
        lock(
            dest.as_mut(),
            &name,
            &holder,
            self.settings.lock_lease,
            options.wait,
            &options.stop,
        )
        .await?;
        // The run starts once it holds the lock: time spent waiting for
        // another run (`--wait`) is not part of it, so runs recorded in
        // `_idemload_runs` never overlap.
        let started = Instant::now();
        let started_at = Utc::now();
        let result = self
            .run_locked(
                dest.as_mut(),
                &run_id,
                started_at,
                options,
                progress,
                None,
                open_source,
            )
            .await;
        if let Err(e) = dest.unlock().await {
            tracing::warn!(pipeline = %name, error = %e, "Could not release the run lock; it frees itself when its lease runs out.");
        }
        let (stats, status, before, after) = result?;
        let finished_at = Utc::now();
        let report = RunReport {
            pipeline: name,
            run_id,
            status,
            stats,
            checkpoint_before: before,
            checkpoint_after: after,
            started_at: format_time(started_at),
            finished_at: format_time(finished_at),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        if status == RunStatus::Interrupted {
            tracing::info!(pipeline = %report.pipeline, run_id = %report.run_id, stats = %report.stats, "Run interrupted; running again resumes.");
        } else {
            tracing::info!(pipeline = %report.pipeline, run_id = %report.run_id, stats = %report.stats, "Run finished.");
        }
        Ok(report)
    }

    /// Loads one claimed backfill window (see `idemload backfill`): the
    /// source is asked for the window's range only, no run lock is taken
    /// (the window's claim fences every batch), the checkpoint is left
    /// where it is, and the window is marked done in the transaction of its
    /// last batch. The run is recorded under `window.run_id`.
    pub async fn run_window(
        &self,
        dest: &mut dyn Destination,
        window: &WindowEntry,
        options: &RunOptions,
        progress: &dyn Progress,
    ) -> Result<RunReport> {
        let config = self.config.source.clone();
        let started = Instant::now();
        let started_at = Utc::now();
        let (stats, status, before, after) = self
            .run_locked(
                dest,
                &window.run_id,
                started_at,
                options,
                progress,
                Some(window),
                move |query| async move { source::open(&config, &query).await },
            )
            .await?;
        Ok(RunReport {
            pipeline: self.name().to_string(),
            run_id: window.run_id.clone(),
            status,
            stats,
            checkpoint_before: before,
            checkpoint_after: after,
            started_at: format_time(started_at),
            finished_at: format_time(Utc::now()),
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_locked<F, Fut>(
        &self,
        dest: &mut dyn Destination,
        run_id: &str,
        started_at: DateTime<Utc>,
        options: &RunOptions,
        progress: &dyn Progress,
        window: Option<&WindowEntry>,
        open_source: F,
    ) -> Result<(RunStats, RunStatus, Option<Value>, Option<Value>)>
    where
        F: FnOnce(SourceQuery) -> Fut,
        Fut: std::future::Future<Output = Result<Box<dyn Source>>>,
    {
        let name = self.name().to_string();
        let s = &self.settings;
        let before = dest.checkpoint(&name).await?;
        let low = match (&s.cursor, &before) {
            // A backfill window asks for its own range, whatever the
            // checkpoint says.
            _ if window.is_some() => window.map(|w| w.window.start.clone()),
            (None, _) => None,
            _ if options.full_refresh => None,
            (Some(_), Some(c)) => Some(
                Cursor::from_json(c)
                    .ok_or_else(|| Error::config(format!("stored checkpoint {c} is not a cursor value; reset it with `idemload state --reset`")))?
                    .minus(&s.lookback)?,
            ),
            (Some(_), None) => s.initial.clone(),
        };
        let info = RunInfo {
            pipeline: name.clone(),
            run_id: run_id.to_string(),
            started_at,
            checkpoint_before: before.clone(),
            lease: s.lock_lease,
        };
        let high = window.map(|w| w.window.end.clone());
        let mut target = self.target();
        target.window = window.map(|w| w.window.clone());
        dest.begin(&info, &target).await?;
        // Files loaded once: in merge and insert_new an unchanged file adds
        // nothing, so it is not read again; a staged load needs every file,
        // and a window reads only part of each.
        let loaded_files = if s.mode.is_staged() || options.full_refresh || window.is_some() {
            None
        } else {
            let log = FileLog::new(dest.loaded_files().await?);
            (!log.is_empty()).then(|| std::sync::Arc::new(log))
        };
        tracing::info!(pipeline = %name, %run_id, checkpoint = ?before, low = ?low.as_ref().map(|c| c.to_string()), "Run started.");

        let mut stats = RunStats::default();
        // The checkpoint as committed so far: where an interrupted run
        // leaves it.
        let mut committed_checkpoint = before.clone();
        let stop = &options.stop;
        // `Ok(None)`: stopped on request, between batches.
        let outcome = async {
            let query = SourceQuery {
                cursor: s.cursor.clone(),
                low: low.clone(),
                high: high.clone(),
                batch_size: s.batch_size,
                max_record_bytes: 64 << 20,
                loaded_files,
                max_value_bytes: Some(s.max_value_bytes),
            };
            let Some(source) = stop.unless_stopped(open_source(query)).await else {
                return Ok(None);
            };
            let mut source = source?;
            let ordered = source.ordered_by_cursor();
            let planner = Planner {
                low,
                high,
                ..Planner::of(s)
            };
            let before_cursor = before.as_ref().and_then(Cursor::from_json);
            let mut committed_max = before_cursor;
            let mut batch_no = 0u64;
            // Batches read and planned, not yet written: the one after the
            // batch being written is read and planned while it is written,
            // so parsing overlaps the database's work. A batch is the last
            // when the source says it is at its end, or, for a source that
            // cannot tell, when reading one more batch finds nothing.
            // A stop request abandons reading at once (what was read and not
            // written is read again by the next run) but never a write.
            let mut queue = std::collections::VecDeque::with_capacity(2);
            let lookahead = dest.lookahead();
            let mut exhausted = false;
            let mut first = true;
            let last = loop {
                if queue.is_empty() && !exhausted {
                    let reading = read_planned(source.as_mut(), &planner);
                    let Some(read) = stop.unless_stopped(reading).await else {
                        return Ok(None);
                    };
                    match read? {
                        Some(b) => queue.push_back(b),
                        None => exhausted = true,
                    }
                }
                let Some(mut ready) = queue.pop_front() else { break PlannedBatch::default() };
                if window.is_some() {
                    // A file read through a window is not loaded whole.
                    ready.files.clear();
                }
                if std::mem::take(&mut first) {
                    if let Some(absent) = &ready.absent {
                        return Err(absent_field(absent));
                    }
                }
                if queue.is_empty() && !exhausted {
                    let peek = async {
                        Ok::<_, Error>(match source.at_end().await? {
                            Some(end) => (end, None),
                            None => match read_planned(source.as_mut(), &planner).await? {
                                Some(b) => (false, Some(b)),
                                None => (true, None),
                            },
                        })
                    };
                    let Some(peeked) = stop.unless_stopped(peek).await else {
                        return Ok(None);
                    };
                    let (end, next) = peeked?;
                    exhausted = end;
                    queue.extend(next);
                }
                if queue.is_empty() && exhausted {
                    break ready;
                }
                if stop.is_stopped() {
                    return Ok(None);
                }
                batch_no += 1;
                let reaches = max_cursor(&committed_max, &ready.max_cursor);
                let commit = Commit {
                    checkpoint: if ordered && window.is_none() {
                        reaches.as_ref().map(Cursor::to_json)
                    } else {
                        None
                    },
                    finish: None,
                    request: None,
                    window: window.cloned(),
                };
                let moved = commit.checkpoint.clone();
                let next = async {
                    if exhausted {
                        return Some(Ok(None));
                    }
                    let reading = read_planned(source.as_mut(), &planner);
                    let next = stop.unless_stopped(reading).await;
                    if let (Some(Ok(Some(batch))), Some(ahead)) = (&next, &lookahead) {
                        ahead.planned(batch);
                    }
                    next
                };
                let (written, read) = tokio::join!(dest.write(ready, commit), next);
                stats += written.map_err(|e| in_batch(e, &name, batch_no))?;
                committed_max = reaches;
                if moved.is_some() {
                    committed_checkpoint = moved;
                }
                progress.batch_committed(&stats, source.progress());
                tracing::info!(pipeline = %name, batch = batch_no, stats = %stats, "Batch committed.");
                if let Some(max) = s.max_rejects {
                    if stats.rejected > max {
                        return Err(Error::TooManyRejects { rejected: stats.rejected, max });
                    }
                }
                let Some(read) = read else {
                    return Ok(None);
                };
                match read? {
                    Some(b) => queue.push_back(b),
                    None => exhausted = true,
                }
            };
            // Once the last batch is being written the run finishes: its
            // transaction ends the run, whatever is asked meanwhile.
            if stop.is_stopped() {
                return Ok(None);
            }
            batch_no += 1;
            let reaches = max_cursor(&committed_max, &last.max_cursor);
            let finish = Finish {
                prior: stats,
                max_rejects: s.max_rejects,
                // A backfill never moves the checkpoint.
                checkpoint: reaches.as_ref().map(Cursor::to_json).filter(|_| window.is_none()),
            };
            let batch = dest
                .write(
                    last,
                    Commit {
                        checkpoint: None,
                        finish: Some(finish.clone()),
                        request: None,
                        window: window.cloned(),
                    },
                )
                .await
                .map_err(|e| in_batch(e, &name, batch_no))?;
            let end = finish.resolve(batch);
            stats = end.stats;
            progress.batch_committed(&stats, source.progress());
            Ok(Some(end))
        }
        .await;
        match outcome {
            Ok(Some(end)) if end.status == RunStatus::Failed => Err(Error::TooManyRejects {
                rejected: end.stats.rejected,
                max: s.max_rejects.unwrap_or_default(),
            }),
            Ok(Some(end)) => {
                let after = end.checkpoint.or(before.clone());
                Ok((end.stats, end.status, before, after))
            }
            Ok(None) => {
                // What was committed stays, with the checkpoint that
                // describes it: the run is recorded as interrupted, and the
                // next run reads again from that checkpoint. A staged load
                // (`replace`, `window`) is swapped in whole with its last
                // batch or not at all: stopped before, it changed nothing.
                if s.mode.is_staged() {
                    stats = RunStats::default();
                }
                dest.interrupt(run_id, &stats, committed_checkpoint.as_ref())
                    .await?;
                Ok((stats, RunStatus::Interrupted, before, committed_checkpoint))
            }
            Err(e) => {
                if let Err(e2) = dest.fail(run_id, &stats, &e.to_string()).await {
                    tracing::warn!(pipeline = %name, error = %e2, "Could not record the failed run.");
                }
                Err(e)
            }
        }
    }
}

/// How long a run waits for a server to release the lock of a holder
/// known to be dead.
const DEAD_HOLDER_GRACE: Duration = Duration::from_secs(60);

/// A key, cursor or window field no record of the first batch has: a wrong
/// name in the configuration, not a batch of bad records.
fn absent_field(absent: &plan::AbsentField) -> Error {
    let setting = match absent.role {
        "key" => "`key` in [load] (--key)",
        "cursor" => "`cursor` in [load] (--cursor)",
        _ => "`window_field` in [load]",
    };
    let mut present = absent.present.clone();
    let shown = if present.len() > 30 {
        present.truncate(30);
        format!("{}, …", present.join(", "))
    } else {
        present.join(", ")
    };
    Error::config(format!(
        "no record of the first batch has the {} field {:?}; the records have: {shown}. Check {setting}",
        absent.role, absent.field
    ))
}

/// Reads the next batch and plans it.
async fn read_planned(source: &mut dyn Source, planner: &Planner) -> Result<Option<PlannedBatch>> {
    Ok(source.next_batch().await?.map(|items| planner.plan(items)))
}

/// Waits for the lock as long as `wait` allows, or until a stop is asked
/// for.
async fn lock(
    dest: &mut dyn Destination,
    pipeline: &str,
    me: &LockHolder,
    lease: Duration,
    wait: Option<Duration>,
    stop: &StopToken,
) -> Result<()> {
    let started = Instant::now();
    let deadline = wait.map(|w| started + w);
    let mut logged = false;
    loop {
        let Some(holder) = dest.lock(pipeline, me, lease).await? else {
            return Ok(());
        };
        // A server-side lock (PostgreSQL, MySQL) outlives a killed holder
        // until the server notices its connection is gone, which can take
        // as long as the statement it was running: the holder is certain to
        // be dead, so wait for the server rather than give up.
        let dead_holder = holder.is_dead_local_process() && started.elapsed() < DEAD_HOLDER_GRACE;
        let pause = match deadline {
            _ if dead_holder => {
                if !logged {
                    tracing::info!(pipeline, holder = %holder, "Waiting for the server to release the lock of a process that died.");
                    logged = true;
                }
                Duration::from_millis(100)
            }
            Some(d) if Instant::now() < d => {
                if !logged {
                    tracing::info!(pipeline, holder = %holder, "Waiting for the run lock.");
                    logged = true;
                }
                Duration::from_millis(200)
            }
            _ => {
                return Err(Error::Locked {
                    pipeline: pipeline.to_string(),
                    holder,
                })
            }
        };
        if stop
            .unless_stopped(tokio::time::sleep(pause))
            .await
            .is_none()
        {
            return Err(Error::Interrupted {
                pipeline: pipeline.to_string(),
            });
        }
    }
}

fn max_cursor(a: &Option<Cursor>, b: &Option<Cursor>) -> Option<Cursor> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y > x { y.clone() } else { x.clone() }),
        (x, None) => x.clone(),
        (None, y) => y.clone(),
    }
}

/// Names the pipeline and batch in a destination error.
fn in_batch(e: Error, pipeline: &str, batch: u64) -> Error {
    match e {
        Error::Destination {
            context,
            message,
            kind,
        } => Error::Destination {
            context: format!("pipeline {pipeline:?}, batch {batch}: {context}"),
            message,
            kind,
        },
        other => other,
    }
}
