//! `[serve]`: how the ingest endpoint answers (the records land by the
//! pipeline's `[load]` rules).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::parse_duration;
use crate::error::{Error, Result};

/// `[serve]` in a pipeline file.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Requests must carry `Authorization: Bearer <token>` (write
    /// `"${INGEST_TOKEN}"` to keep it out of the file); none: no check.
    pub token: Option<String>,
    /// Largest request body: bytes (`1048576`) or `"10MiB"`, `"512KiB"`,
    /// `"1MB"` (default 10 MiB); larger ones get 413.
    pub max_body: Option<toml::Value>,
    /// How long an `Idempotency-Key` is remembered once its request is done
    /// (default `"7d"`); expired keys are deleted in the background.
    pub key_retention: Option<String>,
    /// How long a stalled request may keep its key (default `"30s"`).
    /// SQLite, MySQL/MariaDB: how long a claim lives before another process
    /// may take its key over (a process killed mid-request leaves its key
    /// answering 409 at most this long). PostgreSQL: how long the request's
    /// transaction may sit idle before the server ends it and frees the key
    /// (a killed process frees it at once).
    pub claim_lease: Option<String>,
    /// Database connections (default 8; SQLite writes one at a time
    /// whatever this says): on MySQL/MariaDB the requests written at the
    /// same time; on PostgreSQL a quarter of them (at least one) write
    /// groups of requests, the others requests written alone.
    pub connections: Option<usize>,
}

impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: never printed, not even in a debug dump.
        f.debug_struct("ServeConfig")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_body", &self.max_body)
            .field("key_retention", &self.key_retention)
            .field("claim_lease", &self.claim_lease)
            .field("connections", &self.connections)
            .finish()
    }
}

/// `[serve]` checked, with its defaults.
#[derive(Clone)]
pub struct ServeSettings {
    pub token: Option<String>,
    pub max_body: usize,
    pub key_retention: Duration,
    pub claim_lease: Duration,
    pub connections: usize,
}

impl fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeSettings")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_body", &self.max_body)
            .field("key_retention", &self.key_retention)
            .field("claim_lease", &self.claim_lease)
            .field("connections", &self.connections)
            .finish()
    }
}

/// 10 MiB.
pub const DEFAULT_MAX_BODY: usize = 10 << 20;

impl ServeConfig {
    /// The settings, or the key that is wrong and why.
    pub(crate) fn checked(&self) -> std::result::Result<ServeSettings, (&'static str, String)> {
        let max_body = match &self.max_body {
            None => DEFAULT_MAX_BODY,
            Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
            Some(toml::Value::String(s)) => parse_size(s).map_err(|e| ("max_body", e))?,
            Some(other) => {
                return Err((
                    "max_body",
                    format!("expected a size in bytes or a string like \"10MiB\", got {other}"),
                ))
            }
        };
        let duration = |key: &'static str, value: &Option<String>, default: &str| {
            parse_duration(value.as_deref().unwrap_or(default)).map_err(|e| (key, e))
        };
        let key_retention = duration("key_retention", &self.key_retention, "7d")?;
        let claim_lease = duration("claim_lease", &self.claim_lease, "30s")?;
        if claim_lease < Duration::from_secs(1) {
            return Err(("claim_lease", "must be at least 1s".into()));
        }
        let connections = self.connections.unwrap_or(8);
        if connections == 0 {
            return Err(("connections", "must be at least 1".into()));
        }
        if matches!(&self.token, Some(t) if t.is_empty()) {
            return Err((
                "token",
                "is empty (is the environment variable it names set to nothing?)".into(),
            ));
        }
        Ok(ServeSettings {
            token: self.token.clone(),
            max_body,
            key_retention,
            claim_lease,
            connections,
        })
    }

    /// The settings (errors name `[serve]` and the key).
    pub fn settings(&self) -> Result<ServeSettings> {
        self.checked()
            .map_err(|(key, e)| Error::config(format!("[serve] {key}: {e}")))
    }
}

/// `1048576`, `"10MiB"`, `"512 KiB"`, `"1MB"`, `"64k"`.
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. \"10MiB\" or 1048576"))?;
    let factor: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    let bytes = number * factor;
    if !(1.0..=(usize::MAX as f64)).contains(&bytes) {
        return Err(format!("{text:?} is not a size of at least one byte"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("300").unwrap(), 300);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn defaults_and_a_token_kept_out_of_debug() {
        let c = ServeConfig {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        let s = c.settings().unwrap();
        assert_eq!(s.max_body, DEFAULT_MAX_BODY);
        assert_eq!(s.key_retention, Duration::from_secs(7 * 86400));
        assert_eq!(s.claim_lease, Duration::from_secs(30));
        assert!(!format!("{c:?}{s:?}").contains("s3cret"));
    }
}
