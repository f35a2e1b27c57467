//! TLS towards a sink whose grpc source has `tls` set: the `--tls-*` options,
//! read into a rustls client (ring, TLS 1.2 and 1.3, ALPN `h2`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The `--tls-*` options; TLS is on when any is given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM file of the CA certificates that signed the sink's certificate;
    /// turns TLS on (required with any other --tls-* option).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a sink that requires one (`client_ca`).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name the sink's certificate must carry; default: the host of --address.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// A TLS client ready to connect.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsArgs {
    /// The TLS client these options ask for, if any; `host` is the host of
    /// the address connected to.
    pub fn client(&self, host: &str) -> anyhow::Result<Option<Tls>> {
        let on = self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_server_name.is_some();
        if !on {
            return Ok(None);
        }
        let ca = self.tls_ca.as_deref().context(
            "TLS needs --tls-ca: the CA certificates (PEM) that signed the sink's certificate",
        )?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("--tls-ca {}: not a usable CA", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots);
        let mut config = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("--tls-key {}: no private key", key.display()))?;
                builder
                    .with_client_auth_cert(certificates(cert)?, key_der)
                    .with_context(|| {
                        format!(
                            "--tls-cert {} with --tls-key {}",
                            cert.display(),
                            key.display()
                        )
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = self.tls_server_name.as_deref().unwrap_or(host);
        // An IPv6 literal comes bracketed in an address.
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string())
            .with_context(|| format!("`{name}` is not a valid TLS server name"))?;
        Ok(Some(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        }))
    }
}

impl Tls {
    /// The TLS handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

/// Every certificate in the PEM file at `path`; at least one.
fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}
