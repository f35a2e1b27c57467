//! Helpers for end-to-end tests: start the real `sink` binary on a pipeline
//! file in a temporary directory, learn its gRPC port from its log, send real
//! calls, read the files it wrote, signal it, and wait on conditions with
//! deadlines rather than fixed sleeps.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sink_proto::sensor_service_client::SensorServiceClient;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};
use tonic::transport::Channel;

/// How long any wait in these tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `sink` binary built by this `cargo test` (beside the test executables),
/// or `$SINK_BIN`.
pub fn sink_binary() -> PathBuf {
    binary("sink")
}

/// A binary named `name` from this workspace's target directory.
pub fn binary(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("SINK_BIN").filter(|_| name == "sink") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A running `sink` process and its working directory.
pub struct SinkProcess {
    child: Child,
    dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl SinkProcess {
    /// Starts `sink --pipeline pipeline.toml` with `pipeline` as the file, and
    /// waits until it says the pipeline runs.
    pub fn start(pipeline: &str) -> Self {
        Self::start_with(&sink_binary(), pipeline, &[], &[])
    }

    /// Starts `binary` with extra `args` and `env` on `pipeline`, in a fresh
    /// directory, and waits until the pipeline runs.
    pub fn start_with(binary: &Path, pipeline: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let process = Self::spawn(binary, pipeline, args, env);
        assert!(
            process.wait_log("pipeline running"),
            "sink did not start; its log:\n{}",
            process.log_text()
        );
        process
    }

    /// Starts `binary` without waiting for anything.
    pub fn spawn(binary: &Path, pipeline: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
        let mut command = Command::new(binary);
        command
            .arg("--pipeline")
            .arg("pipeline.toml")
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start sink");
        let log = collect_lines(child.stderr.take().expect("stderr"));
        let stdout = collect_lines(child.stdout.take().expect("stdout"));
        Self {
            child,
            dir,
            log,
            stdout,
        }
    }

    /// The directory the process runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the process's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the grpc source `stage` listens on, from its log line.
    pub fn address(&self, stage: &str) -> SocketAddr {
        let needle = format!("stage=\"{stage}\"");
        let mut found = None;
        wait_until(|| {
            found = self.log_lines().iter().find_map(|line| {
                let rest = line.split("listening on ").nth(1)?;
                line.contains(&needle)
                    .then(|| rest.split_whitespace().next()?.parse().ok())?
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no listening line for {stage}; log:\n{}", self.log_text()))
    }

    /// A gRPC client connected to the grpc source `stage`.
    pub async fn client(&self, stage: &str) -> SensorServiceClient<Channel> {
        connect(self.address(stage)).await
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// The log so far, as one text.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_until(|| self.log_lines().iter().any(|line| line.contains(needle)))
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Sends `signal` (libc::SIGTERM, SIGINT, SIGHUP) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let done = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(done, 0, "kill failed");
    }

    /// Waits for the process to exit, at most [`DEADLINE`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "sink did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit and asserts it was clean.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit();
        assert!(
            status.success(),
            "sink exited with {status}; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_lines(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().expect("lines lock").push(line);
        }
    });
    lines
}

/// Polls `condition` every 10 ms until it holds or [`DEADLINE`] passes.
pub fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// A client connected to `address`.
pub async fn connect(address: SocketAddr) -> SensorServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    SensorServiceClient::new(channel).max_encoding_message_size(usize::MAX)
}

/// A request of `count` readings named `<prefix><i>` with value `i`.
pub fn request(prefix: &str, count: usize) -> SensorValuesRequest {
    request_range(prefix, 0..count)
}

/// A request of readings `<prefix><i>` for `i` in `range`.
pub fn request_range(prefix: &str, range: std::ops::Range<usize>) -> SensorValuesRequest {
    SensorValuesRequest {
        items: range
            .map(|i| SensorValue {
                sensor_name: format!("{prefix}{i}"),
                measurement: Some(Measurement {
                    sensor_value: Some(i as i64),
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_795_860_000,
                        nanos: 0,
                    }),
                }),
            })
            .collect(),
    }
}

/// The JSON lines of the file at `path` (none if it does not exist); panics
/// on a line that is not valid JSON.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("invalid JSON line {line:?}: {err}"))
        })
        .collect()
}

/// The sensor names in a `value`-layout file, in file order.
pub fn sensor_names(path: &Path) -> Vec<String> {
    json_lines(path)
        .iter()
        .map(|line| {
            line["sensor_name"]
                .as_str()
                .expect("sensor_name")
                .to_string()
        })
        .collect()
}

/// Waits until the file at `path` holds `count` lines.
pub fn wait_for_lines(path: &Path, count: usize) -> bool {
    wait_until(|| {
        std::fs::read_to_string(path)
            .map(|t| t.lines().count() >= count)
            .unwrap_or(false)
    })
}

/// A pipeline: grpc on an ephemeral port -> buffered(`buffer`) -> json_file `out.json`.
pub fn basic_pipeline(buffer: &str) -> String {
    format!(
        r#"
[sources.sensors]
type = "grpc"
address = "127.0.0.1:0"

[processors.batch]
type = "buffered"
inputs = ["sensors"]
{buffer}

[sinks.file]
type = "json_file"
inputs = ["batch"]
path = "out.json"
"#
    )
}
