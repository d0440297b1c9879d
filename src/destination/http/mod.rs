//! The HTTP destination: write records back to an API that has no bulk
//! upsert, without ever creating a record twice.
//!
//! For each record: if the ledger maps its key to a remote id and the
//! content hash is unchanged, nothing is sent. Otherwise the remote record is
//! found (ledger, then `lookup_table`, then the `lookup` request); found
//! means `update`, not found means `create` with an `Idempotency-Key` (a
//! stable hash of pipeline, key and content). A create whose answer was lost
//! (timeout, dropped connection, 5xx) is followed by a lookup before any new
//! create, so a lost answer never becomes a second record even when the API
//! ignores idempotency keys. The ledger is committed after each confirmed
//! write; the run's lock, checkpoint, history and rejects live in the
//! ledger's file, through the SQLite bookkeeping.

pub mod config;
mod ledger;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

pub use self::config::HttpDestinationConfig;
use self::config::{fill_body, fill_path, id_at, RequestTemplate};
use self::ledger::Ledger;
use super::sqlite::SqliteDestination;
use super::{Books, Commit, Destination, Target};
use crate::batch::{PlannedBatch, Row};
use crate::error::{Error, Result};
use crate::key::{canonical_json, parse_duration, HASH_KEY_COLUMN};
use crate::mode::Mode;
use crate::record::Reject;
use crate::redact::redact;
use crate::source::retry::{backoff_delay, parse_backoff, retry_after, RateLimiter};
use crate::state::{LockHolder, RejectRecord, RunInfo, RunRecord};
use crate::stats::RunStats;

/// An API written through templates, with its ledger.
pub struct HttpDestination {
    books: SqliteDestination,
    worker: Arc<Worker>,
    checked_templates: bool,
}

/// What concurrent record writes share.
struct Worker {
    pipeline: String,
    config: HttpDestinationConfig,
    client: reqwest::Client,
    ledger: Ledger,
    limiter: Mutex<RateLimiter>,
    backoff: Duration,
    lookup_table: Option<std::sync::Mutex<rusqlite::Connection>>,
}

/// Where the pipeline's ledger and bookkeeping live (`[destination] ledger`).
pub(crate) fn ledger_url(pipeline: &str, config: &HttpDestinationConfig) -> String {
    config
        .ledger
        .clone()
        .unwrap_or_else(|| format!("sqlite://.idemload/{pipeline}.ledger.db"))
}

impl HttpDestination {
    pub async fn open(pipeline: &str, config: HttpDestinationConfig) -> Result<HttpDestination> {
        let ledger_url = ledger_url(pipeline, &config);
        if !ledger_url.starts_with("sqlite://") {
            return Err(Error::config(format!(
                "[destination] ledger = {:?}: use sqlite://PATH",
                redact(&ledger_url)
            )));
        }
        let books = SqliteDestination::open(&ledger_url).await?;
        let path = PathBuf::from(ledger_url.trim_start_matches("sqlite://"));
        let p = pipeline.to_string();
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path, &p))
            .await
            .map_err(|e| Error::destination("ledger", e))??;
        let timeout = parse_duration(&config.timeout)
            .map_err(|e| Error::config(format!("[destination] timeout: {e}")))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::config(format!(
                    "[destination] headers: {name:?} is not a header name"
                ))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                Error::config(format!(
                    "[destination] headers: the value of {name} is not valid"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        // Credentials (and record data) go to base_url's origin only.
        let client = match reqwest::Url::parse(&config.base_url) {
            Ok(base) => crate::source::origin::credentialed_client(
                &base,
                crate::source::origin::CrossOrigin::Refuse,
            ),
            Err(_) => reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()),
        }
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .map_err(|e| Error::config(format!("[destination]: {e}")))?;
        let limiter = RateLimiter::new(config.rate_limit.as_ref()).map_err(Error::config)?;
        let backoff = parse_backoff(&config.retry).map_err(Error::config)?;
        let lookup_table = match &config.lookup_table {
            None => None,
            Some(t) => {
                let path = t.url.strip_prefix("sqlite://").ok_or_else(|| {
                    Error::config("[destination] lookup_table url: use sqlite://PATH")
                })?;
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|e| Error::destination(format!("lookup_table {path}"), e))?;
                Some(std::sync::Mutex::new(conn))
            }
        };
        Ok(HttpDestination {
            books,
            worker: Arc::new(Worker {
                pipeline: pipeline.to_string(),
                config,
                client,
                ledger,
                limiter: Mutex::new(limiter),
                backoff,
                lookup_table,
            }),
            checked_templates: false,
        })
    }
}

/// What happened to one record.
#[derive(Debug, Default)]
struct Done {
    stats: RunStats,
    reject: Option<Reject>,
}

