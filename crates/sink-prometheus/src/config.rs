//! The keys of a `prometheus_remote_write` sink.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sink_api::ConfigError;
pub use sink_stages::client_tls::ClientTls;

/// Remote-writes every reading with a value as a sample (Prometheus remote
/// write 1.0) to Prometheus, Mimir, Thanos, Cortex or VictoriaMetrics; a
/// batch counts as written once the receiver answered 2xx for all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrometheusRemoteWriteConfig {
    /// The receiver's remote-write endpoint, `http://` or `https://`
    /// (`"http://127.0.0.1:9090/api/v1/write"` for Prometheus,
    /// `".../api/v1/write"` for VictoriaMetrics, `".../api/v1/push"` for
    /// Mimir).
    pub url: String,
    /// Most samples in one request; a batch larger is sent in several.
    #[serde(default = "default_max_samples")]
    pub max_samples_per_request: usize,
    /// Requests in flight at once. Series are spread over this many
    /// connections, each sending its series' samples in order, so the
    /// samples of one series never overtake each other.
    #[serde(default = "one")]
    pub concurrency: usize,
    /// How long one request may take, connecting included, before it is
    /// abandoned and retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub timeout: Duration,
    /// First wait before retrying a request the receiver failed (5xx, 429,
    /// no answer); each retry waits twice as long, up to `max_backoff`.
    #[serde(default = "default_min_backoff", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub min_backoff: Duration,
    /// Longest wait between retries (a `Retry-After` from the receiver is
    /// honoured beyond it, up to 5 minutes).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub max_backoff: Duration,
    /// `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// A file holding the bearer token (surrounding whitespace ignored),
    /// read at start and whenever a reload changes this stage's keys.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// HTTP basic authentication: `{ username = "...", password = "..." }`.
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// Extra request headers, e.g. `{ "X-Scope-OrgID" = "tenant-1" }` for a
    /// Mimir, Cortex or Thanos tenant. The protocol's own headers cannot be
    /// replaced.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// TLS for an `https://` URL: `{ ca = "...", cert = "...", key = "..." }`
    /// (all optional; without `ca` the system's CA certificates are trusted).
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// HTTP basic authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

fn default_max_samples() -> usize {
    2000
}

fn one() -> usize {
    1
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_min_backoff() -> Duration {
    Duration::from_millis(30)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

impl PrometheusRemoteWriteConfig {
    /// Checks what the types cannot; each error names its key. The URL,
    /// headers and files are checked by building the endpoint
    /// ([`crate::client::Endpoint::new`]).
    pub fn check_numbers(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.max_samples_per_request) {
            return Err(ConfigError::new(
                "max_samples_per_request",
                "must be from 1 to 1000000",
            ));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(ConfigError::new("concurrency", "must be from 1 to 64"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be more than 0s"));
        }
        if self.min_backoff.is_zero() {
            return Err(ConfigError::new("min_backoff", "must be more than 0s"));
        }
        if self.max_backoff < self.min_backoff {
            return Err(ConfigError::new(
                "max_backoff",
                "must be at least `min_backoff`",
            ));
        }
        let auths = [
            self.bearer_token.is_some(),
            self.bearer_token_file.is_some(),
            self.basic_auth.is_some(),
        ];
        if auths.iter().filter(|given| **given).count() > 1 {
            return Err(ConfigError::new(
                "bearer_token",
                "give one of `bearer_token`, `bearer_token_file` or `basic_auth`",
            ));
        }
        self.tls.as_ref().map_or(Ok(()), ClientTls::check)
    }
}
