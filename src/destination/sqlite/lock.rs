//! The SQLite run lock: a lease row in `_idemload_locks` taken in a write
//! transaction and renewed by a heartbeat thread, and the fence every batch
//! transaction takes on that row.
//!
//! The lock is a lease row in `_idemload_locks`, taken in a `BEGIN
//! IMMEDIATE` transaction (SQLite's write lock makes the check-and-take
//! atomic across processes), renewed by a heartbeat thread, and checked
//! again in every batch transaction: a run whose lease was taken over can
//! never commit another batch.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::destination::sql::quote;
use crate::error::{Error, Result};
use crate::state::{died_error, format_time, LockHolder, LOCKS_TABLE, RUNS_TABLE};
use crate::stats::RunStatus;

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Takes the lock, or returns its living holder.
pub(crate) fn try_lock(
    conn: &mut Connection,
    pipeline: &str,
    me: &LockHolder,
    lease: Duration,
) -> Result<Option<LockHolder>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current = tx
        .query_row(
            &format!(
                "SELECT run_id, host, pid, since, expires_at FROM {} WHERE pipeline = ?1",
                quote(LOCKS_TABLE)
            ),
            [pipeline],
            |r| {
                Ok((
                    LockHolder {
                        run_id: r.get(0)?,
                        host: r.get(1)?,
                        pid: r.get(2)?,
                        since: r
                            .get::<_, String>(3)?
                            .parse::<DateTime<Utc>>()
                            .unwrap_or_else(|_| Utc::now()),
                    },
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()?;
    if let Some((holder, expires_at)) = current {
        let alive = expires_at > now_ms() && !holder.is_dead_local_process();
        if alive && holder.run_id != me.run_id {
            return Ok(Some(holder));
        }
        if !alive && holder.run_id != me.run_id {
            tracing::warn!(pipeline, holder = %holder, "Taking over the lock of a run that died.");
            // Its run ends here, in the takeover's transaction: `died`.
            tx.execute(
                &format!(
                    "UPDATE {} SET status = ?2, finished_at = ?3, error = ?4
                     WHERE run_id = ?1 AND status = ?5",
                    quote(RUNS_TABLE)
                ),
                params![
                    holder.run_id,
                    RunStatus::Died.as_str(),
                    format_time(Utc::now()),
                    died_error(&holder, &me.run_id),
                    RunStatus::Running.as_str()
                ],
            )?;
        }
    }
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO {} (pipeline, run_id, host, pid, since, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            quote(LOCKS_TABLE)
        ),
        params![pipeline, me.run_id, me.host, me.pid, format_time(me.since), now_ms() + lease.as_millis() as i64],
    )?;
    tx.commit()?;
    Ok(None)
}

/// Renews the lease inside a batch transaction; fails when another run took
/// the lock, so the batch rolls back.
pub(super) fn fence(
    conn: &Connection,
    pipeline: &str,
    run_id: &str,
    lease: Duration,
) -> Result<()> {
    let renewed = conn.execute(
        &format!(
            "UPDATE {} SET expires_at = ?3 WHERE pipeline = ?1 AND run_id = ?2",
            quote(LOCKS_TABLE)
        ),
        params![pipeline, run_id, now_ms() + lease.as_millis() as i64],
    )?;
    if renewed == 1 {
        Ok(())
    } else {
        Err(Error::LockLost {
            pipeline: pipeline.to_string(),
        })
    }
}

pub(crate) fn unlock(conn: &Connection, pipeline: &str, run_id: &str) -> Result<()> {
    conn.execute(
        &format!(
            "DELETE FROM {} WHERE pipeline = ?1 AND run_id = ?2",
            quote(LOCKS_TABLE)
        ),
        params![pipeline, run_id],
    )?;
    Ok(())
}

/// Renews a lock lease from a thread of its own while the run lives.
pub(crate) struct Heartbeat {
    stop: mpsc::Sender<()>,
    lost: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub(crate) fn start(
        path: &Path,
        pipeline: &str,
        run_id: &str,
        lease: Duration,
    ) -> Result<Heartbeat> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(lease / 3)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let (pipeline, run_id, flag) = (pipeline.to_string(), run_id.to_string(), lost.clone());
        let thread = std::thread::Builder::new()
            .name("idemload-heartbeat".into())
            .spawn(move || loop {
                match stopped.recv_timeout(lease / 3) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                match fence(&conn, &pipeline, &run_id, lease) {
                    Ok(()) => {}
                    Err(Error::LockLost { .. }) => {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    // Busy behind a long batch: that batch renews the lease itself.
                    Err(e) => tracing::debug!(error = %e, "Lease renewal deferred."),
                }
            })
            .map_err(|e| Error::destination("sqlite", format!("cannot start heartbeat: {e}")))?;
        Ok(Heartbeat {
            stop,
            lost,
            thread: Some(thread),
        })
    }

    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub(crate) fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
