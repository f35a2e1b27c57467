//! `nats` source: a durable JetStream pull consumer. Each message becomes a
//! batch, and is acknowledged to JetStream only once every sink it reaches has
//! written it, so a crash anywhere before that makes JetStream deliver it
//! again instead of losing it (at least once). A message that cannot be
//! decoded is terminated (`AckTerm`) and counted, never retried forever.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sink_api::metrics::{Counter, Metrics};
use sink_api::{
    BuildContext, ConfigError, Context, Output, Source, SourceConfig, StageError, Timestamp,
};
use tokio::task::JoinSet;

use crate::codec::{CONTENT_TYPE, Encoding, decode};
use crate::connect::{Connection, Credentials, NatsTls, Servers};

/// Consumes a NATS JetStream stream through a durable pull consumer; a
/// message is acknowledged once every sink it reaches has written it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// NATS server URL (`"nats://127.0.0.1:4222"`), or the servers of one
    /// cluster as a list or as one string separated by commas
    /// (`"nats://n1:4222,nats://n2:4222"`, as `NATS_URL` is often written).
    #[schemars(extend("x-restart" = true))]
    pub url: Servers,
    /// The JetStream stream to consume; startup fails when it does not exist.
    #[schemars(extend("x-restart" = true))]
    pub stream: String,
    /// Name of the durable consumer, created if missing. Replicas of a
    /// writing tier that share it share the work; each message goes to one.
    #[schemars(extend("x-restart" = true))]
    pub consumer: String,
    /// Only messages on this subject (wildcards allowed: `telemetry.t1`,
    /// `telemetry.*`); absent: the whole stream. Used when the consumer is created.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub filter_subject: Option<String>,
    /// Messages delivered but not yet acknowledged, at most; JetStream sends
    /// no more until some are written. Bounds what this source holds.
    #[serde(default = "default_max_ack_pending")]
    #[schemars(extend("x-restart" = true))]
    pub max_ack_pending: u32,
    /// How long JetStream waits for an acknowledgement before delivering a
    /// message again; longer than the slowest write plus the buffering delay.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration", "x-restart" = true))]
    pub ack_wait: Duration,
    /// Credentials: `{ creds_file = "..." }`, `{ token = "..." }` or `{ user = "...", password = "..." }`.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub auth: Option<Credentials>,
    /// TLS to the servers: `{ ca = "...", cert = "...", key = "..." }`.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub tls: Option<NatsTls>,
}

fn default_max_ack_pending() -> u32 {
    1000
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

#[sink_api::stage(name = "nats")]
impl SourceConfig for NatsSourceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        Connection::validate(&self.url, self.auth.as_ref(), self.tls.as_ref())?;
        for (key, name) in [("stream", &self.stream), ("consumer", &self.consumer)] {
            if name.is_empty() || name.contains(['.', '*', '>', ' ']) {
                return Err(ConfigError::new(
                    key,
                    "must be a name (no `.`, `*`, `>` or spaces)",
                ));
            }
        }
        if self.max_ack_pending == 0 {
            return Err(ConfigError::new("max_ack_pending", "must be at least 1"));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::new("ack_wait", "must be at least 1s"));
        }
        Ok(())
    }

    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Source>, ConfigError> {
        let connection = Connection {
            servers: self.url.clone(),
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            name: cx.id.clone(),
        };
        let stream = self.stream.clone();
        let servers = self.url.describe();
        connection.check_at_startup(&cx.id, |client| async move {
            match jetstream::new(client).get_stream(&stream).await {
                Ok(_) => Ok(()),
                Err(err) => Err(ConfigError::new(
                    "stream",
                    format!("JetStream stream `{stream}` is not available on {servers}: {err}"),
                )),
            }
        })?;
        Ok(Box::new(NatsSource {
            config: self.clone(),
            connection,
            terminated: Arc::default(),
        }))
    }
}

/// How long one pull request waits on the server. Short, because a pull sent
/// to a consumer leader that dies is answered by no one: the client notices
/// only when the request expires or its heartbeats stop (the client's default
/// of 30 s would stall the writer that long after losing a NATS node).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on a pull: two missed ones end the pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

struct NatsSource {
    config: NatsSourceConfig,
    connection: Connection,
    /// Messages terminated because they could not be decoded.
    terminated: Arc<AtomicU64>,
}

