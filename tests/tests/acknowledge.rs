//! `acknowledge = "written"`: a call's OK means every sink its readings reach
//! has written them; whatever kills the process, no reading a client was told
//! OK about is lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sink_e2e::*;
use tonic::Code;

/// The source's debug line for a call that waits for its acknowledgement.
const WAITS: &str = "waits for its readings to be written";

/// What one client saw: names it got OK for.
struct Sent {
    acknowledged: Vec<String>,
}

/// Sends `per_call`-reading calls until one fails or `max_calls` went out.
async fn send_until_failure(
    address: std::net::SocketAddr,
    task: usize,
    per_call: usize,
    max_calls: usize,
    oks: Arc<AtomicUsize>,
) -> Sent {
    let mut client = connect(address).await;
    let mut acknowledged = Vec::new();
    for call in 0..max_calls {
        let request = request_range(&format!("t{task}-"), call * per_call..(call + 1) * per_call);
        let names: Vec<String> = request
            .items
            .iter()
            .map(|i| i.sensor_name.clone())
            .collect();
        if client.send_sensor_values(request).await.is_err() {
            break;
        }
        acknowledged.extend(names);
        oks.fetch_add(1, Ordering::Relaxed);
    }
    Sent { acknowledged }
}

/// Runs 8 clients against grpc(`acknowledge`) -> buffered -> json_file,
/// SIGKILLs the process once `calls_before_kill` calls got OK, and returns
/// (readings OK'd, of those, how many are missing from the file).
async fn kill_under_load(acknowledge: &str, calls_before_kill: usize) -> (usize, usize) {
    let pipeline = [
        grpc("sensors", &format!("acknowledge = \"{acknowledge}\"")),
        buffered(
            "batch",
            &["sensors"],
            "max_events = 200\nflush_interval = \"20ms\"",
        ),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    let oks = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            tokio::spawn(send_until_failure(
                address,
                task,
                10,
                100_000,
                Arc::clone(&oks),
            ))
        })
        .collect();
    assert!(
        eventually(|| oks.load(Ordering::Relaxed) >= calls_before_kill).await,
        "clients did not get going; log:\n{}",
        sink.log_text()
    );
    sink.signal(libc::SIGKILL);
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.expect("client task").acknowledged);
    }
    sink.wait_exit();
    // A line cut short by the kill is no reading written (the sink repairs it
    // when it opens the file again).
    let written: BTreeSet<String> = sensor_names_so_far(&sink.path("out.json"))
        .into_iter()
        .collect();
    let lost = acknowledged
        .iter()
        .filter(|n| !written.contains(*n))
        .count();
    (acknowledged.len(), lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged_as_written() {
    let (acknowledged, lost) = kill_under_load("written", 300).await;
    eprintln!("acknowledge = \"written\": {acknowledged} readings OK'd, {lost} lost to kill -9");
    assert!(acknowledged >= 3_000);
    assert_eq!(lost, 0, "readings OK'd as written were lost to kill -9");
}

/// The loss the "written" mode prevents, for the README: not asserted (the
/// buffer may happen to be empty at the kill), only reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_accepted_reports_its_loss() {
    let (acknowledged, lost) = kill_under_load("accepted", 300).await;
    eprintln!("acknowledge = \"accepted\": {acknowledged} readings OK'd, {lost} lost to kill -9");
    assert!(acknowledged >= 3_000);
}

#[tokio::test]
async fn fan_out_waits_for_the_slow_sink() {
    let pipeline = [
        grpc("sensors", "acknowledge = \"written\""),
        json_file("file", &["sensors"], "out.json", ""),
        stage(
            "sinks",
            "slow",
            "blackhole",
            &["sensors"],
            "delay_per_batch = \"600ms\"",
        ),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let started = Instant::now();
    client
        .send_sensor_values(request("fan", 3))
        .await
        .expect("OK once both sinks wrote");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "OK after {waited:?}, before the slow sink finished its 600 ms batch"
    );
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 3);
    sink.stop();
}

