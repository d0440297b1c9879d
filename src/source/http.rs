//! The HTTP source: paginated JSON APIs.
//!
//! A task of its own fetches pages ahead of the run (retrying, spacing
//! requests under the rate limit) and sends them through a bounded channel,
//! so paging overlaps with the destination's writes and memory stays flat.
//! Every record carries `url#page:index`, where the URL has no query (its
//! values may be secrets); headers are never printed. With `order = "asc"`
//! the records arrive in cursor order and the checkpoint moves batch by
//! batch; otherwise it moves with the run's last batch, so a run stopped
//! halfway through a newest-first listing reads it again from the old
//! checkpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::origin::{credentialed_client, is_same_origin, CrossOrigin};
use super::pagination::{kind, lookup, Next, PaginationConfig, Paginator};
use super::retry::{
    backoff_delay, parse_backoff, retry_after, Failure, RateLimitConfig, RateLimiter, RetryConfig,
};
use super::shape::{add_fields, constants, RecordsPath, ShapeError};
use super::{AscendingCheck, Source, SourceProgress, SourceQuery};
use crate::error::{Error, Result};
use crate::key::{parse_duration, Cursor};
use crate::record::{Fields, Item, Record, Reject, SourceRef};
use crate::redact::redact;

/// `[source] type = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// The endpoint, `http://` or `https://`.
    pub url: String,
    /// Dotted path of the records array in the body (`data.items`); `""`
    /// (the default) when the body is the array. A segment `{name}` matches
    /// every member of an object and adds the member's name to each record
    /// as the field `name` (`"{service_line_id}.daily_usage"`).
    #[serde(default)]
    pub records: String,
    /// Constant fields added to every record (`set = { source = "api" }`);
    /// they replace a field of the same name.
    #[serde(default)]
    pub set: BTreeMap<String, toml::Value>,
    /// Query parameters sent with every request; their values never appear
    /// in messages or rejects.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// Request headers (`Authorization = "Bearer ${API_TOKEN}"`); never
    /// printed or logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeout of one request, body included (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// `asc` when the API returns records in ascending cursor order, which
    /// lets the checkpoint move page by page; `desc` (or unset) moves it
    /// once the run has committed everything.
    #[serde(default)]
    pub order: Option<SortOrder>,
    /// Renames: `"api_name" = "field"`; a dotted name (`"owner.id"`) copies a
    /// nested value into a top-level field.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    #[serde(default)]
    pub pagination: PaginationConfig,
    pub incremental: Option<IncrementalConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    pub rate_limit: Option<RateLimitConfig>,
}

fn default_timeout() -> String {
    "30s".into()
}

/// Order of the records an API returns, by the pipeline's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    Asc,
    Desc,
}

/// `[source.incremental]`: how the run's low bound reaches the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Query parameter that receives checkpoint - lookback (or `initial`).
    pub param: String,
    /// How it is written: `rfc3339`, `date` (YYYY-MM-DD, UTC), `epoch`
    /// (seconds), or `raw` (the cursor as it is).
    #[serde(default)]
    pub format: LowFormat,
}

/// Formats of the incremental parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LowFormat {
    #[default]
    Rfc3339,
    Date,
    Epoch,
    Raw,
}

/// Writes the low bound as the API wants it. A date or whole seconds are
/// rounded down: asking for a little more is safe, the planner drops what
/// is below the bound.
pub fn format_low(low: &Cursor, format: LowFormat) -> Result<String> {
    // A date bound (a backfill of whole days) is its midnight, UTC.
    let midnight = match low {
        Cursor::Text(_) if format != LowFormat::Raw => low.as_instant().map(Cursor::at_instant),
        _ => None,
    };
    let low = midnight.as_ref().unwrap_or(low);
    let nanos = match low {
        Cursor::Instant(nanos, _) => Some(*nanos),
        _ => None,
    };
    let secs = nanos.map(|n| n.div_euclid(1_000_000_000) as i64);
    match (format, low) {
        (LowFormat::Raw, c) => Ok(c.to_string()),
        (LowFormat::Rfc3339, Cursor::Instant(..)) => Ok(low.to_string()),
        (LowFormat::Epoch, Cursor::Int(i)) => Ok(i.to_string()),
        (LowFormat::Epoch, Cursor::Instant(..)) => Ok(secs.unwrap_or_default().to_string()),
        (LowFormat::Date, Cursor::Instant(..)) => {
            let at = chrono::DateTime::<chrono::Utc>::from_timestamp(secs.unwrap_or_default(), 0)
                .ok_or_else(|| Error::config(format!("checkpoint {low} is out of range")))?;
            Ok(at.format("%Y-%m-%d").to_string())
        }
        (f, c) => Err(Error::config(format!(
            "[source.incremental] format = {f:?} needs a timestamp cursor, but the low bound is {c}; use format = \"raw\"",
        ))),
    }
}

