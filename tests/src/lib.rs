//! Helpers for end-to-end tests: start the real `sink` binary on a pipeline
//! file in a temporary directory, learn its gRPC port from its log, send real
//! calls, read the files it wrote, signal it, and wait on conditions with
//! deadlines rather than fixed sleeps.

pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
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
    /// Standard output not read yet (see [`SinkProcess::start_holding_stdout`]).
    held_stdout: Option<ChildStdout>,
    /// The threads reading stderr and stdout, joined once the process exits
    /// so that every line it wrote has been taken.
    readers: Vec<std::thread::JoinHandle<()>>,
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

    /// Starts `sink` on `pipeline` with extra environment variables.
    pub fn start_env(pipeline: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(&sink_binary(), pipeline, &[], env)
    }

    /// Starts `sink` on `pipeline` but reads nothing from its standard output
    /// until [`release_stdout`](Self::release_stdout): once the pipe's buffer
    /// is full, a `stdout` sink blocks, and the pipeline upstream of it fills.
    pub fn start_holding_stdout(pipeline: &str) -> Self {
        let process = Self::spawn_inner(&sink_binary(), pipeline, &[], &[], true);
        assert!(
            process.wait_log("pipeline running"),
            "sink did not start; its log:\n{}",
            process.log_text()
        );
        process
    }

    /// Starts reading the standard output held since start.
    pub fn release_stdout(&mut self) {
        let pipe = self.held_stdout.take().expect("stdout was not held");
        self.readers
            .push(collect_into(pipe, Arc::clone(&self.stdout)));
    }

    /// Closes the standard output held since start, as a reader that goes
    /// away would (`sink | head -1`).
    pub fn close_stdout(&mut self) {
        drop(self.held_stdout.take().expect("stdout was not held"));
    }

    /// Takes the standard output held since start, to read it another way
    /// (a reader that reads some bytes and then goes away, like `head -c`).
    pub fn take_stdout(&mut self) -> ChildStdout {
        self.held_stdout.take().expect("stdout was not held")
    }

    /// Starts `binary` without waiting for anything.
    pub fn spawn(binary: &Path, pipeline: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_inner(binary, pipeline, args, env, false)
    }

    fn spawn_inner(
        binary: &Path,
        pipeline: &str,
        args: &[&str],
        env: &[(&str, &str)],
        hold_stdout: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
        let mut command = sink_command(binary, dir.path(), args, env);
        let mut child = command.spawn().expect("start sink");
        let (log, log_reader) = collect_lines(child.stderr.take().expect("stderr"));
        let mut readers = vec![log_reader];
        let pipe = child.stdout.take().expect("stdout");
        let (stdout, held_stdout) = if hold_stdout {
            (Arc::default(), Some(pipe))
        } else {
            let (lines, reader) = collect_lines(pipe);
            readers.push(reader);
            (lines, None)
        };
        Self {
            child,
            dir,
            log,
            stdout,
            held_stdout,
            readers,
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

    /// The address of the `[api]` endpoint, from its log line.
    pub fn api_address(&self) -> String {
        let mut found = None;
        wait_until(|| {
            found = self.log_lines().iter().find_map(|line| {
                let rest = line.split("api listening on ").nth(1)?;
                Some(rest.split_whitespace().next()?.to_string())
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no api listening line; log:\n{}", self.log_text()))
    }

    /// The samples of the `[api]` endpoint's `/metrics` now.
    pub fn scrape(&self) -> Vec<sink::top::Sample> {
        let (status, body) =
            sink::top::fetch(&self.api_address(), "/metrics", None).expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        sink::top::parse(&body)
    }

    /// The value of metric `name` with all of `labels`, in a scrape taken now
    /// (the sum, if several series match; `None` if none does).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_in(&self.scrape(), name, labels)
    }

    /// Waits until metric `name` with `labels` reaches `at_least`; returns it.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        let mut value = None;
        let reached = wait_until(|| {
            value = self.metric(name, labels);
            value.is_some_and(|v| v >= at_least)
        });
        assert!(
            reached,
            "{name}{labels:?} is {value:?}, never reached {at_least}; log:\n{}",
            self.log_text()
        );
        value.unwrap_or_default()
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
                // The pipes are at their end now: take the last lines.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
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

type Reader = std::thread::JoinHandle<()>;

/// Collects the lines of `stream` on a thread, until its end.
fn collect_lines(stream: impl std::io::Read + Send + 'static) -> (Arc<Mutex<Vec<String>>>, Reader) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = collect_into(stream, Arc::clone(&lines));
    (lines, reader)
}

fn collect_into(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> Reader {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            lines.lock().expect("lines lock").push(line);
        }
    })
}

/// The value of metric `name` with all of `labels` among `samples` (the sum,
/// if several series match).
pub fn metric_in(
    samples: &[sink::top::Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().fold(0.0, |a, b| a + b))
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
                    sensor_value_float: None,
                }),
                labels: Default::default(),
            })
            .collect(),
    }
}

