//! Hot reload through the real binary: every live parameter acting without a
//! restart, every way a file gets replaced triggering exactly one reload, bad
//! and topology-changing edits refused, and no reading lost or doubled while
//! the file is edited under load.

use std::path::Path;
use std::time::Duration;

use sink_e2e::*;
use tonic::Code;

/// Lines that report a reload's outcome; each reload logs exactly one.
const OUTCOMES: [&str; 4] = [
    "reload applied",
    "reload (",
    "reload failed",
    "reload refused",
];

fn outcomes(sink: &SinkProcess) -> usize {
    sink.log_lines()
        .iter()
        .filter(|line| OUTCOMES.iter().any(|o| line.contains(o)))
        .count()
}

/// Waits for the next reload outcome after `before`, then for a window longer
/// than the debounce (500 ms) to show that no second one follows: absence can
/// only be observed over time.
fn expect_exactly_one_reload(sink: &SinkProcess, before: usize) {
    assert!(
        wait_until(|| outcomes(sink) > before),
        "no reload happened; log:\n{}",
        sink.log_text()
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        outcomes(sink),
        before + 1,
        "expected exactly one reload; log:\n{}",
        sink.log_text()
    );
}

/// Replaces the pipeline file the way most editors save: write a temporary
/// file beside it, then rename it over the original.
fn save_like_an_editor(sink: &SinkProcess, text: &str) {
    let temp = sink.path(".pipeline.toml.swp");
    std::fs::write(&temp, text).expect("write temp");
    std::fs::rename(&temp, sink.path("pipeline.toml")).expect("rename");
}

fn current(sink: &SinkProcess) -> String {
    std::fs::read_to_string(sink.path("pipeline.toml")).expect("read pipeline")
}

/// Edits the file and waits for the reload to be applied.
fn edit(sink: &SinkProcess, from: &str, to: &str) {
    let before = sink.count_log("reload applied");
    let text = current(sink);
    assert!(text.contains(from), "`{from}` not in the pipeline:\n{text}");
    save_like_an_editor(sink, &text.replacen(from, to, 1));
    assert!(
        wait_until(|| sink.count_log("reload applied") > before),
        "edit `{from}` -> `{to}` was not applied; log:\n{}",
        sink.log_text()
    );
}

fn still_running(sink: &SinkProcess, pid: u32) {
    assert_eq!(sink.pid(), pid);
    assert!(
        !sink.log_text().contains("shutting down"),
        "the process restarted or stopped"
    );
}

#[tokio::test]
async fn lowering_max_events_below_what_is_held_flushes_at_once() {
    let mut sink = SinkProcess::start(&basic_pipeline(
        "max_events = 1000\nflush_interval = \"1h\"",
    ));
    let pid = sink.pid();
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("m", 5))
        .await
        .expect("send");
    edit(&sink, "max_events = 1000", "max_events = 3");
    assert!(
        wait_for_lines(&sink.path("out.json"), 5),
        "the lowered max_events did not flush"
    );
    assert!(sink.wait_log("stage `batch`: max_events"));
    still_running(&sink, pid);
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 5);
}

#[tokio::test]
async fn a_new_flush_interval_is_scheduled_from_the_change() {
    let mut sink = SinkProcess::start(&basic_pipeline(
        "max_events = 1000\nflush_interval = \"1h\"",
    ));
    let pid = sink.pid();
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("i", 2))
        .await
        .expect("send");
    edit(
        &sink,
        "flush_interval = \"1h\"",
        "flush_interval = \"300ms\"",
    );
    assert!(
        wait_for_lines(&sink.path("out.json"), 2),
        "the new interval never flushed"
    );
    still_running(&sink, pid);
    sink.stop();
}

