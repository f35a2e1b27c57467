//! `--mqtt URL`: plays sensors that publish to an MQTT broker instead of
//! calling the sink, one reading per message (its value as text, the
//! `payload = "number"` format) on `<topic>/s<i>`, to measure the `mqtt`
//! source through a broker. At QoS 1 a message counts once the broker
//! acknowledged it (PUBACK), and its latency is publish to PUBACK; at QoS 0
//! once it is written to the socket.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::Instant;

use crate::stats::{Report, latency_histogram};

/// What one run publishes.
pub struct MqttLoad {
    /// `mqtt://HOST:PORT`.
    pub url: String,
    /// 0 or 1.
    pub qos: u8,
    /// Topics are `<topic>/s<i>`, `i` cycling over `sensors`.
    pub topic: String,
    pub sensors: u64,
    /// Messages in all, or until `deadline`.
    pub count: Option<u64>,
    pub duration: Duration,
    /// Publishing clients, each its own connection.
    pub connections: u64,
    /// Messages each client has unacknowledged at most (QoS 1).
    pub in_flight: u16,
}

/// One client's tally.
struct Tally {
    acknowledged: u64,
    latency: hdrhistogram::Histogram<u64>,
}

/// Runs the load; the report counts messages as calls and readings.
pub async fn run(load: &MqttLoad) -> anyhow::Result<Report> {
    let (host, port) = parse_url(&load.url)?;
    let qos = if load.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut clients = Vec::new();
    for client in 0..load.connections {
        // Each client publishes every `connections`-th message.
        let share = load
            .count
            .map(|count| count / load.connections + u64::from(client < count % load.connections));
        let mut options = MqttOptions::new(
            format!("sink-load-{}-{client}", std::process::id()),
            host.clone(),
            port,
        );
        options
            .set_inflight(load.in_flight.max(1))
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let topic = load.topic.clone();
        let sensors = load.sensors;
        clients.push(tokio::spawn(publish(
            options, qos, topic, sensors, client, share, deadline,
        )));
    }
    let mut latency = latency_histogram();
    let mut acknowledged = 0;
    for client in clients {
        let tally = client.await.context("a publisher panicked")??;
        acknowledged += tally.acknowledged;
        latency.add(&tally.latency).context("merging latencies")?;
    }
    Ok(Report {
        elapsed: start.elapsed(),
        calls_ok: acknowledged,
        readings_acked: acknowledged,
        calls_failed: 0,
        retries: 0,
        errors: Default::default(),
        latency,
    })
}

/// One client: publishes `share` messages (or until `deadline`) and waits
/// for the broker to acknowledge them all.
async fn publish(
    options: MqttOptions,
    qos: QoS,
    topic: String,
    sensors: u64,
    client_number: u64,
    share: Option<u64>,
    deadline: Instant,
) -> anyhow::Result<Tally> {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut tally = Tally {
        acknowledged: 0,
        latency: latency_histogram(),
    };
    let topics: Vec<String> = (0..sensors).map(|i| format!("{topic}/s{i}")).collect();
    let mut publisher = Some(tokio::spawn(async move {
        let mut sent = 0u64;
        while share.is_none_or(|share| sent < share) && Instant::now() < deadline {
            let i = sent + client_number;
            let topic = &topics[(i % sensors) as usize];
            if client
                .publish(topic.as_str(), qos, false, i.to_string().into_bytes())
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        (client, sent)
    }));
    // Publish times by packet id, for latency to PUBACK.
    let mut pending: HashMap<u16, Instant> = HashMap::new();
    let mut sent = None;
    loop {
        if let Some(done) = publisher.take_if(|task| task.is_finished()) {
            sent = Some(done.await.context("publisher")?);
        }
        if let Some((_, count)) = &sent
            && tally.acknowledged >= *count
        {
            break;
        }
        let event = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        let Ok(event) = event else { continue };
        match event.context("the connection to the broker failed")? {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if qos == QoS::AtMostOnce {
                    tally.acknowledged += 1;
                    tally.latency.saturating_record(1);
                } else {
                    pending.insert(pkid, Instant::now());
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                tally.acknowledged += 1;
                if let Some(at) = pending.remove(&ack.pkid) {
                    tally
                        .latency
                        .saturating_record(at.elapsed().as_micros() as u64);
                }
            }
            _ => {}
        }
    }
    if let Some((client, _)) = sent {
        let _ = client.try_disconnect();
        for _ in 0..4 {
            match tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                _ => {}
            }
        }
    }
    Ok(tally)
}

fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("--mqtt `{url}`: write mqtt://HOST:PORT"))?;
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port = port
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("--mqtt `{url}`: bad port"))?;
    Ok((host.to_owned(), port))
}
