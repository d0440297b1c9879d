//! Pipeline files: TOML to typed configuration.
//!
//! `[source]` says how records are read, `[destination]` where they go and
//! `[load]` how they land. Every string may use `${VAR}`, replaced from the
//! environment before the file is typed, so a secret never has to be written
//! into the file; [`redact`] keeps secrets out of what is printed.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::key::{parse_duration, Cursor, KeySpec, Lookback};
pub use crate::mode::Mode;
pub use crate::redact::redact;
use crate::source::SourceConfig;

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names the pipeline: its checkpoint, lock and history are kept under it.
    pub name: String,
    pub source: SourceConfig,
    /// Where records land; a pipeline used only by `watch` may leave it out.
    #[serde(default)]
    pub destination: DestinationConfig,
    #[serde(default)]
    pub load: LoadConfig,
    /// The polling trigger of `idemload watch`.
    #[serde(default)]
    pub trigger: Option<crate::trigger::TriggerConfig>,
    /// Monitors and alert added to `audit` (and `run --audit`).
    #[serde(default)]
    pub audit: Option<crate::audit::AuditConfig>,
}

/// `[destination]`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DestinationConfig {
    /// `sqlite://PATH`, `postgres://…`, `mysql://…`.
    #[serde(default)]
    pub url: String,
    /// The target table, created when missing.
    #[serde(default)]
    pub table: String,
    /// Schema (PostgreSQL) the table and bookkeeping live in.
    #[serde(default)]
    pub schema: Option<String>,
    /// `"http"` writes records back to an API (see
    /// [`crate::destination::http::HttpDestinationConfig`]); omitted for
    /// databases, which the URL names.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The `type = "http"` settings, kept as written and checked by the
    /// HTTP destination.
    #[serde(flatten)]
    pub http: std::collections::BTreeMap<String, toml::Value>,
}

/// `[load]`: how records land.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// Fields that identify a record (default `["id"]`).
    pub key: Option<Vec<String>>,
    /// Derive the key from a SHA-256 of these fields (`["*"]`: all).
    pub hash_key: Option<Vec<String>>,
    /// Field that orders versions of a record and drives incremental runs.
    pub cursor: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Re-read this far below the checkpoint: `"15m"`, `"2d"`, or a number.
    pub lookback: Option<toml::Value>,
    /// Low bound of the first run, when there is no checkpoint yet.
    pub initial: Option<toml::Value>,
    /// Records per transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Fail the run once more records than this were rejected.
    pub max_rejects: Option<u64>,
    /// `window` mode: the field whose loaded range is reloaded.
    pub window_field: Option<String>,
    /// A record whose field is `true` deletes the row with its key.
    pub delete_field: Option<String>,
    /// Lease of the run lock, renewed while the run lives.
    #[serde(default = "default_lock_lease")]
    pub lock_lease: String,
    /// A value larger than this (bytes) is rejected with its record.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            key: None,
            hash_key: None,
            cursor: None,
            mode: Mode::Merge,
            lookback: None,
            initial: None,
            batch_size: default_batch_size(),
            max_rejects: None,
            window_field: None,
            delete_field: None,
            lock_lease: default_lock_lease(),
            max_value_bytes: default_max_value_bytes(),
        }
    }
}

fn default_batch_size() -> usize {
    10_000
}
fn default_lock_lease() -> String {
    "30s".into()
}
fn default_max_value_bytes() -> usize {
    1 << 20
}

/// `[load]` checked and typed, as the pipeline uses it.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub key: KeySpec,
    pub cursor: Option<String>,
    pub mode: Mode,
    pub lookback: Lookback,
    pub initial: Option<Cursor>,
    pub batch_size: usize,
    pub max_rejects: Option<u64>,
    pub window_field: Option<String>,
    pub delete_field: Option<String>,
    pub lock_lease: Duration,
    pub max_value_bytes: usize,
}

impl LoadConfig {
    /// Checks the settings against each other.
    pub fn settings(&self) -> Result<LoadSettings> {
        let key = KeySpec::from_settings(self.key.clone(), self.hash_key.clone())?;
        if self.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        let lookback = match &self.lookback {
            None => Lookback::None,
            Some(v) => Lookback::parse(v)?,
        };
        if lookback != Lookback::None && self.cursor.is_none() {
            return Err(Error::config("`lookback` needs a `cursor`"));
        }
        let initial = match &self.initial {
            None => None,
            Some(_) if self.cursor.is_none() => {
                return Err(Error::config("`initial` needs a `cursor`"))
            }
            Some(toml::Value::Integer(i)) => Some(Cursor::Int(*i)),
            Some(toml::Value::String(s)) => Some(Cursor::from_text(s)),
            Some(toml::Value::Datetime(d)) => Some(Cursor::from_text(&d.to_string())),
            Some(other) => {
                return Err(Error::config(format!(
                    "initial = {other}: expected a timestamp string or an integer"
                )))
            }
        };
        if self.mode == Mode::Window && self.window_field.is_none() {
            return Err(Error::config(
                "mode = \"window\" needs `window_field`, the field whose loaded range is reloaded",
            ));
        }
        if self.mode != Mode::Window && self.window_field.is_some() {
            return Err(Error::config(
                "`window_field` only applies to mode = \"window\"",
            ));
        }
        let lock_lease = parse_duration(&self.lock_lease)
            .map_err(|e| Error::config(format!("lock_lease = {:?}: {e}", self.lock_lease)))?;
        if lock_lease < Duration::from_secs(1) {
            return Err(Error::config("lock_lease must be at least 1s"));
        }
        Ok(LoadSettings {
            key,
            cursor: self.cursor.clone(),
            mode: self.mode,
            lookback,
            initial,
            batch_size: self.batch_size,
            max_rejects: self.max_rejects,
            window_field: self.window_field.clone(),
            delete_field: self.delete_field.clone(),
            lock_lease,
            max_value_bytes: self.max_value_bytes,
        })
    }
}

