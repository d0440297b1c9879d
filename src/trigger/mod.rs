//! `watch`: a "new item" / "updated item" trigger over a source that can
//! only be polled.
//!
//! Each poll reads the source, keys every item (`[trigger] key`; add the
//! update time for an "updated item" trigger), looks the keys up in the
//! seen store and fires the unknown ones oldest first. A key is marked seen
//! only after its emission is confirmed, and every attempt carries the same
//! idempotency key, so a crash between confirmation and marking re-fires an
//! item with the key the receiver already knows. An item whose emission
//! keeps failing is parked in the store's dead letters and does not hold up
//! the items behind it. The first poll only records what exists (`prime`).

pub mod config;
pub mod emit;
pub mod store;

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use self::config::TriggerConfig;
use self::emit::Event;
pub use self::store::DeadLetter;
use self::store::SeenStore;
use crate::config::PipelineConfig;
use crate::error::{Error, Result};
use crate::key::{parse_duration, Cursor, KeySpec};
use crate::record::Item;
use crate::source::{self, SourceQuery};
use crate::state::LockHolder;
use crate::stop::StopToken;

/// How this process watches.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Poll once and return.
    pub once: bool,
    /// Wait this long for another watcher's lock instead of failing.
    pub wait: Option<Duration>,
    /// Stops watching cleanly when asked: a poll being read is abandoned
    /// (nothing of it is marked seen), an emission under way finishes and
    /// is marked, then the lock is released.
    pub stop: StopToken,
}

/// What one poll did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PollReport {
    pub pipeline: String,
    pub poll: u64,
    /// Items read (rejected input included).
    pub read: u64,
    /// Items read that carry no usable key (logged, not fired).
    pub rejected: u64,
    /// Items not seen before.
    pub new: u64,
    /// New items recorded without firing (the priming poll).
    pub primed: u64,
    pub emitted: u64,
    /// Items parked as dead letters.
    pub parked: u64,
    /// Keys forgotten by retention.
    pub forgotten: u64,
}

/// The checked `[trigger]` settings.
struct Settings {
    interval: Duration,
    key: KeySpec,
    order_by: Option<String>,
    retention: Option<Duration>,
    backoff: Duration,
    lease: Duration,
}

fn settings(config: &PipelineConfig) -> Result<(&TriggerConfig, Settings)> {
    let t = config
        .trigger
        .as_ref()
        .ok_or_else(|| Error::config("the pipeline has no [trigger] section: `watch` needs one"))?;
    let duration = |name: &str, v: &str| {
        parse_duration(v).map_err(|e| Error::config(format!("[trigger] {name} = {v:?}: {e}")))
    };
    if t.key.is_empty() {
        return Err(Error::config("[trigger] key needs at least one field"));
    }
    if t.attempts == 0 {
        return Err(Error::config("[trigger] attempts must be at least 1"));
    }
    Ok((
        t,
        Settings {
            interval: duration("interval", &t.interval)?,
            key: KeySpec::Fields(t.key.clone()),
            order_by: t.order_by.clone().or_else(|| config.load.cursor.clone()),
            retention: t
                .retention
                .as_deref()
                .map(|r| duration("retention", r))
                .transpose()?,
            backoff: duration("backoff", &t.backoff)?,
            lease: duration("lock_lease", &t.lock_lease)?,
        },
    ))
}

/// The idempotency key of an item: a stable hash of pipeline and key.
pub fn idempotency_key(pipeline: &str, canonical_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(pipeline.as_bytes());
    h.update([0]);
    h.update(canonical_key.as_bytes());
    hex::encode(h.finalize())
}

