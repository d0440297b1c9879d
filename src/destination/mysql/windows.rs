//! `_idemload_windows` in MySQL/MariaDB (see [`crate::windows`]). A claim
//! is a conditional update of the window's row (InnoDB reads the latest
//! committed row for it): of two workers that pick the same window one
//! wins; the batch fence updates the same row inside the batch transaction.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::Server;
use crate::destination::sql::quote_mysql as q;
use crate::error::{Error, Result};
use crate::state::format_time;
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus, WINDOWS_TABLE};

type R<T> = std::result::Result<T, mysql_async::Error>;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn books_error(e: mysql_async::Error) -> Error {
    Error::destination("mysql windows table", e)
}

pub(super) async fn add(
    conn: &mut Conn,
    server: &Server,
    pipeline: &str,
    windows: &[Window],
) -> Result<()> {
    async {
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 pipeline VARCHAR(255) NOT NULL, window_start VARCHAR(64) NOT NULL,
                 window_end VARCHAR(64) NOT NULL, position BIGINT NOT NULL,
                 status VARCHAR(16) NOT NULL, run_id VARCHAR(64) NULL, host VARCHAR(255) NULL,
                 pid BIGINT NULL, lease_expires BIGINT NULL, stats TEXT NULL, error TEXT NULL,
                 finished_at VARCHAR(40) NULL,
                 PRIMARY KEY (pipeline, window_start, window_end))
             ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {}",
            q(WINDOWS_TABLE),
            server.collation
        ))
        .await?;
        for chunk in windows.chunks(500) {
            let values = vec!["(?, ?, ?, ?, 'pending')"; chunk.len()].join(", ");
            let mut params: Vec<mysql_async::Value> = Vec::with_capacity(chunk.len() * 4);
            for w in chunk {
                params.push(pipeline.into());
                params.push(w.start_text().into());
                params.push(w.end_text().into());
                params.push(w.position.into());
            }
            conn.exec_drop(
                format!(
                    "INSERT IGNORE INTO {} (pipeline, window_start, window_end, position, status)
                     VALUES {values}",
                    q(WINDOWS_TABLE)
                ),
                params,
            )
            .await?;
        }
        R::Ok(())
    }
    .await
    .map_err(books_error)
}

