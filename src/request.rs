//! Requests of the ingest endpoint (`idemload serve`) as the bookkeeping
//! sees them: the `_idemload_requests` row that makes one HTTP request land
//! exactly once.
//!
//! A request's key is *claimed*, then its records are written through the
//! one commit path with a [`RequestEntry`]; the transaction marks the row
//! `done` with the response it will send, in the same transaction as the
//! rows. Where the claim lives depends on the destination:
//!
//! - SQLite and MySQL/MariaDB claim first, in a short transaction of its
//!   own (the row inserted as `processing`, the primary key `(pipeline,
//!   key)` letting exactly one process win); the request's transaction
//!   fences on that claim. A request that dies before its commit leaves a
//!   claim whose lease runs out.
//! - PostgreSQL claims inside the request's own transaction
//!   ([`crate::destination::Destination::claims_in_transaction`]): a
//!   transaction-scoped advisory lock on the key, then a read of its row
//!   ([`Landed`] says what answered a request that was not written). A
//!   request that dies leaves nothing: its lock goes with its connection.
//!
//! This file sits below `destination`, which writes the rows, and `serve`,
//! which speaks HTTP.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

use crate::record::{Reject, SourceRef};
use crate::state::LockHolder;
use crate::stats::{RunStats, RunStatus};

/// The bookkeeping table of `serve`.
pub const REQUESTS_TABLE: &str = "_idemload_requests";

/// `status` of a claimed request not yet committed.
pub const PROCESSING: &str = "processing";
/// `status` of a committed request (its response stored).
pub const DONE: &str = "done";

/// What commits with a request's rows: the claim it fences on and the
/// response it stores.
#[derive(Debug, Clone)]
pub struct RequestEntry {
    pub pipeline: String,
    /// The `Idempotency-Key`.
    pub key: String,
    /// This attempt's claim token (also the run id its rejects carry).
    pub claim: String,
    /// SHA-256 of the body, lowercase hex.
    pub digest: String,
    /// The process writing it (host, pid), as its row records.
    pub host: String,
    pub pid: i64,
    /// How long the key is kept once done.
    pub retention: Duration,
    /// The response stored with the request, once the commit path made it
    /// (read after a successful commit).
    pub answered: Arc<OnceLock<String>>,
}

impl RequestEntry {
    /// The response body stored with the request and sent (again, on a
    /// replay): the batch's stats and each rejected record's index and
    /// reason.
    pub fn response(&self, stats: &RunStats, rejects: &[Reject]) -> String {
        #[derive(Serialize)]
        struct RejectShown<'a> {
            index: Option<u64>,
            reason: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Response<'a> {
            pipeline: &'a str,
            idempotency_key: &'a str,
            request_id: &'a str,
            status: RunStatus,
            #[serde(flatten)]
            stats: &'a RunStats,
            rejects: Vec<RejectShown<'a>>,
        }
        let mut shown: Vec<RejectShown<'_>> = rejects
            .iter()
            .map(|r| RejectShown {
                index: record_index(&r.source),
                reason: &r.reason,
                key: r.key.as_deref(),
            })
            .collect();
        shown.sort_by_key(|r| r.index);
        let status = if stats.rejected > 0 {
            RunStatus::SucceededWithRejects
        } else {
            RunStatus::Succeeded
        };
        serde_json::to_string(&Response {
            pipeline: &self.pipeline,
            idempotency_key: &self.key,
            request_id: &self.claim,
            status,
            stats,
            rejects: shown,
        })
        .unwrap_or_default()
    }

    /// Milliseconds since the epoch when a done key may be forgotten.
    pub fn expires_at(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(self.retention.as_millis().min(i64::MAX as u128) as i64)
    }
}

/// The source reference of the `index`-th record (0-based) of the request
/// with `key`: `request KEY:LINE`, LINE 1-based as in a file.
pub fn record_ref(key: &str, index: u64) -> SourceRef {
    SourceRef::Line {
        path: Arc::from(format!("request {key}")),
        line: index + 1,
    }
}

/// The record index (0-based) a request's source reference names.
fn record_index(source: &SourceRef) -> Option<u64> {
    match source {
        SourceRef::Line { line, .. } if *line > 0 => Some(line - 1),
        _ => None,
    }
}

/// An attempt to claim a key.
#[derive(Debug, Clone)]
pub struct Claim {
    pub pipeline: String,
    pub key: String,
    /// This attempt's token.
    pub claim: String,
    /// SHA-256 of the body, lowercase hex.
    pub digest: String,
    pub host: String,
    pub pid: i64,
    /// When the claim frees itself if not committed (ms since the epoch).
    pub lease_until: i64,
}

/// A stored `_idemload_requests` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub digest: String,
    /// [`PROCESSING`] or [`DONE`].
    pub status: String,
    pub response: Option<String>,
    pub claim: String,
    pub host: String,
    pub pid: i64,
    /// Lease end (processing) or retention end (done), ms since the epoch.
    pub expires_at: i64,
}

impl StoredRequest {
    /// Whether this row answers another attempt at its key without
    /// processing it: a done request within its retention, or a claim
    /// whose lease is live and whose holder is not known to be dead. Any
    /// other row (a lease or retention that ran out, a dead holder) may be
    /// taken over.
    pub fn settles(&self, now_ms: i64) -> bool {
        self.expires_at >= now_ms
            && (self.status == DONE || (self.status == PROCESSING && !self.holder_died()))
    }

    /// A claim held by a process of this host that no longer exists.
    fn holder_died(&self) -> bool {
        LockHolder {
            run_id: self.claim.clone(),
            host: self.host.clone(),
            pid: u32::try_from(self.pid).unwrap_or(u32::MAX),
            since: chrono::Utc::now(),
        }
        .is_dead_local_process()
    }
}

/// How a request's transaction left it.
#[derive(Debug)]
pub enum Landed {
    /// Its rows and its response committed.
    Written(RunStats),
    /// Another attempt at its key is being processed right now.
    Busy,
    /// The row stored under its key answers it (see
    /// [`StoredRequest::settles`]); nothing was written.
    Stored(StoredRequest),
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_names_each_reject_by_its_index() {
        let entry = RequestEntry {
            pipeline: "p".into(),
            key: "k1".into(),
            claim: "c".into(),
            digest: "d".into(),
            host: "h".into(),
            pid: 1,
            retention: Duration::from_secs(1),
            answered: Default::default(),
        };
        let stats = RunStats {
            read: 3,
            inserted: 1,
            rejected: 2,
            ..Default::default()
        };
        let rejects = vec![
            Reject::new(record_ref("k1", 2), "missing key field \"id\"", "{}"),
            Reject::new(record_ref("k1", 0), "not a JSON object", "1"),
        ];
        let v: serde_json::Value = serde_json::from_str(&entry.response(&stats, &rejects)).unwrap();
        assert_eq!(v["status"], "succeeded_with_rejects");
        assert_eq!(v["inserted"], 1);
        assert_eq!(v["rejects"][0]["index"], 0);
        assert_eq!(v["rejects"][1]["index"], 2);
        assert_eq!(v["rejects"][1]["reason"], "missing key field \"id\"");
    }
}
