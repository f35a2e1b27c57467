//! TLS towards a server a stage connects to (a broker, a receiver): the
//! `tls = { ca, cert, key }` table of those stages, and the rustls client
//! configuration it makes, with the ring provider as everywhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use sink_api::ConfigError;

/// `tls = { ca = "...", cert = "...", key = "..." }`, every file PEM and every
/// key optional.
///
/// ```
/// use sink_stages::client_tls::ClientTls;
/// let tls = ClientTls { cert: Some("client.pem".into()), ..ClientTls::default() };
/// let err = tls.check().unwrap_err();
/// assert_eq!(err.to_string(), "key `tls.key`: `cert` and `key` go together");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM file of the CA certificates that signed the server's certificate
    /// (default: the system's).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one; needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// Checks that the keys fit together (the files are read by
    /// [`client_config`]).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError::new("tls.key", "`cert` and `key` go together"));
        }
        Ok(())
    }
}

/// The rustls client configuration of `tls` (the system's roots without a
/// `ca`, no client certificate without `cert`), TLS 1.2 and 1.3; the error
/// names the key whose file is wrong. `server` names the peer for the
/// message that the system has no roots ("the brokers'").
pub fn client_config(tls: Option<&ClientTls>, server: &str) -> Result<ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();
    match tls.and_then(|tls| tls.ca.as_deref()) {
        Some(ca) => {
            for cert in certificates("tls.ca", ca)? {
                roots.add(cert).map_err(|err| {
                    ConfigError::new(
                        "tls.ca",
                        format!("`{}`: not a usable CA: {err}", ca.display()),
                    )
                })?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(ConfigError::new(
                    "tls.ca",
                    format!("the system has no CA certificates; give {server} CA as `tls.ca`"),
                ));
            }
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| ConfigError::new("tls", err.to_string()))?
            .with_root_certificates(roots);
    match tls.map(|tls| (tls.cert.as_deref(), tls.key.as_deref())) {
        Some((Some(cert), Some(key))) => {
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|err| {
                ConfigError::new(
                    "tls.key",
                    format!("`{}`: no private key: {err}", key.display()),
                )
            })?;
            builder
                .with_client_auth_cert(certificates("tls.cert", cert)?, key_der)
                .map_err(|err| ConfigError::new("tls.cert", err.to_string()))
        }
        Some((None, None)) | None => Ok(builder.with_no_client_auth()),
        Some(_) => Err(ConfigError::new("tls.key", "`cert` and `key` go together")),
    }
}

/// The certificates of a PEM file, at least one; the error names `key`.
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| ConfigError::new(key, format!("`{}`: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("`{}` holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}
