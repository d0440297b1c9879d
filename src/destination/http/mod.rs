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
//!
//! A `lookup_table` id the API answers 404 for is stale (deleted in the
//! API): the record is looked up through the API, then created. With
//! `rate_limit.requests_per_day`, each request is first taken from the
//! day's budget in the ledger; once it is spent, the records left are
//! counted `deferred`, the run commits what it wrote and keeps its
//! checkpoint, and the next run goes on from there.

pub mod config;
mod ledger;
mod lookup;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
use self::lookup::Table;
use super::sqlite::worker::blocking;
use super::sqlite::SqliteDestination;
use super::{Books, Commit, Destination, RunBooks, Target};
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
    /// The runs, rejects and checkpoint, in the ledger's database.
    books: Box<dyn RunBooks>,
    worker: Arc<Worker>,
    checked_templates: bool,
    /// Some record of this run was deferred: the checkpoint and the files
    /// log stay where they are.
    deferred: bool,
}

/// What concurrent record writes share.
struct Worker {
    pipeline: String,
    config: HttpDestinationConfig,
    client: reqwest::Client,
    ledger: Ledger,
    limiter: Mutex<RateLimiter>,
    backoff: Duration,
    lookup_table: Option<Table>,
    /// `rate_limit.requests_per_day`.
    per_day: Option<u64>,
    /// Today's budget is spent: no more requests this run.
    spent: AtomicBool,
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
        let books = Box::new(SqliteDestination::open(&ledger_url).await?);
        let path = PathBuf::from(ledger_url.trim_start_matches("sqlite://"));
        let p = pipeline.to_string();
        let ledger = blocking(move || Ledger::open(&path, &p)).await?;
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
        let limits = config.rate_limit.clone().unwrap_or_default();
        let limiter =
            RateLimiter::per_second(limits.requests_per_second, "[destination] rate_limit")
                .map_err(Error::config)?;
        let backoff = parse_backoff(&config.retry).map_err(Error::config)?;
        let lookup_table = match &config.lookup_table {
            None => None,
            Some(t) => Some(Table::open(t).await?),
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
                per_day: limits.requests_per_day,
                spent: AtomicBool::new(false),
            }),
            checked_templates: false,
            deferred: false,
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

/// A request that failed for good; `uncertain` when it may have been
/// applied, `deferred` when it was not sent because the day's budget is
/// spent.
struct Failed {
    message: String,
    uncertain: bool,
    deferred: bool,
}

impl Failed {
    fn new(message: impl Into<String>, uncertain: bool) -> Failed {
        Failed {
            message: message.into(),
            uncertain,
            deferred: false,
        }
    }
}

/// Why a record was left unwritten.
enum Halt {
    /// The day's request budget is spent: the record waits for a next run.
    Deferred,
    /// The run stops (committed writes stay).
    Stop(Error),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Halt {
        Halt::Stop(e)
    }
}

