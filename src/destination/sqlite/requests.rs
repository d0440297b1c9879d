//! SQLite's `_idemload_requests`: the claims and stored responses of
//! `idemload serve` (see `crate::request`).
//!
//! SQLite has one writer at a time, so a claim (`INSERT OR IGNORE`), a
//! takeover (an `UPDATE` naming the claim and status it saw) and the
//! request's batch (fence, rows, done) are each atomic against every other
//! process that opens the file.

use rusqlite::{params, Connection, OptionalExtension};

use crate::destination::sql::quote;
use crate::error::{Error, Result};
use crate::request::{
    now_ms, Claim, RequestEntry, StoredRequest, DONE, PROCESSING, REQUESTS_TABLE,
};
use crate::state::format_time;

/// Creates `_idemload_requests` when missing, and the temporary tables a
/// request's key set may use.
pub(super) fn create_table(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {t} (
             pipeline TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL,
             status TEXT NOT NULL, response TEXT, claim TEXT NOT NULL,
             host TEXT NOT NULL, pid INTEGER NOT NULL,
             created_at TEXT NOT NULL, expires_at INTEGER NOT NULL,
             PRIMARY KEY (pipeline, key));
         CREATE INDEX IF NOT EXISTS {i} ON {t} (pipeline, expires_at);
         CREATE TEMP TABLE IF NOT EXISTS _idemload_run_keys (k TEXT PRIMARY KEY) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS _idemload_run_ints (k INTEGER PRIMARY KEY);",
        t = quote(REQUESTS_TABLE),
        i = quote("_idemload_requests_expires"),
    ))?;
    Ok(())
}

/// Empties the temporary key set before a request: each request counts its
/// duplicates on its own.
pub(super) fn reset_run_keys(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "DELETE FROM temp._idemload_run_keys; DELETE FROM temp._idemload_run_ints;",
    )?;
    Ok(())
}

pub(super) fn stored(
    conn: &Connection,
    pipeline: &str,
    key: &str,
) -> Result<Option<StoredRequest>> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT digest, status, response, claim, host, pid, expires_at
                 FROM {} WHERE pipeline = ?1 AND key = ?2",
                quote(REQUESTS_TABLE)
            ),
            params![pipeline, key],
            |r| {
                Ok(StoredRequest {
                    digest: r.get(0)?,
                    status: r.get(1)?,
                    response: r.get(2)?,
                    claim: r.get(3)?,
                    host: r.get(4)?,
                    pid: r.get(5)?,
                    expires_at: r.get(6)?,
                })
            },
        )
        .optional()?)
}

pub(super) fn insert_claim(conn: &Connection, c: &Claim) -> Result<bool> {
    let n = conn.execute(
        &format!(
            "INSERT OR IGNORE INTO {} (pipeline, key, digest, status, claim, host, pid, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            quote(REQUESTS_TABLE)
        ),
        params![
            c.pipeline,
            c.key,
            c.digest,
            PROCESSING,
            c.claim,
            c.host,
            c.pid,
            format_time(chrono::Utc::now()),
            c.lease_until
        ],
    )?;
    Ok(n == 1)
}

pub(super) fn take_over(conn: &Connection, c: &Claim, from: &str, status: &str) -> Result<bool> {
    let n = conn.execute(
        &format!(
            "UPDATE {} SET digest = ?3, status = ?4, response = NULL, claim = ?5, host = ?6,
                 pid = ?7, created_at = ?8, expires_at = ?9
             WHERE pipeline = ?1 AND key = ?2 AND claim = ?10 AND status = ?11",
            quote(REQUESTS_TABLE)
        ),
        params![
            c.pipeline,
            c.key,
            c.digest,
            PROCESSING,
            c.claim,
            c.host,
            c.pid,
            format_time(chrono::Utc::now()),
            c.lease_until,
            from,
            status
        ],
    )?;
    Ok(n == 1)
}

pub(super) fn release(conn: &Connection, pipeline: &str, key: &str, claim: &str) -> Result<()> {
    conn.execute(
        &format!(
            "DELETE FROM {} WHERE pipeline = ?1 AND key = ?2 AND claim = ?3 AND status = ?4",
            quote(REQUESTS_TABLE)
        ),
        params![pipeline, key, claim, PROCESSING],
    )?;
    Ok(())
}

pub(super) fn expire(conn: &Connection, pipeline: &str, now: i64) -> Result<u64> {
    Ok(conn.execute(
        &format!(
            "DELETE FROM {} WHERE pipeline = ?1 AND expires_at < ?2",
            quote(REQUESTS_TABLE)
        ),
        params![pipeline, now],
    )? as u64)
}

/// Inside the batch transaction: the claim is still this attempt's.
pub(super) fn fence(conn: &Connection, r: &RequestEntry) -> Result<()> {
    let n = conn.execute(
        &format!(
            "UPDATE {} SET expires_at = expires_at
             WHERE pipeline = ?1 AND key = ?2 AND claim = ?3 AND status = ?4",
            quote(REQUESTS_TABLE)
        ),
        params![r.pipeline, r.key, r.claim, PROCESSING],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(Error::RequestLost { key: r.key.clone() })
    }
}

/// Inside the batch transaction: the request is done, with its response.
pub(super) fn finish(conn: &Connection, r: &RequestEntry, response: &str) -> Result<()> {
    let n = conn.execute(
        &format!(
            "UPDATE {} SET status = ?4, response = ?5, expires_at = ?6
             WHERE pipeline = ?1 AND key = ?2 AND claim = ?3",
            quote(REQUESTS_TABLE)
        ),
        params![
            r.pipeline,
            r.key,
            r.claim,
            DONE,
            response,
            r.expires_at(now_ms())
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(Error::RequestLost { key: r.key.clone() })
    }
}
