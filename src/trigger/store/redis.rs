//! The Redis seen store, so several machines can share one trigger.
//!
//! Seen keys are a sorted set scored by the time they were seen (retention
//! trims by score); the lock is a key set with `NX PX` holding this
//! watcher's identity, renewed by a heartbeat only while it still holds it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use super::{DeadLetter, SeenStore};
use crate::error::{Error, Result};
use crate::redact::redact;
use crate::state::LockHolder;

pub struct RedisStore {
    url: String,
    conn: MultiplexedConnection,
    lock: Option<(String, String)>,
    lost: Arc<AtomicBool>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

fn err(url: &str, e: redis::RedisError) -> Error {
    Error::destination(format!("redis {}", redact(url)), e)
}

fn seen_key(trigger: &str) -> String {
    format!("idemload:{trigger}:seen")
}

fn dead_key(trigger: &str) -> String {
    format!("idemload:{trigger}:dead_letters")
}

/// Renews the lease only if the value is still ours.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes the lock only if the value is still ours.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

impl RedisStore {
    pub async fn open(url: &str) -> Result<RedisStore> {
        let (conn, _) = crate::connect::redis::connect(url).await?;
        Ok(RedisStore {
            url: url.to_string(),
            conn,
            lock: None,
            lost: Arc::new(AtomicBool::new(false)),
            heartbeat: None,
        })
    }
}

#[async_trait]
impl SeenStore for RedisStore {
    async fn lock(
        &mut self,
        trigger: &str,
        me: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        let key = format!("idemload:{trigger}:lock");
        let value = serde_json::to_string(me).unwrap_or_default();
        let taken: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis() as u64)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        if taken.is_none() {
            let current: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| err(&self.url, e))?;
            let holder = current
                .and_then(|v| serde_json::from_str::<Value>(&v).ok())
                .map(|v| LockHolder {
                    run_id: v["run_id"].as_str().unwrap_or_default().to_string(),
                    host: v["host"].as_str().unwrap_or_default().to_string(),
                    pid: v["pid"].as_u64().unwrap_or_default() as u32,
                    since: v["since"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(Utc::now),
                });
            return match holder {
                Some(h) => Ok(Some(h)),
                // Expired between SET and GET: try again.
                None => Box::pin(self.lock(trigger, me, lease)).await,
            };
        }
        let (mut conn, lost, k, v) = (
            self.conn.clone(),
            self.lost.clone(),
            key.clone(),
            value.clone(),
        );
        self.heartbeat = Some(tokio::spawn(async move {
            let script = redis::Script::new(RENEW);
            loop {
                tokio::time::sleep(lease / 3).await;
                let renewed: redis::RedisResult<i64> = script
                    .key(&k)
                    .arg(&v)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await;
                if let Ok(0) = renewed {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }));
        self.lock = Some((key, value));
        Ok(None)
    }

    fn lock_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    async fn unlock(&mut self) -> Result<()> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some((key, value)) = self.lock.take() {
            let _: i64 = redis::Script::new(RELEASE)
                .key(key)
                .arg(value)
                .invoke_async(&mut self.conn)
                .await
                .map_err(|e| err(&self.url, e))?;
        }
        Ok(())
    }

    async fn is_primed(&mut self, trigger: &str) -> Result<bool> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("idemload:{trigger}:primed"))
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(n > 0)
    }

    async fn set_primed(&mut self, trigger: &str) -> Result<()> {
        let _: () = redis::cmd("SET")
            .arg(format!("idemload:{trigger}:primed"))
            .arg(Utc::now().to_rfc3339())
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(())
    }

    async fn known(&mut self, trigger: &str, keys: &[String]) -> Result<HashSet<String>> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(seen_key(trigger))
            .arg(keys)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(keys
            .iter()
            .zip(scores)
            .filter(|(_, s)| s.is_some())
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn mark_seen(&mut self, trigger: &str, keys: &[String]) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        for chunk in keys.chunks(1000) {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(seen_key(trigger));
            for k in chunk {
                cmd.arg(now).arg(k);
            }
            let _: i64 = cmd
                .query_async(&mut self.conn)
                .await
                .map_err(|e| err(&self.url, e))?;
        }
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
        let letter = serde_json::json!({
            "key_hash": key, "item": item, "error": error, "attempts": attempts,
            "parked_at": Utc::now().to_rfc3339(),
        });
        let _: () = redis::pipe()
            .atomic()
            .cmd("RPUSH")
            .arg(dead_key(trigger))
            .arg(letter.to_string())
            .ignore()
            .cmd("ZADD")
            .arg(seen_key(trigger))
            .arg(Utc::now().timestamp_millis())
            .arg(key)
            .ignore()
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(())
    }

    async fn forget_before(&mut self, trigger: &str, cutoff_ms: i64) -> Result<u64> {
        let n: u64 = redis::cmd("ZREMRANGEBYSCORE")
            .arg(seen_key(trigger))
            .arg("-inf")
            .arg(format!("({cutoff_ms}"))
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(n)
    }

    async fn reset(&mut self, trigger: &str) -> Result<u64> {
        let (n, _): (u64, i64) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg(seen_key(trigger))
            .cmd("DEL")
            .arg(seen_key(trigger))
            .arg(format!("idemload:{trigger}:primed"))
            .arg(dead_key(trigger))
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(n)
    }

    async fn dead_letters(&mut self, trigger: &str) -> Result<Vec<DeadLetter>> {
        let texts: Vec<String> = redis::cmd("LRANGE")
            .arg(dead_key(trigger))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(texts
            .into_iter()
            .map(|text| {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let field = |name: &str| v[name].as_str().unwrap_or_default().to_string();
                DeadLetter {
                    key_hash: field("key_hash"),
                    item: v["item"].clone(),
                    error: field("error"),
                    attempts: v["attempts"].as_u64().unwrap_or(0) as u32,
                    parked_at: field("parked_at"),
                    handle: text,
                }
            })
            .collect())
    }

    async fn remove_dead_letter(&mut self, trigger: &str, letter: &DeadLetter) -> Result<()> {
        let _: i64 = redis::cmd("LREM")
            .arg(dead_key(trigger))
            .arg(1)
            .arg(&letter.handle)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| err(&self.url, e))?;
        Ok(())
    }
}