/// Watches a pipeline's source, calling `on_poll` after each poll.
pub async fn watch(
    config: &PipelineConfig,
    options: &WatchOptions,
    on_poll: &mut (dyn FnMut(&PollReport) + Send),
) -> Result<()> {
    let (trigger, s) = settings(config)?;
    let mut store = store::open(&trigger.store).await?;
    let mut emitter = emit::open(&trigger.emit)?;
    let stop = &options.stop;
    acquire(config, store.as_mut(), &s, options.wait, stop).await?;
    let result = async {
        let mut n = 0;
        loop {
            n += 1;
            let polled = poll(
                config,
                trigger,
                &s,
                store.as_mut(),
                emitter.as_mut(),
                n,
                stop,
            )
            .await?;
            if let Some(report) = polled {
                on_poll(&report);
            }
            if options.once || stop.is_stopped() {
                return Ok(());
            }
            if stop
                .unless_stopped(tokio::time::sleep(s.interval))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = store.unlock().await {
        tracing::warn!(error = %e, "Could not release the trigger's lock; it frees itself when its lease runs out.");
    }
    result
}

/// Takes the trigger's lock, waiting up to `wait` for another watcher (or
/// until a stop is asked for).
async fn acquire(
    config: &PipelineConfig,
    store: &mut dyn SeenStore,
    s: &Settings,
    wait: Option<Duration>,
    stop: &StopToken,
) -> Result<()> {
    let name = format!("watch:{}", config.name);
    let me = LockHolder::this_process(&uuid::Uuid::now_v7().to_string());
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        match store.lock(&name, &me, s.lease).await? {
            None => return Ok(()),
            Some(_) if deadline.is_some_and(|d| Instant::now() < d) => {
                let pause = tokio::time::sleep(Duration::from_millis(200));
                if stop.unless_stopped(pause).await.is_none() {
                    return Err(Error::Interrupted {
                        pipeline: config.name.clone(),
                    });
                }
            }
            Some(holder) => {
                return Err(Error::Locked {
                    pipeline: config.name.clone(),
                    holder,
                })
            }
        }
    }
}

/// Runs `f` on the trigger's store under its lock.
async fn with_store<T>(
    config: &PipelineConfig,
    options: &WatchOptions,
    f: impl for<'a> FnOnce(
        &'a mut dyn SeenStore,
        &'a TriggerConfig,
        &'a Settings,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
    >,
) -> Result<T> {
    let (trigger, s) = settings(config)?;
    let mut store = store::open(&trigger.store).await?;
    acquire(config, store.as_mut(), &s, options.wait, &options.stop).await?;
    let result = f(store.as_mut(), trigger, &s).await;
    if let Err(e) = store.unlock().await {
        tracing::warn!(error = %e, "Could not release the trigger's lock; it frees itself when its lease runs out.");
    }
    result
}

/// `watch --reset`: forgets the seen keys, the primed mark and the dead
/// letters, so the next poll starts afresh (priming again when `prime`).
/// Returns the number of seen keys forgotten.
pub async fn reset(config: &PipelineConfig, options: &WatchOptions) -> Result<u64> {
    let name = format!("watch:{}", config.name);
    with_store(config, options, move |store, _, _| {
        Box::pin(async move { store.reset(&name).await })
    })
    .await
}

/// `watch --dead-letters`: the parked items, oldest first.
pub async fn dead_letters(config: &PipelineConfig) -> Result<Vec<DeadLetter>> {
    let (trigger, _) = settings(config)?;
    let mut store = store::open(&trigger.store).await?;
    store.dead_letters(&format!("watch:{}", config.name)).await
}

/// What `watch --redrive` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    pub pipeline: String,
    /// Dead letters emitted successfully (and removed).
    pub redriven: u64,
    /// Dead letters whose emission failed again (still parked).
    pub failed: u64,
}

