//! The writeback ledger: record key -> remote id and content hash.
//!
//! A row is committed after each confirmed write, so a re-run sends nothing
//! for unchanged records, updates changed ones by remote id without a
//! lookup, and after a crash resends at most the writes that were in flight.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};

use crate::destination::sqlite::books::connect;
use crate::destination::sqlite::worker::blocking;
use crate::error::{Error, Result};

/// What the ledger knows of a record.
#[derive(Debug, Clone)]
pub struct Entry {
    pub remote_id: String,
    pub content_hash: String,
}

#[derive(Clone)]
pub struct Ledger {
    conn: Arc<Mutex<Connection>>,
    pipeline: Arc<str>,
}

impl Ledger {
    pub fn open(path: &Path, pipeline: &str) -> Result<Ledger> {
        let conn = connect(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS _idemload_ledger (
                 pipeline TEXT NOT NULL, record_key TEXT NOT NULL, remote_id TEXT NOT NULL,
                 content_hash TEXT NOT NULL, written_at TEXT NOT NULL,
                 PRIMARY KEY (pipeline, record_key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS _idemload_budget (
                 pipeline TEXT PRIMARY KEY, day TEXT NOT NULL, used INTEGER NOT NULL);",
        )?;
        Ok(Ledger {
            conn: Arc::new(Mutex::new(conn)),
            pipeline: pipeline.into(),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &str) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (conn, pipeline) = (self.conn.clone(), self.pipeline.clone());
        blocking(move || {
            let conn = conn
                .lock()
                .map_err(|_| Error::destination("ledger", "poisoned"))?;
            f(&conn, &pipeline).map_err(|e| Error::destination("ledger", e))
        })
        .await
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let key = key.to_string();
        self.with(move |c, p| {
            c.prepare_cached("SELECT remote_id, content_hash FROM _idemload_ledger WHERE pipeline = ?1 AND record_key = ?2")?
                .query_row(params![p, key], |r| {
                    Ok(Entry {
                        remote_id: r.get(0)?,
                        content_hash: r.get(1)?,
                    })
                })
                .optional()
        })
        .await
    }

    pub async fn put(&self, key: &str, remote_id: &str, content_hash: &str) -> Result<()> {
        let (key, id, hash) = (
            key.to_string(),
            remote_id.to_string(),
            content_hash.to_string(),
        );
        self.with(move |c, p| {
            c.prepare_cached(
                "INSERT INTO _idemload_ledger (pipeline, record_key, remote_id, content_hash, written_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (pipeline, record_key) DO UPDATE SET remote_id = excluded.remote_id,
                     content_hash = excluded.content_hash, written_at = excluded.written_at",
            )?
            .execute(params![p, key, id, hash, Utc::now().to_rfc3339()])
            .map(|_| ())
        })
        .await
    }

    /// Takes one request from today's budget of `per_day` (UTC days);
    /// `false` when today's is spent. Counted before the request is sent,
    /// so a crash can only make the count too high, never too low.
    pub async fn spend(&self, per_day: u64) -> Result<bool> {
        let today = Utc::now().date_naive().to_string();
        self.with(move |c, p| {
            let tx = c.unchecked_transaction()?;
            tx.prepare_cached(
                "INSERT INTO _idemload_budget (pipeline, day, used) VALUES (?1, ?2, 0)
                 ON CONFLICT (pipeline) DO UPDATE SET
                     used = CASE WHEN day = excluded.day THEN used ELSE 0 END,
                     day = excluded.day",
            )?
            .execute(params![p, today])?;
            let taken = tx
                .prepare_cached(
                    "UPDATE _idemload_budget SET used = used + 1 WHERE pipeline = ?1 AND used < ?2",
                )?
                .execute(params![p, per_day as i64])?;
            tx.commit()?;
            Ok(taken == 1)
        })
        .await
    }

    pub async fn remove(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.with(move |c, p| {
            c.execute(
                "DELETE FROM _idemload_ledger WHERE pipeline = ?1 AND record_key = ?2",
                params![p, key],
            )
            .map(|_| ())
        })
        .await
    }
}