/// How a request ended after its retries.
enum Answer {
    Ok(Value),
    NotFound,
    /// A 4xx: the API refuses the record itself.
    Refused(String),
}

/// A request that failed for good; `uncertain` when it may have been applied.
struct Failed {
    message: String,
    uncertain: bool,
}

impl Worker {
    /// Sends one request, retrying what is safe to retry; a `POST` is tried
    /// once (the caller looks up before trying a create again).
    async fn send(
        &self,
        t: &RequestTemplate,
        path: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
        stats: &mut RunStats,
    ) -> std::result::Result<Answer, Failed> {
        let method =
            Method::from_bytes(t.method.to_ascii_uppercase().as_bytes()).unwrap_or(Method::GET);
        let url = format!("{}{}", self.config.base_url.trim_end_matches('/'), path);
        let shown = redact(&url);
        let attempts = if method == Method::POST {
            1
        } else {
            self.config.retry.attempts.max(1)
        };
        let mut last = String::new();
        for attempt in 1..=attempts {
            self.limiter.lock().await.wait().await;
            stats.api_requests += 1;
            let mut request = self.client.request(method.clone(), &url);
            if let Some(k) = idempotency_key {
                request = request.header("Idempotency-Key", k);
            }
            if let Some(b) = &body {
                request = request.json(b);
            }
            let wait = match request.send().await {
                Err(e) => {
                    last = format!("{} {shown}: {}", method, crate::source::origin::describe(e));
                    if method == Method::POST {
                        return Err(Failed {
                            message: last,
                            uncertain: true,
                        });
                    }
                    backoff_delay(self.backoff, attempt)
                }
                Ok(response) => {
                    let status = response.status();
                    let after = retry_after(response.headers(), chrono::Utc::now());
                    if status.is_success() {
                        let text = response.text().await.unwrap_or_default();
                        return Ok(Answer::Ok(
                            serde_json::from_str(&text).unwrap_or(Value::Null),
                        ));
                    }
                    if status.as_u16() == 404 {
                        return Ok(Answer::NotFound);
                    }
                    let text = response.text().await.unwrap_or_default();
                    let mut message: String = text.chars().take(300).collect();
                    if message.is_empty() {
                        message = status.to_string();
                    }
                    if status.is_client_error() && status.as_u16() != 429 && status.as_u16() != 408
                    {
                        return Ok(Answer::Refused(format!("HTTP {status}: {message}")));
                    }
                    last = format!("{method} {shown}: HTTP {status} after {attempt} attempts");
                    if status.as_u16() == 429 {
                        // Refused for now, not applied: waiting is always safe.
                        after.unwrap_or_else(|| backoff_delay(self.backoff, attempt))
                    } else if method == Method::POST {
                        return Err(Failed {
                            message: last,
                            uncertain: true,
                        });
                    } else {
                        after.unwrap_or_else(|| backoff_delay(self.backoff, attempt))
                    }
                }
            };
            if attempt < attempts {
                tracing::debug!(url = %shown, attempt, "Request failed; retrying.");
                tokio::time::sleep(wait).await;
            }
        }
        Err(Failed {
            message: last,
            uncertain: false,
        })
    }

    /// The remote id of a record the ledger does not know: the lookup table
    /// first, then the API.
    async fn find(
        &self,
        row: &Row,
        stats: &mut RunStats,
    ) -> std::result::Result<Option<String>, Failed> {
        if let (Some(conn), Some(t)) = (&self.lookup_table, &self.config.lookup_table) {
            if let Some(value) = row.fields.get(&t.match_field) {
                let found = {
                    let conn = conn.lock().map_err(|_| Failed {
                        message: "lookup table poisoned".into(),
                        uncertain: false,
                    })?;
                    lookup_in_table(&conn, t, value).map_err(|e| Failed {
                        message: format!("lookup_table: {e}"),
                        uncertain: false,
                    })?
                };
                if let Some(id) = found {
                    stats.looked_up_table += 1;
                    return Ok(Some(id));
                }
            }
        }
        let Some(lookup) = &self.config.lookup else {
            return Ok(None);
        };
        stats.looked_up_api += 1;
        let path = fill_path(&lookup.path, &row.fields, None);
        let body = lookup
            .body
            .as_ref()
            .map(|b| fill_body(Some(b), &row.fields, None));
        match self.send(lookup, &path, body, None, stats).await? {
            Answer::Ok(v) => Ok(id_at(&v, lookup.id.as_deref().unwrap_or("id"))),
            Answer::NotFound => Ok(None),
            Answer::Refused(m) => Err(Failed {
                message: format!("lookup refused: {m}"),
                uncertain: false,
            }),
        }
    }

