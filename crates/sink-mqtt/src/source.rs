//! `mqtt` source: subscribes to a broker and hands on what sensors publish,
//! acknowledging (PUBACK) each QoS 1 message only once its readings are
//! accepted or written, so that what the broker delivered survives a crash
//! of the sink: the broker delivers it again on the next connection.
//!
//! Two tasks: the connection task polls the client's event loop (which reads
//! the socket, writes acknowledgements and keeps the connection alive) and
//! passes each message on, holding its bytes in the pipeline's memory budget;
//! the stage's own task decodes what has arrived into one batch, sends it,
//! and acknowledges its messages when the batch is accepted or written. When
//! the pipeline is full the budget has no room, the connection task stops
//! reading, and the broker holds the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Packet, PubAck, Publish, QoS, SubscribeFilter,
};
use serde::{Deserialize, Serialize};
use sink_api::backoff::Backoff;
use sink_api::metrics::{Counter, Gauge, Metrics};
use sink_api::{
    Batch, BuildContext, ByteSize, ConfigError, Context, Delivery, Output, Reading, ReadingLimits,
    Reservation, Source, SourceConfig, StageError, Timestamp, Token,
};
use sink_stages::sources::grpc::Acknowledge;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::connect::{Brokers, ClientTls, Connection, client_config, read_password};
use crate::payload::{Payload, Reason, Refused};
use crate::topic::{TopicPattern, topic_fields};

/// Subscribes to an MQTT broker (3.1.1) and turns each message into
/// readings; a QoS 1 message is acknowledged once its readings are accepted,
/// or written with `acknowledge = "written"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker URL, `mqtt://HOST:PORT` or `mqtts://HOST:PORT` for TLS; several
    /// brokers as a list (or separated by commas) are tried in turn when one
    /// cannot be reached.
    #[schemars(extend("x-restart" = true))]
    pub url: Brokers,
    /// Topic filters to subscribe to; MQTT wildcards allowed (`sensors/#`,
    /// `sensors/+/temp`).
    #[schemars(extend("x-restart" = true))]
    pub topics: Vec<String>,
    /// The client id: fixed, so that the broker keeps this sink's session
    /// (its subscriptions and unacknowledged messages) while it is away.
    #[schemars(extend("x-restart" = true))]
    pub client_id: String,
    /// QoS of the subscriptions: 1 (at least once, acknowledged as
    /// configured) or 0 (at most once: the broker forgets a message once sent).
    #[serde(default = "default_qos")]
    #[schemars(extend("x-restart" = true))]
    pub qos: u8,
    /// `false` (default): a persistent session, resumed on reconnection, in
    /// which the broker keeps unacknowledged and new messages while the sink
    /// is away. `true`: a new session on every connection.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub clean_session: bool,
    /// Names topic levels: `{sensor_name}` becomes the reading's name and
    /// every other `{key}` a label; literal levels must match. A message on a
    /// topic that does not fit is refused. Absent: the topic is the name.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub topic_pattern: Option<String>,
    /// What a payload holds: `"number"` (one number as text, the default),
    /// `"json"` (an object in the shape json_file writes, or an array of them)
    /// or `"sensor.v1"` (a `SensorValuesRequest` protobuf).
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub payload: Payload,
    /// When a QoS 1 message is acknowledged to the broker: once its readings
    /// are in the pipeline (`"accepted"`, the default) or once every sink
    /// they reach has written them (`"written"`).
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub acknowledge: Acknowledge,
    /// A larger payload is refused (counted, acknowledged, never written).
    #[serde(default = "default_max_payload_bytes")]
    #[schemars(extend("x-restart" = true))]
    pub max_payload_bytes: ByteSize,
    /// Interval of keepalive pings; the broker drops the connection after
    /// 1.5 times it without a packet.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration", "x-restart" = true))]
    pub keepalive: Duration,
    /// User name for the broker.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub username: Option<String>,
    /// Password of `username`; or use `password_file`.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub password: Option<String>,
    /// A file whose first line is the password, read on every connection.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub password_file: Option<std::path::PathBuf>,
    /// TLS for `mqtts://` brokers: `{ ca = "...", cert = "...", key = "..." }`
    /// (without `ca`, the system's roots).
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub tls: Option<ClientTls>,
}

