//! The `nats` sink and source against real `nats-server` processes (Debian's
//! package, with JetStream): readings in through gRPC, through a JetStream
//! stream, out to files. System tests: `.ci/system/50-nats.sh` installs the
//! server and runs them (`cargo test -p sink-e2e --test nats -- --ignored`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sink_e2e::*;

/// A `nats-server` with JetStream, alone or as one node of a cluster.
struct NatsServer {
    child: Option<Child>,
    config: PathBuf,
    port: u16,
}

impl NatsServer {
    /// A server whose config and store live in `dir`; `cluster` is this node's
    /// route port and every node's route port (none for a lone server).
    fn start(dir: &Path, name: &str, cluster: Option<(u16, &[u16])>) -> Self {
        Self::start_with(dir, name, cluster, "")
    }

    /// As [`start`](Self::start), with `extra` lines in the server's config.
    fn start_with(dir: &Path, name: &str, cluster: Option<(u16, &[u16])>, extra: &str) -> Self {
        let port = free_port();
        let store = dir.join(format!("{name}-store"));
        let mut config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n",
            store.display()
        );
        config.push_str(extra);
        if let Some((own, all)) = cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|p| **p != own)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            config.push_str(&format!(
                "cluster {{ name: c1\n listen: 127.0.0.1:{own}\n routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, config).expect("write nats config");
        let mut server = Self {
            child: None,
            config: path,
            port,
        };
        server.restart();
        server
    }

    /// Starts (again) on the same port and store.
    fn restart(&mut self) {
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: run .ci/system/50-nats.sh");
        self.child = Some(child);
        assert!(
            wait_until(|| std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()),
            "nats-server did not listen on {}",
            self.port
        );
    }

    /// SIGTERM, and waits for the server to exit: a planned stop.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            end_server(child, libc::SIGTERM);
        }
    }

    /// SIGKILL, as a crashed node.
    fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            end_server(child, libc::SIGKILL);
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-node JetStream cluster on loopback.
fn cluster(dir: &Path) -> Vec<NatsServer> {
    let routes = [free_port(), free_port(), free_port()];
    ["n1", "n2", "n3"]
        .iter()
        .zip(routes)
        .map(|(name, own)| NatsServer::start(dir, name, Some((own, &routes))))
        .collect()
}

