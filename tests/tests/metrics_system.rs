//! `[api]` against the real tools, run by `.ci/system/40-metrics.sh`:
//! `promtool check metrics` on the exposition, a real Prometheus server
//! scraping the sink and answering a query with the exact counts, and
//! `sink top` driven in a real terminal (tmux).
//!
//! `$PROMTOOL` and `$PROMETHEUS` name the binaries (default: from `PATH`).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sink_e2e::*;

const SYSTEM: &str = "system test: run by .ci/system/40-metrics.sh";

/// grpc -> buffered -> json_file, with `[api]` on an ephemeral port.
fn pipeline() -> String {
    [
        "[api]\naddress = \"127.0.0.1:0\"\n",
        &grpc("sensors", ""),
        &buffered("batch", &["sensors"], "max_events = 7"),
        &json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

#[tokio::test]
#[ignore = "system test: run by .ci/system/40-metrics.sh"]
async fn promtool_accepts_the_exposition() {
    let sink = SinkProcess::start(&pipeline());
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "p", 3, 10).await;
    sink.wait_metric("sink_stage_readings_sent_total", &[("stage", "file")], 30.0);
    let (status, text) = sink::top::fetch(&sink.api_address(), "/metrics", None).expect("GET");
    assert_eq!(status, 200);
    let mut check = Command::new(tool("PROMTOOL", "promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run promtool ({SYSTEM}): {err}"));
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = check.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool: {said}\n{text}");
    assert!(said.trim().is_empty(), "promtool found problems: {said}");
}

/// A Prometheus server, killed when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on the loopback now (Prometheus cannot be told to pick one
/// and say which).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn start_prometheus(dir: &Path, target: &str) -> (Prometheus, String) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sink\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .expect("write prometheus.yml");
    let address = format!("127.0.0.1:{}", free_port());
    let child = Command::new(tool("PROMETHEUS", "prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={address}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run prometheus ({SYSTEM}): {err}"));
    (Prometheus(child), address)
}

/// The value per `stage` label of an instant query's answer.
fn query(prometheus: &str, promql: &str) -> Option<Vec<(String, f64)>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let (status, body) =
        sink::top::fetch(prometheus, &format!("/api/v1/query?query={encoded}"), None).ok()?;
    if status != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    let results = answer["data"]["result"].as_array()?;
    let mut values: Vec<(String, f64)> = results
        .iter()
        .filter_map(|r| {
            let stage = r["metric"]["stage"].as_str()?.to_string();
            let value = r["value"][1].as_str()?.parse().ok()?;
            Some((stage, value))
        })
        .collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    Some(values)
}

#[tokio::test]
#[ignore = "system test: run by .ci/system/40-metrics.sh"]
async fn a_real_prometheus_scrapes_the_exact_counts_per_stage() {
    let sink = SinkProcess::start(&pipeline());
    let dir = tempfile::tempdir().expect("temp dir");
    let (_prometheus, address) = start_prometheus(dir.path(), &sink.api_address());
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "q", 9, 13).await;
    let expected: Vec<(String, f64)> = ["batch", "file", "sensors"]
        .iter()
        .map(|stage| (stage.to_string(), 117.0))
        .collect();
    for metric in [
        "sink_stage_readings_received_total",
        "sink_stage_readings_sent_total",
    ] {
        let mut last = None;
        let matched = wait_until(|| {
            last = query(&address, metric);
            last.as_ref() == Some(&expected)
        });
        assert!(
            matched,
            "prometheus answered {metric} with {last:?}, not {expected:?}"
        );
    }
    let ok = query(
        &address,
        "sum by (stage) (sink_grpc_calls_total{code=\"OK\"})",
    );
    assert_eq!(ok, Some(vec![("sensors".to_string(), 9.0)]));
}

/// The tmux session `name`'s screen now.
fn capture(name: &str) -> String {
    let output = Command::new("tmux")
        .args(["capture-pane", "-p", "-t", name])
        .output()
        .expect("tmux capture-pane");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether the screen has a row for `stage` with readings per second in and
/// out above zero.
fn moving(screen: &str, stage: &str) -> bool {
    screen.lines().any(|line| {
        let cells: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == '│')
            .filter(|cell| !cell.is_empty())
            .collect();
        let rate = |i: usize| cells.get(i).and_then(|c| c.parse::<f64>().ok());
        cells.first() == Some(&stage)
            && rate(3).is_some_and(|r| r > 0.0)
            && rate(4).is_some_and(|r| r > 0.0)
    })
}

// Multi-threaded: the load runs on a worker while this thread polls the
// screen (a blocking wait would starve a current-thread runtime's sender).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "system test: run by .ci/system/40-metrics.sh"]
async fn sink_top_shows_every_stage_moving_in_a_terminal_and_quits_on_q() {
    let sink = SinkProcess::start(&pipeline());
    let address = sink.address("sensors");
    let sender = tokio::spawn(async move {
        let mut client = connect(address).await;
        for call in 0..3000 {
            if client
                .send_sensor_values(request(&format!("t{call}-"), 5))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let name = format!("sink-top-{}", std::process::id());
    let status_file = sink.path("top-status");
    let command = format!(
        "{} top --api {}; echo $? > {}",
        sink_binary().display(),
        sink.api_address(),
        status_file.display()
    );
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "140",
            "-y",
            "30",
            &command,
        ])
        .status()
        .expect("tmux new-session");
    assert!(started.success());
    let mut screen = String::new();
    let shown = wait_until(|| {
        screen = capture(&name);
        ["sensors", "batch", "file"]
            .iter()
            .all(|stage| moving(&screen, stage))
    });
    sender.abort();
    if !shown {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &name])
            .stderr(Stdio::null())
            .status();
        panic!("sink top did not show every stage moving:\n{screen}");
    }
    assert!(screen.contains("grpc calls: OK"), "{screen}");
    println!("sink top, captured:\n{screen}");
    let keyed = Command::new("tmux")
        .args(["send-keys", "-t", &name, "q"])
        .status()
        .expect("tmux send-keys");
    assert!(keyed.success());
    let exited =
        wait_until(|| std::fs::read_to_string(&status_file).is_ok_and(|s| s.trim() == "0"));
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &name])
        .stderr(Stdio::null())
        .status();
    assert!(
        exited,
        "sink top did not exit 0 on q: {:?}",
        std::fs::read_to_string(&status_file)
    );
}
