//! The grpc source under attack, through the real binary on loopback:
//! slowloris streams, announced-but-unsent messages, requests over the rate
//! limit, two messages in a unary call, compressed requests and bombs, too
//! many readings, too many or idle connections, a client's `grpc-timeout`,
//! and `accept` at the descriptor limit. Hand-crafted attacks go straight
//! over HTTP/2 (h2).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use prost::Message;
use sink_e2e::*;
use tonic::Code;

/// grpc (with `source` keys) -> buffered(max_events = 1) -> out.json.
fn pipeline_with_source(source: &str) -> String {
    [
        grpc("sensors", source),
        buffered("batch", &["sensors"], "max_events = 1"),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

/// An HTTP/2 connection to `address`, driven by its own task.
async fn h2_connect(address: SocketAddr) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (sender, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// One gRPC frame: the compression flag, the length, the message.
fn frame(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut framed = vec![u8::from(compressed)];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// The 5-byte prefix of a message of `len` bytes, with no message after it.
fn prefix_only(len: u32) -> Vec<u8> {
    let mut prefix = vec![0];
    prefix.extend_from_slice(&len.to_be_bytes());
    prefix
}

/// Starts a `SendSensorValues` call on `sender` with `grpc-encoding`
/// `encoding` (if any), sends `data`, and ends the request when `end`.
/// Returns the answer to come and the stream, which must be kept for the
/// request to stay open.
async fn start_call(
    sender: &SendRequest<Bytes>,
    encoding: Option<&'static str>,
    data: Vec<u8>,
    end: bool,
) -> (ResponseFuture, h2::SendStream<Bytes>) {
    let headers: &[_] = match encoding {
        Some(encoding) => &[("grpc-encoding", encoding)],
        None => &[],
    };
    start_call_with(sender, headers, data, end).await
}

/// [`start_call`] with any extra request `headers`.
async fn start_call_with(
    sender: &SendRequest<Bytes>,
    headers: &[(&'static str, &'static str)],
    data: Vec<u8>,
    end: bool,
) -> (ResponseFuture, h2::SendStream<Bytes>) {
    let mut sender = sender.clone().ready().await.expect("ready");
    let mut request = http::Request::builder()
        .method("POST")
        .uri("http://sink/sensor.v1.SensorService/SendSensorValues")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for &(name, value) in headers {
        request = request.header(name, value);
    }
    let (answer, mut stream) = sender
        .send_request(request.body(()).expect("request"), false)
        .expect("send request");
    stream.send_data(Bytes::from(data), end).expect("send data");
    (answer, stream)
}

/// The gRPC status of an answer: code and message, from the trailers or, for
/// a trailers-only answer, the headers.
async fn status_of(answer: ResponseFuture) -> (Code, String, http::HeaderMap) {
    let response = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer within the deadline")
        .expect("an HTTP/2 answer");
    let (head, mut body) = response.into_parts();
    let headers = if head.headers.contains_key("grpc-status") {
        head.headers
    } else {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        body.trailers()
            .await
            .expect("trailers")
            .expect("a trailer block")
    };
    let status = tonic::Status::from_header_map(&headers).expect("a grpc-status");
    (status.code(), status.message().to_owned(), headers)
}

/// Sends one whole call and returns its status.
async fn call(
    sender: &SendRequest<Bytes>,
    encoding: Option<&'static str>,
    data: Vec<u8>,
) -> (Code, String) {
    let (answer, _stream) = start_call(sender, encoding, data, true).await;
    let (code, message, _) = status_of(answer).await;
    (code, message)
}

#[tokio::test]
async fn slow_clients_holding_every_permit_do_not_starve_a_good_one() {
    let mut sink = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        pipeline_with_source("max_concurrent_calls = 4\nbody_timeout = \"1s\"")
    ));
    let address = sink.address("sensors");
    // Six attacking connections, each with 2 streams that announce a message
    // and send 1 byte of it (they would hold every permit forever), and 2
    // that send their headers and nothing else (a connection may open
    // max_concurrent_calls streams).
    let mut slow = Vec::new();
    for _ in 0..6 {
        let attacker = h2_connect(address).await;
        for _ in 0..2 {
            let mut data = prefix_only(100);
            data.push(0x0a);
            slow.push(start_call(&attacker, None, data, false).await);
            slow.push(start_call(&attacker, None, Vec::new(), false).await);
        }
    }

    let started = Instant::now();
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "good", 1, 10).await;
    let served_in = started.elapsed();
    // The 12 slow streams ahead of it hold the 4 permits for at most
    // body_timeout each: three rounds of 1 s.
    assert!(
        served_in < Duration::from_secs(10),
        "the good client waited {served_in:?}"
    );
    let refused = slow.len() as f64;
    for (answer, _stream) in slow {
        let (code, message, _) = status_of(answer).await;
        assert_eq!(code, Code::DeadlineExceeded, "{message}");
        assert!(message.contains("body_timeout"), "{message}");
    }
    // Each refusal counted, by code and by reason.
    assert_eq!(
        sink.metric("sink_grpc_calls_total", &[("code", "DEADLINE_EXCEEDED")]),
        Some(refused)
    );
    assert_eq!(
        sink.metric("sink_grpc_refusals_total", &[("reason", "body_timeout")]),
        Some(refused)
    );
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test]
async fn an_announced_message_reserves_no_memory_before_its_bytes_arrive() {
    const GIB: u32 = 1 << 30;
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "max_message_bytes = {GIB}\nbody_timeout = \"1s\""
    )));
    let address = sink.address("sensors");
    // A first call starts every thread the sink serves with.
    let mut client = sink.client("sensors").await;
    let mut names = send_all(&mut client, "before", 1, 3).await;
    let before = proc_status_kb(sink.pid(), "VmPeak");
    // Eight calls announce 1 GiB each and send nothing more: reserving the
    // announced size would add 8 GiB of address space.
    let attacker = h2_connect(address).await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        calls.push(start_call(&attacker, None, prefix_only(GIB - 1), false).await);
    }
    for (answer, _stream) in calls {
        let (code, message, _) = status_of(answer).await;
        assert_eq!(code, Code::DeadlineExceeded, "{message}");
    }
    let grown_mib = proc_status_kb(sink.pid(), "VmPeak").saturating_sub(before) / 1024;
    assert!(
        grown_mib < 1024,
        "peak virtual memory grew by {grown_mib} MiB for 40 bytes received"
    );
    names.extend(send_all(&mut client, "after", 1, 3).await);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test]
