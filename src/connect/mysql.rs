//! MySQL and MariaDB connections: a `mysql://` URL with the mysql client's
//! `ssl-mode` and `ssl-ca`, and one way to connect that every MySQL source,
//! destination and inspector uses.
//!
//! The modes mean what the mysql client says: `DISABLED` never encrypts;
//! `PREFERRED` (the default) encrypts when the server offers TLS and goes on
//! in plaintext when it does not; `REQUIRED` encrypts and fails without TLS,
//! accepting any certificate; `VERIFY_CA` checks the chain to a trusted
//! root; `VERIFY_IDENTITY` checks the chain and that the certificate names
//! the host.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use mysql_async::{Conn, DriverError, Opts, OptsBuilder, SslOpts};

use super::tls;
use super::{query_pairs, without_params, Encrypted};
use crate::error::{Error, Result};
use crate::redact::redact;

/// The mysql client's `--ssl-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disabled,
    Preferred,
    Required,
    VerifyCa,
    VerifyIdentity,
}

impl SslMode {
    fn parse(value: &str, shown: &str) -> Result<SslMode> {
        match value.to_ascii_uppercase().replace('-', "_").as_str() {
            "DISABLED" => Ok(SslMode::Disabled),
            "PREFERRED" => Ok(SslMode::Preferred),
            "REQUIRED" => Ok(SslMode::Required),
            "VERIFY_CA" => Ok(SslMode::VerifyCa),
            "VERIFY_IDENTITY" => Ok(SslMode::VerifyIdentity),
            _ => Err(Error::config(format!(
                "{shown}: ssl-mode={value:?} is not a mode: use DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY"
            ))),
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disabled => "DISABLED",
            SslMode::Preferred => "PREFERRED",
            SslMode::Required => "REQUIRED",
            SslMode::VerifyCa => "VERIFY_CA",
            SslMode::VerifyIdentity => "VERIFY_IDENTITY",
        })
    }
}

/// The parameter names taken out of the URL before the driver reads it:
/// the mysql client's (`ssl-mode`, `ssl-ca`, also spelled with `_`) and the
/// driver's own TLS switches, which would otherwise bypass the mode.
fn is_tls_param(key: &str) -> bool {
    matches!(
        key.to_ascii_lowercase().replace('_', "-").as_str(),
        "ssl-mode" | "sslmode" | "ssl-ca" | "require-ssl" | "verify-ca" | "verify-identity"
    )
}

/// A parsed `mysql://` URL: the driver's options plus the TLS mode.
/// `Debug` shows the redacted URL: the driver's options hold the password.
#[derive(Clone)]
pub struct MysqlConfig {
    opts: Opts,
    mode: SslMode,
    ca: Option<PathBuf>,
    shown: String,
}

impl std::fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &self.shown)
            .field("mode", &self.mode)
            .field("ca", &self.ca)
            .finish()
    }
}

/// Servers (host, port) that answered a `PREFERRED` connection without
/// TLS: later connections of this process go plaintext at once instead of
/// asking again.
static WITHOUT_TLS: Mutex<Option<HashSet<(String, u16)>>> = Mutex::new(None);

impl MysqlConfig {
    /// Reads a `mysql://` (or `mariadb://`) URL with `ssl-mode` and
    /// `ssl-ca`. The driver's older `require_ssl=true` means
    /// `VERIFY_IDENTITY` (its own meaning), lowered by `verify_ca=false`
    /// or `verify_identity=false`.
    pub fn parse(url: &str) -> Result<MysqlConfig> {
        let shown = redact(url);
        let url = match url.get(..10) {
            Some(s) if s.eq_ignore_ascii_case("mariadb://") => format!("mysql://{}", &url[10..]),
            _ => url.to_string(),
        };
        let (_, pairs) = query_pairs(&url);
        let (mut mode, mut ca) = (None, None);
        let (mut legacy, mut verify_ca, mut verify_identity) = (false, true, true);
        let flag = |key: &str, value: &str| -> Result<bool> {
            value
                .parse::<bool>()
                .map_err(|_| Error::config(format!("{shown}: {key}={value:?}: use true or false")))
        };
        for (key, value) in &pairs {
            match key.to_ascii_lowercase().replace('_', "-").as_str() {
                "ssl-mode" | "sslmode" => mode = Some(SslMode::parse(value, &shown)?),
                "ssl-ca" => ca = Some(PathBuf::from(value)),
                "require-ssl" => legacy = flag(key, value)?,
                "verify-ca" => verify_ca = flag(key, value)?,
                "verify-identity" => verify_identity = flag(key, value)?,
                _ => {}
            }
        }
        let mode = mode.unwrap_or(match (legacy, verify_ca, verify_identity) {
            (false, ..) => SslMode::Preferred,
            (true, false, _) => SslMode::Required,
            (true, true, false) => SslMode::VerifyCa,
            (true, true, true) => SslMode::VerifyIdentity,
        });
        let rest = without_params(&url, is_tls_param);
        let opts = Opts::from_url(&rest)
            .map_err(|e| Error::config(format!("{shown}: not a MySQL URL: {e}")))?;
        Ok(MysqlConfig {
            opts,
            mode,
            ca,
            shown,
        })
    }