/// The JSON lines of the file at `path` (none if it does not exist); panics
/// on a line that is not valid JSON.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    parse_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("invalid JSON line {line:?}: {err}"))
        })
        .collect()
}

/// The whole JSON lines of the file at `path` while the sink may be writing
/// to it, or after a kill cut its last line short: a line being written is
/// not one yet.
pub fn json_lines_so_far(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_lines(text.rfind('\n').map_or("", |end| &text[..=end]))
}

/// The sensor names of [`json_lines_so_far`].
pub fn sensor_names_so_far(path: &Path) -> Vec<String> {
    names_of(&json_lines_so_far(path))
}

/// The sensor names in a `value`-layout file, in file order.
pub fn sensor_names(path: &Path) -> Vec<String> {
    names_of(&json_lines(path))
}

fn names_of(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            line["sensor_name"]
                .as_str()
                .expect("sensor_name")
                .to_string()
        })
        .collect()
}

/// Waits until the file at `path` holds `count` whole lines.
pub fn wait_for_lines(path: &Path, count: usize) -> bool {
    wait_until(|| {
        std::fs::read(path)
            .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count() >= count)
            .unwrap_or(false)
    })
}

/// A pipeline: grpc on an ephemeral port -> buffered(`buffer`) -> json_file `out.json`.
pub fn basic_pipeline(buffer: &str) -> String {
    [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], buffer),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

/// A `[<section>.<id>]` table of type `type_name` reading from `inputs`,
/// followed by the `extra` lines.
pub fn stage(section: &str, id: &str, type_name: &str, inputs: &[&str], extra: &str) -> String {
    let mut table = format!("\n[{section}.{id}]\ntype = \"{type_name}\"\n");
    if !inputs.is_empty() {
        let quoted: Vec<String> = inputs.iter().map(|input| format!("\"{input}\"")).collect();
        table.push_str(&format!("inputs = [{}]\n", quoted.join(", ")));
    }
    table.push_str(extra);
    table.push('\n');
    table
}

/// A grpc source `id` on an ephemeral port of 127.0.0.1, plus `extra` keys.
pub fn grpc(id: &str, extra: &str) -> String {
    stage(
        "sources",
        id,
        "grpc",
        &[],
        &format!("address = \"127.0.0.1:0\"\n{extra}"),
    )
}

/// A buffered processor `id` reading `inputs`, plus `extra` keys.
pub fn buffered(id: &str, inputs: &[&str], extra: &str) -> String {
    stage("processors", id, "buffered", inputs, extra)
}

/// A json_file sink `id` writing `path`, plus `extra` keys.
pub fn json_file(id: &str, inputs: &[&str], path: &str, extra: &str) -> String {
    stage(
        "sinks",
        id,
        "json_file",
        inputs,
        &format!("path = \"{path}\"\n{extra}"),
    )
}

/// A stdout sink `id`, plus `extra` keys.
pub fn stdout_sink(id: &str, inputs: &[&str], extra: &str) -> String {
    stage("sinks", id, "stdout", inputs, extra)
}

/// Sends `calls` requests of `per_call` readings each, named
/// `<prefix><i>` with `i` counting on across calls; every call must succeed.
/// Returns the names sent.
pub async fn send_all(
    client: &mut SensorServiceClient<Channel>,
    prefix: &str,
    calls: usize,
    per_call: usize,
) -> Vec<String> {
    let mut names = Vec::with_capacity(calls * per_call);
    for call in 0..calls {
        let request = request_range(prefix, call * per_call..(call + 1) * per_call);
        names.extend(request.items.iter().map(|item| item.sensor_name.clone()));
        client
            .send_sensor_values(request)
            .await
            .unwrap_or_else(|status| panic!("call {call} failed: {status:?}"));
    }
    names
}

