//! The `postgres` sink against a real PostgreSQL (Debian's package): each
//! test starts its own throwaway cluster (`initdb` in a temporary directory,
//! as the `postgres` user when run as root) on a free loopback port. System
//! tests: `.ci/system/55-postgres.sh` installs the server and runs them
//! (`cargo test -p sink-e2e --test postgres -- --ignored`).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sink_e2e::tls;
use sink_e2e::*;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};

const SUPERUSER_PASSWORD: &str = "super secret";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// Where Debian keeps the server's programs (not on PATH).
fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run .ci/system/55-postgres.sh")
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL cluster of its own in a temporary directory.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn start() -> Self {
        Self::start_on(free_port())
    }

    /// initdb, then start on `port`; the superuser `postgres` has a password
    /// over TCP (scram), so that a wrong one is refused.
    fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pw"), SUPERUSER_PASSWORD).expect("password file");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster's directory");
        }
        let server = Self { dir, port };
        server.pg(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                &server.dir.path().join("pw").display().to_string(),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of the server's programs, as the `postgres` user when root.
    fn pg(&self, program: &str, args: &[&str]) {
        let path = bindir().join(program);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run a PostgreSQL program");
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the stopped server on the same port and data, and waits until
    /// it takes connections.
    fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=40",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: every server process quits at once, as in
    /// a crash; the next start runs crash recovery.
    fn crash(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]);
    }

    /// The postmaster and every process it started.
    fn processes(&self) -> Vec<i32> {
        let pid_file = std::fs::read_to_string(Path::new(&self.data()).join("postmaster.pid"))
            .expect("postmaster.pid");
        let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The fields after the command's closing parenthesis: state, ppid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends `signal` to every server process (SIGSTOP: a stalled server).
    fn signal_all(&self, signal: i32) {
        for pid in self.processes() {
            // SAFETY: kill(2) on a pid has no memory-safety preconditions.
            unsafe { libc::kill(pid, signal) };
        }
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{}@127.0.0.1:{}/postgres",
            password.replace(' ', "%20"),
            self.port
        )
    }

    /// The superuser's URL, as the sink gets it.
    fn superuser(&self) -> String {
        self.url("postgres", SUPERUSER_PASSWORD)
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.superuser(), tokio_postgres::NoTls)
                .await
                .expect("connect as the superuser");
        tokio::spawn(connection);
        client
    }

    async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    /// Every `sensor_name` in `table`, once per row.
    async fn names(&self, table: &str) -> Vec<String> {
        self.client()
            .await
            .query(&format!("SELECT sensor_name FROM {table}"), &[])
            .await
            .unwrap_or_else(|err| panic!("{table}: {err}"))
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.signal_all_quietly(libc::SIGCONT);
        let path = bindir().join("pg_ctl");
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        let _ = command
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Postgres {
    fn signal_all_quietly(&self, signal: i32) {
        if Path::new(&self.data()).join("postmaster.pid").exists() {
            self.signal_all(signal);
        }
    }
}

/// grpc (with `grpc_keys`) -> buffered -> postgres (with `keys`), plus `api`.
fn pipeline(url: &str, grpc_keys: &str, keys: &str) -> String {
    format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        [
            grpc("sensors", grpc_keys),
            buffered(
                "batch",
                &["sensors"],
                "max_events = 100\nflush_interval = \"20ms\"",
            ),
            postgres("db", &["batch"], url, keys),
        ]
        .concat()
    )
}

fn postgres(id: &str, inputs: &[&str], url: &str, keys: &str) -> String {
    stage(
        "sinks",
        id,
        "postgres",
        inputs,
        &format!("url = \"{url}\"\n{keys}"),
    )
}

