//! TLS and mutual TLS on the grpc source, through the real binary, with
//! certificates made in the test (rcgen): the data path, health and
//! reflection over TLS; plaintext and uncertified or foreign clients refused
//! and counted while good ones are served; certificates rotated under a
//! client that keeps its connection; and every bad file refused at startup
//! naming the key, the file and the reason.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sink_e2e::tls::{Issued, TestCa, presented_certificate, tls_channel};
use sink_e2e::*;
use sink_proto::sensor_service_client::SensorServiceClient;
use tonic::transport::Channel;

/// The basic pipeline with `tls` set on its grpc source.
fn tls_pipeline(tls: &str) -> String {
    [
        grpc("sensors", &format!("tls = {{ {tls} }}\n")),
        buffered(
            "batch",
            &["sensors"],
            "max_events = 10\nflush_interval = \"100ms\"",
        ),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

/// `cert = "..", key = ".."` for files written by `Issued::write`.
fn cert_and_key(cert: &Path, key: &Path) -> String {
    format!("cert = \"{}\", key = \"{}\"", cert.display(), key.display())
}

/// The count of failed handshakes the source reports when it stops.
fn failed_handshakes(sink: &SinkProcess) -> u64 {
    let text = sink.log_text();
    let line = text
        .lines()
        .find(|line| line.contains("TLS handshakes failed"))
        .unwrap_or_else(|| panic!("no handshake count at shutdown; log:\n{text}"));
    let before = line.split(" TLS handshakes failed").next().unwrap_or("");
    before
        .rsplit(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("unreadable count in {line}"))
}

async fn send_ok(client: &mut SensorServiceClient<Channel>, prefix: &str, count: usize) {
    client
        .send_sensor_values(request(prefix, count))
        .await
        .unwrap_or_else(|status| panic!("{prefix}: {status}"));
}

#[tokio::test]
async fn tls_serves_data_health_and_reflection_and_refuses_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let mut sink = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        tls_pipeline(&cert_and_key(&cert, &key))
    ));
    let address = sink.address("sensors");
    assert!(sink.log_text().contains("(TLS)"), "{}", sink.log_text());

    let channel = tls_channel(address, &ca, None).await.expect("TLS connect");
    let mut client = SensorServiceClient::new(channel.clone());
    send_ok(&mut client, "tls-", 10).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    let health = health_on(channel.clone(), sink_proto::SERVICE_NAME).await;
    assert_eq!(health.expect("health over TLS"), ServingStatus::Serving);
    let services = reflected_services_on(channel).await;
    assert!(
        services.iter().any(|s| s == sink_proto::SERVICE_NAME),
        "{services:?}"
    );

    // A plaintext client gets no answer at all; the server serves on.
    let plain = async {
        let channel = Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .map_err(|err| err.to_string())?;
        SensorServiceClient::new(channel)
            .send_sensor_values(request("plain-", 1))
            .await
            .map_err(|status| status.to_string())
    };
    assert!(plain.await.is_err(), "a plaintext call went through");
    send_ok(&mut client, "after-", 5).await;
    assert!(
        sink.wait_log("the client did not speak TLS"),
        "{}",
        sink.log_text()
    );
    // Refused and counted, by reason.
    let failed = |reason| {
        sink.metric(
            "sink_grpc_tls_handshake_failures_total",
            &[("reason", reason)],
        )
    };
    assert!(
        failed("not_tls").is_some_and(|n| n >= 1.0),
        "{:?}",
        failed("not_tls")
    );
    assert_eq!(failed("no_client_certificate"), Some(0.0));

    sink.stop();
    let mut names = sensor_names(&sink.path("out.json"));
    names.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("tls-{i}")).collect();
    expected.extend((0..5).map(|i| format!("after-{i}")));
    expected.sort();
    assert_eq!(names, expected);
    assert!(failed_handshakes(&sink) >= 1);
}

