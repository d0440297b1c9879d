//! Pipeline files: TOML to typed configuration.
//!
//! `[source]` says how records are read, `[destination]` where they go and
//! `[load]` how they land. Every string may use `${VAR}`, replaced from the
//! environment before the file is typed, so a secret never has to be written
//! into the file; [`redact`] keeps secrets out of what is printed.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

mod parse;
#[cfg(test)]
mod reference;

use self::parse::{Mistake, PathPart};
pub use crate::destination::config::{DestinationConfig, TableDestination};
use crate::destination::config::{MISSING_URL, UNKNOWN_DESTINATION_TYPE};
use crate::destination::http::config::HttpDestinationConfig;
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
    /// Where records are read; absent in a pipeline fed by `idemload serve`.
    #[serde(default)]
    pub source: SourceConfig,
    /// Where records land; a pipeline used only by `watch` may leave it out.
    #[serde(default)]
    pub destination: DestinationConfig,
    #[serde(default)]
    pub load: LoadConfig,
    /// The polling trigger of `idemload watch`.
    #[serde(default)]
    pub trigger: Option<crate::trigger::config::TriggerConfig>,
    /// Monitors and alert added to `audit` (and `run --audit`).
    #[serde(default)]
    pub audit: Option<crate::audit::monitors::AuditConfig>,
    /// The ingest endpoint of `idemload serve`.
    #[serde(default)]
    pub serve: Option<crate::serve::config::ServeConfig>,
}

/// A list of field names, or one name alone (`"id"` is `["id"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a field name or a list of field names")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(name) => vec![name],
        OneOrMany::Many(names) => names,
    }))
}

/// `[load]`: how records land.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// Fields that identify a record (default `["id"]`; one field may be
    /// written alone, `key = "id"`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub key: Option<Vec<String>>,
    /// Derive the key from a SHA-256 of these fields (`["*"]`: all).
    #[serde(default, deserialize_with = "one_or_many")]
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
    /// `idemload backfill`: the span of a window (`"1d"`, or a number for
    /// an integer cursor) when `--window` is not given.
    pub window: Option<toml::Value>,
    /// Lease of the run lock, renewed while the run lives.
    #[serde(default = "default_lock_lease")]
    pub lock_lease: String,
    /// A value larger than this (bytes) is rejected with its record.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// A column holding the time of the row's last real change.
    pub loaded_at: Option<String>,
    /// Numeric columns whose new value counts as unchanged within this
    /// absolute distance of the stored one: `{ consumed_gb = 0.01 }`.
    #[serde(default)]
    pub tolerance: std::collections::BTreeMap<String, toml::Value>,
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
            window: None,
            lock_lease: default_lock_lease(),
            max_value_bytes: default_max_value_bytes(),
            loaded_at: None,
            tolerance: Default::default(),
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
    /// The default span of a backfill window.
    pub window: Option<crate::windows::Span>,
    pub lock_lease: Duration,
    pub max_value_bytes: usize,
    /// `loaded_at` and `tolerance`: when a stored row counts as unchanged.
    pub compare: crate::destination::compare::Compare,
}

impl LoadConfig {
    /// Checks the settings against each other.
    pub fn settings(&self) -> Result<LoadSettings> {
        self.checked().map_err(|(key, e)| match key {
            Some(key) => Error::config(format!("{key}: {e}")),
            None => e,
        })
    }

