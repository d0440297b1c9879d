//! `_idemload_windows` in SQLite (see [`crate::windows`]): one writer at a
//! time, so a claim is a conditional update in its own transaction.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::destination::sql::quote;
use crate::error::Result;
use crate::state::format_time;
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus, WINDOWS_TABLE};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn table() -> String {
    quote(WINDOWS_TABLE)
}

/// Makes the table when missing and adds the windows it lacks as pending.
pub(super) fn add(conn: &mut Connection, pipeline: &str, windows: &[Window]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {t} (
             pipeline TEXT NOT NULL, window_start TEXT NOT NULL, window_end TEXT NOT NULL,
             position INTEGER NOT NULL, status TEXT NOT NULL, run_id TEXT, host TEXT, pid INTEGER,
             lease_expires INTEGER, stats TEXT, error TEXT, finished_at TEXT,
             PRIMARY KEY (pipeline, window_start, window_end));
         CREATE INDEX IF NOT EXISTS {idx} ON {t} (pipeline, position);",
        t = table(),
        idx = quote("_idemload_windows_position"),
    ))?;
    {
        let mut stmt = tx.prepare(&format!(
            "INSERT INTO {} (pipeline, window_start, window_end, position, status)
             VALUES (?1, ?2, ?3, ?4, 'pending') ON CONFLICT DO NOTHING",
            table()
        ))?;
        for w in windows {
            stmt.execute(params![pipeline, w.start_text(), w.end_text(), w.position])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The pipeline's windows (with a position in `range`), in order; none when
/// no backfill ran.
pub(super) fn list(
    conn: &Connection,
    pipeline: &str,
    range: Option<(i64, i64)>,
    open_only: bool,
) -> Result<Vec<WindowRow>> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [WINDOWS_TABLE],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    let (low, high) = range.unwrap_or((i64::MIN, i64::MAX));
    let mut stmt = conn.prepare(&format!(
        "SELECT window_start, window_end, position, status, run_id, host, pid, lease_expires,
                stats, error, finished_at
         FROM {} WHERE pipeline = ?1 AND position >= ?2 AND position < ?3
           AND (?4 = 0 OR status <> 'done')
         ORDER BY position, window_end",
        table()
    ))?;
    let rows = stmt.query_map(params![pipeline, low, high, open_only], |r| {
        let stats: Option<String> = r.get(8)?;
        let lease: Option<i64> = r.get(7)?;
        Ok(WindowRow {
            start: r.get(0)?,
            end: r.get(1)?,
            position: r.get(2)?,
            status: WindowStatus::parse(&r.get::<_, String>(3)?),
            run_id: r.get(4)?,
            host: r.get(5)?,
            pid: r.get::<_, Option<i64>>(6)?.map(|p| p as u32),
            lease_expires: lease,
            stats: stats.and_then(|s| serde_json::from_str(&s).ok()),
            error: r.get(9)?,
            finished_at: r.get(10)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Claims `window` for `claim` if its row is still as `seen`.
pub(super) fn claim(
    conn: &mut Connection,
    claim: &WindowClaim,
    window: &Window,
    seen: &WindowRow,
) -> Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute(
        &format!(
            "UPDATE {} SET status = 'running', run_id = ?4, host = ?5, pid = ?6,
                 lease_expires = ?7, error = NULL
             WHERE pipeline = ?1 AND window_start = ?2 AND window_end = ?3
               AND status = ?8 AND run_id IS ?9",
            table()
        ),
        params![
            claim.pipeline,
            window.start_text(),
            window.end_text(),
            claim.holder.run_id,
            claim.holder.host,
            claim.holder.pid as i64,
            now_ms() + claim.lease.as_millis() as i64,
            seen.status.as_str(),
            seen.run_id,
        ],
    )?;
    tx.commit()?;
    Ok(n == 1)
}

/// Renews the leases of the windows `run_ids` hold.
pub(super) fn renew(
    conn: &Connection,
    pipeline: &str,
    run_ids: &[String],
    lease: std::time::Duration,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(&format!(
        "UPDATE {} SET lease_expires = ?3 WHERE pipeline = ?1 AND run_id = ?2 AND status = 'running'",
        table()
    ))?;
    for run_id in run_ids {
        stmt.execute(params![
            pipeline,
            run_id,
            now_ms() + lease.as_millis() as i64
        ])?;
    }
    Ok(())
}

/// Gives a window up: `pending` again (stopped) or `failed`, if `entry`
/// still holds it.
pub(super) fn release(
    conn: &Connection,
    entry: &WindowEntry,
    status: WindowStatus,
    error: Option<&str>,
    stats: Option<&RunStats>,
) -> Result<()> {
    let stats = stats.map(|s| serde_json::to_string(s).unwrap_or_default());
    let finished = (status == WindowStatus::Failed).then(|| format_time(chrono::Utc::now()));
    conn.execute(
        &format!(
            "UPDATE {} SET status = ?5, lease_expires = NULL, error = ?6,
                 stats = coalesce(?7, stats), finished_at = ?8
             WHERE pipeline = ?1 AND window_start = ?2 AND window_end = ?3 AND run_id = ?4
               AND status = 'running'",
            table()
        ),
        params![
            entry.pipeline,
            entry.start(),
            entry.end(),
            entry.run_id,
            status.as_str(),
            error,
            stats,
            finished
        ],
    )?;
    Ok(())
}

/// In a batch transaction: fails unless `entry` still holds its window,
/// and renews the lease.
pub(super) fn fence(conn: &Connection, entry: &WindowEntry) -> Result<()> {
    let n = conn.execute(
        &format!(
            "UPDATE {} SET lease_expires = ?5
             WHERE pipeline = ?1 AND window_start = ?2 AND window_end = ?3 AND run_id = ?4
               AND status = 'running'",
            table()
        ),
        params![
            entry.pipeline,
            entry.start(),
            entry.end(),
            entry.run_id,
            now_ms() + entry.lease.as_millis() as i64
        ],
    )?;
    entry.held(n as u64)
}

/// In the window's last batch transaction: marks it done with its stats.
pub(super) fn finish(conn: &Connection, entry: &WindowEntry, stats: &RunStats) -> Result<()> {
    let n = conn.execute(
        &format!(
            "UPDATE {} SET status = 'done', lease_expires = NULL, error = NULL, stats = ?5,
                 finished_at = ?6
             WHERE pipeline = ?1 AND window_start = ?2 AND window_end = ?3 AND run_id = ?4",
            table()
        ),
        params![
            entry.pipeline,
            entry.start(),
            entry.end(),
            entry.run_id,
            serde_json::to_string(stats).unwrap_or_default(),
            format_time(chrono::Utc::now())
        ],
    )?;
    entry.held(n as u64)
}
