//! Faults the runtime must survive (issue 8): a pipeline file that is a FIFO,
//! a device or huge; a sink that stalls (per-sink `when_full`, readiness on
//! gRPC health); a sink whose reader goes away (it stops alone, the other
//! sinks lose nothing); a second SIGTERM (the loss is counted); and the
//! smaller ones: a huge bad value, debug logs, a tiny flush_interval.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use sink_e2e::*;
use tonic_health::pb::health_check_response::ServingStatus;

fn mkfifo(path: &Path) {
    let name = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: mkfifo reads a valid NUL-terminated path and nothing else.
    let made = unsafe { libc::mkfifo(name.as_ptr(), 0o644) };
    assert_eq!(made, 0, "mkfifo failed");
}

/// Runs `sink validate` and `sink` on the `pipeline.toml` that `make` puts
/// in a fresh directory; both must exit 2 (within the harness's deadline)
/// with an error naming the file and holding `needle`.
fn assert_file_refused(make: impl Fn(&Path), needle: &str) {
    for args in [&["validate"][..], &[][..]] {
        let dir = tempfile::tempdir().expect("temp dir");
        make(&dir.path().join("pipeline.toml"));
        let run = run_in(dir, args, &[]);
        assert_eq!(
            run.status.code(),
            Some(2),
            "sink {args:?}: {}; stderr:\n{}",
            run.status,
            run.stderr
        );
        assert!(
            run.stderr.contains("pipeline.toml") && run.stderr.contains(needle),
            "sink {args:?}: no error naming the file with {needle:?}; stderr:\n{}",
            run.stderr
        );
    }
}

#[test]
fn a_pipeline_file_that_is_a_fifo_is_refused_at_once() {
    // Before the fix, `validate` blocked in open() until a writer came.
    assert_file_refused(mkfifo, "FIFO");
}

#[test]
fn a_pipeline_file_linked_to_dev_zero_is_refused_at_once() {
    // Before the fix, it was read until memory ran out.
    assert_file_refused(
        |path| std::os::unix::fs::symlink("/dev/zero", path).expect("symlink"),
        "character device",
    );
}

#[test]
fn a_pipeline_file_over_16_mib_is_refused() {
    assert_file_refused(
        |path| {
            let comment = format!("# {}\n", "x".repeat(1 << 20));
            std::fs::write(path, comment.repeat(17)).expect("write");
        },
        "larger than 16777216 bytes",
    );
}

#[tokio::test]
async fn a_reload_from_a_fifo_keeps_the_pipeline_serving_and_stoppable() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    let mut sent = send_all(&mut client, "before", 1, 3).await;
    let file = sink.path("pipeline.toml");
    std::fs::remove_file(&file).expect("remove");
    mkfifo(&file);
    sink.signal(libc::SIGHUP);
    assert!(
        sink.wait_log("FIFO"),
        "no reload failure naming the FIFO; log:\n{}",
        sink.log_text()
    );
    assert!(sink.log_lines().iter().any(|l| l.contains("reload failed")));
    // Still serving, and SIGTERM still stops it.
    sent.extend(send_all(&mut client, "after", 1, 3).await);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[test]
fn a_huge_bad_value_is_cut_in_the_error() {
    let huge = "x".repeat(10 << 20);
    let pipeline = format!("[settings]\nlog_level = \"{huge}\"\n{}", basic_pipeline(""));
    let run = run_sink(&pipeline, &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2), "stderr:\n{:.2000}", run.stderr);
    assert!(
        run.stderr.len() < 2_000,
        "{} bytes of error; starts:\n{:.2000}",
        run.stderr.len(),
        run.stderr
    );
    assert!(
        run.stderr.contains("key `settings.log_level`")
            && run.stderr.contains("characters cut, of 10485"),
        "stderr:\n{}",
        run.stderr
    );
}

#[test]
fn a_flush_interval_below_10ms_is_refused() {
    assert_refused(
        &basic_pipeline("flush_interval = \"1ns\""),
        &[],
        &[
            "stage `processors.batch`",
            "key `flush_interval`",
            "at least 10ms",
        ],
    );
}

#[tokio::test]
async fn debug_logs_are_ours_not_every_http2_frame() {
    let pipeline = format!("[settings]\nlog_level = \"debug\"\n{}", basic_pipeline(""));
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "d", 20, 5).await;
    // A reload that changes nothing logs at debug, from our own crate.
    std::fs::write(sink.path("pipeline.toml"), &pipeline).expect("touch");
    assert!(
        sink.wait_log("DEBUG"),
        "no debug line of ours; log:\n{}",
        sink.log_text()
    );
    sink.stop();
    let foreign: Vec<String> = sink
        .log_lines()
        .into_iter()
        .filter(|line| line.contains("DEBUG") && !line.contains(" sink"))
        .collect();
    assert!(
        foreign.is_empty(),
        "{} debug lines from dependencies, e.g. {:?}",
        foreign.len(),
        foreign.first()
    );
}

