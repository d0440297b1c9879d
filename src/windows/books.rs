//! A window as the bookkeeping keeps it: one row of `_idemload_windows` per
//! pipeline and window, claimed with a lease by one worker at a time and
//! marked `done` in the transaction of the window's last batch.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::Window;
use crate::state::LockHolder;
use crate::stats::RunStats;

/// The windows table of the spec.
pub const WINDOWS_TABLE: &str = "_idemload_windows";

/// Where a window stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowStatus {
    Pending,
    Running,
    Done,
    Failed,
}

impl WindowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowStatus::Pending => "pending",
            WindowStatus::Running => "running",
            WindowStatus::Done => "done",
            WindowStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> WindowStatus {
        match text {
            "running" => WindowStatus::Running,
            "done" => WindowStatus::Done,
            "failed" => WindowStatus::Failed,
            _ => WindowStatus::Pending,
        }
    }
}

/// One row of `_idemload_windows`.
#[derive(Debug, Clone, Serialize)]
pub struct WindowRow {
    pub start: String,
    pub end: String,
    #[serde(skip)]
    pub position: i64,
    pub status: WindowStatus,
    pub run_id: Option<String>,
    pub host: Option<String>,
    pub pid: Option<u32>,
    /// Milliseconds since the epoch; `--json` shows it as RFC 3339
    /// (`lease_expires_at`).
    #[serde(rename = "lease_expires_at", serialize_with = "lease_text")]
    pub lease_expires: Option<i64>,
    pub stats: Option<Value>,
    pub error: Option<String>,
    pub finished_at: Option<String>,
}

fn lease_text<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    ms.and_then(ms_text).serialize(s)
}

impl WindowRow {
    /// When the claim's lease runs out, in RFC 3339.
    pub fn lease_expires_at(&self) -> Option<String> {
        self.lease_expires.and_then(ms_text)
    }

    /// A running window whose worker is gone: its lease ran out, or it was
    /// a process of this host that no longer exists.
    pub fn abandoned(&self, now_ms: i64) -> bool {
        if self.status != WindowStatus::Running {
            return false;
        }
        if self.lease_expires.is_none_or(|e| e < now_ms) {
            return true;
        }
        match (&self.host, self.pid) {
            (Some(host), Some(pid)) => LockHolder {
                run_id: String::new(),
                host: host.clone(),
                pid,
                since: chrono::Utc::now(),
            }
            .is_dead_local_process(),
            _ => false,
        }
    }

    /// The window's stats, when it finished.
    pub fn run_stats(&self) -> Option<RunStats> {
        self.stats
            .as_ref()
            .and_then(|s| serde_json::from_value(s.clone()).ok())
    }
}

/// Who claims windows, for how long.
#[derive(Debug, Clone)]
pub struct WindowClaim {
    pub pipeline: String,
    pub holder: LockHolder,
    pub lease: Duration,
}

/// A claimed window as a batch commits it: the batch fences on the claim
/// (its run id still holds the window, running) instead of the run lock,
/// and the last batch marks the window done.
#[derive(Debug, Clone)]
pub struct WindowEntry {
    pub pipeline: String,
    pub window: Window,
    /// The run that holds the window (its claim).
    pub run_id: String,
    pub lease: Duration,
}

impl WindowEntry {
    pub fn start(&self) -> String {
        self.window.start_text()
    }

    pub fn end(&self) -> String {
        self.window.end_text()
    }

    /// Ok when the statement that fenced or finished the window touched
    /// its row (`rows` = 1); else the window was taken over: the batch
    /// fails with [`crate::Error::WindowLost`].
    pub fn held(&self, rows: u64) -> crate::Result<()> {
        if rows == 1 {
            return Ok(());
        }
        Err(crate::Error::WindowLost {
            pipeline: self.pipeline.clone(),
            start: self.start(),
            end: self.end(),
        })
    }
}

/// A lease expiry (milliseconds since the epoch) as RFC 3339.
fn ms_text(ms: i64) -> Option<String> {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).map(crate::state::format_time)
}