async fn over_the_rate_limit_a_call_is_refused_before_its_body_is_read() {
    let probe = request("rate", 500);
    let cost = encoded_len(&probe);
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "rate_limit = {{ bytes_per_second = 1, burst_bytes = {} }}\nbody_timeout = \"1h\"",
        cost + 100
    )));
    let address = sink.address("sensors");
    let attacker = h2_connect(address).await;

    // Over the burst: refused on the prefix alone, its body never sent.
    let (answer, _over_burst) =
        start_call(&attacker, None, prefix_only(cost as u32 + 101), false).await;
    let (code, message, _) = status_of(answer).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("can never pass"), "{message}");

    // Empty the bucket, then announce what no longer fits.
    let mut client = sink.client("sensors").await;
    client.send_sensor_values(probe).await.expect("first call");
    let mut refused = Vec::new();
    for _ in 0..8 {
        let (answer, stream) = start_call(&attacker, None, prefix_only(cost as u32), false).await;
        let (code, message, headers) = status_of(answer).await;
        assert_eq!(code, Code::ResourceExhausted, "{message}");
        assert!(
            headers.contains_key("grpc-status-details-bin"),
            "a RetryInfo: {headers:?}"
        );
        refused.push(stream);
    }
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 500);
}

#[tokio::test]
async fn a_unary_call_with_two_messages_is_refused_and_accepts_nothing() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let attacker = h2_connect(sink.address("sensors")).await;
    let mut data = frame(false, &request("first", 3).encode_to_vec());
    data.extend(frame(false, &request("second", 3).encode_to_vec()));
    let (code, message) = call(&attacker, None, data).await;
    assert_eq!(code, Code::Internal, "{message}");
    assert!(message.contains("one message"), "{message}");

    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "good", 1, 2).await;
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).expect("zstd")
}

