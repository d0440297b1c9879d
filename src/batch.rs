//! Batches: what the planner hands a destination.
//!
//! A [`PlannedBatch`] holds one [`Row`] per key (the version that won), the
//! records rejected while planning, and the batch's counts so far. It sits
//! below both the pipeline that makes it and the destinations that write it.

use crate::key::{Cursor, Key};
use crate::record::{Fields, Reject, SourceRef};
use crate::stats::RunStats;

/// One row to write: a record that passed the checks, with its key.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Key,
    /// The record's fields (with `_idemload_key` first for hash keys, without
    /// the delete field).
    pub fields: Fields,
    pub cursor: Option<Cursor>,
    /// `delete_field` was true: delete the row with this key.
    pub delete: bool,
    pub source: SourceRef,
}

impl Row {
    /// The reject this row becomes when a value does not fit its column.
    pub fn reject(&self, reason: impl Into<String>) -> Reject {
        Reject {
            source: self.source.clone(),
            key: Some(self.key.to_string()),
            raw: serde_json::to_string(&self.fields).unwrap_or_default(),
            reason: reason.into(),
        }
    }
}

/// A batch ready for a destination.
#[derive(Debug, Default)]
pub struct PlannedBatch {
    /// One row per key, in first-seen order.
    pub rows: Vec<Row>,
    pub rejects: Vec<Reject>,
    /// read, skipped, duplicates and rejected so far; the destination adds
    /// the rest.
    pub stats: RunStats,
    /// Greatest cursor among the rows (and their superseded versions).
    pub max_cursor: Option<Cursor>,
    /// A key, cursor or window field no record of the batch carries (with
    /// the fields the first record has): on a run's first batch, a wrong
    /// field name rather than bad records.
    pub absent: Option<AbsentField>,
    /// Files whose last record is in this batch (or before): logged as
    /// loaded in the batch's transaction.
    pub files: Vec<crate::files::LoadedFile>,
}

/// See [`PlannedBatch::absent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsentField {
    /// `key`, `cursor` or `window`.
    pub role: &'static str,
    pub field: String,
    /// The fields the batch's first record has.
    pub present: Vec<String>,
}
