//! Connections to databases: which backend an URL names, and how to reach
//! it, encrypted as its URL asks.
//!
//! Every source, destination, seen store and inspector opens its database
//! through this module, so a URL means the same everywhere: the scheme picks
//! the backend ([`Backend::of_url`]), and the TLS parameters follow each
//! ecosystem's own names (`sslmode` for PostgreSQL as libpq, `ssl-mode` for
//! MySQL as the mysql client, `rediss://` for Redis). A mode that cannot be
//! satisfied is a configuration error: nothing falls back silently below
//! what the URL asked for.

pub mod mysql;
pub mod postgres;
pub mod redis;
mod tls;

use crate::error::{Error, Result};
use crate::redact::redact;

/// The database an URL names, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH`
    Sqlite,
    /// `postgres://…` or `postgresql://…`
    Postgres,
    /// `mysql://…` or `mariadb://…`
    Mysql,
    /// `redis://…` or `rediss://…` (TLS)
    Redis,
}

/// The schemes [`Backend::of_url`] knows, as the error lists them.
const SCHEMES: &str =
    "sqlite://PATH, postgres://USER@HOST/DB, mysql://USER:PASS@HOST:PORT/DB or redis://HOST:PORT (rediss:// for TLS)";

impl Backend {
    /// The backend of an URL's scheme; an unknown scheme is a configuration
    /// error that lists the supported ones (the URL shown redacted).
    pub fn of_url(url: &str) -> Result<Backend> {
        let scheme = url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "mysql" | "mariadb" => Ok(Backend::Mysql),
            "redis" | "rediss" => Ok(Backend::Redis),
            _ => Err(Error::config(format!(
                "{}: unsupported URL scheme: use {SCHEMES}",
                redact(url)
            ))),
        }
    }

    /// The backend's name as messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
            Backend::Redis => "redis",
        }
    }
}

/// Whether, and how well, a connection is protected, as `check` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encrypted {
    /// Plaintext (or a local socket, where no TLS applies).
    No,
    /// TLS, with any certificate accepted (`sslmode=prefer|require`,
    /// `ssl-mode=PREFERRED|REQUIRED`).
    Unverified,
    /// TLS, the certificate signed by a trusted root; the host name not
    /// checked (`verify-ca`, `VERIFY_CA`).
    CaVerified,
    /// TLS, the certificate signed by a trusted root and issued for the
    /// host connected to (`verify-full`, `VERIFY_IDENTITY`, `rediss://`).
    Verified,
}

impl Encrypted {
    /// Whether the connection is encrypted at all.
    pub fn is_encrypted(self) -> bool {
        self != Encrypted::No
    }
}

impl std::fmt::Display for Encrypted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encrypted::No => "not encrypted",
            Encrypted::Unverified => "encrypted (TLS, certificate not checked)",
            Encrypted::CaVerified => "encrypted (TLS, certificate checked, host name not checked)",
            Encrypted::Verified => "encrypted (TLS, certificate and host name verified)",
        })
    }
}

/// Connects to the database an URL names and reports whether the
/// connection is encrypted (for `check`); SQLite files are local and never
/// encrypted.
pub async fn probe(url: &str) -> Result<Encrypted> {
    match Backend::of_url(url)? {
        Backend::Sqlite => Ok(Encrypted::No),
        Backend::Postgres => Ok(postgres::connect(url).await?.1),
        Backend::Mysql => {
            let (conn, _, encrypted) = mysql::MysqlConfig::parse(url)?.connect().await?;
            let _ = mysql_async::Conn::disconnect(conn).await;
            Ok(encrypted)
        }
        Backend::Redis => Ok(redis::connect(url).await?.1),
    }
}

/// Splits `base?a=1&b=2` into its base and its `key=value` pairs, values
/// percent-decoded; keys as written.
fn query_pairs(url: &str) -> (&str, Vec<(&str, String)>) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                k,
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
        .collect();
    (base, pairs)
}

/// `url` without the query parameters `drop` says to take out.
fn without_params(url: &str, drop: impl Fn(&str) -> bool) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !drop(p.split_once('=').map_or(*p, |(k, _)| k)))
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_names_its_backend() {
        for (url, backend) in [
            ("sqlite://data/w.db", Backend::Sqlite),
            ("postgres://u@h/db", Backend::Postgres),
            ("postgresql://u@h/db?sslmode=require", Backend::Postgres),
            ("mysql://u:p@h:3306/db", Backend::Mysql),
            ("mariadb://u:p@h:3306/db", Backend::Mysql),
            ("redis://127.0.0.1:6379", Backend::Redis),
            ("rediss://cache.example.com:6380", Backend::Redis),
            ("POSTGRES://u@h/db", Backend::Postgres),
        ] {
            assert_eq!(Backend::of_url(url).unwrap(), backend, "{url}");
        }
    }

    #[test]
    fn unknown_scheme_lists_supported_and_hides_password() {
        let err = Backend::of_url("mongodb://u:hunter2@h/db").unwrap_err();
        let text = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(
            text.starts_with("mongodb://u:***@h/db: unsupported URL scheme"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        for scheme in [
            "sqlite://",
            "postgres://",
            "mysql://",
            "redis://",
            "rediss://",
        ] {
            assert!(text.contains(scheme), "{text} lacks {scheme}");
        }
        assert!(Backend::of_url("no scheme at all").is_err());
    }

    #[test]
    fn params_are_split_decoded_and_removed() {
        let (base, pairs) =
            query_pairs("postgres://h/db?sslmode=require&sslrootcert=%2Ftmp%2Fca.pem");
        assert_eq!(base, "postgres://h/db");
        assert_eq!(
            pairs,
            vec![
                ("sslmode", "require".to_string()),
                ("sslrootcert", "/tmp/ca.pem".to_string())
            ]
        );
        assert_eq!(
            without_params("postgres://h/db?sslmode=require&x=1&sslrootcert=a", |k| k
                .starts_with("ssl")),
            "postgres://h/db?x=1"
        );
        assert_eq!(
            without_params("postgres://h/db?sslmode=require", |k| k == "sslmode"),
            "postgres://h/db"
        );
    }
}
