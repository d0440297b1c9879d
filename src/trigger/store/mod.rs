//! Seen-key stores: which items a trigger has already fired.
//!
//! Keys live in the store, not in memory, so millions of seen keys cost no
//! RAM; a poll looks its keys up in chunks. The store also holds the
//! trigger's lock (two watchers of one trigger never both fire), whether the
//! first poll primed it, and the dead letters of items whose emission kept
//! failing.

mod postgres;
mod redis;
mod sqlite;

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::connect::Backend;
use crate::error::{Error, Result};
use crate::redact::redact;
use crate::state::LockHolder;

/// Where a trigger remembers what it fired.
#[async_trait]
pub trait SeenStore: Send {
    /// Takes the trigger's lock, or returns its living holder.
    async fn lock(
        &mut self,
        trigger: &str,
        me: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>>;
    /// True once another watcher took the lock over (the lease ran out).
    fn lock_lost(&self) -> bool;
    async fn unlock(&mut self) -> Result<()>;
    /// Whether the first poll already recorded what existed.
    async fn is_primed(&mut self, trigger: &str) -> Result<bool>;
    async fn set_primed(&mut self, trigger: &str) -> Result<()>;
    /// The keys among `keys` that were fired (or parked) before.
    async fn known(&mut self, trigger: &str, keys: &[String]) -> Result<HashSet<String>>;
    /// Records keys as fired; called only after their emission succeeded.
    async fn mark_seen(&mut self, trigger: &str, keys: &[String]) -> Result<()>;
    /// Parks an item whose emission kept failing (and marks its key known).
    async fn park(
        &mut self,
        trigger: &str,
        key: &str,
        item: &Value,
        error: &str,
        attempts: u32,
    ) -> Result<()>;
    /// Forgets keys seen before `cutoff_ms` (epoch milliseconds).
    async fn forget_before(&mut self, trigger: &str, cutoff_ms: i64) -> Result<u64>;
    /// Forgets everything of the trigger: seen keys, the primed mark and the
    /// dead letters. Returns the number of seen keys forgotten.
    async fn reset(&mut self, trigger: &str) -> Result<u64>;
    /// The parked items, oldest first.
    async fn dead_letters(&mut self, trigger: &str) -> Result<Vec<DeadLetter>>;
    /// Removes one dead letter (its key stays seen).
    async fn remove_dead_letter(&mut self, trigger: &str, letter: &DeadLetter) -> Result<()>;
}

/// An item whose emission kept failing.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The store's handle on it (a row id, or the stored text).
    #[serde(skip)]
    pub handle: String,
    /// The idempotency key it was emitted with.
    pub key_hash: String,
    pub item: Value,
    /// The last emission's error.
    pub error: String,
    pub attempts: u32,
    pub parked_at: String,
}

/// Opens the store an URL names: `sqlite://PATH`, `postgres://…` or
/// `redis://HOST:PORT`.
pub async fn open(url: &str) -> Result<Box<dyn SeenStore>> {
    match Backend::of_url(url) {
        Ok(Backend::Sqlite) => Ok(Box::new(sqlite::SqliteStore::open(url).await?)),
        Ok(Backend::Redis) => Ok(Box::new(redis::RedisStore::open(url).await?)),
        Ok(Backend::Postgres) => Ok(Box::new(postgres::PostgresStore::open(url).await?)),
        Ok(Backend::Mysql) | Err(_) => Err(Error::config(format!(
            "[trigger] store = {:?}: use sqlite://PATH, postgres://… or redis://HOST:PORT",
            redact(url)
        ))),
    }
}
