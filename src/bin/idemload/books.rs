//! `state`, `history` and `rejects`: a pipeline's bookkeeping, found by its
//! pipeline file or, for `idemload load`, by the destination URL and table.

use idemload::config::{DestinationConfig, PipelineConfig, TableDestination};
use idemload::key::Cursor;
use idemload::source::{FileSourceConfig, SourceConfig};
use idemload::{Error, Pipeline};
use serde_json::{json, Value};

use crate::args::{BooksArgs, StateArgs};
use crate::output;

/// The pipeline the arguments name: its file, or `--url`/`--table`/`--name`
/// as `idemload load` was given them.
pub fn pipeline(args: &BooksArgs) -> anyhow::Result<Pipeline> {
    let config = match (&args.pipeline, &args.url, &args.table) {
        (Some(path), None, _) => PipelineConfig::from_file(path)?,
        (None, Some(url), Some(table)) => PipelineConfig {
            name: args.name.clone().unwrap_or_else(|| table.clone()),
            // Never read: these commands only open the destination.
            source: SourceConfig::File(toml::from_str::<FileSourceConfig>("path = \"-\"")?),
            destination: DestinationConfig::Table(TableDestination::new(url, table)),
            load: Default::default(),
            trigger: None,
            audit: None,
            serve: None,
        },
        _ => return Err(Error::config(
            "give a pipeline file, or --url URL --table T (and --name N if `load` was given one)",
        )
        .into()),
    };
    Ok(Pipeline::new(config)?)
}

pub async fn history(args: &BooksArgs, limit: usize, as_json: bool) -> anyhow::Result<u8> {
    let pipeline = pipeline(args)?;
    let runs = match pipeline.books().await? {
        Some(mut books) => books.history(pipeline.name(), limit).await?,
        None => Vec::new(),
    };
    if as_json {
        output::json(&json!({"pipeline": pipeline.name(), "runs": runs}));
    } else {
        output::history_table(&runs);
    }
    Ok(0)
}

pub async fn rejects(
    args: &BooksArgs,
    run_id: Option<&str>,
    limit: usize,
    as_json: bool,
) -> anyhow::Result<u8> {
    let pipeline = pipeline(args)?;
    let rejects = match pipeline.books().await? {
        Some(mut books) => books.rejects(pipeline.name(), run_id, limit).await?,
        None => Vec::new(),
    };
    if as_json {
        output::json(&json!({"pipeline": pipeline.name(), "rejects": rejects}));
    } else {
        output::rejects_list(&rejects);
    }
    Ok(0)
}

pub async fn state(args: &StateArgs) -> anyhow::Result<u8> {
    let pipeline = pipeline(&args.books)?;
    // Only --set and --reset write; reading creates nothing.
    let before = stored_checkpoint(&pipeline).await?;
    if args.reset || args.set.is_some() {
        let value = match args.set.as_deref() {
            Some(text) => Some(checkpoint_value(text, &pipeline, before.as_ref())?),
            None => None,
        };
        let wait = args.wait.as_deref().map(crate::parse_wait).transpose()?;
        pipeline.set_checkpoint(value, wait).await?;
    }
    let checkpoint = stored_checkpoint(&pipeline).await?;
    if args.json {
        output::json(&json!({
            "pipeline": pipeline.name(),
            "cursor": pipeline.settings.cursor,
            "checkpoint": checkpoint,
        }));
    } else {
        output::stdout_line(&match checkpoint {
            None => "none".to_string(),
            Some(Value::String(s)) => s,
            Some(v) => v.to_string(),
        });
    }
    Ok(0)
}

/// The stored checkpoint, `None` also when no run has written any.
async fn stored_checkpoint(pipeline: &Pipeline) -> idemload::Result<Option<Value>> {
    match pipeline.books().await? {
        Some(mut books) => books.checkpoint(pipeline.name()).await,
        None => Ok(None),
    }
}

/// What kind of values the pipeline's cursor holds, as far as can be told.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CursorKind {
    Integer,
    Timestamp,
    /// Compared as text: any value goes.
    Text,
    Unknown,
}

/// Reads the cursor's kind from the checkpoint stored, else from `initial`
/// and `lookback`.
fn cursor_kind(pipeline: &Pipeline, stored: Option<&Value>) -> CursorKind {
    let of = |c: &Cursor| match c {
        Cursor::Int(_) => CursorKind::Integer,
        Cursor::Instant(..) => CursorKind::Timestamp,
        Cursor::Text(_) => CursorKind::Text,
    };
    if let Some(c) = stored.and_then(Cursor::from_json) {
        return of(&c);
    }
    if let Some(c) = &pipeline.settings.initial {
        return of(c);
    }
    match pipeline.settings.lookback {
        idemload::key::Lookback::Number(_) => CursorKind::Integer,
        idemload::key::Lookback::Duration(_) => CursorKind::Timestamp,
        idemload::key::Lookback::None => CursorKind::Unknown,
    }
}

/// Checks a `--set` value against the cursor's kind, so that a value the
/// next run could not compare with its records never becomes the checkpoint.
fn checkpoint_value(
    text: &str,
    pipeline: &Pipeline,
    stored: Option<&Value>,
) -> anyhow::Result<Value> {
    let kind = cursor_kind(pipeline, stored);
    let cursor = Cursor::from_text(text);
    let as_int = text.trim().parse::<i64>().ok();
    let field = pipeline
        .settings
        .cursor
        .as_deref()
        .map(|c| format!("cursor {c:?}"))
        .unwrap_or_else(|| "the checkpoint".into());
    let wrong = |expected: &str, example: &str| -> anyhow::Error {
        Error::config(format!(
            "--set {text:?}: {field} holds {expected}; for example: --set {example}"
        ))
        .into()
    };
    match (kind, as_int, &cursor) {
        (CursorKind::Integer, Some(i), _) => Ok(Value::from(i)),
        (CursorKind::Integer, None, _) => Err(wrong("integers", "1700000000")),
        (CursorKind::Timestamp, _, Cursor::Instant(..)) => Ok(Value::String(text.to_string())),
        (CursorKind::Timestamp, _, _) => Err(wrong("RFC 3339 timestamps", "2025-01-01T00:00:00Z")),
        (CursorKind::Text, _, _) => Ok(Value::String(text.to_string())),
        (CursorKind::Unknown, Some(i), _) => Ok(Value::from(i)),
        (CursorKind::Unknown, None, Cursor::Instant(..)) => Ok(Value::String(text.to_string())),
        (CursorKind::Unknown, None, _) => Err(wrong(
            "integers or RFC 3339 timestamps (as far as its settings tell)",
            "2025-01-01T00:00:00Z or --set 1700000000",
        )),
    }
}
