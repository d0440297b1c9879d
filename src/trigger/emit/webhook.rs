//! The webhook emitter: POST the item as JSON with `Idempotency-Key`,
//! to the configured origin only (a redirect elsewhere fails the attempt).

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{EmitError, Emitter, Event};
use crate::error::{Error, Result};
use crate::key::parse_duration;
use crate::redact::redact;
use crate::source::origin::{describe, redirect_policy, CrossOrigin};

pub struct Webhook {
    client: reqwest::Client,
    url: String,
}

impl Webhook {
    pub fn new(url: &str, headers: &BTreeMap<String, String>, timeout: &str) -> Result<Webhook> {
        let timeout = parse_duration(timeout)
            .map_err(|e| Error::config(format!("[trigger.emit] timeout: {e}")))?;
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::config(format!(
                    "[trigger.emit] headers: {name:?} is not a header name"
                ))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                Error::config(format!(
                    "[trigger.emit] headers: the value of {name} is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        // The headers are the URL's origin's: a redirect elsewhere is refused
        // rather than followed with them (or with the item).
        let policy = match reqwest::Url::parse(url) {
            Ok(parsed) => redirect_policy(&parsed, CrossOrigin::Refuse),
            Err(_) => reqwest::redirect::Policy::none(),
        };
        let client = reqwest::Client::builder()
            .redirect(policy)
            .referer(false)
            .timeout(timeout)
            .default_headers(map)
            .build()
            .map_err(|e| Error::config(format!("[trigger.emit]: {e}")))?;
        Ok(Webhook {
            client,
            url: url.to_string(),
        })
    }
}

#[async_trait]
impl Emitter for Webhook {
    async fn emit(&mut self, event: &Event) -> std::result::Result<(), EmitError> {
        let url = redact(&self.url);
        let response = self
            .client
            .post(&self.url)
            .header("Idempotency-Key", &event.idempotency_key)
            .json(&event.item)
            .send()
            .await
            .map_err(|e| EmitError {
                message: format!("POST {url}: {}", describe(e)),
                retryable: true,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(EmitError {
            message: format!("POST {url}: HTTP {status}"),
            // A receiver that refuses the item itself will refuse it again.
            retryable: status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408,
        })
    }
}
