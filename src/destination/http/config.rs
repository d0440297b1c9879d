//! `[destination] type = "http"`: the requests that write records back to
//! an API, as templates over the record's fields.
//!
//! `{field}` in a path is replaced by the URL-encoded value of the field,
//! `{remote_id}` by the id the API gave the record. In a body, a string that
//! is exactly `"{field}"` takes the field's JSON value (number stays number);
//! other strings are filled in as text. Without a body, the record is sent.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::record::Fields;
use crate::source::retry::RetryConfig;

/// The settings of an HTTP destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpDestinationConfig {
    /// `https://api.example.com`; request paths are appended to it.
    pub base_url: String,
    /// Headers sent with every request (`${VAR}` for secrets; never logged).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Finds a record that the ledger does not know: `id` is the dotted
    /// path of the remote id in the answer (`results.0.id`); absent or an
    /// empty list = not found.
    pub lookup: Option<RequestTemplate>,
    /// Creates a record; `id` is the path of the new id in the answer
    /// (default `id`). Every create carries `Idempotency-Key`.
    pub create: Option<RequestTemplate>,
    /// Updates a found record; the path may use `{remote_id}`.
    pub update: Option<RequestTemplate>,
    /// Creates or updates in one request, for APIs that have it.
    pub upsert: Option<RequestTemplate>,
    /// Deletes a record (`delete_field` in `[load]`); may use `{remote_id}`.
    pub delete: Option<RequestTemplate>,
    /// A synced copy of the API's records in a SQL table, looked up before
    /// the API (no API call).
    pub lookup_table: Option<LookupTable>,
    /// Record key -> remote id and content hash (default
    /// `sqlite://.idemload/<pipeline>.ledger.db`).
    pub ledger: Option<String>,
    /// Requests in flight at once (default 1).
    #[serde(default = "one")]
    pub concurrency: usize,
    /// Request timeout (default 30s).
    #[serde(default = "thirty_seconds")]
    pub timeout: String,
    #[serde(default)]
    pub retry: RetryConfig,
    pub rate_limit: Option<RateLimit>,
}

/// `rate_limit = { requests_per_second, requests_per_day }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Most requests started per second (retries included); may be fractional.
    pub requests_per_second: Option<f64>,
    /// Most requests sent per UTC day, counted in the ledger across runs:
    /// when it is spent, the records left are `deferred` to the next run.
    pub requests_per_day: Option<u64>,
}

fn one() -> usize {
    1
}
fn thirty_seconds() -> String {
    "30s".into()
}

/// One request: method, path template, optional body template and the
/// path of an id in the answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestTemplate {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    pub body: Option<toml::Value>,
    pub id: Option<String>,
}

fn get() -> String {
    "GET".into()
}

/// `lookup_table = { url, table, match, id }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupTable {
    /// Where the synced copy lives: `sqlite://PATH`, `postgres://…` or
    /// `mysql://…`.
    pub url: String,
    pub table: String,
    /// The record field (and column) to match on.
    #[serde(rename = "match")]
    pub match_field: String,
    /// The column that holds the remote id.
    pub id: String,
}

impl HttpDestinationConfig {
    /// Checks what serde cannot: which requests go together, limits, methods.
    pub fn check(&self) -> Result<()> {
        let config = self;
        if config.create.is_none() && config.upsert.is_none() {
            return Err(Error::config(
                "[destination] type = \"http\" needs `create` (with `lookup`) or `upsert`",
            ));
        }
        if config.create.is_some() && config.lookup.is_none() {
            return Err(Error::config(
                "[destination] `create` needs `lookup`: after a create whose answer was lost, idemload looks the record up before creating it again",
            ));
        }
        if config
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.requests_per_day == Some(0))
        {
            return Err(Error::config(
                "[destination] rate_limit: requests_per_day must be at least 1",
            ));
        }
        if config.concurrency == 0 {
            return Err(Error::config(
                "[destination] concurrency must be at least 1",
            ));
        }
        for t in [
            &config.lookup,
            &config.create,
            &config.update,
            &config.upsert,
            &config.delete,
        ]
        .into_iter()
        .flatten()
        {
            reqwest::Method::from_bytes(t.method.to_ascii_uppercase().as_bytes()).map_err(
                |_| {
                    Error::config(format!(
                        "[destination] method {:?} is not an HTTP method",
                        t.method
                    ))
                },
            )?;
        }
        Ok(())
    }

    /// Every record field a template names (`remote_id` aside).
    pub fn template_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in [
            &self.lookup,
            &self.create,
            &self.update,
            &self.upsert,
            &self.delete,
        ]
        .into_iter()
        .flatten()
        {
            placeholders(&t.path, &mut out);
            if let Some(body) = &t.body {
                body_placeholders(body, &mut out);
            }
        }
        if let Some(l) = &self.lookup_table {
            out.push(l.match_field.clone());
        }
        out.retain(|f| f != "remote_id");
        out.sort();
        out.dedup();
        out
    }
}