/// The source's metrics: messages delivered (and of those, delivered again),
/// and how each was answered to JetStream.
struct SourceMetrics {
    received: Counter,
    redelivered: Counter,
    /// By outcome: acknowledged once written (`ack`), asked again as not
    /// written (`nak`), terminated as undecodable (`term`).
    acked: Counter,
    naked: Counter,
    terminated: Counter,
}

impl SourceMetrics {
    fn new(metrics: &Metrics) -> Self {
        let answered = |outcome| {
            metrics.counter_with(
                "sink_nats_messages_answered_total",
                "Messages answered to JetStream, by outcome: ack (written by every sink, or already written by this process), nak (not written: delivered again), term (undecodable: never delivered again)",
                &[("outcome", outcome)],
            )
        };
        Self {
            received: metrics.counter(
                "sink_nats_messages_received_total",
                "Messages the consumer delivered",
            ),
            redelivered: metrics.counter(
                "sink_nats_messages_redelivered_total",
                "Messages delivered more than once (not acknowledged in time, or nak'd)",
            ),
            acked: answered("ack"),
            naked: answered("nak"),
            terminated: answered("term"),
        }
    }
}

#[async_trait]
impl Source for NatsSource {
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError> {
        let stage = cx.id().to_string();
        let shutdown = cx.shutdown().clone();
        // One task per message in flight, acknowledging it once its batch is
        // finished; at most `max_ack_pending` of them, as JetStream delivers no more.
        // Each ends with the stream sequence of the message if it was written.
        let mut acks = JoinSet::new();
        let metrics = SourceMetrics::new(cx.metrics());
        let mut written = WrittenSequences::default();
        'connect: loop {
            let Some(client) = self.connection.connect_until(&stage, &shutdown).await else {
                break;
            };
            let consumer = match self.consumer(client).await {
                Ok(consumer) => consumer,
                Err(err) => {
                    tracing::warn!(
                        stage,
                        "cannot open consumer `{}` on stream `{}`, retrying: {err}",
                        self.config.consumer,
                        self.config.stream
                    );
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut messages = match consumer
                .stream()
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(
                        stage,
                        "cannot pull from consumer `{}`, retrying: {err}",
                        self.config.consumer
                    );
                    continue;
                }
            };
            tracing::info!(
                stage,
                "consuming stream `{}` as `{}`",
                self.config.stream,
                self.config.consumer
            );
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'connect,
                    Some(done) = acks.join_next(), if !acks.is_empty() => {
                        if let Ok(Some(sequence)) = done {
                            written.insert(sequence);
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            if let Some(ack) = self.accept(message, &output, &cx, &mut written, &metrics).await {
                                acks.spawn(ack);
                            }
                        }
                        Some(Err(err)) => {
                            tracing::warn!(stage, "pulling from `{}`: {err}", self.config.consumer);
                        }
                        None => continue 'connect,
                    },
                }
            }
        }
        // No more batches from here: the stages below drain, and each message
        // in flight is acknowledged as its batch is written.
        drop(output);
        while acks.join_next().await.is_some() {}
        let terminated = self.terminated.load(Ordering::Relaxed);
        if terminated > 0 {
            tracing::warn!(
                stage,
                "{terminated} messages that could not be taken (undecodable, or too large to hold) were terminated"
            );
        }
        if written.skipped > 0 {
            tracing::info!(
                stage,
                "{} messages delivered again after being written were acknowledged without writing them twice",
                written.skipped
            );
        }
        Ok(())
    }
}

