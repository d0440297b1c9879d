//! `[destination]`, typed: a database table or an API.

use serde::Deserialize;

use super::http::config::HttpDestinationConfig;

/// What a pipeline without a destination is told (config check and open).
pub(crate) const MISSING_URL: &str =
    "missing key `url` (where records land: sqlite://PATH, postgres://…, mysql://…)";

/// `[destination]`: a database table, which the URL names, or an API
/// written back to (`type = "http"`).
#[derive(Debug, Clone, Default)]
pub enum DestinationConfig {
    /// No `[destination]` (or an empty one): a pipeline used only by
    /// `watch`, or a mistake `PipelineConfig::require_destination` names.
    #[default]
    Absent,
    /// A table of SQLite, PostgreSQL or MySQL/MariaDB.
    Table(TableDestination),
    /// `type = "http"`: records written back to an API through templates.
    Http(Box<HttpDestinationConfig>),
}

/// A database `[destination]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableDestination {
    /// `sqlite://PATH`, `postgres://…`, `mysql://…`.
    #[serde(default)]
    pub url: String,
    /// The target table, created when missing.
    #[serde(default)]
    pub table: String,
    /// Schema (PostgreSQL) the table and bookkeeping live in.
    #[serde(default)]
    pub schema: Option<String>,
}

impl TableDestination {
    /// The table `table` of the database at `url`.
    pub fn new(url: impl Into<String>, table: impl Into<String>) -> TableDestination {
        TableDestination {
            url: url.into(),
            table: table.into(),
            schema: None,
        }
    }
}

impl DestinationConfig {
    /// The database destination, if this is one.
    pub fn database(&self) -> Option<&TableDestination> {
        match self {
            DestinationConfig::Table(t) => Some(t),
            _ => None,
        }
    }

    /// The HTTP destination, if this is one.
    pub fn http(&self) -> Option<&HttpDestinationConfig> {
        match self {
            DestinationConfig::Http(h) => Some(h),
            _ => None,
        }
    }

    /// The table rows land in (empty for an API or no destination).
    pub fn table(&self) -> &str {
        self.database().map_or("", |t| t.table.as_str())
    }
}

/// `type` picks the variant; without it, a database. The keys of each are
/// checked by their own type (`PipelineConfig::from_toml` reads the
/// section again as that type to locate a mistake).
impl<'de> Deserialize<'de> for DestinationConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(d)?;
        let kind = table.remove("type");
        let settings = toml::Value::Table(table);
        match kind {
            None if settings.as_table().is_some_and(|t| t.is_empty()) => {
                Ok(DestinationConfig::Absent)
            }
            None => settings
                .try_into()
                .map(DestinationConfig::Table)
                .map_err(|e: toml::de::Error| D::Error::custom(e.message())),
            Some(toml::Value::String(kind)) if kind == "http" => settings
                .try_into()
                .map(|h| DestinationConfig::Http(Box::new(h)))
                .map_err(|e: toml::de::Error| D::Error::custom(e.message())),
            Some(kind) => Err(D::Error::custom(format!(
                "{UNKNOWN_DESTINATION_TYPE}{kind}: use \"http\" for an API, or leave type out and give a database url"
            ))),
        }
    }
}

/// How an unknown `[destination] type` is named, to place it at the key.
pub(crate) const UNKNOWN_DESTINATION_TYPE: &str = "unknown destination type ";