    /// [`settings`](LoadConfig::settings), naming the key at fault.
    fn checked(&self) -> std::result::Result<LoadSettings, (Option<&'static str>, Error)> {
        let at = |key: &'static str| move |e: Error| (Some(key), e);
        let fail = |key: &'static str, message: &str| Err((Some(key), Error::config(message)));
        let key = KeySpec::from_settings(self.key.clone(), self.hash_key.clone())
            .map_err(|e| (None, e))?;
        if self.batch_size == 0 {
            return fail("batch_size", "must be at least 1");
        }
        let lookback = match &self.lookback {
            None => Lookback::None,
            Some(v) => Lookback::parse(v).map_err(at("lookback"))?,
        };
        if lookback != Lookback::None && self.cursor.is_none() {
            return fail("lookback", "needs a `cursor`");
        }
        let initial = match &self.initial {
            None => None,
            Some(_) if self.cursor.is_none() => return fail("initial", "needs a `cursor`"),
            Some(toml::Value::Integer(i)) => Some(Cursor::Int(*i)),
            Some(toml::Value::String(s)) => Some(Cursor::from_text(s)),
            Some(toml::Value::Datetime(d)) => Some(Cursor::from_text(&d.to_string())),
            Some(other) => {
                return Err((
                    Some("initial"),
                    Error::config(format!(
                        "{other}: expected a timestamp string or an integer"
                    )),
                ))
            }
        };
        if self.mode == Mode::Window && self.window_field.is_none() {
            return fail(
                "mode",
                "mode = \"window\" needs `window_field`, the field whose loaded range is reloaded",
            );
        }
        if self.mode != Mode::Window && self.window_field.is_some() {
            return fail("window_field", "only applies to mode = \"window\"");
        }
        let lock_lease = parse_duration(&self.lock_lease).map_err(|e| {
            (
                Some("lock_lease"),
                Error::config(format!("{:?}: {e}", self.lock_lease)),
            )
        })?;
        if lock_lease < Duration::from_secs(1) {
            return fail("lock_lease", "must be at least 1s");
        }
        let window = match &self.window {
            None => None,
            Some(v) => Some(crate::windows::Span::from_toml(v).map_err(at("window"))?),
        };
        let compare = self
            .compare(&key)
            .map_err(|(k, m)| (Some(k), Error::config(m)))?;
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
            window,
            lock_lease,
            max_value_bytes: self.max_value_bytes,
            compare,
        })
    }

    /// `loaded_at` and `tolerance`, checked against the fields with other
    /// roles: a key, cursor or window field is always compared exactly.
    fn compare(
        &self,
        key: &KeySpec,
    ) -> std::result::Result<crate::destination::compare::Compare, (&'static str, String)> {
        let mut roles: Vec<(String, &str)> =
            key.columns().into_iter().map(|c| (c, "a key")).collect();
        roles.extend(self.cursor.iter().map(|c| (c.clone(), "the cursor")));
        roles.extend(
            self.window_field
                .iter()
                .map(|c| (c.clone(), "the window_field")),
        );
        roles.extend(
            self.delete_field
                .iter()
                .map(|c| (c.clone(), "the delete_field")),
        );
        let role = |name: &str| roles.iter().find(|(c, _)| c == name).map(|(_, r)| *r);
        if let Some(column) = &self.loaded_at {
            if column.trim().is_empty() {
                return Err(("loaded_at", "must name a column".into()));
            }
            if column.starts_with("_idemload") {
                return Err((
                    "loaded_at",
                    "the _idemload prefix is reserved for bookkeeping".into(),
                ));
            }
            if let Some(role) = role(column) {
                return Err((
                    "loaded_at",
                    format!(
                        "{column:?} is {role} field; the load-time column needs a name of its own"
                    ),
                ));
            }
        }
        let mut tolerance = Vec::new();
        for (column, value) in &self.tolerance {
            let distance = match value {
                toml::Value::Float(f) => *f,
                toml::Value::Integer(i) => *i as f64,
                other => {
                    return Err((
                        "tolerance",
                        format!("{column}: {other} is not a number; write a distance such as {column} = 0.01"),
                    ))
                }
            };
            if !distance.is_finite() || distance < 0.0 {
                return Err((
                    "tolerance",
                    format!("{column}: must be a distance of 0 or more"),
                ));
            }
            if let Some(role) = role(column) {
                return Err((
                    "tolerance",
                    format!("{column:?} is {role} field, which is always compared exactly"),
                ));
            }
            if self.loaded_at.as_deref() == Some(column.as_str()) {
                return Err(("tolerance", format!("{column:?} is the loaded_at column")));
            }
            tolerance.push((column.clone(), distance));
        }
        Ok(crate::destination::compare::Compare {
            loaded_at: self.loaded_at.clone(),
            tolerance,
        })
    }
}

impl PipelineConfig {
    /// Reads a pipeline file, expanding `${VAR}` from the environment.
    ///
    /// An error names the file, line and column, the key path
    /// (`[load].batch_size`) and, for an unknown key, the closest known one.
    pub fn from_file(path: &Path) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        Self::parse(&text, Some(&path.display().to_string()))
    }

    /// Parses a pipeline from TOML text (errors say `line L, column C`).
    pub fn from_toml(text: &str) -> Result<PipelineConfig> {
        Self::parse(text, None)
    }

    fn parse(text: &str, origin: Option<&str>) -> Result<PipelineConfig> {
        let root = match parse::tree(text) {
            Ok(root) => root,
            Err(mistake) => {
                return Err(mistake.into_error(text, origin, &Default::default()));
            }
        };
        let located = |m: Mistake| m.into_error(text, origin, root.get_ref());
        let config: PipelineConfig = parse::typed(&root).map_err(|m| {
            located(match m.path.as_slice() {
                // `[source]` is read whole to find its `type`: read it again
                // as that type to reach the key inside it.
                [PathPart::Key(k)] if k == "source" => source_mistake(&root, m),
                [PathPart::Key(k)] if k == "destination" => destination_mistake(&root, m),
                _ => m,
            })
        })?;
        config.validate().map_err(located)?;
        Ok(config)
    }

    /// Checks that `[destination]` names a URL and a table.
    pub fn require_destination(&self) -> Result<()> {
        self.check_destination().map_err(|m| m.into_plain())
    }

    fn check_destination(&self) -> std::result::Result<(), Mistake> {
        let table = match &self.destination {
            DestinationConfig::Http(http) => {
                return http.check().map_err(|e| {
                    // Its messages name `[destination]` already.
                    let message = e.to_string();
                    let message = message.strip_prefix("[destination] ").unwrap_or(&message);
                    Mistake::new(&["destination"], message)
                });
            }
            DestinationConfig::Table(table) => table,
            DestinationConfig::Absent => return Err(Mistake::new(&["destination"], MISSING_URL)),
        };
        if table.url.trim().is_empty() {
            return Err(Mistake::new(&["destination"], MISSING_URL));
        }
        if table.table.trim().is_empty() {
            return Err(Mistake::new(&["destination"], "missing key `table`"));
        }
        Ok(())
    }

    fn validate(&self) -> std::result::Result<(), Mistake> {
        if self.name.trim().is_empty() {
            return Err(Mistake::new(&["name"], "must not be empty"));
        }
        if matches!(self.source, SourceConfig::Absent) && self.serve.is_none() {
            return Err(Mistake::new(
                &[],
                "missing [source] (a pipeline fed only by `idemload serve` has a [serve] section instead)",
            ));
        }
        if let Some(serve) = &self.serve {
            serve
                .checked()
                .map(drop)
                .map_err(|(key, e)| Mistake::new(&["serve", key], e))?;
        }
        if self.trigger.is_none() {
            self.check_destination()?;
        }
        if self.destination.table().starts_with("_idemload") {
            return Err(Mistake::new(
                &["destination", "table"],
                "the _idemload prefix is reserved for bookkeeping",
            ));
        }
        self.load.checked().map_err(|(key, e)| match key {
            Some(key) => Mistake::new(&["load", key], e.to_string()),
            None => Mistake::new(&["load"], e.to_string()),
        })?;
        if self.destination.http().is_some() {
            if self.load.loaded_at.is_some() {
                return Err(Mistake::new(
                    &["load", "loaded_at"],
                    "applies to a table destination; an API keeps its own times",
                ));
            }
            if !self.load.tolerance.is_empty() {
                return Err(Mistake::new(
                    &["load", "tolerance"],
                    "applies to a table destination; an http destination resends a record whenever its content changes",
                ));
            }
        }
        Ok(())
    }
}