/// Fills `{window_start}` and `{window_end}` in a param value with the
/// run's bounds, written as `format` says (the bound's own text without
/// one); `None` when the value names a bound the run does not have.
fn window_placeholders(
    text: &str,
    query: &SourceQuery,
    format: Option<LowFormat>,
) -> Result<Option<String>> {
    let mut out = text.to_string();
    for (name, bound) in [
        ("{window_start}", &query.low),
        ("{window_end}", &query.high),
    ] {
        if !out.contains(name) {
            continue;
        }
        let Some(bound) = bound else {
            return Ok(None);
        };
        let written = match format {
            Some(f) => format_low(bound, f)?,
            None => bound.to_string(),
        };
        out = out.replace(name, &written);
    }
    Ok(Some(out))
}

/// Reads pages on a task of its own.
pub struct HttpSource {
    rx: mpsc::Receiver<Result<Vec<Item>>>,
    batch_size: usize,
    ordered: bool,
    bytes_read: Arc<AtomicU64>,
}

impl HttpSource {
    /// Checks the configuration and starts fetching.
    pub fn open(config: &HttpSourceConfig, query: &SourceQuery) -> Result<HttpSource> {
        let mut base = Url::parse(&config.url)
            .map_err(|e| Error::config(format!("[source] url {}: {e}", redact(&config.url))))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "[source] url {}: use http:// or https://",
                redact(&config.url)
            )));
        }
        {
            let mut q = base.query_pairs_mut();
            let format = config.incremental.as_ref().map(|i| i.format);
            for (name, value) in &config.params {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                        value.to_string()
                    }
                    toml::Value::Datetime(d) => d.to_string(),
                    _ => {
                        return Err(Error::config(format!(
                            "[source] params.{name}: use a string, a number or a boolean"
                        )))
                    }
                };
                // `{window_start}`/`{window_end}`: a backfill window's bounds
                // (a run's low bound for the start); a param whose bound
                // the run does not have is left out.
                let Some(text) = window_placeholders(&text, query, format)? else {
                    continue;
                };
                q.append_pair(name, &text);
            }
            if let (Some(inc), Some(low)) = (&config.incremental, &query.low) {
                q.append_pair(&inc.param, &format_low(low, inc.format)?);
            }
        }
        if base.query() == Some("") {
            base.set_query(None);
        }
        if config.incremental.is_some() && query.cursor.is_none() {
            tracing::warn!(
                "[source.incremental] is set but [load] has no cursor: every run reads everything."
            );
        }
        let timeout = parse_duration(&config.timeout)
            .map_err(|e| Error::config(format!("[source] timeout: {e}")))?;
        let backoff = parse_backoff(&config.retry).map_err(Error::config)?;
        let limiter = RateLimiter::new(config.rate_limit.as_ref()).map_err(Error::config)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::config(format!(
                    "[source] headers: {name:?} is not a valid header name"
                ))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                Error::config(format!(
                    "[source] headers.{name}: the value has characters a header cannot carry"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let user_agent = concat!("idemload/", env!("CARGO_PKG_VERSION"));
        let build_error = |e: reqwest::Error| {
            Error::config(format!("[source] cannot build the HTTP client: {e}"))
        };
        // Headers and params are the configured origin's: another origin
        // (a Link, a redirect) is asked with a client that carries nothing.
        let client = credentialed_client(&base, CrossOrigin::Stop)
            .timeout(timeout)
            .gzip(true)
            .default_headers(headers)
            .user_agent(user_agent)
            .build()
            .map_err(build_error)?;
        let bare = reqwest::Client::builder()
            .timeout(timeout)
            .gzip(true)
            .referer(false)
            .user_agent(user_agent)
            .build()
            .map_err(build_error)?;
        let mut shown = base.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let shown: Arc<str> = redact(shown.as_str()).into();
        let bytes_read = Arc::new(AtomicU64::new(0));
        let ordered = config.order == Some(SortOrder::Asc) && query.cursor.is_some();
        let (tx, rx) = mpsc::channel(4);
        let fetcher = Fetcher {
            client,
            bare,
            base,
            shown,
            records: RecordsPath::parse(&config.records)
                .map_err(|e| Error::config(format!("[source] {e}")))?,
            set: constants(&config.set).map_err(Error::config)?,
            fields: config.fields.clone(),
            paginator: Paginator::new(config.pagination.resolve().map_err(Error::config)?),
            attempts: config.retry.attempts,
            backoff,
            limiter,
            max_value_bytes: query.max_record_bytes,
            bytes_read: bytes_read.clone(),
            timeout,
            ascending: AscendingCheck::new(if ordered { query.cursor.clone() } else { None }),
        };
        tokio::spawn(fetcher.run(tx));
        Ok(HttpSource {
            rx,
            batch_size: query.batch_size.max(1),
            ordered,
            bytes_read,
        })
    }
}

