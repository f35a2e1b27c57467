//! Test certificates made on the spot with rcgen (a CA, server and client
//! certificates signed by it), written as the PEM files an operator would
//! have, and TLS clients: tonic channels, and a bare handshake that returns
//! the certificate the server presented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate authority for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER: what a client sees in the handshake.
    pub der: Vec<u8>,
}

/// Makes `params` valid from a day ago until `days` from now.
fn valid_for(params: &mut CertificateParams, days: f64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs_f64(now - 86_400.0);
    params.not_after = epoch + Duration::from_secs_f64(now + days * 86_400.0);
}

/// What a server certificate for `localhost` and 127.0.0.1 names.
fn server_params(serial: u64) -> CertificateParams {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("sink test server {serial}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

impl TestCa {
    /// A new CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        valid_for(&mut params, 3650.0);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 with serial
    /// `serial`, valid for `days` more days.
    pub fn server(&self, serial: u64, days: f64) -> Issued {
        self.sign(server_params(serial), serial, days)
    }

    /// A server certificate like [`server`](Self::server)'s, whose validity
    /// starts `in_days` days from now.
    pub fn server_not_yet_valid(&self, serial: u64, in_days: f64) -> Issued {
        self.sign_from(server_params(serial), serial, in_days, in_days + 365.0)
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, 7, 365.0)
    }

    fn sign(&self, params: CertificateParams, serial: u64, days: f64) -> Issued {
        self.sign_from(params, serial, -1.0, days)
    }

    /// Signs `params`, valid from `from_days` to `to_days` days from now.
    fn sign_from(
        &self,
        mut params: CertificateParams,
        serial: u64,
        from_days: f64,
        to_days: f64,
    ) -> Issued {
        params.serial_number = Some(serial.into());
        valid_for(&mut params, to_days);
        params.not_before += Duration::from_secs_f64((from_days + 1.0) * 86_400.0);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes the CA certificate to `dir/<name>` and returns its path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }
}

impl Issued {
    /// Writes `dir/<stem>.crt` and `dir/<stem>.key`.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).expect("write certificate");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }
}

/// A tonic channel to `address` over TLS, trusting `ca` and presenting
/// `client` if given. Under mutual TLS a refused client may connect and fail
/// on its first call: TLS 1.3 clients finish before the server has judged them.
pub async fn tls_channel(
    address: SocketAddr,
    ca: &TestCa,
    client: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
    }
    Channel::from_shared(format!("https://{address}"))
        .expect("uri")
        .tls_config(tls)?
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// The certificate the server at `address` presents to a new connection
/// (the first of its chain), verified against `ca`; with `client`, a client
/// certificate is presented as mutual TLS requires.
pub async fn presented_certificate(
    address: SocketAddr,
    ca: &TestCa,
    client: Option<&Issued>,
) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA PEM"))
        .expect("CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(client) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).expect("PEM")],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
                    .expect("key PEM"),
            )
            .expect("client identity"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake within 10 s")
    .expect("handshake");
    let (_, session) = stream.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a server certificate")
        .to_vec()
}
