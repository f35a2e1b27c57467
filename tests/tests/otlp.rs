//! The `otlp` source, end to end: the real `sink` binary, OTLP/gRPC through
//! tonic's client and OTLP/HTTP through raw HTTP/1.1 on a socket (so that
//! every header, body and timing is what the test says), into json_file.
//!
//! The real OpenTelemetry Python SDK exporting to the same binary is in the
//! `#[ignore]`d tests at the end, run by .ci/system/55-otlp.sh.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::Value as Json;
use sink_e2e::*;
use sink_otlp::RpcStatus;
use sink_otlp::proto::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use sink_otlp::proto::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use sink_otlp::proto::common::v1::{AnyValue, KeyValue, any_value};
use sink_otlp::proto::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
    metric, number_data_point,
};
use sink_otlp::proto::resource::v1::Resource;
use tonic::Code;

/// An otlp source `otel` on both listeners (plus `extra` keys), writing to
/// out.json, and the rest of the pipeline.
fn pipeline(extra: &str, rest: &str) -> String {
    [
        stage(
            "sources",
            "otel",
            "otlp",
            &[],
            &format!("grpc_address = \"127.0.0.1:0\"\nhttp_address = \"127.0.0.1:0\"\n{extra}"),
        ),
        json_file("file", &["otel"], "out.json", ""),
        rest.to_string(),
    ]
    .concat()
}

/// The addresses the otlp source `stage` listens on: (gRPC, HTTP).
fn addresses(sink: &SinkProcess, stage: &str) -> (SocketAddr, SocketAddr) {
    let find = |what: &str| {
        let needle = format!("listening for {what} on ");
        let stage = format!("stage=\"{stage}\"");
        let mut found = None;
        wait_until(|| {
            found = sink.log_lines().iter().find_map(|line| {
                let rest = line.split(&needle).nth(1)?;
                line.contains(&stage)
                    .then(|| rest.split_whitespace().next()?.parse().ok())?
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no {what} address; log:\n{}", sink.log_text()))
    };
    (find("OTLP/gRPC"), find("OTLP/HTTP"))
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

/// Nanoseconds of 2026-11-28T10:00:00Z plus `offset` ns.
fn at(offset: u64) -> u64 {
    1_795_860_000_000_000_000 + offset
}

fn number(
    value: number_data_point::Value,
    time: u64,
    attributes: Vec<KeyValue>,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: 0,
        time_unix_nano: time,
        value: Some(value),
        flags: 0,
    }
}

/// One resource (`service.name` = `service`) holding `metrics`.
fn request(service: &str, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![text("service.name", service)],
                dropped_attributes_count: 0,
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: None,
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// A gauge `name` of `count` integer points valued 0.., each with three
/// attributes, the n-th at time `at(n)`.
fn gauge(name: &str, count: u64) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: (0..count)
                .map(|n| {
                    number(
                        number_data_point::Value::AsInt(n as i64),
                        at(n),
                        vec![
                            text("host", "h1"),
                            text("n", &n.to_string()),
                            kv("ok", any_value::Value::BoolValue(true)),
                        ],
                    )
                })
                .collect(),
        })),
        ..Default::default()
    }
}

