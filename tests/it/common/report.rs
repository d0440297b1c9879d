//! The `--json` report of `load` and `run`, and the accounting identity.

use serde_json::Value;

/// The spec's `--json` object of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub raw: Value,
    pub status: String,
    pub read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub removed: u64,
    pub skipped: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Records an HTTP destination left for the next run (daily budget).
    pub deferred: u64,
    /// Files left unread because an earlier run loaded them and they have
    /// not changed.
    pub files_skipped: u64,
}

/// The fields the spec promises in every `--json` run report.
const SPEC_FIELDS: &[&str] = &[
    "pipeline",
    "run_id",
    "status",
    "read",
    "inserted",
    "updated",
    "unchanged",
    "deleted",
    "skipped",
    "duplicates",
    "rejected",
    "checkpoint_before",
    "checkpoint_after",
    "started_at",
    "finished_at",
    "duration_ms",
];

impl Report {
    /// Parses stdout (exactly one JSON object), checks the spec's fields and
    /// the accounting identity.
    #[track_caller]
    pub fn parse(stdout: &str, stderr: &str) -> Report {
        let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
        let (Some(line), None) = (lines.next(), lines.next()) else {
            panic!("stdout is not exactly one line of JSON\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        };
        let raw: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
        });
        if raw.get("run_id").is_some() {
            for field in SPEC_FIELDS {
                assert!(
                    raw.get(*field).is_some(),
                    "report lacks {field:?}: {raw}\n--- stderr ---\n{stderr}"
                );
            }
        }
        let report = Report::from_value(raw);
        if report.raw.get("read").is_some() {
            assert_balanced(&report);
        }
        report
    }

    /// From a JSON object with the counters (a report, or a run's stats).
    pub fn from_value(raw: Value) -> Report {
        let n = |f: &str| raw.get(f).and_then(Value::as_u64).unwrap_or(0);
        Report {
            status: raw
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            read: n("read"),
            inserted: n("inserted"),
            updated: n("updated"),
            unchanged: n("unchanged"),
            deleted: n("deleted"),
            removed: n("removed"),
            skipped: n("skipped"),
            duplicates: n("duplicates"),
            rejected: n("rejected"),
            deferred: n("deferred"),
            files_skipped: n("files_skipped"),
            raw,
        }
    }

    pub fn checkpoint_after(&self) -> Value {
        self.raw["checkpoint_after"].clone()
    }

    pub fn checkpoint_before(&self) -> Value {
        self.raw["checkpoint_before"].clone()
    }

    pub fn run_id(&self) -> &str {
        self.raw["run_id"].as_str().unwrap_or_default()
    }

    /// `(inserted, updated, unchanged, deleted)`, for compact assertions.
    pub fn changes(&self) -> (u64, u64, u64, u64) {
        (self.inserted, self.updated, self.unchanged, self.deleted)
    }
}

/// `read = inserted + updated + unchanged + deleted + skipped + duplicates
/// + rejected + deferred`: every record read is accounted for, in every mode (rows a
/// replace or window load removes are in `removed`, outside it).
#[track_caller]
pub fn assert_balanced(r: &Report) {
    let accounted = r.inserted
        + r.updated
        + r.unchanged
        + r.deleted
        + r.skipped
        + r.duplicates
        + r.rejected
        + r.deferred;
    assert_eq!(
        r.read, accounted,
        "accounting identity broken: read {} but inserted {} + updated {} + unchanged {} + deleted {} + skipped {} + duplicates {} + rejected {} + deferred {} = {}\n{}",
        r.read, r.inserted, r.updated, r.unchanged, r.deleted, r.skipped, r.duplicates, r.rejected, r.deferred, accounted, r.raw
    );
}
