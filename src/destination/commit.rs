//! The one commit path: the order in which a batch and its bookkeeping go
//! into one transaction, the same for every SQL backend.
//!
//! Guarantee 2 (a checkpoint never ahead of the data) and guarantee 4
//! (every record accounted for) rest on this order, so it is written once,
//! here, and each backend only says how to do each step in its own
//! transaction ([`BatchTx`]):
//!
//! 1. fence: the run still holds its lock (a run whose lease was taken over
//!    never commits again);
//! 2. rows: insert, update, delete what the batch changes (values that do
//!    not fit their column become rejects here);
//! 3. rejects: the batch's rejected records, with their source references
//!    (raw text bounded, see [`stored_raw`]), counting those an earlier run
//!    recorded already; and the files the batch finishes, logged as loaded;
//! 4. checkpoint: where the batch brings the run, when the source is
//!    ordered by cursor;
//! 5. finish, with the run's last batch: a staged `replace`/`window` load
//!    is swapped in, the run's ending is decided from its totals, its final
//!    checkpoint written and the run recorded;
//! 6. commit — or roll back on any error, so nothing of the batch stays.
//!
//! A batch of a backfill window (`Commit::window`) fences on the window's
//! claim instead of the run lock (step 1), and the window's last batch marks
//! it done after finishing its run (step 5): a window is done exactly when
//! its rows are in.
//!
//! A batch of an ingest request (`serve`, `Commit::request`) fences on the
//! request's claim instead of the run lock (step 1), and, after its rejects,
//! marks the request done with the response it answers: the rows and the
//! stored response commit together or not at all.
//!
//! A group of ingest requests ([`commit_requests`]) shares one transaction:
//! every request is admitted first (step 1: its claim fenced, or, where the
//! destination claims inside this transaction, its key taken and its stored
//! row read, which may answer it without writing), then each admitted
//! request's rows and rejects are written in arrival order as their own run
//! (steps 2-3), then every one is marked done (step 5), and the group
//! commits once.
//! Each request sees the rows of the requests before it in the same
//! transaction, so the rows and answers are those of the same requests
//! committed one after another; an error in any step rolls the whole group
//! back, and the caller writes its requests again one by one.

use serde_json::Value;

use super::Commit;
use crate::batch::{PlannedBatch, Row};
use crate::error::Result;
use crate::files::LoadedFile;
use crate::record::{stored_raw, Reject};
use crate::request::{Landed, RequestEntry};
use crate::state::Resolution;
use crate::stats::{RunStats, RunStatus};
use crate::windows::WindowEntry;

/// One open batch transaction of a backend.
///
/// Each step runs inside the transaction; [`commit_batch`] calls them in the
/// order of the module doc. Implementations hold what they need after the
/// commit (keys the run wrote, temporary tables made) and apply it in
/// [`BatchTx::commit`].
pub(crate) trait BatchTx {
    /// Fails when the run's lock was taken over.
    async fn fence(&mut self) -> Result<()>;

    /// Writes the rows (none, or rows a backend prepared before its
    /// transaction), adding to `stats` what happened to each and to
    /// `rejects` the rows whose values do not fit. Returns whether the
    /// table changed (rows written, columns added).
    async fn write_rows(
        &mut self,
        rows: Vec<Row>,
        stats: &mut RunStats,
        rejects: &mut Vec<Reject>,
    ) -> Result<bool>;

    /// How many of the batch's rejects an earlier run of the pipeline
    /// recorded already (same source reference, same stored raw text).
    async fn known_rejects(&mut self, rejects: &[Reject]) -> Result<u64>;

    /// Records the batch's rejects.
    async fn insert_rejects(&mut self, rejects: &[Reject]) -> Result<()>;

    /// Logs files the batch finishes as loaded into the run's table
    /// (`_idemload_files`, one row per pipeline and path).
    async fn log_files(&mut self, files: &[LoadedFile]) -> Result<()>;

    /// Moves the pipeline's checkpoint.
    async fn write_checkpoint(&mut self, checkpoint: &Value) -> Result<()>;