pub(super) async fn list(
    conn: &mut Conn,
    pipeline: &str,
    range: Option<(i64, i64)>,
    open_only: bool,
) -> Result<Vec<WindowRow>> {
    async {
        let present: Option<i64> = conn
            .exec_first(
                "SELECT count(*) FROM information_schema.TABLES
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (WINDOWS_TABLE,),
            )
            .await?;
        if present.unwrap_or_default() == 0 {
            return Ok(Vec::new());
        }
        let (low, high) = range.unwrap_or((i64::MIN, i64::MAX));
        type Row = (
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = conn
            .exec(
                format!(
                    "SELECT window_start, window_end, position, status, run_id, host, pid,
                            lease_expires, stats, error, finished_at
                     FROM {} WHERE pipeline = ? AND position >= ? AND position < ?
                       AND (? = 0 OR status <> 'done')
                     ORDER BY position, window_end",
                    q(WINDOWS_TABLE)
                ),
                (pipeline, low, high, open_only),
            )
            .await?;
        R::Ok(
            rows.into_iter()
                .map(|r| WindowRow {
                    start: r.0,
                    end: r.1,
                    position: r.2,
                    status: WindowStatus::parse(&r.3),
                    run_id: r.4,
                    host: r.5,
                    pid: r.6.map(|p| p as u32),
                    lease_expires: r.7,
                    stats: r.8.and_then(|s| serde_json::from_str(&s).ok()),
                    error: r.9,
                    finished_at: r.10,
                })
                .collect(),
        )
    }
    .await
    .map_err(books_error)
}

pub(super) async fn claim(
    conn: &mut Conn,
    claim: &WindowClaim,
    window: &Window,
    seen: &WindowRow,
) -> Result<bool> {
    conn.exec_drop(
        format!(
            "UPDATE {} SET status = 'running', run_id = ?, host = ?, pid = ?,
                 lease_expires = ?, error = NULL
             WHERE pipeline = ? AND window_start = ? AND window_end = ?
               AND status = ? AND run_id <=> ?",
            q(WINDOWS_TABLE)
        ),
        vec![
            mysql_async::Value::from(&claim.holder.run_id),
            claim.holder.host.as_str().into(),
            (claim.holder.pid as i64).into(),
            (now_ms() + claim.lease.as_millis() as i64).into(),
            claim.pipeline.as_str().into(),
            window.start_text().into(),
            window.end_text().into(),
            seen.status.as_str().into(),
            seen.run_id.clone().into(),
        ],
    )
    .await
    .map_err(books_error)?;
    Ok(conn.affected_rows() == 1)
}

pub(super) async fn renew(
    conn: &mut Conn,
    pipeline: &str,
    run_ids: &[String],
    lease: std::time::Duration,
) -> Result<()> {
    for run_id in run_ids {
        conn.exec_drop(
            format!(
                "UPDATE {} SET lease_expires = ?
                 WHERE pipeline = ? AND run_id = ? AND status = 'running'",
                q(WINDOWS_TABLE)
            ),
            (now_ms() + lease.as_millis() as i64, pipeline, run_id),
        )
        .await
        .map_err(books_error)?;
    }
    Ok(())
}

pub(super) async fn release(
    conn: &mut Conn,
    entry: &WindowEntry,
    status: WindowStatus,
    error: Option<&str>,
    stats: Option<&RunStats>,
) -> Result<()> {
    let stats = stats.map(|s| serde_json::to_string(s).unwrap_or_default());
    let finished = (status == WindowStatus::Failed).then(|| format_time(chrono::Utc::now()));
    conn.exec_drop(
        format!(
            "UPDATE {} SET status = ?, lease_expires = NULL, error = ?,
                 stats = coalesce(?, stats), finished_at = ?
             WHERE pipeline = ? AND window_start = ? AND window_end = ? AND run_id = ?
               AND status = 'running'",
            q(WINDOWS_TABLE)
        ),
        vec![
            mysql_async::Value::from(status.as_str()),
            error.into(),
            stats.into(),
            finished.into(),
            entry.pipeline.as_str().into(),
            entry.start().into(),
            entry.end().into(),
            entry.run_id.as_str().into(),
        ],
    )
    .await
    .map_err(books_error)?;
    Ok(())
}

pub(super) async fn fence(conn: &mut Conn, entry: &WindowEntry) -> Result<()> {
    conn.exec_drop(
        format!(
            "UPDATE {} SET lease_expires = ?
             WHERE pipeline = ? AND window_start = ? AND window_end = ? AND run_id = ?
               AND status = 'running'",
            q(WINDOWS_TABLE)
        ),
        (
            now_ms() + entry.lease.as_millis() as i64,
            &entry.pipeline,
            entry.start(),
            entry.end(),
            &entry.run_id,
        ),
    )
    .await
    .map_err(books_error)?;
    // The lease is renewed to a new value, so a held row always changes.
    entry.held(conn.affected_rows())
}

pub(super) async fn finish(conn: &mut Conn, entry: &WindowEntry, stats: &RunStats) -> Result<()> {
    conn.exec_drop(
        format!(
            "UPDATE {} SET status = 'done', lease_expires = NULL, error = NULL, stats = ?,
                 finished_at = ?
             WHERE pipeline = ? AND window_start = ? AND window_end = ? AND run_id = ?",
            q(WINDOWS_TABLE)
        ),
        (
            serde_json::to_string(stats).unwrap_or_default(),
            format_time(chrono::Utc::now()),
            &entry.pipeline,
            entry.start(),
            entry.end(),
            &entry.run_id,
        ),
    )
    .await
    .map_err(books_error)?;
    entry.held(conn.affected_rows())
}
