//! `nats` sink: publishes every batch to a JetStream subject and counts it
//! written only once JetStream has acknowledged storing it (PubAck).
//!
//! A batch becomes one message per subject (and more when it is larger than
//! `max_batch_bytes`), each with a `Nats-Msg-Id` that stays the same across
//! retries, so a publish retried after a lost acknowledgement is stored once
//! (within the stream's duplicate window). While NATS cannot be reached the
//! sink holds its batch and retries with backoff; it takes no new batch
//! meanwhile, so backpressure reaches the sources as with a slow disk.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sink_api::metrics::{Counter, Metrics};
use sink_api::{
    BuildContext, ConfigError, Context, Input, ShutdownSignal, Sink, SinkConfig, StageError,
};

use crate::codec::{CONTENT_TYPE, Encoding, SubjectTemplate, encode};
use crate::connect::{Connection, Credentials, NatsTls, Servers};

/// Publishes every batch to a NATS JetStream stream; a batch counts as
/// written once JetStream acknowledged storing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// NATS server URL (`"nats://127.0.0.1:4222"`), or the servers of one
    /// cluster as a list or as one string separated by commas
    /// (`"nats://n1:4222,nats://n2:4222"`, as `NATS_URL` is often written).
    #[schemars(extend("x-restart" = true))]
    pub url: Servers,
    /// The JetStream stream that stores `subject`; startup fails when it does
    /// not exist (unless `create_stream` says how to create it).
    #[schemars(extend("x-restart" = true))]
    pub stream: String,
    /// Subject to publish to; `{sensor_name}` in it is replaced by each
    /// reading's sensor name (`"telemetry.{sensor_name}"`), so consumers can
    /// filter by sensor.
    pub subject: String,
    /// `"json"`: the JSON lines `json_file` writes; `"protobuf"`: a
    /// `sensor.v1.SensorValuesRequest` per message.
    #[serde(default)]
    pub encoding: Encoding,
    /// Largest message payload, in bytes; a batch is split into messages
    /// below it (and below the server's `max_payload`).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Credentials: `{ creds_file = "..." }`, `{ token = "..." }` or `{ user = "...", password = "..." }`.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub auth: Option<Credentials>,
    /// TLS to the servers: `{ ca = "...", cert = "...", key = "..." }`.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub tls: Option<NatsTls>,
    /// Create `stream` at startup when it does not exist, with these
    /// settings; absent: a missing stream is an error (creating streams is
    /// the operator's job).
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub create_stream: Option<CreateStream>,
}

fn default_max_batch_bytes() -> usize {
    512 * 1024
}

/// How the sink creates a missing stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateStream {
    /// Subjects the stream stores; default: what `subject` can produce
    /// (`telemetry.*` for `telemetry.{sensor_name}`).
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    /// Copies kept in a cluster (1, 3 or 5).
    #[serde(default = "one")]
    pub replicas: usize,
    /// How long messages are kept ("0s" = until limits say otherwise).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub max_age: Duration,
    /// Window in which a message id is remembered, so a retried publish is stored once.
    #[serde(default = "two_minutes", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub duplicate_window: Duration,
}

fn one() -> usize {
    1
}

fn two_minutes() -> Duration {
    Duration::from_secs(120)
}

impl NatsSinkConfig {
    fn connection(&self, id: &str) -> Connection {
        Connection {
            servers: self.url.clone(),
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            name: id.to_string(),
        }
    }
}

