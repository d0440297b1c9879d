//! PostgreSQL connections: a `postgres://` URL read as libpq reads it,
//! `sslmode` and `sslrootcert` included, and one way to connect that every
//! PostgreSQL source, destination, store and inspector uses.
//!
//! The modes mean what libpq says: `disable` never encrypts; `prefer` (the
//! default) encrypts when the server offers TLS and goes on in plaintext
//! when it does not; `require` encrypts and fails without TLS, accepting any
//! certificate, unless a root file is given, when it checks the chain as
//! `verify-ca` does; `verify-ca` checks the chain to a trusted root;
//! `verify-full` checks the chain and that the certificate names the host.
//! Over a Unix socket no TLS applies, as in libpq.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{self, Verify};
use super::{query_pairs, without_params, Encrypted};
use crate::error::{Error, Result};
use crate::redact::redact;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str, shown: &str) -> Result<SslMode> {
        match value {
            "disable" => Ok(SslMode::Disable),
            // libpq's `allow` tries plaintext first; encrypting when
            // offered is never weaker than that.
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(Error::config(format!(
                "{shown}: sslmode={other:?} is not a mode: use disable, prefer, require, verify-ca or verify-full"
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `postgres://` URL: the driver's config plus the TLS settings
/// the driver does not read itself. Derefs to the driver's [`Config`].
#[derive(Debug, Clone)]
pub struct PgConfig {
    config: Config,
    sslmode: SslMode,
    /// `sslrootcert`, or libpq's default `~/.postgresql/root.crt` when it
    /// exists.
    root_cert: Option<PathBuf>,
    /// The URL as errors show it (password redacted).
    shown: String,
}

impl std::ops::Deref for PgConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

/// Connects to the PostgreSQL database of an URL.
pub async fn connect(url: &str) -> Result<(Client, Encrypted)> {
    PgConfig::parse(url)?.connect().await
}

impl PgConfig {
    /// Reads the libpq URL forms (`postgres://user:pw@host:5432/db`,
    /// `postgres://root@%2Fvar%2Frun%2Fpostgresql/db`,
    /// `postgres:///db?host=/var/run/postgresql`) with `sslmode` and
    /// `sslrootcert`; what the URL leaves out comes from libpq's
    /// environment variables (`PGUSER`, `PGPASSWORD`, `PGHOST`,
    /// `PGSSLMODE`, `PGSSLROOTCERT`).
    pub fn parse(url: &str) -> Result<PgConfig> {
        let shown = redact(url);
        let (_, pairs) = query_pairs(url);
        let mut sslmode = None;
        let mut root_cert = None;
        for (key, value) in &pairs {
            match *key {
                "sslmode" => sslmode = Some(SslMode::parse(value, &shown)?),
                "sslrootcert" => root_cert = Some(value.clone()),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(Error::config(format!(
                        "{shown}: {key}: client certificates are not supported; authenticate with a password"
                    )))
                }
                _ => {}
            }
        }
        // `schema` is idemload's own (the destination's schema), not libpq's.
        let rest = without_params(url, |k| matches!(k, "sslmode" | "sslrootcert" | "schema"));
        let mut config: Config = rest
            .parse()
            .map_err(|e| Error::config(format!("{shown}: {e}")))?;
        let sslmode = match (sslmode, std::env::var("PGSSLMODE")) {
            (Some(mode), _) => mode,
            (None, Ok(env)) => SslMode::parse(&env, &format!("{shown} (PGSSLMODE)"))?,
            (None, Err(_)) => SslMode::Prefer,
        };
        let root_cert = root_cert
            .or_else(|| std::env::var("PGSSLROOTCERT").ok())
            .filter(|p| !p.is_empty() && p != "system")
            .map(PathBuf::from)
            .or_else(default_root_cert);
        if config.get_user().is_none() {
            if let Ok(user) = std::env::var("PGUSER").or_else(|_| std::env::var("USER")) {
                config.user(&user);
            }
        }
        if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_hosts().is_empty() {
            match std::env::var("PGHOST") {
                Ok(host) if host.starts_with('/') => {
                    config.host_path(host);
                }
                Ok(host) => {
                    config.host(&host);
                }
                Err(_) if std::path::Path::new("/var/run/postgresql").exists() => {
                    config.host_path("/var/run/postgresql");
                }
                Err(_) => {
                    config.host("localhost");
                }
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(30));
        }
        config.application_name("idemload");
        Ok(PgConfig {
            config,
            sslmode,
            root_cert,
            shown,
        })
    }

    /// The `sslmode` in force (from the URL, `PGSSLMODE`, or `prefer`).
    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// What the certificate is checked for: libpq's `require` checks the
    /// chain when a root file exists.
    fn verify(&self) -> Verify {
        match self.sslmode {
            SslMode::Require if self.root_cert.is_some() => Verify::Chain,
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Verify::Nothing,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::VerifyFull => Verify::ChainAndName,
        }
    }

    /// Connects; the connection's task runs on its own until the client
    /// is dropped.
    pub async fn connect(&self) -> Result<(Client, Encrypted)> {
        let over_tcp = self
            .config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(_)));
        let mut config = self.config.clone();
        if self.sslmode == SslMode::Disable || !over_tcp {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| self.failure(e, Stage::Socket))?;
            spawn(connection);
            return Ok((client, Encrypted::No));
        }
        let verify = self.verify();
        let root = match verify {
            Verify::Nothing => None,
            _ => self.root_cert.as_deref().map(|p| ("sslrootcert", p)),
        };
        let tls = Tracked::new(tls::client_config(verify, root)?);
        config.ssl_mode(match self.sslmode {
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        match config.connect(tls.clone()).await {
            Ok((client, connection)) => {
                spawn(connection);
                let encrypted = match (tls.stage(), verify) {
                    (Stage::Encrypted, Verify::Nothing) => Encrypted::Unverified,
                    (Stage::Encrypted, Verify::Chain) => Encrypted::CaVerified,
                    (Stage::Encrypted, Verify::ChainAndName) => Encrypted::Verified,
                    _ => Encrypted::No,
                };
                tracing::debug!(url = %self.shown, sslmode = %self.sslmode, %encrypted, "PostgreSQL connected.");
                Ok((client, encrypted))
            }
            Err(e) => Err(self.failure(e, tls.stage())),
        }
    }

    /// A failed connect as the user should read it: a mode the server
    /// cannot satisfy is a configuration error (exit 2).
    fn failure(&self, e: tokio_postgres::Error, stage: Stage) -> Error {
        let mode = self.sslmode;
        if let Some(tls_error) = tls::rustls_error(&e) {
            return Error::config(format!(
                "{}: sslmode={mode}: {}",
                self.shown,
                tls::explain(tls_error, Some("sslrootcert"), Some("sslmode=verify-ca"))
            ));
        }
        // The socket was open and the driver asked for TLS (the stage says
        // so), and it failed neither on I/O nor in the server's words: the
        // server answered the TLS request with "no".
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if mode >= SslMode::Require && stage == Stage::Socket && e.as_db_error().is_none() && !io {
            return Error::config(format!(
                "{}: sslmode={mode}: the server does not offer TLS; turn on ssl on the server, or use sslmode=prefer to connect unencrypted",
                self.shown
            ));
        }
        Error::destination(format!("cannot connect to {}", self.shown), e)
    }
}

/// libpq's default root file, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

fn spawn<F>(connection: F)
where
    F: Future<Output = std::result::Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %crate::error::Cause::message(&e), "PostgreSQL connection ended.");
        }
    });
}