#[tokio::test]
async fn at_debug_level_the_stages_are_described_without_their_values() {
    let pipeline = format!(
        "[settings]\nlog_level = \"debug\"\n{}",
        basic_pipeline("max_events = 7\nflush_interval = \"250ms\"")
    );
    let mut sink = SinkProcess::start(&pipeline);
    sink.stop();
    let text = sink.log_text();
    assert!(
        text.contains("DEBUG")
            && text.contains("stage `batch`: processor of type `buffered`, inputs [\"sensors\"]")
            && text.contains("keys [\"max_events\", \"flush_interval\"]"),
        "{text}"
    );
    assert!(!text.contains("250ms"), "a key's value was logged:\n{text}");
}

/// grpc -> buffered (1 reading per batch) -> json_file `out.json` and stdout
/// (with `console` keys), one-batch channels so that a stdout nobody reads
/// fills the pipeline within a few dozen calls.
fn fanout(source: &str, console: &str) -> String {
    [
        grpc("sensors", source),
        buffered("batch", &["sensors"], "max_events = 1\ncapacity = 1"),
        json_file("file", &["batch"], "out.json", "capacity = 1"),
        stdout_sink("console", &["batch"], &format!("capacity = 1\n{console}")),
    ]
    .concat()
}

/// `[api]` on an ephemeral port, to read `/ready` and the metrics.
const API: &str = "[api]\naddress = \"127.0.0.1:0\"\n";

/// What `/ready` answers now: the status and the one-line reason.
fn ready(sink: &SinkProcess) -> (u16, String) {
    sink::top::fetch(&sink.api_address(), "/ready", None).expect("GET /ready")
}

/// The number just before `after` in the last log line holding `after`.
fn number_before(sink: &SinkProcess, after: &str) -> Option<u64> {
    sink.log_lines().iter().rev().find_map(|line| {
        let (before, _) = line.split_once(after)?;
        before.split_whitespace().last()?.parse().ok()
    })
}

#[tokio::test]
async fn a_stalled_sink_that_drops_costs_the_others_nothing() {
    let mut sink =
        SinkProcess::start_holding_stdout(&format!("{API}{}", fanout("", "when_full = \"drop\"")));
    let mut client = sink.client("sensors").await;
    // Far more than the stdout pipe holds: every call must still pass.
    let sent = send_all(&mut client, "d", 300, 20).await;
    assert!(wait_for_lines(&sink.path("out.json"), sent.len()));
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
    assert!(
        sink.wait_log("readings so far dropped: its input channel was full"),
        "no drop warning; log:\n{}",
        sink.log_text()
    );
    assert_eq!(
        health_of(sink.address("sensors"), "")
            .await
            .expect("health"),
        ServingStatus::Serving
    );
    assert_eq!(ready(&sink), (200, "ready\n".to_string()));
    // Every batch has gone to both sinks (or been dropped for one): the
    // metric holds the final count.
    let metric = sink
        .metric("sink_stage_readings_dropped_total", &[("stage", "console")])
        .expect("console's dropped count");
    assert_eq!(
        sink.metric("sink_stage_readings_dropped_total", &[("stage", "file")]),
        Some(0.0)
    );
    sink.release_stdout();
    sink.stop();
    // Exactly what stdout did not get was counted as dropped.
    let dropped = number_before(&sink, "readings in all were dropped").expect("drop total");
    assert_eq!(metric, dropped as f64, "the metric and the log agree");
    let printed = names_in(&sink.stdout_lines());
    assert!(dropped > 0 && !printed.is_empty());
    assert_eq!(printed.len() as u64 + dropped, sent.len() as u64);
    let mut all = printed.clone();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), printed.len(), "a reading printed twice");
}

