//! The SQLite seen store (the default): a file, with the same lock lease
//! and heartbeat as SQLite destinations.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::{params, Connection};
use serde_json::Value;

use super::{DeadLetter, SeenStore};
use crate::destination::sqlite::books;
use crate::destination::sqlite::lock::{self, Heartbeat};
use crate::destination::sqlite::path_of;
use crate::destination::sqlite::worker::Worker;
use crate::error::Result;
use crate::state::LockHolder;

pub struct SqliteStore {
    path: PathBuf,
    conn: Worker<Connection>,
    heartbeat: Option<Heartbeat>,
    lock: Option<(String, String)>,
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<SqliteStore> {
        let path = path_of(url)?;
        let p = path.clone();
        let conn = Worker::open("seen store", move || -> Result<Connection> {
            let conn = books::connect(&p)?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS _idemload_seen (
                     trigger TEXT NOT NULL, key_hash TEXT NOT NULL, seen_at INTEGER NOT NULL,
                     PRIMARY KEY (trigger, key_hash)) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS _idemload_seen_at ON _idemload_seen (trigger, seen_at);
                 CREATE TABLE IF NOT EXISTS _idemload_triggers (trigger TEXT PRIMARY KEY, primed_at TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS _idemload_dead_letters (
                     id INTEGER PRIMARY KEY AUTOINCREMENT, trigger TEXT NOT NULL, key_hash TEXT NOT NULL,
                     item TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL, parked_at TEXT NOT NULL);",
            )?;
            Ok(conn)
        })
        .await?;
        Ok(SqliteStore {
            path,
            conn,
            heartbeat: None,
            lock: None,
        })
    }
}

#[async_trait]
impl SeenStore for SqliteStore {
    async fn lock(
        &mut self,
        trigger: &str,
        me: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        let (t, m) = (trigger.to_string(), me.clone());
        let held = self
            .conn
            .run(move |c| lock::try_lock(c, &t, &m, lease))
            .await?;
        if held.is_none() {
            self.heartbeat = Some(Heartbeat::start(&self.path, trigger, &me.run_id, lease)?);
            self.lock = Some((trigger.to_string(), me.run_id.clone()));
        }
        Ok(held)
    }

    fn lock_lost(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(Heartbeat::lost)
    }

    async fn unlock(&mut self) -> Result<()> {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop();
        }
        match self.lock.take() {
            Some((t, r)) => self.conn.run(move |c| lock::unlock(c, &t, &r)).await,
            None => Ok(()),
        }
    }

    async fn is_primed(&mut self, trigger: &str) -> Result<bool> {
        let t = trigger.to_string();
        self.conn
            .run(move |c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM _idemload_triggers WHERE trigger = ?1",
                    [t],
                    |r| r.get::<_, i64>(0),
                )? > 0)
            })
            .await
    }

    async fn set_primed(&mut self, trigger: &str) -> Result<()> {
        let t = trigger.to_string();
        self.conn
            .run(move |c| {
                c.execute(
                    "INSERT OR IGNORE INTO _idemload_triggers (trigger, primed_at) VALUES (?1, ?2)",
                    params![t, Utc::now().to_rfc3339()],
                )?;
                Ok(())
            })
            .await
    }

    async fn known(&mut self, trigger: &str, keys: &[String]) -> Result<HashSet<String>> {
        let (t, keys) = (trigger.to_string(), keys.to_vec());
        self.conn
            .run(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT 1 FROM _idemload_seen WHERE trigger = ?1 AND key_hash = ?2",
                )?;
                let mut found = HashSet::new();
                for k in keys {
                    if stmt.exists(params![t, k])? {
                        found.insert(k);
                    }
                }
                Ok(found)
            })
            .await
    }

    async fn mark_seen(&mut self, trigger: &str, keys: &[String]) -> Result<()> {
        let (t, keys) = (trigger.to_string(), keys.to_vec());
        self.conn
            .run(move |c| {
                let tx = c.transaction()?;
                {
                    let now = Utc::now().timestamp_millis();
                    let mut stmt = tx.prepare_cached(
                    "INSERT INTO _idemload_seen (trigger, key_hash, seen_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (trigger, key_hash) DO UPDATE SET seen_at = excluded.seen_at",
                )?;
                    for k in keys {
                        stmt.execute(params![t, k, now])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn park(
        &mut self,
        trigger: &str,
        key: &str,
        item: &Value,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        let (t, k, item, e) = (
            trigger.to_string(),
            key.to_string(),
            item.to_string(),
            error.to_string(),
        );
        self.conn.run(move |c| {
            let tx = c.transaction()?;
            let now = Utc::now();
            tx.execute(
                "INSERT INTO _idemload_dead_letters (trigger, key_hash, item, error, attempts, parked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![t, k, item, e, attempts, now.to_rfc3339()],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO _idemload_seen (trigger, key_hash, seen_at) VALUES (?1, ?2, ?3)",
                params![t, k, now.timestamp_millis()],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn forget_before(&mut self, trigger: &str, cutoff_ms: i64) -> Result<u64> {
        let t = trigger.to_string();
        self.conn
            .run(move |c| {
                Ok(c.execute(
                    "DELETE FROM _idemload_seen WHERE trigger = ?1 AND seen_at < ?2",
                    params![t, cutoff_ms],
                )? as u64)
            })
            .await
    }

    async fn reset(&mut self, trigger: &str) -> Result<u64> {
        let t = trigger.to_string();
        self.conn
            .run(move |c| {
                let tx = c.transaction()?;
                let n = tx.execute("DELETE FROM _idemload_seen WHERE trigger = ?1", [&t])?;
                tx.execute("DELETE FROM _idemload_triggers WHERE trigger = ?1", [&t])?;
                tx.execute(
                    "DELETE FROM _idemload_dead_letters WHERE trigger = ?1",
                    [&t],
                )?;
                tx.commit()?;
                Ok(n as u64)
            })
            .await
    }

    async fn dead_letters(&mut self, trigger: &str) -> Result<Vec<DeadLetter>> {
        let t = trigger.to_string();
        self.conn
            .run(move |c| {
                let mut stmt = c.prepare(
                "SELECT id, key_hash, item, error, attempts, parked_at FROM _idemload_dead_letters
                 WHERE trigger = ?1 ORDER BY id",
            )?;
                let rows = stmt.query_map([t], |r| {
                    Ok(DeadLetter {
                        handle: r.get::<_, i64>(0)?.to_string(),
                        key_hash: r.get(1)?,
                        item: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or(Value::Null),
                        error: r.get(3)?,
                        attempts: r.get(4)?,
                        parked_at: r.get(5)?,
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
    }

    async fn remove_dead_letter(&mut self, trigger: &str, letter: &DeadLetter) -> Result<()> {
        let (t, id) = (trigger.to_string(), letter.handle.clone());
        self.conn
            .run(move |c| {
                c.execute(
                    "DELETE FROM _idemload_dead_letters WHERE trigger = ?1 AND id = ?2",
                    params![t, id.parse::<i64>().unwrap_or(-1)],
                )?;
                Ok(())
            })
            .await
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop();
        }
    }
}
