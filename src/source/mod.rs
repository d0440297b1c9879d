//! Sources: where records come from.
//!
//! A [`Source`] yields batches of [`Item`]s (records, or input that could not
//! be one) after the run's cursor low bound. Sources that can filter by
//! cursor do it at the source; the planner filters the rest, so every record
//! read is accounted for. [`open`] builds one from `[source]` by its `type`.
//! How the HTTP and SQL sources page, retry and push filters down:
//! `docs/sources.md`.

mod aws_profile;
pub mod compression;
mod csv;
pub mod file;
pub mod http;
pub mod object;
pub mod origin;
mod oversize;
pub mod pagination;
mod parquet;
pub mod retry;
pub mod shape;
mod sink;
pub mod sql;

use async_trait::async_trait;
use serde::Deserialize;

pub use self::file::{FileFormat, FileSource, FileSourceConfig, OneOrMany};
pub use self::http::{HttpSource, HttpSourceConfig};
pub use self::sql::{SqlSource, SqlSourceConfig};
use crate::error::Result;
use crate::key::Cursor;
use crate::record::{Fields, Item, SourceRef};

/// `[source]`, by `type`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// JSONL/NDJSON, CSV, JSON array and Parquet files (`.gz`, `.zst`),
    /// local or in object storage, globs, `-` for stdin.
    File(FileSourceConfig),
    /// A paginated JSON API.
    Http(Box<HttpSourceConfig>),
    /// A table or query of SQLite, PostgreSQL or MySQL/MariaDB.
    Sql(SqlSourceConfig),
    /// No `[source]`: a pipeline fed by `idemload serve` (only allowed
    /// with a `[serve]` section).
    #[serde(skip)]
    #[default]
    Absent,
}

/// What the run asks of a source.
#[derive(Debug, Clone, Default)]
pub struct SourceQuery {
    /// The cursor field, when the pipeline has one.
    pub cursor: Option<String>,
    /// Records below this cursor are not needed (checkpoint - lookback).
    pub low: Option<Cursor>,
    /// Records at or above this cursor are not needed (a backfill window's
    /// end; exclusive).
    pub high: Option<Cursor>,
    /// Items per batch.
    pub batch_size: usize,
    /// Largest input line (or element) read whole, in bytes.
    pub max_record_bytes: usize,
    /// File sources: the files earlier runs loaded completely, to skip
    /// when unchanged (`None`: read every file).
    pub loaded_files: Option<std::sync::Arc<crate::files::FileLog>>,
    /// The run's `max_value_bytes`: a source that can measure a value
    /// before building it (the file readers) rejects a larger one while
    /// reading. `None`: only the planner checks values, once built.
    pub max_value_bytes: Option<usize>,
}

/// Reading progress, for the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceProgress {
    pub bytes_read: u64,
    pub bytes_total: Option<u64>,
}

/// A stream of record batches.
///
/// ```no_run
/// use async_trait::async_trait;
/// use idemload::record::Fields;
/// use idemload::{Item, Record, SourceRef, Source};
///
/// struct Queue(Vec<serde_json::Value>);
///
/// #[async_trait]
/// impl Source for Queue {
///     async fn next_batch(&mut self) -> idemload::Result<Option<Vec<Item>>> {
///         if self.0.is_empty() {
///             return Ok(None);
///         }
///         let items = self.0.drain(..).enumerate().map(|(i, v)| {
///             let fields = Fields::try_from(v).unwrap_or_default();
///             Item::Record(Record::new(fields, SourceRef::Other(format!("queue:{i}").into())))
///         });
///         Ok(Some(items.collect()))
///     }
/// }
/// ```
#[async_trait]
pub trait Source: Send {
    /// The next batch, or `None` when the source is exhausted.
    async fn next_batch(&mut self) -> Result<Option<Vec<Item>>>;

    /// Whether [`next_batch`](Source::next_batch) would return `None`,
    /// known without reading a whole batch ahead; `None` (the default) when
    /// the source cannot tell, and the run reads the next batch to know.
    /// The run's last batch carries the run's end in its transaction.
    async fn at_end(&mut self) -> Result<Option<bool>> {
        Ok(None)
    }

    /// True when records arrive in ascending cursor order, so the checkpoint
    /// may move batch by batch.
    fn ordered_by_cursor(&self) -> bool {
        false
    }

    /// How far reading has come.
    fn progress(&self) -> SourceProgress {
        SourceProgress::default()
    }
}

/// Opens the source a pipeline's `[source]` describes.
pub async fn open(config: &SourceConfig, query: &SourceQuery) -> Result<Box<dyn Source>> {
    match config {
        SourceConfig::File(file) => Ok(Box::new(FileSource::open(file, query)?)),
        SourceConfig::Http(http) => Ok(Box::new(HttpSource::open(http, query)?)),
        SourceConfig::Sql(sql) => Ok(Box::new(SqlSource::open(sql, query).await?)),
        SourceConfig::Absent => Err(crate::error::Error::config(
            "this pipeline has no [source]: its records come through `idemload serve`",
        )),
    }
}

/// Guards a source that promises ascending cursor order (an HTTP API with
/// `order = "asc"`, a SQL `ORDER BY`): the checkpoint moves batch by batch
/// on that promise, so a record that breaks it stops the run before a
/// checkpoint can get ahead of records not yet read.
#[derive(Debug, Default)]
pub(crate) struct AscendingCheck {
    field: Option<String>,
    last: Option<Cursor>,
}

impl AscendingCheck {
    /// Checks nothing when `field` is `None` (the source is not ordered).
    pub(crate) fn new(field: Option<String>) -> AscendingCheck {
        AscendingCheck { field, last: None }
    }

    /// A message naming the record when it comes before the previous one.
    pub(crate) fn check(&mut self, fields: &Fields, at: &SourceRef) -> Option<String> {
        let field = self.field.as_ref()?;
        let cursor = fields.get(field).and_then(Cursor::from_json)?;
        if let Some(last) = &self.last {
            if cursor < *last {
                return Some(format!(
                    "{at}: records are not in ascending {field:?} order ({cursor} after {last}), so the checkpoint cannot move batch by batch"
                ));
            }
        }
        self.last = Some(cursor);
        None
    }
}
