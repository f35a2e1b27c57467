//! Each trigger of the buffered stage, alone, through the real binary: a
//! trigger is shown by readings reaching the file while the others cannot fire.
//! (Input close alone cannot be had from the binary, where inputs close only at
//! shutdown; crates/sink-stages/tests/buffered.rs covers it, and shutdown.rs
//! covers chained buffers draining at shutdown.)

use sink_e2e::*;

#[tokio::test]
async fn size_flushes_once_the_buffer_holds_max_events() {
    // One line per batch, so an early flush would show as a second line.
    let pipeline = basic_pipeline("max_events = 5\nflush_interval = \"1h\"").replace(
        "path = \"out.json\"",
        "path = \"out.json\"\nlayout = \"batch\"",
    );
    let mut sink = SinkProcess::start(&pipeline);
    let out = sink.path("out.json");
    let mut client = sink.client("sensors").await;
    // Three of five, and the tick is an hour away: nothing may be written yet.
    send_all(&mut client, "a", 1, 3).await;
    client
        .send_sensor_values(request_range("a", 3..5))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 1), "no flush at max_events");
    sink.stop();
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "flushed before max_events was reached");
    assert_eq!(lines[0]["messageCount"], 5);
}

#[tokio::test]
async fn a_short_interval_flushes_what_is_held_again_and_again() {
    let mut sink = SinkProcess::start(&basic_pipeline(
        "max_events = 1000\nflush_interval = \"200ms\"",
    ));
    let out = sink.path("out.json");
    let mut client = sink.client("sensors").await;
    let first = send_all(&mut client, "t", 1, 3).await;
    assert!(wait_for_lines(&out, 3), "the tick did not flush");
    assert_each_once(&sensor_names(&out), &first);
    // The tick is periodic: a later reading goes out on a later tick.
    let mut all = first;
    all.extend(send_all(&mut client, "u", 1, 2).await);
    assert!(wait_for_lines(&out, 5), "the second tick did not flush");
    assert_each_once(&sensor_names(&out), &all);
    sink.stop();
}

#[tokio::test]
async fn shutdown_flushes_a_buffer_that_neither_size_nor_tick_would() {
    let mut sink = SinkProcess::start(&basic_pipeline(
        "max_events = 1000\nflush_interval = \"1m\"",
    ));
    let out = sink.path("out.json");
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "s", 3, 3).await;
    assert!(json_lines(&out).is_empty(), "flushed with no trigger");
    sink.stop();
    assert_each_once(&sensor_names(&out), &sent);
    assert!(sink.wait_log("shut down cleanly"));
}