fn default_qos() -> u8 {
    1
}

fn default_max_payload_bytes() -> ByteSize {
    ByteSize(64 << 10)
}

fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}

/// The largest packet the client reads. An oversize payload must be read to
/// be refused and acknowledged: a packet the client refused to read would
/// end the connection and come back forever. So this is MQTT's own bound,
/// and the broker's `message_size_limit` is what keeps one message small.
const MAX_PACKET_BYTES: usize = 268_435_455;

/// The most messages, and payload bytes, decoded into one batch.
const MAX_GROUP_MESSAGES: usize = 1024;
const MAX_GROUP_BYTES: usize = 1 << 20;

/// Messages passed from the connection task at most (each also holds its
/// bytes in the memory budget).
const QUEUE: usize = 4096;

/// Refusals and acknowledgement failures are logged at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[sink_api::stage(name = "mqtt")]
impl SourceConfig for MqttSourceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.connection().map(|_| ())
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Source>, ConfigError> {
        let connection = self.connection()?;
        let pattern = self
            .topic_pattern
            .as_deref()
            .map(TopicPattern::parse)
            .transpose()
            .map_err(|why| ConfigError::new("topic_pattern", why))?;
        Ok(Box::new(MqttSource {
            config: self.clone(),
            connection,
            pattern,
        }))
    }
}

impl MqttSourceConfig {
    /// Checks every key and loads what connecting needs (TLS material, the
    /// password file), so that a mistake is reported before anything starts.
    fn connection(&self) -> Result<Connection, ConfigError> {
        let brokers = Connection::brokers(&self.url)?;
        if self.topics.is_empty() {
            return Err(ConfigError::new(
                "topics",
                "must name at least one topic filter",
            ));
        }
        for topic in &self.topics {
            check_filter(topic).map_err(|why| ConfigError::new("topics", why))?;
        }
        if self.client_id.is_empty() || self.client_id.len() > 65535 {
            return Err(ConfigError::new(
                "client_id",
                "must be a non-empty id (the broker keeps the session under it)",
            ));
        }
        if self.qos > 1 {
            return Err(ConfigError::new("qos", "must be 0 or 1"));
        }
        if let Some(pattern) = &self.topic_pattern {
            TopicPattern::parse(pattern).map_err(|why| ConfigError::new("topic_pattern", why))?;
        }
        if self.max_payload_bytes.0 == 0 {
            return Err(ConfigError::new("max_payload_bytes", "must be at least 1"));
        }
        if self.keepalive < Duration::from_secs(1) || self.keepalive > Duration::from_secs(65535) {
            return Err(ConfigError::new(
                "keepalive",
                "must be between 1s and 65535s",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(ConfigError::new(
                "password_file",
                "give `password` or `password_file`, not both",
            ));
        }
        if self.username.is_none() && (self.password.is_some() || self.password_file.is_some()) {
            return Err(ConfigError::new(
                "username",
                "a password needs a `username`",
            ));
        }
        if let Some(file) = &self.password_file {
            read_password(file).map_err(|why| ConfigError::new("password_file", why))?;
        }
        let any_tls = brokers.iter().any(|broker| broker.tls);
        if self.tls.is_some() && !any_tls {
            return Err(ConfigError::new(
                "tls",
                "is set but no broker in `url` is mqtts://",
            ));
        }
        let tls = match (&self.tls, any_tls) {
            (_, false) => None,
            (tls, true) => Some(client_config(tls.as_ref())?),
        };
        Ok(Connection {
            brokers,
            client_id: self.client_id.clone(),
            clean_session: self.clean_session,
            keepalive: self.keepalive,
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            tls,
            max_packet_bytes: MAX_PACKET_BYTES,
        })
    }

    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }
}

/// Checks an MQTT topic filter: `#` only as the last whole level, `+` only
/// as a whole level.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("a topic filter is empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let whole = *level == "#" || *level == "+";
        if level.contains(['#', '+']) && !whole {
            return Err(format!("`{filter}`: `+` and `#` must be whole levels"));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("`{filter}`: `#` must be the last level"));
        }
    }
    Ok(())
}