    /// With the last batch of a staged run: swaps the stage in and returns
    /// what that changed (nothing when the run is not staged).
    async fn apply_stage(&mut self) -> Result<RunStats>;

    /// Records the run's ending; `after` is the checkpoint it leaves.
    async fn finish_run(&mut self, end: &Resolution, after: Option<&Value>) -> Result<()>;

    /// Fails ([`crate::Error::RequestLost`]) unless the request's claim is
    /// still this attempt's and still processing; locks the request's row
    /// until the transaction ends.
    async fn fence_request(&mut self, request: &RequestEntry) -> Result<()>;

    /// Marks the request done with its response, kept until its retention
    /// ends.
    async fn finish_request(&mut self, request: &RequestEntry, response: &str) -> Result<()>;

    /// Admits each request of a group: `None` for a request to write,
    /// or what answers it without writing. By default each request's claim
    /// is fenced ([`BatchTx::fence_request`]) and every one is written; a
    /// destination that claims keys inside this transaction takes them here
    /// and reads what is stored under them.
    async fn admit_requests(&mut self, requests: &[&RequestEntry]) -> Result<Vec<Option<Landed>>> {
        for request in requests {
            self.fence_request(request).await?;
        }
        Ok(requests.iter().map(|_| None).collect())
    }

    /// The rows and rejects that follow are `request`'s (a group's requests
    /// are written one after another in one transaction): its claim is the
    /// run id its rejects carry, and its duplicates are counted within it.
    fn begin_request(&mut self, request: &RequestEntry);

    /// A group of requests with these rows (one slice per request) is
    /// about to be admitted and written: a backend may read what they all
    /// need at once (rows of a request that is not admitted are read for
    /// nothing, and never written).
    fn begin_group(&mut self, _rows: &[&[Row]]) {}

    /// [`BatchTx::finish_request`] for each request of a group, with its
    /// response, once every request of the group is written (a backend may
    /// finish them all in one statement, and send now what it held back of
    /// their rows; an error fails the whole group).
    async fn finish_requests(&mut self, done: &[(&RequestEntry, String)]) -> Result<()> {
        for (request, response) in done {
            self.finish_request(request, response).await?;
        }
        Ok(())
    }

    /// Fails ([`crate::Error::WindowLost`]) unless the run still holds its
    /// backfill window; renews the window's lease.
    async fn fence_window(&mut self, window: &WindowEntry) -> Result<()>;

    /// Marks the window done with the stats of the run that loaded it.
    async fn finish_window(&mut self, window: &WindowEntry, stats: &RunStats) -> Result<()>;

    /// Commits. `changed` says whether anything beyond the lease was
    /// written, so a backend may roll back a transaction that changes
    /// nothing.
    async fn commit(self, changed: bool) -> Result<()>;

    /// Rolls back after a failed step.
    async fn rollback(self);
}