/// `watch --redrive`: emits every parked item once more (with the
/// trigger's attempts and backoff and its original idempotency key); an
/// item whose emission succeeds leaves the dead letters.
pub async fn redrive(config: &PipelineConfig, options: &WatchOptions) -> Result<RedriveReport> {
    let name = format!("watch:{}", config.name);
    let pipeline = config.name.clone();
    with_store(config, options, move |store, trigger, s| {
        Box::pin(async move {
            let mut emitter = emit::open(&trigger.emit)?;
            let mut report = RedriveReport {
                pipeline: pipeline.clone(),
                ..Default::default()
            };
            for letter in store.dead_letters(&name).await? {
                let key = match crate::record::Fields::try_from(letter.item.clone())
                    .ok()
                    .and_then(|f| s.key.key_of(&f, None).ok())
                {
                    Some(k) => Value::Array(k.values().to_vec()),
                    None => Value::Null,
                };
                let event = Event {
                    pipeline: pipeline.clone(),
                    key,
                    idempotency_key: letter.key_hash.clone(),
                    item: letter.item.clone(),
                };
                match fire(emitter.as_mut(), &event, trigger.attempts, s.backoff).await {
                    Ok(()) => {
                        store
                            .mark_seen(&name, std::slice::from_ref(&letter.key_hash))
                            .await?;
                        store.remove_dead_letter(&name, &letter).await?;
                        report.redriven += 1;
                    }
                    Err((message, attempts)) => {
                        tracing::error!(pipeline = %pipeline, key = %event.key, attempts, error = %message, "Redrive failed; the item stays parked.");
                        report.failed += 1;
                    }
                }
            }
            Ok(report)
        })
    })
    .await
}

/// One item of a poll.
struct Candidate {
    order: Option<Cursor>,
    index: usize,
    key: Value,
    hash: String,
    item: Value,
}

