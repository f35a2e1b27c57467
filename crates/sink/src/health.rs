//! `sink health`: asks a running sink, over the standard gRPC health protocol
//! (`grpc.health.v1.Health/Check`), whether it serves, and exits 0 if it does,
//! 1 if not. A container's HEALTHCHECK needs nothing else in the image, and it
//! works against any gRPC server that implements the protocol.
//!
//! Without `--address` it asks every `grpc` source of the pipeline, on the
//! address that source listens on; a wildcard listen address (`0.0.0.0`, `[::]`
//! or the original's `:8000`) is asked on loopback, since a health check runs
//! beside the server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use sink_api::StageKind;

use crate::pipeline::{Pipeline, PipelineErrors};

/// `sink health`'s own flags (the pipeline comes from the global `--pipeline`).
#[derive(Args)]
pub(crate) struct HealthArgs {
    /// The gRPC address to ask, `host:port`; may be given more than once.
    /// Default: the address of every grpc source of the pipeline.
    #[arg(long, value_name = "HOST:PORT")]
    address: Vec<String>,

    /// The service to ask about; the default, the empty name, is the whole server.
    #[arg(long, default_value = "", hide_default_value = true)]
    service: String,

    /// How long each address may take to answer, e.g. `500ms` or `3s`.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// PEM file of the CA that signed the sink's certificate: asks over TLS.
    /// Needed for a grpc source with `tls`.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a source with `tls.client_ca`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Name the sink's certificate must carry; default: the host asked.
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
}

impl HealthArgs {
    /// The TLS client the `--tls-*` options ask for, if any.
    fn tls(&self) -> Result<Option<ClientTlsConfig>, String> {
        if self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && self.tls_key.is_none()
            && self.tls_server_name.is_none()
        {
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        let ca = self
            .tls_ca
            .as_ref()
            .ok_or("TLS needs --tls-ca: the CA certificate (PEM) that signed the sink's")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name);
        }
        Ok(Some(tls))
    }
}

/// Exit code of `sink health` for anything but SERVING everywhere (a
/// container runtime treats any other non-zero code as reserved).
const EXIT_UNHEALTHY: u8 = 1;

/// Runs `sink health`: 0 when every address answers SERVING, 1 otherwise.
pub(crate) fn run(
    args: HealthArgs,
    load: impl FnOnce() -> Result<Pipeline, PipelineErrors>,
) -> ExitCode {
    let targets = if args.address.is_empty() {
        match load() {
            Ok(pipeline) => grpc_targets(&pipeline),
            Err(errors) => {
                for error in &errors.0 {
                    eprintln!("error: {error}");
                }
                return ExitCode::from(EXIT_UNHEALTHY);
            }
        }
    } else {
        args.address.clone()
    };
    if targets.is_empty() {
        eprintln!("error: the pipeline has no grpc source to ask; give --address");
        return ExitCode::from(EXIT_UNHEALTHY);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_UNHEALTHY);
        }
    };
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(EXIT_UNHEALTHY);
        }
    };
    let mut healthy = true;
    for target in &targets {
        match runtime.block_on(check(target, &args.service, args.timeout, tls.clone())) {
            Ok(()) => println!("{target}: SERVING"),
            Err(why) => {
                eprintln!("{target}: unhealthy: {why}");
                healthy = false;
            }
        }
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNHEALTHY)
    }
}

/// The addresses to ask, one per grpc source of `pipeline`.
fn grpc_targets(pipeline: &Pipeline) -> Vec<String> {
    pipeline
        .stages
        .iter()
        .filter(|stage| stage.kind == StageKind::Source && stage.type_name == "grpc")
        .filter_map(|stage| stage.params.get("address")?.as_str())
        .map(dial_address)
        .collect()
}

/// Where to reach a server that listens on `listen`: the same address, but
/// loopback for a wildcard one.
fn dial_address(listen: &str) -> String {
    let listen = listen.trim();
    if let Some(port) = listen.strip_prefix(':') {
        return format!("127.0.0.1:{port}");
    }
    match listen.parse::<SocketAddr>() {
        Ok(address) if address.ip().is_unspecified() => {
            let loopback = match address.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            SocketAddr::new(loopback, address.port()).to_string()
        }
        _ => listen.to_string(),
    }
}

/// Asks `target` once; `Err` says why it is not healthy.
async fn check(
    target: &str,
    service: &str,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if target.contains("://") {
        target.to_string()
    } else {
        format!("{scheme}://{target}")
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|err| format!("not an address: {err}"))?
        .connect_timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|err| format!("TLS: {}", error_chain(&err)))?;
    }
    // One deadline for all of it: connecting, the call, and a server that
    // accepts the connection but never answers.
    let asked = tokio::time::timeout(timeout, async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| connect_error(&err))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => format!("no service `{service}` (NOT_FOUND)"),
                code => format!("{code:?}: {}", status.message()),
            })
    })
    .await
    .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))??;
    match ServingStatus::try_from(asked.into_inner().status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(status.as_str_name().to_string()),
        Err(_) => Err("an unknown status".to_string()),
    }
}

/// Why connecting failed, in a user's words: tonic's error says "transport
/// error: tcp connect error: tcp connect error: Connection refused (os error
/// 111)"; the OS's reason is what matters.
fn connect_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "not reachable: connection refused (nothing listens there: is the sink running, on this address?)".into()
                }
                _ => format!("not reachable: {io}"),
            };
        }
        source = cause.source();
    }
    format!("cannot connect: {}", error_chain(err))
}

/// An error and its causes on one line, each message once (tonic's connect
/// error says only "transport error" at the top, and repeats its cause).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    if parts.len() > 1 && parts[0] == "transport error" {
        parts.remove(0);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::dial_address;

    #[test]
    fn wildcard_addresses_are_asked_on_loopback() {
        assert_eq!(dial_address("0.0.0.0:8000"), "127.0.0.1:8000");
        assert_eq!(dial_address("[::]:8000"), "[::1]:8000");
        assert_eq!(dial_address(":8000"), "127.0.0.1:8000");
        assert_eq!(dial_address("127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(dial_address("localhost:8000"), "localhost:8000");
        assert_eq!(dial_address("10.0.0.5:8000"), "10.0.0.5:8000");
    }
}
