//! `[audit] alert`: POST the findings as JSON whenever an audit finds
//! anything.
//!
//! The request carries `Idempotency-Key`, a stable hash of the pipeline,
//! the table and the findings: the same findings posted again (the next
//! audit, a retry after a lost answer) carry the same key, so a receiver
//! that honours it alerts once. Headers go to the URL's origin only.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::key::parse_duration;
use crate::redact::redact;
use crate::source::origin::{credentialed_client, describe, CrossOrigin};
use crate::source::retry::backoff_delay;

/// `alert = { url = "…" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Where the findings are POSTed.
    pub url: String,
    /// Extra headers (`${VAR}` for secrets), sent to the URL's origin only.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeout of one request (default 10s).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Attempts in all; 5xx, 429 and lost connections are retried.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

fn default_timeout() -> String {
    "10s".into()
}
fn default_attempts() -> u32 {
    3
}

/// What became of the alert (part of the audit's `--json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertOutcome {
    pub idempotency_key: String,
    pub sent: bool,
    /// Why it could not be sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The stable key of a set of findings.
pub fn idempotency_key(pipeline: &str, table: &str, findings: &Value) -> String {
    let mut h = Sha256::new();
    h.update(pipeline.as_bytes());
    h.update([0]);
    h.update(table.as_bytes());
    h.update([0]);
    h.update(
        serde_jcs::to_string(findings)
            .unwrap_or_default()
            .as_bytes(),
    );
    hex::encode(h.finalize())
}

/// POSTs `body` with the key, retrying what may pass on another try.
pub async fn send(config: &AlertConfig, key: &str, body: &Value) -> Result<AlertOutcome> {
    let shown = redact(&config.url);
    let url = reqwest::Url::parse(&config.url)
        .map_err(|e| Error::config(format!("[audit] alert.url {shown}: {e}")))?;
    let timeout = parse_duration(&config.timeout)
        .map_err(|e| Error::config(format!("[audit] alert.timeout: {e}")))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &config.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            Error::config(format!(
                "[audit] alert.headers: {name:?} is not a header name"
            ))
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            Error::config(format!(
                "[audit] alert.headers: the value of {name} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let client = credentialed_client(&url, CrossOrigin::Refuse)
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .map_err(|e| Error::config(format!("[audit] alert: {e}")))?;
    let attempts = config.attempts.max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let retryable = match client
            .post(url.clone())
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                return Ok(AlertOutcome {
                    idempotency_key: key.to_string(),
                    sent: true,
                    error: None,
                })
            }
            Ok(r) => {
                let status = r.status();
                last = format!("POST {shown}: HTTP {status}");
                status.is_server_error() || status.as_u16() == 429
            }
            Err(e) => {
                last = format!("POST {shown}: {}", describe(e));
                true
            }
        };
        if !retryable || attempt == attempts {
            break;
        }
        tokio::time::sleep(backoff_delay(Duration::from_millis(200), attempt)).await;
    }
    tracing::error!(url = %shown, error = %last, "Audit alert not sent.");
    Ok(AlertOutcome {
        idempotency_key: key.to_string(),
        sent: false,
        error: Some(last),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_key_depends_on_the_findings_not_their_key_order() {
        let a = idempotency_key("p", "t", &json!({"gaps": [1], "spikes": []}));
        let b = idempotency_key("p", "t", &json!({"spikes": [], "gaps": [1]}));
        assert_eq!(a, b);
        assert_ne!(
            a,
            idempotency_key("p", "t", &json!({"gaps": [2], "spikes": []}))
        );
        assert_ne!(
            a,
            idempotency_key("q", "t", &json!({"gaps": [1], "spikes": []}))
        );
    }
}