#[tokio::test]
async fn rate_limit_and_max_message_bytes_change_live() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let pid = sink.pid();
    let mut client = sink.client("sensors").await;
    let big = request("rate", 50); // well over 300 bytes encoded
    client
        .send_sensor_values(big.clone())
        .await
        .expect("unlimited at first");

    edit(
        &sink,
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nrate_limit = { bytes_per_second = 300, burst_bytes = 300 }",
    );
    let refused = client
        .send_sensor_values(big.clone())
        .await
        .expect_err("over the new burst");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    client
        .send_sensor_values(request("small", 1))
        .await
        .expect("a small request passes");

    edit(
        &sink,
        "rate_limit = { bytes_per_second = 300, burst_bytes = 300 }",
        "max_message_bytes = 100",
    );
    let refused = client
        .send_sensor_values(big.clone())
        .await
        .expect_err("over the new size limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("too large"),
        "{}",
        refused.message()
    );

    edit(&sink, "max_message_bytes = 100", "");
    client
        .send_sensor_values(big)
        .await
        .expect("limits removed");
    still_running(&sink, pid);
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 50 + 1 + 50);
}

#[tokio::test]
async fn json_file_path_and_layout_change_between_batches() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let pid = sink.pid();
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request_range("p", 0..10))
        .await
        .expect("send");
    assert!(wait_for_lines(&sink.path("out.json"), 10));

    edit(&sink, "path = \"out.json\"", "path = \"moved/second.json\"");
    client
        .send_sensor_values(request_range("p", 10..20))
        .await
        .expect("send");
    assert!(wait_for_lines(&sink.path("moved/second.json"), 10));

    edit(
        &sink,
        "path = \"moved/second.json\"",
        "path = \"moved/second.json\"\nlayout = \"batch\"",
    );
    client
        .send_sensor_values(request_range("p", 20..25))
        .await
        .expect("send");
    assert!(wait_for_lines(&sink.path("moved/second.json"), 11));
    still_running(&sink, pid);
    sink.stop();

    assert_eq!(sensor_names(&sink.path("out.json")).len(), 10);
    let second = json_lines(&sink.path("moved/second.json"));
    assert_eq!(second.len(), 11);
    assert_eq!(
        second[10]["messageCount"], 5,
        "the last line is one batch line"
    );
}

#[tokio::test]
async fn log_level_changes_live() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let text = current(&sink);
    // Rewriting the same text only logs at DEBUG, so this line shows that
    // a reload to "debug" acted.
    let unchanged_note = "changed on disk but its text did not";
    let verbose = format!("[settings]\nlog_level = \"debug\"\n{text}");
    save_like_an_editor(&sink, &verbose);
    assert!(sink.wait_log("reload applied (file changed): settings.log_level"));
    std::fs::write(sink.path("pipeline.toml"), &verbose).expect("rewrite");
    assert!(
        sink.wait_log(unchanged_note),
        "DEBUG not written after the reload to debug"
    );
    sink.stop();
}

#[tokio::test]
async fn each_way_of_replacing_the_file_triggers_exactly_one_reload() {
    let sink = SinkProcess::start(&basic_pipeline("max_events = 100"));
    let dir = sink.dir().to_path_buf();
    let file = sink.path("pipeline.toml");
    let text = current(&sink);
    let version = |n: usize| text.replace("max_events = 100", &format!("max_events = {}", 100 + n));

    // An editor's write-to-temp-and-rename.
    let before = outcomes(&sink);
    save_like_an_editor(&sink, &version(1));
    expect_exactly_one_reload(&sink, before);

    // A write in place.
    let before = outcomes(&sink);
    std::fs::write(&file, version(2)).expect("write in place");
    expect_exactly_one_reload(&sink, before);

    // Deleted, absent for a while, then recreated.
    let before = outcomes(&sink);
    std::fs::remove_file(&file).expect("delete");
    assert!(sink.wait_log("is absent for now"));
    std::fs::write(&file, version(3)).expect("recreate");
    expect_exactly_one_reload(&sink, before);

    // A Kubernetes ConfigMap mount: pipeline.toml -> ..data/pipeline.toml,
    // ..data -> ..<timestamp>, and an update swaps ..data atomically.
    make_configmap_version(&dir, "..v4", &version(3));
    symlink("..v4", &dir.join("..data"));
    symlink("..data/pipeline.toml", &dir.join("pipeline.toml.link"));
    let before = outcomes(&sink);
    std::fs::rename(dir.join("pipeline.toml.link"), &file).expect("link the file");
    // Same text as before: no reload is due. Then the real update:
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(outcomes(&sink), before, "an unchanged text was reloaded");
    make_configmap_version(&dir, "..v5", &version(5));
    symlink("..v5", &dir.join("..data_tmp"));
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    expect_exactly_one_reload(&sink, before);
    assert!(sink.wait_log("max_events"));

    // SIGHUP, with nothing changed.
    let before = outcomes(&sink);
    sink.signal(libc::SIGHUP);
    expect_exactly_one_reload(&sink, before);
    assert!(sink.wait_log("reload (SIGHUP): nothing changed"));
}