fn placeholders(text: &str, out: &mut Vec<String>) {
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            return;
        };
        out.push(rest[start + 1..start + end].to_string());
        rest = &rest[start + end + 1..];
    }
}

fn body_placeholders(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => placeholders(s, out),
        toml::Value::Array(a) => a.iter().for_each(|x| body_placeholders(x, out)),
        toml::Value::Table(t) => t.values().for_each(|x| body_placeholders(x, out)),
        _ => {}
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Fills a path template; values are URL-encoded.
pub fn fill_path(template: &str, fields: &Fields, remote_id: Option<&str>) -> String {
    fill(template, |name| {
        let raw = match name {
            "remote_id" => remote_id.unwrap_or_default().to_string(),
            _ => fields.get(name).map(text_of).unwrap_or_default(),
        };
        percent_encode(&raw)
    })
}

fn fill(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str(&value(&rest[start + 1..start + end]));
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

/// Fills a body template from the record (the record itself when none).
pub fn fill_body(
    template: Option<&toml::Value>,
    fields: &Fields,
    remote_id: Option<&str>,
) -> Value {
    match template {
        None => fields.clone().into(),
        Some(t) => fill_value(t, fields, remote_id),
    }
}

fn fill_value(t: &toml::Value, fields: &Fields, remote_id: Option<&str>) -> Value {
    match t {
        toml::Value::String(s) => {
            if let Some(name) = s
                .strip_prefix('{')
                .and_then(|r| r.strip_suffix('}'))
                .filter(|n| !n.contains(['{', '}']))
            {
                return match name {
                    "remote_id" => Value::String(remote_id.unwrap_or_default().to_string()),
                    _ => fields.get(name).cloned().unwrap_or(Value::Null),
                };
            }
            Value::String(fill(s, |name| match name {
                "remote_id" => remote_id.unwrap_or_default().to_string(),
                _ => fields.get(name).map(text_of).unwrap_or_default(),
            }))
        }
        toml::Value::Array(a) => {
            Value::Array(a.iter().map(|x| fill_value(x, fields, remote_id)).collect())
        }
        toml::Value::Table(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), fill_value(x, fields, remote_id)))
                .collect(),
        ),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
    }
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
/// Everything but RFC 3986's unreserved characters is encoded, so a value
/// is always one path segment.
const PATH_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_VALUE).to_string()
}

/// The value at a dotted path (`results.0.id`), as text.
pub fn id_at(body: &Value, path: &str) -> Option<String> {
    let mut v = body;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        v = match v {
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            Value::Object(o) => o.get(part)?,
            _ => return None,
        };
    }
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_are_url_encoded_and_bodies_keep_types() {
        let f = Fields::try_from(json!({"email": "a+b@x.io", "n": 7, "name": "Ada L"})).unwrap();
        assert_eq!(
            fill_path("/c/search?email={email}", &f, None),
            "/c/search?email=a%2Bb%40x.io"
        );
        assert_eq!(fill_path("/c/{remote_id}", &f, Some("r 1")), "/c/r%201");
        let body: toml::Value =
            toml::from_str("n = \"{n}\"\nlabel = \"{name} ({email})\"").unwrap();
        assert_eq!(
            fill_body(Some(&body), &f, None),
            json!({"n": 7, "label": "Ada L (a+b@x.io)"})
        );
    }

    #[test]
    fn ids_are_found_by_dotted_path() {
        let b = json!({"results": [{"id": 42}]});
        assert_eq!(id_at(&b, "results.0.id").as_deref(), Some("42"));
        assert_eq!(id_at(&json!({"results": []}), "results.0.id"), None);
    }
}