/// grpc (with `source` keys) -> buffered(max_events = 1) -> stdout, with
/// one-batch channels: while nobody reads the process's stdout (see
/// [`SinkProcess::start_holding_stdout`]), the pipeline fills after a few
/// dozen calls.
pub fn stdout_pipeline(source: &str) -> String {
    [
        grpc("sensors", source),
        buffered("batch", &["sensors"], "max_events = 1\ncapacity = 1"),
        stdout_sink("console", &["batch"], "capacity = 1"),
    ]
    .concat()
}

/// Sends calls of `per_call` readings named `<prefix><i>` until one is
/// refused, at most `max_calls`; returns the names accepted and the refusal.
pub async fn fill_until_refused(
    client: &mut SensorServiceClient<Channel>,
    prefix: &str,
    per_call: usize,
    max_calls: usize,
) -> (Vec<String>, Option<tonic::Status>) {
    let mut accepted = Vec::new();
    for call in 0..max_calls {
        let request = request_range(prefix, call * per_call..(call + 1) * per_call);
        let names: Vec<String> = request
            .items
            .iter()
            .map(|item| item.sensor_name.clone())
            .collect();
        match client.send_sensor_values(request).await {
            Ok(_) => accepted.extend(names),
            Err(status) => return (accepted, Some(status)),
        }
    }
    (accepted, None)
}

/// Asserts that `written` holds each of `expected` exactly once and nothing else.
#[track_caller]
pub fn assert_each_once(written: &[String], expected: &[String]) {
    let mut seen = std::collections::BTreeSet::new();
    let twice: Vec<&String> = written
        .iter()
        .filter(|name| !seen.insert(name.as_str()))
        .collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    let wanted: std::collections::BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let missing: Vec<&&str> = wanted.difference(&seen).collect();
    let extra: Vec<&&str> = seen.difference(&wanted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} readings missing (first: {:?}), {} not expected (first: {:?})",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
}

/// The sensor names in JSON lines of the `value` layout, in order.
pub fn names_in(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("invalid JSON line {line:?}: {err}"));
            value["sensor_name"]
                .as_str()
                .unwrap_or_else(|| panic!("no sensor_name in {line}"))
                .to_string()
        })
        .collect()
}

/// The delay of the `google.rpc.RetryInfo` detail of `status`, if it has one.
pub fn retry_delay(status: &tonic::Status) -> Option<Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info()?.retry_delay
}

/// The encoded protobuf size of `request`: what the rate limit charges.
pub fn encoded_len(request: &SensorValuesRequest) -> usize {
    prost::Message::encoded_len(request)
}

/// The repository's `pipelines/` directory.
pub fn pipelines_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("pipelines")
}

/// A `sink` command that ran to its end.
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it printed on standard output.
    pub stdout: String,
    /// Everything it printed on standard error.
    pub stderr: String,
    /// The directory it ran in (kept until this is dropped).
    pub dir: tempfile::TempDir,
}

