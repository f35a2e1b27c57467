//! The running `postgres` sink: one transaction per batch (or per
//! `max_batch_rows` of it), the batch done once COMMIT has been answered.
//!
//! **Delivery.** A transient failure (the server unreachable, restarting,
//! stalled past `statement_timeout`, out of connections, a deadlock) keeps the
//! batch in hand and retries it with backoff on a new connection; the sink
//! takes nothing new meanwhile, so backpressure reaches the sources (and their
//! memory is bounded by `settings.memory_limit`). A permanent refusal (a
//! permission, a value the column rejects) fails that batch's
//! acknowledgements, is counted by SQLSTATE and logged at most every 10 s.
//!
//! **A COMMIT whose answer was lost** (the connection broke after COMMIT was
//! sent) is not guessed at: every transaction first asks its id
//! (`txid_current()`), and after reconnecting the sink asks the server what
//! became of it (`txid_status`). Committed: the rows are there and are not
//! written again. Aborted: they are not, and are written again. So a reading
//! lands once even then, unless the server cannot say (a transaction id older
//! than the server keeps status for, after days of retrying), when the sink
//! writes it again (at least once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::SinkExt;
use sink_api::backoff::Backoff;
use sink_api::metrics::{Counter, Gauge, Histogram, Metrics};
use sink_api::{
    BuildContext, ConfigError, Context, Input, Params, Readiness, Reading, Sink, SinkConfig,
    StageError,
};
use tokio_postgres::{Client, NoTls, Statement};

use crate::config::{Method, PostgresSinkConfig};
use crate::encode::{self, Binary, COLUMNS, Columns, CopyEncoder, Text};
use crate::schema::{self, SchemaError, Target};
use crate::tls::MakeRustls;

/// COPY data is sent on in pieces of about this size, so that what the sink
/// holds besides its batch stays bounded whatever the batch.
const SEND_BYTES: usize = 64 * 1024;

#[sink_api::stage(name = "postgres")]
impl SinkConfig for PostgresSinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        PostgresSinkConfig::validate(self)
    }

    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        check_at_startup(self, &cx.id)?;
        Ok(Box::new(PostgresSink {
            config: Arc::new(self.clone()),
        }))
    }
}

/// Connects once at startup, on a thread of its own (a stage is built
/// outside any runtime), so that a wrong password or an unfit table stops
/// the pipeline before it starts, named like every other mistake. A database
/// that does not answer is not a mistake in the file: the sink starts,
/// reports not ready, and keeps trying.
fn check_at_startup(config: &PostgresSinkConfig, stage: &str) -> Result<(), ConfigError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| ConfigError::new("url", format!("cannot start a runtime: {err}")))?;
                runtime.block_on(async {
                    match open(config).await {
                        Ok(_) => Ok(()),
                        Err(Refusal::Transient(err)) => {
                            tracing::warn!(
                                stage,
                                "PostgreSQL ({}) is not reachable at startup; the sink starts not ready and keeps retrying: {err}",
                                config.describe()
                            );
                            Ok(())
                        }
                        Err(Refusal::Permanent { key, message, .. }) => Err(ConfigError::new(
                            key,
                            format!("PostgreSQL ({}): {message}", config.describe()),
                        )),
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| Err(ConfigError::new("url", "the startup check panicked")))
    })
}

/// Why a connection or a write failed, and whether trying again can help.
#[derive(Debug)]
enum Refusal {
    /// Try again (with backoff, on a new connection).
    Transient(String),
    /// Trying again gives the same answer: `reason` counts it (a SQLSTATE,
    /// or a word), `key` is the key to fix.
    Permanent {
        reason: String,
        key: &'static str,
        message: String,
    },
}

impl Refusal {
    fn permanent(reason: impl Into<String>, key: &'static str, message: String) -> Self {
        Self::Permanent {
            reason: reason.into(),
            key,
            message,
        }
    }
}

/// What an error from the server means. A connection or resource problem
/// (classes 08, 53, 57, 58), a conflict (40, 55) or a read-only server (a
/// standby during a failover, 25006) can heal; the rest (bad data, missing
/// privilege or object) cannot.
fn classify(err: &tokio_postgres::Error, key: &'static str) -> Refusal {
    let Some(db) = err.as_db_error() else {
        return Refusal::Transient(err.to_string());
    };
    let code = db.code().code();
    let message = match db.detail() {
        Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
        None => format!("{}: {}", db.severity(), db.message()),
    };
    let class = &code[..2.min(code.len())];
    if matches!(class, "08" | "40" | "53" | "55" | "57" | "58") || code == "25006" {
        Refusal::Transient(format!("{message} [SQLSTATE {code}]"))
    } else {
        let key = if class == "28" || code == "3D000" {
            "url"
        } else {
            key
        };
        Refusal::permanent(code, key, format!("{message} [SQLSTATE {code}]"))
    }
}

