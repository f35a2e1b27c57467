//! `[api]`: the HTTP endpoint that serves `/metrics` (Prometheus),
//! `/health` and `/ready`, off unless the file gives it an address.
//!
//! The listener is bound before any stage is built, so an address in use is
//! refused at startup like every other mistake; it stays open through the
//! drain that follows SIGTERM (with `/ready` answering 503), and closes as
//! the process exits.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use sink_api::metrics::{MetricsRegistry, OPENMETRICS_TEXT, PROMETHEUS_TEXT};

/// The `[api]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` to serve on; absent: no endpoint. Port 0 picks a free
    /// port, which the log names. Needs a restart to change.
    #[serde(default)]
    pub address: Option<String>,
}

impl ApiConfig {
    /// Checks that the address is `host:port` and resolves; the message
    /// suits key `api.address`.
    pub fn validate(&self) -> Result<(), String> {
        let Some(address) = &self.address else {
            return Ok(());
        };
        match address.to_socket_addrs() {
            Ok(addresses) if addresses.len() > 0 => Ok(()),
            Ok(_) => Err(format!("`{address}` resolves to no address")),
            Err(err) => Err(format!(
                "`{address}` is not a host:port address such as \"127.0.0.1:9464\": {err}"
            )),
        }
    }
}

/// Binds the endpoint's listener on `address`.
pub fn bind(address: &str) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether the sink is ready, and if not, why: a set of reasons, each under
/// its own key, so that every part of the runtime can say why it is not
/// ready and take it back. `/ready` answers 503 with the first reason while
/// any is set.
///
/// Keys used: `starting`, `shutdown`, `stage:<id>` (a stage that stopped);
/// a stall detector can add its own (`stalled`).
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, String>>>);

impl Readiness {
    /// Not ready yet: the pipeline is starting.
    pub fn starting() -> Self {
        let readiness = Self::default();
        readiness.not_ready("starting", "the pipeline is starting");
        readiness
    }

    /// Not ready, because of `reason`, until [`ready`](Self::ready)`(key)`.
    pub fn not_ready(&self, key: &str, reason: impl Into<String>) {
        self.lock().insert(key.to_string(), reason.into());
    }

    /// Takes back the reason set under `key`.
    pub fn ready(&self, key: &str) {
        self.lock().remove(key);
    }

    /// `Ok` when ready, else the first reason (shutdown before the others).
    pub fn check(&self) -> Result<(), String> {
        let reasons = self.lock();
        match reasons.get("shutdown").or_else(|| reasons.values().next()) {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves the endpoint on `listener` until the process ends; says where.
pub fn spawn(
    listener: std::net::TcpListener,
    registry: MetricsRegistry,
    readiness: Readiness,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let router = Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let registry = registry.clone();
                async move { metrics(&registry, &headers) }
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.check() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!("the [api] endpoint stopped: {err}");
        }
    });
    Ok((local, task))
}

/// `/metrics`: OpenMetrics when the scraper accepts it, else the Prometheus
/// text format.
fn metrics(registry: &MetricsRegistry, headers: &HeaderMap) -> axum::response::Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        registry.encode(openmetrics),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_shutdown_first_and_clears_by_key() {
        let readiness = Readiness::starting();
        assert_eq!(readiness.check(), Err("the pipeline is starting".into()));
        readiness.ready("starting");
        assert_eq!(readiness.check(), Ok(()));
        readiness.not_ready("stage:b", "stage `b` stopped");
        readiness.not_ready("shutdown", "shutting down");
        assert_eq!(readiness.check(), Err("shutting down".into()));
    }

    #[test]
    fn addresses_are_checked() {
        let config = |address: &str| ApiConfig {
            address: Some(address.into()),
        };
        assert!(config("127.0.0.1:0").validate().is_ok());
        assert!(config("localhost:9464").validate().is_ok());
        assert!(config("127.0.0.1").validate().is_err());
        assert!(config("127.0.0.1:99999").validate().is_err());
        assert!(ApiConfig::default().validate().is_ok());
    }
}
