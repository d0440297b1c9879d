//! Emitters: how a trigger fires an item.
//!
//! An emission is confirmed (stdout written, a 2xx answer, exit code 0)
//! before the item's key is marked seen. Every event carries the same
//! idempotency key on every attempt and after every restart: a stable hash
//! of the pipeline and the item's key.

mod exec;
mod stdout;
mod webhook;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;

/// `[trigger.emit]`, by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum EmitConfig {
    /// One JSON line per item on stdout.
    Stdout,
    /// POST the item as JSON, with an `Idempotency-Key` header; 2xx confirms.
    Webhook {
        /// Where to POST.
        url: String,
        /// Extra headers (`${VAR}` for secrets).
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Request timeout.
        #[serde(default = "default_timeout")]
        timeout: String,
    },
    /// Run a command (through `sh -c`) with the item as JSON on stdin and
    /// `IDEMLOAD_IDEMPOTENCY_KEY` in its environment; exit 0 confirms.
    Exec { command: String },
}

fn default_timeout() -> String {
    "10s".into()
}

/// One item to fire.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub pipeline: String,
    /// The item's trigger key values.
    pub key: Value,
    /// Stable hash of the pipeline and the key.
    pub idempotency_key: String,
    pub item: Value,
}

/// Why an emission failed; `retryable` failures are tried again.
#[derive(Debug, Clone)]
pub struct EmitError {
    pub message: String,
    pub retryable: bool,
}

/// Fires events.
#[async_trait]
pub trait Emitter: Send {
    async fn emit(&mut self, event: &Event) -> std::result::Result<(), EmitError>;
}

/// Builds the emitter a configuration names.
pub fn open(config: &EmitConfig) -> Result<Box<dyn Emitter>> {
    Ok(match config {
        EmitConfig::Stdout => Box::new(stdout::Stdout),
        EmitConfig::Webhook {
            url,
            headers,
            timeout,
        } => Box::new(webhook::Webhook::new(url, headers, timeout)?),
        EmitConfig::Exec { command } => Box::new(exec::Exec {
            command: command.clone(),
        }),
    })
}