/// A request of `count` readings, all named alike (it compresses well).
fn repetitive(prefix: &str, count: usize) -> Vec<u8> {
    let mut request = request(prefix, count);
    for item in &mut request.items {
        item.sensor_name = prefix.to_owned();
    }
    request.encode_to_vec()
}

#[tokio::test]
async fn gzip_and_zstd_requests_are_accepted_at_their_compressed_cost_and_bombs_refused() {
    let plain = repetitive("squeezed", 200);
    let packed = [gzip(&plain), zstd(&plain)];
    let largest = packed.iter().map(Vec::len).max().expect("two");
    assert!(largest * 2 < plain.len(), "{largest} of {}", plain.len());
    // The burst holds each compressed request, never the plain one.
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "rate_limit = {{ bytes_per_second = 1000000, burst_bytes = {largest} }}\nmax_message_bytes = {}",
        plain.len() + 10
    )));
    let attacker = h2_connect(sink.address("sensors")).await;
    for (encoding, packed) in ["gzip", "zstd"].into_iter().zip(&packed) {
        let (code, message) = call(&attacker, Some(encoding), frame(true, packed)).await;
        assert_eq!(code, Code::Ok, "{encoding}: {message}");
    }
    let (code, message) = call(&attacker, None, frame(false, &plain)).await;
    assert_eq!(code, Code::ResourceExhausted, "plain: {message}");
    assert!(message.contains("can never pass"), "{message}");

    sink.stop();
    let names = sensor_names(&sink.path("out.json"));
    assert_eq!(names.len(), 400);
    assert!(names.iter().all(|name| name == "squeezed"));
}

#[tokio::test]
async fn a_decompression_bomb_or_an_unknown_encoding_is_refused() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let attacker = h2_connect(sink.address("sensors")).await;
    // 16 MiB of zeros in a few kB, against max_message_bytes of 4 MiB.
    let zeros = vec![0u8; 16 << 20];
    let bombs = [("gzip", gzip(&zeros)), ("zstd", zstd(&zeros))];
    drop(zeros);
    let before = proc_status_kb(sink.pid(), "VmHWM");
    for (encoding, bomb) in &bombs {
        assert!(bomb.len() < 64 << 10, "{encoding} bomb of {}", bomb.len());
        let (code, message) = call(&attacker, Some(encoding), frame(true, bomb)).await;
        assert_eq!(code, Code::ResourceExhausted, "{encoding}: {message}");
        assert!(message.contains("decompresses to more"), "{message}");
    }
    let grown_mib = proc_status_kb(sink.pid(), "VmHWM").saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "resident memory grew by {grown_mib} MiB");
    let message = request("x", 1).encode_to_vec();
    let (code, status) = call(&attacker, Some("snappy"), frame(true, &gzip(&message))).await;
    assert_eq!(code, Code::Unimplemented, "{status}");
    let (code, status) = call(&attacker, None, frame(true, &gzip(&message))).await;
    assert_eq!(code, Code::Internal, "{status}");
    sink.stop();
    assert!(sensor_names(&sink.path("out.json")).is_empty());
}