/// Locates a mistake serde found somewhere in `[source]`.
fn source_mistake(root: &toml::Spanned<toml::de::DeTable<'_>>, mistake: Mistake) -> Mistake {
    use crate::source::{FileSourceConfig, HttpSourceConfig, SqlSourceConfig};
    if mistake.message.starts_with("unknown value") || mistake.message.contains("`type`") {
        let mut m = mistake;
        if m.message.starts_with("unknown value") {
            m.path.push(PathPart::Key("type".into()));
            m.span = None;
        }
        return m;
    }
    let kind = table_type(root, "source");
    let at = ["source"];
    let skip = ["type"];
    let refined = match kind.as_deref() {
        Some("file") => parse::typed_at::<FileSourceConfig>(root, &at, &skip),
        Some("http") => parse::typed_at::<HttpSourceConfig>(root, &at, &skip),
        Some("sql") => parse::typed_at::<SqlSourceConfig>(root, &at, &skip),
        _ => None,
    };
    refined.unwrap_or(mistake)
}

/// Locates a mistake serde found somewhere in `[destination]`, read whole
/// to find its `type`: reads it again as that type.
fn destination_mistake(root: &toml::Spanned<toml::de::DeTable<'_>>, mistake: Mistake) -> Mistake {
    if let Some(kind) = mistake.message.strip_prefix(UNKNOWN_DESTINATION_TYPE) {
        return Mistake::new(&["destination", "type"], kind);
    }
    let at = ["destination"];
    let skip = ["type"];
    let refined = match table_type(root, "destination").as_deref() {
        Some("http") => parse::typed_at::<HttpDestinationConfig>(root, &at, &skip),
        _ => parse::typed_at::<TableDestination>(root, &at, &skip),
    };
    refined.unwrap_or(mistake)
}

/// The `type` of a top-level table, when it is a string.
fn table_type(root: &toml::Spanned<toml::de::DeTable<'_>>, section: &str) -> Option<String> {
    root.get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == section)
        .and_then(|(_, v)| match v.get_ref() {
            toml::de::DeValue::Table(t) => t
                .iter()
                .find(|(k, _)| k.get_ref() == "type")
                .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string)),
            _ => None,
        })
}

/// Expands `${VAR}` and `${VAR:-default}` (the default when `VAR` is unset
/// or empty) in one string; an unset variable without a default is a
/// configuration error that names the variable (never a value).
pub fn expand_str(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            Error::config(format!(
                "unclosed ${{ in {:?}: write ${{VAR}} or ${{VAR:-default}}",
                redact(s)
            ))
        })?;
        let (name, default) = match after[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&after[..end], None),
        };
        let value = match (std::env::var(name), default) {
            (Ok(v), Some(d)) if v.is_empty() => d.to_string(),
            (Ok(v), _) => v,
            (Err(_), Some(d)) => d.to_string(),
            (Err(_), None) => {
                return Err(Error::config(format!(
                    "environment variable {name} is not set (used as ${{{name}}}); export it, or write ${{{name}:-default}}"
                )))
            }
        };
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
        assert!(
            err.to_string()
                .contains("line 9, column 1: [load]: unknown key `keys`; did you mean `key`?"),
            "{err}"
        );
    }
}
