//! `_idemload_windows` in PostgreSQL (see [`crate::windows`]). A claim is a
//! conditional update of the window's row: of two workers that pick the
//! same window one wins, the other sees zero rows and picks another; the
//! batch fence updates the same row, so it waits for (and then fails after)
//! a takeover.

use tokio_postgres::{Client, GenericClient};

use super::ddl::advisory_key;
use super::{pg_error, qualified};
use crate::error::Result;
use crate::state::format_time;
use crate::stats::RunStats;
use crate::windows::{Window, WindowClaim, WindowEntry, WindowRow, WindowStatus, WINDOWS_TABLE};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Makes the table when missing (under the bookkeeping advisory lock:
/// concurrent `CREATE TABLE IF NOT EXISTS` race) and adds the windows it
/// lacks as pending.
pub(super) async fn add(
    client: &mut Client,
    schema: &str,
    pipeline: &str,
    windows: &[Window],
) -> Result<()> {
    let t = qualified(schema, WINDOWS_TABLE);
    let tx = client
        .transaction()
        .await
        .map_err(pg_error("windows table"))?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({lock});
         CREATE TABLE IF NOT EXISTS {t} (
             pipeline text NOT NULL, window_start text NOT NULL, window_end text NOT NULL,
             position bigint NOT NULL, status text NOT NULL, run_id text, host text, pid bigint,
             lease_expires bigint, stats jsonb, error text, finished_at timestamptz,
             PRIMARY KEY (pipeline, window_start, window_end));",
        lock = advisory_key("", "_idemload_bookkeeping"),
    ))
    .await
    .map_err(pg_error("creating the windows table"))?;
    let starts: Vec<String> = windows.iter().map(Window::start_text).collect();
    let ends: Vec<String> = windows.iter().map(Window::end_text).collect();
    let positions: Vec<i64> = windows.iter().map(|w| w.position).collect();
    tx.execute(
        &format!(
            "INSERT INTO {t} (pipeline, window_start, window_end, position, status)
             SELECT $1, u.s, u.e, u.p, 'pending'
             FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(s, e, p)
             ON CONFLICT DO NOTHING"
        ),
        &[&pipeline, &starts, &ends, &positions],
    )
    .await
    .map_err(pg_error("adding windows"))?;
    tx.commit().await.map_err(pg_error("adding windows"))?;
    Ok(())
}

/// The pipeline's windows (position in `range`), in order.
pub(super) async fn list(
    client: &Client,
    schema: &str,
    pipeline: &str,
    range: Option<(i64, i64)>,
    open_only: bool,
) -> Result<Vec<WindowRow>> {
    let present: bool = client
        .query_one(
            "SELECT count(*) > 0 FROM information_schema.tables
             WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &WINDOWS_TABLE],
        )
        .await
        .map_err(pg_error("windows table"))?
        .get(0);
    if !present {
        return Ok(Vec::new());
    }
    let (low, high) = range.unwrap_or((i64::MIN, i64::MAX));
    let rows = client
        .query(
            &format!(
                "SELECT window_start, window_end, position, status, run_id, host, pid,
                        lease_expires, stats, error, finished_at
                 FROM {} WHERE pipeline = $1 AND position >= $2 AND position < $3
                   AND (NOT $4 OR status <> 'done')
                 ORDER BY position, window_end",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[&pipeline, &low, &high, &open_only],
        )
        .await
        .map_err(pg_error("reading the windows"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let lease: Option<i64> = r.get(7);
            WindowRow {
                start: r.get(0),
                end: r.get(1),
                position: r.get(2),
                status: WindowStatus::parse(r.get(3)),
                run_id: r.get(4),
                host: r.get(5),
                pid: r.get::<_, Option<i64>>(6).map(|p| p as u32),
                lease_expires: lease,
                stats: r.get(8),
                error: r.get(9),
                finished_at: r
                    .get::<_, Option<chrono::DateTime<chrono::Utc>>>(10)
                    .map(format_time),
            }
        })
        .collect())
}

pub(super) async fn claim(
    client: &Client,
    schema: &str,
    claim: &WindowClaim,
    window: &Window,
    seen: &WindowRow,
) -> Result<bool> {
    let n = client
        .execute(
            &format!(
                "UPDATE {} SET status = 'running', run_id = $4, host = $5, pid = $6,
                     lease_expires = $7, error = NULL
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3
                   AND status = $8 AND run_id IS NOT DISTINCT FROM $9",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[
                &claim.pipeline,
                &window.start_text(),
                &window.end_text(),
                &claim.holder.run_id,
                &claim.holder.host,
                &(claim.holder.pid as i64),
                &(now_ms() + claim.lease.as_millis() as i64),
                &seen.status.as_str(),
                &seen.run_id,
            ],
        )
        .await
        .map_err(pg_error("claiming a window"))?;
    Ok(n == 1)
}

pub(super) async fn renew(
    client: &Client,
    schema: &str,
    pipeline: &str,
    run_ids: &[String],
    lease: std::time::Duration,
) -> Result<()> {
    client
        .execute(
            &format!(
                "UPDATE {} SET lease_expires = $3
                 WHERE pipeline = $1 AND run_id = ANY($2) AND status = 'running'",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[&pipeline, &run_ids, &(now_ms() + lease.as_millis() as i64)],
        )
        .await
        .map_err(pg_error("renewing window leases"))?;
    Ok(())
}

pub(super) async fn release(
    client: &Client,
    schema: &str,
    entry: &WindowEntry,
    status: WindowStatus,
    error: Option<&str>,
    stats: Option<&RunStats>,
) -> Result<()> {
    let stats = stats.map(|s| serde_json::to_value(s).unwrap_or_default());
    let failed = status == WindowStatus::Failed;
    client
        .execute(
            &format!(
                "UPDATE {} SET status = $5, lease_expires = NULL, error = $6,
                     stats = coalesce($7, stats),
                     finished_at = CASE WHEN $8 THEN now() ELSE NULL END
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3 AND run_id = $4
                   AND status = 'running'",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[
                &entry.pipeline,
                &entry.start(),
                &entry.end(),
                &entry.run_id,
                &status.as_str(),
                &error,
                &stats,
                &failed,
            ],
        )
        .await
        .map_err(pg_error("releasing a window"))?;
    Ok(())
}

pub(super) async fn fence(
    tx: &impl GenericClient,
    schema: &str,
    entry: &WindowEntry,
) -> Result<()> {
    let n = tx
        .execute(
            &format!(
                "UPDATE {} SET lease_expires = $5
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3 AND run_id = $4
                   AND status = 'running'",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[
                &entry.pipeline,
                &entry.start(),
                &entry.end(),
                &entry.run_id,
                &(now_ms() + entry.lease.as_millis() as i64),
            ],
        )
        .await
        .map_err(pg_error("fencing a window"))?;
    entry.held(n as u64)
}

pub(super) async fn finish(
    tx: &impl GenericClient,
    schema: &str,
    entry: &WindowEntry,
    stats: &RunStats,
) -> Result<()> {
    let n = tx
        .execute(
            &format!(
                "UPDATE {} SET status = 'done', lease_expires = NULL, error = NULL, stats = $5,
                     finished_at = now()
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3 AND run_id = $4",
                qualified(schema, WINDOWS_TABLE)
            ),
            &[
                &entry.pipeline,
                &entry.start(),
                &entry.end(),
                &entry.run_id,
                &serde_json::to_value(stats).unwrap_or_default(),
            ],
        )
        .await
        .map_err(pg_error("marking a window done"))?;
    entry.held(n as u64)
}