/// `binary <args> --pipeline pipeline.toml` in `dir`, with `env` added and
/// every standard stream but stdin piped.
fn sink_command(binary: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .arg("--pipeline")
        .arg("pipeline.toml")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Runs `sink <args> --pipeline pipeline.toml` with `pipeline` as the file, in
/// a fresh directory, until it exits (at most [`DEADLINE`]).
pub fn run_sink(pipeline: &str, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
    run_in(dir, args, env)
}

/// Runs `sink <args> --pipeline pipeline.toml` in `dir` until it exits.
pub fn run_in(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut command = sink_command(&sink_binary(), dir.path(), args, env);
    let mut child = command.spawn().expect("start sink");
    let (stdout, stdout_reader) = collect_lines(child.stdout.take().expect("stdout"));
    let (stderr, stderr_reader) = collect_lines(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sink {args:?} did not exit; stderr:\n{}",
                stderr.lock().expect("lock").join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The pipes are at their end now: take the last lines.
    let drained = |lines: &Arc<Mutex<Vec<String>>>, reader: Reader| {
        let _ = reader.join();
        lines.lock().expect("lock").join("\n")
    };
    Finished {
        status,
        stdout: drained(&stdout, stdout_reader),
        stderr: drained(&stderr, stderr_reader),
        dir,
    }
}

/// Asserts that `sink` refuses `pipeline` before starting anything, both as
/// `sink validate` and as a run: exit code 2, no panic or backtrace, and an
/// error on stderr that names the file and holds every one of `needles`.
/// Returns the error text.
#[track_caller]
pub fn assert_refused(pipeline: &str, env: &[(&str, &str)], needles: &[&str]) -> String {
    let mut text = String::new();
    for args in [&["validate"][..], &[][..]] {
        let run = run_sink(pipeline, args, env);
        let stderr = &run.stderr;
        assert_eq!(
            run.status.code(),
            Some(2),
            "sink {args:?} should exit 2; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"),
            "sink {args:?} panicked:\n{stderr}"
        );
        assert!(
            !run.dir.path().join("out.json").exists(),
            "sink {args:?} started writing despite the mistake"
        );
        let error = stderr
            .lines()
            .find(|line| line.starts_with("error: pipeline.toml") && needles.iter().all(|n| line.contains(n)))
            .unwrap_or_else(|| {
                panic!("sink {args:?}: no error line naming pipeline.toml with all of {needles:?}; stderr:\n{stderr}")
            });
        text = error.to_string();
    }
    text
}

/// Calls `path` on `address` with `body` as the raw bytes of the request
/// message, whatever they are, and returns the raw response message.
pub async fn call_raw(
    address: SocketAddr,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A codec that sends and receives message bytes untouched.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

/// What the standard gRPC health service at `address` says of `service`
/// (`""` for the whole server).
pub async fn health_of(
    address: SocketAddr,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    health_on(channel, service).await
}

/// The health service's answer for `service` over `channel`.
pub async fn health_on(
    channel: Channel,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Status> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// The services that gRPC server reflection (v1) at `address` lists.
pub async fn reflected_services(address: SocketAddr) -> Vec<String> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    reflected_services_on(channel).await
}

/// The services that gRPC server reflection (v1) lists over `channel`.
pub async fn reflected_services_on(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("reflection answered {other:?}"),
    }
}

/// Polls `condition` every 10 ms without blocking the async runtime, until it
/// holds or [`DEADLINE`] passes.
pub async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

/// The files of `dir`, sorted by name.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    names.sort();
    names
}

/// A file's text, decompressed with the crates by its extension; checked
/// against the command-line tool too when it is installed.
pub fn decompressed(path: &Path) -> String {
    use std::io::Read;
    let file = std::fs::File::open(path).expect("open");
    let mut text = String::new();
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file)
            .expect("zstd")
            .read_to_string(&mut text)
            .expect("zstd decodes");
        Some("zstdcat")
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .expect("gzip decodes");
        Some("zcat")
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .expect("read");
        None
    };
    if let Some(tool) = tool
        && let Ok(out) = std::process::Command::new(tool).arg(path).output()
    {
        assert!(out.status.success(), "{tool} {name} failed");
        assert!(
            out.stdout == text.as_bytes(),
            "{tool} reads {name} differently"
        );
    }
    text
}

/// Every reading in `dir`'s rotated files (by name) then in `active`, as
/// sensor names in file order; every line must parse. An unfinished
/// compression (`.tmp`) is skipped: its source is still there.
pub fn names_across(dir: &Path, active: &str) -> Vec<String> {
    let mut files: Vec<String> = listing(dir)
        .into_iter()
        .filter(|name| name != active && !name.ends_with(".tmp"))
        .collect();
    files.push(active.to_string());
    files
        .iter()
        .flat_map(|file| {
            let text = decompressed(&dir.join(file));
            names_in(&text.lines().map(str::to_string).collect::<Vec<_>>())
        })
        .collect()
}

/// Whether every rotated file of `dir` is compressed, and no compression is unfinished.
pub fn no_plain_rotated_or_temporary(dir: &Path, active: &str) -> bool {
    listing(dir)
        .iter()
        .all(|name| name == active || name.ends_with(".zst") || name.ends_with(".gz"))
}

/// The program that environment variable `variable` names (a system
/// script points it at an unpacked package's binary), or `default` from
/// `PATH`.
pub fn tool(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_string())
}

/// A TCP port of 127.0.0.1 free now, for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// Ends a server a test started with `signal` (`libc::SIGTERM` for a
/// planned stop, `libc::SIGKILL` for a crash) and waits for it.
pub fn end_server(mut child: Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

/// A field of `/proc/PID/status` (`VmHWM`, `VmPeak`, ...), in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The peak resident memory of `pid` (`VmHWM`), in kB.
pub fn peak_rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM")
}