/// One poll; `None` when a stop came while the source was read (nothing of
/// the poll is marked seen, so the next watch reads it again).
async fn poll(
    config: &PipelineConfig,
    trigger: &TriggerConfig,
    s: &Settings,
    store: &mut dyn SeenStore,
    emitter: &mut dyn emit::Emitter,
    n: u64,
    stop: &StopToken,
) -> Result<Option<PollReport>> {
    let name = format!("watch:{}", config.name);
    let mut report = PollReport {
        pipeline: config.name.clone(),
        poll: n,
        ..Default::default()
    };
    let query = SourceQuery {
        cursor: s.order_by.clone(),
        low: None,
        high: None,
        batch_size: 10_000,
        max_record_bytes: 64 << 20,
        loaded_files: None,
        max_value_bytes: None,
    };
    let Some(source) = stop
        .unless_stopped(source::open(&config.source, &query))
        .await
    else {
        return Ok(None);
    };
    let mut source = source?;
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut by_hash = std::collections::HashMap::new();
    loop {
        let Some(next) = stop.unless_stopped(source.next_batch()).await else {
            return Ok(None);
        };
        let Some(items) = next? else { break };
        for item in items {
            if matches!(item, Item::FileLoaded(_) | Item::FileSkipped) {
                continue;
            }
            report.read += 1;
            let record = match item {
                Item::Record(r) => r,
                Item::Skipped | Item::FileLoaded(_) | Item::FileSkipped => continue,
                Item::Reject(r) => {
                    report.rejected += 1;
                    tracing::warn!(at = %r.source, reason = %r.reason, "Item not usable.");
                    continue;
                }
            };
            let key = match s.key.key_of(&record.fields, None) {
                Ok(k) => k,
                Err(reason) => {
                    report.rejected += 1;
                    tracing::warn!(at = %record.source, %reason, "Item not usable.");
                    continue;
                }
            };
            let order = s
                .order_by
                .as_ref()
                .and_then(|f| record.fields.get(f))
                .and_then(Cursor::from_json);
            let hash = idempotency_key(&config.name, key.canonical());
            let candidate = Candidate {
                order,
                index: candidates.len(),
                key: Value::Array(key.values().to_vec()),
                hash: hash.clone(),
                item: record.fields.into(),
            };
            // Overlapping pages repeat items: keep one per key.
            match by_hash.get(&hash) {
                Some(&i) => {
                    candidates[i] = Candidate {
                        index: i,
                        ..candidate
                    }
                }
                None => {
                    by_hash.insert(hash, candidates.len());
                    candidates.push(candidate);
                }
            }
        }
    }
    // Oldest first; items without an order value keep their input order, last.
    candidates.sort_by(|a, b| match (&a.order, &b.order) {
        (Some(x), Some(y)) => x.cmp(y).then(a.index.cmp(&b.index)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.index.cmp(&b.index),
    });
    let mut fresh = Vec::new();
    for chunk in candidates.chunks(1000) {
        let hashes: Vec<String> = chunk.iter().map(|c| c.hash.clone()).collect();
        let known = store.known(&name, &hashes).await?;
        fresh.extend(chunk.iter().filter(|c| !known.contains(&c.hash)));
    }
    report.new = fresh.len() as u64;
    let primed = store.is_primed(&name).await?;
    if trigger.prime && !primed {
        for chunk in fresh.chunks(1000) {
            let hashes: Vec<String> = chunk.iter().map(|c| c.hash.clone()).collect();
            store.mark_seen(&name, &hashes).await?;
        }
        store.set_primed(&name).await?;
        report.primed = report.new;
    } else {
        if !primed {
            store.set_primed(&name).await?;
        }
        for c in fresh {
            // Each item is emitted and marked before the next: stopping
            // here leaves every emitted item marked.
            if stop.is_stopped() {
                break;
            }
            if store.lock_lost() {
                return Err(Error::LockLost {
                    pipeline: config.name.clone(),
                });
            }
            let event = Event {
                pipeline: config.name.clone(),
                key: c.key.clone(),
                idempotency_key: c.hash.clone(),
                item: c.item.clone(),
            };
            match fire(emitter, &event, trigger.attempts, s.backoff).await {
                Ok(()) => {
                    store
                        .mark_seen(&name, std::slice::from_ref(&c.hash))
                        .await?;
                    report.emitted += 1;
                }
                Err((message, attempts)) => {
                    tracing::error!(pipeline = %config.name, key = %c.key, attempts, error = %message, "Item parked as a dead letter.");
                    store
                        .park(&name, &c.hash, &c.item, &message, attempts)
                        .await?;
                    report.parked += 1;
                }
            }
        }
    }
    if let Some(retention) = s.retention {
        let cutoff = Utc::now().timestamp_millis() - retention.as_millis() as i64;
        report.forgotten = store.forget_before(&name, cutoff).await?;
    }
    tracing::info!(pipeline = %config.name, poll = n, read = report.read, new = report.new, emitted = report.emitted, "Poll done.");
    Ok(Some(report))
}

/// Emits with retries; on failure returns the last error and the attempts made.
async fn fire(
    emitter: &mut dyn emit::Emitter,
    event: &Event,
    attempts: u32,
    backoff: Duration,
) -> std::result::Result<(), (String, u32)> {
    let mut delay = backoff;
    for attempt in 1..=attempts {
        match emitter.emit(event).await {
            Ok(()) => return Ok(()),
            Err(e) if !e.retryable || attempt == attempts => return Err((e.message, attempt)),
            Err(e) => {
                tracing::warn!(key = %event.key, attempt, error = %e.message, "Emission failed; retrying.");
                // Jitter: up to a quarter of the delay, from the clock.
                let jitter = Duration::from_nanos(
                    u64::from(Utc::now().timestamp_subsec_nanos())
                        % (delay.as_nanos() as u64 / 4 + 1),
                );
                tokio::time::sleep(delay + jitter).await;
                delay *= 2;
            }
        }
    }
    Err(("no attempt made".into(), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_stable_and_distinct_per_pipeline() {
        let a = idempotency_key("p", "[1]");
        assert_eq!(a, idempotency_key("p", "[1]"));
        assert_ne!(a, idempotency_key("q", "[1]"));
        assert_ne!(a, idempotency_key("p", "[\"1\"]"));
        assert_eq!(a.len(), 64);
    }
}
