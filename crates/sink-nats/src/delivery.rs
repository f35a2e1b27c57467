//! The seam between this crate and the pipeline's acknowledgements.

use sink_api::{Batch, Output};

/// Sends `batch` on and returns what resolves to whether every sink it
/// reaches wrote it. PLACEHOLDER until end-to-end acknowledgements land.
pub async fn send_and_track(
    output: &Output,
    batch: Batch,
) -> impl Future<Output = bool> + Send + 'static {
    let sent = output.send(batch).await.is_ok();
    async move { sent }
}
