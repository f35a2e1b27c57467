//! Loading TLS material (certificate chain, private key, client CA) from PEM
//! files into a rustls `ServerConfig`, with every refusal naming the key, the
//! file and the reason; and the little of X.509 the operator is told about
//! (serial number and validity), read from the DER by hand.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sink_api::{ConfigError, Timestamp};

use super::TlsConfig;

/// A PEM file larger than this is refused unread: certificate chains and keys
/// are a few kilobytes, and a path pointing at a device must not fill memory.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// What one successful load produced.
#[derive(Debug)]
pub(super) struct Loaded {
    /// What new handshakes use.
    pub(super) server: Arc<ServerConfig>,
    /// The server certificate (the first of the chain).
    pub(super) leaf: LeafInfo,
    /// A hash of the three files' bytes, to tell a real change from an event
    /// that changed nothing.
    pub(super) fingerprint: u64,
}

/// The serial number and validity of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeafInfo {
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    pub(super) serial: String,
    /// Unix seconds.
    pub(super) not_before: i64,
    /// Unix seconds.
    pub(super) not_after: i64,
}

impl LeafInfo {
    /// Whole days from `now` (unix seconds) until the certificate expires;
    /// negative once it has.
    pub(super) fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }

    /// The expiry date, RFC 3339.
    pub(super) fn expires(&self) -> String {
        rfc3339(self.not_after)
    }
}

/// The ring provider: TLS 1.2 and 1.3 only (rustls has nothing older).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Seconds since the Unix epoch, now.
pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// Reads and checks the files `config` names and builds the server side of
/// TLS from them. Blocking: call it off the async workers once running.
pub(super) fn load(config: &TlsConfig) -> Result<Loaded, ConfigError> {
    let provider = provider();
    let mut hasher = DefaultHasher::new();

    let cert_pem = read_pem("tls.cert", &config.cert)?;
    cert_pem.hash(&mut hasher);
    let chain = certificates("tls.cert", &config.cert, &cert_pem)?;
    let leaf = leaf_info(&chain[0]).ok_or_else(|| {
        fault(
            "tls.cert",
            &config.cert,
            "the first certificate is not a valid X.509 certificate",
        )
    })?;
    let now = unix_now();
    if leaf.not_after < now {
        return Err(fault(
            "tls.cert",
            &config.cert,
            &format!(
                "the certificate expired on {} ({} days ago); renew it",
                leaf.expires(),
                -leaf.days_left(now)
            ),
        ));
    }

    if leaf.not_before > now {
        // Clients refuse it as they refuse an expired one: swapping it in
        // would fail every new connection until the date comes.
        return Err(fault(
            "tls.cert",
            &config.cert,
            &format!(
                "the certificate is not valid before {} (is a clock wrong?)",
                rfc3339(leaf.not_before)
            ),
        ));
    }

    let key_pem = read_pem("tls.key", &config.key)?;
    key_pem.hash(&mut hasher);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
        let reason = match err {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key in it (a PEM block PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
                    .to_string()
            }
            other => pem_error(&other),
        };
        fault("tls.key", &config.key, &reason)
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| fault("tls.key", &config.key, &format!("unusable key: {err}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(fault(
                "tls.key",
                &config.key,
                &format!(
                    "this key does not match the certificate in {}",
                    config.cert.display()
                ),
            ));
        }
        Err(err) => {
            return Err(fault(
                "tls.cert",
                &config.cert,
                &format!("unusable certificate: {err}"),
            ));
        }
    }

    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| ConfigError::new("tls", err.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let pem = read_pem("tls.client_ca", path)?;
            pem.hash(&mut hasher);
            let mut roots = RootCertStore::empty();
            for ca in certificates("tls.client_ca", path, &pem)? {
                roots.add(ca).map_err(|err| {
                    fault(
                        "tls.client_ca",
                        path,
                        &format!("not a usable CA certificate: {err}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| fault("tls.client_ca", path, &err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // gRPC is HTTP/2; clients (grpcio, grpcurl) insist on negotiating it.
    // HTTP/1.1 second, for the otlp source's OTLP/HTTP listener, whose
    // clients (the SDKs' HTTP exporters) may speak nothing else.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        leaf,
        fingerprint: hasher.finish(),
    })
}

/// A refusal of `key`: `<file>: <reason>`.
fn fault(key: &str, path: &Path, reason: &str) -> ConfigError {
    ConfigError::new(key, format!("{}: {reason}", path.display()))
}

/// The bytes of the PEM file at `path`, refusing what cannot be one.
fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let unreadable = |err: std::io::Error| fault(key, path, &format!("cannot read: {err}"));
    // Follows symlinks, as a Kubernetes Secret mount needs.
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(fault(key, path, "not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(fault(
            key,
            path,
            &format!("larger than {MAX_PEM_BYTES} bytes; not a PEM file"),
        ));
    }
    Ok(bytes)
}

/// Every CERTIFICATE block of `pem`; at least one.
fn certificates(
    key: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| fault(key, path, &pem_error(&err)))?;
    if certs.is_empty() {
        return Err(fault(
            key,
            path,
            "no certificate in it (a PEM block BEGIN CERTIFICATE)",
        ));
    }
    Ok(certs)
}