/// Creates stream `name` on `subjects` with `replicas`, retrying while a
/// fresh cluster elects its leader.
async fn create_stream(urls: &[String], name: &str, subjects: &str, replicas: usize) {
    let start = Instant::now();
    loop {
        let created = async {
            let client = async_nats::connect(urls.to_vec()).await?;
            jetstream::new(client)
                .create_stream(jetstream::stream::Config {
                    name: name.into(),
                    subjects: vec![subjects.into()],
                    num_replicas: replicas,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await?;
            Ok::<_, async_nats::Error>(())
        }
        .await;
        match created {
            Ok(()) => return,
            Err(err) if start.elapsed() > DEADLINE => panic!("cannot create stream {name}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A lone server in `dir` with stream `TELEMETRY` (`telemetry.>`), its
/// URLs, and a JetStream context on it.
async fn solo_with_stream(dir: &Path) -> (NatsServer, Vec<String>, jetstream::Context) {
    let server = NatsServer::start(dir, "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    (server, urls, jetstream::new(client))
}

/// Empties stream `name`, so that a new consumer sees only what comes next.
async fn purge(urls: &[String], name: &str) {
    let client = async_nats::connect(urls.to_vec()).await.expect("connect");
    let stream = jetstream::new(client)
        .get_stream(name)
        .await
        .expect("stream");
    stream.purge().await.expect("purge");
}

fn quoted(urls: &[String]) -> String {
    let list: Vec<String> = urls.iter().map(|url| format!("\"{url}\"")).collect();
    format!("[{}]", list.join(", "))
}

/// grpc -> buffered -> nats sink.
fn ingest(urls: &[String], encoding: &str) -> String {
    ingest_with(urls, encoding, "")
}

/// As [`ingest`], with `grpc_keys` for the grpc source.
fn ingest_with(urls: &[String], encoding: &str, grpc_keys: &str) -> String {
    [
        grpc("sensors", grpc_keys),
        buffered("batch", &["sensors"], "max_events = 100\nflush_interval = \"100ms\""),
        stage(
            "sinks",
            "stream",
            "nats",
            &["batch"],
            &format!(
                "url = {}\nstream = \"TELEMETRY\"\nsubject = \"telemetry.{{sensor_name}}\"\nencoding = \"{encoding}\"",
                quoted(urls)
            ),
        ),
    ]
    .concat()
}

/// nats source (redelivering after 2 s without acknowledgement) -> buffered -> json_file at `out`.
fn writer(urls: &[String], consumer: &str, filter: &str, out: &Path) -> String {
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("filter_subject = \"{filter}\"\n")
    };
    [
        stage(
            "sources",
            "stream",
            "nats",
            &[],
            &format!(
                "url = {}\nstream = \"TELEMETRY\"\nconsumer = \"{consumer}\"\nack_wait = \"2s\"\n{filter}",
                quoted(urls)
            ),
        ),
        buffered("batch", &["stream"], "max_events = 500\nflush_interval = \"100ms\""),
        json_file("file", &["batch"], &out.display().to_string(), ""),
    ]
    .concat()
}

/// Waits until `path` holds every one of `expected` (duplicates aside).
fn wait_for_names(path: &Path, expected: &[String]) -> bool {
    let want: std::collections::BTreeSet<&String> = expected.iter().collect();
    wait_until(|| {
        let have = sensor_names_so_far(path);
        let have: std::collections::BTreeSet<&String> = have.iter().collect();
        want.is_subset(&have)
    })
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn readings_round_trip_through_jetstream_in_both_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;

    for (round, encoding) in ["json", "protobuf"].into_iter().enumerate() {
        purge(&urls, "TELEMETRY").await;
        let out = dir.path().join(format!("all-{encoding}.json"));
        let only_t1 = dir.path().join(format!("t1-{encoding}.json"));
        let mut ingest = SinkProcess::start(&ingest(&urls, encoding));
        let mut all = SinkProcess::start(&writer(&urls, &format!("all{round}"), "", &out));
        let mut filtered = SinkProcess::start(&writer(
            &urls,
            &format!("t1only{round}"),
            &format!("telemetry.{encoding}1"),
            &only_t1,
        ));
        let mut client = ingest.client("sensors").await;
        let sent = send_all(&mut client, encoding, 40, 50).await;
        ingest.stop();
        assert!(wait_for_names(&out, &sent), "not every reading arrived");
        all.stop();
        filtered.stop();
        assert_each_once(&sensor_names_so_far(&out), &sent);
        assert_eq!(
            sensor_names_so_far(&only_t1),
            [format!("{encoding}1")],
            "the consumer filtered on the sensor's subject"
        );
        let lines = json_lines(&out);
        assert!(lines.iter().all(|line| line["received_at"].is_string()));
        if encoding == "json" {
            assert_eq!(lines[0]["created_at"], "2026-11-28T10:00:00Z");
        }
    }
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_missing_stream_is_refused_at_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), "solo", None);
    let refused = run_sink(&ingest(&[server.url()], "json"), &[], &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("sinks.stream")
            && refused.stderr.contains("`TELEMETRY` does not exist"),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_killed_node_of_three_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path());
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    create_stream(&urls, "TELEMETRY", "telemetry.>", 3).await;
    let out = dir.path().join("out.json");
    // OK only once JetStream has stored a call's readings on a quorum.
    let mut ingest = SinkProcess::start(&ingest_with(&urls, "json", "acknowledge = \"written\""));
    let mut writer = SinkProcess::start(&writer(&urls, "files", "", &out));
    let mut client = ingest.client("sensors").await;

    let mut acknowledged = Vec::new();
    for call in 0..300 {
        if call == 100 {
            nodes[0].kill();
        }
        if call == 200 {
            nodes[0].restart();
        }
        // A whole buffered batch (`max_events = 100`): flushed at once.
        let request = request_range("c", call * 100..(call + 1) * 100);
        let names: Vec<String> = request
            .items
            .iter()
            .map(|i| i.sensor_name.clone())
            .collect();
        if client.send_sensor_values(request).await.is_ok() {
            acknowledged.extend(names);
        }
    }
    ingest.stop();
    if !wait_for_names(&out, &acknowledged) {
        let have: std::collections::BTreeSet<String> =
            sensor_names_so_far(&out).into_iter().collect();
        let missing = acknowledged.iter().filter(|name| !have.contains(*name));
        panic!(
            "{} of {} acknowledged readings are missing (first: {:?})\ningest log:\n{}\nwriter log:\n{}",
            missing.clone().count(),
            acknowledged.len(),
            missing.take(3).collect::<Vec<_>>(),
            ingest.log_text(),
            writer.log_text()
        );
    }
    writer.stop();
    assert!(
        acknowledged.len() >= 25_000,
        "most calls were acknowledged: {} of 30000",
        acknowledged.len()
    );
    // Publishes retried across the node's death are stored once (message
    // ids), and messages delivered again because the dead node held the
    // writer's acknowledgement are recognised by the writer (stream sequence).
    assert_each_once(&sensor_names_so_far(&out), &acknowledged);
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_killed_writer_is_refilled_by_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    let out = dir.path().join("out.json");
    let pipeline = writer(&urls, "files", "", &out);

    let mut ingest = SinkProcess::start(&ingest(&urls, "protobuf"));
    let mut client = ingest.client("sensors").await;
    let first = send_all(&mut client, "a", 50, 100).await;
    let mut writer = SinkProcess::start(&pipeline);
    assert!(
        wait_until(|| !sensor_names_so_far(&out).is_empty()),
        "the writer wrote nothing"
    );
    writer.signal(libc::SIGKILL);
    writer.wait_exit();
    let second = send_all(&mut client, "b", 50, 100).await;
    ingest.stop();

    let mut writer = SinkProcess::start(&pipeline);
    let all: Vec<String> = first.into_iter().chain(second).collect();
    assert!(
        wait_for_names(&out, &all),
        "redelivery did not fill the gap"
    );
    writer.stop();
    let written = sensor_names_so_far(&out);
    let unique: std::collections::BTreeSet<&String> = written.iter().collect();
    assert_eq!(unique.len(), all.len(), "nothing but the readings sent");
    // At least once: what the killed writer had written but not yet
    // acknowledged comes again, and nothing else does.
    let duplicates = written.len() - unique.len();
    assert!(
        duplicates <= 1000,
        "{duplicates} duplicates: more than a max_ack_pending's worth"
    );
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn nats_down_at_start_and_mid_run_delays_but_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Start the sinks before the server: they must come up and wait.
    let mut server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    server.stop();

    let out = dir.path().join("out.json");
    let mut ingest = SinkProcess::start(&ingest(&urls, "json"));
    assert!(
        ingest.wait_log("not reachable at startup"),
        "{}",
        ingest.log_text()
    );
    let mut writer = SinkProcess::start(&writer(&urls, "files", "", &out));
    let mut client = ingest.client("sensors").await;
    let before = send_all(&mut client, "down", 10, 10).await;

    server.restart();
    assert!(
        wait_for_names(&out, &before),
        "nothing flowed once NATS came up"
    );

    // A planned stop (its state on disk is whole); a crash is the cluster test's.
    server.stop();
    let during = send_all(&mut client, "mid", 10, 10).await;
    assert!(
        ingest.wait_log("not acknowledged by JetStream"),
        "{}",
        ingest.log_text()
    );
    server.restart();
    ingest.stop();
    let all: Vec<String> = before.into_iter().chain(during).collect();
    assert!(
        wait_for_names(&out, &all),
        "readings sent while NATS was down are missing"
    );
    writer.stop();
    assert_each_once(&sensor_names_so_far(&out), &all);
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_poison_message_is_terminated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, urls, js) = solo_with_stream(dir.path()).await;
    for payload in [&b"{not json"[..], &[0xff, 0xff, 0xff][..]] {
        js.publish("telemetry.poison", payload.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let out = dir.path().join("out.json");
    let api = "[api]\naddress = \"127.0.0.1:0\"\n";
    let mut writer = SinkProcess::start(&format!("{api}{}", writer(&urls, "files", "", &out)));
    let mut ingest = SinkProcess::start(&format!("{api}{}", ingest(&urls, "json")));
    let mut client = ingest.client("sensors").await;
    let sent = send_all(&mut client, "good", 5, 10).await;
    assert!(
        wait_for_names(&out, &sent),
        "good readings after the poison are missing"
    );
    // The metrics of both ends: every message published was delivered and
    // acknowledged once written; the two poison ones terminated.
    let published = ingest
        .metric("sink_nats_messages_published_total", &[("stage", "stream")])
        .expect("published");
    assert!(published >= 1.0);
    assert_eq!(
        ingest.metric("sink_nats_messages_too_large_total", &[]),
        Some(0.0)
    );
    let answered =
        |outcome| writer.metric("sink_nats_messages_answered_total", &[("outcome", outcome)]);
    assert!(
        wait_until(|| answered("ack").is_some_and(|acked| acked >= published)),
        "{:?} acknowledged of {published} published",
        answered("ack")
    );
    assert_eq!(answered("term"), Some(2.0));
    let received = writer
        .metric("sink_nats_messages_received_total", &[])
        .expect("received");
    let redelivered = writer
        .metric("sink_nats_messages_redelivered_total", &[])
        .expect("redelivered");
    assert_eq!(received, published + 2.0 + redelivered);
    ingest.stop();
    assert_eq!(
        writer.count_log("terminating a message that cannot be taken"),
        2,
        "{}",
        writer.log_text()
    );
    writer.stop();
    assert!(writer.log_text().contains(
        "2 messages that could not be taken (undecodable, or too large to hold) were terminated"
    ));
    assert_each_once(&sensor_names_so_far(&out), &sent);
    // Terminated, not redelivered: the consumer has nothing pending.
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("files").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

/// `ingest` (creating its stream) and `writer` with `keys` added to both
/// NATS stages.
fn ingest_and_writer_with(urls: &[String], out: &Path, keys: &str) -> (String, String) {
    let ingest = ingest(urls, "json").replace(
        "encoding = \"json\"",
        &format!("encoding = \"json\"\n{keys}\ncreate_stream = {{}}"),
    );
    let writer = writer(urls, "files", "", out)
        .replace("ack_wait = \"2s\"", &format!("ack_wait = \"2s\"\n{keys}"));
    (ingest, writer)
}

/// Readings through `ingest` and `writer` arrive in `out`, each once.
async fn round_trip(ingest: &str, writer: &str, out: &Path, prefix: &str) {
    let mut ingest = SinkProcess::start(ingest);
    let mut writer = SinkProcess::start(writer);
    let mut client = ingest.client("sensors").await;
    let sent = send_all(&mut client, prefix, 5, 20).await;
    ingest.stop();
    assert!(
        wait_for_names(out, &sent),
        "{prefix}: readings did not arrive; writer log:\n{}",
        writer.log_text()
    );
    writer.stop();
    assert_each_once(&sensor_names_so_far(out), &sent);
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn credentials_are_sent_and_wrong_ones_are_refused_at_startup() {
    let methods = [
        (
            "token",
            "authorization { token: \"s3cret\" }",
            "token = \"s3cret\"",
            "token = \"wrong\"",
        ),
        (
            "user",
            "authorization { user: sink, password: \"pw\" }",
            "user = \"sink\", password = \"pw\"",
            "user = \"sink\", password = \"nope\"",
        ),
    ];
    for (method, server_auth, good, bad) in methods {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start_with(dir.path(), method, None, &format!("{server_auth}\n"));
        let urls = vec![server.url()];
        let out = dir.path().join("out.json");
        let (refused, _) = ingest_and_writer_with(&urls, &out, &format!("auth = {{ {bad} }}"));
        let refused = run_sink(&refused, &[], &[]);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{method}: {}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains("key `auth`") && refused.stderr.contains("credentials refused"),
            "{method}: {}",
            refused.stderr
        );
        let (ingest, writer) = ingest_and_writer_with(&urls, &out, &format!("auth = {{ {good} }}"));
        round_trip(&ingest, &writer, &out, method).await;
    }
}

/// A NATS JWT of `claims` (the `nats` part), about `subject`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{name}-{subject}"),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{claims}");
    let signature = encode(&issuer.sign(signed.as_bytes()).expect("sign"));
    format!("{signed}.{signature}")
}

/// An operator-mode server config (operator, one account with JetStream,
/// preloaded) and a `.creds` file of a user of that account, as `nsc` makes them.
fn operator_and_creds(dir: &Path) -> (String, PathBuf) {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "telemetry",
        serde_json::json!({ "type": "account", "version": 2, "limits": unlimited }),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "sink",
        serde_json::json!({ "type": "user", "version": 2, "pub": {}, "sub": {},
                            "subs": -1, "data": -1, "payload": -1 }),
    );
    // JetStream needs a system account for its own traffic.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({ "type": "account", "version": 2 }),
    );
    let config = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: \"{account_jwt}\", {}: \"{system_jwt}\" }}\n",
        system.public_key(),
        account.public_key(),
        system.public_key()
    );
    let creds = dir.join("sink.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        ),
    )
    .expect("write creds");
    (config, creds)
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_creds_file_authenticates_and_a_foreign_one_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let (config, creds) = operator_and_creds(dir.path());
    let server = NatsServer::start_with(dir.path(), "operator", None, &config);
    let urls = vec![server.url()];
    let out = dir.path().join("out.json");

    // A user of another operator: well formed, not trusted by this server.
    let elsewhere = tempfile::tempdir().unwrap();
    let (_, foreign) = operator_and_creds(elsewhere.path());
    let (refused, _) = ingest_and_writer_with(
        &urls,
        &out,
        &format!("auth = {{ creds_file = \"{}\" }}", foreign.display()),
    );
    let refused = run_sink(&refused, &[], &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("key `auth`") && refused.stderr.contains("credentials refused"),
        "{}",
        refused.stderr
    );

    let (ingest, writer) = ingest_and_writer_with(
        &urls,
        &out,
        &format!("auth = {{ creds_file = \"{}\" }}", creds.display()),
    );
    round_trip(&ingest, &writer, &out, "creds").await;
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn mutual_tls_to_nats_carries_readings_and_a_missing_client_certificate_is_refused() {
    use sink_e2e::tls::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("nats test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let (server_cert, server_key) = ca.server(1, 30.0).write(dir.path(), "server");
    let (client_cert, client_key) = ca.client("sink").write(dir.path(), "client");
    let server = NatsServer::start_with(
        dir.path(),
        "tls",
        None,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n",
            server_cert.display(),
            server_key.display(),
            ca_file.display()
        ),
    );
    let urls = vec![server.url()];
    let out = dir.path().join("out.json");

    let no_client_certificate = format!("tls = {{ ca = \"{}\" }}", ca_file.display());
    let (refused, _) = ingest_and_writer_with(&urls, &out, &no_client_certificate);
    let refused = run_sink(&refused, &[], &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("key `tls`") && refused.stderr.contains("TLS"),
        "{}",
        refused.stderr
    );

    let mutual = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        ca_file.display(),
        client_cert.display(),
        client_key.display()
    );
    let (ingest, writer) = ingest_and_writer_with(&urls, &out, &mutual);
    round_trip(&ingest, &writer, &out, "mtls").await;
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn the_shipped_pipelines_scale_out_as_the_docs_say() {
    // docs/scale-out.md, as written: three Debian nats-server nodes, NATS_URL
    // naming all three in one comma list, the stream created by the ingest
    // pipeline itself (no `nats` CLI), replicated three times.
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path());
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    // A fresh cluster elects its leaders first; the sink's own stream
    // creation is then the first thing it is asked.
    create_stream(&urls, "WARMUP", "warmup.>", 3).await;
    let nats_url = urls.join(",");
    let read = |name: &str| std::fs::read_to_string(pipelines_dir().join(name)).expect("read");
    let mut ingest = SinkProcess::start_env(
        &read("ingest-to-nats.toml"),
        &[
            ("GRPC_ADDRESS", "127.0.0.1:0"),
            ("NATS_URL", &nats_url),
            ("NATS_REPLICAS", "3"),
        ],
    );
    let files = tempfile::tempdir().unwrap();
    let mut writer = SinkProcess::start_env(
        &read("nats-to-file.toml"),
        &[
            ("NATS_URL", &nats_url),
            ("FILE_PATH", &files.path().display().to_string()),
        ],
    );
    let mut client = ingest.client("sensors").await;
    // acknowledge = "written": an OK means stored in the stream.
    let sent = send_all(&mut client, "walk", 10, 20).await;
    let client = async_nats::connect(urls.clone()).await.expect("connect");
    let mut stream = jetstream::new(client)
        .get_stream("TELEMETRY")
        .await
        .expect("the ingest pipeline created the stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.num_replicas, 3, "{:?}", info.config);
    assert!(info.state.messages > 0, "{:?}", info.state);
    ingest.stop();
    let out = files.path().join("telemetry-sink.log.json");
    assert!(
        wait_for_names(&out, &sent),
        "readings did not arrive; writer log:\n{}",
        writer.log_text()
    );
    writer.stop();
    assert_each_once(&sensor_names_so_far(&out), &sent);
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn floats_and_labels_round_trip_through_jetstream_exactly_in_both_encodings() {
    use sink_proto::sensor_value::Measurement;
    use sink_proto::{SensorValue, SensorValuesRequest};

    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    let floats = [21.5, 3.0, 0.1, 1e21, -2.5, 5e-324, f64::MAX];
    for (round, encoding) in ["json", "protobuf"].into_iter().enumerate() {
        purge(&urls, "TELEMETRY").await;
        let out = dir.path().join(format!("labelled-{encoding}.json"));
        let mut ingest = SinkProcess::start(&ingest(&urls, encoding));
        let mut writer = SinkProcess::start(&writer(&urls, &format!("labelled{round}"), "", &out));
        let items: Vec<SensorValue> = floats
            .iter()
            .enumerate()
            .map(|(i, &value)| SensorValue {
                sensor_name: format!("{encoding}-float-{i}"),
                measurement: Some(Measurement {
                    sensor_value: None,
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_795_860_000,
                        nanos: 1_000,
                    }),
                    sensor_value_float: Some(value),
                }),
                labels: [
                    ("site".to_string(), format!("north-{i}")),
                    ("unit".to_string(), "°C".to_string()),
                    ("quote\"".to_string(), String::new()),
                ]
                .into(),
            })
            .chain(std::iter::once(SensorValue {
                sensor_name: format!("{encoding}-int"),
                measurement: Some(Measurement {
                    sensor_value: Some(i64::MIN),
                    ..Measurement::default()
                }),
                labels: [("a".to_string(), "b".to_string())].into(),
            }))
            .collect();
        let names: Vec<String> = items.iter().map(|i| i.sensor_name.clone()).collect();
        let mut client = ingest.client("sensors").await;
        client
            .send_sensor_values(SensorValuesRequest {
                items: items.clone(),
            })
            .await
            .expect("accepted");
        ingest.stop();
        assert!(wait_for_names(&out, &names), "not every reading arrived");
        writer.stop();
        let text = std::fs::read_to_string(&out).expect("written");
        for (i, float) in floats.iter().enumerate() {
            let line = text
                .lines()
                .find(|line| line.contains(&format!("\"{encoding}-float-{i}\"")))
                .expect("written");
            let prefix = format!(
                r#"{{"sensor_name":"{encoding}-float-{i}","labels":{{"quote\"":"","site":"north-{i}","unit":"°C"}},"sensor_value":"#
            );
            assert!(line.starts_with(&prefix), "{line}");
            let value = &line[prefix.len()..line.find(",\"created_at\"").expect("created_at")];
            assert_eq!(
                value.parse::<f64>().expect("a number").to_bits(),
                float.to_bits(),
                "{line}"
            );
            assert!(
                line.contains(r#""created_at":"2026-11-28T10:00:00.000001Z""#),
                "{line}"
            );
        }
        let int = text
            .lines()
            .find(|line| line.contains(&format!("\"{encoding}-int\"")))
            .expect("written");
        assert!(
            int.starts_with(&format!(
                r#"{{"sensor_name":"{encoding}-int","labels":{{"a":"b"}},"sensor_value":-9223372036854775808,"created_at":null,"#
            )),
            "{int}"
        );
    }
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_message_too_large_to_hold_is_terminated_not_redelivered_forever() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, urls, js) = solo_with_stream(dir.path()).await;
    // 1 MB of empty protobuf items: 500 000 readings, some 40 MB decoded,
    // against a memory_limit of 16 MiB.
    let huge: Vec<u8> = [0x0a, 0x00].repeat(500_000);
    js.publish("telemetry.huge", huge.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let good = sink_e2e::request("after", 3);
    js.publish(
        "telemetry.good",
        prost::Message::encode_to_vec(&good).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let out = dir.path().join("out.json");
    let mut writer = SinkProcess::start(&format!(
        "[settings]\nmemory_limit = \"16MiB\"\n[api]\naddress = \"127.0.0.1:0\"\n{}",
        writer(&urls, "files", "", &out)
    ));
    let expected: Vec<String> = good.items.iter().map(|i| i.sensor_name.clone()).collect();
    assert!(wait_for_names(&out, &expected), "{}", writer.log_text());
    let answered =
        |outcome| writer.metric("sink_nats_messages_answered_total", &[("outcome", outcome)]);
    assert!(
        wait_until(|| answered("term") == Some(1.0)),
        "{:?}; log:\n{}",
        answered("term"),
        writer.log_text()
    );
    // Past two ack_waits (2 s each), it has not come back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        writer.metric("sink_nats_messages_redelivered_total", &[]),
        Some(0.0),
        "{}",
        writer.log_text()
    );
    assert_eq!(answered("nak"), Some(0.0));
    assert!(
        writer
            .log_text()
            .contains("more than settings.memory_limit")
    );
    writer.stop();
    assert_each_once(&sensor_names_so_far(&out), &expected);
}

/// How many messages stream `name` holds now.
async fn stored_messages(urls: &[String], name: &str) -> u64 {
    let client = async_nats::connect(urls.to_vec()).await.unwrap();
    let mut stream = jetstream::new(client).get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_reading_too_large_for_the_server_is_never_acknowledged_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with(dir.path(), "solo", None, "max_payload: 8192\n");
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    let mut ingest = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        ingest_with(&urls, "json", "acknowledge = \"written\"")
    ));
    let mut client = ingest.client("sensors").await;
    // One reading of some 10 kB: ten labels of 1000 bytes.
    let mut big = request("big", 1);
    big.items[0].labels = (0..10)
        .map(|i| (format!("k{i}"), "v".repeat(1000)))
        .collect();
    let refused = client
        .send_sensor_values(big)
        .await
        .expect_err("a reading JetStream never stored was answered OK");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert_eq!(
        ingest.metric("sink_nats_messages_too_large_total", &[]),
        Some(1.0)
    );
    // The sink goes on.
    send_all(&mut client, "small", 1, 3).await;
    // One message per sensor (the subject names it): the three small ones.
    assert_eq!(stored_messages(&urls, "TELEMETRY").await, 3);
    ingest.stop();
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn a_subject_too_long_for_the_server_fails_its_call_and_wedges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    create_stream(&urls, "TELEMETRY", "telemetry.>", 1).await;
    let mut ingest = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        ingest_with(
            &urls,
            "json",
            "acknowledge = \"written\"\nlimits = { max_name_bytes = 8192 }"
        )
    ));
    let mut client = ingest.client("sensors").await;
    // A subject past the server's 4096-byte control line: the server would
    // drop the connection at each try.
    let mut long = request("long", 1);
    long.items[0].sensor_name = "n".repeat(5000);
    let refused = tokio::time::timeout(DEADLINE, client.send_sensor_values(long))
        .await
        .expect("answered")
        .expect_err("a reading JetStream never stored was answered OK");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert_eq!(
        ingest.metric("sink_nats_subjects_too_long_total", &[]),
        Some(1.0)
    );
    let names = tokio::time::timeout(DEADLINE, send_all(&mut client, "after", 3, 2))
        .await
        .expect("later calls are not wedged behind it");
    assert_eq!(names.len(), 6);
    assert!(ingest.log_text().contains("longer than a server takes"));
    ingest.stop();
}

#[tokio::test]
#[ignore = "system test: needs nats-server; run by .ci/system/50-nats.sh"]
async fn create_stream_creates_it_once_nats_comes_up_after_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path(), "solo", None);
    let urls = vec![server.url()];
    server.stop();
    let pipeline = ingest_with(&urls, "json", "acknowledge = \"written\"").replace(
        "encoding = \"json\"",
        "encoding = \"json\"\ncreate_stream = {}",
    );
    let mut ingest = SinkProcess::start(&pipeline);
    assert!(
        ingest.wait_log("not reachable at startup"),
        "{}",
        ingest.log_text()
    );
    server.restart();
    let mut client = ingest.client("sensors").await;
    let names = tokio::time::timeout(DEADLINE, send_all(&mut client, "late", 2, 5))
        .await
        .expect("written once NATS came up");
    assert_eq!(names.len(), 10);
    assert!(
        ingest
            .log_text()
            .contains("created JetStream stream `TELEMETRY`")
    );
    assert!(stored_messages(&urls, "TELEMETRY").await >= 1);
    ingest.stop();
}