fn item(
    name: &str,
    int: Option<i64>,
    float: Option<f64>,
    created: Option<prost_types::Timestamp>,
    labels: &[(&str, &str)],
) -> SensorValue {
    SensorValue {
        sensor_name: name.into(),
        measurement: Some(Measurement {
            sensor_value: int,
            created_at: created,
            sensor_value_float: float,
        }),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// One row as the test reads it back: every column in words.
type Row = (String, String, Option<i64>, Option<f64>, Option<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn readings_round_trip_exactly_with_every_method_and_a_schema_qualified_table() {
    let db = Postgres::start();
    db.execute("CREATE SCHEMA metrics").await;
    let url = db.superuser();
    let sinks = [
        ("binary", "copy_binary", "readings"),
        ("text", "copy_text", "metrics.readings"),
        ("insert", "insert", "\\\"Readings Insert\\\""),
    ];
    let mut text = format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        grpc("sensors", "acknowledge = \"written\"")
    );
    for (id, method, table) in sinks {
        text.push_str(&postgres(
            id,
            &["sensors"],
            &url,
            &format!("table = \"{table}\"\ncreate_table = true\nmethod = \"{method}\""),
        ));
    }
    let mut sink = SinkProcess::start(&text);
    let created = prost_types::Timestamp {
        seconds: 1_795_860_000,
        nanos: 123_456_789,
    };
    let odd = "q\"uote \\back\ttab\nnew\rline ☃ ünï";
    let request = SensorValuesRequest {
        items: vec![
            item(
                "int",
                Some(-9_007_199_254_740_993),
                None,
                Some(created),
                &[],
            ),
            item("float", None, Some(0.1), Some(created), &[("unit", "°C")]),
            item("tiny", None, Some(-5e-324), None, &[]),
            item("none", None, None, None, &[("site", "north"), ("z", "")]),
            item(odd, Some(i64::MAX), None, Some(created), &[(odd, odd)]),
        ],
    };
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request)
        .await
        .expect("OK once every table committed");

    let pg = db.client().await;
    let mut expected: Vec<Row> = vec![
        (
            "int".into(),
            "{}".into(),
            Some(-9_007_199_254_740_993),
            None,
            Some("2026-11-28 10:00:00.123456+00".into()),
        ),
        (
            "float".into(),
            r#"{"unit": "°C"}"#.into(),
            None,
            Some(0.1),
            Some("2026-11-28 10:00:00.123456+00".into()),
        ),
        ("tiny".into(), "{}".into(), None, Some(-5e-324), None),
        (
            "none".into(),
            r#"{"z": "", "site": "north"}"#.into(),
            None,
            None,
            None,
        ),
        (
            odd.into(),
            serde_json::json!({ odd: odd })
                .to_string()
                .replace("\":\"", "\": \""),
            Some(i64::MAX),
            None,
            Some("2026-11-28 10:00:00.123456+00".into()),
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    pg.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    for (_, _, table) in sinks {
        let table = table.replace('\\', "");
        let mut rows: Vec<Row> = pg
            .query(
                &format!(
                    "SELECT sensor_name, labels::jsonb::text, sensor_value, sensor_value_float, created_at::text, \
                            received_at > now() - interval '1 minute' AND received_at <= now() \
                     FROM {table}"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|err| panic!("{table}: {err}"))
            .iter()
            .map(|row| {
                assert!(row.get::<_, bool>(5), "{table}: received_at is not about now");
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(rows, expected, "table {table}");
        let bits: Vec<u64> = rows.iter().filter_map(|r| r.3).map(f64::to_bits).collect();
        assert_eq!(
            bits,
            [0.1f64.to_bits(), (-5e-324f64).to_bits()],
            "{table}: floats are not bit-exact"
        );
    }
    assert_eq!(
        sink.metric("sink_postgres_rows_written_total", &[("stage", "text")]),
        Some(5.0)
    );
    assert_eq!(
        sink.metric(
            "sink_postgres_batches_committed_total",
            &[("stage", "binary")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sink.metric("sink_postgres_connected", &[("stage", "insert")]),
        Some(1.0)
    );
    sink.stop();
}

/// Runs the sink on `keys` and expects it to refuse to start, exit 2, with an
/// error naming the stage, `key` and all of `needles`.
fn refused(url: &str, keys: &str, key: &str, needles: &[&str]) {
    let run = run_sink(&pipeline(url, "", keys), &[], &[]);
    assert_eq!(
        run.status.code(),
        Some(2),
        "{keys}: should exit 2; stderr:\n{}",
        run.stderr
    );
    let line = run
        .stderr
        .lines()
        .find(|line| line.contains("error: pipeline.toml"))
        .unwrap_or_else(|| panic!("no error line; stderr:\n{}", run.stderr));
    for needle in ["stage `sinks.db`", &format!("key `{key}`")[..]]
        .into_iter()
        .chain(needles.iter().copied())
    {
        assert!(
            line.contains(needle) || run.stderr.contains(needle),
            "{keys}: `{needle}` not in:\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains(SUPERUSER_PASSWORD),
        "the password was logged"
    );
}

#[tokio::test]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn every_startup_mistake_is_refused_naming_the_table_column_or_key() {
    let db = Postgres::start();
    db.execute(
        "CREATE TABLE no_labels (sensor_name text, sensor_value bigint, sensor_value_float float8, \
                                 created_at timestamptz, received_at timestamptz);
         CREATE TABLE int_value (sensor_name text, labels jsonb, sensor_value integer, \
                                 sensor_value_float float8, created_at timestamptz, received_at timestamptz);
         CREATE TABLE extra (sensor_name text, labels jsonb, sensor_value bigint, sensor_value_float float8, \
                             created_at timestamptz, received_at timestamptz, site text NOT NULL);
         CREATE TABLE readings (sensor_name text, labels jsonb, sensor_value bigint, sensor_value_float float8, \
                                created_at timestamptz, received_at timestamptz);
         CREATE ROLE reader LOGIN PASSWORD 'reader';
         GRANT SELECT ON readings TO reader;",
    )
    .await;
    let url = db.superuser();
    refused(
        &db.url("postgres", "wrong"),
        "table = \"readings\"",
        "url",
        &["password authentication failed"],
    );
    refused(
        &url,
        "table = \"missing\"",
        "table",
        &["table `missing` does not exist"],
    );
    refused(
        &url,
        "table = \"no_labels\"",
        "table",
        &["table `no_labels` has no column `labels`"],
    );
    refused(
        &url,
        "table = \"int_value\"",
        "table",
        &["table `int_value`, column `sensor_value`: type `integer`"],
    );
    refused(
        &url,
        "table = \"extra\"",
        "table",
        &["column `site`: NOT NULL without a default"],
    );
    refused(
        &db.url("reader", "reader"),
        "table = \"readings\"",
        "table",
        &["user `reader` may not insert into table `readings`"],
    );
    refused(
        &url,
        "table = \"readings; drop table readings\"",
        "table",
        &["not a table name"],
    );
}

/// The clients' view of a load: names OK'd, and calls answered otherwise.
#[derive(Default)]
struct Load {
    acknowledged: Vec<String>,
    failed: usize,
}

/// `clients` clients sending calls of 10 readings until `stop` is set.
/// Returns the flag that stops them, the count of calls OK'd, and the tasks.
fn start_load(
    address: std::net::SocketAddr,
    clients: usize,
    prefix: &str,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Vec<tokio::task::JoinHandle<Load>>,
) {
    let (stop, oks) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let tasks = (0..clients)
        .map(|task| {
            let (stop, oks) = (Arc::clone(&stop), Arc::clone(&oks));
            let prefix = format!("{prefix}{task}-");
            tokio::spawn(async move {
                let mut client = connect(address).await;
                let mut load = Load::default();
                let mut call = 0;
                while !stop.load(Ordering::Relaxed) {
                    let request = request_range(&prefix, call * 10..(call + 1) * 10);
                    let names: Vec<String> = request
                        .items
                        .iter()
                        .map(|i| i.sensor_name.clone())
                        .collect();
                    match client.send_sensor_values(request).await {
                        Ok(_) => {
                            load.acknowledged.extend(names);
                            oks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => load.failed += 1,
                    }
                    call += 1;
                }
                load
            })
        })
        .collect();
    (stop, oks, tasks)
}

async fn finish_load(tasks: Vec<tokio::task::JoinHandle<Load>>) -> Load {
    let mut all = Load::default();
    for task in tasks {
        let load = task.await.expect("client task");
        all.acknowledged.extend(load.acknowledged);
        all.failed += load.failed;
    }
    all
}

/// Every acknowledged name is in `written`; returns how many rows are
/// duplicates.
fn check_written(acknowledged: &[String], written: &[String], log: &str) -> usize {
    let set: BTreeSet<&String> = written.iter().collect();
    let missing: Vec<&String> = acknowledged.iter().filter(|n| !set.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged readings are missing (first: {:?}); log:\n{log}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(3)]
    );
    written.len() - set.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn a_database_crash_and_restart_under_load_loses_no_acknowledged_reading() {
    let db = Postgres::start();
    let mut sink = SinkProcess::start(&pipeline(
        &db.superuser(),
        "acknowledge = \"written\"",
        "table = \"readings\"\ncreate_table = true\nstatement_timeout = \"2s\"\nconnect_timeout = \"1s\"",
    ));
    let (stop, oks, tasks) = start_load(sink.address("sensors"), 4, "r");
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= 200).await);
    for _ in 0..2 {
        db.crash();
        assert!(
            sink.wait_log("retrying"),
            "the sink did not notice; log:\n{}",
            sink.log_text()
        );
        let stalled = oks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        db.start_again();
        assert!(
            eventually(|| oks.load(Ordering::Relaxed) >= stalled + 200).await,
            "load did not resume after the restart; log:\n{}",
            sink.log_text()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let load = finish_load(tasks).await;
    sink.stop();
    let written = db.names("readings").await;
    let duplicates = check_written(&load.acknowledged, &written, &sink.log_text());
    let in_doubt = sink.log_text().matches("was not answered").count();
    eprintln!(
        "two crashes under load: {} readings OK'd, {} calls failed, {} rows, {duplicates} duplicates, {in_doubt} commits in doubt",
        load.acknowledged.len(),
        load.failed,
        written.len()
    );
    assert_eq!(
        load.failed, 0,
        "the sink held the calls rather than failing them"
    );
    assert_eq!(duplicates, 0, "a row was written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn kill_9_of_the_sink_loses_no_reading_acknowledged_as_written() {
    let db = Postgres::start();
    let mut sink = SinkProcess::start(&pipeline(
        &db.superuser(),
        "acknowledge = \"written\"",
        "table = \"readings\"\ncreate_table = true",
    ));
    let (stop, oks, tasks) = start_load(sink.address("sensors"), 8, "k");
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= 300).await);
    sink.signal(libc::SIGKILL);
    stop.store(true, Ordering::Relaxed);
    let load = finish_load(tasks).await;
    sink.wait_exit();
    let written = db.names("readings").await;
    let duplicates = check_written(&load.acknowledged, &written, "");
    eprintln!(
        "kill -9: {} readings OK'd, all in the table ({} rows, {duplicates} duplicates)",
        load.acknowledged.len(),
        written.len()
    );
    assert!(load.acknowledged.len() >= 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn unreachable_at_startup_the_sink_is_not_ready_then_writes_once_it_answers() {
    let port = free_port();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{port}/postgres",
        SUPERUSER_PASSWORD.replace(' ', "%20")
    );
    let mut sink = SinkProcess::start(&pipeline(
        &url,
        "acknowledge = \"written\"",
        "table = \"readings\"\ncreate_table = true\nconnect_timeout = \"1s\"",
    ));
    assert!(
        sink.wait_log("not reachable at startup"),
        "{}",
        sink.log_text()
    );
    let address = sink.api_address();
    let (status, body) = sink::top::fetch(&address, "/ready", None).expect("GET /ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("PostgreSQL"), "{body}");
    assert_eq!(sink.metric("sink_postgres_connected", &[]), Some(0.0));

    let db = Postgres::start_on(port);
    assert!(
        eventually(
            || sink::top::fetch(&address, "/ready", None).is_ok_and(|(status, _)| status == 200)
        )
        .await,
        "not ready after the database came up; log:\n{}",
        sink.log_text()
    );
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "late", 3, 10).await;
    let written = db.names("readings").await;
    assert_eq!(check_written(&names, &written, &sink.log_text()), 0);
    sink.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn a_value_the_table_refuses_fails_that_call_alone_and_is_counted() {
    let db = Postgres::start();
    db.execute(
        "CREATE TABLE readings (sensor_name text NOT NULL, labels jsonb NOT NULL DEFAULT '{}', \
           sensor_value bigint CHECK (sensor_value < 1000), sensor_value_float float8, \
           created_at timestamptz, received_at timestamptz NOT NULL)",
    )
    .await;
    let text = format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}{}",
        grpc("sensors", "acknowledge = \"written\""),
        postgres("db", &["sensors"], &db.superuser(), "table = \"readings\""),
    );
    let mut sink = SinkProcess::start(&text);
    let mut client = sink.client("sensors").await;
    let status = client
        .send_sensor_values(request_range("big", 999..1001))
        .await
        .expect_err("a value the CHECK refuses was acknowledged");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let good = send_all(&mut client, "good", 2, 5).await;
    assert_eq!(db.names("readings").await.len(), good.len());
    assert_eq!(
        sink.metric("sink_postgres_batches_failed_total", &[("reason", "23514")]),
        Some(1.0)
    );
    assert!(
        sink.wait_log("refused a batch of 2 readings for good"),
        "{}",
        sink.log_text()
    );
    sink.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn a_reload_moves_writing_to_another_table_live_losing_nothing() {
    let db = Postgres::start();
    let url = db.superuser();
    let keys = |table: &str| format!("table = \"{table}\"\ncreate_table = true");
    let mut sink = SinkProcess::start(&pipeline(&url, "acknowledge = \"written\"", &keys("first")));
    let (stop, oks, tasks) = start_load(sink.address("sensors"), 2, "m");
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= 50).await);
    std::fs::write(
        sink.path("pipeline.toml"),
        pipeline(&url, "acknowledge = \"written\"", &keys("second")),
    )
    .unwrap();
    assert!(
        sink.wait_log("now writing to table `second`"),
        "{}",
        sink.log_text()
    );
    let moved = oks.load(Ordering::Relaxed);
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= moved + 50).await);
    stop.store(true, Ordering::Relaxed);
    let load = finish_load(tasks).await;
    sink.stop();
    let (first, second) = (db.names("first").await, db.names("second").await);
    assert!(!first.is_empty() && !second.is_empty());
    let both: Vec<String> = first.into_iter().chain(second).collect();
    assert_eq!(
        check_written(&load.acknowledged, &both, &sink.log_text()),
        0
    );
    assert_eq!(both.len(), load.acknowledged.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn a_stalled_database_holds_clients_within_the_memory_limit_and_then_catches_up() {
    let db = Postgres::start();
    let text = format!(
        "[settings]\nmemory_limit = \"8MiB\"\n{}",
        pipeline(
            &db.superuser(),
            "acknowledge = \"written\"",
            "table = \"readings\"\ncreate_table = true\nstatement_timeout = \"1s\"\nconnect_timeout = \"1s\"",
        )
    );
    let mut sink = SinkProcess::start(&text);
    let (stop, oks, tasks) = start_load(sink.address("sensors"), 8, "s");
    assert!(eventually(|| oks.load(Ordering::Relaxed) >= 100).await);
    db.signal_all(libc::SIGSTOP);
    assert!(
        sink.wait_log("no answer within statement_timeout"),
        "{}",
        sink.log_text()
    );
    let address = sink.api_address();
    assert!(
        eventually(
            || sink::top::fetch(&address, "/ready", None).is_ok_and(|(status, _)| status == 503)
        )
        .await
    );
    let reserved = sink
        .metric("sink_memory_reserved_bytes", &[])
        .expect("memory metric");
    assert!(
        reserved <= 8.0 * 1024.0 * 1024.0,
        "{reserved} bytes reserved"
    );
    db.signal_all(libc::SIGCONT);
    let resumed = oks.load(Ordering::Relaxed);
    assert!(
        eventually(|| oks.load(Ordering::Relaxed) >= resumed + 100).await,
        "load did not resume; log:\n{}",
        sink.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    let load = finish_load(tasks).await;
    sink.stop();
    let written = db.names("readings").await;
    let duplicates = check_written(&load.acknowledged, &written, &sink.log_text());
    eprintln!(
        "stalled database: {} readings OK'd, {} calls failed, {duplicates} duplicates",
        load.acknowledged.len(),
        load.failed
    );
    assert_eq!(duplicates, 0);
}

/// A TCP proxy in front of the server that breaks the connection around the
/// first `COMMIT`s it sees, as a network failure or a crash at the worst
/// moment would: the first `forwarded` of them reach the server (which
/// commits) before the connection is cut, the next `swallowed` do not (the
/// server aborts). Connections after that pass untouched.
async fn commit_cutting_proxy(upstream: u16, forwarded: usize, swallowed: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cuts = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let cuts = Arc::clone(&cuts);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let mut answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(read) = client_read.read(&mut buffer).await {
                    if read == 0 {
                        break;
                    }
                    let chunk = &buffer[..read];
                    let commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
                    let cut = if commit {
                        cuts.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n < forwarded + swallowed).then_some(n + 1)
                        })
                        .ok()
                    } else {
                        None
                    };
                    match cut {
                        Some(n) if n < forwarded => {
                            // Nothing goes back to the client from now on.
                            answers.abort();
                            let _ = (&mut answers).await;
                            let _ = server_write.write_all(chunk).await;
                            // Let the server commit, then lose its answer.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                        Some(_) => break,
                        None => {
                            if server_write.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                answers.abort();
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn a_commit_whose_answer_is_lost_is_settled_by_the_server_and_written_once() {
    let db = Postgres::start();
    let proxy = commit_cutting_proxy(db.port, 1, 1).await;
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{proxy}/postgres",
        SUPERUSER_PASSWORD.replace(' ', "%20")
    );
    let text = format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}{}",
        grpc("sensors", "acknowledge = \"written\""),
        postgres(
            "db",
            &["sensors"],
            &url,
            "table = \"readings\"\ncreate_table = true"
        ),
    );
    let mut sink = SinkProcess::start(&text);
    let mut client = sink.client("sensors").await;
    // One call at a time, each its own transaction: the first COMMIT is cut
    // after the server got it, the second before.
    let names = send_all(&mut client, "doubt", 4, 25).await;
    let written = db.names("readings").await;
    assert_eq!(
        check_written(&names, &written, &sink.log_text()),
        0,
        "a row was written twice"
    );
    assert_eq!(written.len(), names.len());
    let outcome = |outcome| {
        sink.metric(
            "sink_postgres_commits_in_doubt_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(outcome("committed"), Some(1.0), "{}", sink.log_text());
    assert_eq!(outcome("aborted"), Some(1.0), "{}", sink.log_text());
    sink.stop();
}

impl Postgres {
    /// Turns TLS on with a certificate for 127.0.0.1 signed by `ca`, and
    /// makes the server refuse user `sink` over plaintext.
    fn require_tls_for_sink(&self, ca: &tls::TestCa) {
        let data = PathBuf::from(self.data());
        let (cert, key) = ca.server(1, 30.0).write(&data, "server");
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("hostnossl all sink 0.0.0.0/0 reject\n{rules}"),
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cert)
                .arg(&key)
                .status()
                .unwrap();
            assert!(status.success());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.pg("pg_ctl", &["-D", &self.data(), "-w", "reload"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn tls_verified_against_the_ca_carries_readings_and_a_foreign_ca_or_plaintext_is_refused() {
    let db = Postgres::start();
    let ca = tls::TestCa::new("postgres test CA");
    db.require_tls_for_sink(&ca);
    db.execute(
        "CREATE ROLE sink LOGIN PASSWORD 'sink';
         CREATE TABLE readings (sensor_name text NOT NULL, labels jsonb NOT NULL DEFAULT '{}', \
           sensor_value bigint, sensor_value_float float8, created_at timestamptz, \
           received_at timestamptz NOT NULL);
         GRANT INSERT ON readings TO sink;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.crt");
    let foreign = tls::TestCa::new("another CA").write(dir.path(), "foreign.crt");
    let url = db.url("sink", "sink");
    let keys = |mode: &str, ca: &Path| {
        format!(
            "table = \"readings\"\ntls = {{ mode = \"{mode}\", ca = \"{}\" }}",
            ca.display()
        )
    };

    let mut sink = SinkProcess::start(&pipeline(
        &url,
        "acknowledge = \"written\"",
        &keys("verify-full", &ca_file),
    ));
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "tls", 3, 10).await;
    assert_eq!(
        check_written(&names, &db.names("readings").await, &sink.log_text()),
        0
    );
    sink.stop();

    refused(
        &url,
        "table = \"readings\"",
        "url",
        &["pg_hba.conf rejects connection"],
    );
    refused(
        &url,
        &keys("verify-full", &foreign),
        "tls",
        &["TLS refused"],
    );
    refused(&url, &keys("verify-ca", &foreign), "tls", &["TLS refused"]);
}

/// The stage API's conformance check (batches of 97, a reload midway, a
/// shutdown, every token resolved as written) on the real server, with the
/// conformance readings and, read back, each reading's name and value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "system test: needs PostgreSQL; run by .ci/system/55-postgres.sh"]
async fn the_sink_passes_the_stage_conformance_check_against_the_real_server() {
    use sink_api::Value;
    use sink_postgres::{Method, PostgresSinkConfig};

    let db = Postgres::start();
    // The key=value form, the password from a file.
    let config = PostgresSinkConfig {
        url: format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            db.port
        ),
        table: "conformance".into(),
        create_table: true,
        method: Method::CopyBinary,
        password_file: Some(db.dir.path().join("pw")),
        tls: None,
        max_batch_rows: 50,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
    };
    let url = db.superuser();
    let expected = |sent: &[sink_api::Reading]| -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = sent
            .iter()
            .map(|r| {
                let value = match r.value {
                    Some(Value::Int(i)) => format!("int {i}"),
                    Some(Value::Float(f)) => format!("float {:x}", f.to_bits()),
                    None => "none".into(),
                };
                (r.sensor_name.to_string(), value)
            })
            .collect();
        rows.sort();
        rows
    };
    let written = move || -> Vec<(String, String)> {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                let mut rows: Vec<(String, String)> = client
                    .query(
                        "SELECT sensor_name, sensor_value, sensor_value_float FROM conformance",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| {
                        let value =
                            match (row.get::<_, Option<i64>>(1), row.get::<_, Option<f64>>(2)) {
                                (Some(i), _) => format!("int {i}"),
                                (_, Some(f)) => format!("float {:x}", f.to_bits()),
                                _ => "none".into(),
                            };
                        (row.get(0), value)
                    })
                    .collect();
                rows.sort();
                rows
            })
        })
        .join()
        .unwrap()
    };
    sink_api::testkit::check_sink_with(config, expected, written).await;
}