#[tokio::test]
async fn a_stall_turns_health_not_serving_and_a_live_switch_to_drop_recovers() {
    let mut sink = SinkProcess::start_holding_stdout(&format!("{API}{}", fanout("", "")));
    let address = sink.address("sensors");
    // Calls wait (backpressure) once stdout's pipe and channels are full.
    let sender = tokio::spawn(async move {
        let mut client = connect(address).await;
        send_all(&mut client, "w", 300, 20).await
    });
    let not_serving = eventually_async(|| async {
        health_of(address, "").await.ok() == Some(ServingStatus::NotServing)
            && health_of(address, "sensor.v1.SensorService").await.ok()
                == Some(ServingStatus::NotServing)
    })
    .await;
    assert!(
        not_serving,
        "health never said NOT_SERVING; log:\n{}",
        sink.log_text()
    );
    assert!(sink.wait_log("gRPC health says NOT_SERVING"));
    // `/ready` reads the same readiness: 503, naming the stalled source.
    let (status, reason) = ready(&sink);
    assert_eq!(status, 503, "{reason}");
    assert!(reason.starts_with("stage `sensors`: "), "{reason}");
    // Liveness probes must not restart a sink that is only full.
    assert_eq!(
        health_of(address, "liveness").await.expect("liveness"),
        ServingStatus::Serving
    );
    // Live: the console drops from now on, and the waiting calls go on.
    let text = std::fs::read_to_string(sink.path("pipeline.toml")).expect("read");
    let text = text.replace("[sinks.console]", "[sinks.console]\nwhen_full = \"drop\"");
    std::fs::write(sink.path("pipeline.toml"), text).expect("write");
    assert!(
        sink.wait_log("stage `console`: when_full"),
        "no reload; log:\n{}",
        sink.log_text()
    );
    let sent = tokio::time::timeout(DEADLINE, sender)
        .await
        .expect("the waiting calls went on")
        .expect("sender");
    assert!(
        eventually_async(|| async {
            health_of(address, "").await.ok() == Some(ServingStatus::Serving)
        })
        .await,
        "health never said SERVING again; log:\n{}",
        sink.log_text()
    );
    assert_eq!(ready(&sink), (200, "ready\n".to_string()));
    assert!(wait_for_lines(&sink.path("out.json"), sent.len()));
    sink.release_stdout();
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[tokio::test]
async fn a_broken_stdout_stops_that_sink_alone_and_counts_its_loss() {
    // `sink | head -c 200000`: the reader takes 200 000 bytes and goes away.
    let mut sink = SinkProcess::start_holding_stdout(&format!("{API}{}", fanout("", "")));
    let mut pipe = sink.take_stdout();
    let reader = std::thread::spawn(move || {
        let mut taken = vec![0; 200_000];
        pipe.read_exact(&mut taken).expect("200000 bytes");
    });
    let mut client = sink.client("sensors").await;
    // About 600 000 bytes of lines: the reader is gone well before the end.
    let sent = send_all(&mut client, "e", 300, 20).await;
    reader.join().expect("reader");
    assert!(
        sink.wait_log("this sink is stopped"),
        "no line saying the sink stopped; log:\n{}",
        sink.log_text()
    );
    // The process serves on, the file gets everything, and health tells.
    let more = send_all(&mut client, "more", 10, 20).await;
    let all: Vec<String> = sent.into_iter().chain(more).collect();
    assert!(wait_for_lines(&sink.path("out.json"), all.len()));
    assert_each_once(&sensor_names(&sink.path("out.json")), &all);
    assert_eq!(
        health_of(sink.address("sensors"), "")
            .await
            .expect("health"),
        ServingStatus::NotServing
    );
    let (status, reason) = ready(&sink);
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("stage `console`: failed"), "{reason}");
    sink.signal(libc::SIGTERM);
    let status = sink.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", sink.log_text());
    // Every acknowledged reading counted, the loss named.
    let accepted =
        number_before(&sink, "readings, it wrote").expect("a loss line for the failed sink");
    assert_eq!(accepted, all.len() as u64, "log:\n{}", sink.log_text());
    assert!(
        sink.log_lines()
            .iter()
            .any(|line| line.contains("this sink failed")
                && line.contains("console")
                && line.contains("readings lost"))
    );
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_and_counts_the_loss() {
    let pipeline = [
        "[settings]\nshutdown_timeout = \"1m\"\n".to_string(),
        fanout("", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start_holding_stdout(&pipeline);
    let address = sink.address("sensors");
    let sender = tokio::spawn(async move {
        let mut client = connect(address).await;
        let mut accepted = 0;
        for call in 0..300 {
            let request = request_range("s", call * 20..call * 20 + 20);
            if client.send_sensor_values(request).await.is_err() {
                break;
            }
            accepted += 20;
        }
        accepted
    });
    assert!(
        eventually_async(|| async {
            health_of(address, "").await.ok() == Some(ServingStatus::NotServing)
        })
        .await
    );
    sink.signal(libc::SIGTERM);
    assert!(sink.wait_log("shutting down"));
    sink.signal(libc::SIGTERM);
    let status = sink.wait_exit();
    assert!(!status.success(), "exit {status}");
    let accepted = sender.await.expect("sender");
    let line = sink
        .log_lines()
        .into_iter()
        .find(|line| line.contains("second signal (SIGTERM)") && line.contains("console"))
        .unwrap_or_else(|| panic!("no loss line; log:\n{}", sink.log_text()));
    assert!(line.contains("readings lost"), "{line}");
    let counted = number_before(&sink, "readings, this sink wrote").expect("accepted count");
    // A call cut off by the exit may have been accepted unheard: at most one.
    assert!(
        (accepted..=accepted + 20).contains(&counted),
        "{accepted} acknowledged; {line}"
    );
}

/// Polls the async `condition` every 20 ms until it holds or [`DEADLINE`] passes.
async fn eventually_async<F: std::future::Future<Output = bool>>(
    mut condition: impl FnMut() -> F,
) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < DEADLINE {
        if condition().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    condition().await
}

/// What one client of [`acknowledged_calls`] was told, by reading name.
#[derive(Default)]
struct Told {
    ok: Vec<String>,
    unavailable: Vec<String>,
}

/// Sends `calls` calls of 20 readings named `<prefix><i>`; every call must
/// end OK or UNAVAILABLE.
async fn acknowledged_calls(address: std::net::SocketAddr, prefix: String, calls: usize) -> Told {
    let mut client = connect(address).await;
    let mut told = Told::default();
    for call in 0..calls {
        let request = request_range(&prefix, call * 20..call * 20 + 20);
        let names = request.items.iter().map(|i| i.sensor_name.clone());
        match client.send_sensor_values(request.clone()).await {
            Ok(_) => told.ok.extend(names),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                told.unavailable.extend(names)
            }
            Err(status) => panic!("call {call} of {prefix}: {status:?}"),
        }
    }
    told
}

#[tokio::test]
async fn acknowledge_written_tells_no_client_ok_for_what_a_dropping_sink_missed() {
    // issue 10's rule with issue 8's `when_full = "drop"`: a reading dropped
    // for one sink is not written, so its call gets UNAVAILABLE, never OK.
    let mut sink = SinkProcess::start_holding_stdout(&fanout(
        "acknowledge = \"written\"",
        "when_full = \"drop\"",
    ));
    let address = sink.address("sensors");
    let clients: Vec<_> = (0..4)
        .map(|c| tokio::spawn(acknowledged_calls(address, format!("c{c}-"), 40)))
        .collect();
    // Nobody reads stdout: it fills, and the console drops from then on.
    // (Polled without blocking: the clients run on this thread.)
    assert!(
        eventually(|| sink.count_log("readings so far dropped: its input channel was full") > 0)
            .await,
        "no drop warning; log:\n{}",
        sink.log_text()
    );
    // The calls whose readings the blocked console holds wait until it writes.
    sink.release_stdout();
    let mut told = Told::default();
    for client in clients {
        let client = tokio::time::timeout(DEADLINE, client)
            .await
            .expect("every call answered once stdout is read")
            .expect("client");
        told.ok.extend(client.ok);
        told.unavailable.extend(client.unavailable);
    }
    sink.stop();
    eprintln!(
        "{} readings OK'd, {} answered UNAVAILABLE",
        told.ok.len(),
        told.unavailable.len()
    );
    let sent: Vec<String> = told.ok.iter().chain(&told.unavailable).cloned().collect();
    assert_eq!(sent.len(), 4 * 40 * 20);
    // The file wrote every reading once, whatever the client was told.
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
    // Printed is exactly what got OK; dropped is exactly what got UNAVAILABLE.
    let printed = names_in(&sink.stdout_lines());
    assert!(
        !told.unavailable.is_empty() && !told.ok.is_empty(),
        "{} OK, {} UNAVAILABLE",
        told.ok.len(),
        told.unavailable.len()
    );
    assert_each_once(&printed, &told.ok);
    let dropped = number_before(&sink, "readings in all were dropped").expect("drop total");
    assert_eq!(dropped, told.unavailable.len() as u64);
}

#[tokio::test]
async fn acknowledge_written_answers_unavailable_while_a_sink_has_failed() {
    let mut sink = SinkProcess::start_holding_stdout(&fanout("acknowledge = \"written\"", ""));
    // `sink | head -0`: the reader has gone before the first line.
    sink.close_stdout();
    let told = acknowledged_calls(sink.address("sensors"), "f".into(), 10).await;
    assert!(
        told.ok.is_empty(),
        "{} readings OK'd though the console wrote none",
        told.ok.len()
    );
    assert!(sink.wait_log("this sink is stopped"));
    // The file has them all; the clients retry what they were refused.
    assert!(wait_for_lines(&sink.path("out.json"), 200));
    assert_each_once(&sensor_names(&sink.path("out.json")), &told.unavailable);
    sink.signal(libc::SIGTERM);
    assert_eq!(
        sink.wait_exit().code(),
        Some(1),
        "log:\n{}",
        sink.log_text()
    );
    assert_eq!(number_before(&sink, "readings, it wrote"), Some(200));
    assert!(
        sink.wait_log("it wrote 0: 200 readings lost"),
        "log:\n{}",
        sink.log_text()
    );
}