/// As [`classify`], and a handshake the certificates refused is a mistake
/// in `tls`, not something to retry.
fn classify_tls(err: &tokio_postgres::Error) -> Refusal {
    let mut cause = std::error::Error::source(err);
    while let Some(error) = cause {
        let refused = error.downcast_ref::<rustls::Error>().is_some()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if refused {
            return Refusal::permanent("tls", "tls", format!("TLS refused: {err}"));
        }
        cause = error.source();
    }
    classify(err, "url")
}

/// An open connection whose table has been checked.
struct Session {
    client: Client,
    target: Target,
    /// The statement that writes rows, prepared for `method`.
    statement: Option<(Method, Statement)>,
}

/// Connects and checks (or creates) the table.
async fn open(config: &PostgresSinkConfig) -> Result<Session, Refusal> {
    let settings = config
        .connection()
        .await
        .map_err(|message| Refusal::permanent("config", "password_file", message))?;
    // `connect_timeout` bounds the TCP connection alone; a server that
    // accepts it and then stalls (SIGSTOP, an overloaded host) would hold
    // the startup exchange forever.
    let timed_out = || {
        Refusal::Transient(format!(
            "no answer within connect_timeout ({:?})",
            config.connect_timeout
        ))
    };
    // The connection's I/O runs on its own task and ends when the client is
    // dropped; its error, if any, reaches the client's next call.
    let client = match &config.tls {
        None => {
            let (client, connection) =
                tokio::time::timeout(config.connect_timeout, settings.connect(NoTls))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|err| classify(&err, "url"))?;
            tokio::spawn(connection);
            client
        }
        Some(tls) => {
            let rustls = tls
                .client_config()
                .await
                .map_err(|message| Refusal::permanent("tls", "tls", message))?;
            let make = MakeRustls(Arc::new(rustls));
            let (client, connection) =
                tokio::time::timeout(config.connect_timeout, settings.connect(make))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|err| classify_tls(&err))?;
            tokio::spawn(connection);
            client
        }
    };
    let target = tokio::time::timeout(
        config.statement_timeout,
        schema::prepare(&client, &config.table, config.create_table),
    )
    .await
    .map_err(|_| {
        Refusal::Transient(format!(
            "the table check got no answer within statement_timeout ({:?})",
            config.statement_timeout
        ))
    })?
    .map_err(|err| match err {
        SchemaError::Unfit(message) => Refusal::permanent("table", "table", message),
        SchemaError::Database(err) => classify(&err, "table"),
    })?;
    Ok(Session {
        client,
        target,
        statement: None,
    })
}

impl Session {
    async fn statement(&mut self, method: Method) -> Result<Statement, tokio_postgres::Error> {
        if let Some((prepared, statement)) = &self.statement
            && *prepared == method
        {
            return Ok(statement.clone());
        }
        let table = &self.target.table;
        let columns = COLUMNS.join(", ");
        let sql = match method {
            Method::CopyBinary => format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)"),
            Method::CopyText => format!("COPY {table} ({columns}) FROM STDIN"),
            Method::Insert => {
                let json = match self.target.labels {
                    encode::LabelsType::Jsonb => "jsonb",
                    encode::LabelsType::Json => "json",
                };
                format!(
                    "INSERT INTO {table} ({columns}) \
                     SELECT n, l::{json}, v, f, \
                            timestamptz 'epoch' + c * interval '1 microsecond', \
                            timestamptz 'epoch' + r * interval '1 microsecond' \
                     FROM unnest($1::text[], $2::text[], $3::int8[], $4::float8[], $5::int8[], $6::int8[]) \
                       AS u(n, l, v, f, c, r)"
                )
            }
        };
        let statement = self.client.prepare(&sql).await?;
        self.statement = Some((method, statement.clone()));
        Ok(statement)
    }
}

/// Once, then at most every 10 s: how the sink logs what repeats.
#[derive(Default)]
struct Every10s {
    last: Option<Instant>,
    suppressed: u64,
}

