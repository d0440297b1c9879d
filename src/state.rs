//! Bookkeeping kept next to the data: checkpoint, run lock, runs, rejects.
//!
//! Each destination stores these in its own `_idemload_*` tables so that they
//! commit atomically with the rows they describe: the checkpoint is written
//! in the transaction of the batch that reaches it (guarantee 2), the lock
//! lease makes one run at a time (guarantee 3), and the rejects table keeps
//! every bad record (guarantee 5). This module holds the types and the rules
//! they share; the SQL lives with each destination.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::stats::{RunStats, RunStatus};

/// Bookkeeping table names of the spec.
pub const STATE_TABLE: &str = "_idemload_state";
pub const RUNS_TABLE: &str = "_idemload_runs";
pub const REJECTS_TABLE: &str = "_idemload_rejects";
pub const QUARANTINE_TABLE: &str = "_idemload_quarantine";
/// The run lock lease rows (one per locked pipeline).
pub const LOCKS_TABLE: &str = "_idemload_locks";

/// Who holds (or wants) a pipeline's lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockHolder {
    pub run_id: String,
    pub host: String,
    pub pid: u32,
    pub since: DateTime<Utc>,
}

impl LockHolder {
    /// This process, for a new run.
    pub fn this_process(run_id: &str) -> LockHolder {
        LockHolder {
            run_id: run_id.to_string(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            since: Utc::now(),
        }
    }

    /// True when the holder is a process of this host that no longer exists,
    /// so its lock may be taken without waiting for the lease (Linux only;
    /// elsewhere the lease decides).
    pub fn is_dead_local_process(&self) -> bool {
        let this_host = gethostname::gethostname().to_string_lossy().into_owned();
        self.host == this_host
            && self.pid != std::process::id()
            && std::path::Path::new("/proc/self").exists()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} on host {} (pid {}) since {}",
            self.run_id,
            self.host,
            self.pid,
            format_time(self.since)
        )
    }
}

/// The error recorded with a run found dead when `by_run` took its lock
/// over: the run's row is marked `died` in the takeover's transaction.
pub fn died_error(holder: &LockHolder, by_run: &str) -> String {
    format!(
        "the process ended before the run finished (host {}, pid {}); run {by_run} took its lock over",
        holder.host, holder.pid
    )
}

/// The status `history` shows for a stored one. A run still `running` whose
/// run no longer holds the pipeline's lock (`holder` is the lease row of
/// its run id, if any) or whose holder is a process of this host that is
/// gone died without finishing: it is shown as `died` even before another
/// run takes its lock over and records it so.
pub fn status_shown(status: String, holder: Option<(String, u32)>) -> String {
    if status != RunStatus::Running.as_str() {
        return status;
    }
    let dead = match holder {
        None => true,
        Some((host, pid)) => LockHolder {
            run_id: String::new(),
            host,
            pid,
            since: Utc::now(),
        }
        .is_dead_local_process(),
    };
    if dead {
        RunStatus::Died.as_str().to_string()
    } else {
        status
    }
}

/// A new run, as the destination records it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub pipeline: String,
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    pub checkpoint_before: Option<Value>,
    pub lease: Duration,
}

impl RunInfo {
    /// The standing "run" of `idemload serve` on one connection: no run id,
    /// no lease, no checkpoint (each request carries its own claim).
    pub fn serving(pipeline: &str) -> RunInfo {
        RunInfo {
            pipeline: pipeline.to_string(),
            run_id: String::new(),
            started_at: Utc::now(),
            checkpoint_before: None,
            lease: Duration::ZERO,
        }
    }
}

/// What to do at the end of the run's last batch, in its transaction.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Stats of the run before this batch.
    pub prior: RunStats,
    pub max_rejects: Option<u64>,
    /// The checkpoint the run reaches if it succeeds.
    pub checkpoint: Option<Value>,
}

/// How a finishing run is recorded.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub stats: RunStats,
    pub status: RunStatus,
    /// Written with the data; `None` leaves the checkpoint where it is.
    pub checkpoint: Option<Value>,
    pub error: Option<String>,
}

impl Finish {
    /// Decides the run's ending from its totals: too many rejects fail it and
    /// keep the checkpoint where it was, and so do deferred records.
    pub fn resolve(&self, batch: RunStats) -> Resolution {
        let stats = self.prior + batch;
        match self.max_rejects {
            Some(max) if stats.rejected > max => Resolution {
                stats,
                status: RunStatus::Failed,
                checkpoint: None,
                error: Some(format!(
                    "{} records rejected, more than max_rejects = {max}",
                    stats.rejected
                )),
            },
            _ => Resolution {
                stats,
                status: if stats.rejected > stats.known_rejects {
                    RunStatus::SucceededWithRejects
                } else {
                    RunStatus::Succeeded
                },
                // A deferred record is not written yet: the checkpoint
                // stays before it.
                checkpoint: self.checkpoint.clone().filter(|_| stats.deferred == 0),
                error: None,
            },
        }
    }
}

/// One row of `_idemload_runs`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub status: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub stats: Option<RunStats>,
    pub checkpoint_before: Option<Value>,
    pub checkpoint_after: Option<Value>,
    pub error: Option<String>,
}

/// One row of `_idemload_rejects`.
#[derive(Debug, Clone, Serialize)]
pub struct RejectRecord {
    pub run_id: String,
    pub pipeline: String,
    pub source_ref: String,
    pub record_key: Option<String>,
    pub reason: String,
    pub raw: String,
    pub rejected_at: String,
    /// An earlier run rejected the same record (same source reference and
    /// raw text).
    pub known: bool,
}

/// RFC 3339 in UTC with milliseconds: the bookkeeping tables' time format.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a checkpoint given on the command line: an integer, else text.
pub fn parse_checkpoint_arg(text: &str) -> Value {
    match text.parse::<i64>() {
        Ok(i) => Value::from(i),
        Err(_) => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_rejects_fail_the_run_and_keep_the_checkpoint() {
        let finish = Finish {
            prior: RunStats {
                read: 5,
                rejected: 2,
                ..Default::default()
            },
            max_rejects: Some(2),
            checkpoint: Some(Value::from(9)),
        };
        let ok = finish.resolve(RunStats::default());
        assert_eq!(ok.status, RunStatus::SucceededWithRejects);
        assert_eq!(ok.checkpoint, Some(Value::from(9)));
        let failed = finish.resolve(RunStats {
            read: 1,
            rejected: 1,
            ..Default::default()
        });
        assert_eq!(failed.status, RunStatus::Failed);
        assert_eq!(failed.checkpoint, None);
    }

    #[test]
    fn a_running_run_without_its_lock_is_shown_as_died() {
        let me = LockHolder::this_process("r");
        let running = || "running".to_string();
        assert_eq!(status_shown(running(), None), "died");
        assert_eq!(
            status_shown(running(), Some((me.host.clone(), me.pid))),
            "running"
        );
        // A pid above Linux's pid_max never exists.
        assert_eq!(
            status_shown(running(), Some((me.host.clone(), 4_194_305))),
            "died"
        );
        assert_eq!(
            status_shown(running(), Some(("another-host".into(), 4_194_305))),
            "running"
        );
        assert_eq!(status_shown("succeeded".into(), None), "succeeded");
    }
}