/// Writes one batch with its bookkeeping in one transaction, in the order
/// of the module doc; returns the batch's full stats (the planner's and the
/// destination's). `before` is the checkpoint the run started from.
pub(crate) async fn commit_batch<T: BatchTx>(
    mut tx: T,
    batch: PlannedBatch,
    commit: &Commit,
    before: Option<&Value>,
) -> Result<RunStats> {
    let PlannedBatch {
        rows,
        mut rejects,
        mut stats,
        files,
        ..
    } = batch;
    let steps = async {
        match (&commit.request, &commit.window) {
            (Some(request), _) => tx.fence_request(request).await?,
            (None, Some(window)) => tx.fence_window(window).await?,
            (None, None) => tx.fence().await?,
        }
        let mut changed = tx.write_rows(rows, &mut stats, &mut rejects).await?;
        record_rejects(&mut tx, &mut rejects, &mut stats).await?;
        let logs_files = !files.is_empty();
        if logs_files {
            tx.log_files(&last_per_path(files)).await?;
        }
        if let Some(checkpoint) = &commit.checkpoint {
            tx.write_checkpoint(checkpoint).await?;
        }
        if let Some(finish) = &commit.finish {
            stats += tx.apply_stage().await?;
            let end = finish.resolve(stats);
            if let Some(checkpoint) = &end.checkpoint {
                tx.write_checkpoint(checkpoint).await?;
            }
            let after = end.checkpoint.as_ref().or(before);
            tx.finish_run(&end, after).await?;
            if let Some(window) = &commit.window {
                // A window whose run failed (too many rejects) stays to be
                // loaded again: the caller marks it failed.
                if end.status != RunStatus::Failed {
                    tx.finish_window(window, &end.stats).await?;
                }
            }
        }
        if let Some(request) = &commit.request {
            let response = request.response(&stats, &rejects);
            tx.finish_request(request, &response).await?;
            // Read by the caller only once the commit succeeded.
            let _ = request.answered.set(response);
        }
        changed |= !rejects.is_empty()
            || logs_files
            || commit.checkpoint.is_some()
            || commit.finish.is_some()
            || commit.request.is_some();
        Ok::<_, crate::error::Error>(changed)
    }
    .await;
    match steps {
        Ok(changed) => {
            tx.commit(changed).await?;
            Ok(stats)
        }
        Err(e) => {
            tx.rollback().await;
            Err(e)
        }
    }
}

/// Writes a group of ingest requests in one transaction, in the order of
/// the module doc; returns how each request landed, in the group's order.
/// Each written request's response is set once the group committed.
pub(crate) async fn commit_requests<T: BatchTx>(
    mut tx: T,
    group: Vec<(PlannedBatch, &RequestEntry)>,
) -> Result<Vec<Landed>> {
    let steps = async {
        if group.len() > 1 {
            let rows: Vec<&[Row]> = group.iter().map(|(b, _)| b.rows.as_slice()).collect();
            tx.begin_group(&rows);
        }
        let requests: Vec<&RequestEntry> = group.iter().map(|(_, r)| *r).collect();
        let mut landed = tx.admit_requests(&requests).await?;
        let admitted: Vec<(usize, PlannedBatch, &RequestEntry)> = group
            .into_iter()
            .enumerate()
            .filter(|(i, _)| landed[*i].is_none())
            .map(|(i, (batch, request))| (i, batch, request))
            .collect();
        let mut done = Vec::with_capacity(admitted.len());
        for (i, batch, request) in admitted {
            let PlannedBatch {
                rows,
                mut rejects,
                mut stats,
                ..
            } = batch;
            tx.begin_request(request);
            tx.write_rows(rows, &mut stats, &mut rejects).await?;
            record_rejects(&mut tx, &mut rejects, &mut stats).await?;
            done.push((request, request.response(&stats, &rejects)));
            landed[i] = Some(Landed::Written(stats));
        }
        if !done.is_empty() {
            tx.finish_requests(&done).await?;
        }
        Ok::<_, crate::error::Error>((done, landed))
    }
    .await;
    match steps {
        Ok((done, landed)) => {
            tx.commit(!done.is_empty()).await?;
            for (request, response) in done {
                let _ = request.answered.set(response);
            }
            Ok(landed.into_iter().flatten().collect())
        }
        Err(e) => {
            tx.rollback().await;
            Err(e)
        }
    }
}

/// Step 3: the batch's rejects, their raw text bounded, counting those an
/// earlier run recorded already.
async fn record_rejects<T: BatchTx>(
    tx: &mut T,
    rejects: &mut [Reject],
    stats: &mut RunStats,
) -> Result<()> {
    for r in rejects.iter_mut() {
        r.raw = stored_raw(&r.raw);
    }
    if !rejects.is_empty() {
        stats.known_rejects += tx.known_rejects(rejects).await?;
    }
    tx.insert_rejects(rejects).await
}

/// One entry per path, the last one (a file named twice in a source is read
/// twice): a path is one row of the log.
fn last_per_path(mut files: Vec<LoadedFile>) -> Vec<LoadedFile> {
    let mut seen = std::collections::HashSet::new();
    files.reverse();
    files.retain(|f| seen.insert(f.path.clone()));
    files.reverse();
    files
}
