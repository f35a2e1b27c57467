//! `sink-load`: plays the original service's sensor nodes against a sink and
//! measures it. It sends `sensor.v1.SensorService/SendSensorValues` calls,
//! encoded once before the run, from a number of concurrent workers over a
//! number of HTTP/2 connections, optionally at a fixed call rate, for a
//! duration or a total count of readings; it retries what the server asks to
//! be retried, prints a progress line each second on stderr and a report at
//! the end on stdout.
//!
//! `sink-load --count 10` sends ten readings to a sink on the default address.

mod client;
mod mqtt;
mod requests;
mod stats;
mod tls;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt;

use crate::client::{Connection, Failure};
use crate::requests::{Encoded, Plan, Shape};
use crate::stats::{Counters, Report, latency_histogram};

/// What sink-load sends (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    Sensor,
    OtlpGrpc,
    OtlpHttp,
}

/// Load generator for telemetry-sink: sends sensor readings over gRPC
/// (`sensor.v1.SensorService/SendSensorValues`) and reports throughput,
/// latency and errors. Exit status 0 when every call was acknowledged.
#[derive(Debug, Parser)]
#[command(name = "sink-load", version, about)]
struct Args {
    /// The sink's gRPC address, `host:port` (or a full `http://` or
    /// `https://` URI).
    #[arg(long, default_value = "127.0.0.1:8000")]
    address: String,

    #[command(flatten)]
    tls: tls::TlsArgs,

    /// Readings in each call.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    readings_per_call: u64,

    /// Send float values (`i + 0.5`) in `sensor_value_float` instead of
    /// integers.
    #[arg(long)]
    float: bool,

    /// Labels on every reading, as `key=value` pairs separated by commas:
    /// `--labels site=a,unit=C`.
    #[arg(long, value_parser = requests::parse_labels, default_value = "")]
    labels: requests::LabelSet,

    /// What to send: `sensor` (sensor.v1 over gRPC), `otlp-grpc`
    /// (`MetricsService/Export`, to an `otlp` source's gRPC address) or
    /// `otlp-http` (`POST /v1/metrics` in protobuf over HTTP/2, to its HTTP
    /// address). In OTLP each reading is a gauge point of its own metric,
    /// its labels the point's attributes.
    #[arg(long, value_enum, default_value_t = Protocol::Sensor)]
    protocol: Protocol,

    /// Distinct sensor names the readings cycle through.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    sensors: u64,

    /// Calls in flight at once (one worker each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,

    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,

    /// Target rate in calls per second over all workers; as fast as the sink
    /// answers when absent.
    #[arg(long)]
    rate: Option<f64>,

    /// How long to send, e.g. `10s` or `1m`: 10s unless --count is given;
    /// with both, whichever ends first.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Total readings to send, then stop.
    #[arg(long)]
    count: Option<u64>,

    /// Times one call is retried after UNAVAILABLE or RESOURCE_EXHAUSTED; 0
    /// gives up at once. A lost connection is not retried: it ends the run
    /// with an error.
    #[arg(long, default_value_t = 10)]
    max_retries: u32,

    /// Wait before a retry when the server's status carries no
    /// google.rpc.RetryInfo; with one, its delay is used.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    retry_delay: Duration,

    /// Longest wait before a retry, whatever RetryInfo says.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    max_retry_delay: Duration,

    /// Worker threads of the load generator; keep it low so that it leaves
    /// the CPU to the sink it measures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,

    /// Print the final report as one JSON object instead of text.
    #[arg(long)]
    json: bool,

    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,

    /// Publish to this MQTT broker (`mqtt://HOST:PORT`) instead of calling
    /// the sink: one reading per message, its value as text, on
    /// `<--mqtt-topic>/s<i>`; `--connections` publishing clients, each with
    /// `--concurrency` messages in flight.
    #[arg(long)]
    mqtt: Option<String>,

    /// QoS of what `--mqtt` publishes: 1 counts a message once the broker
    /// acknowledged it, 0 once sent.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    mqtt_qos: u8,

