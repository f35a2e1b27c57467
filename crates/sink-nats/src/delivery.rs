//! A JetStream message's way through the pipeline: reserve its memory, send
//! its readings with an acknowledgement token, and learn whether every sink
//! wrote them.

use sink_api::{Batch, Context, Delivery, Output, Reading, Token};

/// Sends `batch` on, holding its memory in the pipeline's budget, and returns
/// what resolves to whether every sink it reaches wrote it (`false` also when
/// it could not be sent at all: the pipeline is shutting down, or the batch
/// is larger than the whole budget).
pub async fn send_and_track(
    cx: &Context,
    output: &Output,
    mut batch: Batch,
) -> impl Future<Output = bool> + Send + 'static {
    let acknowledgement = match cx.memory().reserve(held_bytes(&batch)).await {
        Ok(memory) => {
            let (token, acknowledgement) = Token::acknowledged(Some(memory));
            batch.attach(token);
            // A batch that cannot be sent is dropped here, which fails its token.
            let _ = output.send(batch).await;
            Some(acknowledgement)
        }
        Err(err) => {
            tracing::warn!(
                stage = cx.id(),
                "a message of {} readings cannot be held: {err}",
                batch.len()
            );
            None
        }
    };
    async move {
        match acknowledgement {
            Some(acknowledgement) => acknowledgement.await == Delivery::Written,
            None => false,
        }
    }
}

/// What a batch holds in memory: its readings and their names.
fn held_bytes(batch: &[Reading]) -> u64 {
    let names: usize = batch.iter().map(|reading| reading.sensor_name.len()).sum();
    (std::mem::size_of_val(batch) + names) as u64
}
