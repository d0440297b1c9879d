//! Credentials go only to the origin they were configured for.
//!
//! Configured headers (`Authorization`, `X-Api-Key`, …) and query
//! parameters (`api_key`) belong to the origin (scheme, host, port) of the
//! configured URL: the HTTP source's `url`, a writeback's `base_url`, a
//! webhook's `url`. A `Link` header, a next-page URL or a redirect may point
//! somewhere else; the clients built here never carry those credentials
//! there, and never send a `Referer` (whose query may hold a key).
//!
//! Redirects within the origin are followed as usual. A redirect to another
//! origin is either stopped, so the HTTP source can follow it with a client
//! that carries nothing ([`CrossOrigin::Stop`]), or refused with an error
//! ([`CrossOrigin::Refuse`]: writes, whose body is data of its own).

use reqwest::redirect::Policy;
use reqwest::Url;

/// The most redirects one request follows.
const MAX_REDIRECTS: usize = 10;

/// What a client does with a redirect to another origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossOrigin {
    /// Hand the 3xx response back to the caller.
    Stop,
    /// Fail the request with a redirect error.
    Refuse,
}

/// Whether two URLs share scheme, host and port.
pub fn is_same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// A redirect policy that follows redirects within `configured`'s origin
/// only.
pub fn redirect_policy(configured: &Url, cross: CrossOrigin) -> Policy {
    let origin = configured.origin();
    Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if attempt.url().origin() == origin {
            return attempt.follow();
        }
        match cross {
            CrossOrigin::Stop => attempt.stop(),
            CrossOrigin::Refuse => attempt.error(
                "redirected to another origin; credentials and data are sent only to the configured origin: configure the final address instead",
            ),
        }
    })
}

/// A client builder for requests that carry credentials for `configured`:
/// redirects stay within its origin, no `Referer`.
pub fn credentialed_client(configured: &Url, cross: CrossOrigin) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(redirect_policy(configured, cross))
        .referer(false)
}

/// The text of an error with its causes, `: `-chained, without its URL.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_is_scheme_host_and_port() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(is_same_origin(
            &u("http://127.0.0.1:80/a?x=1"),
            &u("http://127.0.0.1/b")
        ));
        assert!(!is_same_origin(
            &u("http://127.0.0.1:8080/a"),
            &u("http://127.0.0.1:8081/a")
        ));
        assert!(!is_same_origin(&u("http://h/a"), &u("https://h/a")));
        assert!(!is_same_origin(&u("http://h/a"), &u("http://other/a")));
    }
}