/// A PEM parse error in words (the crate's own shows byte arrays).
fn pem_error(err: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match err {
        Error::MissingSectionEnd { end_marker } => format!(
            "unparsable PEM: a block is not closed by `{}`",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "unparsable PEM: bad BEGIN line `{}`",
            String::from_utf8_lossy(line)
        ),
        Error::Base64Decode(why) => format!("unparsable PEM: bad base64 ({why})"),
        other => format!("unparsable PEM: {other}"),
    }
}

/// RFC 3339 of unix second `seconds`.
pub(super) fn rfc3339(seconds: i64) -> String {
    Timestamp::new(seconds, 0).map_or_else(|| format!("unix time {seconds}"), |t| t.to_string())
}

/// The serial number and validity of the DER certificate `der`, or `None` if
/// it is not shaped like an X.509 certificate.
pub(super) fn leaf_info(der: &[u8]) -> Option<LeafInfo> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (SEQUENCE, certificate, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(certificate)? else {
        return None;
    };
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    //   signature, issuer, validity, subject, ... }
    let (tag, _, after_version) = tlv(tbs)?;
    let fields = if tag == VERSION { after_version } else { tbs };
    let (INTEGER, serial, fields) = tlv(fields)? else {
        return None;
    };
    let (SEQUENCE, _signature, fields) = tlv(fields)? else {
        return None;
    };
    let (SEQUENCE, _issuer, fields) = tlv(fields)? else {
        return None;
    };
    let (SEQUENCE, validity, _) = tlv(fields)? else {
        return None;
    };
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = x509_time(tag, not_before)?;
    let (tag, not_after, _) = tlv(rest)?;
    let not_after = x509_time(tag, not_after)?;
    // DER pads a positive number whose top bit is set with a zero byte.
    let serial = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        all => all,
    };
    Some(LeafInfo {
        serial: serial.iter().map(|byte| format!("{byte:02X}")).collect(),
        not_before,
        not_after,
    })
}

const INTEGER: u8 = 0x02;
const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The first DER element of `input`: its tag, its contents and what follows.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let width = usize::from(first & 0x7f);
        if width == 0 || width > 4 || rest.len() < width {
            return None;
        }
        let (digits, rest) = rest.split_at(width);
        let len = digits
            .iter()
            .fold(0usize, |len, &digit| len << 8 | usize::from(digit));
        (len, rest)
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, 1950 to 2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as unix seconds.
fn x509_time(tag: u8, bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        digits.get(range)?.iter().try_fold(0i64, |value, &digit| {
            Some(value * 10 + i64::from(digit - b'0'))
        })
    };
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let short = number(0..2)?;
            (if short >= 50 { 1900 } else { 2000 } + short, 2)
        }
        (GENERALIZED_TIME, 14) => (number(0..4)?, 4),
        _ => return None,
    };
    let month = number(rest..rest + 2)?;
    let day = number(rest + 2..rest + 4)?;
    let hour = number(rest + 4..rest + 6)?;
    let minute = number(rest + 6..rest + 8)?;
    let second = number(rest + 8..rest + 10)?;
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to the given day of the proleptic Gregorian calendar
/// (the inverse of the calendar arithmetic in `sink_api::Timestamp`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Years start in March, so that the leap day ends them.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_days_agree_with_timestamps() {
        for (year, month, day) in [(1970, 1, 1), (2000, 2, 29), (2026, 12, 1), (2049, 12, 31)] {
            let seconds = days_from_civil(year, month, day) * 86_400;
            let text = rfc3339(seconds);
            assert_eq!(text, format!("{year:04}-{month:02}-{day:02}T00:00:00Z"));
        }
    }

    #[test]
    fn reads_both_time_forms_and_refuses_junk() {
        let utc = x509_time(UTC_TIME, b"261201083000Z").unwrap();
        assert_eq!(rfc3339(utc), "2026-12-01T08:30:00Z");
        assert_eq!(
            rfc3339(x509_time(UTC_TIME, b"500101000000Z").unwrap()),
            "1950-01-01T00:00:00Z"
        );
        let generalized = x509_time(GENERALIZED_TIME, b"20991231235959Z").unwrap();
        assert_eq!(rfc3339(generalized), "2099-12-31T23:59:59Z");
        assert_eq!(x509_time(UTC_TIME, b"26120108300Z"), None);
        assert_eq!(x509_time(UTC_TIME, b"2612010830+0Z"), None);
        assert_eq!(x509_time(UTC_TIME, b"261301083000Z"), None);
        assert_eq!(x509_time(GENERALIZED_TIME, b"261201083000Z"), None);
    }

    #[test]
    fn reads_serial_and_validity_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.serial_number = Some(vec![0x9a, 0x01, 0x02].into());
        params.not_before = rcgen::date_time_ymd(2026, 1, 2);
        params.not_after = rcgen::date_time_ymd(2051, 3, 4);
        let cert = params.self_signed(&key).unwrap();
        let info = leaf_info(cert.der()).unwrap();
        assert_eq!(info.serial, "9A0102");
        assert_eq!(rfc3339(info.not_before), "2026-01-02T00:00:00Z");
        assert_eq!(rfc3339(info.not_after), "2051-03-04T00:00:00Z");
        assert_eq!(info.days_left(info.not_after - 86_400 - 1), 1);
        assert_eq!(info.days_left(info.not_after + 1), -1);

        assert_eq!(leaf_info(&cert.der()[..40]), None);
        assert_eq!(leaf_info(b"not der"), None);
    }
}
