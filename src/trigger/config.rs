//! `[trigger]`: how `idemload watch` polls, keys, stores and emits.

use serde::Deserialize;

use super::emit::EmitConfig;

/// `[trigger]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Time between polls.
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Fields that identify an item; `["id", "updated_at"]` fires again when
    /// the update time changes.
    #[serde(default = "default_key")]
    pub key: Vec<String>,
    /// The first poll records what exists without firing.
    #[serde(default = "default_true")]
    pub prime: bool,
    /// Where seen keys live: `sqlite://PATH`, `postgres://…` or
    /// `redis://HOST:PORT`.
    #[serde(default = "default_store")]
    pub store: String,
    /// Forget keys seen longer ago than this (`90d`). An item that re-appears
    /// after it was forgotten fires again.
    pub retention: Option<String>,
    /// Field that orders items oldest first (default: `[load] cursor`).
    pub order_by: Option<String>,
    /// Emission attempts before an item is parked as a dead letter.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First delay between attempts, doubled each time (with jitter).
    #[serde(default = "default_backoff")]
    pub backoff: String,
    /// Lease of the trigger's lock, renewed while the watcher lives.
    #[serde(default = "default_lease")]
    pub lock_lease: String,
    #[serde(default = "default_emit")]
    pub emit: EmitConfig,
}

fn default_interval() -> String {
    "30s".into()
}
fn default_key() -> Vec<String> {
    vec!["id".into()]
}
fn default_true() -> bool {
    true
}
fn default_store() -> String {
    "sqlite://.idemload/seen.db".into()
}
fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> String {
    "500ms".into()
}
fn default_lease() -> String {
    "30s".into()
}
fn default_emit() -> EmitConfig {
    EmitConfig::Stdout
}