#[tokio::test]
async fn a_failing_sink_gets_the_call_unavailable() {
    let pipeline = [
        grpc("sensors", "acknowledge = \"written\""),
        stdout_sink("console", &["sensors"], ""),
    ]
    .concat();
    let mut sink = SinkProcess::start_holding_stdout(&pipeline);
    sink.close_stdout();
    let mut client = sink.client("sensors").await;
    let status = client
        .send_sensor_values(request("gone", 2))
        .await
        .expect_err("OK although the only sink failed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!sink.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_merging_many_calls_acknowledges_each_once_its_readings_are_written() {
    let pipeline = [
        grpc("sensors", "acknowledge = \"written\""),
        buffered(
            "batch",
            &["sensors"],
            "max_events = 100\nflush_interval = \"1h\"",
        ),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    let out = sink.path("out.json");
    // 50 calls of 10 readings: five flushes of 100, each acknowledging the
    // ten calls it completes. At its OK, a call's readings are in the file.
    let calls: Vec<_> = (0..50)
        .map(|call| {
            let out = out.clone();
            tokio::spawn(async move {
                let mut client = connect(address).await;
                let request = request_range(&format!("m{call}-"), 0..10);
                let names: Vec<String> = request
                    .items
                    .iter()
                    .map(|i| i.sensor_name.clone())
                    .collect();
                client.send_sensor_values(request).await?;
                let written: BTreeSet<String> = sensor_names_so_far(&out).into_iter().collect();
                let missing = names.iter().filter(|n| !written.contains(*n)).count();
                Ok::<_, tonic::Status>((names, missing))
            })
        })
        .collect();
    let mut sent = Vec::new();
    for call in calls {
        let (names, missing) = call.await.expect("task").expect("every call OK");
        assert_eq!(
            missing, 0,
            "a call was OK'd before its readings were written"
        );
        sent.extend(names);
    }
    sink.stop();
    assert_each_once(&sensor_names(&out), &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_waiting_calls_once_written() {
    let pipeline = format!(
        "[settings]\nlog_level = \"debug\"\n{}",
        [
            grpc("sensors", "acknowledge = \"written\""),
            buffered(
                "batch",
                &["sensors"],
                "max_events = 100000\nflush_interval = \"1h\""
            ),
            json_file("file", &["batch"], "out.json", ""),
        ]
        .concat()
    );
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    // They wait: the buffer flushes only at shutdown.
    let calls: Vec<_> = (0..20)
        .map(|call| {
            tokio::spawn(async move {
                let mut client = connect(address).await;
                client
                    .send_sensor_values(request(&format!("g{call}-"), 5))
                    .await
            })
        })
        .collect();
    assert!(
        eventually(|| sink.count_log(WAITS) == 20).await,
        "the calls did not all reach the pipeline; log:\n{}",
        sink.log_text()
    );
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "a call was OK'd before anything was written"
    );
    sink.signal(libc::SIGTERM);
    for call in calls {
        call.await
            .expect("task")
            .expect("OK once written at shutdown");
    }
    assert!(sink.wait_exit().success(), "log:\n{}", sink.log_text());
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_timeout_that_cuts_the_drain_answers_unavailable() {
    let pipeline = format!(
        "[settings]\nshutdown_timeout = \"1s\"\nlog_level = \"debug\"\n{}",
        [
            grpc("sensors", "acknowledge = \"written\""),
            stage(
                "sinks",
                "slow",
                "blackhole",
                &["sensors"],
                "delay_per_batch = \"1h\"",
            ),
        ]
        .concat()
    );
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    // The first batch is taken and held by the stuck sink; the second waits
    // in its channel. Neither call can be OK'd.
    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.send_sensor_values(request("cut-a", 1)).await }
    });
    let second = tokio::spawn(async move { client.send_sensor_values(request("cut-b", 1)).await });
    assert!(
        eventually(|| sink.count_log(WAITS) == 2).await,
        "log:\n{}",
        sink.log_text()
    );
    sink.signal(libc::SIGTERM);
    for call in [first, second] {
        let status = call
            .await
            .expect("task")
            .expect_err("OK although never written");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(!sink.wait_exit().success());
}

#[tokio::test]
async fn a_json_file_whose_writes_fail_gets_the_call_unavailable() {
    let pipeline = [
        grpc("sensors", "acknowledge = \"written\""),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    let sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("before", 2))
        .await
        .expect("written while the path works");
    // The file is replaced by a directory: every write from now on fails.
    let out = sink.path("out.json");
    std::fs::remove_file(&out).expect("remove out.json");
    std::fs::create_dir(&out).expect("a directory in its place");
    let answer =
        tokio::time::timeout(DEADLINE, client.send_sensor_values(request("after", 2))).await;
    let status = answer
        .unwrap_or_else(|_| panic!("no answer; log:\n{}", sink.log_text()))
        .expect_err("OK although the write failed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        sink.wait_log("failed, retrying"),
        "log:\n{}",
        sink.log_text()
    );
}
