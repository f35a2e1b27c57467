//! Log rotation: json_file follows a file renamed or deleted under it (as
//! logrotate's default `create` mode does) and keeps every reading; and its
//! own rotation, retention and compression keep every acknowledged reading
//! in exactly one file, through load, reloads and a kill.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sink_e2e::*;

#[tokio::test]
async fn a_renamed_or_deleted_file_is_followed_with_nothing_lost() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    let out = sink.path("out.json");

    client
        .send_sensor_values(request_range("r", 0..10))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 10));
    std::fs::rename(&out, sink.path("out.json.1")).expect("rotate by rename");

    client
        .send_sensor_values(request_range("r", 10..20))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 10), "no new file after the rename");
    assert!(sink.wait_log("was moved or deleted"));
    std::fs::remove_file(&out).expect("rotate by delete");

    client
        .send_sensor_values(request_range("r", 20..25))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 5), "no new file after the delete");
    sink.stop();

    let rotated = sensor_names(&sink.path("out.json.1"));
    let current = sensor_names(&out);
    assert_eq!(rotated.len(), 10);
    assert_eq!(
        current,
        (20..25).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
}

/// `(client, number)` of a name `c<client>-<number>`.
fn client_and_number(name: &str) -> (String, usize) {
    let (client, number) = name.split_once('-').expect("c<k>-<i>");
    (client.to_string(), number.parse().expect("number"))
}

#[tokio::test]
async fn size_rotation_under_load_keeps_every_acknowledged_reading_once() {
    const CLIENTS: usize = 4;
    const CALLS: usize = 1_000;
    const PER_CALL: usize = 50;
    const MAX_BYTES: usize = 64 * 1024;
    let data = tempfile::tempdir().expect("temp dir");
    let path = data.path().join("out.json");
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 100"),
        json_file(
            "file",
            &["batch"],
            &path.display().to_string(),
            "rotate = { max_bytes = \"64KiB\" }\ncompression = \"zstd\"",
        ),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    let senders: Vec<_> = (0..CLIENTS)
        .map(|k| {
            tokio::spawn(async move {
                let mut client = connect(address).await;
                send_all(&mut client, &format!("c{k}-"), CALLS, PER_CALL).await
            })
        })
        .collect();
    let mut sent = Vec::new();
    for sender in senders {
        sent.extend(sender.await.expect("sender"));
    }
    assert_eq!(sent.len(), 200_000);
    sink.stop();

    let written = names_across(data.path(), "out.json");
    assert_each_once(&written, &sent);
    // Rotated names sort in time order: each client's readings come in the
    // order it sent them across all files.
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    for name in &written {
        let (client, number) = client_and_number(name);
        if let Some(previous) = last.insert(client, number) {
            assert!(number > previous, "{name} after number {previous}");
        }
    }
    // Each rotated file reached the limit and went past it by at most one
    // batch (100 readings of under 150 bytes).
    let rotated: Vec<String> = listing(data.path())
        .into_iter()
        .filter(|name| name != "out.json" && !name.ends_with(".tmp"))
        .collect();
    assert!(rotated.len() > 100, "{} rotated files", rotated.len());
    for name in &rotated {
        let size = decompressed(&data.path().join(name)).len();
        assert!(
            (MAX_BYTES..MAX_BYTES + 100 * 150).contains(&size),
            "{name}: {size} bytes"
        );
    }
}

#[tokio::test]
async fn sigkill_during_compression_loses_nothing_and_the_next_start_finishes_it() {
    let data = tempfile::tempdir().expect("temp dir");
    let path = data.path().join("out.json");
    // A large file to rotate, so that its compression takes a while.
    let mut before = String::new();
    let mut expected = Vec::new();
    for i in 0..150_000 {
        let name = format!("pre{i}");
        before.push_str(&format!(
            "{{\"sensor_name\":\"{name}\",\"sensor_value\":{i},\"created_at\":null,\"received_at\":\"2026-12-01T00:00:00Z\"}}\n"
        ));
        expected.push(name);
    }
    std::fs::write(&path, before).expect("seed");
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        json_file(
            "file",
            &["batch"],
            &path.display().to_string(),
            "rotate = { max_bytes = \"1MiB\" }\ncompression = \"gzip\"",
        ),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    expected.extend(send_all(&mut client, "new", 1, 10).await);
    let compressing = || {
        listing(data.path())
            .iter()
            .any(|name| name.ends_with(".gz.tmp"))
    };
    assert!(
        wait_until(|| compressing() && sensor_names_so_far(&path).len() == 10),
        "never saw the compression running; files: {:?}",
        listing(data.path())
    );
    sink.signal(libc::SIGKILL);
    sink.wait_exit();
    assert!(compressing(), "the kill came too late to test anything");

    let mut restarted = SinkProcess::start(&pipeline);
    assert!(
        wait_until(|| no_plain_rotated_or_temporary(data.path(), "out.json")),
        "the restart did not finish the compression: {:?}",
        listing(data.path())
    );
    restarted.stop();
    assert_each_once(&names_across(data.path(), "out.json"), &expected);
}

