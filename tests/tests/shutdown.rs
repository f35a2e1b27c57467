//! Shutdown on a signal: whatever a client got OK for is written, once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sink_e2e::*;

/// What one client task saw: names it got OK for, names it tried.
struct Sent {
    accepted: Vec<String>,
    attempted: Vec<String>,
}

/// Sends 10-reading requests until one fails or `max_calls` went out.
async fn send_until_refused(
    address: std::net::SocketAddr,
    task: usize,
    max_calls: usize,
    oks: Arc<AtomicUsize>,
) -> Sent {
    let mut client = connect(address).await;
    let mut sent = Sent {
        accepted: Vec::new(),
        attempted: Vec::new(),
    };
    for call in 0..max_calls {
        let request = request_range(&format!("task{task}-"), call * 10..call * 10 + 10);
        let names: Vec<String> = request
            .items
            .iter()
            .map(|i| i.sensor_name.clone())
            .collect();
        sent.attempted.extend(names.iter().cloned());
        if client.send_sensor_values(request).await.is_err() {
            break;
        }
        sent.accepted.extend(names);
        oks.fetch_add(1, Ordering::Relaxed);
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_concurrent_sends_keeps_every_accepted_reading_once() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 64\nflush_interval = \"1m\""));
    let address = sink.address("sensors");
    let oks = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|task| tokio::spawn(send_until_refused(address, task, 5_000, Arc::clone(&oks))))
        .collect();
    // Signal while all four are busy sending.
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= 40).await);
    sink.signal(libc::SIGTERM);
    let mut accepted = Vec::new();
    let mut attempted = BTreeSet::new();
    for task in tasks {
        let sent = task.await.expect("client task");
        assert!(
            sent.accepted.len() < sent.attempted.len(),
            "a client was never refused: shutdown did not stop the source"
        );
        accepted.extend(sent.accepted);
        attempted.extend(sent.attempted);
    }
    let status = sink.wait_exit();
    assert!(status.success(), "exit {status}; log:\n{}", sink.log_text());

    let written = sensor_names(&sink.path("out.json"));
    let unique: BTreeSet<&String> = written.iter().collect();
    assert_eq!(unique.len(), written.len(), "a reading was written twice");
    let lost: Vec<&String> = accepted.iter().filter(|n| !unique.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "{} accepted readings lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    // A call cut off in flight may have been accepted without the client
    // hearing so; nothing that was never sent can appear.
    assert!(written.iter().all(|name| attempted.contains(name)));
    assert!(accepted.len() >= 400);
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1000"));
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "i", 4, 5).await;
    sink.signal(libc::SIGINT);
    let status = sink.wait_exit();
    assert!(status.success(), "exit {status}; log:\n{}", sink.log_text());
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[tokio::test]
async fn chained_buffers_hand_everything_on_at_shutdown() {
    // At shutdown the first buffer hands on what it holds and ends, which
    // closes the input of the second, which still holds readings.
    let pipeline = [
        grpc("sensors", ""),
        buffered(
            "first",
            &["sensors"],
            "max_events = 2\nflush_interval = \"1h\"",
        ),
        buffered(
            "second",
            &["first"],
            "max_events = 1000\nflush_interval = \"1h\"",
        ),
        json_file("file", &["second"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "c", 5, 1).await;
    assert!(json_lines(&sink.path("out.json")).is_empty());
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[tokio::test]
async fn a_shutdown_past_its_timeout_exits_non_zero_and_says_what_was_lost() {
    // The stdout sink cannot write while nobody reads its pipe, so the
    // pipeline cannot drain within shutdown_timeout.
    let pipeline = [
        "[settings]\nshutdown_timeout = \"1s\"\n".to_string(),
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        stdout_sink("console", &["batch"], ""),
    ]
    .concat();
    let mut sink = SinkProcess::start_holding_stdout(&pipeline);
    let mut client = sink.client("sensors").await;
    // Far more than a pipe buffer holds: the sink is stuck after this.
    send_all(&mut client, "x", 20, 100).await;
    sink.signal(libc::SIGTERM);
    assert!(
        sink.wait_log("readings lost"),
        "no loss report; log:\n{}",
        sink.log_text()
    );
    let status = sink.wait_exit();
    assert!(!status.success(), "a timed-out shutdown exited 0");
}

#[tokio::test]
async fn a_stdout_whose_reader_is_gone_fails_its_stage_and_the_process_exits() {
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        stdout_sink("console", &["batch"], ""),
    ]
    .concat();
    let mut sink = SinkProcess::start_holding_stdout(&pipeline);
    sink.close_stdout();
    let mut client = sink.client("sensors").await;
    // The first write fails; calls after the failure may be refused.
    let _ = client.send_sensor_values(request("gone", 1)).await;
    assert!(
        sink.wait_log("reader of its output has gone"),
        "no error naming the cause; log:\n{}",
        sink.log_text()
    );
    let status = sink.wait_exit();
    assert!(!status.success(), "exit {status}");
    assert!(
        sink.log_lines()
            .iter()
            .any(|line| line.contains("stage failed") && line.contains("console")),
        "no line naming the stage; log:\n{}",
        sink.log_text()
    );
}

#[tokio::test]
async fn sigterm_with_a_full_pipeline_writes_everything_accepted_once_it_drains() {
    let mut sink = SinkProcess::start_holding_stdout(&stdout_pipeline("when_full = \"reject\""));
    let mut client = sink.client("sensors").await;
    // The first refusal shows every channel and the stdout pipe are full.
    let (accepted, refused) = fill_until_refused(&mut client, "full", 20, 2_000).await;
    assert!(refused.is_some(), "the pipeline never filled");
    sink.signal(libc::SIGTERM);
    // Shutdown waits for the stuck sink; once its reader is back it drains.
    assert!(sink.wait_log("shutting down"));
    sink.release_stdout();
    let status = sink.wait_exit();
    assert!(status.success(), "exit {status}; log:\n{}", sink.log_text());
    assert_each_once(&names_in(&sink.stdout_lines()), &accepted);
}