#[tokio::test]
async fn a_call_over_max_readings_per_call_is_refused_whole() {
    let mut sink = SinkProcess::start(&pipeline_with_source("max_readings_per_call = 10"));
    let mut client = sink.client("sensors").await;
    let refused = client
        .send_sensor_values(request("many", 11))
        .await
        .expect_err("11 readings");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_readings_per_call"));
    let names = send_all(&mut client, "ten", 1, 10).await;
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test]
async fn idle_connections_close_and_free_their_slot_but_a_slow_call_is_not_idle() {
    let mut sink = SinkProcess::start(&pipeline_with_source(
        "max_connections = 2\nidle_timeout = \"500ms\"\nbody_timeout = \"10s\"",
    ));
    let address = sink.address("sensors");
    // Both slots taken by connections that never say a word.
    let mut idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    // The next client waits in the backlog until the idle ones are closed.
    let started = Instant::now();
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "patient", 1, 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "served after {:?}",
        started.elapsed()
    );
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let mut rest = Vec::new();
        // The server's preface, then the end: the sink closed it.
        stream.read_to_end(&mut rest).expect("closed by the sink");
    }
    drop(client);

    // A call whose body takes longer than idle_timeout keeps its connection.
    let slow = h2_connect(address).await;
    let message = request("slow", 2).encode_to_vec();
    let data = frame(false, &message);
    let (answer, mut stream) = start_call(&slow, None, data[..3].to_vec(), false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream
        .send_data(Bytes::copy_from_slice(&data[3..]), true)
        .expect("rest of the body");
    let (code, message, _) = status_of(answer).await;
    assert_eq!(code, Code::Ok, "{message}");

    sink.stop();
    let mut expected = names;
    expected.extend(["slow0".to_owned(), "slow1".to_owned()]);
    assert_each_once(&sensor_names(&sink.path("out.json")), &expected);
}

