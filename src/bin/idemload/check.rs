//! `check`: validate the file, open the source and reach the destination,
//! one `ok`/`warn`/`fail` line per part, exit 2 when a part fails.
//!
//! Nothing is written: the source is read for its first batch only, and the
//! destination is opened as the read-only commands open it.

use std::path::Path;
use std::time::Duration;

use idemload::config::{redact, DestinationConfig};
use idemload::source::{self, SourceConfig, SourceQuery};
use idemload::{Item, Pipeline, PipelineConfig};

use crate::output;

/// Records read from the source to see its fields.
const PEEK: usize = 100;

fn step(status: &str, what: &str, detail: impl AsRef<str>) {
    output::stdout_line(&format!("{status:<4} {what}: {}", detail.as_ref()));
}

pub async fn check(path: &Path) -> anyhow::Result<u8> {
    let pipeline = match PipelineConfig::from_file(path).and_then(Pipeline::new) {
        Ok(p) => p,
        Err(e) => {
            step("fail", "config", e.to_string());
            return Ok(2);
        }
    };
    let s = &pipeline.settings;
    step(
        "ok",
        "config",
        format!(
            "pipeline {:?}, mode {}, key {:?}, cursor {}",
            pipeline.name(),
            s.mode.as_str(),
            s.key.columns(),
            s.cursor.as_deref().unwrap_or("none")
        ),
    );
    let mut failed = !check_source(&pipeline).await;
    failed |= !check_destination(&pipeline).await;
    Ok(if failed { 2 } else { 0 })
}

/// What the source is, for the `source` line.
fn describe(config: &SourceConfig) -> String {
    match config {
        SourceConfig::File(f) => match idemload::source::file::expand_paths(&f.path.to_vec()) {
            Ok(files) => {
                let bytes: u64 = files
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                format!("{} file(s), {} bytes", files.len(), bytes)
            }
            Err(e) => e.to_string(),
        },
        SourceConfig::Http(h) => format!(
            "http {}",
            redact(h.url.split('?').next().unwrap_or_default())
        ),
        SourceConfig::Sql(q) => format!("sql {}", redact(&q.url)),
        SourceConfig::Absent => "none (records come through idemload serve)".into(),
    }
}

/// Opens the source and reads its first records; checks that they carry
/// the key and cursor fields.
async fn check_source(pipeline: &Pipeline) -> bool {
    let mut config = pipeline.config.source.clone();
    if let SourceConfig::Absent = config {
        step("ok", "source", "none: records come through idemload serve");
        return true;
    }
    if let SourceConfig::Http(h) = &mut config {
        // One try: check says what is wrong now, it does not wait it out.
        h.retry.attempts = 1;
    }
    if let SourceConfig::File(f) = &config {
        if let Err(e) = idemload::source::file::expand_paths(&f.path.to_vec()) {
            step("fail", "source", e.to_string());
            return false;
        }
        if f.path.to_vec().iter().any(|p| p == "-") {
            step("ok", "source", "stdin (not read by check)");
            return true;
        }
    }
    let query = SourceQuery {
        cursor: pipeline.settings.cursor.clone(),
        low: None,
        high: None,
        batch_size: PEEK,
        max_record_bytes: 64 << 20,
        loaded_files: None,
        max_value_bytes: Some(pipeline.settings.max_value_bytes),
    };
    let first = async {
        let mut source = source::open(&config, &query).await?;
        source.next_batch().await
    };
    let batch = match tokio::time::timeout(Duration::from_secs(60), first).await {
        Err(_) => {
            step(
                "fail",
                "source",
                format!("{}: no answer within 60s", describe(&config)),
            );
            return false;
        }
        Ok(Err(e)) => {
            step("fail", "source", format!("{e:#}"));
            return false;
        }
        Ok(Ok(batch)) => batch.unwrap_or_default(),
    };
    let records: Vec<_> = batch
        .iter()
        .filter_map(|i| match i {
            Item::Record(r) => Some(r),
            _ => None,
        })
        .collect();
    let rejects = batch
        .iter()
        .filter(|i| matches!(i, Item::Reject(_)))
        .count();
    let mut columns: Vec<String> = Vec::new();
    for r in &records {
        for name in r.fields.keys() {
            if !columns.iter().any(|c| c == name.as_str()) {
                columns.push(name.as_str().to_string());
            }
        }
    }
    let tls = match &config {
        SourceConfig::Sql(q) => encryption(&q.url).await,
        _ => String::new(),
    };
    step(
        "ok",
        "source",
        format!(
            "{}{tls}; first {} records read ({} unreadable), fields: {}",
            describe(&config),
            records.len(),
            rejects,
            if columns.is_empty() {
                "none".to_string()
            } else {
                columns.join(", ")
            }
        ),
    );
    if records.is_empty() {
        step(
            "warn",
            "fields",
            "no records to check the key and cursor against",
        );
        return true;
    }
    let mut wanted: Vec<(&str, String)> = Vec::new();
    if let idemload::key::KeySpec::Fields(fields) = &pipeline.settings.key {
        wanted.extend(fields.iter().map(|f| ("key", f.clone())));
    }
    if let Some(c) = &pipeline.settings.cursor {
        wanted.push(("cursor", c.clone()));
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, f)| !records.iter().any(|r| r.fields.contains_key(f)))
        .map(|(what, f)| format!("{what} field {f:?}"))
        .collect();
    if missing.is_empty() {
        let names: Vec<String> = wanted.iter().map(|(_, f)| format!("{f:?}")).collect();
        step(
            "ok",
            "fields",
            format!("{} present in the first records", names.join(", ")),
        );
        true
    } else {
        step(
            "fail",
            "fields",
            format!(
                "{} not in the first {} records (fields: {}); fix [load] key/cursor or the source",
                missing.join(", "),
                records.len(),
                columns.join(", ")
            ),
        );
        false
    }
}