struct MqttSource {
    config: MqttSourceConfig,
    connection: Connection,
    pattern: Option<TopicPattern>,
}

/// The source's metrics (`sink_mqtt_*`).
#[derive(Clone)]
struct SourceMetrics {
    connected: Gauge,
    connections: Counter,
    connection_errors: Counter,
    received: Counter,
    redelivered: Counter,
    acknowledged: Counter,
    unacknowledged: Counter,
    in_flight: Gauge,
    refused: Vec<(Reason, Counter)>,
}

impl SourceMetrics {
    fn new(metrics: &Metrics) -> Self {
        Self {
            connected: metrics.gauge(
                "sink_mqtt_connected",
                "1 while connected to a broker, else 0",
            ),
            connections: metrics.counter(
                "sink_mqtt_connections_total",
                "Connections made to a broker (the first and every reconnection)",
            ),
            connection_errors: metrics.counter(
                "sink_mqtt_connection_errors_total",
                "Connection attempts that failed and connections that broke",
            ),
            received: metrics.counter(
                "sink_mqtt_messages_received_total",
                "Messages the broker delivered",
            ),
            redelivered: metrics.counter(
                "sink_mqtt_messages_redelivered_total",
                "Messages the broker delivered again (DUP set): their first delivery was not acknowledged",
            ),
            acknowledged: metrics.counter(
                "sink_mqtt_messages_acknowledged_total",
                "QoS 1 messages acknowledged (PUBACK): accepted or written as `acknowledge` says, or refused",
            ),
            unacknowledged: metrics.counter(
                "sink_mqtt_messages_unacknowledged_total",
                "QoS 1 messages left unacknowledged for the broker to deliver again: not written, or their connection ended first",
            ),
            in_flight: metrics.gauge(
                "sink_mqtt_messages_in_flight",
                "QoS 1 messages received and not yet acknowledged",
            ),
            refused: Reason::ALL
                .iter()
                .map(|reason| {
                    let counter = metrics.counter_with(
                        "sink_mqtt_messages_refused_total",
                        "Messages refused (counted, acknowledged, never written), by reason",
                        &[("reason", reason.label())],
                    );
                    (*reason, counter)
                })
                .collect(),
        }
    }

    fn refused(&self, reason: Reason) {
        if let Some((_, counter)) = self.refused.iter().find(|(r, _)| *r == reason) {
            counter.inc();
        }
    }
}

/// One message from the connection task: which connection delivered it (an
/// acknowledgement is only valid on that one), and the bytes it holds.
struct Delivered {
    connection: u64,
    publish: Publish,
    memory: Option<Reservation>,
}

/// QoS 1 messages to acknowledge, all delivered on connection `connection`.
struct AckRequest {
    connection: u64,
    pkids: Vec<u16>,
}

/// Hands acknowledgements to the connection task, which writes them on the
/// connection that delivered the messages only.
#[derive(Clone)]
struct Acker {
    acks: mpsc::UnboundedSender<AckRequest>,
    /// Asks the connection task to reconnect, so that the broker delivers
    /// again what was not written.
    reconnect: Arc<Notify>,
    metrics: SourceMetrics,
}

impl Acker {
    /// Acknowledges the QoS 1 messages `pkids` of connection `connection`.
    /// The channel holds at most what the broker has in flight to this
    /// client, as it sends no more until some are acknowledged.
    fn ack(&self, connection: u64, pkids: Vec<u16>) {
        if pkids.is_empty() {
            return;
        }
        self.metrics.in_flight.dec_by(pkids.len() as i64);
        let count = pkids.len() as u64;
        if self.acks.send(AckRequest { connection, pkids }).is_err() {
            // The connection task is gone: delivered again on the next start.
            self.metrics.unacknowledged.inc_by(count);
        }
    }

    /// Leaves `pkids` unacknowledged and reconnects, so that the broker
    /// delivers them again (within one connection it never does).
    fn give_back(&self, pkids: &[u16], shutting_down: bool) {
        if pkids.is_empty() {
            return;
        }
        self.metrics.in_flight.dec_by(pkids.len() as i64);
        self.metrics.unacknowledged.inc_by(pkids.len() as u64);
        if !shutting_down {
            self.reconnect.notify_one();
        }
    }
}

