//! The MySQL/MariaDB run lock: `GET_LOCK` on the pipeline's name plus a
//! lease row in `_idemload_locks`, renewed by a heartbeat, and the fence
//! every batch transaction takes on that row.
//!
//! The run lock is `GET_LOCK` on the destination's connection: the server
//! holds it for the session and frees it the moment the session ends, so a
//! dead run never blocks the next one for longer than the server takes to
//! notice. The lease row in `_idemload_locks` says who holds it and since
//! when; every batch transaction re-checks both (the fence), so a run that
//! lost its session can never commit another batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, TxOpts};
use sha2::{Digest, Sha256};

use super::books::R;
use super::Lock;
use crate::destination::sql::quote_mysql as q;
use crate::error::Error;
use crate::state::{died_error, format_time, LockHolder, LOCKS_TABLE, RUNS_TABLE};
use crate::stats::RunStatus;

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// The `GET_LOCK` name of a pipeline in a database: a hash, because lock
/// names are limited to 64 characters and compared without case.
pub(super) fn lock_name(database: &str, pipeline: &str) -> String {
    let mut h = Sha256::new();
    h.update(database.as_bytes());
    h.update([0]);
    h.update(pipeline.as_bytes());
    format!("idemload:{}", &hex::encode(h.finalize())[..40])
}

async fn read_holder(conn: &mut impl Queryable, pipeline: &str) -> R<Option<LockHolder>> {
    let row: Option<(String, String, u32, String)> = conn
        .exec_first(
            format!(
                "SELECT run_id, host, pid, since FROM {} WHERE pipeline = ?",
                q(LOCKS_TABLE)
            ),
            (pipeline,),
        )
        .await?;
    Ok(row.map(|(run_id, host, pid, since)| LockHolder {
        run_id,
        host,
        pid,
        since: since
            .parse::<DateTime<Utc>>()
            .unwrap_or_else(|_| Utc::now()),
    }))
}

/// Takes the lock, or returns its holder.
pub(super) async fn try_lock(
    conn: &mut Conn,
    name: &str,
    pipeline: &str,
    me: &LockHolder,
    lease: Duration,
) -> R<Option<LockHolder>> {
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, 0)", (name,)).await?;
    if got.flatten() != Some(1) {
        // The holder writes its lease row right after GET_LOCK: give it a moment.
        for _ in 0..10 {
            if let Some(holder) = read_holder(conn, pipeline).await? {
                if holder.run_id != me.run_id {
                    return Ok(Some(holder));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let session: Option<Option<i64>> =
            conn.exec_first("SELECT IS_USED_LOCK(?)", (name,)).await?;
        return Ok(Some(LockHolder {
            run_id: "unknown".into(),
            host: format!(
                "unknown (MySQL connection {})",
                session.flatten().unwrap_or_default()
            ),
            pid: 0,
            since: Utc::now(),
        }));
    }
    // The session lock is ours: any lease row left is of a run that died.
    // The row is replaced and that run recorded as `died` in one transaction.
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let old = read_holder(&mut tx, pipeline).await?;
    tx.exec_drop(
        format!(
            "REPLACE INTO {} (pipeline, run_id, host, pid, since, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            q(LOCKS_TABLE)
        ),
        (
            pipeline,
            &me.run_id,
            &me.host,
            me.pid,
            format_time(me.since),
            now_ms() + lease.as_millis() as i64,
        ),
    )
    .await?;
    if let Some(old) = old.filter(|old| old.run_id != me.run_id) {
        tracing::warn!(pipeline, holder = %old, "Taking over the lock of a run that died.");
        tx.exec_drop(
            format!(
                "UPDATE {} SET status = ?, finished_at = ?, error = ? WHERE run_id = ? AND status = ?",
                q(RUNS_TABLE)
            ),
            (
                RunStatus::Died.as_str(),
                format_time(Utc::now()),
                died_error(&old, &me.run_id),
                &old.run_id,
                RunStatus::Running.as_str(),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(None)
}

/// Inside a batch transaction: fails unless this session still holds the
/// lock and the lease row is this run's, and renews the lease.
pub(super) async fn fence(conn: &mut Conn, lock: &Lock) -> crate::error::Result<()> {
    let lost = || Error::LockLost {
        pipeline: lock.pipeline.clone(),
    };
    let ctx = || format!("lock of pipeline {:?}", lock.pipeline);
    let mine: Option<Option<i64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?) = CONNECTION_ID()", (&lock.name,))
        .await
        .map_err(|e| Error::destination(ctx(), e))?;
    if mine.flatten() != Some(1) {
        return Err(lost());
    }
    let holder: Option<String> = conn
        .exec_first(
            format!(
                "SELECT run_id FROM {} WHERE pipeline = ? FOR UPDATE",
                q(LOCKS_TABLE)
            ),
            (&lock.pipeline,),
        )
        .await
        .map_err(|e| Error::destination(ctx(), e))?;
    if holder.as_deref() != Some(lock.run_id.as_str()) {
        return Err(lost());
    }
    conn.exec_drop(
        format!(
            "UPDATE {} SET expires_at = ? WHERE pipeline = ? AND run_id = ?",
            q(LOCKS_TABLE)
        ),
        (
            now_ms() + lock.lease.as_millis() as i64,
            &lock.pipeline,
            &lock.run_id,
        ),
    )
    .await
    .map_err(|e| Error::destination(ctx(), e))
}

pub(super) async fn unlock(conn: &mut Conn, lock: &Lock) -> R<()> {
    conn.exec_drop(
        format!(
            "DELETE FROM {} WHERE pipeline = ? AND run_id = ?",
            q(LOCKS_TABLE)
        ),
        (&lock.pipeline, &lock.run_id),
    )
    .await?;
    let _: Option<Option<i64>> = conn
        .exec_first("SELECT RELEASE_LOCK(?)", (&lock.name,))
        .await?;
    Ok(())
}

/// Renews the lease row from a connection of its own while the run lives,
/// so that others see a living holder.
pub(super) struct Heartbeat {
    stop: tokio::sync::oneshot::Sender<()>,
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub(super) fn start(opts: Opts, pipeline: &str, run_id: &str, lease: Duration) -> Heartbeat {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let (pipeline, run_id, flag) = (pipeline.to_string(), run_id.to_string(), lost.clone());
        let task = tokio::spawn(async move {
            let opts = OptsBuilder::from_opts(opts).setup(vec![
                // Behind a batch that holds the lease row, give up quickly:
                // the batch renews the lease itself.
                "SET SESSION innodb_lock_wait_timeout = 5",
            ]);
            let mut conn: Option<Conn> = None;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(lease / 3) => {}
                }
                if conn.is_none() {
                    conn = Conn::new(opts.clone()).await.ok();
                }
                let Some(c) = conn.as_mut() else { continue };
                let renewed = c
                    .exec_drop(
                        format!(
                            "UPDATE {} SET expires_at = ? WHERE pipeline = ? AND run_id = ?",
                            q(LOCKS_TABLE)
                        ),
                        (now_ms() + lease.as_millis() as i64, &pipeline, &run_id),
                    )
                    .await;
                match renewed {
                    Ok(()) if c.affected_rows() == 0 => {
                        if let Ok(None) = read_holder(c, &pipeline)
                            .await
                            .map(|h| h.filter(|h| h.run_id == run_id))
                        {
                            flag.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "Lease renewal deferred.");
                        conn = None;
                    }
                }
            }
            if let Some(c) = conn {
                let _ = c.disconnect().await;
            }
        });
        Heartbeat { stop, lost, task }
    }

    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    pub(super) fn abort(self) {
        self.task.abort();
    }
}