#[sink_api::stage(name = "nats")]
impl SinkConfig for NatsSinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        Connection::validate(&self.url, self.auth.as_ref(), self.tls.as_ref())?;
        SubjectTemplate::parse(&self.subject).map_err(|err| ConfigError::new("subject", err))?;
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ']) {
            return Err(ConfigError::new(
                "stream",
                "must be a stream name (no `.`, `*`, `>` or spaces)",
            ));
        }
        if self.max_batch_bytes < 1024 {
            return Err(ConfigError::new("max_batch_bytes", "must be at least 1024"));
        }
        if let Some(create) = &self.create_stream
            && !matches!(create.replicas, 1..=5)
        {
            return Err(ConfigError::new(
                "create_stream.replicas",
                "must be from 1 to 5",
            ));
        }
        Ok(())
    }

    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        let connection = self.connection(&cx.id);
        let config = self.clone();
        connection.check_at_startup(&cx.id, |client| async move {
            ensure_stream(&jetstream::new(client), &config).await
        })?;
        Ok(Box::new(NatsSink {
            config: Arc::new(self.clone()),
            connection,
        }))
    }
}

/// Makes sure `config.stream` exists, creating it if `create_stream` says
/// so: at startup, and again whenever the sink connects (NATS may have been
/// down at startup, or have lost the stream since).
async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsSinkConfig,
) -> Result<(), ConfigError> {
    if js.get_stream(&config.stream).await.is_ok() {
        return Ok(());
    }
    let Some(create) = &config.create_stream else {
        return Err(ConfigError::new(
            "stream",
            format!(
                "JetStream stream `{}` does not exist on {}: create it (docs/scale-out.md) or set `create_stream`",
                config.stream,
                config.url.describe()
            ),
        ));
    };
    let subject =
        SubjectTemplate::parse(&config.subject).map_err(|err| ConfigError::new("subject", err))?;
    js.create_stream(jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: create
            .subjects
            .clone()
            .unwrap_or_else(|| vec![subject.filter()]),
        num_replicas: create.replicas,
        max_age: create.max_age,
        duplicate_window: create.duplicate_window,
        ..Default::default()
    })
    .await
    .map(|_| tracing::info!("created JetStream stream `{}`", config.stream))
    .map_err(|err| {
        ConfigError::new(
            "create_stream",
            format!("cannot create stream `{}`: {err}", config.stream),
        )
    })
}

struct NatsSink {
    config: Arc<NatsSinkConfig>,
    connection: Connection,
}

#[async_trait]
impl Sink for NatsSink {
    async fn run(self: Box<Self>, mut input: Input, cx: Context) -> Result<(), StageError> {
        let mut params = cx.params::<NatsSinkConfig>();
        let mut config = self.config;
        let mut subject = SubjectTemplate::parse(&config.subject)?;
        let mut publisher =
            Publisher::new(self.connection, cx.id(), cx.metrics(), Arc::clone(&config));
        while let Some(batch) = input.recv().await {
            if let Some(new) = params.try_changed() {
                match SubjectTemplate::parse(&new.subject) {
                    Ok(parsed) => subject = parsed,
                    Err(err) => tracing::warn!(stage = cx.id(), "new `subject` refused: {err}"),
                }
                config = new;
            }
            let limit = config.max_batch_bytes.min(publisher.max_payload().await);
            let messages = encode(&batch, &subject, config.encoding, limit);
            if !publisher.publish(messages, config.encoding).await {
                // Some of it can never be stored: its calls must not be
                // answered as written.
                batch.fail();
            }
        }
        Ok(())
    }
}

/// Room left in a message for its headers under the server's `max_payload`.
const HEADER_ROOM: usize = 1024;

/// Publishes messages until JetStream has acknowledged every one.
struct Publisher {
    connection: Connection,
    stage: String,
    js: Option<jetstream::Context>,
    /// Unique to this process, so message ids never collide with another
    /// sink's; the batch number and the message's place follow it.
    instance: String,
    batches: u64,
    /// Never fires: a sink finishes its input whatever happens, and the
    /// runtime's `shutdown_timeout` bounds how long it may try.
    never: ShutdownSignal,
    /// Messages JetStream acknowledged storing.
    published: Counter,
    /// Publishes that failed or were not acknowledged (each is retried).
    failed: Counter,
    /// Messages dropped as larger than the server takes.
    too_large: Counter,
    /// Messages dropped because their subject is longer than a server takes.
    subject_too_long: Counter,
    /// The stream to make sure of on connecting (`create_stream`).
    config: Arc<NatsSinkConfig>,
    /// When a message was last refused for good in the log, and how many
    /// since: at most one line per [`REFUSAL_LOG_EVERY`].
    refusals_logged: Option<std::time::Instant>,
    refusals_unlogged: u64,
}

