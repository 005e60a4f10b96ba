//! TLS to PostgreSQL (rustls), configured from the database URL the way
//! libpq reads it:
//!
//! - `sslmode=disable` (and no `sslmode`): plain TCP, as before.
//! - `prefer`: TLS when the server offers it, unverified; plain otherwise.
//! - `require`: TLS or no connection; the certificate is not checked unless
//!   `sslrootcert` is given, which makes it `verify-ca` (as in libpq).
//! - `verify-ca`: TLS with a certificate chaining to `sslrootcert`.
//! - `verify-full`: that, and the certificate names the host connected to.
//!
//! `sslrootcert=PATH` names a PEM file of CA certificates; `verify-ca` and
//! `verify-full` need it. tokio-postgres knows neither `verify-*` nor
//! `sslrootcert`, so both are taken out of the URL before it parses the rest.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How the connection is protected, as the URL asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain TCP.
    Disable,
    /// TLS if offered, unverified.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, chain checked against the root file.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

/// A parsed database URL: the driver's configuration, the TLS connector to
/// use with it, and the mode (for logs and tests).
pub struct Parsed {
    /// What tokio-postgres connects with.
    pub config: tokio_postgres::Config,
    /// The connector (unused under [`Mode::Disable`]).
    pub tls: MakeRustlsConnect,
    /// The mode.
    pub mode: Mode,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration may hold a password: leave it out.
        f.debug_struct("Parsed").field("mode", &self.mode).finish_non_exhaustive()
    }
}

fn bad(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("invalid PostgreSQL URL: {detail}"))
}

/// `%XX` escapes of a URL query value.
fn percent_decode(s: &str) -> Result<String, StoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| bad("a % escape is cut short"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad("a % escape is not hex"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("a parameter is not UTF-8"))
}

/// Parses `url`, taking out `sslmode` and `sslrootcert`, and builds the
/// TLS connector they ask for.
///
/// # Errors
/// [`StoreError::Internal`] for a URL the driver refuses, an unknown
/// `sslmode`, `verify-*` without `sslrootcert`, or a root file that cannot
/// be read or holds no certificate.
pub fn parse(url: &str) -> Result<Parsed, StoreError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut mode = None;
    let mut root_file = None;
    let mut rest = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(percent_decode(v)?),
            Some(("sslrootcert", v)) => root_file = Some(percent_decode(v)?),
            _ => rest.push(pair),
        }
    }
    let stripped = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
    let mut config: tokio_postgres::Config = stripped.parse().map_err(bad)?;
    let mode = match mode.as_deref() {
        None | Some("disable") => Mode::Disable,
        Some("allow" | "prefer") => Mode::Prefer,
        Some("require") if root_file.is_some() => Mode::VerifyCa,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => {
            return Err(bad(format!("sslmode={other} (use disable, prefer, require, verify-ca or verify-full)")))
        }
    };
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Internal(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Unverified(provider)),
        Mode::VerifyCa | Mode::VerifyFull => {
            let path = root_file
                .ok_or_else(|| bad("sslmode=verify-ca and verify-full need sslrootcert=PATH (the CA's PEM file)"))?;
            let pem = std::fs::read(&path)
                .map_err(|e| StoreError::Internal(format!("cannot read sslrootcert {path}: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| StoreError::Internal(format!("sslrootcert {path}: {e}")))?;
                roots.add(cert).map_err(|e| StoreError::Internal(format!("sslrootcert {path}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(StoreError::Internal(format!("sslrootcert {path} holds no certificate")));
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| StoreError::Internal(format!("TLS: {e}")))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let client = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok(Parsed { config, tls: MakeRustlsConnect::new(client), mode })
}

/// `require` and `prefer`: encryption without authentication (libpq's
/// meaning). The handshake signature is still checked, so the peer holds
/// the key of the certificate it sent.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a root of the file; the name in the
/// certificate is not compared with the host.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(TlsError::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_roots_are_read_from_the_url() {
        let p = parse("postgres://u@h/db").expect("plain");
        assert_eq!(p.mode, Mode::Disable);
        let p = parse("postgres://u@h/db?sslmode=require&options=-csearch_path%3Dx").expect("require");
        assert_eq!(p.mode, Mode::Require);
        assert!(parse("postgres://u@h/db?sslmode=verify-full").is_err(), "verify-full needs a root file");
        assert!(parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fnonexistent").is_err());
        assert!(parse("postgres://u@h/db?sslmode=sometimes").is_err());
        assert!(parse("postgres://u@h/db?sslmode=require&sslrootcert=%ZZ").is_err());
    }
}