#[tokio::test]
async fn mutual_tls_refuses_uncertified_and_foreign_clients_while_serving_a_good_one() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("client CA");
    let other = TestCa::new("someone else's CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let client_ca = ca.write(certs.path(), "ca.crt");
    // At debug level: after the first, failures within 10 s are logged there.
    let pipeline = tls_pipeline(&format!(
        "{}, client_ca = \"{}\"",
        cert_and_key(&cert, &key),
        client_ca.display()
    ));
    let mut sink = SinkProcess::start(&format!("[settings]\nlog_level = \"debug\"\n{pipeline}"));
    let address = sink.address("sensors");

    // The good client sends throughout, on one connection.
    let good = ca.client("sensor-1");
    let channel = tls_channel(address, &ca, Some(&good))
        .await
        .expect("mTLS connect");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut client = SensorServiceClient::new(channel);
            let mut call = 0;
            while !stop.load(Ordering::Relaxed) || call < 3 {
                send_ok(&mut client, &format!("good-{call}-"), 10).await;
                sent.fetch_add(10, Ordering::Relaxed);
                call += 1;
            }
            call
        })
    };

    // Refused: no certificate, and a certificate from another CA. Under TLS
    // 1.3 the client may believe it connected; its first call then fails.
    let stranger = other.client("intruder");
    for client in [None, Some(&stranger)] {
        let refused = async {
            let channel = tls_channel(address, &ca, client)
                .await
                .map_err(|err| err.to_string())?;
            SensorServiceClient::new(channel)
                .send_sensor_values(request("bad-", 1))
                .await
                .map_err(|status| status.to_string())
        };
        assert!(
            refused.await.is_err(),
            "a client without a valid certificate got through"
        );
    }
    assert!(sink.wait_log("sent no certificate"), "{}", sink.log_text());
    assert!(
        sink.wait_log("the client's certificate was refused"),
        "{}",
        sink.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    let calls = sender.await.expect("good client");

    sink.stop();
    let names = sensor_names(&sink.path("out.json"));
    assert_eq!(names.len(), sent.load(Ordering::Relaxed));
    assert_eq!(names.len(), calls * 10);
    assert!(names.iter().all(|name| name.starts_with("good-")));
    assert!(failed_handshakes(&sink) >= 2);
}

/// Replaces `to` by renaming `from` over it, as an editor or a Secret update does.
fn rename_over(issued: &Issued, dir: &Path, stem: &str) {
    let (staged_cert, staged_key) = issued.write(dir, &format!(".{stem}.new"));
    std::fs::rename(staged_key, dir.join(format!("{stem}.key"))).expect("rename key");
    std::fs::rename(staged_cert, dir.join(format!("{stem}.crt"))).expect("rename cert");
}

#[tokio::test]
async fn certificates_rotate_under_an_open_connection_and_a_broken_one_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    let first_ca = TestCa::new("first CA");
    let first = first_ca.server(1, 365.0);
    let (cert, key) = first.write(certs.path(), "server");
    let mut sink = SinkProcess::start(&tls_pipeline(&cert_and_key(&cert, &key)));
    let address = sink.address("sensors");
    assert_eq!(
        presented_certificate(address, &first_ca, None).await,
        first.der
    );

    // This client trusts only the first CA: were its connection made again
    // after the rotation, it would fail. So every call of it that succeeds
    // after the rotation went over the connection opened before it.
    let channel = tls_channel(address, &first_ca, None)
        .await
        .expect("TLS connect");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut client = SensorServiceClient::new(channel);
            let mut call = 0;
            while !stop.load(Ordering::Relaxed) {
                send_ok(&mut client, &format!("held-{call}-"), 10).await;
                call += 1;
            }
            call
        })
    };

    // The new certificate comes from another CA, so that which one a
    // connection got is beyond doubt.
    let second_ca = TestCa::new("second CA");
    let second = second_ca.server(2, 365.0);
    rename_over(&second, certs.path(), "server");
    assert!(
        sink.wait_log("TLS material reloaded"),
        "{}",
        sink.log_text()
    );
    assert_eq!(
        presented_certificate(address, &second_ca, None).await,
        second.der
    );
    let reloaded = sink
        .log_lines()
        .into_iter()
        .find(|line| line.contains("TLS material reloaded"))
        .expect("reload line");
    assert!(reloaded.contains("serial 02"), "{reloaded}");

    // A broken replacement: refused with a WARN naming the file; the
    // second certificate stays.
    let staged = certs.path().join(".broken.crt");
    std::fs::write(
        &staged,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::rename(&staged, &cert).unwrap();
    assert!(
        sink.wait_log("TLS material not reloaded"),
        "{}",
        sink.log_text()
    );
    let refused = sink
        .log_lines()
        .into_iter()
        .find(|line| line.contains("TLS material not reloaded"))
        .expect("refusal line");
    assert!(refused.contains("WARN"), "{refused}");
    assert!(refused.contains(&cert.display().to_string()), "{refused}");
    assert!(refused.contains("unparsable PEM"), "{refused}");
    assert!(refused.contains("serial 02"), "{refused}");
    assert_eq!(
        presented_certificate(address, &second_ca, None).await,
        second.der
    );

    stop.store(true, Ordering::Relaxed);
    let calls = sender.await.expect("the held connection kept working");
    assert!(calls > 0);
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), calls * 10);
}