impl PipelineConfig {
    /// Reads a pipeline file, expanding `${VAR}` from the environment.
    pub fn from_file(path: &Path) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))
    }

    /// Parses a pipeline from TOML text.
    pub fn from_toml(text: &str) -> Result<PipelineConfig> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| Error::config(e.message().to_string()))?;
        expand_env(&mut value)?;
        let config: PipelineConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that `[destination]` names a URL and a table.
    pub fn require_destination(&self) -> Result<()> {
        if self.destination.kind.as_deref() == Some("http") {
            return crate::destination::http::HttpDestinationConfig::from_destination(
                &self.destination,
            )
            .map(|_| ());
        }
        if let Some(kind) = &self.destination.kind {
            return Err(Error::config(format!(
                "[destination] type = {kind:?}: use \"http\" for an API, or leave type out and give a database url"
            )));
        }
        if let Some(unknown) = self.destination.http.keys().next() {
            return Err(Error::config(format!(
                "[destination] unknown field `{unknown}` (expected url, table, schema, or type = \"http\" with its settings)"
            )));
        }
        if self.destination.url.trim().is_empty() {
            return Err(Error::config("[destination] url is missing"));
        }
        if self.destination.table.trim().is_empty() {
            return Err(Error::config("[destination] table is missing"));
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(Error::config("`name` must not be empty"));
        }
        if self.trigger.is_none() {
            self.require_destination()?;
        }
        if self.destination.table.starts_with("_idemload") {
            return Err(Error::config(
                "[destination] table: the _idemload prefix is reserved for bookkeeping",
            ));
        }
        self.load.settings()?;
        Ok(())
    }
}

/// Replaces `${VAR}` in every string of the tree.
fn expand_env(value: &mut toml::Value) -> Result<()> {
    match value {
        toml::Value::String(s) if s.contains("${") => *s = expand_str(s)?,
        toml::Value::Array(items) => {
            for item in items {
                expand_env(item)?;
            }
        }
        toml::Value::Table(table) => {
            for (_, item) in table.iter_mut() {
                expand_env(item)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` in one string; an unset variable is a configuration error
/// that names the variable (never a value).
pub fn expand_str(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::config(format!("unclosed ${{ in {:?}", redact(s))))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| {
            Error::config(format!(
                "environment variable {name} is not set (used as ${{{name}}})"
            ))
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_expand_and_missing_ones_are_named() {
        std::env::set_var("IDEMLOAD_TEST_CFG_VAR", "abc");
        assert_eq!(
            expand_str("x-${IDEMLOAD_TEST_CFG_VAR}-y").unwrap(),
            "x-abc-y"
        );
        let err = expand_str("${IDEMLOAD_SURELY_UNSET_VAR}")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IDEMLOAD_SURELY_UNSET_VAR is not set"),
            "{err}"
        );
    }

    #[test]
    fn pipeline_file_parses_and_checks_settings() {
        let config = PipelineConfig::from_toml(
            r#"
            name = "usage"
            [source]
            type = "file"
            path = "exports/*.jsonl"
            [destination]
            url = "sqlite://w.db"
            table = "daily_usage"
            [load]
            key = ["service_line_id", "usage_date"]
            cursor = "updated_at"
            lookback = "2d"
            "#,
        )
        .unwrap();
        let s = config.load.settings().unwrap();
        assert_eq!(s.key.columns(), vec!["service_line_id", "usage_date"]);
        assert_eq!(
            s.lookback,
            Lookback::Duration(Duration::from_secs(2 * 86_400))
        );

        let err = PipelineConfig::from_toml(
            "name = \"x\"\n[source]\ntype = \"file\"\npath = \"a\"\n[destination]\nurl = \"sqlite://a\"\ntable = \"t\"\n[load]\nmode = \"window\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("window_field"), "{err}");
        let err = PipelineConfig::from_toml(
            "name = \"x\"\n[source]\ntype = \"file\"\npath = \"a\"\n[destination]\nurl = \"sqlite://a\"\ntable = \"t\"\n[load]\nkeys = [\"id\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `keys`"), "{err}");
    }
}
