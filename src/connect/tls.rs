//! TLS client settings shared by the connectors: which roots to trust and
//! how much of the server's certificate to check, and what a failed
//! handshake means for the user.
//!
//! The roots are the system's (or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set,
//! as OpenSSL reads them) plus the file the URL names (`sslrootcert`,
//! `ssl-ca`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, Result};

/// How much of the server's certificate a connection checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Encrypt only: any certificate (libpq's `require`).
    Nothing,
    /// Signed by a trusted root, for any host name (`verify-ca`).
    Chain,
    /// Signed by a trusted root and issued for the host (`verify-full`).
    ChainAndName,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's roots, read once per process.
pub(crate) fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "Skipped part of the system certificate store.");
        }
        found.certs
    })
}

/// Reads the PEM certificates of a root file the URL names (`param` is its
/// parameter name, for the error).
pub(crate) fn read_roots(param: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::config(format!(
                "{param}={shown}: cannot read the certificate file: {e}; name a readable PEM file with the CA that signed the server's certificate"
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "{param}={shown}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"
        )));
    }
    Ok(certs)
}

/// The trusted roots: the system's plus those of `extra` (`param=PATH`).
fn roots(extra: Option<(&str, &Path)>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(system_roots().iter().cloned());
    if let Some((param, path)) = extra {
        for cert in read_roots(param, path)? {
            store.add(cert).map_err(|e| {
                Error::config(format!(
                    "{param}={}: not a usable CA certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(store)
}

/// A rustls client configuration that checks what `verify` says against
/// the system roots plus `extra`.
pub(crate) fn client_config(verify: Verify, extra: Option<(&str, &Path)>) -> Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AnyCertificate(provider)),
        Verify::Chain | Verify::ChainAndName => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(extra)?), provider)
                    .build()
                    .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?;
            if verify == Verify::Chain {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Accepts any certificate, checking only that the server holds its key
/// (the handshake signatures): encryption against passive listeners, as
/// libpq's `require`.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks the chain to a trusted root but not the host name (`verify-ca`).
/// webpki checks the chain before the name, so a name mismatch is the only
/// failure left once it reports one.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The rustls error somewhere in a driver error's chain, if the failure was
/// the TLS handshake. `io::Error` hides its inner error from `source()`, so
/// it is looked into explicitly.
pub(crate) fn rustls_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = rustls_error(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

/// What a failed certificate check means, and what to do about it:
/// `root_param` names the URL parameter that adds a root (if any), `weaker`
/// the mode that skips the host name check (if any).
pub(crate) fn explain(
    err: &rustls::Error,
    root_param: Option<&str>,
    weaker: Option<&str>,
) -> String {
    let name_hint = match weaker {
        Some(mode) => format!(
            "connect by a name the certificate carries, or use {mode} to skip the host name check"
        ),
        None => "connect by a name the certificate carries".to_string(),
    };
    match err {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => format!(
            "the server's certificate is not issued for {:?} (it names {}); {name_hint}",
            expected.to_str(),
            presented
                .iter()
                .map(|p| presented_name(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            format!("the server's certificate is not issued for the host connected to; {name_hint}")
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => match root_param {
            Some(param) => format!(
                "the server's certificate is not signed by a trusted root; pass {param}=PATH naming the CA certificate that signed it (or set SSL_CERT_FILE)"
            ),
            None => "the server's certificate is not signed by a trusted root; set SSL_CERT_FILE to a file with the CA certificate that signed it".to_string(),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired; renew it on the server".to_string(),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// A name of the certificate, as webpki reports a mismatch: the DNS name
/// itself for `DnsName("host")`, the text as given otherwise.
pub(crate) fn presented_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|p| p.strip_suffix("\")"))
        .unwrap_or(presented)
}