/// How many ids of one record may turn out stale (404) before it is
/// created without looking it up again.
const STALE_IDS: usize = 2;

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
            self.take_budget().await?;
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
                        return Err(Failed::new(last, true));
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
                        return Err(Failed::new(last, true));
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
        Err(Failed::new(last, false))
    }

    /// Takes one request from the day's budget, if there is one.
    async fn take_budget(&self) -> std::result::Result<(), Failed> {
        let Some(per_day) = self.per_day else {
            return Ok(());
        };
        let spent = || Failed {
            message: format!("the daily request budget (requests_per_day = {per_day}) is spent"),
            uncertain: false,
            deferred: true,
        };
        if self.spent.load(Ordering::Relaxed) {
            return Err(spent());
        }
        match self.ledger.spend(per_day).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                if !self.spent.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        requests_per_day = per_day,
                        "The daily request budget is spent: the records left are deferred to the next run (budgets renew at 00:00 UTC)."
                    );
                }
                Err(spent())
            }
            Err(e) => Err(Failed::new(format!("ledger: {e}"), false)),
        }
    }

    /// The remote id of a record the ledger does not know: the lookup table
    /// first, then the API. `stale` holds the ids the API answered 404 for:
    /// they are passed over (a synced copy lags behind deletions).
    async fn find(
        &self,
        row: &Row,
        stale: &[String],
        stats: &mut RunStats,
    ) -> std::result::Result<Option<String>, Failed> {
        if stale.len() >= STALE_IDS {
            return Ok(None);
        }
        if let (Some(table), Some(t)) = (&self.lookup_table, &self.config.lookup_table) {
            if let Some(value) = row.fields.get(&t.match_field) {
                let found = table
                    .find(value)
                    .await
                    .map_err(|e| Failed::new(format!("lookup_table: {e}"), false))?;
                if let Some(id) = found.filter(|id| !stale.contains(id)) {
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
            Answer::Ok(v) => Ok(
                id_at(&v, lookup.id.as_deref().unwrap_or("id")).filter(|id| !stale.contains(id))
            ),
            Answer::NotFound => Ok(None),
            Answer::Refused(m) => Err(Failed::new(format!("lookup refused: {m}"), false)),
        }
    }

    /// Writes one record; an `Err` stops the run (committed writes stay).
    async fn write(&self, row: Row) -> Result<Done> {
        let mut done = Done::default();
        match self.write_record(row, &mut done).await {
            Ok(()) => Ok(done),
            Err(Halt::Deferred) => {
                done.stats.deferred += 1;
                Ok(done)
            }
            Err(Halt::Stop(e)) => Err(e),
        }
    }

    async fn write_record(&self, row: Row, done: &mut Done) -> std::result::Result<(), Halt> {
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
        let fail = |f: Failed| {
            if f.deferred {
                Halt::Deferred
            } else {
                Halt::Stop(Error::destination(format!("record {key}"), f.message))
            }
        };

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
            return Ok(());
        }
        if known.as_ref().is_some_and(|e| e.content_hash == hash) {
            done.stats.unchanged += 1;
            return Ok(());
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
            return Ok(());
        }
        let attempts = self.config.retry.attempts.max(1);
        let mut remote = known.map(|e| e.remote_id);
        // Ids the API answered 404 for (deleted there since).
        let mut stale = Vec::new();
        let mut attempt = 0;
        loop {
            if remote.is_none() {
                remote = self
                    .find(&row, &stale, &mut done.stats)
                    .await
                    .map_err(fail)?;
            }
            if let Some(id) = &remote {
                let Some(t) = &self.config.update else {
                    // Found, nothing to update with: remember the id.
                    self.ledger.put(&key, id, &hash).await?;
                    done.stats.unchanged += 1;
                    return Ok(());
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
                        return Ok(());
                    }
                    // Deleted on the remote side: find or create it anew,
                    // passing over this id wherever it is still listed.
                    Answer::NotFound => {
                        tracing::info!(key = %key, remote_id = %id, "The API answered 404 for the remote id; looking the record up again.");
                        self.ledger.remove(&key).await?;
                        stale.extend(remote.take());
                        continue;
                    }
                    Answer::Refused(m) => {
                        done.reject = Some(reject(m));
                        return Ok(());
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
                    return Ok(());
                }
                Ok(Answer::NotFound) => {
                    done.reject = Some(reject("create answered 404".into()));
                    return Ok(());
                }
                Ok(Answer::Refused(m)) => {
                    done.reject = Some(reject(m));
                    return Ok(());
                }
                Err(f) if f.uncertain && attempt + 1 < attempts => {
                    attempt += 1;
                    // The create may have been applied: look up before the next one.
                    tracing::warn!(key = %key, error = %f.message, "Create answer lost; looking the record up before trying again.");
                    tokio::time::sleep(backoff_delay(self.backoff, attempt)).await;
                }
                Err(f) => return Err(fail(f)),
            }
        }
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
        // A new run: nothing deferred yet, and the day's budget is read
        // again from the ledger (a long-lived process may see a new day).
        self.deferred = false;
        self.worker.spent.store(false, Ordering::Relaxed);
        self.books.begin_run(run, target).await
    }

    async fn write(&mut self, batch: PlannedBatch, mut commit: Commit) -> Result<RunStats> {
        let PlannedBatch {
            rows,
            mut rejects,
            mut stats,
            max_cursor,
            mut files,
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
        // A deferred record is not written: the checkpoint must not pass it,
        // nor may its file count as loaded, so the next run reads it again.
        // (The run's ending keeps it too: `Finish::resolve` sees `deferred`.)
        self.deferred |= stats.deferred > 0;
        if self.deferred {
            commit.checkpoint = None;
            files.clear();
        }
        let bookkeeping = PlannedBatch {
            rows: Vec::new(),
            rejects,
            stats,
            max_cursor,
            absent: None,
            files,
        };
        self.books.commit_books(bookkeeping, commit).await
    }
}