/// How far a connection attempt got with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing yet, or the socket is open and TLS may be requested.
    Socket = 0,
    /// The server accepted the TLS request; the handshake is running.
    Handshake = 1,
    /// The handshake succeeded.
    Encrypted = 2,
}

/// rustls for tokio-postgres, remembering how far TLS got: whether the
/// server accepted it is known only inside the driver.
#[derive(Clone)]
struct Tracked {
    inner: MakeRustlsConnect,
    stage: Arc<AtomicU8>,
}

impl Tracked {
    fn new(config: rustls::ClientConfig) -> Tracked {
        Tracked {
            inner: MakeRustlsConnect::new(config),
            stage: Arc::new(AtomicU8::new(Stage::Socket as u8)),
        }
    }

    fn stage(&self) -> Stage {
        match self.stage.load(Ordering::SeqCst) {
            2 => Stage::Encrypted,
            1 => Stage::Handshake,
            _ => Stage::Socket,
        }
    }
}

impl<S> MakeTlsConnect<S> for Tracked
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = TrackedConnect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        // Called once per host, after its socket is open.
        self.stage.store(Stage::Socket as u8, Ordering::SeqCst);
        Ok(TrackedConnect {
            inner: MakeTlsConnect::<S>::make_tls_connect(&mut self.inner, domain)?,
            stage: self.stage.clone(),
        })
    }
}

struct TrackedConnect<T> {
    inner: T,
    stage: Arc<AtomicU8>,
}

impl<S, T> TlsConnect<S> for TrackedConnect<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<T::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        self.stage.store(Stage::Handshake as u8, Ordering::SeqCst);
        let handshake = self.inner.connect(stream);
        let stage = self.stage;
        Box::pin(async move {
            let stream = handshake.await?;
            stage.store(Stage::Encrypted as u8, Ordering::SeqCst);
            Ok(stream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let c = PgConfig::parse(
            "postgres://u:pw@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(c.sslmode(), SslMode::VerifyFull);
        assert_eq!(
            c.root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert_eq!(c.get_dbname(), Some("app"));
        assert_eq!(c.get_ports(), &[6543]);
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.verify(), Verify::ChainAndName);
    }

    #[test]
    fn every_libpq_mode_parses_and_prefer_is_the_default() {
        for (mode, want) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Prefer),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let c = PgConfig::parse(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            assert_eq!(c.sslmode(), want, "{mode}");
        }
        if std::env::var_os("PGSSLMODE").is_none() {
            let c = PgConfig::parse("postgres://u@h/db").unwrap();
            assert_eq!(c.sslmode(), SslMode::Prefer);
        }
    }

    #[test]
    fn require_with_a_root_file_checks_the_chain_as_libpq_does() {
        let c = PgConfig::parse("postgres://u@h/db?sslmode=require&sslrootcert=/x/ca.pem").unwrap();
        assert_eq!(c.verify(), Verify::Chain);
        let c =
            PgConfig::parse("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/x/ca.pem").unwrap();
        assert_eq!(c.verify(), Verify::Chain);
    }

    #[test]
    fn unknown_sslmode_is_a_config_error_without_the_password() {
        let err = PgConfig::parse("postgres://u:hunter2@h/db?sslmode=always").unwrap_err();
        let text = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(text.contains("sslmode=\"always\""), "{text}");
        assert!(text.contains("verify-full"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = PgConfig::parse("postgres://u@h/db?sslcert=/c.pem").unwrap_err();
        assert!(err.to_string().contains("client certificates"), "{err}");
    }
}
