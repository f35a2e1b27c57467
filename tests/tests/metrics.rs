//! The `[api]` endpoint through the real binary: every metric family moving
//! as it should, `/health` and `/ready` through startup and shutdown, a bad
//! `[api]` refused, and `sink top` printing live rates.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use sink_e2e::*;
use tonic::Code;

/// `[api]` on an ephemeral port of the loopback.
const API: &str = "[api]\naddress = \"127.0.0.1:0\"\n";

fn stage_labels(id: &str) -> [(&'static str, &str); 1] {
    [("stage", id)]
}

#[tokio::test]
async fn every_stage_counts_exactly_what_it_received_and_sent() {
    let pipeline = [
        API,
        &grpc("sensors", ""),
        &buffered("batch", &["sensors"], "max_events = 10"),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "m", 4, 5).await;
    assert!(wait_for_lines(&sink.path("out.json"), 20));
    sink.wait_metric(
        "sink_stage_readings_sent_total",
        &stage_labels("file"),
        20.0,
    );

    let samples = sink.scrape();
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric_in(&samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
    };
    for stage in ["sensors", "batch", "file"] {
        assert_eq!(
            value("sink_stage_readings_received_total", &stage_labels(stage)),
            20.0,
            "{stage}"
        );
        assert_eq!(
            value("sink_stage_readings_sent_total", &stage_labels(stage)),
            20.0,
            "{stage}"
        );
    }
    let labels = [("stage", "sensors"), ("type", "grpc"), ("kind", "source")];
    assert_eq!(value("sink_stage_batches_sent_total", &labels), 4.0);
    // Two flushes of 10 on size: the sink wrote two batches.
    assert_eq!(
        value(
            "sink_buffered_flushes_total",
            &[("stage", "batch"), ("reason", "size")]
        ),
        2.0
    );
    assert_eq!(value("sink_buffered_readings", &stage_labels("batch")), 0.0);
    assert_eq!(
        value("sink_stage_batches_sent_total", &stage_labels("file")),
        2.0
    );
    assert_eq!(
        value(
            "sink_stage_input_capacity_batches",
            &[("stage", "file"), ("type", "json_file"), ("kind", "sink")]
        ),
        1024.0
    );
    assert_eq!(
        value("sink_stage_input_batches", &stage_labels("file")),
        0.0
    );
    assert!(
        metric_in(
            &samples,
            "sink_stage_input_batches",
            &stage_labels("sensors")
        )
        .is_none()
    );

    assert_eq!(
        value("sink_grpc_calls_total", &[("code", "OK")]),
        4.0,
        "four calls answered OK"
    );
    assert_eq!(
        value("sink_grpc_calls_total", &[("code", "UNAVAILABLE")]),
        0.0
    );
    assert_eq!(value("sink_grpc_call_duration_seconds_count", &[]), 4.0);
    let sent_bytes: usize = (0..4)
        .map(|call| encoded_len(&request_range("m", call * 5..(call + 1) * 5)))
        .sum();
    assert_eq!(
        value("sink_grpc_request_bytes_total", &[]),
        sent_bytes as f64
    );
    let file_size = std::fs::metadata(sink.path("out.json"))
        .expect("out.json")
        .len();
    assert_eq!(value("sink_bytes_written_total", &[]), file_size as f64);
    assert_eq!(value("sink_write_errors_total", &[]), 0.0);

    assert_eq!(
        value("sink_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(value("process_open_fds", &[]) >= 3.0);
    assert!(value("process_start_time_seconds", &[]) > 1.0e9);
    assert!(metric_in(&samples, "process_cpu_seconds_total", &[]).is_some());
    assert!(value("sink_last_reload_success_timestamp_seconds", &[]) > 1.0e9);
}

#[tokio::test]
async fn metrics_are_openmetrics_when_asked_for_and_health_answers() {
    let sink = SinkProcess::start(&[API, &basic_pipeline("")].concat());
    let address = sink.api_address();
    let (status, text) = sink::top::fetch(&address, "/metrics", None).expect("GET");
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE sink_stage_readings_sent_total counter"));
    assert!(!text.contains("# EOF"));
    let (status, open) = sink::top::fetch(
        &address,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .expect("GET");
    assert_eq!(status, 200);
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE sink_stage_readings_sent counter"));
    assert_eq!(
        sink::top::fetch(&address, "/health", None).expect("GET").0,
        200
    );
    assert_eq!(
        sink::top::fetch(&address, "/ready", None).expect("GET"),
        (200, "ready\n".to_string())
    );
    assert_eq!(
        sink::top::fetch(&address, "/nothing", None).expect("GET").0,
        404
    );
}

#[tokio::test]
async fn rate_limited_calls_and_their_bytes_are_counted() {
    // The burst holds one call but not two of the same size.
    let per_call = 100;
    let burst = encoded_len(&request("a", per_call)) * 3 / 2;
    let pipeline = [
        API,
        &grpc(
            "sensors",
            &format!("rate_limit = {{ bytes_per_second = 1, burst_bytes = {burst} }}"),
        ),
        &buffered("batch", &["sensors"], ""),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("a", per_call))
        .await
        .expect("first call passes");
    let refused = client
        .send_sensor_values(request("b", per_call))
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let samples = sink.scrape();
    assert_eq!(
        metric_in(
            &samples,
            "sink_grpc_calls_total",
            &[("code", "RESOURCE_EXHAUSTED")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_in(&samples, "sink_grpc_calls_total", &[("code", "OK")]),
        Some(1.0)
    );
    assert_eq!(
        metric_in(&samples, "sink_grpc_rate_limited_bytes_total", &[]),
        Some(encoded_len(&request("b", per_call)) as f64)
    );
    assert_eq!(
        metric_in(
            &samples,
            "sink_stage_readings_sent_total",
            &stage_labels("sensors")
        ),
        Some(per_call as f64)
    );
}

/// The reload counters after the file is replaced with `text`, once the log
/// shows `outcome_line` one more time.
fn reload_to(sink: &SinkProcess, text: &str, outcome_line: &str) {
    let before = sink.count_log(outcome_line);
    let temp = sink.path(".pipeline.toml.new");
    std::fs::write(&temp, text).expect("write");
    std::fs::rename(&temp, sink.path("pipeline.toml")).expect("rename");
    assert!(
        wait_until(|| sink.count_log(outcome_line) > before),
        "no `{outcome_line}`; log:\n{}",
        sink.log_text()
    );
}

#[tokio::test]
async fn reload_outcomes_are_counted() {
    let pipeline = [API, &basic_pipeline("max_events = 10")].concat();
    let sink = SinkProcess::start(&pipeline);
    let outcome = |name: &str| sink.metric("sink_reloads_total", &[("outcome", name)]);
    for name in ["applied", "unchanged", "failed", "refused"] {
        assert_eq!(outcome(name), Some(0.0), "{name}");
    }
    let started = sink
        .metric("sink_last_reload_success_timestamp_seconds", &[])
        .expect("last success");

    reload_to(
        &sink,
        &pipeline.replace("max_events = 10", "max_events = 5"),
        "reload applied",
    );
    assert_eq!(outcome("applied"), Some(1.0));
    let applied = sink
        .metric("sink_last_reload_success_timestamp_seconds", &[])
        .expect("last success");
    assert!(applied > started, "{applied} > {started}");

    reload_to(
        &sink,
        &pipeline.replace("max_events = 10", "max_events = \"x\""),
        "reload failed",
    );
    assert_eq!(outcome("failed"), Some(1.0));

    let topology = format!("{pipeline}\n[sinks.more]\ntype = \"stdout\"\ninputs = [\"batch\"]\n");
    reload_to(&sink, &topology, "reload refused");
    assert_eq!(outcome("refused"), Some(1.0));

    // Back to the running version: nothing to change.
    reload_to(
        &sink,
        &pipeline.replace("max_events = 10", "max_events = 5"),
        "nothing changed",
    );
    assert_eq!(outcome("unchanged"), Some(1.0));
    assert_eq!(outcome("applied"), Some(1.0));
    assert!(
        sink.metric("sink_last_reload_success_timestamp_seconds", &[])
            .expect("last success")
            >= applied
    );
}

#[tokio::test]
async fn a_new_api_address_is_refused_as_needing_a_restart() {
    let pipeline = [API, &basic_pipeline("")].concat();
    let sink = SinkProcess::start(&pipeline);
    let moved = pipeline.replacen("127.0.0.1:0", "127.0.0.1:1", 1);
    reload_to(&sink, &moved, "reload refused");
    assert!(
        sink.log_text()
            .contains("api.address changed from \"127.0.0.1:0\" to \"127.0.0.1:1\""),
        "{}",
        sink.log_text()
    );
    assert_eq!(
        sink.metric("sink_reloads_total", &[("outcome", "refused")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_file_rotated_by_another_program_is_reopened_and_counted() {
    let pipeline = [
        API,
        &grpc("sensors", ""),
        &buffered("batch", &["sensors"], "max_events = 1"),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "w", 1, 3).await;
    assert!(wait_for_lines(&sink.path("out.json"), 3));
    // Rotation: the file is renamed away, and the next write makes a new one.
    std::fs::rename(sink.path("out.json"), sink.path("out.json.1")).expect("rotate");
    send_all(&mut client, "x", 1, 2).await;
    assert!(wait_for_lines(&sink.path("out.json"), 2));
    sink.wait_metric("sink_target_reopens_total", &stage_labels("file"), 1.0);
    let written = std::fs::metadata(sink.path("out.json")).expect("new").len()
        + std::fs::metadata(sink.path("out.json.1"))
            .expect("old")
            .len();
    sink.wait_metric(
        "sink_bytes_written_total",
        &stage_labels("file"),
        written as f64,
    );
    assert_eq!(
        sink.metric("sink_bytes_written_total", &stage_labels("file")),
        Some(written as f64)
    );
    assert_eq!(
        sink.metric("sink_write_errors_total", &stage_labels("file")),
        Some(0.0)
    );
}

#[tokio::test]
async fn failing_writes_are_counted() {
    // The process's stdout is /dev/full: every write of the stdout sink
    // fails with ENOSPC and is retried.
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let api = format!("127.0.0.1:{port}");
    let pipeline = [
        format!("[api]\naddress = \"{api}\"\n[settings]\nshutdown_timeout = \"1s\"\n"),
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        stdout_sink("console", &["batch"], ""),
    ]
    .concat();
    std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let log = dir.path().join("log");
    let mut child = std::process::Command::new(sink_binary())
        .args(["--pipeline", "pipeline.toml"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("sink");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut grpc_address = None;
    assert!(
        wait_until(|| {
            grpc_address = log_text()
                .split("grpc source listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
            grpc_address.is_some() && log_text().contains("pipeline running")
        }),
        "{}",
        log_text()
    );
    let mut client = connect(grpc_address.expect("address")).await;
    client
        .send_sensor_values(request("e", 3))
        .await
        .expect("accepted");
    let errors = |stage: &str| {
        let (_, body) = sink::top::fetch(&api, "/metrics", None).ok()?;
        metric_in(
            &sink::top::parse(&body),
            "sink_write_errors_total",
            &stage_labels(stage),
        )
    };
    // Each retry counts: the second proves the count goes on.
    let counted = wait_until(|| errors("console").is_some_and(|n| n >= 2.0));
    let (_, body) = sink::top::fetch(&api, "/metrics", None).expect("GET");
    let _ = child.kill();
    let _ = child.wait();
    assert!(counted, "{body}\n{}", log_text());
    assert_eq!(
        metric_in(
            &sink::top::parse(&body),
            "sink_bytes_written_total",
            &stage_labels("console")
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn ready_turns_503_at_sigterm_while_the_drain_holds_the_port_open() {
    let pipeline = [API, &stdout_pipeline("when_full = \"reject\"")].concat();
    let mut sink = SinkProcess::start_holding_stdout(&pipeline);
    let address = sink.api_address();
    assert_eq!(
        sink::top::fetch(&address, "/ready", None).expect("GET").0,
        200
    );
    // Nobody reads stdout: the sink blocks once the pipe is full, and holds
    // the drain open after SIGTERM until stdout is read.
    let mut client = sink.client("sensors").await;
    let (accepted, _) = fill_until_refused(&mut client, "r", 200, 400).await;
    drop(client);
    assert!(!accepted.is_empty());
    sink.signal(libc::SIGTERM);
    assert!(sink.wait_log("shutting down"));
    let (status, reason) = sink::top::fetch(&address, "/ready", None).expect("port still open");
    assert_eq!((status, reason.as_str()), (503, "shutting down\n"));
    assert_eq!(
        sink::top::fetch(&address, "/health", None).expect("GET").0,
        200
    );
    assert_eq!(
        sink::top::fetch(&address, "/metrics", None).expect("GET").0,
        200
    );
    sink.release_stdout();
    assert!(sink.wait_exit().success(), "{}", sink.log_text());
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "the port closes with the process"
    );
    assert_each_once(&names_in(&sink.stdout_lines()), &accepted);
}

#[test]
fn a_bad_api_is_refused_with_the_key_named() {
    let pipeline = |api: &str| [api, &basic_pipeline("")].concat();
    assert_refused(
        &pipeline("[api]\naddress = \"nonsense\"\n"),
        &[],
        &["key `api.address`", "not a host:port"],
    );
    assert_refused(
        &pipeline("[api]\naddress = \"127.0.0.1:99999\"\n"),
        &[],
        &["key `api.address`"],
    );
    assert_refused(
        &pipeline("[api]\nadress = \"127.0.0.1:0\"\n"),
        &[],
        &["key `api.adress`", "did you mean `address`"],
    );
    assert_refused(
        &pipeline("[api]\naddress = 9464\n"),
        &[],
        &["key `api.address`"],
    );

    // In use: found when binding, at startup, before any stage starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let run = run_sink(
        &pipeline(&format!("[api]\naddress = \"127.0.0.1:{port}\"\n")),
        &[],
        &[],
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "error: pipeline.toml: key `api.address`: cannot listen on 127.0.0.1:{port}"
        )),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("pipeline running"));
    assert!(!run.dir.path().join("out.json").exists());
}

#[tokio::test]
async fn sink_top_prints_live_rates_when_stdout_is_not_a_terminal() {
    let sink = SinkProcess::start(&[API, &basic_pipeline("max_events = 1")].concat());
    let mut top = Command::new(sink_binary())
        .args(["top", "--api", &sink.api_address()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sink top");
    let lines = BufReader::new(top.stdout.take().expect("stdout")).lines();
    let address = sink.address("sensors");
    let sender = tokio::spawn(async move {
        let mut client = connect(address).await;
        for call in 0..400 {
            if client
                .send_sensor_values(request(&format!("t{call}-"), 5))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Every stage shows up with a rate above zero, both ways.
    let mut moving = std::collections::BTreeSet::new();
    let reader = tokio::task::spawn_blocking(move || {
        for line in lines.map_while(Result::ok) {
            let Some(rest) = line.split(" stage=").nth(1) else {
                continue;
            };
            let id = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let nonzero = |key: &str| {
                line.split(&format!(" {key}="))
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
            };
            if nonzero("in/s") && nonzero("out/s") {
                moving.insert(id);
            }
            if moving.len() == 3 {
                break;
            }
        }
        moving
    });
    let moving = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("sink top showed every stage moving in time")
        .expect("reader");
    assert_eq!(
        moving.into_iter().collect::<Vec<_>>(),
        ["batch", "file", "sensors"]
    );
    sender.abort();
    let _ = top.kill();
    let _ = top.wait();
}

#[tokio::test]
async fn refusals_by_reason_connections_and_memory_are_counted() {
    let pipeline = [
        API,
        "[settings]\nmemory_limit = \"32MiB\"\n",
        &grpc(
            "sensors",
            "max_readings_per_call = 10\nmax_message_bytes = 2000",
        ),
        &buffered("batch", &["sensors"], "max_events = 1"),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("ok", 5))
        .await
        .expect("within every limit");
    let many = request("many", 20);
    assert!(encoded_len(&many) < 2000, "refused for its count alone");
    let refused = client.send_sensor_values(many).await.expect_err("too many");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    let big = request("big", 200);
    assert!(encoded_len(&big) > 2000);
    let refused = client.send_sensor_values(big).await.expect_err("too large");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(wait_for_lines(&sink.path("out.json"), 5));

    let samples = sink.scrape();
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric_in(&samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
    };
    assert_eq!(value("sink_grpc_calls_total", &[("code", "OK")]), 1.0);
    assert_eq!(
        value("sink_grpc_calls_total", &[("code", "RESOURCE_EXHAUSTED")]),
        2.0
    );
    for (reason, count) in [
        ("too_many_readings", 1.0),
        ("message_too_large", 1.0),
        ("rate_limited", 0.0),
        ("body_timeout", 0.0),
        ("memory_limit", 0.0),
        ("pipeline_full", 0.0),
        ("shutting_down", 0.0),
    ] {
        assert_eq!(
            value("sink_grpc_refusals_total", &[("reason", reason)]),
            count,
            "{reason}"
        );
    }
    // The message over max_message_bytes was refused unread; the one with
    // too many readings was read (its count is known once it is).
    assert_eq!(
        value("sink_grpc_request_bytes_total", &[]),
        (encoded_len(&request("ok", 5)) + encoded_len(&request("many", 20))) as f64
    );
    assert!(value("sink_grpc_connections_accepted_total", &[]) >= 1.0);
    assert!(value("sink_grpc_connections", &[]) >= 1.0);
    assert_eq!(value("sink_grpc_connection_limit_reached_total", &[]), 0.0);
    assert_eq!(value("sink_grpc_accept_errors_total", &[]), 0.0);
    assert_eq!(value("sink_memory_limit_bytes", &[]), (32 << 20) as f64);
    // Every reading written: nothing is held in memory any more.
    assert!(
        wait_until(|| sink.metric("sink_memory_reserved_bytes", &[]) == Some(0.0)),
        "{:?}",
        sink.metric("sink_memory_reserved_bytes", &[])
    );

    // A closed connection is counted out. The client's connection task runs
    // on this runtime: wait without blocking it, so that it can close.
    drop(client);
    let closed = tokio::time::timeout(DEADLINE, async {
        while sink.metric("sink_grpc_connections", &[]) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(
        closed.await.is_ok(),
        "{:?}",
        sink.metric("sink_grpc_connections", &[])
    );
}

#[tokio::test]
async fn acknowledgements_of_written_calls_are_counted() {
    let pipeline = [
        API,
        &grpc("sensors", "acknowledge = \"written\""),
        &buffered(
            "batch",
            &["sensors"],
            "max_events = 1000\nflush_interval = \"50ms\"",
        ),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "ack", 3, 4).await;
    let outcome =
        |name: &str| sink.metric("sink_grpc_acknowledgements_total", &[("outcome", name)]);
    assert_eq!(outcome("written"), Some(3.0));
    assert_eq!(outcome("failed"), Some(0.0));
    // Each waited for the buffer's 50 ms flush and the write: in seconds,
    // far under one each.
    let waited = |series: &str| {
        sink.metric(
            &format!("sink_grpc_acknowledgement_wait_seconds_{series}"),
            &[],
        )
    };
    assert_eq!(waited("count"), Some(3.0));
    let total = waited("sum").expect("a sum");
    assert!(total > 0.0 && total < 3.0, "waited {total} s in all");
    assert_eq!(
        sink.metric("sink_grpc_calls_waiting_for_write", &[]),
        Some(0.0)
    );
    assert_eq!(
        sink.metric("sink_grpc_calls_total", &[("code", "OK")]),
        Some(3.0)
    );
}

#[tokio::test]
async fn rotations_retention_and_compression_are_counted() {
    // Each batch's write is over max_bytes: every write after the first
    // rotates; one rotated file is kept, gzipped.
    let pipeline = [
        API,
        &grpc("sensors", ""),
        &buffered("batch", &["sensors"], "max_events = 1"),
        &json_file(
            "file",
            &["batch"],
            "logs/out.json",
            "rotate = { max_bytes = 100 }\nretain = { max_files = 1 }\ncompression = \"gzip\"",
        ),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let mut names = Vec::new();
    for call in 0..5 {
        names.extend(send_all(&mut client, &format!("r{call}-"), 1, 2).await);
        // One write per batch: wait for this one before the next.
        sink.wait_metric(
            "sink_stage_readings_sent_total",
            &stage_labels("file"),
            names.len() as f64,
        );
    }
    let labels = stage_labels("file");
    assert_eq!(sink.metric("sink_file_rotations_total", &labels), Some(4.0));
    assert_eq!(
        sink.metric("sink_file_rotation_errors_total", &labels),
        Some(0.0)
    );
    // A rotation opens a new file at the path: counted as a reopen too.
    assert_eq!(sink.metric("sink_target_reopens_total", &labels), Some(4.0));
    // Four rotated files, one kept: three removed (in the background).
    sink.wait_metric("sink_file_retention_removed_total", &labels, 3.0);
    sink.wait_metric("sink_file_compressions_total", &labels, 1.0);
    let dir = sink.path("logs");
    let rotated = || {
        listing(&dir)
            .into_iter()
            .filter(|name| name.starts_with("out-"))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(|| rotated().len() == 1 && no_plain_rotated_or_temporary(&dir, "out.json")),
        "{:?}",
        listing(&dir)
    );
    assert_eq!(
        sink.metric("sink_file_housekeeping_errors_total", &labels),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_flood_of_silent_connections_to_the_api_is_cut_off_and_scrapes_go_on() {
    let mut sink = SinkProcess::start(&[API, &basic_pipeline("")].concat());
    let address = sink.api_address();
    // More connections than the endpoint serves at once (64), sending
    // nothing, or half a request line.
    let mut silent: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(&address).expect("connect"))
        .collect();
    for stream in silent.iter_mut().step_by(2) {
        std::io::Write::write_all(stream, b"GET /met").expect("write");
    }
    // A scrape gets through once the header timeout (5 s) frees slots.
    assert!(
        wait_until(|| sink::top::fetch(&address, "/metrics", None).is_ok_and(|(s, _)| s == 200)),
        "no scrape got through the flood"
    );
    // Every silent connection is closed by the endpoint.
    for stream in &mut silent {
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut answer = Vec::new();
        let closed = std::io::Read::read_to_end(stream, &mut answer).is_ok()
            || answer.starts_with(b"HTTP/1.1 408");
        assert!(closed, "a silent connection was kept open");
    }
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("after-", 3))
        .await
        .expect("the gRPC side serves on");
    sink.stop();
}

#[tokio::test]
async fn clients_that_never_read_their_answers_are_cut_off_and_ready_answers() {
    let mut sink = SinkProcess::start(&[API, &basic_pipeline("")].concat());
    let address = sink.api_address();
    // Every slot (64) taken by a connection that pipelines scrapes and never
    // reads: its answers fill the socket buffers and the server's writes wait.
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: sink\r\n\r\n".repeat(500);
    let greedy: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&address).expect("connect");
            std::io::Write::write_all(&mut stream, pipelined.as_bytes()).expect("write");
            stream
        })
        .collect();
    let started = std::time::Instant::now();
    assert!(
        wait_until(|| sink::top::fetch(&address, "/ready", None).is_ok_and(|(s, _)| s == 200)),
        "/ready never answered through the flood"
    );
    // The write timeout (5 s), not the connection lifetime (60 s).
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "/ready answered after {:?}",
        started.elapsed()
    );
    drop(greedy);
    sink.stop();
}