/// CPU time the process has used, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test]
async fn accept_at_the_descriptor_limit_backs_off_warns_once_and_recovers() {
    let mut sink = SinkProcess::start(&pipeline_with_source(
        "max_connections = 1000\nidle_timeout = \"1s\"",
    ));
    let address = sink.address("sensors");
    let pid = sink.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as u64;
    // Room for 10 more descriptors: the 11th accept fails with EMFILE.
    let limit = libc::rlimit {
        rlim_cur: open + 10,
        rlim_max: open + 10,
    };
    // SAFETY: prlimit on our own child with a valid rlimit; no old value read.
    let set = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    assert!(
        sink.wait_log("accepting a connection failed"),
        "no warning; log:\n{}",
        sink.log_text()
    );
    // At the limit the loop sleeps instead of spinning: well under a core.
    let (ticks, started) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let used = (cpu_ticks(pid) - ticks) as f64 / per_second / started.elapsed().as_secs_f64();
    assert!(used < 0.3, "{:.0}% of a core at EMFILE", used * 100.0);
    assert!(
        sink.count_log("accepting a connection failed") <= 2,
        "warnings are not rate-limited:\n{}",
        sink.log_text()
    );

    // Idle connections time out, which frees descriptors: a client is
    // served again, after those ahead of it in the backlog.
    let mut client = sink.client("sensors").await;
    let names = send_all(&mut client, "recovered", 1, 2).await;
    assert!(sink.wait_log("accepting connections again"));
    drop(idle);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

/// Asks for 4 MiB of send capacity on `stream`, waits until at least
/// `expected` bytes are granted (or `within` passes), and returns the grant.
async fn granted(stream: &mut h2::SendStream<Bytes>, expected: usize, within: Duration) -> usize {
    stream.reserve_capacity(4 << 20);
    let deadline = tokio::time::Instant::now() + within;
    while stream.capacity() < expected.max(1) {
        let more = std::future::poll_fn(|cx| stream.poll_capacity(cx));
        match tokio::time::timeout_at(deadline, more).await {
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    stream.capacity()
}

#[tokio::test]
async fn a_connection_can_push_at_most_512_kib_of_body_the_sink_has_not_read() {
    // What bounds the memory of calls waiting for a permit: the HTTP/2
    // windows the sink grants, 256 KiB per stream and 512 KiB per connection
    // (hyper's default was 1 MiB each), whatever the calls announce.
    let mut sink = SinkProcess::start(&pipeline_with_source("body_timeout = \"1h\""));
    let attacker = h2_connect(sink.address("sensors")).await;
    // Headers only: the sink reads nothing of these bodies yet.
    let (_a, mut first) = start_call(&attacker, None, Vec::new(), false).await;
    let (_b, mut second) = start_call(&attacker, None, Vec::new(), false).await;
    let (_c, mut third) = start_call(&attacker, None, Vec::new(), false).await;
    assert_eq!(granted(&mut first, 256 << 10, DEADLINE).await, 256 << 10);
    assert_eq!(granted(&mut second, 256 << 10, DEADLINE).await, 256 << 10);
    // The connection's window is spent: a third stream gets nothing.
    assert_eq!(granted(&mut third, 0, Duration::from_millis(300)).await, 0);
    sink.stop();
}

#[tokio::test]
async fn every_gzip_member_is_decoded_and_trailing_garbage_refused() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let attacker = h2_connect(sink.address("sensors")).await;
    // Concatenated protobuf messages merge: the two members together are one
    // request of four readings.
    let first = request_range("member", 0..2).encode_to_vec();
    let second = request_range("member", 2..4).encode_to_vec();
    let mut two = gzip(&first);
    two.extend(gzip(&second));
    let (code, message) = call(&attacker, Some("gzip"), frame(true, &two)).await;
    assert_eq!(code, Code::Ok, "{message}");
    let mut garbage = gzip(&request("garbage", 1).encode_to_vec());
    garbage.extend_from_slice(b"trailing garbage");
    let (code, message) = call(&attacker, Some("gzip"), frame(true, &garbage)).await;
    assert_eq!(code, Code::Internal, "{message}");
    sink.stop();
    let expected: Vec<String> = (0..4).map(|i| format!("member{i}")).collect();
    assert_each_once(&sensor_names(&sink.path("out.json")), &expected);
}

/// A compressed message's prefix with no message after it: the most
/// expensive announcement (its decoded size is bounded only by
/// `max_message_bytes`).
fn compressed_prefix_only(len: u32) -> Vec<u8> {
    let mut prefix = prefix_only(len);
    prefix[0] = 1;
    prefix
}

#[tokio::test]
async fn prefix_only_streams_cannot_take_the_memory_budget_from_honest_calls() {
    // Four compressed announcements would each reserve about 114 MB of the
    // default 256 MiB before a byte of their bodies arrived, for as long as
    // body_timeout lets them wait.
    let mut sink = SinkProcess::start(&pipeline_with_source("body_timeout = \"12s\""));
    let address = sink.address("sensors");
    let attacker = h2_connect(address).await;
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(start_call(&attacker, Some("gzip"), compressed_prefix_only(1000), false).await);
    }
    // Give the sink the time to take the announcements in.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut client = sink.client("sensors").await;
    let mut names = Vec::new();
    for round in 0..5 {
        let started = Instant::now();
        let batch = request(&format!("honest{round}-"), 10);
        names.extend(batch.items.iter().map(|item| item.sensor_name.clone()));
        let answered =
            tokio::time::timeout(Duration::from_secs(5), client.send_sensor_values(batch))
                .await
                .unwrap_or_else(|_| panic!("round {round}: no answer within 5 s under the attack"));
        answered.unwrap_or_else(|status| panic!("round {round}: {status}"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(
        health_of(address, "").await.expect("health"),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // Gone, the attacker's calls end (else shutdown would wait for them).
    drop(held);
    drop(attacker);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

/// Opens a health `Watch` stream on a connection of its own; `true` if the
/// server took it (answered with headers and no status yet).
async fn watch_health(address: SocketAddr) -> (bool, SendRequest<Bytes>, Option<h2::RecvStream>) {
    let sender = h2_connect(address).await;
    let mut ready = sender.clone().ready().await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri("http://sink/grpc.health.v1.Health/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut stream) = ready.send_request(request, false).expect("send");
    // An empty HealthCheckRequest (the whole server); the answer streams on.
    stream
        .send_data(Bytes::from(frame(false, &[])), true)
        .expect("data");
    let response = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer")
        .expect("HTTP/2 answer");
    let (head, body) = response.into_parts();
    if let Some(status) = head.headers.get("grpc-status") {
        assert_eq!(status, "8", "a refused watch is RESOURCE_EXHAUSTED");
        return (false, sender, None);
    }
    (true, sender, Some(body))
}

#[tokio::test]
async fn long_lived_health_watches_cannot_hold_every_connection_slot() {
    // 16 connections at most, so at most 2 long-lived streams.
    let mut sink = SinkProcess::start(&pipeline_with_source(
        "max_connections = 16\nidle_timeout = \"1s\"",
    ));
    let address = sink.address("sensors");
    let mut held = Vec::new();
    let mut taken = 0;
    for _ in 0..16 {
        let (accepted, sender, body) = watch_health(address).await;
        taken += usize::from(accepted);
        held.push((sender, body));
    }
    assert_eq!(
        taken, 2,
        "long-lived streams taken beyond max_connections / 8"
    );
    // The refused ones are idle connections now, closed after idle_timeout:
    // an honest client gets a slot although every watcher stays.
    let started = Instant::now();
    let mut client = sink.client("sensors").await;
    let names = tokio::time::timeout(
        Duration::from_secs(10),
        send_all(&mut client, "honest", 1, 3),
    )
    .await
    .expect("served while the watchers stay");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(held);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test]
async fn silent_connections_are_closed_and_bounded_so_honest_clients_get_in() {
    // idle_timeout alone would keep a silent connection a minute.
    let mut sink = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        pipeline_with_source("max_connections = 40\nidle_timeout = \"60s\"")
    ));
    let address = sink.address("sensors");
    // Five times max_connections of connections that never send a byte.
    let silent: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    let started = Instant::now();
    let mut client = sink.client("sensors").await;
    let names = tokio::time::timeout(
        Duration::from_secs(3),
        send_all(&mut client, "honest", 1, 3),
    )
    .await
    .expect("an honest client served within 3 s of 200 silent connections");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Beyond a quarter of max_connections, the oldest silent ones were closed.
    assert!(sink.wait_metric("sink_grpc_connections_half_open_closed_total", &[], 150.0) >= 150.0);
    drop(silent);

    // A silent connection is closed at the 5 s handshake deadline, not
    // after idle_timeout.
    let opened = Instant::now();
    let mut late = std::net::TcpStream::connect(address).expect("connect");
    late.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut rest = Vec::new();
    late.read_to_end(&mut rest).expect("closed by the sink");
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_secs(4) && closed_after < Duration::from_secs(8),
        "closed after {closed_after:?}"
    );
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test]
async fn a_call_past_its_grpc_timeout_is_answered_deadline_exceeded() {
    let mut sink = SinkProcess::start(&format!(
        "[api]\naddress = \"127.0.0.1:0\"\n{}",
        pipeline_with_source("body_timeout = \"1h\"")
    ));
    let sender = h2_connect(sink.address("sensors")).await;
    // A message announced and never sent: only the client's deadline ends
    // the call, long before body_timeout.
    let started = Instant::now();
    let (answer, _stream) = start_call_with(
        &sender,
        &[("grpc-timeout", "300m")],
        prefix_only(100),
        false,
    )
    .await;
    let (code, message, _) = status_of(answer).await;
    let waited = started.elapsed();
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("grpc-timeout"), "{message}");
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(5)).contains(&waited),
        "answered after {waited:?}"
    );
    assert_eq!(
        sink.metric("sink_grpc_calls_total", &[("code", "DEADLINE_EXCEEDED")]),
        Some(1.0)
    );
    // A deadline that is not reached, or that cannot be read, changes nothing.
    let mut names = Vec::new();
    for (timeout, name) in [("5S", "in-time"), ("soon", "malformed")] {
        let data = frame(false, &request(name, 1).encode_to_vec());
        let (answer, _stream) =
            start_call_with(&sender, &[("grpc-timeout", timeout)], data, true).await;
        let (code, message, _) = status_of(answer).await;
        assert_eq!(code, Code::Ok, "grpc-timeout {timeout}: {message}");
        names.extend(
            request(name, 1)
                .items
                .into_iter()
                .map(|item| item.sensor_name),
        );
    }
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}
