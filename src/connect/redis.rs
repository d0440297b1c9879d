//! Redis connections: `redis://` in plaintext, `rediss://` over TLS with
//! the certificate and host name verified against the system roots (or
//! `SSL_CERT_FILE`), as the redis crate does with rustls.

use redis::aio::MultiplexedConnection;

use super::{tls, Encrypted};
use crate::error::{Error, Result};
use crate::redact::redact;

/// Connects to the Redis server of an URL.
pub async fn connect(url: &str) -> Result<(MultiplexedConnection, Encrypted)> {
    let shown = redact(url);
    let client = redis::Client::open(url)
        .map_err(|e| Error::config(format!("{shown}: not a Redis URL: {e}")))?;
    let encrypted = if url
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
    {
        Encrypted::Verified
    } else {
        Encrypted::No
    };
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| match tls::rustls_error(&e) {
            Some(tls_error) => Error::config(format!(
                "{shown}: {}",
                tls::explain(tls_error, None, None)
            )),
            // The redis crate keeps its I/O error out of `source()`, so a
            // failed certificate check is known only by rustls's words.
            None if e.is_io_error() && e.to_string().contains("invalid peer certificate") => {
                Error::config(format!(
                    "{shown}: {e}; connect by a name the certificate carries, or set SSL_CERT_FILE to a file with the CA certificate that signed it"
                ))
            }
            None => Error::destination(format!("redis {shown}"), e),
        })?;
    Ok((conn, encrypted))
}