/// Logs at most once per [`LOG_INTERVAL`], with how many were not logged.
struct Throttled {
    last: Option<Instant>,
    quiet: u64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            last: None,
            quiet: 0,
        }
    }

    fn log(&mut self, stage: &str, topic: &str, refused: &Refused) {
        let due = self.last.is_none_or(|last| last.elapsed() >= LOG_INTERVAL);
        if !due {
            self.quiet += 1;
            return;
        }
        tracing::warn!(
            stage,
            topic,
            reason = refused.reason.label(),
            "refused a message: {} ({} more refused since the last report)",
            refused.detail,
            self.quiet
        );
        self.last = Some(Instant::now());
        self.quiet = 0;
    }
}

#[sink_api::async_trait]
impl Source for MqttSource {
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError> {
        let stage = cx.id().to_string();
        let metrics = SourceMetrics::new(cx.metrics());
        let first = &self.connection.brokers[0];
        let options = self.connection.options(first).map_err(StageError::from)?;
        let (client, eventloop) = AsyncClient::new(options, 16);
        let reconnect = Arc::new(Notify::new());
        let (messages_tx, mut messages) = mpsc::channel(QUEUE);
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = oneshot::channel();
        cx.readiness()
            .set_not_ready(&stage, "not connected to the MQTT broker yet");
        let connection_task = tokio::spawn(
            ConnectionTask {
                stage: stage.clone(),
                connection: self.connection.clone(),
                filters: self
                    .config
                    .topics
                    .iter()
                    .map(|topic| SubscribeFilter::new(topic.clone(), self.config.qos()))
                    .collect(),
                client,
                reconnect: Arc::clone(&reconnect),
                metrics: metrics.clone(),
                cx: cx.clone(),
                payload: self.config.payload,
                current: None,
            }
            .run(eventloop, messages_tx, acks_rx, stop),
        );
        let acker = Acker {
            acks: acks_tx,
            reconnect,
            metrics: metrics.clone(),
        };
        let mut acks = JoinSet::new();
        let mut log = Throttled::new();
        let limits = ReadingLimits::default();
        let shutdown = cx.shutdown().clone();
        let mut group = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(_) = acks.join_next(), if !acks.is_empty() => continue,
                first = messages.recv() => match first {
                    Some(first) => group.push(first),
                    None => break,
                },
            }
            let mut bytes = group[0].publish.payload.len();
            while group.len() < MAX_GROUP_MESSAGES && bytes < MAX_GROUP_BYTES {
                match messages.try_recv() {
                    Ok(next) => {
                        bytes += next.publish.payload.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            let (batch, memory, pending) =
                self.decode(&mut group, &acker, &metrics, &mut log, &limits, &stage);
            if let Some(ack) = self
                .hand_on(batch, memory, pending, &output, &cx, &acker)
                .await
            {
                acks.spawn(ack);
            }
        }
        // Messages not taken are left unacknowledged: the broker keeps them.
        drop(messages);
        drop(output);
        while acks.join_next().await.is_some() {}
        // Every acknowledgement is queued now: the connection task writes
        // them, then disconnects.
        drop(acker);
        let _ = stop_tx.send(());
        let _ = connection_task.await;
        Ok(())
    }
}

/// The QoS 1 messages of one batch, to acknowledge together.
struct Pending {
    connection: u64,
    pkids: Vec<u16>,
}

impl MqttSource {
    /// Decodes `group` into one batch; refused messages are counted, logged
    /// and acknowledged here. Returns the batch and the messages to
    /// acknowledge once it is accepted or written (all of one connection:
    /// a group that spans a reconnection is acknowledged per connection).
    fn decode(
        &self,
        group: &mut Vec<Delivered>,
        acker: &Acker,
        metrics: &SourceMetrics,
        log: &mut Throttled,
        limits: &ReadingLimits,
        stage: &str,
    ) -> (Vec<Reading>, Option<Reservation>, Vec<Pending>) {
        let received_at = Timestamp::now();
        let mut held: Option<Reservation> = None;
        let mut readings = Vec::with_capacity(group.len());
        let mut pending: Vec<Pending> = Vec::new();
        let max_payload = self.config.max_payload_bytes.0;
        for delivered in group.drain(..) {
            let Delivered {
                connection,
                publish,
                memory,
            } = delivered;
            let unreserved = memory.is_none();
            match (&mut held, memory) {
                (Some(held), Some(memory)) => held.merge(memory),
                (held @ None, memory) => *held = memory,
                (Some(_), None) => {}
            }
            metrics.received.inc();
            if publish.dup {
                metrics.redelivered.inc();
            }
            let at_least_once = publish.qos != QoS::AtMostOnce;
            if at_least_once {
                metrics.in_flight.inc();
            }
            let decoded = if publish.payload.len() as u64 > max_payload {
                Err(Refused {
                    reason: Reason::TooLarge,
                    detail: format!(
                        "a payload of {} bytes, over max_payload_bytes ({max_payload})",
                        publish.payload.len()
                    ),
                })
            } else if unreserved {
                Err(Refused {
                    reason: Reason::TooLarge,
                    detail: format!(
                        "a payload of {} bytes could decode to more than settings.memory_limit allows",
                        publish.payload.len()
                    ),
                })
            } else {
                match topic_fields(self.pattern.as_ref(), &publish.topic) {
                    Some(fields) => self.config.payload.decode_into(
                        &publish.payload,
                        &fields,
                        received_at,
                        limits,
                        &mut readings,
                    ),
                    None => Err(Refused {
                        reason: Reason::Topic,
                        detail: "the topic does not fit topic_pattern".into(),
                    }),
                }
            };
            match decoded {
                Ok(()) if at_least_once => match pending.last_mut() {
                    Some(last) if last.connection == connection => last.pkids.push(publish.pkid),
                    _ => pending.push(Pending {
                        connection,
                        pkids: vec![publish.pkid],
                    }),
                },
                Ok(()) => {}
                Err(refused) => {
                    metrics.refused(refused.reason);
                    log.log(stage, &publish.topic, &refused);
                    if at_least_once {
                        acker.ack(connection, vec![publish.pkid]);
                    }
                }
            }
        }
        if let Some(held) = &mut held {
            held.shrink_to(held_bytes(&readings));
        }
        (readings, held, pending)
    }