#[async_trait]
impl Source for HttpSource {
    /// Gathers pages until a batch is full or the pages run out.
    async fn next_batch(&mut self) -> Result<Option<Vec<Item>>> {
        let mut batch: Vec<Item> = Vec::new();
        while batch.len() < self.batch_size {
            match self.rx.recv().await {
                None => break,
                Some(page) => {
                    let page = page?;
                    if batch.is_empty() {
                        batch = page;
                    } else {
                        batch.extend(page);
                    }
                }
            }
        }
        Ok(if batch.is_empty() { None } else { Some(batch) })
    }

    fn ordered_by_cursor(&self) -> bool {
        self.ordered
    }

    fn progress(&self) -> SourceProgress {
        SourceProgress {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_total: None,
        }
    }
}

/// The fetching task's state.
struct Fetcher {
    /// Carries the configured headers; only for the configured origin.
    client: reqwest::Client,
    /// Carries no credentials: for URLs of any other origin.
    bare: reqwest::Client,
    /// The URL with `params` and the incremental parameter.
    base: Url,
    /// The URL as messages and rejects show it: no query, no password.
    shown: Arc<str>,
    records: RecordsPath,
    /// `[source] set`: constant fields added to every record.
    set: Vec<(String, Value)>,
    fields: BTreeMap<String, String>,
    paginator: Paginator,
    attempts: u32,
    backoff: Duration,
    limiter: RateLimiter,
    max_value_bytes: usize,
    bytes_read: Arc<AtomicU64>,
    timeout: Duration,
    ascending: AscendingCheck,
}

