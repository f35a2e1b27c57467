//! A JetStream message's way through the pipeline: reserve its memory, send
//! its readings with an acknowledgement token, and learn whether every sink
//! wrote them.

use sink_api::{Batch, Context, Delivery, Output, Reading, Reservation, Token};

/// Sends `batch` on, holding its memory (`memory`, reserved before it was
/// decoded; grown or cut to the batch's real size here) in the pipeline's
/// budget, and returns what resolves to whether every sink it reaches wrote
/// it (`false` also when it could not be sent at all: the pipeline is
/// shutting down, or the budget was lowered under it).
pub async fn send_and_track(
    cx: &Context,
    output: &Output,
    mut batch: Batch,
    mut memory: Reservation,
) -> impl Future<Output = bool> + Send + 'static {
    let need = held_bytes(&batch);
    let reserved = if memory.bytes() >= need {
        memory.shrink_to(need);
        Ok(memory)
    } else {
        drop(memory);
        cx.memory().reserve(need).await
    };
    let acknowledgement = match reserved {
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

/// The most a payload of `len` bytes can decode to: every reading takes at
/// least 2 of its bytes (an empty protobuf item; a JSON line takes more),
/// with a label slot each, and its text is at most the payload.
pub fn decoded_bound(len: usize) -> u64 {
    let per_reading = std::mem::size_of::<Reading>() + std::mem::size_of::<(String, String)>();
    (len as u64 / 2)
        .saturating_mul(per_reading as u64)
        .saturating_add(len as u64)
}

/// What a batch holds in memory: its readings and their names.
pub fn held_bytes(batch: &[Reading]) -> u64 {
    let names: usize = batch.iter().map(|reading| reading.sensor_name.len()).sum();
    (std::mem::size_of_val(batch) + names) as u64
}