    /// The driver's options, without TLS (the mode adds it on connect).
    pub fn opts(&self) -> &Opts {
        &self.opts
    }

    /// The `ssl-mode` in force.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Changes the driver's options (session setup, caches), keeping TLS.
    pub fn map_opts(mut self, f: impl FnOnce(Opts) -> Opts) -> MysqlConfig {
        self.opts = f(self.opts);
        self
    }

    /// The options with the TLS the mode asks for. A Unix socket takes
    /// none (as in the mysql client); so that TLS is really used, the
    /// driver is kept from moving a TCP connection onto a local socket.
    fn tls_opts(&self, name: Option<&str>) -> Result<Opts> {
        let mut ssl = SslOpts::default();
        match self.mode {
            SslMode::Disabled => unreachable!("no TLS options for DISABLED"),
            SslMode::Preferred | SslMode::Required => {
                ssl = ssl.with_danger_accept_invalid_certs(true);
            }
            SslMode::VerifyCa | SslMode::VerifyIdentity => {
                let mut roots: Vec<_> = tls::system_roots()
                    .iter()
                    .map(|c| c.to_vec().into())
                    .collect();
                if let Some(ca) = &self.ca {
                    // Read here so that a bad file is named as the URL names it.
                    tls::read_roots("ssl-ca", ca)?;
                    roots.push(ca.clone().into());
                }
                if roots.is_empty() {
                    return Err(Error::config(format!(
                        "{}: ssl-mode={}: no trusted root certificates on this system; pass ssl-ca=PATH naming the CA that signed the server's certificate",
                        self.shown, self.mode
                    )));
                }
                ssl = ssl.with_root_certs(roots).with_disable_built_in_roots(true);
                if let Some(name) = name {
                    ssl = ssl.with_danger_tls_hostname_override(Some(name.to_string()));
                }
            }
        }
        Ok(OptsBuilder::from_opts(self.opts.clone())
            .ssl_opts(ssl)
            .prefer_socket(false)
            .into())
    }

    fn server(&self) -> (String, u16) {
        (self.opts.ip_or_hostname().to_string(), self.opts.tcp_port())
    }

    /// Connects; returns the connection, the options to open more
    /// connections of the same kind with (TLS settled), and whether it is
    /// encrypted.
    pub async fn connect(&self) -> Result<(Conn, Opts, Encrypted)> {
        let plain = || -> Opts {
            OptsBuilder::from_opts(self.opts.clone())
                .ssl_opts(None)
                .into()
        };
        let known_plain = WITHOUT_TLS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.contains(&self.server()));
        if self.mode == SslMode::Disabled
            || self.opts.socket().is_some()
            || (self.mode == SslMode::Preferred && known_plain)
        {
            let opts = plain();
            let conn = Conn::new(opts.clone()).await.map_err(|e| self.failure(e))?;
            return Ok((conn, opts, Encrypted::No));
        }
        let opts = self.tls_opts(None)?;
        let encrypted = match self.mode {
            SslMode::Preferred | SslMode::Required => Encrypted::Unverified,
            SslMode::VerifyCa => Encrypted::CaVerified,
            _ => Encrypted::Verified,
        };
        match Conn::new(opts.clone()).await {
            Ok(conn) => Ok((conn, opts, encrypted)),
            Err(mysql_async::Error::Driver(DriverError::NoClientSslFlagFromServer))
                if self.mode == SslMode::Preferred =>
            {
                WITHOUT_TLS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(HashSet::new)
                    .insert(self.server());
                tracing::debug!(url = %self.shown, "MySQL server offers no TLS; ssl-mode=PREFERRED goes on unencrypted.");
                let opts = plain();
                let conn = Conn::new(opts.clone()).await.map_err(|e| self.failure(e))?;
                Ok((conn, opts, Encrypted::No))
            }
            Err(e) if self.mode == SslMode::VerifyCa => {
                // The driver checks the host name whatever it is told (its
                // exception for VERIFY_CA does not match this rustls's
                // errors). A name mismatch is reported only after the chain
                // passed: connect again verifying against a name the
                // certificate carries, which is what VERIFY_CA accepts.
                let Some(name) = presented_dns_name(&e) else {
                    return Err(self.failure(e));
                };
                let opts = self.tls_opts(Some(&name))?;
                let conn = Conn::new(opts.clone()).await.map_err(|e| self.failure(e))?;
                Ok((conn, opts, encrypted))
            }
            Err(e) => Err(self.failure(e)),
        }
    }

    /// A failed connect as the user should read it: a mode the server
    /// cannot satisfy is a configuration error (exit 2).
    fn failure(&self, e: mysql_async::Error) -> Error {
        let mode = self.mode;
        if let mysql_async::Error::Driver(DriverError::NoClientSslFlagFromServer) = e {
            return Error::config(format!(
                "{}: ssl-mode={mode}: the server does not offer TLS; configure ssl_cert and ssl_key on the server, or use ssl-mode=PREFERRED to connect unencrypted",
                self.shown
            ));
        }
        if let Some(tls_error) = tls::rustls_error(&e) {
            return Error::config(format!(
                "{}: ssl-mode={mode}: {}",
                self.shown,
                tls::explain(tls_error, Some("ssl-ca"), Some("ssl-mode=VERIFY_CA"))
            ));
        }
        Error::destination(format!("mysql {}", self.shown), e)
    }
}