    /// Topic prefix of what `--mqtt` publishes.
    #[arg(long, default_value = "sensors/load")]
    mqtt_topic: String,
}

/// Default length of a run given neither --duration nor --count.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads as usize)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok((report, lost)) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            if let Some(lost) = lost {
                eprintln!("error: {lost}");
                ExitCode::FAILURE
            } else if report.calls_failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What every worker shares.
struct Shared {
    plan: Plan,
    /// The next call to send; workers take numbers from it.
    next_call: AtomicU64,
    start: Instant,
    deadline: Option<Instant>,
    /// Calls per second, with --rate.
    rate: Option<f64>,
    retry: RetryPolicy,
    counters: Counters,
    /// Set when a connection is lost: every worker stops, and the run ends
    /// with this as its error.
    lost: std::sync::OnceLock<String>,
    address: String,
}

/// How a call is retried.
#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    max_retries: u32,
    default_delay: Duration,
    max_delay: Duration,
}

async fn run(args: &Args) -> anyhow::Result<(Report, Option<String>)> {
    if let Some(url) = &args.mqtt {
        let load = mqtt::MqttLoad {
            url: url.clone(),
            qos: args.mqtt_qos,
            topic: args.mqtt_topic.clone(),
            sensors: args.sensors,
            count: args.count,
            duration: args.duration.unwrap_or(if args.count.is_some() {
                Duration::from_secs(365 * 24 * 3600)
            } else {
                DEFAULT_DURATION
            }),
            connections: args.connections,
            in_flight: u16::try_from(args.concurrency).unwrap_or(u16::MAX),
        };
        return Ok((mqtt::run(&load).await?, None));
    }
    if let Some(rate) = args.rate.filter(|rate| !(rate.is_finite() && *rate > 0.0)) {
        anyhow::bail!("--rate must be a positive number of calls per second, not {rate}");
    }
    let connections =
        connect_all(&args.address, &args.tls, args.connections, args.protocol).await?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let first_created_at = prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    };
    let shape = Shape {
        otlp: args.protocol != Protocol::Sensor,
        float: args.float,
        labels: args.labels.clone(),
    };
    let plan = Plan::new(
        args.readings_per_call,
        args.sensors,
        args.count,
        first_created_at,
        &shape,
    );
    let start = Instant::now();
    let deadline = match args.count {
        Some(_) => args.duration.map(|d| start + d),
        None => Some(start + args.duration.unwrap_or(DEFAULT_DURATION)),
    };
    let shared = Arc::new(Shared {
        plan,
        next_call: AtomicU64::new(0),
        start,
        deadline,
        rate: args.rate,
        retry: RetryPolicy {
            max_retries: args.max_retries,
            default_delay: args.retry_delay,
            max_delay: args.max_retry_delay,
        },
        counters: Counters::default(),
        lost: std::sync::OnceLock::new(),
        address: args.address.clone(),
    });

    let workers: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let connection = connections[(worker % args.connections) as usize].clone();
            tokio::spawn(run_worker(connection, Arc::clone(&shared)))
        })
        .collect();
    let progress = (!args.quiet).then(|| tokio::spawn(report_progress(Arc::clone(&shared))));

    let mut latency = latency_histogram();
    for worker in workers {
        let histogram = worker.await.context("a worker panicked")?;
        latency
            .add(&histogram)
            .context("merging latency histograms")?;
    }
    let elapsed = shared.start.elapsed();
    if let Some(progress) = progress {
        progress.abort();
    }
    let counters = &shared.counters;
    let report = Report {
        elapsed,
        calls_ok: counters.calls_ok.load(Ordering::Relaxed),
        readings_acked: counters.readings_acked.load(Ordering::Relaxed),
        calls_failed: counters.calls_failed.load(Ordering::Relaxed),
        retries: counters.retries.load(Ordering::Relaxed),
        errors: counters.errors_by_code(),
        latency,
    };
    Ok((report, shared.lost.get().cloned()))
}