/// `, encrypted (…)` or `, not encrypted` for a database URL; empty for
/// SQLite and URLs that are not databases.
async fn encryption(url: &str) -> String {
    match idemload::connect::Backend::of_url(url) {
        Ok(idemload::connect::Backend::Sqlite) | Err(_) => String::new(),
        Ok(_) => idemload::connect::probe(url)
            .await
            .map(|e| format!(", {e}"))
            .unwrap_or_default(),
    }
}

/// Opens the destination (and for an HTTP destination, reaches its API).
async fn check_destination(pipeline: &Pipeline) -> bool {
    let d = match &pipeline.config.destination {
        // `Pipeline::new` lets a pipeline without one through only when it
        // has a `[trigger]`.
        DestinationConfig::Absent => {
            step("ok", "destination", "none (a watch-only pipeline)");
            return true;
        }
        DestinationConfig::Http(h) => {
            if let Err(e) = h.check() {
                step("fail", "destination", e.to_string());
                return false;
            }
            if let Err(e) = reach(&h.base_url).await {
                step(
                    "fail",
                    "destination",
                    format!("{}: {e}", redact(&h.base_url)),
                );
                return false;
            }
            return open_books(pipeline, format!("API {} answers", redact(&h.base_url))).await;
        }
        DestinationConfig::Table(d) => d,
    };
    // check never creates anything: a SQLite file that is not there yet
    // is the first run's to create.
    if let Some(file) = missing_sqlite_file(&d.url) {
        step(
            "ok",
            "destination",
            format!(
                "{file} does not exist yet; the first run creates it with table {:?}",
                d.table
            ),
        );
        step("ok", "plan", plan(None, &pipeline.settings));
        return true;
    }
    let what = format!(
        "connected to {}{}, table {:?}",
        redact(&d.url),
        encryption(&d.url).await,
        d.table
    );
    open_books(pipeline, what).await
}

/// Opens the pipeline's bookkeeping (creating nothing) and says what it
/// holds after `what`.
async fn open_books(pipeline: &Pipeline, what: String) -> bool {
    // Connects and reads; creates nothing (a pipeline that never ran has
    // no bookkeeping yet).
    let books = match pipeline.books().await {
        Ok(books) => books,
        Err(e) => {
            step("fail", "destination", format!("{e:#}"));
            return false;
        }
    };
    step("ok", "destination", what);
    let s = &pipeline.settings;
    let checkpoint = match books {
        None => None,
        Some(mut books) => match books.checkpoint(pipeline.name()).await {
            Ok(c) => c,
            Err(e) => {
                step("fail", "state", format!("{e:#}"));
                return false;
            }
        },
    };
    step("ok", "plan", plan(checkpoint.as_ref(), s));
    true
}

/// What the next run will read.
fn plan(checkpoint: Option<&serde_json::Value>, s: &idemload::config::LoadSettings) -> String {
    match (checkpoint, &s.cursor) {
        (_, None) => "every run reads all records and merges them".to_string(),
        (Some(c), Some(_)) => {
            format!("checkpoint {c}; the next run reads cursor >= checkpoint - lookback")
        }
        (None, Some(_)) => match &s.initial {
            Some(i) => format!("no checkpoint yet; the first run reads cursor >= {i}"),
            None => "no checkpoint yet; the first run reads everything".to_string(),
        },
    }
}

/// The path of a `sqlite://PATH` URL whose file does not exist.
fn missing_sqlite_file(url: &str) -> Option<String> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" || Path::new(path).exists() {
        return None;
    }
    Some(path.to_string())
}

/// Any HTTP answer from the API's base URL means it is reachable.
async fn reach(url: &str) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    match client.head(url).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.is_connect() => Err("cannot connect (is the API up?)".into()),
        Err(e) if e.is_timeout() => Err("no answer within 10s".into()),
        Err(e) => Err(e.without_url().to_string()),
    }
}
