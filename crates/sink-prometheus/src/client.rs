//! One HTTP/1.1 connection to the receiver per concurrent sender, over TCP
//! or TLS, and what an answer means for the request.
//!
//! hyper's connection API is used directly rather than a pooling client:
//! each sender owns its connection, which is all the pooling it needs, and
//! nothing else (proxies, redirects, cookies) belongs in remote write.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sink_api::ConfigError;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ClientTls, PrometheusRemoteWriteConfig};

/// The longest `Retry-After` honoured: a receiver asking for more is
/// retried after this, so that a mistaken header cannot park the sink.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The most of a refusal's body kept for the log.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Headers the protocol sets, which `headers` may not replace.
const PROTOCOL_HEADERS: [&str; 7] = [
    "content-type",
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "host",
    "user-agent",
    "x-prometheus-remote-write-version",
];

/// Where and how to send: built from the config, replaced whole on reload.
pub struct Endpoint {
    host: String,
    port: u16,
    path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    headers: HeaderMap,
    timeout: Duration,
}

impl Endpoint {
    /// The endpoint `config` describes; reads the token file and TLS
    /// material, so call it off the async workers when running.
    pub fn new(config: &PrometheusRemoteWriteConfig) -> Result<Self, ConfigError> {
        let bad_url = |why: &str| ConfigError::new("url", format!("`{}`: {why}", config.url));
        let uri: Uri = config
            .url
            .parse()
            .map_err(|err| bad_url(&format!("not a URL ({err})")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad_url("must start with http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad_url("names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |path| path.as_str().to_string());
        if !https && config.tls.is_some() {
            return Err(ConfigError::new(
                "tls",
                "is for an https:// URL; this one is http://",
            ));
        }
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|err| bad_url(&format!("host is no TLS server name ({err})")))?;
            Some((tls_connector(config.tls.as_ref())?, name))
        } else {
            None
        };
        let mut headers = HeaderMap::new();
        let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
        let fixed = [
            (header::HOST, authority),
            (header::CONTENT_TYPE, "application/x-protobuf"),
            (header::CONTENT_ENCODING, "snappy"),
            (
                header::USER_AGENT,
                concat!("telemetry-sink/", env!("CARGO_PKG_VERSION")),
            ),
            (
                HeaderName::from_static("x-prometheus-remote-write-version"),
                "0.1.0",
            ),
        ];
        for (name, value) in fixed {
            let value = HeaderValue::from_str(value).map_err(|_| bad_url("bad host"))?;
            headers.insert(name, value);
        }
        if let Some(authorization) = authorization(config)? {
            headers.insert(header::AUTHORIZATION, authorization);
        }
        for (name, value) in &config.headers {
            let key = format!("headers.{name}");
            let parsed = HeaderName::try_from(name.as_str())
                .map_err(|_| ConfigError::new(&key, "is not an HTTP header name"))?;
            if PROTOCOL_HEADERS.contains(&parsed.as_str()) {
                return Err(ConfigError::new(
                    &key,
                    "is set by the remote-write protocol and cannot be replaced",
                ));
            }
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| ConfigError::new(&key, "is not a valid HTTP header value"))?;
            value.set_sensitive(parsed == header::AUTHORIZATION);
            headers.insert(parsed, value);
        }
        Ok(Self {
            host,
            port,
            path,
            tls,
            headers,
            timeout: config.timeout,
        })
    }

    /// `host:port`, for the log.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The `Authorization` header the config asks for, if any.
fn authorization(config: &PrometheusRemoteWriteConfig) -> Result<Option<HeaderValue>, ConfigError> {
    let (key, text) = if let Some(token) = &config.bearer_token {
        ("bearer_token", format!("Bearer {}", token.trim()))
    } else if let Some(path) = &config.bearer_token_file {
        let token = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(
                "bearer_token_file",
                format!("cannot read `{}`: {err}", path.display()),
            )
        })?;
        ("bearer_token_file", format!("Bearer {}", token.trim()))
    } else if let Some(basic) = &config.basic_auth {
        use base64::Engine;
        let pair = format!("{}:{}", basic.username, basic.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        ("basic_auth", format!("Basic {encoded}"))
    } else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(&text)
        .map_err(|_| ConfigError::new(key, "holds characters an HTTP header cannot"))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

fn tls_connector(tls: Option<&ClientTls>) -> Result<TlsConnector, ConfigError> {
    let mut config = sink_stages::client_tls::client_config(tls, "the receiver's")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What the receiver made of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx: stored.
    Written,
    /// 5xx, 429, or no answer: send it again, after `after` if the receiver
    /// said (`Retry-After`).
    Retry {
        /// What went wrong, for the log.
        why: String,
        /// The receiver's `Retry-After`, at most [`MAX_RETRY_AFTER`].
        after: Option<Duration>,
    },
    /// Any other status: the receiver will never take these samples.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The start of the receiver's message.
        message: String,
    },
}

/// A sender's connection, and the endpoint it was made for.
pub struct Connection {
    endpoint: Arc<Endpoint>,
    sender: SendRequest<Full<Bytes>>,
}

/// Sends `body` over the connection in `slot` (opened first, or again when
/// the endpoint changed or it broke), within the endpoint's timeout.
pub async fn send(endpoint: &Arc<Endpoint>, slot: &mut Option<Connection>, body: Bytes) -> Answer {
    match tokio::time::timeout(endpoint.timeout, attempt(endpoint, slot, body)).await {
        Ok(answer) => answer,
        Err(_) => {
            // The connection may still carry the late answer: never reuse it.
            *slot = None;
            Answer::Retry {
                why: format!("no answer within {:?} (`timeout`)", endpoint.timeout),
                after: None,
            }
        }
    }
}