/// Opens `connections` HTTP/2 connections to `address`, over TLS if `tls`
/// says so, for the calls of `protocol`.
async fn connect_all(
    address: &str,
    tls: &tls::TlsArgs,
    connections: u64,
    protocol: Protocol,
) -> anyhow::Result<Vec<Connection>> {
    let path = match protocol {
        Protocol::Sensor => sink_proto::SEND_SENSOR_VALUES_PATH,
        Protocol::OtlpGrpc => sink_otlp::EXPORT_PATH,
        Protocol::OtlpHttp => client::OTLP_HTTP_PATH,
    };
    let authority = client::authority(address);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _port)| host);
    let tls = tls.client(host)?;
    let mut opened = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        opened.push(Connection::open(address, tls.as_ref(), path).await?);
    }
    Ok(opened)
}

/// One worker: sends one call at a time until the plan or the time runs out,
/// and returns the latencies it measured.
async fn run_worker(connection: Connection, shared: Arc<Shared>) -> Histogram<u64> {
    let mut latency = latency_histogram();
    loop {
        let call = shared.next_call.fetch_add(1, Ordering::Relaxed);
        let Some(request) = shared.plan.request(call) else {
            break;
        };
        if let Some(rate) = shared.rate {
            // Calls keep to a schedule fixed at the start, so a slow answer
            // makes the next calls start at once rather than shifting them all.
            let due = shared.start + Duration::from_secs_f64(call as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        if shared
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
            || shared.lost.get().is_some()
        {
            break;
        }
        let started = Instant::now();
        let Some(acknowledged) = send_with_retries(&connection, request, &shared).await else {
            shared.counters.calls_failed.fetch_add(1, Ordering::Relaxed);
            break;
        };
        latency.saturating_record(started.elapsed().as_micros() as u64);
        let counters = &shared.counters;
        if acknowledged {
            counters.calls_ok.fetch_add(1, Ordering::Relaxed);
            counters
                .readings_acked
                .fetch_add(request.readings, Ordering::Relaxed);
        } else {
            counters.calls_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    latency
}

/// Sends one call, retrying UNAVAILABLE and RESOURCE_EXHAUSTED as the
/// server's RetryInfo says; true when the server acknowledged it, `None`
/// when the connection was lost (which stops every worker: sink-load does
/// not reconnect, and calling on a dead connection fails at once, forever).
async fn send_with_retries(
    connection: &Connection,
    request: &Encoded,
    shared: &Shared,
) -> Option<bool> {
    let mut attempt = 0;
    loop {
        let status = match connection.call(request.frame.clone()).await {
            Ok(()) => return Some(true),
            Err(Failure::Status(status)) => status,
            Err(Failure::ConnectionLost(err)) => {
                let _ = shared.lost.set(format!(
                    "the connection to {} was lost ({err}); stopped: sink-load does not reconnect",
                    shared.address
                ));
                return None;
            }
        };
        shared.counters.error(status.code());
        let retryable = matches!(status.code(), Code::Unavailable | Code::ResourceExhausted);
        if !retryable || attempt >= shared.retry.max_retries {
            return Some(false);
        }
        attempt += 1;
        shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        let delay = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .unwrap_or(shared.retry.default_delay)
            .min(shared.retry.max_delay);
        tokio::time::sleep(delay).await;
    }
}

/// Prints each second the rates of the last second and the errors so far.
async fn report_progress(shared: Arc<Shared>) {
    let counters = &shared.counters;
    let mut ticker = tokio::time::interval_at(
        shared.start + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (mut calls, mut readings) = (0, 0);
    loop {
        ticker.tick().await;
        let now_calls = counters.calls_ok.load(Ordering::Relaxed);
        let now_readings = counters.readings_acked.load(Ordering::Relaxed);
        eprintln!(
            "[{:>4.0}s] {:>8} calls/s {:>10} readings/s  errors {}  retries {}  failed calls {}",
            shared.start.elapsed().as_secs_f64(),
            now_calls - calls,
            now_readings - readings,
            counters.total_errors(),
            counters.retries.load(Ordering::Relaxed),
            counters.calls_failed.load(Ordering::Relaxed),
        );
        (calls, readings) = (now_calls, now_readings);
    }
}