// Several threads: the sender runs while this test blocks in `wait_until`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_turns_rotation_on_changes_it_and_switches_compression_with_nothing_lost() {
    let data = tempfile::tempdir().expect("temp dir");
    let path = data.path().join("out.json");
    let base = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 20"),
        json_file("file", &["batch"], &path.display().to_string(), ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&base);
    let address = sink.address("sensors");
    let running = Arc::new(AtomicBool::new(true));
    let sender = {
        let running = Arc::clone(&running);
        tokio::spawn(async move {
            let mut client = connect(address).await;
            let mut sent = Vec::new();
            let mut call = 0;
            while running.load(Ordering::Relaxed) {
                sent.extend(send_all(&mut client, &format!("r{call}-"), 1, 10).await);
                call += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        })
    };
    for keys in [
        "rotate = { max_bytes = \"16KiB\" }",
        "rotate = { max_bytes = \"8KiB\" }\ncompression = \"gzip\"",
        "rotate = { max_bytes = \"8KiB\", every = \"1h\" }\ncompression = \"zstd\"",
    ] {
        let applied = sink.count_log("reload applied");
        let text = base.replace(
            &format!("path = \"{}\"\n", path.display()),
            &format!("path = \"{}\"\n{keys}\n", path.display()),
        );
        assert_ne!(text, base);
        std::fs::write(sink.path("pipeline.toml"), text).expect("rewrite");
        assert!(
            wait_until(|| sink.count_log("reload applied") > applied),
            "{}",
            sink.log_text()
        );
        // Let some files rotate under these keys.
        let rotated = listing(data.path()).len();
        assert!(wait_until(|| listing(data.path()).len() > rotated + 2));
    }
    running.store(false, Ordering::Relaxed);
    let sent = sender.await.expect("sender");
    assert!(wait_until(|| no_plain_rotated_or_temporary(
        data.path(),
        "out.json"
    )));
    sink.stop();
    let files = listing(data.path());
    assert!(files.iter().any(|name| name.ends_with(".gz")), "{files:?}");
    assert!(files.iter().any(|name| name.ends_with(".zst")), "{files:?}");
    assert_each_once(&names_across(data.path(), "out.json"), &sent);
}

/// grpc -> buffered(max_events = 1) -> json_file at `path` with `extra`.
fn file_pipeline(path: &std::path::Path, extra: &str) -> String {
    [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        json_file("file", &["batch"], &path.display().to_string(), extra),
    ]
    .concat()
}

#[tokio::test]
async fn housekeeping_never_follows_a_link_out_of_its_directory() {
    let data = tempfile::tempdir().expect("temp dir");
    let outside = tempfile::tempdir().expect("temp dir");
    let secret = outside.path().join("secret.json");
    std::fs::write(&secret, "not the sink's\n").expect("seed");
    // An older rotated-style name that is a link out of the directory, and
    // a real rotated file of ours.
    let link = data.path().join("out-2026-01-01T00-00-00.000Z.json");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    let ours = "out-2026-01-02T00-00-00.000Z.json";
    std::fs::write(data.path().join(ours), "{\"sensor_name\":\"old\"}\n").expect("seed");
    let mut sink = SinkProcess::start(&file_pipeline(
        &data.path().join("out.json"),
        "rotate = { max_bytes = \"1MiB\" }\nretain = { max_files = 1 }\ncompression = \"gzip\"",
    ));
    // The pass at startup compresses ours...
    assert!(
        wait_until(|| listing(data.path()).contains(&format!("{ours}.gz"))),
        "{:?}",
        listing(data.path())
    );
    sink.stop();
    // ...and neither retains nor compresses the link, nor reads its target.
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("the link is still there")
            .file_type()
            .is_symlink()
    );
    assert!(
        !listing(data.path())
            .iter()
            .any(|name| name.starts_with("out-2026-01-01")
                && name != "out-2026-01-01T00-00-00.000Z.json"),
        "{:?}",
        listing(data.path())
    );
    assert_eq!(listing(outside.path()), ["secret.json"]);
    assert_eq!(
        std::fs::read_to_string(&secret).expect("target"),
        "not the sink's\n"
    );
}

#[tokio::test]
async fn a_rotated_file_dated_in_the_future_is_redated_and_expires_by_age() {
    let data = tempfile::tempdir().expect("temp dir");
    // Rotated while the clock was years ahead.
    let future = "out-2030-01-01T00-00-00.000Z.json";
    std::fs::write(
        data.path().join(future),
        "{\"sensor_name\":\"from-the-future\"}\n",
    )
    .expect("seed");
    let mut sink = SinkProcess::start(&file_pipeline(
        &data.path().join("out.json"),
        "rotate = { max_bytes = \"1KiB\" }\nretain = { max_age = \"2s\" }",
    ));
    assert!(
        wait_until(|| !listing(data.path()).iter().any(|name| name == future)),
        "never renamed: {:?}",
        listing(data.path())
    );
    assert!(sink.wait_log("dated in the future"));
    let holds_it = || {
        listing(data.path()).iter().any(|name| {
            std::fs::read_to_string(data.path().join(name))
                .is_ok_and(|text| text.contains("from-the-future"))
        })
    };
    assert!(
        holds_it(),
        "renamed, not removed yet: {:?}",
        listing(data.path())
    );
    // Rotations (each followed by a pass) until max_age has passed for it.
    let mut client = sink.client("sensors").await;
    let mut round = 0;
    let started = std::time::Instant::now();
    while holds_it() {
        assert!(
            started.elapsed() < DEADLINE,
            "never removed by max_age: {:?}",
            listing(data.path())
        );
        send_all(&mut client, &format!("r{round}-"), 1, 20).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sink.stop();
}