impl Every10s {
    /// `Some(how many were not logged since)` when it is time to log.
    fn due(&mut self) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| last.elapsed() < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct PostgresSink {
    config: Arc<PostgresSinkConfig>,
}

#[async_trait]
impl Sink for PostgresSink {
    async fn run(self: Box<Self>, mut input: Input, cx: Context) -> Result<(), StageError> {
        let mut params = cx.params::<PostgresSinkConfig>();
        let mut writer = Writer::new(self.config, &cx);
        writer.connect().await;
        loop {
            let batch = if writer.session.is_some() {
                input.recv().await
            } else {
                // Idle and disconnected: keep trying, so that readiness
                // comes back without waiting for traffic.
                tokio::select! {
                    batch = input.recv() => batch,
                    _ = writer.reconnect_after_backoff() => continue,
                }
            };
            let Some(batch) = batch else { break };
            writer.write(&batch, &mut params, &mut input).await;
        }
        Ok(())
    }
}

/// Writes batches, holding the connection and the sink's metrics.
struct Writer {
    stage: String,
    config: Arc<PostgresSinkConfig>,
    session: Option<Session>,
    readiness: Readiness,
    backoff: Backoff,
    binary: Binary,
    text: Text,
    buffer: Vec<u8>,
    /// The id of a transaction whose COMMIT was sent but not answered.
    in_doubt: Option<i64>,
    /// New parameters waiting for a transaction in doubt to be settled.
    pending: Option<Arc<PostgresSinkConfig>>,
    connect_log: Every10s,
    retry_log: Every10s,
    refusal_log: Every10s,
    metrics: Metrics,
    rows_written: Counter,
    committed: Counter,
    retries: Counter,
    commit_seconds: Histogram,
    connected: Gauge,
}

impl Writer {
    fn new(config: Arc<PostgresSinkConfig>, cx: &Context) -> Self {
        let metrics = cx.metrics().clone();
        Self {
            stage: cx.id().to_string(),
            config,
            session: None,
            readiness: cx.readiness().clone(),
            backoff: Backoff::new(),
            binary: Binary::new(encode::LabelsType::Jsonb),
            text: Text::default(),
            buffer: Vec::with_capacity(SEND_BYTES * 2),
            in_doubt: None,
            pending: None,
            connect_log: Every10s::default(),
            retry_log: Every10s::default(),
            refusal_log: Every10s::default(),
            rows_written: metrics.counter(
                "sink_postgres_rows_written_total",
                "Rows in transactions that committed",
            ),
            committed: metrics.counter(
                "sink_postgres_batches_committed_total",
                "Transactions committed (a batch over max_batch_rows takes several)",
            ),
            retries: metrics.counter(
                "sink_postgres_retries_total",
                "Transactions tried again after a transient failure (connection lost, server restarting or stalled)",
            ),
            commit_seconds: metrics.histogram(
                "sink_postgres_commit_seconds",
                "Time from BEGIN to COMMIT answered, per transaction",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            connected: metrics.gauge(
                "sink_postgres_connected",
                "1 while the sink holds a checked connection to the database, else 0",
            ),
            metrics,
        }
    }

    /// Tries once to connect; readiness says how it went.
    async fn connect(&mut self) -> bool {
        match open(&self.config).await {
            Ok(session) => {
                self.binary.labels = session.target.labels;
                self.session = Some(session);
                self.connected.set(1);
                self.readiness.set_ready(&self.stage);
                if self.connect_log.last.is_some() {
                    tracing::info!(
                        stage = self.stage,
                        "connected to PostgreSQL ({})",
                        self.config.describe()
                    );
                    self.connect_log = Every10s::default();
                }
                true
            }
            Err(refusal) => {
                let message = match &refusal {
                    Refusal::Transient(message) => message.clone(),
                    Refusal::Permanent { message, .. } => message.clone(),
                };
                self.readiness.set_not_ready(
                    &self.stage,
                    format!(
                        "PostgreSQL ({}) unavailable: {message}",
                        self.config.describe()
                    ),
                );
                if let Some(suppressed) = self.connect_log.due() {
                    tracing::warn!(
                        stage = self.stage,
                        "cannot connect to PostgreSQL ({}), retrying with backoff: {message}{}",
                        self.config.describe(),
                        repeated(suppressed)
                    );
                }
                false
            }
        }
    }

    async fn reconnect_after_backoff(&mut self) {
        tokio::time::sleep(self.backoff.next_delay()).await;
        if self.connect().await {
            self.backoff.reset();
        }
    }

    fn disconnect(&mut self) {
        if self.session.take().is_some() {
            self.connected.set(0);
        }
    }

    /// Takes new parameters; a new database or table is connected to first,
    /// and kept only once it answers and has a fit table.
    async fn apply(&mut self, new: Arc<PostgresSinkConfig>) {
        if !self.config.target_differs(&new) {
            self.config = new;
            return;
        }
        match open(&new).await {
            Ok(session) => {
                tracing::info!(
                    stage = self.stage,
                    "now writing to table `{}` of PostgreSQL ({})",
                    session.target.table,
                    new.describe()
                );
                self.binary.labels = session.target.labels;
                self.session = Some(session);
                self.connected.set(1);
                self.readiness.set_ready(&self.stage);
                self.config = new;
            }
            Err(refusal) => tracing::warn!(
                stage = self.stage,
                "the reloaded `url` or `table` cannot be written ({refusal:?}); still writing to PostgreSQL ({})",
                self.config.describe()
            ),
        }
    }

    /// Writes `batch` in transactions of at most `max_batch_rows`, retrying
    /// each until it commits or is refused for good.
    async fn write(
        &mut self,
        batch: &[Reading],
        params: &mut Params<PostgresSinkConfig>,
        input: &mut Input,
    ) {
        let mut start = 0;
        while start < batch.len() {
            if let Some(new) = params.try_changed() {
                self.pending = Some(new);
            }
            // A transaction in doubt is settled on the database it ran on
            // before writing moves elsewhere.
            if self.in_doubt.is_none()
                && let Some(new) = self.pending.take()
            {
                self.apply(new).await;
            }
            let end = batch.len().min(start + self.config.max_batch_rows);
            let chunk = &batch[start..end];
            match self.write_chunk(chunk).await {
                Ok(()) => {
                    self.backoff.reset();
                    start = end;
                }
                Err(Refusal::Transient(message)) => {
                    self.retries.inc();
                    let delay = self.backoff.next_delay();
                    if let Some(suppressed) = self.retry_log.due() {
                        tracing::warn!(
                            stage = self.stage,
                            "{} rows not written to PostgreSQL ({}), retrying in {delay:?}: {message}{}",
                            chunk.len(),
                            self.config.describe(),
                            repeated(suppressed)
                        );
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(Refusal::Permanent {
                    reason, message, ..
                }) => {
                    self.metrics
                        .counter_with(
                            "sink_postgres_batches_failed_total",
                            "Batches refused for good (by SQLSTATE, or `table`), whose acknowledgements failed",
                            &[("reason", &reason)],
                        )
                        .inc();
                    if let Some(suppressed) = self.refusal_log.due() {
                        tracing::error!(
                            stage = self.stage,
                            "PostgreSQL ({}) refused a batch of {} readings for good; its clients are told it failed: {message}{}",
                            self.config.describe(),
                            batch.len(),
                            repeated(suppressed)
                        );
                    }
                    input.fail_taken();
                    return;
                }
            }
        }
    }

    /// One transaction, on a connection made first if need be.
    async fn write_chunk(&mut self, chunk: &[Reading]) -> Result<(), Refusal> {
        if self.session.is_none() && !self.connect().await {
            return Err(Refusal::Transient("not connected".into()));
        }
        if let Some(xid) = self.in_doubt {
            match self.resolve(xid).await? {
                true => {
                    self.count_committed(chunk, None);
                    return Ok(());
                }
                false => self.in_doubt = None,
            }
        }
        let deadline = self.config.statement_timeout + Duration::from_secs(1);
        let started = Instant::now();
        let outcome = tokio::time::timeout(deadline, self.transaction(chunk)).await;
        let result = match outcome {
            Ok(Ok(())) => {
                self.count_committed(chunk, Some(started.elapsed()));
                return Ok(());
            }
            Ok(Err(err)) => {
                let refusal = classify(&err, "table");
                // A server that answered leaves the connection usable once
                // the failed transaction is rolled back.
                let usable = match (&self.session, err.as_db_error()) {
                    (Some(session), Some(_)) if !session.client.is_closed() => {
                        let rollback = session.client.batch_execute("ROLLBACK");
                        matches!(tokio::time::timeout(deadline, rollback).await, Ok(Ok(())))
                    }
                    _ => false,
                };
                if !usable {
                    self.disconnect();
                }
                refusal
            }
            Err(_) => {
                self.disconnect();
                Refusal::Transient(format!(
                    "no answer within statement_timeout ({:?})",
                    self.config.statement_timeout
                ))
            }
        };
        Err(result)
    }

    fn count_committed(&mut self, chunk: &[Reading], took: Option<Duration>) {
        self.in_doubt = None;
        let refused = chunk.iter().filter_map(encode::refused).count();
        if refused > 0 {
            self.metrics
                .counter_with(
                    "sink_postgres_rows_refused_total",
                    "Readings not written because PostgreSQL cannot store them (a NUL character in text)",
                    &[("reason", "nul")],
                )
                .inc_by(refused as u64);
            if let Some(suppressed) = self.refusal_log.due() {
                tracing::warn!(
                    stage = self.stage,
                    "{refused} readings skipped: a NUL character in a name or label, which PostgreSQL text cannot hold{}",
                    repeated(suppressed)
                );
            }
        }
        self.rows_written.inc_by((chunk.len() - refused) as u64);
        self.committed.inc();
        if let Some(took) = took {
            self.commit_seconds.observe(took.as_secs_f64());
        }
    }

    /// Whether the transaction `xid`, whose COMMIT was not answered,
    /// committed; an error while it is still running on the server (its
    /// backend has not yet noticed the broken connection).
    async fn resolve(&mut self, xid: i64) -> Result<bool, Refusal> {
        let session = self.session.as_ref().expect("connected before");
        let asked = tokio::time::timeout(
            self.config.statement_timeout,
            session
                .client
                .query_one("SELECT txid_status($1)::text", &[&xid]),
        )
        .await;
        let status: Option<String> = match asked {
            Ok(Ok(row)) => row.get(0),
            Ok(Err(err)) => {
                let refusal = classify(&err, "table");
                self.disconnect();
                return Err(refusal);
            }
            Err(_) => {
                self.disconnect();
                return Err(Refusal::Transient("no answer to txid_status".into()));
            }
        };
        let outcome = status.as_deref().unwrap_or("unknown");
        self.metrics
            .counter_with(
                "sink_postgres_commits_in_doubt_total",
                "Transactions whose COMMIT answer was lost, by what the server said became of them",
                &[("outcome", outcome)],
            )
            .inc();
        tracing::info!(
            stage = self.stage,
            "the COMMIT of transaction {xid} was not answered; the server says it is {outcome}: {}",
            match outcome {
                "committed" => "its rows are kept, not written again",
                "in progress" => "asking again",
                _ => "its rows are written again",
            }
        );
        if outcome == "in progress" {
            return Err(Refusal::Transient(format!(
                "transaction {xid} still in progress"
            )));
        }
        Ok(outcome == "committed")
    }

    /// BEGIN, the rows, COMMIT.
    async fn transaction(&mut self, chunk: &[Reading]) -> Result<(), tokio_postgres::Error> {
        let method = self.config.method;
        let timeout_ms = self.config.statement_timeout.as_millis();
        let session = self.session.as_mut().expect("connected before");
        let statement = session.statement(method).await?;
        let client = &session.client;
        let begun = client
            .simple_query(&format!(
                "BEGIN; SET LOCAL statement_timeout = {timeout_ms}; SELECT txid_current()"
            ))
            .await?;
        let xid = begun.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse::<i64>().ok(),
            _ => None,
        });
        let rows = chunk.iter().filter(|r| encode::refused(r).is_none());
        match method {
            Method::Insert => {
                let columns = Columns::of(rows);
                client
                    .execute(
                        &statement,
                        &[
                            &columns.names,
                            &columns.labels,
                            &columns.ints,
                            &columns.floats,
                            &columns.created,
                            &columns.received,
                        ],
                    )
                    .await?;
            }
            Method::CopyBinary | Method::CopyText => {
                let encoder: &mut dyn CopyEncoder = match method {
                    Method::CopyBinary => &mut self.binary,
                    _ => &mut self.text,
                };
                let sink = client.copy_in::<_, Bytes>(&statement).await?;
                futures_util::pin_mut!(sink);
                self.buffer.clear();
                encoder.header(&mut self.buffer);
                for reading in rows {
                    encoder.row(reading, &mut self.buffer);
                    if self.buffer.len() >= SEND_BYTES {
                        sink.feed(Bytes::copy_from_slice(&self.buffer)).await?;
                        self.buffer.clear();
                    }
                }
                encoder.trailer(&mut self.buffer);
                sink.feed(Bytes::copy_from_slice(&self.buffer)).await?;
                self.buffer.clear();
                sink.as_mut().finish().await?;
            }
        }
        self.in_doubt = xid;
        let committed = client.batch_execute("COMMIT").await;
        // An answer, even a refusal, settles it; only silence leaves it in doubt.
        if committed
            .as_ref()
            .map_or_else(|err| err.as_db_error().is_some(), |_| true)
        {
            self.in_doubt = None;
        }
        committed
    }
}

fn repeated(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more like it in the last 10 s)")
    }
}