fn make_configmap_version(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name)).expect("version dir");
    std::fs::write(dir.join(name).join("pipeline.toml"), text).expect("version file");
}

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[tokio::test]
async fn a_broken_edit_changes_nothing_and_a_fixed_one_applies() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let pid = sink.pid();
    let good = current(&sink);
    save_like_an_editor(&sink, &good.replace("max_events = 1", "max_evnts = 2"));
    assert!(sink.wait_log("reload failed"));
    let line = sink
        .log_lines()
        .into_iter()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_default();
    assert!(
        line.contains("pipeline.toml")
            && line.contains("processors.batch")
            && line.contains("max_evnts"),
        "{line}"
    );
    assert!(line.contains("WARN"), "{line}");
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("b", 3))
        .await
        .expect("still serving");
    assert!(
        wait_for_lines(&sink.path("out.json"), 3),
        "old max_events = 1 still acts"
    );

    save_like_an_editor(&sink, &good.replace("max_events = 1", "max_events = 2"));
    assert!(sink.wait_log("reload applied"));
    still_running(&sink, pid);
    sink.stop();
}

#[tokio::test]
async fn a_topology_edit_is_refused_and_the_pipeline_serves_on() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let pid = sink.pid();
    let address = sink.address("sensors");
    let text = current(&sink);
    let edited = text.replace("127.0.0.1:0", "127.0.0.1:1")
        + "\n[sinks.extra]\ntype = \"stdout\"\ninputs = [\"batch\"]\n";
    save_like_an_editor(&sink, &edited);
    assert!(sink.wait_log("reload refused"));
    let line = sink
        .log_lines()
        .into_iter()
        .find(|l| l.contains("reload refused"))
        .unwrap_or_default();
    assert!(
        line.contains("key `address`") && line.contains("sinks.extra was added"),
        "{line}"
    );
    let mut client = connect(address).await;
    client
        .send_sensor_values(request("t", 4))
        .await
        .expect("old address still serves");
    assert!(wait_for_lines(&sink.path("out.json"), 4));
    still_running(&sink, pid);
    sink.stop();
    assert!(
        sink.stdout_lines().is_empty(),
        "the refused stdout sink ran"
    );
}