impl Fetcher {
    async fn run(mut self, tx: mpsc::Sender<Result<Vec<Item>>>) {
        let mut url = self.paginator.first(&self.base);
        let mut page = 1u64;
        loop {
            let outcome = self.page(&url, page).await;
            let (items, next) = match outcome {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if !items.is_empty() && tx.send(Ok(items)).await.is_err() {
                return; // the run stopped
            }
            match next {
                Next::Done => return,
                Next::Request(u) => url = u,
                Next::TooManyPages(max) => {
                    let _ = tx
                        .send(Err(Error::Source {
                            location: format!("{} (page {page})", self.shown),
                            message: format!(
                                "read max_pages = {max} pages and the API still has a next page; raise [source.pagination] max_pages"
                            ),
                        }))
                        .await;
                    return;
                }
            }
            page += 1;
        }
    }

    /// Fetches one page (with retries) and turns it into items.
    async fn page(&mut self, url: &Url, page: u64) -> Result<(Vec<Item>, Next)> {
        let (body, headers, len) = self.fetch(url, page).await?;
        let shown = self.shown.clone();
        let location = || format!("{shown} (page {page})");
        let count = match self.records.count(&body) {
            Ok(n) => n,
            Err(e) => {
                let hint = match (&e, &body) {
                    (ShapeError::Missing { .. }, Value::Object(map)) => format!(
                        "; the body's top-level fields are: {}",
                        map.keys().take(20).cloned().collect::<Vec<_>>().join(", ")
                    ),
                    (ShapeError::Missing { .. }, other) => {
                        format!("; the body is {}", kind(other))
                    }
                    _ => String::new(),
                };
                let message = match &e {
                    ShapeError::Missing { .. } if !self.records.has_members() => format!(
                        "records path {:?} is not in the response body{hint}",
                        self.records.as_str()
                    ),
                    ShapeError::NotArray { at, kind } if at == self.records.as_str() => format!(
                        "records path {:?} holds {kind}, not an array",
                        self.records.as_str()
                    ),
                    other => format!("records path {:?}: {other}{hint}", self.records.as_str()),
                };
                return Err(Error::Source {
                    location: location(),
                    message,
                });
            }
        };
        // The paginator reads the body (next token, total) before the
        // records are moved out of it.
        let next = self
            .paginator
            .advance(&self.base, url, &body, &headers, count)
            .map_err(|message| Error::Source {
                location: location(),
                message,
            })?;
        let elements = self.records.take(body).map_err(|e| Error::Source {
            location: location(),
            message: format!("records path {:?}: {e}", self.records.as_str()),
        })?;
        // The page's size bounds each value's: when the page is small, no
        // value needs its own size check.
        let raw_len = if len <= self.max_value_bytes {
            len
        } else {
            usize::MAX
        };
        let mut items = Vec::with_capacity(elements.len());
        for (index, element) in elements.into_iter().enumerate() {
            let at = SourceRef::Page {
                url: self.shown.clone(),
                page,
                index: index as u64,
            };
            match element.value {
                Value::Object(fields) => {
                    let mut fields = Fields::from(fields);
                    rename(&self.fields, &mut fields);
                    add_fields(&mut fields, element.captured, &self.set);
                    if let Some(message) = self.ascending.check(&fields, &at) {
                        return Err(Error::Source {
                            location: location(),
                            message: format!(
                                "{message}; remove order = \"asc\" or fix the API's sort"
                            ),
                        });
                    }
                    items.push(Item::Record(Record {
                        fields,
                        source: at,
                        raw_len,
                    }));
                }
                other => items.push(Item::Reject(Reject::new(
                    at,
                    format!("element is {}, not a JSON object", kind(&other)),
                    other.to_string(),
                ))),
            }
        }
        tracing::debug!(url = %self.shown, page, records = count, "Page read.");
        Ok((items, next))
    }
}

/// Applies `[source.fields]`: a plain name moves, a dotted one copies a
/// nested value up.
fn rename(renames: &BTreeMap<String, String>, fields: &mut Fields) {
    {
        for (from, to) in renames {
            if let Some((head, rest)) = from.split_once('.') {
                let value = fields.get(head).and_then(|v| lookup(v, rest)).cloned();
                if let Some(v) = value {
                    fields.insert(to.clone(), v);
                }
            } else if let Some(v) = fields.shift_remove(from) {
                fields.insert(to.clone(), v);
            }
        }
    }
}

impl Fetcher {
    /// GETs a page as JSON, retrying what may pass on a second try.
    async fn fetch(&mut self, url: &Url, page: u64) -> Result<(Value, HeaderMap, usize)> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.limiter.wait().await;
            let failure = match self.try_once(url).await {
                Ok(ok) => return Ok(ok),
                Err(f) => f,
            };
            if !failure.retryable || attempt >= self.attempts {
                let tries = if attempt == 1 {
                    "1 attempt".to_string()
                } else {
                    format!("{attempt} attempts")
                };
                return Err(Error::Source {
                    location: format!("GET {} (page {page})", self.shown),
                    message: if failure.retryable {
                        format!("{} after {tries}", failure.what)
                    } else {
                        failure.what
                    },
                });
            }
            let wait = failure
                .retry_after
                .unwrap_or_else(|| backoff_delay(self.backoff, attempt));
            tracing::warn!(url = %self.shown, page, attempt, wait_ms = wait.as_millis() as u64, error = %failure.what, "Request failed; retrying.");
            tokio::time::sleep(wait).await;
        }
    }

    async fn try_once(&self, url: &Url) -> std::result::Result<(Value, HeaderMap, usize), Failure> {
        let ours = is_same_origin(url, &self.base);
        let client = if ours { &self.client } else { &self.bare };
        let mut response = client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| transport_failure(&e, self.timeout))?;
        if ours && response.status().is_redirection() {
            // The credentialed client stops at a redirect to another
            // origin: follow it with nothing but the URL it names.
            let target = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url.join(l).ok());
            if let Some(target) = target {
                response = self
                    .bare
                    .get(target)
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| transport_failure(&e, self.timeout))?;
            }
        }
        let status = response.status();
        let headers = response.headers().clone();
        if !status.is_success() {
            let retryable = status.as_u16() == 429 || status.is_server_error();
            return Err(Failure {
                what: format!("HTTP {status}"),
                retryable,
                retry_after: if retryable {
                    retry_after(&headers, chrono::Utc::now())
                } else {
                    None
                },
            });
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_failure(&e, self.timeout))?;
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(body) => Ok((body, headers, bytes.len())),
            Err(e) => {
                let content_type = headers
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none");
                Err(Failure {
                    what: format!(
                        "response body is not JSON (content-type {content_type}, {} bytes): {e}",
                        bytes.len()
                    ),
                    retryable: false,
                    retry_after: None,
                })
            }
        }
    }
}