impl NatsSource {
    async fn consumer(
        &self,
        client: async_nats::Client,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, String> {
        let stream = jetstream::new(client)
            .get_stream(&self.config.stream)
            .await
            .map_err(|err| err.to_string())?;
        stream
            .get_or_create_consumer(
                &self.config.consumer,
                pull::Config {
                    durable_name: Some(self.config.consumer.clone()),
                    filter_subject: self.config.filter_subject.clone().unwrap_or_default(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    max_ack_pending: i64::from(self.config.max_ack_pending),
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| err.to_string())
    }

    /// Decodes `message` and hands its readings on; returns the task that
    /// acknowledges it once they are written (or asks JetStream to deliver
    /// it again if they cannot be), ending with its stream sequence if they
    /// were. An undecodable message is terminated here; one this source has
    /// already written is acknowledged again, not written again.
    async fn accept(
        &self,
        message: jetstream::Message,
        output: &Output,
        cx: &Context,
        written: &mut WrittenSequences,
        metrics: &SourceMetrics,
    ) -> Option<impl Future<Output = Option<u64>> + Send + 'static> {
        let stage = cx.id();
        let info = message.info().ok();
        let sequence = info.as_ref().map(|info| info.stream_sequence);
        metrics.received.inc();
        if info.as_ref().is_some_and(|info| info.delivered > 1) {
            metrics.redelivered.inc();
        }
        let stored_at = info
            .and_then(|info| {
                Timestamp::new(info.published.unix_timestamp(), info.published.nanosecond())
            })
            .unwrap_or_else(Timestamp::now);
        let (message, acker) = message.split();
        if sequence.is_some_and(|sequence| written.contains(sequence)) {
            written.skipped += 1;
            metrics.acked.inc();
            if let Err(err) = acker.ack().await {
                tracing::warn!(stage, "could not acknowledge a message again: {err}");
            }
            return None;
        }
        let content_type = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(CONTENT_TYPE))
            .map(|value| value.as_str());
        let encoding = Encoding::of_message(content_type, &message.payload);
        // The most it can decode to, up to the whole limit, reserved before
        // decoding (waiting for room), so that what decoding holds is inside
        // the budget too.
        let limit = cx.memory().limit();
        let bound = crate::delivery::decoded_bound(message.payload.len()).min(limit);
        let memory = match cx.memory().reserve(bound).await {
            Ok(memory) => memory,
            Err(err) => {
                // The limit was lowered under it meanwhile: deliver it again.
                tracing::warn!(stage, "a message cannot be held now: {err}");
                metrics.naked.inc();
                if let Err(err) = acker.ack_with(AckKind::Nak(None)).await {
                    tracing::warn!(stage, "could not ask for a message again: {err}");
                }
                return None;
            }
        };
        let decoded = decode(encoding, &message.payload, stored_at).and_then(|batch| {
            // More than the whole budget can never be held: poison, like an
            // undecodable message, rather than delivered again forever.
            let held = crate::delivery::held_bytes(&batch);
            if held > limit {
                return Err(crate::codec::Undecodable(format!(
                    "its {} readings take {held} bytes decoded, more than settings.memory_limit ({limit} bytes): it can never be held",
                    batch.len()
                )));
            }
            Ok(batch)
        });
        let batch = match decoded {
            Ok(batch) => batch,
            Err(err) => {
                drop(memory);
                self.terminated.fetch_add(1, Ordering::Relaxed);
                metrics.terminated.inc();
                tracing::warn!(stage, subject = %message.subject, "terminating a message that cannot be taken: {}", err.0);
                if let Err(err) = acker.ack_with(AckKind::Term).await {
                    tracing::warn!(stage, "could not terminate a message: {err}");
                }
                return None;
            }
        };
        if batch.is_empty() {
            metrics.acked.inc();
            if let Err(err) = acker.ack().await {
                tracing::warn!(stage, "could not acknowledge an empty message: {err}");
            }
            return None;
        }
        let delivered = crate::delivery::send_and_track(cx, output, batch, memory).await;
        let stage = stage.to_string();
        let (acked, naked) = (metrics.acked.clone(), metrics.naked.clone());
        Some(async move {
            let done = delivered.await;
            let kind = if done {
                acked.inc();
                AckKind::Ack
            } else {
                naked.inc();
                AckKind::Nak(None)
            };
            if let Err(err) = acker.ack_with(kind).await {
                // JetStream delivers it again after `ack_wait`: at least once.
                tracing::warn!(stage, "could not acknowledge a message: {err}");
            }
            sequence.filter(|_| done)
        })
    }
}

/// The stream sequences of the messages this source wrote most recently. An
/// acknowledgement can be lost after the readings were written (a NATS node
/// dies holding it, the connection drops before it is sent); JetStream then
/// delivers the message again, and this is how the source knows to
/// acknowledge it rather than write it twice. Only within one process: a
/// restarted writer writes such a message again (at least once).
#[derive(Default)]
struct WrittenSequences {
    recent: BTreeSet<u64>,
    skipped: u64,
}

/// How many sequences are remembered: redeliveries come within a few
/// `ack_wait`s, far fewer messages than this at any rate a writer reaches.
const REMEMBERED: usize = 1 << 16;

impl WrittenSequences {
    fn insert(&mut self, sequence: u64) {
        self.recent.insert(sequence);
        if self.recent.len() > REMEMBERED {
            self.recent.pop_first();
        }
    }

    fn contains(&self, sequence: u64) -> bool {
        self.recent.contains(&sequence)
    }
}
