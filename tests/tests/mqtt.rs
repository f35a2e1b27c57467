//! The `mqtt` source against a real broker (Debian's `mosquitto`, started
//! here with persistence on): every payload kind and `topic_pattern` through
//! to json_file, poison messages beside good ones, the sink killed with
//! SIGKILL and the broker restarted mid-stream with nothing lost, QoS 0, TLS,
//! and a stalled pipeline staying within its memory limit. System tests:
//! `.ci/system/55-mqtt.sh` installs mosquitto and runs them
//! (`cargo test -p sink-e2e --test mqtt -- --ignored`).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sink_e2e::*;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};

/// A mosquitto broker on a free loopback port, its config and persistence
/// in a directory of the test's.
struct Mosquitto {
    child: Option<Child>,
    config: PathBuf,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

fn mosquitto_binary() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

impl Mosquitto {
    /// A broker that queues and sends in flight far more than the tests
    /// publish: mosquitto drops QoS 1 messages for an away client beyond
    /// `max_queued_messages`, which the no-loss guarantee needs unbounded.
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, "")
    }

    fn start_with(dir: &Path, listener_extra: &str) -> Self {
        let port = free_port();
        let store = dir.join("mosquitto-store/");
        std::fs::create_dir_all(&store).expect("store dir");
        let config = format!(
            "user root\n\
             per_listener_settings false\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}\n\
             autosave_interval 1\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages 1000\n\
             log_dest file {}\n\
             listener {port} 127.0.0.1\n{listener_extra}\n",
            store.display(),
            dir.join("mosquitto.log").display()
        );
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, config).expect("write mosquitto.conf");
        let mut broker = Self {
            child: None,
            config: path,
            port,
        };
        broker.restart();
        broker
    }

    /// Starts (again) on the same port and store.
    fn restart(&mut self) {
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed: run .ci/system/55-mqtt.sh");
        self.child = Some(child);
        assert!(
            wait_until(|| std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()),
            "mosquitto did not listen on {}",
            self.port
        );
    }

    /// Restarts with `from` replaced by `to` in its config.
    fn reconfigure(&mut self, from: &str, to: &str) {
        self.stop();
        let config = std::fs::read_to_string(&self.config).expect("read mosquitto.conf");
        assert!(config.contains(from), "{from:?} is not in mosquitto.conf");
        std::fs::write(&self.config, config.replace(from, to)).expect("write mosquitto.conf");
        self.restart();
    }

    /// SIGTERM: mosquitto saves its store and exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Publishes `messages` (topic, payload) at `qos` and returns once the
/// broker has acknowledged every one (at QoS 1; at QoS 0, once sent).
async fn publish(port: u16, messages: Vec<(String, Vec<u8>)>, qos: QoS) {
    publish_with(port, messages, qos, None).await
}

async fn publish_with(
    port: u16,
    messages: Vec<(String, Vec<u8>)>,
    qos: QoS,
    tls: Option<rumqttc::Transport>,
) {
    let mut options = MqttOptions::new(format!("publisher-{}", free_port()), "127.0.0.1", port);
    options
        .set_inflight(200)
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_keep_alive(Duration::from_secs(30));
    if let Some(transport) = tls {
        options.set_transport(transport);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let total = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, qos, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done < total {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("the broker acknowledged every message within 60 s");
        match event.expect("publisher connection") {
            Event::Incoming(Packet::PubAck(_)) if qos == QoS::AtLeastOnce => done += 1,
            Event::Outgoing(rumqttc::Outgoing::Publish(_)) if qos == QoS::AtMostOnce => done += 1,
            _ => {}
        }
    }
    let client = sender.await.expect("sender");
    let _ = client.disconnect().await;
    for _ in 0..10 {
        match eventloop.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            _ => {}
        }
    }
}