#[tokio::test]
async fn edits_under_load_lose_and_double_nothing() {
    let mut sink = SinkProcess::start(&basic_pipeline(
        "max_events = 50\nflush_interval = \"100ms\"",
    ));
    let address = sink.address("sensors");
    let senders: Vec<_> = (0..4)
        .map(|client_id| {
            tokio::spawn(async move {
                let mut client = connect(address).await;
                let mut acknowledged = Vec::new();
                for call in 0..150 {
                    let start = call * 7;
                    let request = request_range(&format!("c{client_id}-"), start..start + 7);
                    if client.send_sensor_values(request).await.is_ok() {
                        acknowledged
                            .extend((start..start + 7).map(|i| format!("c{client_id}-{i}")));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                acknowledged
            })
        })
        .collect();
    let mut paths = vec!["out.json".to_string()];
    for edit_number in 1..=10 {
        let text = current(&sink);
        let next = if edit_number % 2 == 0 {
            let path = format!("out-{edit_number}.json");
            let replaced = text.replace(
                &format!("path = \"{}\"", paths.last().unwrap()),
                &format!("path = \"{path}\""),
            );
            paths.push(path);
            replaced
        } else {
            let max = if edit_number % 4 == 1 {
                "max_events = 7"
            } else {
                "max_events = 50"
            };
            text.replace("max_events = 50", max)
                .replace("max_events = 7", max)
        };
        let before = sink.count_log("reload");
        save_like_an_editor(&sink, &next);
        assert!(
            wait_until(|| sink.count_log("reload") > before),
            "edit {edit_number} not seen"
        );
    }
    let mut acknowledged = Vec::new();
    for sender in senders {
        acknowledged.extend(sender.await.expect("sender"));
    }
    sink.stop();
    let mut written: Vec<String> = paths
        .iter()
        .flat_map(|p| sensor_names(&sink.path(p)))
        .collect();
    let total = written.len();
    written.sort();
    written.dedup();
    assert_eq!(written.len(), total, "a reading was written twice");
    acknowledged.sort();
    assert_eq!(
        written, acknowledged,
        "acknowledged readings != written readings"
    );
    assert!(
        acknowledged.len() > 1000,
        "the load was too small to mean anything"
    );
}

#[tokio::test]
async fn shutdown_timeout_changes_live_and_a_timed_out_shutdown_counts_the_loss() {
    let pipeline = r#"
[settings]
shutdown_timeout = "1h"

[sources.sensors]
type = "grpc"
address = "127.0.0.1:0"

[sinks.slow]
type = "blackhole"
inputs = ["sensors"]
delay_per_batch = "10s"
"#;
    let mut sink = SinkProcess::start(pipeline);
    let mut client = sink.client("sensors").await;
    for call in 0..5 {
        client
            .send_sensor_values(request_range("s", call * 10..call * 10 + 10))
            .await
            .expect("send");
    }
    edit(
        &sink,
        "shutdown_timeout = \"1h\"",
        "shutdown_timeout = \"1s\"",
    );
    sink.signal(libc::SIGTERM);
    // Draining would take 50 s; the new timeout ends it after one.
    let status = sink.wait_exit();
    assert!(!status.success(), "a timed-out shutdown must exit non-zero");
    let line = sink
        .log_lines()
        .into_iter()
        .find(|l| l.contains("shutdown_timeout (1s) passed"))
        .unwrap_or_else(|| panic!("no timeout line; log:\n{}", sink.log_text()));
    assert!(line.contains("sources accepted 50 readings"), "{line}");
    // The first batch is still in the sink's hands: nothing was written.
    assert!(
        line.contains("this sink wrote 0: 50 readings lost"),
        "{line}"
    );
}

#[tokio::test]
async fn a_reload_to_a_fifo_path_is_refused_and_not_reported_applied() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let fifo = std::ffi::CString::new(sink.path("pipe.json").to_str().expect("utf-8").as_bytes())
        .expect("no NUL");
    // SAFETY: mkfifo reads a valid NUL-terminated path and nothing else.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    let before = outcomes(&sink);
    let text = current(&sink);
    save_like_an_editor(
        &sink,
        &text.replace("path = \"out.json\"", "path = \"pipe.json\""),
    );
    expect_exactly_one_reload(&sink, before);
    let log = sink.log_text();
    let failed = log
        .lines()
        .find(|line| line.contains("reload failed"))
        .unwrap_or_else(|| panic!("no refusal; log:\n{log}"));
    assert!(
        failed.contains("key `path`") && failed.contains("FIFO"),
        "{failed}"
    );
    assert!(!log.contains("reload applied"), "{log}");
    // Still writing where it was.
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "kept", 1, 3).await;
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}
