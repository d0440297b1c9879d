//! Reading a batch's stored rows ahead, on a second connection.
//!
//! An identical re-run spends most of each batch's write waiting for the
//! stored versions of its keys. Once the next batch is planned (while the
//! current one is written), its stored rows are read on a connection of
//! their own, so the next write finds them ready.
//!
//! Such a read may come before the current batch commits, so it is trusted
//! only for keys the run has not written: a key the run wrote (in this batch
//! or an earlier one) is merged as usual. A change of the table's columns
//! between the read and the write discards it. Nothing here takes a lock
//! a write waits for: the write collects the read before its transaction
//! starts.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use serde_json::Value;
use tokio::sync::{oneshot, OnceCell};
use tokio_postgres::Client;

use crate::connect::postgres::PgConfig;

use super::copy::StoredRows;
use crate::batch::{PlannedBatch, Row};
use crate::destination::seen::KeyFilter;
use crate::destination::sql::{column_list, quote};
use crate::destination::Lookahead;
use crate::error::{Error, Result};

/// What reading a batch's stored rows needs to know of the table (for a
/// read ahead: as the last write saw it).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Shape {
    /// The qualified table.
    pub table: String,
    /// Its columns' names and types, in order.
    pub columns: Vec<(String, String)>,
    /// The position of the single `bigint` key.
    pub key_at: usize,
}

impl Shape {
    /// The `SELECT` of the stored rows with these keys, all the columns in
    /// order: a range scan of the key's index when the keys are dense, else
    /// one probe per key. `None` for no keys.
    pub(super) fn select(&self, keys: &[i64]) -> Option<String> {
        let key = quote(&self.columns[self.key_at].0);
        let filter = match KeyFilter::of(keys)? {
            KeyFilter::Range(lo, hi) => format!("{key} BETWEEN {lo} AND {hi}"),
            KeyFilter::List(list) => format!("{key} = ANY ('{{{list}}}'::bigint[])"),
        };
        let names: Vec<&str> = self.columns.iter().map(|(n, _)| n.as_str()).collect();
        Some(format!(
            "SELECT {} FROM {} WHERE {filter}",
            column_list(&names),
            self.table
        ))
    }
}

/// At most this many keys are looked up by [`Shape::probe`]; more by a
/// COPY of [`Shape::select`] (streamed, one range scan when dense).
pub(super) const PROBE_MAX: usize = 1000;

impl Shape {
    /// The `SELECT` of the stored rows whose key is in the `bigint[]` `$1`,
    /// all the columns in order: one text per table shape, so a connection
    /// prepares it once and each lookup is one round trip without a parse.
    pub(super) fn probe(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "SELECT {} FROM {} WHERE {} = ANY ($1::bigint[])",
            column_list(&names),
            self.table,
            quote(&self.columns[self.key_at].0)
        )
    }
}

/// A read started for a batch: its keys, the shape it read with.
pub(super) struct Pending {
    keys: Vec<i64>,
    shape: Shape,
    result: oneshot::Receiver<Result<BytesMut>>,
}

impl Pending {
    /// The keys, the shape and the rows read, or `None` when the read
    /// failed (the write then reads them itself).
    pub(super) async fn rows(self) -> Option<(Vec<i64>, Shape, StoredRows)> {
        let rows = match self.result.await {
            Ok(data) => data.and_then(|data| StoredRows::index(data, self.shape.key_at)),
            Err(_) => return None,
        };
        match rows {
            Ok(rows) => Some((self.keys, self.shape, rows)),
            Err(e) => {
                tracing::debug!(error = %e, "Reading ahead failed; the batch reads its stored rows itself.");
                None
            }
        }
    }
}

/// Shared by the destination (which sets the shape and takes the reads)
/// and the run's [`Lookahead`] (which starts them).
pub(super) struct Ahead {
    config: PgConfig,
    client: OnceCell<Option<Arc<Client>>>,
    shape: Mutex<Option<Shape>>,
    pending: Mutex<Option<Pending>>,
}

impl Ahead {
    pub(super) fn new(config: PgConfig) -> Arc<Ahead> {
        Arc::new(Ahead {
            config,
            client: OnceCell::new(),
            shape: Mutex::new(None),
            pending: Mutex::new(None),
        })
    }

    /// The shape batches are read ahead with; `None` stops reading ahead.
    pub(super) fn set_shape(&self, shape: Option<Shape>) {
        *self.shape.lock().unwrap_or_else(|p| p.into_inner()) = shape;
    }

    /// The read started for the batch about to be written, if any.
    pub(super) fn take(&self) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The second connection, made on first use; `None` when it cannot be.
    async fn client(&self) -> Option<Arc<Client>> {
        self.client
            .get_or_init(|| async {
                match self.config.connect().await {
                    Ok((client, _)) => Some(Arc::new(client)),
                    Err(e) => {
                        tracing::info!(error = %e, "No second connection to read batches ahead; each batch reads its stored rows itself.");
                        None
                    }
                }
            })
            .await
            .clone()
    }
}

/// The run's handle on [`Ahead`].
pub(super) struct ReadAhead(pub Arc<Ahead>);

impl Lookahead for ReadAhead {
    fn planned(&self, batch: &PlannedBatch) {
        let Some(shape) = self
            .0
            .shape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let keys: Vec<i64> = stored_keys(&batch.rows).collect();
        let Some(select) = shape.select(&keys) else {
            return;
        };
        let (tx, result) = oneshot::channel();
        let ahead = self.0.clone();
        // Allocated (and freed) by the thread that writes the batches, which
        // reuses the memory batch after batch.
        let data = BytesMut::with_capacity(keys.len() * 288);
        tokio::spawn(async move {
            let rows = match ahead.client().await {
                Some(client) => {
                    let copy = StoredRows::copy(&select);
                    StoredRows::collect(client.copy_out(&copy), data).await
                }
                None => Err(Error::destination("reading ahead", "no connection")),
            };
            let _ = tx.send(rows);
        });
        *self.0.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Pending {
            keys,
            shape,
            result,
        });
    }
}

/// The keys whose stored rows a batch compares with: the single integer
/// keys of the rows that do not delete.
pub(super) fn stored_keys(rows: &[Row]) -> impl Iterator<Item = i64> + '_ {
    rows.iter().filter(|r| !r.delete).filter_map(int_key)
}

/// A single integer key as its `bigint` column holds it (7.0 is 7; a key
/// that does not fit the column has none, and is rejected with its row).
pub(super) fn int_key(row: &Row) -> Option<i64> {
    row.key.values().first().and_then(Value::as_i64)
}
