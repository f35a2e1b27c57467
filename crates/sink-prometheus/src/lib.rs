//! # sink-prometheus: the `prometheus_remote_write` sink
//!
//! Turns readings into samples and remote-writes them (Prometheus remote
//! write 1.0: a snappy-compressed protobuf `WriteRequest` over HTTP) to any
//! receiver that takes it: Prometheus with `--web.enable-remote-write-receiver`,
//! Grafana Mimir, Thanos Receive, Cortex, VictoriaMetrics. A batch counts as
//! written once the receiver answered 2xx for every sample of it, so under
//! `acknowledge = "written"` a client's OK means "stored by the receiver".
//!
//! | module | what |
//! |---|---|
//! | [`mapping`] | readings as series: names and labels sanitised, samples in time order |
//! | [`encode`] | the `WriteRequest`, encoded and compressed |
//! | [`client`] | the HTTP connection and what each answer means |
//! | `sink` | the stage: requests, retries, acknowledgements, metrics |
//!
//! The default `sink` binary links this crate; a distribution that does not
//! want it leaves it out. The user's page is `docs/stages/prometheus_remote_write.md`.

pub mod client;
pub mod config;
pub mod encode;
pub mod mapping;
mod sink;

pub use config::{BasicAuth, ClientTls, PrometheusRemoteWriteConfig};