#[test]
fn tls_on_or_off_needs_a_restart_but_other_files_apply_live() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "one");
    let second = ca.server(2, 365.0);
    let (cert2, key2) = second.write(certs.path(), "two");
    let mut sink = SinkProcess::start(&tls_pipeline(&cert_and_key(&cert, &key)));
    let address = sink.address("sensors");
    let pipeline = sink.path("pipeline.toml");
    let text = std::fs::read_to_string(&pipeline).unwrap();

    let tls_line = text
        .lines()
        .find(|line| line.starts_with("tls = "))
        .expect("tls line")
        .to_string();
    std::fs::write(&pipeline, text.replace(&tls_line, "")).unwrap();
    assert!(
        sink.wait_log("key `tls` cannot be removed while running"),
        "{}",
        sink.log_text()
    );

    std::fs::write(
        &pipeline,
        text.replace(&cert.display().to_string(), &cert2.display().to_string())
            .replace(&key.display().to_string(), &key2.display().to_string()),
    )
    .unwrap();
    assert!(sink.wait_log("reload applied"), "{}", sink.log_text());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let presented = runtime.block_on(async {
        let mut presented = Vec::new();
        for _ in 0..200 {
            presented = presented_certificate(address, &ca, None).await;
            if presented == second.der {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        presented
    });
    assert_eq!(presented, second.der, "{}", sink.log_text());
    sink.stop();
}

/// Runs the sink on `tls` and expects it to refuse to start with an error
/// naming `key`, `file` and `reason`.
#[track_caller]
fn assert_tls_refused(tls: &str, key: &str, file: &Path, reason: &str) {
    let run = run_sink(&tls_pipeline(tls), &[], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    let file = file.display().to_string();
    assert!(
        run.stderr
            .lines()
            .any(|line| line.starts_with("error: pipeline.toml")
                && line.contains(&format!("`{key}`"))
                && line.contains(&file)
                && line.contains(reason)),
        "no error naming `{key}`, {file} and {reason:?}:\n{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn bad_tls_files_refuse_the_start_naming_key_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(dir.path(), "good");
    let (_, other_key) = ca.server(2, 365.0).write(dir.path(), "other");
    let missing = dir.path().join("missing.crt");
    assert_tls_refused(
        &cert_and_key(&missing, &key),
        "tls.cert",
        &missing,
        "cannot read",
    );

    assert_tls_refused(
        &cert_and_key(&cert, &other_key),
        "tls.key",
        &other_key,
        "does not match the certificate",
    );

    let garbled = dir.path().join("garbled.crt");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert_tls_refused(
        &cert_and_key(&garbled, &key),
        "tls.cert",
        &garbled,
        "unparsable PEM",
    );

    let (expired, expired_key) = ca.server(3, -0.5).write(dir.path(), "expired");
    assert_tls_refused(
        &cert_and_key(&expired, &expired_key),
        "tls.cert",
        &expired,
        "expired on",
    );

    // A key where the key file should be.
    assert_tls_refused(
        &format!(
            "{}, client_ca = \"{}\"",
            cert_and_key(&cert, &key),
            key.display()
        ),
        "tls.client_ca",
        &key,
        "no certificate in it",
    );
    assert_tls_refused(
        &cert_and_key(&cert, &cert),
        "tls.key",
        &cert,
        "no private key in it",
    );
}

#[test]
fn a_certificate_near_expiry_is_warned_about_with_the_days_left() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 5.5).write(dir.path(), "server");
    let mut sink = SinkProcess::start(&tls_pipeline(&cert_and_key(&cert, &key)));
    assert!(sink.wait_log("expires in 5 days"), "{}", sink.log_text());
    sink.stop();
}

#[test]
fn sink_health_asks_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let ca_file = ca.write(certs.path(), "ca.crt");
    let (client_cert, client_key) = ca.client("probe").write(certs.path(), "client");
    let mut sink = SinkProcess::start(&tls_pipeline(&format!(
        "{}, client_ca = \"{}\"",
        cert_and_key(&cert, &key),
        ca_file.display()
    )));
    let address = sink.address("sensors").to_string();
    let health = |extra: &[&std::path::Path]| {
        let mut command = std::process::Command::new(sink_binary());
        command.args(["health", "--address", &address, "--tls-ca"]);
        command.arg(&ca_file);
        if let [cert, key] = extra {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        command.output().expect("run sink health")
    };
    let good = health(&[&client_cert, &client_key]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("SERVING"));
    let refused = health(&[]);
    assert_eq!(refused.status.code(), Some(1));
    sink.stop();
}

#[tokio::test]
async fn clients_that_never_finish_the_handshake_are_cut_off_while_others_are_served() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let tls = format!(
        "{}, handshake_timeout = \"300ms\"",
        cert_and_key(&cert, &key)
    );
    let mut sink = SinkProcess::start(&tls_pipeline(&tls));
    let address = sink.address("sensors");

    // Twenty clients connect and never say a word; one more sends half a
    // ClientHello header and stops.
    let mut stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    let mut partial = std::net::TcpStream::connect(address).expect("connect");
    std::io::Write::write_all(&mut partial, &[0x16, 0x03]).expect("write");
    stalled.push(partial);

    let channel = tls_channel(address, &ca, None).await.expect("TLS connect");
    let mut client = SensorServiceClient::new(channel);
    send_ok(&mut client, "served-", 10).await;

    // Each stalled connection is closed by the server: reading it ends.
    for stream in &mut stalled {
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        let closed = match std::io::Read::read(stream, &mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "a stalled handshake was not cut off");
    }
    send_ok(&mut client, "after-", 5).await;

    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 15);
    assert!(failed_handshakes(&sink) >= 21, "{}", sink.log_text());
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_refused_at_start_and_on_rotation() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (early, early_key) = ca.server_not_yet_valid(9, 2.0).write(certs.path(), "early");
    assert_tls_refused(
        &cert_and_key(&early, &early_key),
        "tls.cert",
        &early,
        "not valid before",
    );

    let first = ca.server(1, 365.0);
    let (cert, key) = first.write(certs.path(), "server");
    let mut sink = SinkProcess::start(&tls_pipeline(&cert_and_key(&cert, &key)));
    let address = sink.address("sensors");
    // Swapped in, it would fail every new client for two days.
    rename_over(&ca.server_not_yet_valid(2, 2.0), certs.path(), "server");
    assert!(
        sink.wait_log("TLS material not reloaded"),
        "{}",
        sink.log_text()
    );
    assert!(
        sink.log_text().contains("not valid before"),
        "{}",
        sink.log_text()
    );
    assert_eq!(presented_certificate(address, &ca, None).await, first.der);
    let channel = tls_channel(address, &ca, None).await.expect("TLS connect");
    send_ok(&mut SensorServiceClient::new(channel), "kept", 3).await;
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 3);
}

