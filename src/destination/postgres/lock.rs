//! The PostgreSQL run lock: a session advisory lock on a stable hash of
//! schema and pipeline, with a lease row in `_idemload_locks` that says who
//! holds it, and the fence every batch transaction takes on that row.
//!
//! The run lock is a session advisory lock on a stable 64-bit hash of the
//! schema and the pipeline, held on the destination's own connection for
//! the whole run: PostgreSQL itself makes it exclusive across processes and
//! machines, and frees it the moment its holder's connection ends. The lease
//! row in `_idemload_locks` says who holds it and since when (for the exit 3
//! message), and every batch transaction fences on it.

use std::time::Duration;

use chrono::Utc;
use tokio_postgres::{Client, GenericClient};

use super::{pg_error, qualified};
use crate::error::{Error, Result};
use crate::state::{died_error, LockHolder, LOCKS_TABLE, RUNS_TABLE};
use crate::stats::RunStatus;

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Takes the advisory lock and writes the lease row, or returns the holder.
pub(super) async fn try_lock(
    client: &mut Client,
    schema: &str,
    pipeline: &str,
    me: &LockHolder,
    lease: Duration,
    key: i64,
) -> Result<Option<LockHolder>> {
    let locks = qualified(schema, LOCKS_TABLE);
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(pg_error(format!("lock of pipeline {pipeline:?}")))?
        .get(0);
    if got {
        // Whoever wrote a row before us has lost its session, hence the
        // lock: its run died. The row is replaced and the run recorded as
        // `died` in one transaction.
        let context = || format!("lock of pipeline {pipeline:?}");
        let tx = client.transaction().await.map_err(pg_error(context()))?;
        let old = tx
            .query_opt(
                &format!("SELECT run_id, host, pid, since FROM {locks} WHERE pipeline = $1"),
                &[&pipeline],
            )
            .await
            .map_err(pg_error(context()))?
            .map(|r| LockHolder {
                run_id: r.get(0),
                host: r.get(1),
                pid: r.get::<_, i64>(2) as u32,
                since: r.get(3),
            });
        tx.execute(
            &format!(
                "INSERT INTO {locks} AS l (pipeline, run_id, host, pid, since, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (pipeline) DO UPDATE SET run_id = EXCLUDED.run_id,
                     host = EXCLUDED.host, pid = EXCLUDED.pid, since = EXCLUDED.since,
                     expires_at = EXCLUDED.expires_at"
            ),
            &[
                &pipeline,
                &me.run_id,
                &me.host,
                &(me.pid as i64),
                &me.since,
                &(now_ms() + lease.as_millis() as i64),
            ],
        )
        .await
        .map_err(pg_error(context()))?;
        if let Some(old) = old.filter(|old| old.run_id != me.run_id) {
            tracing::warn!(pipeline, holder = %old, "Taking over the lock of a run that died.");
            tx.execute(
                &format!(
                    "UPDATE {} SET status = $2, finished_at = now(), error = $3
                     WHERE run_id = $1 AND status = $4",
                    qualified(schema, RUNS_TABLE)
                ),
                &[
                    &old.run_id,
                    &RunStatus::Died.as_str(),
                    &died_error(&old, &me.run_id),
                    &RunStatus::Running.as_str(),
                ],
            )
            .await
            .map_err(pg_error(context()))?;
        }
        tx.commit().await.map_err(pg_error(context()))?;
        return Ok(None);
    }
    // The holder writes its lease row right after taking the lock; give it
    // a moment when we look in between.
    for _ in 0..10 {
        let row = client
            .query_opt(
                &format!("SELECT run_id, host, pid, since FROM {locks} WHERE pipeline = $1"),
                &[&pipeline],
            )
            .await
            .map_err(pg_error(format!("lock of pipeline {pipeline:?}")))?;
        if let Some(r) = row {
            return Ok(Some(LockHolder {
                run_id: r.get(0),
                host: r.get(1),
                pid: r.get::<_, i64>(2) as u32,
                since: r.get(3),
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Some(LockHolder {
        run_id: "unknown".into(),
        host: "another PostgreSQL session".into(),
        pid: 0,
        since: Utc::now(),
    }))
}

/// Renews the lease inside a batch transaction; fails when the lease row is
/// no longer this run's, so the batch rolls back.
pub(super) async fn fence(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    run_id: &str,
    lease: Duration,
) -> Result<()> {
    let renewed = tx
        .execute(
            &format!(
                "UPDATE {} SET expires_at = $3 WHERE pipeline = $1 AND run_id = $2",
                qualified(schema, LOCKS_TABLE)
            ),
            &[&pipeline, &run_id, &(now_ms() + lease.as_millis() as i64)],
        )
        .await
        .map_err(pg_error("renewing the run lock"))?;
    if renewed == 1 {
        Ok(())
    } else {
        Err(Error::LockLost {
            pipeline: pipeline.to_string(),
        })
    }
}

pub(super) async fn unlock(
    client: &Client,
    schema: &str,
    pipeline: &str,
    run_id: &str,
    key: i64,
) -> Result<()> {
    let context = format!("unlock of pipeline {pipeline:?}");
    client
        .execute(
            &format!(
                "DELETE FROM {} WHERE pipeline = $1 AND run_id = $2",
                qualified(schema, LOCKS_TABLE)
            ),
            &[&pipeline, &run_id],
        )
        .await
        .map_err(pg_error(context.clone()))?;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .map_err(pg_error(context))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::ddl::advisory_key;
    use super::super::testing::{server, TestSchema};
    use super::*;
    use crate::destination::Books;

    #[test]
    fn advisory_keys_are_stable_and_per_schema() {
        assert_eq!(advisory_key("s", "p"), advisory_key("s", "p"));
        assert_ne!(advisory_key("s", "p"), advisory_key("t", "p"));
        assert_ne!(advisory_key("s", "p"), advisory_key("s", "q"));
    }

    #[tokio::test]
    async fn a_second_run_is_locked_out_and_told_who_holds_the_lock() {
        let Some(url) = server("a_second_run_is_locked_out_and_told_who_holds_the_lock") else {
            return;
        };
        let pg = TestSchema::new(&url, "lock").await;
        let lease = Duration::from_secs(30);
        let mut first = super::super::PostgresDestination::open(&pg.url(), None)
            .await
            .unwrap();
        let mut second = super::super::PostgresDestination::open(&pg.url(), None)
            .await
            .unwrap();
        let a = LockHolder {
            host: "machine-a".into(),
            ..LockHolder::this_process("run-a")
        };
        let b = LockHolder::this_process("run-b");
        assert_eq!(first.lock("p", &a, lease).await.unwrap(), None);
        // Another pipeline is not affected.
        assert_eq!(second.lock("q", &b, lease).await.unwrap(), None);
        second.unlock().await.unwrap();
        let held = second.lock("p", &b, lease).await.unwrap().expect("locked");
        assert_eq!(
            (held.run_id.as_str(), held.host.as_str()),
            ("run-a", "machine-a")
        );
        assert_eq!(held.since.timestamp_millis(), a.since.timestamp_millis());
        // Even an expired lease does not free a lock whose session lives.
        pg.client
            .execute(
                &format!(
                    "UPDATE {} SET expires_at = 0",
                    qualified(&pg.name, LOCKS_TABLE)
                ),
                &[],
            )
            .await
            .unwrap();
        assert!(second.lock("p", &b, lease).await.unwrap().is_some());
        // A holder whose connection ends frees the lock at once.
        drop(first);
        let mut freed = false;
        for _ in 0..50 {
            if second.lock("p", &b, lease).await.unwrap().is_none() {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(freed, "the lock of a closed session was not freed");
        second.unlock().await.unwrap();
        pg.drop().await;
    }
}
