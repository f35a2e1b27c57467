//! The `prometheus_remote_write` sink against real receivers: Debian's
//! `prometheus` (with `--web.enable-remote-write-receiver`) and
//! `victoria-metrics`, each started here on a free loopback port, and
//! queried back through their HTTP APIs. A small stand-in receiver forces
//! the statuses no real server gives on demand (429 with `Retry-After`, 503,
//! a stall). System tests: `.ci/system/55-prometheus.sh` installs the
//! servers and runs them (`cargo test -p sink-e2e --test prometheus -- --ignored`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sink_e2e::tls::TestCa;
use sink_e2e::*;
use sink_proto::sensor_service_client::SensorServiceClient;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Prometheus,
    VictoriaMetrics,
}

/// A real receiver, on its own port and data directory.
struct Receiver {
    kind: Kind,
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    /// Prometheus' `--web.config.file` (TLS), if any.
    web_config: Option<PathBuf>,
}

/// One series as a receiver holds it: labels and `(ms, value)` samples.
type Stored = BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>>;

impl Receiver {
    fn start(kind: Kind, dir: &Path) -> Self {
        let mut receiver = Self {
            kind,
            child: None,
            dir: dir.join(format!("{kind:?}")),
            port: free_port(),
            web_config: None,
        };
        std::fs::create_dir_all(&receiver.dir).expect("receiver dir");
        receiver.restart();
        receiver
    }