/// The first DNS name of the certificate a failed host name check saw.
fn presented_dns_name(e: &mysql_async::Error) -> Option<String> {
    match tls::rustls_error(e)? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => presented.iter().find_map(|p| {
            let name = tls::presented_name(p);
            // Only a DNS name without wildcard can be asked for again.
            (name != p.as_str() && !name.starts_with('*')).then(|| name.to_string())
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_mode_and_ssl_ca_are_taken_out_of_the_url() {
        let c = MysqlConfig::parse(
            "mysql://u:pw@db.example.com:3307/app?ssl-mode=VERIFY_IDENTITY&ssl-ca=%2Ftmp%2Fca.pem&prefer_socket=false",
        )
        .unwrap();
        assert_eq!(c.mode(), SslMode::VerifyIdentity);
        assert_eq!(c.ca.as_deref(), Some(std::path::Path::new("/tmp/ca.pem")));
        assert_eq!(c.opts().db_name(), Some("app"));
        assert_eq!(c.opts().tcp_port(), 3307);
        assert!(!c.opts().prefer_socket());
        assert!(c.opts().ssl_opts().is_none());
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
    }

    #[test]
    fn every_client_mode_parses_and_preferred_is_the_default() {
        for (mode, want) in [
            ("DISABLED", SslMode::Disabled),
            ("PREFERRED", SslMode::Preferred),
            ("REQUIRED", SslMode::Required),
            ("VERIFY_CA", SslMode::VerifyCa),
            ("VERIFY_IDENTITY", SslMode::VerifyIdentity),
            ("required", SslMode::Required),
            ("verify-identity", SslMode::VerifyIdentity),
        ] {
            let c = MysqlConfig::parse(&format!("mysql://u@h/db?ssl-mode={mode}")).unwrap();
            assert_eq!(c.mode(), want, "{mode}");
        }
        let c = MysqlConfig::parse("mysql://u@h/db?ssl_mode=REQUIRED").unwrap();
        assert_eq!(c.mode(), SslMode::Required);
        let c = MysqlConfig::parse("mariadb://u@h/db").unwrap();
        assert_eq!(c.mode(), SslMode::Preferred);
        assert_eq!(c.opts().db_name(), Some("db"));
    }

    #[test]
    fn driver_require_ssl_keeps_its_meaning() {
        for (query, want) in [
            ("require_ssl=true", SslMode::VerifyIdentity),
            ("require_ssl=true&verify_identity=false", SslMode::VerifyCa),
            ("require_ssl=true&verify_ca=false", SslMode::Required),
            ("require_ssl=false", SslMode::Preferred),
        ] {
            let c = MysqlConfig::parse(&format!("mysql://u@h/db?{query}")).unwrap();
            assert_eq!(c.mode(), want, "{query}");
            assert!(c.opts().ssl_opts().is_none(), "{query}");
        }
    }

    #[test]
    fn unknown_ssl_mode_is_a_config_error_without_the_password() {
        let err = MysqlConfig::parse("mysql://u:hunter2@h/db?ssl-mode=ALWAYS").unwrap_err();
        let text = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(text.contains("VERIFY_IDENTITY"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = MysqlConfig::parse("mysql://u@h/db?require_ssl=yes").unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
