//! Whether the pipeline can take data now: one value that stages set and
//! that the gRPC health service (and an HTTP `/ready`) report.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// The pipeline's readiness: ready while no stage has said otherwise. A stage
/// that cannot do its part (a source whose output has been full for a while,
/// a sink that has failed for good) marks itself not ready with a reason, and
/// clears that once it recovers. Cheap to clone; every clone is the same value.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let readiness = sink_api::Readiness::new();
/// let mut watch = readiness.watch();
/// readiness.set_not_ready("sensors", "the pipeline has been full for 1s");
/// assert_eq!(watch.changed().await, Some(false));
/// assert_eq!(readiness.reasons(), ["stage `sensors`: the pipeline has been full for 1s"]);
/// readiness.set_ready("sensors");
/// assert!(readiness.is_ready());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Readiness(Arc<watch::Sender<BTreeMap<String, String>>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(BTreeMap::new())))
    }
}

impl Readiness {
    /// A readiness with no reason against it: ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stage `stage` cannot do its part, because of `reason`; replaces the
    /// stage's previous reason.
    pub fn set_not_ready(&self, stage: &str, reason: impl Into<String>) {
        let reason = reason.into();
        self.0.send_if_modified(|reasons| {
            if reasons.get(stage) == Some(&reason) {
                return false;
            }
            reasons.insert(stage.to_string(), reason);
            true
        });
    }

    /// Stage `stage` does its part again.
    pub fn set_ready(&self, stage: &str) {
        self.0
            .send_if_modified(|reasons| reasons.remove(stage).is_some());
    }

    /// Whether no stage has a reason against readiness.
    pub fn is_ready(&self) -> bool {
        self.0.borrow().is_empty()
    }

    /// Why the pipeline is not ready, one `stage `id`: reason` per stage
    /// (empty when ready).
    pub fn reasons(&self) -> Vec<String> {
        self.0
            .borrow()
            .iter()
            .map(|(stage, reason)| format!("stage `{stage}`: {reason}"))
            .collect()
    }

    /// A watch on readiness, to report its changes.
    pub fn watch(&self) -> ReadinessWatch {
        ReadinessWatch(self.0.subscribe())
    }
}

/// Follows a [`Readiness`]; see [`Readiness::watch`].
#[derive(Debug)]
pub struct ReadinessWatch(watch::Receiver<BTreeMap<String, String>>);

impl ReadinessWatch {
    /// Whether the pipeline is ready now; marks this state seen.
    pub fn ready(&mut self) -> bool {
        self.0.borrow_and_update().is_empty()
    }

    /// Waits until the reasons change, then says whether the pipeline is
    /// ready; `None` once every [`Readiness`] clone is gone.
    pub async fn changed(&mut self) -> Option<bool> {
        self.0.changed().await.ok()?;
        Some(self.ready())
    }
}