    fn restart(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut command = match self.kind {
            Kind::Prometheus => {
                let config = self.dir.join("prometheus.yml");
                std::fs::write(&config, "global: {}\n").expect("prometheus config");
                let mut command = Command::new(tool("PROMETHEUS", "prometheus"));
                command
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        self.dir.join("data").display()
                    ))
                    .arg(format!("--web.listen-address={listen}"))
                    .arg("--web.enable-remote-write-receiver");
                if let Some(web) = &self.web_config {
                    command.arg(format!("--web.config.file={}", web.display()));
                }
                command
            }
            Kind::VictoriaMetrics => {
                let mut command = Command::new(tool("VICTORIA_METRICS", "victoria-metrics"));
                command
                    .arg(format!(
                        "-storageDataPath={}",
                        self.dir.join("data").display()
                    ))
                    .arg(format!("-httpListenAddr={listen}"))
                    .arg("-search.disableCache")
                    .arg("-search.latencyOffset=0s");
                command
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {:?} ({err}): run .ci/system/55-prometheus.sh",
                    self.kind
                )
            });
        self.child = Some(child);
        let ready = match self.kind {
            Kind::Prometheus => "/-/ready",
            Kind::VictoriaMetrics => "/health",
        };
        assert!(
            wait_until(|| if self.web_config.is_some() {
                // Over TLS only a connection can be seen from here.
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.get(ready).is_some_and(|(status, _)| status == 200)
            }),
            "{:?} did not become ready on {}",
            self.kind,
            self.port
        );
    }

    /// SIGTERM, and waits for the exit: a planned restart.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            end_server(child, libc::SIGTERM);
        }
    }

    /// SIGKILL: a crash, not a planned stop.
    fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            end_server(child, libc::SIGKILL);
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        sink::top::fetch(&format!("127.0.0.1:{}", self.port), path, None).ok()
    }

    /// Every series whose metric name starts with `prefix`, with every sample.
    fn series(&self, prefix: &str) -> Stored {
        let selector = encode(&format!("{{__name__=~\"{prefix}.*\"}}"));
        let mut stored = Stored::new();
        match self.kind {
            Kind::Prometheus => {
                let at = now_ms() as f64 / 1000.0 + 3600.0;
                let path = format!("/api/v1/query?query={selector}%5B1d%5D&time={at}");
                let Some((200, body)) = self.get(&path) else {
                    return stored;
                };
                let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                for series in answer["data"]["result"].as_array().expect("result") {
                    let values = series["values"].as_array().expect("values");
                    let samples = values
                        .iter()
                        .map(|pair| {
                            let seconds = pair[0].as_f64().expect("time");
                            let value: f64 =
                                pair[1].as_str().expect("value").parse().expect("number");
                            ((seconds * 1000.0).round() as i64, value)
                        })
                        .collect();
                    stored.insert(labels_of(&series["metric"]), samples);
                }
            }
            Kind::VictoriaMetrics => {
                // Makes what was just written searchable now rather than within a second.
                let _ = self.get("/internal/force_flush");
                let Some((200, body)) = self.get(&format!("/api/v1/export?match%5B%5D={selector}"))
                else {
                    return stored;
                };
                for line in body.lines().filter(|line| !line.trim().is_empty()) {
                    let series: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                    let times = series["timestamps"].as_array().expect("timestamps");
                    let values = series["values"].as_array().expect("values");
                    let mut samples: Vec<(i64, f64)> = times
                        .iter()
                        .zip(values)
                        .map(|(t, v)| (t.as_i64().expect("ms"), v.as_f64().expect("value")))
                        .collect();
                    samples.sort_by_key(|(t, _)| *t);
                    stored
                        .entry(labels_of(&series["metric"]))
                        .or_default()
                        .extend(samples);
                }
            }
        }
        stored
    }

    /// The metric names (with `prefix`) that hold at least `count` samples
    /// in all, waiting for them.
    fn wait_samples(&self, prefix: &str, count: usize) -> Stored {
        let mut stored = Stored::new();
        wait_until(|| {
            stored = self.series(prefix);
            stored.values().map(Vec::len).sum::<usize>() >= count
        });
        stored
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn labels_of(metric: &serde_json::Value) -> BTreeMap<String, String> {
    metric
        .as_object()
        .expect("metric labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_string()))
        .collect()
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A reading for the wire: `value` an integer or a float, at `ms` (or no
/// `created_at` when `None`).
fn reading(
    name: &str,
    tags: &[(&str, &str)],
    value: Option<Number>,
    ms: Option<i64>,
) -> SensorValue {
    let mut item = SensorValue {
        sensor_name: name.to_string(),
        measurement: Some(Measurement {
            sensor_value: None,
            created_at: ms.map(|ms| prost_types::Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            sensor_value_float: None,
        }),
        labels: Default::default(),
    };
    for (k, v) in tags {
        item.labels.insert(k.to_string(), v.to_string());
    }
    let measurement = item.measurement.as_mut().expect("set above");
    match value {
        Some(Number::Int(i)) => measurement.sensor_value = Some(i),
        Some(Number::Float(f)) => measurement.sensor_value_float = Some(f),
        None => {}
    }
    item
}

#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

/// Sends one call of `items`, which must be answered within [`DEADLINE`]
/// (a sink retrying forever fails the test rather than hanging it).
async fn call(
    client: &mut SensorServiceClient<Channel>,
    items: Vec<SensorValue>,
) -> Result<(), tonic::Status> {
    tokio::time::timeout(
        DEADLINE,
        client.send_sensor_values(SensorValuesRequest { items }),
    )
    .await
    .expect("the call was answered within the deadline")
    .map(drop)
}

/// grpc (with `source` keys) -> buffered -> prometheus_remote_write (with
/// `sink` keys) at `url`, and the `[api]` endpoint for metrics.
fn pipeline(url: &str, source: &str, sink: &str) -> String {
    [
        "[api]\naddress = \"127.0.0.1:0\"\n".to_string(),
        grpc("sensors", source),
        buffered(
            "batch",
            &["sensors"],
            "max_events = 500\nflush_interval = \"50ms\"",
        ),
        stage(
            "sinks",
            "tsdb",
            "prometheus_remote_write",
            &["batch"],
            &format!("url = \"{url}\"\nmin_backoff = \"20ms\"\nmax_backoff = \"200ms\"\n{sink}"),
        ),
    ]
    .concat()
}

const WRITTEN: &str = "acknowledge = \"written\"";

fn metric_of(sink: &SinkProcess, name: &str, reason: Option<&str>) -> f64 {
    let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
    sink.metric(&format!("sink_prometheus_remote_write_{name}"), &labels)
        .unwrap_or(0.0)
}

async fn round_trip(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(kind, dir.path());
    let mut sink = SinkProcess::start(&pipeline(&receiver.url(), WRITTEN, ""));
    let mut client = sink.client("sensors").await;
    let t = now_ms() - 60_000;
    let before = now_ms();
    let items = vec![
        reading("rt_int", &[], Some(Number::Int(42)), Some(t)),
        reading("rt_int", &[], Some(Number::Int(-7)), Some(t + 1)),
        reading(
            "rt_float",
            &[("site", "north"), ("unit", "°C")],
            Some(Number::Float(21.375)),
            Some(t),
        ),
        reading(
            "rt_float",
            &[("site", "south"), ("unit", "°C")],
            Some(Number::Float(-0.5e-3)),
            Some(t),
        ),
        // Sanitised: the name, and a label whose name collides with another's.
        reading(
            "rt_room-1.temp",
            &[("site.id", "a"), ("site-id", "b")],
            Some(Number::Int(1)),
            Some(t),
        ),
        // Beyond 2^53 the float rounds (documented).
        reading("rt_big", &[], Some(Number::Int((1 << 53) + 1)), Some(t)),
        // No value: not sent, counted.
        reading("rt_none", &[], None, Some(t)),
        // No created_at: received_at is the time.
        reading("rt_received", &[], Some(Number::Int(5)), None),
    ];
    call(&mut client, items).await.expect("OK once stored");
    let after = now_ms();
    // Stored before the OK: no waiting needed for Prometheus; VictoriaMetrics
    // makes it searchable at its next flush.
    let stored = receiver.wait_samples("rt_", 7);
    let name = |n: &str| labels(&[("__name__", n)]);
    assert_eq!(
        stored[&name("rt_int")],
        [(t, 42.0), (t + 1, -7.0)],
        "{stored:?}"
    );
    assert_eq!(
        stored[&labels(&[("__name__", "rt_float"), ("site", "north"), ("unit", "°C")])],
        [(t, 21.375)]
    );
    assert_eq!(
        stored[&labels(&[("__name__", "rt_float"), ("site", "south"), ("unit", "°C")])],
        [(t, -0.5e-3)]
    );
    // `site-id` sorts before `site.id`: the joined value keeps that order.
    assert_eq!(
        stored[&labels(&[("__name__", "rt_room_1_temp"), ("site_id", "b;a")])],
        [(t, 1.0)]
    );
    assert_eq!(stored[&name("rt_big")], [(t, (1u64 << 53) as f64)]);
    let received = &stored[&name("rt_received")];
    assert!(
        received.len() == 1 && (before..=after).contains(&received[0].0),
        "{received:?} not within {before}..={after}"
    );
    assert!(!stored.contains_key(&name("rt_none")));
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert_eq!(metric_of(&sink, "samples_sent_total", None), 7.0);
    assert_eq!(
        metric_of(&sink, "readings_skipped_total", Some("no_value")),
        1.0
    );
    sink.stop();
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn readings_arrive_in_prometheus_exactly() {
    round_trip(Kind::Prometheus).await;
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn readings_arrive_in_victoria_metrics_exactly() {
    round_trip(Kind::VictoriaMetrics).await;
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn out_of_order_within_a_batch_is_sorted_and_across_batches_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Kind::Prometheus, dir.path());
    let mut sink = SinkProcess::start(&pipeline(&receiver.url(), WRITTEN, ""));
    let mut client = sink.client("sensors").await;
    let t = now_ms() - 60_000;
    let at = |ms: i64, v: i64| reading("ooo", &[], Some(Number::Int(v)), Some(t + ms));
    // One call, out of order: sorted before sending, all stored.
    let items = vec![at(3000, 3), at(1000, 1), at(2000, 2)];
    call(&mut client, items).await.expect("sorted and stored");
    // Older than what Prometheus holds: refused (400), dropped, not OK.
    let refused = call(&mut client, vec![at(500, 0)])
        .await
        .expect_err("an out-of-order sample is not written");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        metric_of(&sink, "samples_failed_total", Some("out_of_order")),
        1.0
    );
    // Dropped, not retried: the next call goes through at once.
    call(&mut client, vec![at(4000, 4)])
        .await
        .expect("later samples flow on");
    assert_eq!(metric_of(&sink, "retries_total", None), 0.0);
    let stored = receiver.wait_samples("ooo", 4);
    assert_eq!(
        stored[&labels(&[("__name__", "ooo")])],
        [
            (t + 1000, 1.0),
            (t + 2000, 2.0),
            (t + 3000, 3.0),
            (t + 4000, 4.0)
        ]
    );
    assert!(sink.wait_log("refused 1 samples for good (HTTP 400, out_of_order)"));
    // Older than the head of Prometheus' database takes, in a new series.
    let too_old = call(
        &mut client,
        vec![reading(
            "ooo_new",
            &[],
            Some(Number::Int(1)),
            Some(t - 5 * 3_600_000),
        )],
    )
    .await
    .expect_err("a sample older than the head is not written");
    assert_eq!(too_old.code(), tonic::Code::Unavailable, "{too_old:?}");
    assert_eq!(
        metric_of(&sink, "samples_failed_total", Some("too_old")),
        1.0
    );
    sink.stop();
}

/// Clients send calls of 20 readings (each call its own series, so that
/// no retry is ever out of order) until `stop`; returns the names of the
/// readings acknowledged.
fn spawn_clients(
    address: std::net::SocketAddr,
    t: i64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut client = connect(address).await;
        let mut acknowledged = Vec::new();
        let mut number = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let items: Vec<SensorValue> = (0..20)
                .map(|i| {
                    reading(
                        &format!("load_{number}_{i}"),
                        &[],
                        Some(Number::Int(i)),
                        Some(t),
                    )
                })
                .collect();
            let names: Vec<String> = items.iter().map(|i| i.sensor_name.clone()).collect();
            if call(&mut client, items).await.is_ok() {
                acknowledged.extend(names);
            }
            number += 1;
        }
        acknowledged
    })
}

fn assert_all_stored(receiver: &Receiver, acknowledged: &[String], log: &str) {
    let mut missing = Vec::new();
    let found = wait_until(|| {
        let stored = receiver.series("load_");
        let names: std::collections::BTreeSet<&String> = stored
            .keys()
            .filter_map(|labels| labels.get("__name__"))
            .collect();
        missing = acknowledged
            .iter()
            .filter(|name| !names.contains(name))
            .cloned()
            .collect();
        missing.is_empty()
    });
    assert!(
        found,
        "{} of {} acknowledged readings are missing (first: {:?}); sink log:\n{log}",
        missing.len(),
        acknowledged.len(),
        missing.first()
    );
}

/// The receiver down when the sink starts, and taken down under load: with
/// `crash` by SIGKILL, else by SIGTERM. VictoriaMetrics answers 2xx once
/// samples are in its memory and writes them to disk within a few seconds,
/// so only its planned stop keeps what it acknowledged (Prometheus writes
/// its WAL before answering).
async fn receiver_down_at_start_and_mid_run(kind: Kind, crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(kind, dir.path());
    receiver.kill();
    let sink = SinkProcess::start(&pipeline(&receiver.url(), WRITTEN, ""));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = spawn_clients(
        sink.address("sensors"),
        now_ms() - 60_000,
        Arc::clone(&stop),
    );
    // Down at start: retried, and readiness says so.
    assert!(wait_until(|| metric_of(&sink, "retries_total", None) >= 5.0));
    let status = health_of(sink.address("sensors"), "")
        .await
        .expect("health");
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    receiver.restart();
    let sent = metric_of(&sink, "samples_sent_total", None);
    assert!(wait_until(
        || metric_of(&sink, "samples_sent_total", None) > sent + 200.0
    ));
    // Goes down mid-run, under load.
    if crash {
        receiver.kill();
    } else {
        receiver.stop();
    }
    let retries = metric_of(&sink, "retries_total", None);
    assert!(wait_until(
        || metric_of(&sink, "retries_total", None) > retries + 3.0
    ));
    receiver.restart();
    let sent = metric_of(&sink, "samples_sent_total", None);
    assert!(wait_until(
        || metric_of(&sink, "samples_sent_total", None) > sent + 200.0
    ));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = clients.await.expect("clients");
    assert!(acknowledged.len() >= 400, "{}", acknowledged.len());
    let status = health_of(sink.address("sensors"), "")
        .await
        .expect("health");
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert_all_stored(&receiver, &acknowledged, &sink.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn prometheus_down_at_start_and_killed_mid_run_loses_no_acknowledged_reading() {
    receiver_down_at_start_and_mid_run(Kind::Prometheus, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn victoria_metrics_down_at_start_and_restarted_mid_run_loses_no_acknowledged_reading() {
    receiver_down_at_start_and_mid_run(Kind::VictoriaMetrics, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn a_killed_sink_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Kind::Prometheus, dir.path());
    let mut sink = SinkProcess::start(&pipeline(&receiver.url(), WRITTEN, "concurrency = 4"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = spawn_clients(
        sink.address("sensors"),
        now_ms() - 60_000,
        Arc::clone(&stop),
    );
    assert!(wait_until(
        || metric_of(&sink, "samples_sent_total", None) > 1000.0
    ));
    sink.signal(libc::SIGKILL);
    sink.wait_exit();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = clients.await.expect("clients");
    assert!(acknowledged.len() >= 1000, "{}", acknowledged.len());
    assert_all_stored(&receiver, &acknowledged, &sink.log_text());
}

/// A stand-in receiver that answers from a script, for the statuses no
/// real server gives on demand; what it received is recorded.
struct StandIn {
    port: u16,
    requests: Arc<Mutex<Vec<Received>>>,
}

#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    headers: String,
    samples: usize,
}

/// One scripted answer: a status with extra header lines and a body, or a
/// stall (read the request, never answer).
#[derive(Debug, Clone)]
enum Script {
    Answer(u16, &'static str, &'static str),
    Stall,
}

impl StandIn {
    /// Answers with `script` in turn, then 204 forever.
    async fn start(script: Vec<Script>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let record = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                let script = Arc::clone(&script);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let Some((headers, body)) = read_request(&mut socket, &mut buffer).await
                        else {
                            return;
                        };
                        let samples = sink_prometheus::encode::proto::decode(&body)
                            .map(|request| request.timeseries.iter().map(|s| s.samples.len()).sum())
                            .unwrap_or(0);
                        record.lock().unwrap().push(Received {
                            at: Instant::now(),
                            headers,
                            samples,
                        });
                        let next = script.lock().unwrap().pop_front();
                        let (status, extra, text) = match next {
                            Some(Script::Stall) => {
                                // Holds the connection open, answering nothing.
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                return;
                            }
                            Some(Script::Answer(status, extra, text)) => (status, extra, text),
                            None => (204, "", ""),
                        };
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra}\r\n{text}",
                            text.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body.
async fn read_request(
    socket: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let headers = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = headers
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let body = buffer[end + 4..end + 4 + length].to_vec();
                buffer.drain(..end + 4 + length);
                return Some((headers, body));
            }
        }
        let mut chunk = [0u8; 16384];
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn a_4xx_is_dropped_counted_and_never_retried() {
    let stand_in = StandIn::start(vec![
        Script::Answer(400, "", "invalid label name \"1a\""),
        Script::Answer(413, "", "too large"),
    ])
    .await;
    let mut sink = SinkProcess::start(&pipeline(&stand_in.url(), WRITTEN, ""));
    let mut client = sink.client("sensors").await;
    for name in ["bad", "large"] {
        let refused = call(
            &mut client,
            vec![reading(name, &[], Some(Number::Int(1)), Some(now_ms()))],
        )
        .await
        .expect_err("a refused sample is not written");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
    }
    call(
        &mut client,
        vec![reading("good", &[], Some(Number::Int(1)), Some(now_ms()))],
    )
    .await
    .expect("204: written");
    assert_eq!(stand_in.received().len(), 3, "each request sent once");
    assert_eq!(
        metric_of(&sink, "samples_failed_total", Some("bad_labels")),
        1.0
    );
    assert_eq!(metric_of(&sink, "samples_failed_total", Some("other")), 1.0);
    assert_eq!(metric_of(&sink, "retries_total", None), 0.0);
    let headers = stand_in.received()[0].headers.to_ascii_lowercase();
    for header in [
        "content-encoding: snappy",
        "content-type: application/x-protobuf",
        "x-prometheus-remote-write-version: 0.1.0",
        "user-agent: telemetry-sink/",
    ] {
        assert!(headers.contains(header), "{header} missing from {headers}");
    }
    sink.stop();
    // The second refusal came within 10 s of the first: one line only
    // (counted once the process has exited and its log is read whole).
    assert_eq!(
        sink.count_log("refused 1 samples for good"),
        1,
        "{}",
        sink.log_text()
    );
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn a_429_waits_for_retry_after_and_a_503_backs_off_then_the_call_is_ok() {
    let stand_in = StandIn::start(vec![
        Script::Answer(429, "Retry-After: 1\r\n", "slow down"),
        Script::Answer(503, "", "unavailable"),
        Script::Answer(500, "", "internal"),
    ])
    .await;
    let mut sink = SinkProcess::start(&pipeline(
        &stand_in.url(),
        WRITTEN,
        "bearer_token = \"s3cret\"\nheaders = { \"X-Scope-OrgID\" = \"tenant-1\" }",
    ));
    let mut client = sink.client("sensors").await;
    let started = Instant::now();
    call(
        &mut client,
        (0..5)
            .map(|i| reading("retried", &[], Some(Number::Int(i)), Some(now_ms() + i)))
            .collect(),
    )
    .await
    .expect("OK once the receiver took it");
    let took = started.elapsed();
    let received = stand_in.received();
    assert_eq!(received.len(), 4, "{received:?}");
    assert!(
        received.iter().all(|r| r.samples == 5),
        "the same request each time"
    );
    let headers = received[0].headers.to_ascii_lowercase();
    for header in ["authorization: bearer s3cret", "x-scope-orgid: tenant-1"] {
        assert!(headers.contains(header), "{header} missing from {headers}");
    }
    let waited = received[1].at - received[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 honoured, waited {waited:?}"
    );
    // Then min_backoff (20 ms) doubling: far below a second.
    assert!(received[3].at - received[1].at < Duration::from_millis(900));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(metric_of(&sink, "retries_total", None), 3.0);
    assert_eq!(metric_of(&sink, "samples_sent_total", None), 5.0);
    sink.stop();
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn a_stalled_receiver_is_abandoned_after_the_timeout_and_retried() {
    let stand_in = StandIn::start(vec![Script::Stall]).await;
    let mut sink = SinkProcess::start(&pipeline(&stand_in.url(), WRITTEN, "timeout = \"500ms\""));
    let mut client = sink.client("sensors").await;
    let started = Instant::now();
    call(
        &mut client,
        vec![reading(
            "stalled",
            &[],
            Some(Number::Int(1)),
            Some(now_ms()),
        )],
    )
    .await
    .expect("OK after the retry");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(stand_in.received().len(), 2);
    assert!(sink.wait_log("no answer within 500ms"));
    sink.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn a_reload_moves_a_retrying_sink_to_the_right_url() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Kind::VictoriaMetrics, dir.path());
    let wrong = format!("http://127.0.0.1:{}/api/v1/write", free_port());
    let sink = SinkProcess::start(&pipeline(&wrong, WRITTEN, ""));
    let address = sink.address("sensors");
    let call = tokio::spawn(async move {
        call(
            &mut connect(address).await,
            vec![reading("moved", &[], Some(Number::Int(9)), Some(now_ms()))],
        )
        .await
    });
    assert!(wait_until(|| metric_of(&sink, "retries_total", None) >= 3.0));
    std::fs::write(
        sink.path("pipeline.toml"),
        pipeline(&receiver.url(), WRITTEN, ""),
    )
    .expect("rewrite pipeline");
    call.await.expect("task").expect("OK once at the new URL");
    let stored = receiver.wait_samples("moved", 1);
    assert_eq!(stored[&labels(&[("__name__", "moved")])].len(), 1);
}

#[tokio::test]
#[ignore = "system test: needs prometheus and victoria-metrics; run by .ci/system/55-prometheus.sh"]
async fn mutual_tls_to_prometheus_sends_with_the_right_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("receiver CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let (server_cert, server_key) = ca.server(1, 30.0).write(dir.path(), "server");
    let (client_cert, client_key) = ca.client("sink").write(dir.path(), "client");
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            server_cert.display(),
            server_key.display(),
            ca_file.display()
        ),
    )
    .expect("web config");
    let mut receiver = Receiver {
        kind: Kind::Prometheus,
        child: None,
        dir: dir.path().join("tls"),
        port: free_port(),
        web_config: Some(web),
    };
    std::fs::create_dir_all(&receiver.dir).expect("receiver dir");
    receiver.restart();
    let url = format!("https://127.0.0.1:{}/api/v1/write", receiver.port);
    let tls = |with_client: bool| {
        let mut keys = format!("tls = {{ ca = \"{}\"", ca_file.display());
        if with_client {
            keys.push_str(&format!(
                ", cert = \"{}\", key = \"{}\"",
                client_cert.display(),
                client_key.display()
            ));
        }
        keys + " }"
    };
    let mut good = SinkProcess::start(&pipeline(&url, WRITTEN, &tls(true)));
    let mut client = good.client("sensors").await;
    let items = (0..3)
        .map(|i| reading("over_tls", &[], Some(Number::Int(i)), Some(now_ms() + i)))
        .collect();
    call(&mut client, items)
        .await
        .expect("stored over mutual TLS");
    assert_eq!(metric_of(&good, "samples_sent_total", None), 3.0);
    good.stop();

    // Without a client certificate the receiver refuses the handshake: a
    // transport failure, retried, never a drop.
    let uncertified = SinkProcess::start(&pipeline(&url, "", &tls(false)));
    let mut client = uncertified.client("sensors").await;
    call(
        &mut client,
        vec![reading(
            "refused_tls",
            &[],
            Some(Number::Int(1)),
            Some(now_ms()),
        )],
    )
    .await
    .expect("accepted into the pipeline");
    assert!(wait_until(|| metric_of(
        &uncertified,
        "retries_total",
        None
    ) >= 3.0));
    assert_eq!(metric_of(&uncertified, "samples_sent_total", None), 0.0);
    assert_eq!(metric_of(&uncertified, "samples_failed_total", None), 0.0);
}