async fn attempt(endpoint: &Arc<Endpoint>, slot: &mut Option<Connection>, body: Bytes) -> Answer {
    let mut reusable = slot.as_ref().is_some_and(|connection| {
        Arc::ptr_eq(&connection.endpoint, endpoint) && !connection.sender.is_closed()
    });
    if let Some(connection) = slot.as_mut().filter(|_| reusable) {
        // A connection the receiver closed while idle (keep-alive timeout)
        // is replaced here rather than failing the request as a retry.
        reusable = connection.sender.ready().await.is_ok();
    }
    if !reusable {
        *slot = None;
        match connect(endpoint).await {
            Ok(sender) => {
                *slot = Some(Connection {
                    endpoint: Arc::clone(endpoint),
                    sender,
                })
            }
            Err(why) => return Answer::Retry { why, after: None },
        }
    }
    let connection = slot.as_mut().expect("connected above");
    let mut request = Request::post(endpoint.path.as_str())
        .body(Full::new(body))
        .expect("a path from a parsed URI and valid headers make a request");
    *request.headers_mut() = endpoint.headers.clone();
    match connection.sender.send_request(request).await {
        Ok(response) => {
            let status = response.status();
            let retry_after = retry_after(response.headers());
            // Read whole, so the connection can carry the next request.
            let body = Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await;
            let message = match body {
                Ok(body) => {
                    let bytes = body.to_bytes();
                    let text = &bytes[..bytes.len().min(MAX_MESSAGE_BYTES)];
                    String::from_utf8_lossy(text).trim().to_string()
                }
                Err(err) => {
                    *slot = None;
                    format!("(body unread: {err})")
                }
            };
            classify(status, retry_after, message)
        }
        Err(err) => {
            *slot = None;
            Answer::Retry {
                why: format!("request failed: {err}"),
                after: None,
            }
        }
    }
}

/// What a status means, as the remote-write specification says: 2xx
/// stored; 5xx and 429 retried; any other refused for good.
fn classify(status: StatusCode, after: Option<Duration>, message: String) -> Answer {
    if status.is_success() {
        Answer::Written
    } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Answer::Retry {
            why: format!("{status}: {message}"),
            after,
        }
    } else {
        Answer::Refused {
            status: status.as_u16(),
            message,
        }
    }
}

/// `Retry-After` as seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|err| format!("cannot connect to {}: {err}", endpoint.describe()))?;
    // Requests are written whole: no reason to wait for more bytes.
    let _ = tcp.set_nodelay(true);
    match &endpoint.tls {
        None => handshake(tcp).await,
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|err| format!("TLS with {} failed: {err}", endpoint.describe()))?;
            handshake(tls).await
        }
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake failed: {err}"))?;
    // Ends when the sender is dropped or the peer closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> PrometheusRemoteWriteConfig {
        toml::from_str(&format!("url = \"{url}\"")).expect("parses")
    }

    #[test]
    fn statuses_mean_what_the_specification_says() {
        let retry = |code: u16| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None, String::new()),
                Answer::Retry { .. }
            )
        };
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, String::new()),
            Answer::Written
        );
        assert!(retry(500) && retry(503) && retry(429));
        assert!(!retry(400) && !retry(401) && !retry(404) && !retry(413));
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_and_capped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        let wait = retry_after(&headers).expect("a date");
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn the_protocol_headers_are_set_and_cannot_be_replaced() {
        let endpoint = Endpoint::new(&config("http://127.0.0.1:9/api/v1/write")).unwrap();
        assert_eq!(endpoint.headers["content-encoding"], "snappy");
        assert_eq!(
            endpoint.headers["x-prometheus-remote-write-version"],
            "0.1.0"
        );
        assert_eq!(endpoint.headers["host"], "127.0.0.1:9");
        assert_eq!(endpoint.path, "/api/v1/write");
        let mut tenant = config("http://h/w");
        tenant.headers.insert("X-Scope-OrgID".into(), "t1".into());
        assert_eq!(
            Endpoint::new(&tenant).unwrap().headers["x-scope-orgid"],
            "t1"
        );
        tenant
            .headers
            .insert("Content-Encoding".into(), "gzip".into());
        let err = Endpoint::new(&tenant).err().unwrap();
        assert_eq!(err.key, "headers.Content-Encoding");
    }

    #[test]
    fn credentials_become_the_authorization_header() {
        let mut basic = config("http://h/w");
        basic.basic_auth = Some(crate::config::BasicAuth {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        });
        let endpoint = Endpoint::new(&basic).unwrap();
        assert_eq!(
            endpoint.headers["authorization"],
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        let mut bearer = config("http://h/w");
        bearer.bearer_token = Some("s3cret\n".into());
        assert_eq!(
            Endpoint::new(&bearer).unwrap().headers["authorization"],
            "Bearer s3cret"
        );
    }

    #[test]
    fn bad_urls_are_refused_naming_the_key() {
        for url in ["ftp://h/w", "127.0.0.1:9090", "http://"] {
            let err = Endpoint::new(&config(url)).err().expect(url);
            assert_eq!(err.key, "url", "{url}");
        }
    }
}
