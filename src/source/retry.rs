//! Retries and rate limiting for the HTTP source.
//!
//! A request that timed out, lost its connection, or got 429 or a 5xx is
//! tried again after an exponential backoff with jitter, or after the
//! server's `Retry-After` when it sends one; a rate limit spaces every
//! attempt. What is retried is decided by kind ([`Failure::retryable`]),
//! never by matching message text.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;

use crate::key::parse_duration;

/// The longest single wait, whatever the backoff or `Retry-After` say.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// `[source.retry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// How many times a request is tried in all (1 = never retried).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First wait between attempts; it doubles with each retry, with jitter.
    #[serde(default = "default_backoff")]
    pub backoff: String,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            backoff: default_backoff(),
        }
    }
}

fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> String {
    "500ms".into()
}

/// `[source.rate_limit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Most requests started per second (retries included); may be fractional.
    pub requests_per_second: f64,
}

/// A failed attempt: what happened and whether trying again may help.
#[derive(Debug)]
pub struct Failure {
    /// `HTTP 503 Service Unavailable`, `timed out`, … (no URL, no headers).
    pub what: String,
    pub retryable: bool,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

/// The wait before retry number `retry` (1 for the first retry): `base`
/// doubled each time, then a random point in its upper half, so clients
/// that failed together do not retry together.
pub fn backoff_delay(base: Duration, retry: u32) -> Duration {
    let full = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
        .min(MAX_WAIT);
    let half = full / 2;
    let spread = half.as_nanos() as u64;
    let jitter = if spread == 0 {
        0
    } else {
        random_u64() % spread
    };
    half + Duration::from_nanos(jitter)
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// `Retry-After` as a wait: delay seconds, or an HTTP date (RFC 9110).
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_WAIT));
    }
    let at = DateTime::parse_from_rfc2822(text).ok()?;
    let wait = at.with_timezone(&Utc) - now;
    Some(wait.to_std().unwrap_or_default().min(MAX_WAIT))
}

/// Parses the configured backoff.
pub fn parse_backoff(config: &RetryConfig) -> Result<Duration, String> {
    if config.attempts == 0 {
        return Err("[source.retry] attempts must be at least 1".into());
    }
    parse_duration(&config.backoff).map_err(|e| format!("[source.retry] backoff: {e}"))
}

/// Spaces requests `1 / requests_per_second` apart (a GCRA limiter with a
/// burst of one).
#[derive(Debug)]
pub struct RateLimiter {
    inner: Option<governor::DefaultDirectRateLimiter>,
}

impl RateLimiter {
    pub fn new(config: Option<&RateLimitConfig>) -> Result<RateLimiter, String> {
        RateLimiter::per_second(config.map(|c| c.requests_per_second), "[source.rate_limit]")
    }

    /// At most `rate` requests started per second (none: no limit);
    /// `setting` names where the rate was configured, for the error.
    pub fn per_second(rate: Option<f64>, setting: &str) -> Result<RateLimiter, String> {
        let inner = match rate {
            None => None,
            Some(rate) => {
                let period = (rate.is_finite() && rate > 0.0)
                    .then(|| Duration::from_secs_f64(1.0 / rate))
                    .and_then(governor::Quota::with_period)
                    .ok_or_else(|| {
                        format!("{setting} requests_per_second = {rate} must be greater than 0")
                    })?;
                Some(governor::RateLimiter::direct(period))
            }
        };
        Ok(RateLimiter { inner })
    }

    /// Waits until the next request may start.
    pub async fn wait(&mut self) {
        if let Some(limiter) = &self.inner {
            limiter.until_ready().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::time::Instant;

    #[test]
    fn backoff_doubles_and_stays_in_its_upper_half() {
        let base = Duration::from_millis(100);
        for retry in 1..6 {
            let full = base * (1 << (retry - 1));
            let d = backoff_delay(base, retry);
            assert!(d >= full / 2 && d <= full, "retry {retry}: {d:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(60)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[tokio::test]
    async fn rate_limit_spaces_requests() {
        let mut limiter = RateLimiter::new(Some(&RateLimitConfig {
            requests_per_second: 50.0,
        }))
        .unwrap();
        let start = Instant::now();
        for _ in 0..6 {
            limiter.wait().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(95),
            "{:?}",
            start.elapsed()
        );
    }
}
