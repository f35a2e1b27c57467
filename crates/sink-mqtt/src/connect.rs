//! Where and how the source connects: the brokers of `url`, credentials and
//! TLS, turned into the client's options, one broker at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use sink_api::ConfigError;
pub use sink_stages::client_tls::ClientTls;

/// One broker URL or several: `"mqtt://127.0.0.1:1883"`,
/// `["mqtts://a:8883", "mqtts://b:8883"]`, or one string of URLs separated
/// by commas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Brokers {
    /// One broker (or several separated by commas).
    One(String),
    /// Several brokers, tried in turn when one cannot be reached.
    Many(Vec<String>),
}

impl Brokers {
    fn list(&self) -> Vec<&str> {
        match self {
            Self::One(urls) => urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .collect(),
            Self::Many(urls) => urls.iter().map(String::as_str).collect(),
        }
    }
}

/// One broker of `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// `mqtts://`: TLS.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port (1883, or 8883 with TLS, when the URL gives none).
    pub port: u16,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl Broker {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "`{url}` is not a broker URL: write mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '@', '?', '#', ' ']) {
            return Err(format!(
                "`{url}`: only a host and port may follow the scheme (credentials go in `username` and `password`)"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            // `[::1]:1883`, `host:1883`; a bare IPv6 address needs brackets.
            Some((host, port)) if !port.contains(']') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| format!("`{url}`: `{port}` is not a port"))?;
                (host, port)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

/// Everything needed to connect, checked and loaded once when the stage is built.
#[derive(Clone)]
pub struct Connection {
    /// The brokers, tried in turn.
    pub brokers: Vec<Broker>,
    /// The MQTT client id.
    pub client_id: String,
    /// Start a new session on every connection instead of resuming one.
    pub clean_session: bool,
    /// The keepalive interval.
    pub keepalive: Duration,
    /// User name and where its password comes from.
    pub username: Option<String>,
    /// The password, given inline.
    pub password: Option<String>,
    /// A file holding the password, read again on every connection.
    pub password_file: Option<PathBuf>,
    /// TLS for `mqtts://` brokers.
    pub tls: Option<Arc<ClientConfig>>,
    /// The largest packet read; larger ones end the connection.
    pub max_packet_bytes: usize,
}

impl Connection {
    /// Parses `url` into brokers; the error names the key.
    pub fn brokers(url: &Brokers) -> Result<Vec<Broker>, ConfigError> {
        let list = url.list();
        if list.is_empty() {
            return Err(ConfigError::new("url", "must name at least one broker"));
        }
        list.into_iter()
            .map(|url| Broker::parse(url).map_err(|why| ConfigError::new("url", why)))
            .collect()
    }

    /// The client's options to connect to `broker`; fails only when the
    /// password file cannot be read.
    pub fn options(&self, broker: &Broker) -> Result<MqttOptions, String> {
        let mut options = MqttOptions::new(&self.client_id, &broker.host, broker.port);
        options
            .set_keep_alive(self.keepalive)
            .set_clean_session(self.clean_session)
            .set_manual_acks(true)
            .set_max_packet_size(self.max_packet_bytes, 64 << 10)
            // Acknowledgements and subscriptions; a full channel only makes
            // the tasks that acknowledge wait.
            .set_request_channel_capacity(1024);
        if let Some(username) = &self.username {
            let password = match (&self.password, &self.password_file) {
                (Some(password), _) => password.clone(),
                (None, Some(file)) => read_password(file)?,
                (None, None) => String::new(),
            };
            options.set_credentials(username, password);
        }
        if broker.tls {
            let config = match &self.tls {
                Some(config) => Arc::clone(config),
                None => client_config(None).map_err(|err| err.to_string())?,
            };
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
        }
        Ok(options)
    }
}

/// Reads a password file: its first line, without the line end.
pub fn read_password(file: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|err| format!("cannot read password_file `{}`: {err}", file.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// The TLS client configuration of `tls`, for `mqtts://` brokers.
pub fn client_config(tls: Option<&ClientTls>) -> Result<Arc<ClientConfig>, ConfigError> {
    sink_stages::client_tls::client_config(tls, "the brokers'").map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_scheme_host_and_port() {
        let parse = |url| Broker::parse(url).unwrap();
        assert_eq!(
            parse("mqtt://127.0.0.1:1884"),
            Broker {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(parse("mqtts://broker.example").port, 8883);
        assert_eq!(parse("mqtt://broker/").port, 1883);
        assert_eq!(parse("mqtt://[::1]:1883").host, "::1");
        assert_eq!(parse("mqtt://[::1]").port, 1883);
        for bad in [
            "tcp://h:1883",
            "h:1883",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/topic",
        ] {
            assert!(Broker::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn several_brokers_by_list_or_commas() {
        let one = Brokers::One("mqtt://a:1883, mqtts://b".into());
        let brokers = Connection::brokers(&one).unwrap();
        assert_eq!(brokers.len(), 2);
        assert_eq!(brokers[1].to_string(), "mqtts://b:8883");
        assert!(Connection::brokers(&Brokers::Many(vec![])).is_err());
    }
}
