//! The `buffered` processor alone, on tokio's paused clock: time moves only
//! when every task waits, so "nothing came out within the interval" is exact,
//! not a hopeful sleep.

use std::sync::Arc;
use std::time::Duration;

use sink_api::testkit::{Harness, check_processor, readings};
use sink_api::{BuildContext, Context, Output, ProcessorConfig, ShutdownSignal};
use sink_stages::processors::buffered::BufferedConfig;

fn config(max_events: usize, flush_interval: Duration) -> BufferedConfig {
    BufferedConfig {
        max_events,
        flush_interval,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const SECOND: Duration = Duration::from_secs(1);

/// Returns once every task is idle: on the paused clock, time only advances
/// then, so the stage has taken everything sent to it.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn names(batch: &[sink_api::Reading]) -> Vec<&str> {
    batch.iter().map(|r| r.sensor_name.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn size_flush_forwards_the_whole_buffer_once_it_reaches_max_events() {
    let mut stage = Harness::processor(config(5, HOUR)).expect("builds");
    stage.send(readings("a", 0..3)).await;
    assert!(
        stage.next_batch(SECOND).await.is_none(),
        "flushed below max_events"
    );
    stage.send(readings("a", 3..5)).await;
    let batch = stage.next_batch(SECOND).await.expect("a size flush");
    assert_eq!(names(&batch), ["a0", "a1", "a2", "a3", "a4"]);
    // A batch larger than max_events goes out whole, not split.
    stage.send(readings("b", 0..7)).await;
    assert_eq!(stage.next_batch(SECOND).await.expect("flush").len(), 7);
    assert!(stage.finish().await.expect("ends").is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_interval_ticks_periodically() {
    let mut stage = Harness::processor(config(1000, 10 * SECOND)).expect("builds");
    stage.send(readings("t", 0..3)).await;
    assert!(stage.next_batch(9 * SECOND).await.is_none(), "ticked early");
    assert_eq!(stage.next_batch(2 * SECOND).await.expect("tick").len(), 3);
    stage.send(readings("u", 0..2)).await;
    assert_eq!(
        stage
            .next_batch(11 * SECOND)
            .await
            .expect("next tick")
            .len(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_size_flush_restarts_the_tick() {
    let mut stage = Harness::processor(config(5, 10 * SECOND)).expect("builds");
    tokio::time::sleep(6 * SECOND).await;
    stage.send(readings("s", 0..5)).await;
    assert_eq!(stage.next_batch(SECOND).await.expect("size flush").len(), 5);
    stage.send(readings("s", 5..6)).await;
    // The tick first due at 10 s now falls 10 s after the size flush (at 16 s).
    assert!(
        stage.next_batch(8 * SECOND).await.is_none(),
        "the tick was not restarted"
    );
    assert_eq!(stage.next_batch(3 * SECOND).await.expect("tick").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn input_close_alone_forwards_what_is_held() {
    // Built by hand: the test kit's finish() would also start shutdown.
    let config = config(1000, HOUR);
    let processor = config.build(&BuildContext::new("test")).expect("builds");
    let (input_sender, input) = sink_api::channel(4);
    let (output_sender, mut output) = sink_api::channel(4);
    let shutdown = ShutdownSignal::new();
    let (cx, _params) = Context::new("test", shutdown.clone(), Arc::new(config));
    let task = tokio::spawn(processor.run(input, Output::new(vec![output_sender]), cx));
    let upstream = Output::new(vec![input_sender]);
    upstream.send(readings("c", 0..3)).await.expect("send");
    drop(upstream);
    task.await.expect("no panic").expect("ends cleanly");
    assert!(!shutdown.is_triggered());
    assert_eq!(output.recv().await.expect("the held batch").len(), 3);
    assert!(output.recv().await.is_none(), "more than one batch");
}

#[tokio::test(start_paused = true)]
async fn shutdown_alone_forwards_what_is_held_while_input_is_still_open() {
    let mut stage = Harness::processor(config(1000, HOUR)).expect("builds");
    stage.send(readings("d", 0..3)).await;
    // Held by the stage, not still in its channel, when shutdown starts.
    settle().await;
    stage.shutdown();
    assert_eq!(
        stage
            .next_batch(SECOND)
            .await
            .expect("shutdown flush")
            .len(),
        3
    );
    // Readings still arriving (sources finishing their calls) are drained.
    stage.send(readings("d", 3..5)).await;
    assert_eq!(stage.finish().await.expect("ends").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn lowering_max_events_below_what_is_held_flushes_at_once() {
    let mut stage = Harness::processor(config(10, HOUR)).expect("builds");
    stage.send(readings("m", 0..3)).await;
    assert!(stage.next_batch(SECOND).await.is_none());
    stage.update(config(2, HOUR));
    assert_eq!(
        stage
            .next_batch(SECOND)
            .await
            .expect("flush on update")
            .len(),
        3
    );
    // The new size applies from then on.
    stage.send(readings("n", 0..2)).await;
    assert_eq!(stage.next_batch(SECOND).await.expect("size flush").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_flush_interval_is_scheduled_from_the_change() {
    let mut stage = Harness::processor(config(1000, 10 * SECOND)).expect("builds");
    stage.send(readings("i", 0..2)).await;
    // 7 s into the old 10 s period, the interval becomes 5 s: the old tick
    // (3 s away) must not fire; the next flush is 5 s after the change.
    assert!(stage.next_batch(7 * SECOND).await.is_none(), "ticked early");
    stage.update(config(1000, 5 * SECOND));
    assert!(
        stage.next_batch(4 * SECOND).await.is_none(),
        "flushed on the old schedule"
    );
    assert_eq!(stage.next_batch(2 * SECOND).await.expect("tick").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn nothing_held_means_nothing_sent() {
    let mut stage = Harness::processor(config(3, SECOND)).expect("builds");
    // Many ticks on an empty buffer.
    assert!(
        stage.next_batch(10 * SECOND).await.is_none(),
        "an empty batch"
    );
    stage.send(readings("e", 0..3)).await;
    assert_eq!(stage.next_batch(SECOND).await.expect("size flush").len(), 3);
    // Ticks right after a size flush find the buffer empty.
    assert!(
        stage.next_batch(10 * SECOND).await.is_none(),
        "an empty batch"
    );
    stage.shutdown();
    assert!(stage.finish().await.expect("ends").is_empty());
}

#[tokio::test(start_paused = true)]
async fn passes_the_processor_conformance_check() {
    check_processor(config(10, SECOND), |_| true).await;
    check_processor(config(1000, HOUR), |_| true).await;
    check_processor(config(1, HOUR), |_| true).await;
}

#[test]
fn refuses_zero_values() {
    let err = config(0, SECOND).validate().expect_err("max_events = 0");
    assert_eq!(err.key, "max_events");
    let err = config(1, Duration::ZERO)
        .validate()
        .expect_err("flush_interval = 0");
    assert_eq!(err.key, "flush_interval");
    let err = config(1, Duration::from_nanos(1))
        .validate()
        .expect_err("flush_interval = 1ns");
    assert!(err.message.contains("at least 10ms"), "{err}");
    config(1, Duration::from_millis(10))
        .validate()
        .expect("10ms is fine");
}

#[test]
fn refuses_an_interval_the_timer_cannot_count() {
    let err = config(1, Duration::from_secs(400 * 24 * 3600))
        .validate()
        .expect_err("flush_interval of 400 days");
    assert_eq!(err.key, "flush_interval");
    config(1, Duration::from_secs(365 * 24 * 3600))
        .validate()
        .expect("a year is fine");
}
