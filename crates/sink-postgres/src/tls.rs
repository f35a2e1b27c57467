//! TLS to the server through rustls (ring), as libpq's `sslmode` require,
//! verify-ca and verify-full. The files are read at every connection, so
//! that renewed certificates are picked up when the sink reconnects.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// TLS towards the server: `{ mode = "verify-full", ca = "ca.crt" }`, with
/// `cert` and `key` for a server that asks for a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresTls {
    /// `"verify-full"`: the server's certificate must chain to `ca` and name
    /// the host of `url`; `"verify-ca"`: chain to `ca` only; `"require"`:
    /// encrypted, the certificate not checked (as libpq's `sslmode`).
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM file of the CA(s) the server's certificate must chain to; needed
    /// by the two verify modes.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for a server that asks for one (`clientcert`
    /// in pg_hba.conf); needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// How much of the server's certificate is checked.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum TlsMode {
    /// Chain to `ca`, and the host name.
    #[default]
    #[serde(rename = "verify-full")]
    VerifyFull,
    /// Chain to `ca` only.
    #[serde(rename = "verify-ca")]
    VerifyCa,
    /// Nothing checked: encryption only.
    #[serde(rename = "require")]
    Require,
}

impl PostgresTls {
    /// The key at fault, and why, if the keys do not fit together.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.mode != TlsMode::Require && self.ca.is_none() {
            return Err((
                "tls.ca",
                "the verify modes need the CA file to verify against",
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(("tls.key", "`cert` and `key` go together"));
        }
        Ok(())
    }

    /// The rustls client configuration, from the files as they are now.
    pub async fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca {
            let pem = read(ca).await?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|err| format!("`{}`: {err}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|err| format!("`{}`: {err}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("`{}` holds no certificate", ca.display()));
            }
        }
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            TlsMode::Require => Arc::new(Unchecked(provider)),
            mode => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|err| err.to_string())?;
                if mode == TlsMode::VerifyCa {
                    Arc::new(AnyName(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read(cert).await?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| format!("`{}`: {err}", cert.display()))?;
                let key_der = PrivateKeyDer::from_pem_slice(&read(key).await?)
                    .map_err(|err| format!("`{}`: {err}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|err| err.to_string())
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

async fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    tokio::fs::read(path)
        .await
        .map_err(|err| format!("cannot read `{}`: {err}", path.display()))
}

/// verify-ca: the chain is checked, a certificate for another name passes.
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
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// require: any certificate, but the handshake's signatures still checked.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// What tokio-postgres calls to wrap its socket in TLS.
#[derive(Clone)]
pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
    type Stream = Rustls<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Ok(RustlsConnect {
            config: Arc::clone(&self.0),
            name,
        })
    }
}

/// One handshake towards a named server.
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for RustlsConnect {
    type Stream = Rustls<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Rustls<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Ok(Rustls(connector.connect(self.name, stream).await?))
        })
    }
}

/// A TLS connection to the server.
pub struct Rustls<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Rustls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Rustls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Rustls<S> {
    /// No channel binding: SCRAM then authenticates without it, as libpq
    /// does with `channel_binding=prefer` over a connection without it.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