/// An `mqtt` source `field` with `extra` keys into a buffered processor and
/// json_file at `out` (absolute, so that a restarted sink appends to it),
/// with `[api]`.
fn pipeline(broker: &str, extra: &str, out: &Path) -> String {
    [
        "[api]\naddress = \"127.0.0.1:0\"\n".to_string(),
        stage(
            "sources",
            "field",
            "mqtt",
            &[],
            &format!("url = \"{broker}\"\n{extra}"),
        ),
        buffered(
            "batch",
            &["field"],
            "max_events = 500\nflush_interval = \"100ms\"",
        ),
        json_file("file", &["batch"], &out.display().to_string(), ""),
    ]
    .concat()
}

fn number_messages(prefix: &str, range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| (format!("{prefix}/s{i}"), i.to_string().into_bytes()))
        .collect()
}

/// How often each sensor name was written.
fn name_counts(path: &Path) -> HashMap<String, usize> {
    // Whole lines only: the sink may be writing one, or a kill cut one
    // short (the restarted sink removes it).
    let mut counts = HashMap::new();
    for name in sensor_names_so_far(path) {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

/// Waits until every one of `expected` names is in `path`.
fn wait_for_names(path: &Path, expected: &[String]) -> bool {
    wait_until_for(Duration::from_secs(60), || {
        let counts = name_counts(path);
        expected.iter().all(|name| counts.contains_key(name))
    })
}

fn wait_until_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// Starts `sink` on `pipeline` and waits until its `sources` mqtt sources
/// have subscribed: a broker keeps nothing for a subscription not made yet.
fn start_subscribed(pipeline: &str, sources: usize) -> SinkProcess {
    let sink = SinkProcess::start(pipeline);
    assert!(
        wait_until(|| sink.count_log("subscribed to") >= sources),
        "{}",
        sink.log_text()
    );
    sink
}

fn refused(sink: &SinkProcess, reason: &str) -> f64 {
    sink.metric("sink_mqtt_messages_refused_total", &[("reason", reason)])
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn every_payload_kind_and_topic_pattern_arrive_exact() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let out = dir.path().join("out.json");
    let sources = format!(
        "topics = [\"num/#\"]\nclient_id = \"t-number\"\ntopic_pattern = \"num/{{site}}/{{sensor_name}}\"\n{}",
        stage(
            "sources",
            "json",
            "mqtt",
            &[],
            &format!(
                "url = \"{}\"\ntopics = [\"js/+/+\"]\nclient_id = \"t-json\"\npayload = \"json\"\ntopic_pattern = \"js/{{site}}/{{sensor_name}}\"",
                broker.url()
            )
        ) + &stage(
            "sources",
            "proto",
            "mqtt",
            &[],
            &format!(
                "url = \"{}\"\ntopics = [\"pb/#\"]\nclient_id = \"t-proto\"\npayload = \"sensor.v1\"",
                broker.url()
            )
        )
    );
    let pipeline = pipeline(&broker.url(), &sources, &out).replace(
        "inputs = [\"field\"]",
        "inputs = [\"field\", \"json\", \"proto\"]",
    );
    let sink = start_subscribed(&pipeline, 3);
    let request = SensorValuesRequest {
        items: vec![SensorValue {
            sensor_name: "p1".into(),
            measurement: Some(Measurement {
                sensor_value: Some(-7),
                ..Default::default()
            }),
            ..Default::default()
        }],
    };
    publish(
        broker.port,
        vec![
            ("num/north/boiler-1".into(), b"21.5".to_vec()),
            ("num/south/boiler-2".into(), b"42".to_vec()),
            // Does not fit the pattern: counted, never written.
            ("num/too/many/levels".into(), b"1".to_vec()),
            (
                "js/east/j1".into(),
                br#"{"sensor_value":3,"labels":{"unit":"C"},"created_at":"2026-11-28T10:00:00Z"}"#.to_vec(),
            ),
            (
                "js/east/ignored".into(),
                br#"[{"sensor_name":"j2","labels":{"site":"own"},"sensor_value":1e3},{"sensor_name":"j3","sensor_value":null}]"#.to_vec(),
            ),
            ("pb/node-1".into(), request.encode_to_vec()),
        ],
        QoS::AtLeastOnce,
    )
    .await;
    let names: Vec<String> = ["boiler-1", "boiler-2", "j1", "j2", "j3", "p1"]
        .map(String::from)
        .to_vec();
    assert!(wait_for_names(&out, &names), "{:?}", name_counts(&out));
    let lines: HashMap<String, serde_json::Value> = json_lines(&out)
        .into_iter()
        .map(|line| (line["sensor_name"].as_str().unwrap().to_string(), line))
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let shape = |name: &str| {
        let mut line = lines[name].clone();
        let object = line.as_object_mut().unwrap();
        assert!(object.remove("received_at").unwrap().is_string());
        line.to_string()
    };
    assert_eq!(
        shape("boiler-1"),
        r#"{"sensor_name":"boiler-1","labels":{"site":"north"},"sensor_value":21.5,"created_at":null}"#
    );
    assert_eq!(
        shape("boiler-2"),
        r#"{"sensor_name":"boiler-2","labels":{"site":"south"},"sensor_value":42,"created_at":null}"#
    );
    assert_eq!(
        shape("j1"),
        r#"{"sensor_name":"j1","labels":{"site":"east","unit":"C"},"sensor_value":3,"created_at":"2026-11-28T10:00:00Z"}"#
    );
    assert_eq!(
        shape("j2"),
        r#"{"sensor_name":"j2","labels":{"site":"own"},"sensor_value":1000.0,"created_at":null}"#
    );
    assert_eq!(
        shape("j3"),
        r#"{"sensor_name":"j3","labels":{"site":"east"},"sensor_value":null,"created_at":null}"#
    );
    assert_eq!(
        shape("p1"),
        r#"{"sensor_name":"p1","sensor_value":-7,"created_at":null}"#
    );
    assert_eq!(refused(&sink, "topic_mismatch"), 1.0);
    assert_eq!(
        sink.metric(
            "sink_mqtt_messages_acknowledged_total",
            &[("stage", "field")]
        ),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn poison_messages_are_counted_acknowledged_and_never_stall_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    // One message in flight at a time: a poison message left unacknowledged
    // would stall the session for good.
    broker.reconfigure("max_inflight_messages 1000", "max_inflight_messages 1");
    let out = dir.path().join("out.json");
    let sink = start_subscribed(
        &pipeline(
            &broker.url(),
            "topics = [\"p/#\"]\nclient_id = \"t-poison\"\npayload = \"json\"\ntopic_pattern = \"p/{sensor_name}\"\nmax_payload_bytes = \"1KiB\"\nacknowledge = \"written\"",
            &out,
        ),
        1,
    );
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("p/a", b"not json".to_vec()),
        ("p/b", br#"{"sensor_value":"#.to_vec()),
        ("p/c", br#"{"sensor_value":1e999}"#.to_vec()),
        (
            "p/d",
            format!(
                r#"{{"sensor_value":1,"labels":{{"{}":"v"}}}}"#,
                "k".repeat(200)
            )
            .into_bytes(),
        ),
        ("p/e", vec![b' '; 2048]),
        ("p/f/g", br#"{"sensor_value":1}"#.to_vec()),
        ("p/h", br#"{"sensor_value":1,"surprise":true}"#.to_vec()),
    ];
    let mut messages = Vec::new();
    let mut good = Vec::new();
    for round in 0..20 {
        for (topic, payload) in &poison {
            messages.push((topic.to_string(), payload.clone()));
        }
        let name = format!("good{round}");
        messages.push((format!("p/{name}"), br#"{"sensor_value":1}"#.to_vec()));
        good.push(name);
    }
    publish(broker.port, messages, QoS::AtLeastOnce).await;
    assert!(wait_for_names(&out, &good), "{:?}", name_counts(&out));
    assert!(wait_until(|| refused(&sink, "bad_json") >= 80.0));
    // a, b, h, and c: serde_json refuses 1e999 as out of range.
    assert_eq!(refused(&sink, "bad_json"), 80.0);
    assert_eq!(refused(&sink, "out_of_bounds"), 20.0);
    assert_eq!(refused(&sink, "too_large"), 20.0);
    assert_eq!(refused(&sink, "topic_mismatch"), 20.0);
    assert_eq!(name_counts(&out).len(), 20);
    // Logged at most every 10 s, not once per message.
    assert!(
        sink.count_log("refused a message") <= 2,
        "{}",
        sink.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn a_sink_killed_mid_stream_loses_nothing_the_broker_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let out = dir.path().join("out.json");
    let pipeline = pipeline(
        &broker.url(),
        "topics = [\"k/#\"]\nclient_id = \"t-kill\"\nacknowledge = \"written\"",
        &out,
    )
    .replace("path = ", "fsync = true\npath = ")
    // A buffer that holds a second of readings when the sink dies: each
    // one lost unless its message was left unacknowledged.
    .replace("max_events = 500", "max_events = 100000")
    .replace("flush_interval = \"100ms\"", "flush_interval = \"1s\"");
    let mut sink = start_subscribed(&pipeline, 1);
    const TOTAL: usize = 20_000;
    let expected: Vec<String> = (0..TOTAL).map(|i| format!("k/s{i}")).collect();
    // A first half, written; then the second, with the sink killed once it
    // has taken 2 000 of it into its buffer.
    publish(
        broker.port,
        number_messages("k", 0..TOTAL / 2),
        QoS::AtLeastOnce,
    )
    .await;
    assert!(wait_for_names(&out, &expected[..TOTAL / 2]));
    let publisher = tokio::spawn(publish(
        broker.port,
        number_messages("k", TOTAL / 2..TOTAL),
        QoS::AtLeastOnce,
    ));
    assert!(wait_until(|| sink
        .metric("sink_mqtt_messages_received_total", &[])
        .unwrap_or(0.0)
        >= (TOTAL / 2 + 2_000) as f64));
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(sink.pid() as i32, libc::SIGKILL) };
    sink.wait_exit();
    let before = name_counts(&out).len();
    assert!(
        before <= TOTAL - 2_000,
        "the sink was killed after writing {before}"
    );
    // The broker keeps the session's messages while the sink is away, and
    // its subscription: the restarted sink resumes it.
    let sink = SinkProcess::start(&pipeline);
    publisher
        .await
        .expect("every message accepted by the broker");
    assert!(wait_for_names(&out, &expected), "missing some of {TOTAL}");
    let counts = name_counts(&out);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // Duplicates are messages written but not yet acknowledged when the
    // sink died: the broker delivers exactly those again, flagged DUP.
    let redelivered = sink
        .metric("sink_mqtt_messages_redelivered_total", &[])
        .unwrap();
    eprintln!(
        "killed after {before} of {TOTAL} written; {duplicates} written twice, {redelivered} delivered again"
    );
    assert!(
        duplicates as f64 <= redelivered,
        "{duplicates} duplicates but only {redelivered} messages delivered again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn a_broker_restarted_mid_stream_loses_nothing_and_readiness_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let out = dir.path().join("out.json");
    // Slow writes keep messages in flight when the broker goes.
    let pipeline = pipeline(
        &broker.url(),
        "topics = [\"r/#\"]\nclient_id = \"t-restart\"\nacknowledge = \"written\"\nkeepalive = \"5s\"",
        &out,
    )
    .replace("flush_interval = \"100ms\"", "flush_interval = \"1s\"");
    let sink = start_subscribed(&pipeline, 1);
    assert_eq!(ready(&sink).0, 200);
    publish(broker.port, number_messages("r", 0..3000), QoS::AtLeastOnce).await;
    broker.stop();
    assert!(wait_until(|| ready(&sink).0 == 503), "{:?}", ready(&sink));
    assert!(ready(&sink).1.contains("MQTT broker"), "{:?}", ready(&sink));
    assert_eq!(sink.metric("sink_mqtt_connected", &[]), Some(0.0));
    broker.restart();
    assert!(wait_until_for(Duration::from_secs(15), || ready(&sink).0 == 200));
    publish(
        broker.port,
        number_messages("r", 3000..6000),
        QoS::AtLeastOnce,
    )
    .await;
    let expected: Vec<String> = (0..6000).map(|i| format!("r/s{i}")).collect();
    assert!(
        wait_for_names(&out, &expected),
        "{} of 6000",
        name_counts(&out).len()
    );
    assert!(sink.metric("sink_mqtt_connections_total", &[]).unwrap() >= 2.0);
}

fn ready(sink: &SinkProcess) -> (u16, String) {
    sink::top::fetch(&sink.api_address(), "/ready", None).expect("GET /ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn a_persistent_session_keeps_what_arrives_while_the_sink_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let out = dir.path().join("out.json");
    let pipeline = pipeline(
        &broker.url(),
        "topics = [\"s/#\"]\nclient_id = \"t-session\"",
        &out,
    );
    let mut sink = start_subscribed(&pipeline, 1);
    sink.stop();
    publish(broker.port, number_messages("s", 0..500), QoS::AtLeastOnce).await;
    let _sink = SinkProcess::start(&pipeline);
    let expected: Vec<String> = (0..500).map(|i| format!("s/s{i}")).collect();
    assert!(wait_for_names(&out, &expected));
    assert_eq!(name_counts(&out).values().sum::<usize>(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn qos_0_arrives_without_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let out = dir.path().join("out.json");
    let sink = start_subscribed(
        &pipeline(
            &broker.url(),
            "topics = [\"z/#\"]\nclient_id = \"t-qos0\"\nqos = 0\nclean_session = true",
            &out,
        ),
        1,
    );
    publish(broker.port, number_messages("z", 0..200), QoS::AtLeastOnce).await;
    let expected: Vec<String> = (0..200).map(|i| format!("z/s{i}")).collect();
    assert!(wait_for_names(&out, &expected));
    assert_eq!(
        sink.metric("sink_mqtt_messages_acknowledged_total", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn a_stuck_pipeline_stays_within_memory_limit_and_the_broker_holds_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let pipeline = format!(
        "[settings]\nmemory_limit = \"1MiB\"\n[api]\naddress = \"127.0.0.1:0\"\n{}{}",
        stage(
            "sources",
            "field",
            "mqtt",
            &[],
            &format!(
                "url = \"{}\"\ntopics = [\"m/#\"]\nclient_id = \"t-memory\"\npayload = \"json\"",
                broker.url()
            )
        ),
        stage(
            "sinks",
            "stuck",
            "blackhole",
            &["field"],
            "delay_per_batch = \"1h\""
        ),
    );
    let sink = start_subscribed(&pipeline, 1);
    // 30 MB of readings, 30 times the limit.
    let label = "v".repeat(900);
    let payload = format!(r#"{{"sensor_value":1,"labels":{{"k":"{label}"}}}}"#).into_bytes();
    let messages: Vec<(String, Vec<u8>)> = (0..30_000)
        .map(|i| (format!("m/s{i}"), payload.clone()))
        .collect();
    publish(broker.port, messages, QoS::AtLeastOnce).await;
    assert!(wait_until(|| {
        sink.metric("sink_memory_reserved_bytes", &[])
            .unwrap_or(0.0)
            > 0.0
    }));
    // Every message is at the broker now; a second in which a source that
    // did not stop reading would take in the rest.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = sink
        .metric("sink_mqtt_messages_received_total", &[])
        .unwrap();
    let reserved = sink.metric("sink_memory_reserved_bytes", &[]).unwrap();
    assert!(reserved <= (1 << 20) as f64, "{reserved} bytes reserved");
    assert!(
        received < 5_000.0,
        "{received} messages taken from the broker by a stuck pipeline"
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", sink.pid())).unwrap();
    let hwm: u64 = rss
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(hwm < 100 << 10, "peak RSS {hwm} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn mqtts_with_a_private_ca_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server = server_params.signed_by(&server_key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_path = write("ca.pem", ca.pem());
    let cert_path = write("server.pem", server.pem());
    let key_path = write("server.key", server_key.serialize_pem());
    let broker = Mosquitto::start_with(
        dir.path(),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            ca_path.display(),
            cert_path.display(),
            key_path.display()
        ),
    );
    let out = dir.path().join("out.json");
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let _sink = start_subscribed(
        &pipeline(
            &url,
            &format!(
                "topics = [\"t/#\"]\nclient_id = \"t-tls\"\ntls = {{ ca = \"{}\" }}",
                ca_path.display()
            ),
            &out,
        ),
        1,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let transport =
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config.into()));
    publish_with(
        broker.port,
        number_messages("t", 0..50),
        QoS::AtLeastOnce,
        Some(transport),
    )
    .await;
    let expected: Vec<String> = (0..50).map(|i| format!("t/s{i}")).collect();
    assert!(wait_for_names(&out, &expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn credentials_from_a_password_file_and_a_refusal_named_in_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&users)
        .args(["sensor-sink", "s3cret"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
    let mut broker = Mosquitto::start(dir.path());
    broker.reconfigure(
        "allow_anonymous true",
        &format!("allow_anonymous false\npassword_file {}", users.display()),
    );
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "wrong\n").unwrap();
    let out = dir.path().join("out.json");
    let sink = SinkProcess::start(&pipeline(
        &broker.url(),
        &format!(
            "topics = [\"c/#\"]\nclient_id = \"t-creds\"\nusername = \"sensor-sink\"\npassword_file = \"{}\"",
            secret.display()
        ),
        &out,
    ));
    assert!(
        wait_until(|| ready(&sink).1.contains("refused")),
        "{:?}",
        ready(&sink)
    );
    assert_eq!(ready(&sink).0, 503);
    // Read again on the next attempt: a rotated secret needs no restart.
    std::fs::write(&secret, "s3cret\n").unwrap();
    assert!(wait_until_for(Duration::from_secs(15), || sink
        .count_log("subscribed to")
        == 1));
    assert_eq!(ready(&sink).0, 200);
    let mut options = MqttOptions::new("c-publisher", "127.0.0.1", broker.port);
    options.set_credentials("sensor-sink", "s3cret");
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish("c/t1", QoS::AtLeastOnce, false, b"7".to_vec())
        .await
        .unwrap();
    loop {
        match eventloop.poll().await.expect("publisher") {
            Event::Incoming(Packet::PubAck(_)) => break,
            _ => continue,
        }
    }
    assert!(wait_for_names(&out, &["c/t1".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: .ci/system/55-mqtt.sh"]
async fn a_list_of_brokers_moves_past_one_that_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let down = format!("mqtt://127.0.0.1:{}", free_port());
    let out = dir.path().join("out.json");
    let sink = start_subscribed(
        &pipeline(&down, "topics = [\"l/#\"]\nclient_id = \"t-list\"", &out).replace(
            &format!("url = \"{down}\""),
            &format!("url = [\"{down}\", \"{}\"]", broker.url()),
        ),
        1,
    );
    assert!(sink.log_text().contains(&format!("MQTT broker {down}")));
    publish(broker.port, number_messages("l", 0..10), QoS::AtLeastOnce).await;
    let expected: Vec<String> = (0..10).map(|i| format!("l/s{i}")).collect();
    assert!(wait_for_names(&out, &expected));
}