/// Describes a transport error without its URL (whose query may hold a
/// secret), and classifies it.
fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    let what = if e.is_timeout() {
        format!("timed out after {}", humantime::format_duration(timeout))
    } else if e.is_connect() {
        "could not connect".to_string()
    } else if e.is_body() || e.is_decode() {
        "connection lost while reading the body".to_string()
    } else {
        "request failed".to_string()
    };
    let mut message = what;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    Failure {
        what: message,
        retryable: !(e.is_builder() || e.is_redirect()),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_bound_is_written_as_the_api_wants() {
        let low = Cursor::from_text("2024-05-01T10:30:00Z");
        assert_eq!(
            format_low(&low, LowFormat::Rfc3339).unwrap(),
            "2024-05-01T10:30:00Z"
        );
        assert_eq!(format_low(&low, LowFormat::Date).unwrap(), "2024-05-01");
        assert_eq!(format_low(&low, LowFormat::Epoch).unwrap(), "1714559400");
        assert_eq!(
            format_low(&Cursor::Int(42), LowFormat::Epoch).unwrap(),
            "42"
        );
        assert_eq!(format_low(&Cursor::Int(42), LowFormat::Raw).unwrap(), "42");
        assert!(format_low(&Cursor::Int(42), LowFormat::Date).is_err());
    }

    #[test]
    fn fields_are_renamed_and_nested_values_copied_up() {
        let renames: BTreeMap<String, String> = [
            ("ID".to_string(), "id".to_string()),
            ("owner.id".to_string(), "owner_id".to_string()),
        ]
        .into();
        let mut fields =
            Fields::try_from(serde_json::json!({"ID": 7, "owner": {"id": "u1"}})).unwrap();
        rename(&renames, &mut fields);
        assert_eq!(
            Value::from(fields),
            serde_json::json!({"owner": {"id": "u1"}, "id": 7, "owner_id": "u1"})
        );
    }

    #[test]
    fn the_spec_example_parses_as_written() {
        std::env::set_var("API_TOKEN", "t");
        let config = crate::PipelineConfig::from_toml(
            r#"
name = "usage"
[source]
type = "http"
url = "http://127.0.0.1:8080/v1/usage"
records = "data.items"          # dotted path to the array; "" = the body is the array
params = { service_line = "SL-1" }
headers = { Authorization = "Bearer ${API_TOKEN}" }
timeout = "30s"
order = "desc"                  # asc lets the checkpoint move page by page

[source.pagination]
type = "page"                   # page | offset | cursor | link | none
page_param = "page"             # page: first page 1 unless first_page = 0
size_param = "per_page"         # page and offset: page size parameter
size = 100
offset_param = "offset"         # offset
cursor_path = "paging.next"     # cursor: dotted path of the next token in the body
cursor_param = "after"          # cursor: parameter that sends it back
max_pages = 100000

[source.incremental]
param = "updated_since"         # receives checkpoint - lookback
format = "rfc3339"              # rfc3339 | date | epoch | raw

[source.retry]
attempts = 5                    # timeouts, dropped connections, 429 and 5xx
backoff = "500ms"               # exponential with jitter; Retry-After wins

[source.rate_limit]
requests_per_second = 10

[destination]
url = "sqlite://w.db"
table = "usage"
"#,
        )
        .unwrap();
        let crate::source::SourceConfig::Http(http) = config.source else {
            panic!("not an http source")
        };
        assert!(matches!(
            http.pagination.resolve().unwrap(),
            super::super::pagination::Pagination::Page(_)
        ));
        assert_eq!(http.retry.attempts, 5);
    }

    #[test]
    fn config_refuses_unknown_keys() {
        let err = toml::from_str::<HttpSourceConfig>("url = \"http://h/x\"\nrecord = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `record`"), "{err}");
        let ok: HttpSourceConfig = toml::from_str(
            "url = \"http://h/x\"\n[pagination]\ntype = \"cursor\"\ncursor_path = \"n\"\ncursor_param = \"after\"",
        )
        .unwrap();
        assert!(matches!(
            ok.pagination.resolve().unwrap(),
            super::super::pagination::Pagination::Cursor(_)
        ));
    }
}
