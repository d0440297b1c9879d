//! RunStats: what a run did, record by record.
//!
//! Nothing is silently lost: every run keeps the identity
//! `read = inserted + updated + unchanged + deleted + skipped + duplicates +
//! rejected + deferred`, where `deleted` counts rows deleted by a record
//! (`delete_field`) and `deferred` the records an HTTP destination left for
//! the next run because its daily request budget was spent.
//! In `replace` and `window` modes rows that the load no longer contains are
//! removed too: they are counted in `removed` only, which is not part of the
//! identity because no record was read for them.

use serde::{Deserialize, Serialize};

/// Counts of one run (or one batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStats {
    pub read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    /// Rows removed because a `replace`/`window` load no longer holds them:
    /// no record was read for them, so they are outside the identity and
    /// not in `deleted`.
    #[serde(default)]
    pub removed: u64,
    pub skipped: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// HTTP destinations: records not written because the day's request
    /// budget (`requests_per_day`) is spent; the next run writes them.
    #[serde(default)]
    pub deferred: u64,
    /// Rejects an earlier run already recorded (same source reference, same
    /// raw record): counted in `rejected` too, but alone they give exit 0.
    #[serde(default)]
    pub known_rejects: u64,
    /// File sources: files an earlier run loaded completely and that have
    /// not changed since, left unread (not records: outside the identity).
    #[serde(default)]
    pub files_skipped: u64,
    /// HTTP destinations: records looked up through the API.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub looked_up_api: u64,
    /// HTTP destinations: records found in `lookup_table` (no API call).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub looked_up_table: u64,
    /// HTTP destinations: requests sent, retries included.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub api_requests: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RunStats {
    /// The right-hand side of the accounting identity.
    pub fn accounted(&self) -> u64 {
        self.inserted
            + self.updated
            + self.unchanged
            + self.deleted
            + self.skipped
            + self.duplicates
            + self.rejected
            + self.deferred
    }

    /// True when every record read is accounted for.
    pub fn is_balanced(&self) -> bool {
        self.read == self.accounted()
    }

    /// Did the run change the destination?
    pub fn changed_anything(&self) -> bool {
        self.inserted + self.updated + self.deleted + self.removed > 0
    }
}

impl std::ops::AddAssign for RunStats {
    fn add_assign(&mut self, o: RunStats) {
        self.read += o.read;
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.deleted += o.deleted;
        self.removed += o.removed;
        self.skipped += o.skipped;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        self.deferred += o.deferred;
        self.known_rejects += o.known_rejects;
        self.files_skipped += o.files_skipped;
        self.looked_up_api += o.looked_up_api;
        self.looked_up_table += o.looked_up_table;
        self.api_requests += o.api_requests;
    }
}

impl std::ops::Add for RunStats {
    type Output = RunStats;
    fn add(mut self, o: RunStats) -> RunStats {
        self += o;
        self
    }
}

impl std::fmt::Display for RunStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {}, inserted {}, updated {}, unchanged {}, deleted {}, skipped {}, duplicates {}, rejected {}",
            self.read,
            self.inserted,
            self.updated,
            self.unchanged,
            self.deleted,
            self.skipped,
            self.duplicates,
            self.rejected
        )?;
        if self.deferred > 0 {
            write!(f, ", deferred {}", self.deferred)?;
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    /// Finished; some records were rejected (exit 4).
    SucceededWithRejects,
    Failed,
    /// Stopped on request (SIGINT, SIGTERM, a library user's stop) between
    /// batches: what it committed stays, and running again resumes.
    Interrupted,
    /// The process ended without finishing the run (killed, power lost):
    /// recorded by the run that took its lock over.
    Died,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::SucceededWithRejects => "succeeded_with_rejects",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Died => "died",
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "succeeded" => RunStatus::Succeeded,
            "succeeded_with_rejects" => RunStatus::SucceededWithRejects,
            "running" => RunStatus::Running,
            "interrupted" => RunStatus::Interrupted,
            "died" => RunStatus::Died,
            _ => RunStatus::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_leaves_removed_rows_out() {
        let s = RunStats {
            read: 10,
            inserted: 3,
            updated: 2,
            unchanged: 1,
            deleted: 1,
            removed: 4,
            skipped: 1,
            duplicates: 1,
            rejected: 1,
            ..Default::default()
        };
        assert!(s.is_balanced());
        assert!(!RunStats {
            read: 1,
            ..Default::default()
        }
        .is_balanced());
    }
}