    /// Sends `readings` on with their memory reserved, and returns what
    /// acknowledges `pending` once they are written (`written`); with
    /// `accepted` they are acknowledged here, once sent.
    async fn hand_on(
        &self,
        readings: Vec<Reading>,
        memory: Option<Reservation>,
        pending: Vec<Pending>,
        output: &Output,
        cx: &Context,
        acker: &Acker,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let give_back = |acker: &Acker| {
            for p in &pending {
                acker.give_back(&p.pkids, cx.shutdown().is_triggered());
            }
        };
        if readings.is_empty() {
            // Messages at QoS 0, refused, or JSON arrays of no readings.
            for p in pending {
                acker.ack(p.connection, p.pkids);
            }
            return None;
        }
        let mut batch = Batch::from(readings);
        let acknowledgement = match self.config.acknowledge {
            Acknowledge::Accepted => {
                batch.attach(Token::new(memory));
                None
            }
            Acknowledge::Written => {
                let (token, acknowledgement) = Token::acknowledged(memory);
                batch.attach(token);
                Some(acknowledgement)
            }
        };
        if output.send(batch).await.is_err() {
            // Shutting down: the broker keeps them.
            give_back(acker);
            return None;
        }
        let Some(acknowledgement) = acknowledgement else {
            for p in pending {
                acker.ack(p.connection, p.pkids);
            }
            return None;
        };
        let acker = acker.clone();
        let shutdown = cx.shutdown().clone();
        Some(async move {
            let written = acknowledgement.await == Delivery::Written;
            for p in pending {
                if written {
                    acker.ack(p.connection, p.pkids);
                } else {
                    acker.give_back(&p.pkids, shutdown.is_triggered());
                }
            }
        })
    }
}

/// What readings hold in memory: themselves, their names and labels.
fn held_bytes(readings: &[Reading]) -> u64 {
    let text: usize = readings
        .iter()
        .map(|reading| {
            reading.sensor_name.len()
                + reading.labels.text_bytes()
                + reading.labels.len() * std::mem::size_of::<(String, String)>()
        })
        .sum();
    (std::mem::size_of_val(readings) + text) as u64
}

/// The task that owns the client's event loop.
struct ConnectionTask {
    stage: String,
    connection: Connection,
    filters: Vec<SubscribeFilter>,
    client: AsyncClient,
    reconnect: Arc<Notify>,
    metrics: SourceMetrics,
    cx: Context,
    payload: Payload,
    /// The number of the connection up now, counted from 1.
    current: Option<u64>,
}

/// What the connection task does next.
enum Step {
    Event(Result<Event, ConnectionError>),
    Acks(Option<AckRequest>),
    Reconnect,
    Stop,
}

impl ConnectionTask {
    async fn run(
        mut self,
        mut eventloop: EventLoop,
        messages: mpsc::Sender<Delivered>,
        mut acks: mpsc::UnboundedReceiver<AckRequest>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut broker = 0;
        let mut backoff = Backoff::between(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0u64;
        let mut connections = 0u64;
        let mut stopping = false;
        loop {
            // Acknowledgements go first: each one lets the broker send
            // another message. Polling the event loop is cancelled when one
            // arrives; what it was reading stays in its buffer.
            let step = tokio::select! {
                biased;
                _ = &mut stop, if !stopping => Step::Stop,
                // Not while connecting: acknowledgements of an earlier
                // connection would cancel every attempt.
                ack = acks.recv(), if self.current.is_some() => Step::Acks(ack),
                _ = self.reconnect.notified() => Step::Reconnect,
                event = eventloop.poll() => Step::Event(event),
            };
            let event = match step {
                Step::Stop if self.current.is_none() => break,
                Step::Stop => {
                    // The stage has queued its last acknowledgements and
                    // dropped its sender: write them, then leave.
                    stopping = true;
                    continue;
                }
                Step::Acks(Some(first)) => {
                    self.write_acks(&mut eventloop, first, &mut acks).await;
                    continue;
                }
                Step::Acks(None) if stopping => break,
                Step::Acks(None) => {
                    // The stage ended without stopping this task first.
                    break;
                }
                Step::Reconnect => {
                    tracing::info!(
                        stage = self.stage,
                        "reconnecting so that the broker delivers again what was not written"
                    );
                    eventloop.clean();
                    self.disconnected(broker, "reconnecting");
                    continue;
                }
                Step::Event(event) => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connections += 1;
                    self.current = Some(connections);
                    self.metrics.connected.set(1);
                    self.metrics.connections.inc();
                    self.cx.readiness().set_ready(&self.stage);
                    backoff.reset();
                    tracing::info!(
                        stage = self.stage,
                        session_present = ack.session_present,
                        "connected to {} as `{}`{}",
                        self.connection.brokers[broker],
                        self.connection.client_id,
                        if failures > 0 {
                            format!(" after {failures} failed attempts")
                        } else {
                            String::new()
                        }
                    );
                    failures = 0;
                    // A resumed session keeps its subscriptions; subscribing
                    // again would make the broker send retained messages again.
                    if (!ack.session_present || self.connection.clean_session)
                        && let Err(err) = self.client.try_subscribe_many(self.filters.clone())
                    {
                        tracing::warn!(stage = self.stage, "cannot subscribe, reconnecting: {err}");
                        eventloop.clean();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    let filters: Vec<&str> = self.filters.iter().map(|f| f.path.as_str()).collect();
                    if refused == 0 {
                        tracing::info!(stage = self.stage, "subscribed to {filters:?}");
                    } else {
                        tracing::error!(
                            stage = self.stage,
                            "the broker refused {refused} of the subscriptions {filters:?}: nothing arrives on them (check the broker's ACLs)"
                        );
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(connection) = self.current else {
                        continue;
                    };
                    if stopping {
                        // The stage takes no more: the broker keeps it.
                        continue;
                    }
                    let bytes = self
                        .payload
                        .decoded_bound(publish.payload.len(), publish.topic.len());
                    // Waiting for memory, then for room in the queue, is the
                    // backpressure: the socket is not read meanwhile and the
                    // broker holds what it has not sent. Acknowledgements are
                    // still written while waiting.
                    let budget = self.cx.memory().clone();
                    let Some(reserved) = self
                        .acking(&mut eventloop, &mut acks, budget.reserve(bytes))
                        .await
                    else {
                        break;
                    };
                    // A message that could decode to more than the whole
                    // budget is passed unreserved, to be refused.
                    let delivered = Delivered {
                        connection,
                        publish,
                        memory: reserved.ok(),
                    };
                    let sent = self
                        .acking(&mut eventloop, &mut acks, messages.send(delivered))
                        .await
                        .is_some_and(|sent| sent.is_ok());
                    if !sent {
                        // The stage stopped taking messages (shutdown): the
                        // broker keeps this one.
                        stopping = true;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    let why = describe(&err);
                    self.disconnected(broker, &why);
                    if failures.is_multiple_of(10) {
                        tracing::warn!(
                            stage = self.stage,
                            "MQTT broker {}: {why}; retrying",
                            self.connection.brokers[broker],
                        );
                    }
                    failures += 1;
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = &mut stop, if !stopping => stopping = true,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if stopping {
                        // No connection to acknowledge on: the broker
                        // delivers the rest again next time.
                        break;
                    }
                    let brokers = self.connection.brokers.len();
                    if brokers > 1 || self.connection.password_file.is_some() {
                        // The next broker, or the same with a rotated password.
                        broker = (broker + 1) % brokers;
                        match self.connection.options(&self.connection.brokers[broker]) {
                            Ok(options) => eventloop.mqtt_options = options,
                            Err(why) => tracing::warn!(stage = self.stage, "{why}"),
                        }
                    }
                }
            }
        }
        // Whatever is still queued cannot be acknowledged now.
        acks.close();
        while let Ok(request) = acks.try_recv() {
            self.metrics
                .unacknowledged
                .inc_by(request.pkids.len() as u64);
        }
        if self.current.is_some() && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        self.metrics.connected.set(0);
    }

    /// Waits for `wait`, writing acknowledgements as they come meanwhile;
    /// `None` once the stage has queued its last one.
    async fn acking<F: Future>(
        &self,
        eventloop: &mut EventLoop,
        acks: &mut mpsc::UnboundedReceiver<AckRequest>,
        wait: F,
    ) -> Option<F::Output> {
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                ack = acks.recv() => match ack {
                    Some(first) => self.write_acks(eventloop, first, acks).await,
                    None => return None,
                },
                done = &mut wait => return Some(done),
            }
        }
    }

    /// Writes the PUBACKs of `first` and of every request queued behind it
    /// in one flush. Those of an earlier connection are dropped: on a
    /// resumed session the broker has delivered them again, and an old
    /// packet id may name another message now.
    async fn write_acks(
        &self,
        eventloop: &mut EventLoop,
        first: AckRequest,
        acks: &mut mpsc::UnboundedReceiver<AckRequest>,
    ) {
        let mut written = 0u64;
        let mut stale = 0u64;
        let mut failed = false;
        let mut next = Some(first);
        while let Some(request) = next {
            let count = request.pkids.len() as u64;
            match (&mut eventloop.network, self.current) {
                (Some(network), Some(current)) if current == request.connection && !failed => {
                    for pkid in request.pkids {
                        if network
                            .write(Packet::PubAck(PubAck::new(pkid)))
                            .await
                            .is_err()
                        {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        stale += count;
                    } else {
                        written += count;
                    }
                }
                _ => stale += count,
            }
            next = acks.try_recv().ok();
        }
        if written > 0
            && let Some(network) = &mut eventloop.network
            && network.flush().await.is_err()
        {
            // The next poll finds the connection broken and reconnects;
            // the broker delivers these again.
            stale += written;
            written = 0;
        }
        self.metrics.acknowledged.inc_by(written);
        self.metrics.unacknowledged.inc_by(stale);
    }

    fn disconnected(&mut self, broker: usize, why: &str) {
        self.current = None;
        self.metrics.connected.set(0);
        self.metrics.connection_errors.inc();
        self.cx.readiness().set_not_ready(
            &self.stage,
            format!(
                "not connected to the MQTT broker {}: {why}",
                self.connection.brokers[broker]
            ),
        );
    }
}

fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}