async fn grpc_client(address: SocketAddr) -> MetricsServiceClient<tonic::transport::Channel> {
    MetricsServiceClient::connect(format!("http://{address}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
}

/// An HTTP answer: status, headers (names lowercase) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `google.rpc.Status` message of a failure answered in protobuf.
    fn status_message(&self) -> String {
        RpcStatus::decode(&self.body[..])
            .unwrap_or_else(|err| panic!("not a Status ({err}): {:?}", self.body))
            .message
    }

    fn response(&self) -> ExportMetricsServiceResponse {
        ExportMetricsServiceResponse::decode(&self.body[..])
            .expect("an ExportMetricsServiceResponse")
    }
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` on a new connection that asks to be closed, and reads the answer.
fn raw_http(address: SocketAddr, head: &str, body: &[u8]) -> Answer {
    try_http(address, head, body).expect("an HTTP answer")
}

/// As [`raw_http`], `None` if the connection fails or breaks off.
fn try_http(address: SocketAddr, head: &str, body: &[u8]) -> Option<Answer> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    let head = format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .expect("status line")
        .split(' ')
        .nth(1)
        .expect("code");
    let headers = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_lowercase(), value.trim().to_string()))
        })
        .collect();
    Some(Answer {
        status: status.parse().expect("numeric status"),
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// POSTs `body` to /v1/metrics with `content_type` and `extra` headers.
fn post(address: SocketAddr, content_type: &str, extra: &str, body: &[u8]) -> Answer {
    let mut head = format!(
        "POST /v1/metrics HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: {}",
        body.len()
    );
    if !extra.is_empty() {
        head.push_str("\r\n");
        head.push_str(extra);
    }
    raw_http(address, &head, body)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// The lines of out.json once there are `count`.
fn written(sink: &SinkProcess, count: usize) -> Vec<Json> {
    let path = sink.path("out.json");
    assert!(
        wait_for_lines(&path, count),
        "expected {count} lines; log:\n{}",
        sink.log_text()
    );
    json_lines(&path)
}

fn line_named<'a>(lines: &'a [Json], name: &str) -> &'a Json {
    lines
        .iter()
        .find(|line| line["sensor_name"] == name)
        .unwrap_or_else(|| panic!("no reading named {name} in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_over_grpc_and_http_arrives_once_with_its_value_time_and_labels() {
    let mut sink = SinkProcess::start(&pipeline("", ""));
    let (grpc, http) = addresses(&sink, "otel");

    // gRPC: an integer gauge, a float sum, with resource and point attributes.
    let sum = Metric {
        name: "requests".into(),
        unit: "{request}".into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: vec![number(
                number_data_point::Value::AsDouble(2.5),
                at(7),
                vec![
                    text("service.name", "overridden"),
                    kv("code", any_value::Value::IntValue(200)),
                ],
            )],
            aggregation_temporality: 2,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let answer = grpc_client(grpc)
        .await
        .export(request("api", vec![gauge("grpc.gauge", 3), sum]))
        .await
        .expect("gRPC export")
        .into_inner();
    assert_eq!(answer.partial_success, None, "nothing rejected");

    // OTLP/HTTP in protobuf, plain and gzip, and JSON as the spec writes it.
    let bytes = request("web", vec![gauge("http.gauge", 2)]).encode_to_vec();
    let plain = post(http, "application/x-protobuf", "", &bytes);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(plain.response().partial_success, None);
    let gz_bytes = request("web", vec![gauge("http.gzip", 1)]).encode_to_vec();
    let zipped = post(
        http,
        "application/x-protobuf",
        "Content-Encoding: gzip",
        &gzip(&gz_bytes),
    );
    assert_eq!(zipped.status, 200);
    let json = r#"{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"curl"}}]},
        "scopeMetrics":[{"metrics":[{"name":"http.json","unit":"s","gauge":{"dataPoints":[
        {"asDouble":0.25,"timeUnixNano":"1795860000000000009","attributes":[{"key":"big","value":{"intValue":"9007199254740993"}}]}]}}]}]}]}"#;
    let answer = post(http, "application/json", "", json.as_bytes());
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.body, b"{}");

    written(&sink, 8);
    sink.stop();
    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), 8, "each point once: {lines:#?}");
    let names: Vec<_> = lines
        .iter()
        .map(|l| l["sensor_name"].as_str().unwrap().to_string())
        .collect();
    for name in [
        "grpc.gauge",
        "requests",
        "http.gauge",
        "http.gzip",
        "http.json",
    ] {
        assert!(
            names.contains(&name.to_string()),
            "{name} missing: {names:?}"
        );
    }
    let first = lines
        .iter()
        .find(|l| l["sensor_name"] == "grpc.gauge" && l["sensor_value"] == 2)
        .expect("the third gRPC gauge point");
    assert_eq!(first["created_at"], "2026-11-28T10:00:00.000000002Z");
    assert_eq!(
        first["labels"],
        serde_json::json!({"host": "h1", "n": "2", "ok": "true", "service.name": "api"})
    );
    let sum = line_named(&lines, "requests");
    assert_eq!(sum["sensor_value"], 2.5);
    assert_eq!(
        sum["labels"],
        serde_json::json!({"code": "200", "otlp.monotonic": "true", "otlp.temporality": "cumulative",
            "otlp.unit": "{request}", "service.name": "overridden"})
    );
    let json = line_named(&lines, "http.json");
    assert_eq!(json["sensor_value"], 0.25);
    assert_eq!(json["created_at"], "2026-11-28T10:00:00.000000009Z");
    assert_eq!(
        json["labels"],
        serde_json::json!({"big": "9007199254740993", "otlp.unit": "s", "service.name": "curl"})
    );
    assert_eq!(
        line_named(&lines, "http.gzip")["labels"]["service.name"],
        "web"
    );
}

/// A request of one gauge point and two summary points.
fn with_summary() -> ExportMetricsServiceRequest {
    let summary = Metric {
        name: "latency".into(),
        data: Some(metric::Data::Summary(Summary {
            data_points: vec![SummaryDataPoint::default(); 2],
        })),
        ..Default::default()
    };
    request("api", vec![gauge("kept", 1), summary])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_and_histograms_are_counted_in_partial_success_never_dropped_silently() {
    let mut sink = SinkProcess::start(&pipeline("", "\n[api]\naddress = \"127.0.0.1:0\"\n"));
    let (grpc, http) = addresses(&sink, "otel");
    let answer = grpc_client(grpc)
        .await
        .export(with_summary())
        .await
        .expect("a partial success is a success")
        .into_inner();
    let partial = answer.partial_success.expect("partial_success");
    assert_eq!(partial.rejected_data_points, 2);
    assert!(
        partial
            .error_message
            .contains("2 × summary points are not accepted (only gauges and sums are)"),
        "{}",
        partial.error_message
    );
    let http_answer = post(
        http,
        "application/x-protobuf",
        "",
        &with_summary().encode_to_vec(),
    );
    assert_eq!(http_answer.status, 200);
    assert_eq!(
        http_answer
            .response()
            .partial_success
            .expect("partial_success")
            .rejected_data_points,
        2
    );
    let json = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[
        {"name":"h","histogram":{"dataPoints":[{"count":"1","bucketCounts":["1"]}]}},
        {"name":"e","exponentialHistogram":{"dataPoints":[{},{}]}}]}]}]}"#;
    let answer = post(http, "application/json", "", json.as_bytes());
    assert_eq!(answer.status, 200);
    let body: Json = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(body["partialSuccess"]["rejectedDataPoints"], "3");
    assert!(
        body["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("exponential histogram points are not accepted")
    );
    assert_eq!(written(&sink, 2).len(), 2);
    assert_eq!(
        sink.wait_metric("sink_otlp_points_total", &[("outcome", "rejected")], 7.0),
        7.0
    );
    assert_eq!(
        sink.metric("sink_otlp_points_total", &[("outcome", "accepted")]),
        Some(2.0)
    );
    sink.stop();
}

#[test]
fn each_http_failure_answers_the_status_the_specification_names() {
    let sink = SinkProcess::start(&pipeline(
        "max_message_bytes = 1000\nrate_limit = { bytes_per_second = 1, burst_bytes = 600 }\n",
        "",
    ));
    let (_, http) = addresses(&sink, "otel");
    let valid = request("api", vec![gauge("g", 1)]).encode_to_vec();

    let not_found = raw_http(http, "POST /v1/traces HTTP/1.1\r\nContent-Length: 0", b"");
    assert_eq!(not_found.status, 404);
    let get = raw_http(http, "GET /v1/metrics HTTP/1.1", b"");
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    let text = post(http, "text/plain", "", b"hello");
    assert_eq!(text.status, 415);
    assert!(text.status_message().contains("Content-Type must be"));
    let brotli = post(
        http,
        "application/x-protobuf",
        "Content-Encoding: br",
        &valid,
    );
    assert_eq!(brotli.status, 415);

    let garbage = post(http, "application/x-protobuf", "", &[0xff, 0xff, 0xff]);
    assert_eq!(garbage.status, 400);
    assert!(
        garbage.status_message().contains("malformed"),
        "{}",
        garbage.status_message()
    );
    let bad_json = post(http, "application/json", "", b"{\"resourceMetrics\": 5}");
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.header("content-type"), Some("application/json"));
    let message: Json = serde_json::from_slice(&bad_json.body).expect("a JSON Status");
    assert_eq!(message["code"], Code::InvalidArgument as i32);
    let bad_gzip = post(
        http,
        "application/x-protobuf",
        "Content-Encoding: gzip",
        b"not gzip",
    );
    assert_eq!(bad_gzip.status, 400);

    // Announced too large: refused before the body is read.
    let huge = raw_http(
        http,
        "POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000000000",
        b"",
    );
    assert_eq!(huge.status, 413);
    assert!(huge.status_message().contains("max_message_bytes"));
    // A gzip bomb: 300 bytes that inflate past max_message_bytes.
    let bomb = gzip(&vec![0u8; 100_000]);
    assert!(bomb.len() < 600);
    let inflated = post(
        http,
        "application/x-protobuf",
        "Content-Encoding: gzip",
        &bomb,
    );
    assert_eq!(inflated.status, 413);

    // An empty request is a success and costs nothing.
    let empty = post(http, "application/x-protobuf", "", b"");
    assert_eq!(empty.status, 200);
    assert_eq!(empty.response().partial_success, None);

    // The rate limit's burst (600 bytes) is spent by now: 429 and when to retry.
    let mut limited = None;
    for _ in 0..5 {
        let answer = post(http, "application/x-protobuf", "", &valid);
        if answer.status == 429 {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("429 once the burst is spent");
    let retry_after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1, "{retry_after}");
    assert!(limited.status_message().contains("rate limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failures_carry_the_specified_codes() {
    let sink = SinkProcess::start(&pipeline(
        "max_points_per_call = 5\nrate_limit = { bytes_per_second = 1, burst_bytes = 2000 }\n",
        "",
    ));
    let (grpc, _) = addresses(&sink, "otel");
    let mut client = grpc_client(grpc).await;
    let empty = client
        .export(ExportMetricsServiceRequest::default())
        .await
        .expect("an empty request succeeds");
    assert_eq!(empty.into_inner().partial_success, None);
    let too_many = client
        .export(request("api", vec![gauge("g", 6)]))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert!(
        too_many.message().contains("max_points_per_call"),
        "{}",
        too_many.message()
    );
    assert_eq!(retry_delay(&too_many), None, "not retryable: no RetryInfo");

    let garbage = call_raw(grpc, sink_otlp::EXPORT_PATH, &[0xff, 0xff, 0xff]).await;
    assert_eq!(garbage.0, Code::InvalidArgument, "{}", garbage.1);

    let mut limited = None;
    for _ in 0..50 {
        if let Err(status) = client.export(request("api", vec![gauge("g", 5)])).await {
            limited = Some(status);
            break;
        }
    }
    let limited = limited.expect("the burst runs out");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(retry_delay(&limited).is_some(), "retryable: RetryInfo");
}

/// Calls `path` on `address` with `message` as the raw request message,
/// answering the status code and message.
async fn call_raw(address: SocketAddr, path: &'static str, message: &[u8]) -> (Code, String) {
    match sink_e2e::call_raw(address, path, message.to_vec()).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

#[test]
fn slow_bodies_and_silent_connections_hold_nothing() {
    let sink = SinkProcess::start(&pipeline(
        "body_timeout = \"300ms\"\nidle_timeout = \"300ms\"\n",
        "",
    ));
    let (_, http) = addresses(&sink, "otel");
    // Headers announcing a body that never comes: 408 once body_timeout passes.
    let started = Instant::now();
    let slow = raw_http(
        http,
        "POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: 500",
        b"\x0a",
    );
    assert_eq!(slow.status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Connections that send nothing at all are closed.
    let silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(http).expect("connect"))
        .collect();
    for mut stream in silent {
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        let read = stream.read(&mut buf).unwrap_or(0);
        assert!(read == 0 || buf.starts_with(b"HTTP/1.1 408"), "{read}");
    }
    // And the source still serves.
    let ok = post(
        http,
        "application/x-protobuf",
        "",
        &request("api", vec![gauge("after", 1)]).encode_to_vec(),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn many_tiny_points_are_refused_before_they_cost_memory() {
    let sink = SinkProcess::start(&pipeline(
        "max_points_per_call = 100000000\n",
        "\n[settings]\nmemory_limit = \"8MiB\"\n",
    ));
    let (_, http) = addresses(&sink, "otel");
    // In JSON: a million empty points, 3 bytes each.
    let json = format!(
        r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"m","gauge":{{"dataPoints":[{}{{}}]}}}}]}}]}}]}}"#,
        "{},".repeat(1_000_000)
    );
    let answer = post(http, "application/json", "", json.as_bytes());
    assert_eq!(
        answer.status,
        413,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    // 2 MiB of empty points, 2 bytes each on the wire: a million readings,
    // far more than 8 MiB once decoded.
    let mut gauge = Vec::new();
    for _ in 0..1_000_000 {
        gauge.extend_from_slice(&[0x0a, 0x00]);
    }
    let mut metric = vec![0x0a, 0x01, b'm'];
    prost::encoding::bytes::encode(5, &gauge, &mut metric);
    let mut scope = Vec::new();
    prost::encoding::bytes::encode(2, &metric, &mut scope);
    let mut resource = Vec::new();
    prost::encoding::bytes::encode(2, &scope, &mut resource);
    let mut bytes = Vec::new();
    prost::encoding::bytes::encode(1, &resource, &mut bytes);
    let answer = post(http, "application/x-protobuf", "", &bytes);
    assert_eq!(answer.status, 413, "{}", answer.status_message());
    assert!(
        answer.status_message().contains("memory_limit"),
        "{}",
        answer.status_message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_acknowledgements_survive_kill_9() {
    let sink = SinkProcess::start(&pipeline("acknowledge = \"written\"\n", ""));
    let (grpc, http) = addresses(&sink, "otel");
    let mut client = grpc_client(grpc).await;
    let mut acknowledged = Vec::new();
    for call in 0..40 {
        let name = format!("call{call}");
        let ok = if call % 2 == 0 {
            client
                .export(request("api", vec![gauge(&name, 5)]))
                .await
                .is_ok()
        } else {
            let bytes = request("api", vec![gauge(&name, 5)]).encode_to_vec();
            let head = format!(
                "POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}",
                bytes.len()
            );
            try_http(http, &head, &bytes).is_some_and(|answer| answer.status == 200)
        };
        if ok {
            acknowledged.push(name);
        }
        if call == 30 {
            sink.signal(libc::SIGKILL);
        }
    }
    assert!(acknowledged.len() >= 30, "{acknowledged:?}");
    let lines = json_lines_so_far(&sink.path("out.json"));
    for name in &acknowledged {
        let count = lines.iter().filter(|l| l["sensor_name"] == *name).count();
        assert_eq!(
            count, 5,
            "{name} was acknowledged but has {count} of 5 points"
        );
    }
}

#[test]
fn the_source_is_validated_and_described() {
    assert_refused(
        &[
            stage("sources", "otel", "otlp", &[], ""),
            json_file("file", &["otel"], "out.json", ""),
        ]
        .concat(),
        &[],
        &["otel", "grpc_address", "http_address"],
    );
    assert_refused(
        &pipeline("max_points_per_call = 0\n", ""),
        &[],
        &["otel", "max_points_per_call"],
    );
    let described = Command::new(sink_binary())
        .args(["describe", "otlp"])
        .output()
        .expect("sink describe");
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(text.contains("http_address"), "{text}");
}

#[test]
fn limits_reload_live() {
    let sink = SinkProcess::start(&pipeline("max_message_bytes = 100\n", ""));
    let (_, http) = addresses(&sink, "otel");
    let bytes = request("api", vec![gauge("g", 3)]).encode_to_vec();
    assert!(bytes.len() > 100);
    assert_eq!(post(http, "application/x-protobuf", "", &bytes).status, 413);
    std::fs::write(
        sink.path("pipeline.toml"),
        pipeline("max_message_bytes = 100000\n", ""),
    )
    .expect("rewrite");
    assert!(
        wait_until(|| post(http, "application/x-protobuf", "", &bytes).status == 200),
        "the new limit never applied; log:\n{}",
        sink.log_text()
    );
}

/// The OpenTelemetry Python SDK (its OTLP exporters over gRPC and HTTP,
/// unchanged) exporting gauges and counters, integer and float, with
/// resource and point attributes: every point arrives once, exact.
#[test]
#[ignore = "needs the OpenTelemetry Python SDK: .ci/system/55-otlp.sh"]
fn the_python_sdk_exports_over_grpc_and_http() {
    let mut sink = SinkProcess::start(&pipeline("", ""));
    let (grpc, http) = addresses(&sink, "otel");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/export_metrics.py");
    for (protocol, endpoint) in [
        ("grpc", format!("http://{grpc}")),
        ("http", format!("http://{http}/v1/metrics")),
    ] {
        let out = Command::new("python3")
            .args([script, protocol, &endpoint])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{protocol}: {}\n{}\nsink log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            sink.log_text()
        );
    }
    // Per protocol: a gauge of two int points, a float gauge, an int counter
    // of two points and a float up-down counter: six points.
    written(&sink, 12);
    sink.stop();
    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), 12, "{lines:#?}");
    for protocol in ["grpc", "http"] {
        let of = |name: &str| -> Vec<&Json> {
            lines
                .iter()
                .filter(|l| l["sensor_name"] == name && l["labels"]["exporter"] == protocol)
                .collect()
        };
        let queue = of("queue.depth");
        assert_eq!(queue.len(), 2, "{protocol}: {lines:#?}");
        let mut values: Vec<i64> = queue
            .iter()
            .map(|l| l["sensor_value"].as_i64().unwrap())
            .collect();
        values.sort();
        assert_eq!(values, [3, 7]);
        let temperature = of("temperature");
        assert_eq!(temperature.len(), 1);
        assert_eq!(temperature[0]["sensor_value"], 21.5);
        assert_eq!(temperature[0]["labels"]["otlp.unit"], "Cel");
        let requests = of("requests");
        assert_eq!(requests.len(), 2);
        for r in &requests {
            assert_eq!(r["labels"]["otlp.monotonic"], "true");
            assert_eq!(r["labels"]["otlp.temporality"], "cumulative");
            assert_eq!(r["labels"]["service.name"], "sdk-test");
            assert_eq!(r["labels"]["deployment"], "ci");
        }
        let by_route: Vec<(String, i64)> = requests
            .iter()
            .map(|r| {
                (
                    r["labels"]["route"].as_str().unwrap().to_string(),
                    r["sensor_value"].as_i64().unwrap(),
                )
            })
            .collect();
        assert!(by_route.contains(&("/a".into(), 5)), "{by_route:?}");
        assert!(by_route.contains(&("/b".into(), 2)), "{by_route:?}");
        let balance = of("balance");
        assert_eq!(balance.len(), 1);
        assert_eq!(balance[0]["sensor_value"], -1.25);
        assert_eq!(balance[0]["labels"]["otlp.monotonic"], "false");
        assert_eq!(balance[0]["labels"]["ratio"], "0.5");
        for line in lines.iter() {
            assert!(line["created_at"].as_str().is_some(), "{line}");
        }
    }
}

/// A TLS connection to `address` trusting `ca`, offering `alpn`.
async fn tls_stream(
    address: SocketAddr,
    ca: &sink_e2e::tls::TestCa,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("PEM"))
        .expect("CA");
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake")
}

/// POSTs `body` as protobuf over HTTP/2 on `io`; the answer's status.
async fn post_http2<T>(io: T, body: Vec<u8>) -> u16
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, connection) = h2::client::handshake(io).await.expect("HTTP/2");
    tokio::spawn(connection);
    let request = http::Request::post("https://localhost/v1/metrics")
        .header("content-type", "application/x-protobuf")
        .body(())
        .expect("request");
    let (answer, mut stream) = client.send_request(request, false).expect("send");
    stream.send_data(body.into(), true).expect("body");
    answer.await.expect("answer").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_both_listeners_and_http_speaks_http1_and_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = tempfile::tempdir().unwrap();
    let ca = sink_e2e::tls::TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let mut sink = SinkProcess::start(&pipeline(
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
        "",
    ));
    let (grpc, http) = addresses(&sink, "otel");

    let channel = sink_e2e::tls::tls_channel(grpc, &ca, None)
        .await
        .expect("TLS connect");
    MetricsServiceClient::new(channel)
        .export(request("api", vec![gauge("tls.grpc", 1)]))
        .await
        .expect("gRPC over TLS");

    // An HTTP/1.1-only client, as the SDKs' HTTP exporters are.
    let mut stream = tls_stream(http, &ca, &[b"http/1.1"]).await;
    let body = request("api", vec![gauge("tls.http1", 1)]).encode_to_vec();
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(&body).await.expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A client that prefers HTTP/2 (Go's, Java's) gets it, over TLS and in
    // plaintext by prior knowledge.
    let stream = tls_stream(http, &ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let body = request("api", vec![gauge("tls.http2", 1)]).encode_to_vec();
    assert_eq!(post_http2(stream, body).await, 200);

    let lines = written(&sink, 3);
    sink.stop();
    let names: Vec<_> = lines.iter().map(|l| l["sensor_name"].clone()).collect();
    for name in ["tls.grpc", "tls.http1", "tls.http2"] {
        assert!(names.contains(&Json::from(name)), "{names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http2_by_prior_knowledge_is_served() {
    let sink = SinkProcess::start(&pipeline("", ""));
    let (_, http) = addresses(&sink, "otel");
    let tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
    let body = request("api", vec![gauge("h2c", 2)]).encode_to_vec();
    assert_eq!(post_http2(tcp, body).await, 200);
    assert_eq!(written(&sink, 2).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_retryable_with_when_to_retry() {
    let sink = SinkProcess::start(
        &[
            stage(
                "sources",
                "otel",
                "otlp",
                &[],
                "grpc_address = \"127.0.0.1:0\"\nhttp_address = \"127.0.0.1:0\"\nwhen_full = \"reject\"\n",
            ),
            stage(
                "sinks",
                "slow",
                "blackhole",
                &["otel"],
                "capacity = 1\ndelay_per_batch = \"30s\"\n",
            ),
        ]
        .concat(),
    );
    let (grpc, http) = addresses(&sink, "otel");
    let body = request("api", vec![gauge("g", 1)]).encode_to_vec();
    // The sink takes one batch and sleeps; the channel holds one more.
    let mut refused = None;
    for _ in 0..10 {
        let answer = post(http, "application/x-protobuf", "", &body);
        if answer.status != 200 {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.expect("the full pipeline refuses");
    assert_eq!(refused.status, 503, "{}", refused.status_message());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.status_message().contains("full"));
    let status = grpc_client(grpc)
        .await
        .export(request("api", vec![gauge("g", 1)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(retry_delay(&status).is_some(), "RetryInfo: {status:?}");
}