    /// Writes one record; an `Err` stops the run (committed writes stay).
    async fn write(&self, row: Row) -> Result<Done> {
        let mut done = Done::default();
        let key = row.key.canonical().to_string();
        let mut content = row.fields.clone();
        content.shift_remove(HASH_KEY_COLUMN);
        let hash = hex::encode(Sha256::digest(
            canonical_json(&content.clone().into()).as_bytes(),
        ));
        let known = self.ledger.get(&key).await?;
        let reject = |reason: String| Reject {
            source: row.source.clone(),
            key: Some(key.clone()),
            reason,
            raw: serde_json::to_string(&row.fields).unwrap_or_default(),
        };
        let fail = |f: Failed| Error::destination(format!("record {key}"), f.message);

        if row.delete {
            if let (Some(entry), Some(t)) = (&known, &self.config.delete) {
                let path = fill_path(&t.path, &content, Some(&entry.remote_id));
                match self
                    .send(t, &path, None, None, &mut done.stats)
                    .await
                    .map_err(fail)?
                {
                    Answer::Ok(_) | Answer::NotFound => {
                        self.ledger.remove(&key).await?;
                        done.stats.deleted += 1;
                    }
                    Answer::Refused(m) => done.reject = Some(reject(m)),
                }
            } else {
                done.stats.unchanged += 1;
            }
            return Ok(done);
        }
        if known.as_ref().is_some_and(|e| e.content_hash == hash) {
            done.stats.unchanged += 1;
            return Ok(done);
        }
        if let Some(t) = &self.config.upsert {
            let path = fill_path(
                &t.path,
                &content,
                known.as_ref().map(|e| e.remote_id.as_str()),
            );
            let body = fill_body(t.body.as_ref(), &content, None);
            match self
                .send(
                    t,
                    &path,
                    Some(body),
                    Some(&self.idempotency_key(&key, &hash)),
                    &mut done.stats,
                )
                .await
                .map_err(fail)?
            {
                Answer::Ok(v) => {
                    let id =
                        id_at(&v, t.id.as_deref().unwrap_or("id")).unwrap_or_else(|| key.clone());
                    self.ledger.put(&key, &id, &hash).await?;
                    if known.is_some() {
                        done.stats.updated += 1;
                    } else {
                        done.stats.inserted += 1;
                    }
                }
                Answer::NotFound => done.reject = Some(reject("upsert answered 404".into())),
                Answer::Refused(m) => done.reject = Some(reject(m)),
            }
            return Ok(done);
        }
        let attempts = self.config.retry.attempts.max(1);
        let mut remote = known.map(|e| e.remote_id);
        for attempt in 1..=attempts {
            if remote.is_none() {
                remote = self.find(&row, &mut done.stats).await.map_err(fail)?;
            }
            if let Some(id) = &remote {
                let Some(t) = &self.config.update else {
                    // Found, nothing to update with: remember the id.
                    self.ledger.put(&key, id, &hash).await?;
                    done.stats.unchanged += 1;
                    return Ok(done);
                };
                let path = fill_path(&t.path, &content, Some(id));
                let body = fill_body(t.body.as_ref(), &content, Some(id));
                match self
                    .send(t, &path, Some(body), None, &mut done.stats)
                    .await
                    .map_err(fail)?
                {
                    Answer::Ok(_) => {
                        self.ledger.put(&key, id, &hash).await?;
                        done.stats.updated += 1;
                        return Ok(done);
                    }
                    // Deleted on the remote side: find or create it anew.
                    Answer::NotFound => {
                        self.ledger.remove(&key).await?;
                        remote = None;
                        continue;
                    }
                    Answer::Refused(m) => {
                        done.reject = Some(reject(m));
                        return Ok(done);
                    }
                }
            }
            let t = self
                .config
                .create
                .as_ref()
                .ok_or_else(|| Error::config("[destination] has no create request"))?;
            let path = fill_path(&t.path, &content, None);
            let body = fill_body(t.body.as_ref(), &content, None);
            match self
                .send(
                    t,
                    &path,
                    Some(body),
                    Some(&self.idempotency_key(&key, &hash)),
                    &mut done.stats,
                )
                .await
            {
                Ok(Answer::Ok(v)) => {
                    let id = id_at(&v, t.id.as_deref().unwrap_or("id")).ok_or_else(|| {
                        Error::destination(
                            format!("record {key}"),
                            format!(
                                "the create answer has no id at {:?}",
                                t.id.as_deref().unwrap_or("id")
                            ),
                        )
                    })?;
                    self.ledger.put(&key, &id, &hash).await?;
                    done.stats.inserted += 1;
                    return Ok(done);
                }
                Ok(Answer::NotFound) => {
                    done.reject = Some(reject("create answered 404".into()));
                    return Ok(done);
                }
                Ok(Answer::Refused(m)) => {
                    done.reject = Some(reject(m));
                    return Ok(done);
                }
                Err(f) if f.uncertain && attempt < attempts => {
                    // The create may have been applied: look up before the next one.
                    tracing::warn!(key = %key, error = %f.message, "Create answer lost; looking the record up before trying again.");
                    tokio::time::sleep(backoff_delay(self.backoff, attempt)).await;
                }
                Err(f) => return Err(fail(f)),
            }
        }
        Err(Error::destination(
            format!("record {key}"),
            format!("gave up after {attempts} attempts"),
        ))
    }

