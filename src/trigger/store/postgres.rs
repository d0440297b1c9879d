//! The PostgreSQL seen store: seen keys in a table of the destination's
//! schema, the trigger's lock as the same advisory lock and lease row a
//! PostgreSQL destination uses, so watchers on several machines share it.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;

use super::{DeadLetter, SeenStore};
use crate::destination::postgres::{pg_error, qualified, PostgresDestination};
use crate::destination::Books;
use crate::error::Result;
use crate::state::LockHolder;

pub struct PostgresStore {
    dest: PostgresDestination,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore> {
        let dest = PostgresDestination::open(url, None).await?;
        let (seen, triggers, dead) = (
            qualified(&dest.schema, "_idemload_seen"),
            qualified(&dest.schema, "_idemload_triggers"),
            qualified(&dest.schema, "_idemload_dead_letters"),
        );
        dest.client
            .batch_execute(&format!(
                // Two watchers starting together would race on CREATE TABLE
                // IF NOT EXISTS; a transaction lock serialises them.
                "BEGIN;
                 SELECT pg_advisory_xact_lock(hashtext('idemload seen store'));
                 CREATE TABLE IF NOT EXISTS {seen} (
                     trigger text NOT NULL, key_hash text NOT NULL, seen_at bigint NOT NULL,
                     PRIMARY KEY (trigger, key_hash));
                 CREATE INDEX IF NOT EXISTS _idemload_seen_at ON {seen} (trigger, seen_at);
                 CREATE TABLE IF NOT EXISTS {triggers} (trigger text PRIMARY KEY, primed_at text NOT NULL);
                 CREATE TABLE IF NOT EXISTS {dead} (
                     id bigserial PRIMARY KEY, trigger text NOT NULL, key_hash text NOT NULL,
                     item jsonb NOT NULL, error text NOT NULL, attempts integer NOT NULL, parked_at text NOT NULL);
                 COMMIT;"
            ))
            .await
            .map_err(pg_error("seen store"))?;
        Ok(PostgresStore { dest })
    }

    fn table(&self, name: &str) -> String {
        qualified(&self.dest.schema, name)
    }
}

#[async_trait]
impl SeenStore for PostgresStore {
    async fn lock(
        &mut self,
        trigger: &str,
        me: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        self.dest.lock(trigger, me, lease).await
    }

    fn lock_lost(&self) -> bool {
        // The advisory lock lives as long as this session: it cannot be taken over.
        false
    }

    async fn unlock(&mut self) -> Result<()> {
        self.dest.unlock().await
    }

    async fn is_primed(&mut self, trigger: &str) -> Result<bool> {
        let row = self
            .dest
            .client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE trigger = $1",
                    self.table("_idemload_triggers")
                ),
                &[&trigger],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(row.is_some())
    }

    async fn set_primed(&mut self, trigger: &str) -> Result<()> {
        self.dest
            .client
            .execute(
                &format!(
                    "INSERT INTO {} (trigger, primed_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    self.table("_idemload_triggers")
                ),
                &[&trigger, &Utc::now().to_rfc3339()],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(())
    }

    async fn known(&mut self, trigger: &str, keys: &[String]) -> Result<HashSet<String>> {
        let rows = self
            .dest
            .client
            .query(
                &format!(
                    "SELECT key_hash FROM {} WHERE trigger = $1 AND key_hash = ANY($2)",
                    self.table("_idemload_seen")
                ),
                &[&trigger, &keys],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn mark_seen(&mut self, trigger: &str, keys: &[String]) -> Result<()> {
        self.dest
            .client
            .execute(
                &format!(
                    "INSERT INTO {} (trigger, key_hash, seen_at) SELECT $1, k, $3 FROM unnest($2::text[]) k
                     ON CONFLICT (trigger, key_hash) DO UPDATE SET seen_at = excluded.seen_at",
                    self.table("_idemload_seen")
                ),
                &[&trigger, &keys, &Utc::now().timestamp_millis()],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(())
    }

    async fn park(
        &mut self,
        trigger: &str,
        key: &str,
        item: &Value,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        let (dead, seen) = (
            self.table("_idemload_dead_letters"),
            self.table("_idemload_seen"),
        );
        let tx = self
            .dest
            .client
            .transaction()
            .await
            .map_err(pg_error("seen store"))?;
        tx.execute(
            &format!("INSERT INTO {dead} (trigger, key_hash, item, error, attempts, parked_at) VALUES ($1, $2, $3::text::jsonb, $4, $5, $6)"),
            &[&trigger, &key, &item.to_string(), &error, &(attempts as i32), &Utc::now().to_rfc3339()],
        )
        .await
        .map_err(pg_error("seen store"))?;
        tx.execute(
            &format!("INSERT INTO {seen} (trigger, key_hash, seen_at) VALUES ($1, $2, $3) ON CONFLICT (trigger, key_hash) DO NOTHING"),
            &[&trigger, &key, &Utc::now().timestamp_millis()],
        )
        .await
        .map_err(pg_error("seen store"))?;
        tx.commit().await.map_err(pg_error("seen store"))
    }

    async fn forget_before(&mut self, trigger: &str, cutoff_ms: i64) -> Result<u64> {
        self.dest
            .client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE trigger = $1 AND seen_at < $2",
                    self.table("_idemload_seen")
                ),
                &[&trigger, &cutoff_ms],
            )
            .await
            .map_err(pg_error("seen store"))
    }

    async fn reset(&mut self, trigger: &str) -> Result<u64> {
        let (seen, triggers, dead) = (
            self.table("_idemload_seen"),
            self.table("_idemload_triggers"),
            self.table("_idemload_dead_letters"),
        );
        let tx = self
            .dest
            .client
            .transaction()
            .await
            .map_err(pg_error("seen store"))?;
        let n = tx
            .execute(
                &format!("DELETE FROM {seen} WHERE trigger = $1"),
                &[&trigger],
            )
            .await
            .map_err(pg_error("seen store"))?;
        for table in [triggers, dead] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE trigger = $1"),
                &[&trigger],
            )
            .await
            .map_err(pg_error("seen store"))?;
        }
        tx.commit().await.map_err(pg_error("seen store"))?;
        Ok(n)
    }

    async fn dead_letters(&mut self, trigger: &str) -> Result<Vec<DeadLetter>> {
        let rows = self
            .dest
            .client
            .query(
                &format!(
                    "SELECT id, key_hash, item::text, error, attempts, parked_at FROM {}
                     WHERE trigger = $1 ORDER BY id",
                    self.table("_idemload_dead_letters")
                ),
                &[&trigger],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                handle: r.get::<_, i64>(0).to_string(),
                key_hash: r.get(1),
                item: serde_json::from_str(r.get::<_, &str>(2)).unwrap_or(Value::Null),
                error: r.get(3),
                attempts: r.get::<_, i32>(4).max(0) as u32,
                parked_at: r.get(5),
            })
            .collect())
    }

    async fn remove_dead_letter(&mut self, trigger: &str, letter: &DeadLetter) -> Result<()> {
        let id: i64 = letter.handle.parse().unwrap_or(-1);
        self.dest
            .client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE trigger = $1 AND id = $2",
                    self.table("_idemload_dead_letters")
                ),
                &[&trigger, &id],
            )
            .await
            .map_err(pg_error("seen store"))?;
        Ok(())
    }
}