#[tokio::test]
async fn removing_client_ca_by_reload_is_refused_and_mutual_tls_stays_on() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let ca_file = ca.write(certs.path(), "ca.crt");
    let client = ca.client("good");
    let mut sink = SinkProcess::start(&tls_pipeline(&format!(
        "{}, client_ca = \"{}\"",
        cert_and_key(&cert, &key),
        ca_file.display()
    )));
    let address = sink.address("sensors");
    let pipeline = sink.path("pipeline.toml");
    let text = std::fs::read_to_string(&pipeline).unwrap();
    let loosened = text.replace(&format!(", client_ca = \"{}\"", ca_file.display()), "");
    assert_ne!(loosened, text);
    std::fs::write(&pipeline, loosened).unwrap();
    assert!(
        sink.wait_log("reload refused for tls.client_ca"),
        "{}",
        sink.log_text()
    );
    let refusal = sink
        .log_lines()
        .into_iter()
        .find(|line| line.contains("reload refused for tls.client_ca"))
        .expect("refusal line");
    assert!(refusal.contains("ERROR"), "{refusal}");
    // Give the TLS upkeep the time to act on what it was handed: a client
    // without a certificate must still be refused on a new connection.
    assert!(
        sink.wait_log("TLS material reloaded (pipeline reload)"),
        "{}",
        sink.log_text()
    );
    let uncertified = match tls_channel(address, &ca, None).await {
        Ok(channel) => SensorServiceClient::new(channel)
            .send_sensor_values(request("sneaky", 1))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(uncertified, "a client without a certificate got in");
    let channel = tls_channel(address, &ca, Some(&client))
        .await
        .expect("TLS connect");
    send_ok(&mut SensorServiceClient::new(channel), "good", 2).await;
    sink.stop();
    assert_each_once(
        &sensor_names(&sink.path("out.json")),
        &["good0".to_owned(), "good1".to_owned()],
    );
}