    fn idempotency_key(&self, key: &str, hash: &str) -> String {
        let mut h = Sha256::new();
        for part in [self.pipeline.as_str(), key, hash] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }
}

fn lookup_in_table(
    conn: &rusqlite::Connection,
    t: &config::LookupTable,
    value: &Value,
) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    let q = super::sql::quote;
    let param: rusqlite::types::Value = match value {
        Value::Number(n) if n.is_i64() => {
            rusqlite::types::Value::Integer(n.as_i64().unwrap_or_default())
        }
        Value::Number(n) => rusqlite::types::Value::Real(n.as_f64().unwrap_or_default()),
        Value::String(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Bool(b) => rusqlite::types::Value::Integer(*b as i64),
        _ => return Ok(None),
    };
    conn.prepare_cached(&format!(
        "SELECT {} FROM {} WHERE {} = ?1 LIMIT 1",
        q(&t.id),
        q(&t.table),
        q(&t.match_field)
    ))?
    .query_row([param], |r| r.get::<_, rusqlite::types::Value>(0))
    .optional()
    .map(|v| match v {
        Some(rusqlite::types::Value::Integer(i)) => Some(i.to_string()),
        Some(rusqlite::types::Value::Text(s)) => Some(s),
        Some(rusqlite::types::Value::Real(f)) => Some(f.to_string()),
        _ => None,
    })
}

#[async_trait]
impl Books for HttpDestination {
    async fn lock(
        &mut self,
        pipeline: &str,
        holder: &LockHolder,
        lease: Duration,
    ) -> Result<Option<LockHolder>> {
        self.books.lock(pipeline, holder, lease).await
    }

    async fn unlock(&mut self) -> Result<()> {
        self.books.unlock().await
    }

    async fn checkpoint(&mut self, pipeline: &str) -> Result<Option<Value>> {
        self.books.checkpoint(pipeline).await
    }

    async fn set_checkpoint(&mut self, pipeline: &str, value: Option<Value>) -> Result<()> {
        self.books.set_checkpoint(pipeline, value).await
    }

    async fn fail(&mut self, run_id: &str, stats: &RunStats, error: &str) -> Result<()> {
        self.books.fail(run_id, stats, error).await
    }

    async fn interrupt(
        &mut self,
        run_id: &str,
        stats: &RunStats,
        checkpoint: Option<&Value>,
    ) -> Result<()> {
        self.books.interrupt(run_id, stats, checkpoint).await
    }

    async fn history(&mut self, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>> {
        self.books.history(pipeline, limit).await
    }

    async fn rejects(
        &mut self,
        pipeline: &str,
        run_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RejectRecord>> {
        self.books.rejects(pipeline, run_id, limit).await
    }
}

/// Writes to an API are not windows of a table: `backfill` refuses it.
impl crate::destination::WindowBooks for HttpDestination {}

#[async_trait]
impl Destination for HttpDestination {
    async fn begin(&mut self, run: &RunInfo, target: &Target) -> Result<()> {
        if target.mode != Mode::Merge {
            return Err(Error::config(
                "an http destination writes in mode = \"merge\" only",
            ));
        }
        self.books.begin(run, target).await
    }

    async fn write(&mut self, batch: PlannedBatch, commit: Commit) -> Result<RunStats> {
        let PlannedBatch {
            rows,
            mut rejects,
            mut stats,
            max_cursor,
            files,
            ..
        } = batch;
        if !self.checked_templates && !rows.is_empty() {
            // A field that no record of the first batch has is a template
            // mistake: stop before any request is sent.
            for field in self.worker.config.template_fields() {
                if !rows.iter().any(|r| r.fields.contains_key(&field)) {
                    return Err(Error::config(format!(
                        "[destination] a template names field {field:?}, which the records do not have"
                    )));
                }
            }
            self.checked_templates = true;
        }
        let worker = self.worker.clone();
        let concurrency = worker.config.concurrency;
        let mut results = stream::iter(rows.into_iter().map(|row| {
            let w = worker.clone();
            async move { w.write(row).await }
        }))
        .buffer_unordered(concurrency);
        let mut first_error = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(done) => {
                    stats += done.stats;
                    if let Some(r) = done.reject {
                        stats.rejected += 1;
                        rejects.push(r);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let bookkeeping = PlannedBatch {
            rows: Vec::new(),
            rejects,
            stats,
            max_cursor,
            absent: None,
            files,
        };
        self.books.write(bookkeeping, commit).await
    }
}