/// The longest subject published. A server reads a publish's control line
/// (`HPUB <subject> <reply> <sizes>`) up to `max_control_line`, 4096 bytes by
/// default, and drops the connection over it: a longer subject would be
/// retried forever and wedge every message behind it.
const MAX_SUBJECT_BYTES: usize = 3840;

/// Permanent refusals are logged at most this often, with the count.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Publisher {
    fn new(
        connection: Connection,
        stage: &str,
        metrics: &Metrics,
        config: Arc<NatsSinkConfig>,
    ) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            connection,
            stage: stage.to_string(),
            js: None,
            instance: format!("{started:x}-{:x}", std::process::id()),
            batches: 0,
            never: ShutdownSignal::new(),
            published: metrics.counter(
                "sink_nats_messages_published_total",
                "Messages JetStream acknowledged storing (PubAck)",
            ),
            failed: metrics.counter(
                "sink_nats_publish_failures_total",
                "Publishes that failed or were not acknowledged in time; each is retried with the same message id",
            ),
            too_large: metrics.counter(
                "sink_nats_messages_too_large_total",
                "Messages dropped because they are larger than the server's max_payload (their readings' calls are not acknowledged as written)",
            ),
            subject_too_long: metrics.counter(
                "sink_nats_subjects_too_long_total",
                "Messages dropped because their subject is longer than a server takes (3840 bytes; their readings' calls are not acknowledged as written)",
            ),
            config,
            refusals_logged: None,
            refusals_unlogged: 0,
        }
    }

    /// Logs a message refused for good, at most once per
    /// [`REFUSAL_LOG_EVERY`] with the count of the others.
    fn refused(&mut self, subject: &str, why: &str) {
        let due = self
            .refusals_logged
            .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY);
        if !due {
            self.refusals_unlogged += 1;
            return;
        }
        let shown: String = subject.chars().take(80).collect();
        tracing::error!(
            stage = self.stage,
            "dropping a message to `{shown}`{}: {why}; its readings are not acknowledged as written ({} more dropped since the last line)",
            if shown.len() < subject.len() {
                "..."
            } else {
                ""
            },
            self.refusals_unlogged
        );
        self.refusals_logged = Some(std::time::Instant::now());
        self.refusals_unlogged = 0;
    }

    /// The JetStream context, connecting first if need be.
    async fn js(&mut self) -> &jetstream::Context {
        if self.js.is_none() {
            let client = self
                .connection
                .connect_until(&self.stage, &self.never)
                .await
                .expect("the signal never fires");
            let js = jetstream::new(client);
            self.ensure_stream(&js).await;
            self.js = Some(js);
        }
        self.js.as_ref().expect("connected above")
    }

    /// With `create_stream`, creates the stream if it is missing (NATS was
    /// down at startup, or lost it), retrying with backoff until it exists:
    /// nothing can be stored before.
    async fn ensure_stream(&self, js: &jetstream::Context) {
        if self.config.create_stream.is_none() {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        while let Err(err) = ensure_stream(js, &self.config).await {
            tracing::warn!(stage = self.stage, "{err}; retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The largest payload the server takes, less room for headers.
    async fn max_payload(&mut self) -> usize {
        let max = self.js().await.client().server_info().max_payload;
        max.saturating_sub(HEADER_ROOM).max(HEADER_ROOM)
    }

    /// Publishes `messages`, all at once, then retries those not
    /// acknowledged (same ids) with backoff until every one is stored; says
    /// whether every one was. A message no server can ever take (larger than
    /// `max_payload`, or a subject too long) is dropped, counted and logged:
    /// retrying it would stop the sink forever.
    async fn publish(&mut self, messages: Vec<crate::codec::Message>, encoding: Encoding) -> bool {
        self.batches += 1;
        let mut all_stored = true;
        let (too_long, messages): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| m.subject.len() > MAX_SUBJECT_BYTES);
        for message in &too_long {
            let subject = &message.subject;
            all_stored = false;
            self.subject_too_long.inc();
            self.refused(
                subject,
                &format!(
                    "its subject is {} bytes, longer than a server takes ({MAX_SUBJECT_BYTES}); shorten the sensor names or the `subject` template",
                    subject.len()
                ),
            );
        }
        let mut pending: Vec<(String, String, Bytes)> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let id = format!("{}-{}-{i}", self.instance, self.batches);
                (id, m.subject, Bytes::from(m.payload))
            })
            .collect();
        let mut backoff = Duration::from_millis(50);
        let mut failing_since = None;
        let mut retries = 0u64;
        while !pending.is_empty() {
            let js = self.js().await.clone();
            let mut acks = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            let mut last_error = String::new();
            for (id, subject, payload) in pending {
                let message = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(&id)
                    .header(CONTENT_TYPE, encoding.content_type());
                match js.send_publish(subject.clone(), message).await {
                    Ok(ack) => acks.push(((id, subject, payload), ack)),
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        all_stored = false;
                        self.too_large.inc();
                        self.refused(
                            &subject,
                            &format!(
                                "its {} bytes are more than the server takes ({err})",
                                payload.len()
                            ),
                        );
                    }
                    Err(err) => {
                        self.failed.inc();
                        last_error = err.to_string();
                        failed.push((id, subject, payload));
                    }
                }
            }
            // Awaited together: each acknowledgement's timeout runs from when
            // it is awaited, so one after another they would add up.
            let (messages, acks): (Vec<_>, Vec<_>) = acks.into_iter().unzip();
            let outcomes =
                futures_util::future::join_all(acks.into_iter().map(IntoFuture::into_future)).await;
            for (message, outcome) in messages.into_iter().zip(outcomes) {
                match outcome {
                    Ok(_) => {
                        self.published.inc();
                    }
                    Err(err) => {
                        self.failed.inc();
                        last_error = err.to_string();
                        failed.push(message);
                    }
                }
            }
            pending = failed;
            if pending.is_empty() {
                break;
            }
            if !failover_hint(&last_error).is_empty() {
                // The stream may be gone (NATS restarted without it):
                // `create_stream` makes it again.
                self.ensure_stream(&js).await;
            }
            failing_since.get_or_insert_with(std::time::Instant::now);
            if retries.is_multiple_of(10) {
                tracing::warn!(
                    stage = self.stage,
                    "{} messages not acknowledged by JetStream, retrying in {backoff:?}: {last_error}{}",
                    pending.len(),
                    failover_hint(&last_error)
                );
            }
            retries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Some(since) = failing_since {
            tracing::info!(
                stage = self.stage,
                "JetStream acknowledges again, after {:?} of failed publishes",
                since.elapsed()
            );
        }
        all_stored
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a publish error means when it is the one a failover gives: while a
/// NATS node is down and the stream elects a new leader, JetStream answers
/// "no stream found for given subject" (or nobody answers), which reads as if
/// the stream were gone.
fn failover_hint(error: &str) -> &'static str {
    if error.contains("no stream found") || error.contains("no responders") {
        " (the stream has no server answering for it right now, as while a NATS node fails over \
         and the stream elects a new leader; the messages are kept and retried with the same ids, \
         so none is lost or stored twice)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::failover_hint;

    #[test]
    fn a_failover_error_is_explained_and_others_are_not() {
        assert!(failover_hint("no stream found for given subject").contains("fails over"));
        assert!(failover_hint("nats: no responders").contains("retried with the same ids"));
        assert_eq!(failover_hint("timed out"), "");
    }
}
