//! The runtime's metrics: per-stage counts read from the counters the
//! channels already keep, reload outcomes, build info and the process's own
//! `process_*` figures. Stages add theirs through `Context::metrics`.
//!
//! Per-stage counts cost nothing on the hot path beyond the relaxed atomic
//! additions `Input` and `Output` make once per batch: they are read when
//! `/metrics` is scraped, by a [`Collector`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use sink_api::metrics::{Counter, MetricsRegistry};
use sink_api::{ChannelFill, Inlet, MemoryBudget, StageKind};

/// One stage's counters, as the runtime wired them.
#[derive(Debug)]
pub struct StageCounters {
    /// `stage`, `type`, `kind`.
    pub labels: [(&'static str, String); 3],
    /// Readings taken in (for a source: accepted, the same as sent).
    pub received: Arc<AtomicU64>,
    /// Readings handed on (for a sink: written).
    pub sent: Arc<AtomicU64>,
    /// Batches handed on (for a sink: written).
    pub batches: Arc<AtomicU64>,
    /// The stage's input channel and its capacity; none for a source.
    pub input: Option<(ChannelFill, usize)>,
    /// The same channel's counts: readings meant for it but dropped (its
    /// `when_full = "drop"`, or after it failed); none for a source.
    pub inlet: Option<Arc<Inlet>>,
}

impl StageCounters {
    /// The labels of stage `id` of `type_name` and `kind`.
    pub fn labels(id: &str, type_name: &str, kind: StageKind) -> [(&'static str, String); 3] {
        [
            ("stage", id.to_string()),
            ("type", type_name.to_string()),
            ("kind", kind.as_str().to_string()),
        ]
    }
}

/// Encodes every stage's `sink_stage_*` families at each scrape.
#[derive(Debug)]
pub struct StageCollector(pub Vec<StageCounters>);

impl Collector for StageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        type Read = fn(&StageCounters) -> Option<u64>;
        let counters: [(&str, &str, Read); 4] = [
            (
                "sink_stage_readings_received",
                "Readings each stage took in (for a source: accepted)",
                |s| Some(s.received.load(Ordering::Relaxed)),
            ),
            (
                "sink_stage_readings_sent",
                "Readings each stage handed on (for a sink: written)",
                |s| Some(s.sent.load(Ordering::Relaxed)),
            ),
            (
                "sink_stage_batches_sent",
                "Batches each stage handed on (for a sink: written)",
                |s| Some(s.batches.load(Ordering::Relaxed)),
            ),
            (
                "sink_stage_readings_dropped",
                "Readings meant for each stage's input but not put in: it was full under when_full = \"drop\", or the stage had failed and stopped",
                |s| Some(s.inlet.as_ref()?.dropped()),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, COUNTER)?;
            for stage in &self.0 {
                if let Some(value) = read(stage) {
                    ConstCounter::new(value).encode(family.encode_family(&stage.labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, Read); 2] = [
            (
                "sink_stage_input_batches",
                "Batches waiting in each stage's input channel",
                |s| {
                    let (fill, _) = s.input.as_ref()?;
                    Some(fill.waiting().unwrap_or(0) as u64)
                },
            ),
            (
                "sink_stage_input_capacity_batches",
                "Capacity of each stage's input channel, in batches",
                |s| Some(s.input.as_ref()?.1 as u64),
            ),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, GAUGE)?;
            for stage in &self.0 {
                if let Some(value) = read(stage) {
                    ConstGauge::new(value as i64).encode(family.encode_family(&stage.labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// `settings.memory_limit` and what is reserved under it, read at each scrape.
#[derive(Debug)]
pub struct MemoryCollector(pub MemoryBudget);

impl Collector for MemoryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let gauges = [
            (
                "sink_memory_limit_bytes",
                "settings.memory_limit: the most the readings in flight may hold, in bytes",
                self.0.limit(),
            ),
            (
                "sink_memory_reserved_bytes",
                "Bytes the readings in flight hold now under settings.memory_limit (reserved per call, in KiB steps)",
                self.0.used(),
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                .encode(encoder.encode_descriptor(name, help, None, GAUGE)?)?;
        }
        Ok(())
    }
}

const COUNTER: prometheus_client::metrics::MetricType =
    prometheus_client::metrics::MetricType::Counter;
const GAUGE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Gauge;

/// How a reload ended, the `outcome` label of `sink_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Live changes were handed to the stages.
    Applied,
    /// The file changed nothing.
    Unchanged,
    /// The file could not be read or has mistakes; nothing changed.
    Failed,
    /// The change needs a restart; nothing changed.
    Refused,
}

impl ReloadOutcome {
    const ALL: [Self; 4] = [Self::Applied, Self::Unchanged, Self::Failed, Self::Refused];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

/// The runtime's own metrics.
#[derive(Debug, Clone)]
pub struct RuntimeMetrics {
    reloads: [Counter; 4],
    last_success: Gauge<f64, AtomicU64>,
}

impl RuntimeMetrics {
    /// Registers the runtime's metrics and the process collector in `registry`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let process = registry.with_labels(Vec::new());
        let reloads = ReloadOutcome::ALL.map(|outcome| {
            process.counter_with(
                "sink_reloads_total",
                "Reloads of the pipeline file, by outcome: applied, unchanged, failed (unreadable or invalid), refused (needs a restart)",
                &[("outcome", outcome.as_str())],
            )
        });
        let build = process.gauge_with(
            "sink_build_info",
            "Always 1; the version of the running sink is in its label",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        build.set(1);
        let last_success = Gauge::<f64, AtomicU64>::default();
        last_success.set(unix_now());
        registry.register_with(|inner| {
            inner.register(
                "sink_last_reload_success_timestamp_seconds",
                "When the running configuration was last loaded successfully (at start, or by a reload that applied or found nothing to change), in Unix seconds",
                last_success.clone(),
            );
        });
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            reloads,
            last_success,
        }
    }

    /// Counts a reload that ended with `outcome`.
    pub fn reloaded(&self, outcome: ReloadOutcome) {
        let index = ReloadOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.reloads[index].inc();
        if matches!(outcome, ReloadOutcome::Applied | ReloadOutcome::Unchanged) {
            self.last_success.set(unix_now());
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The standard `process_*` metrics, read from `/proc/self` at each scrape.
/// Off Linux, or when `/proc` is not mounted, they are left out.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(stat) = ProcessStat::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(stat.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            COUNTER,
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Some(stat.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                Some(stat.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                open_fds(),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                max_fds(),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                ConstGauge::new(value as i64)
                    .encode(encoder.encode_descriptor(name, help, None, GAUGE)?)?;
            }
        }
        if let Some(start) = stat.start_time_seconds {
            ConstGauge::new(start).encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                GAUGE,
            )?)?;
        }
        Ok(())
    }
}

/// What `/proc/self/stat` tells.
struct ProcessStat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    start_time_seconds: Option<f64>,
}

impl ProcessStat {
    fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name, field 2, is in parentheses and may hold spaces.
        let rest = &text[text.rfind(')')? + 2..];
        // `rest` starts at field 3 (state): field N is at index N - 3.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let start_time_seconds = boot_time()
            .zip(field(22))
            .map(|(boot, start)| boot + start as f64 / ticks);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            start_time_seconds,
        })
    }
}

/// When the machine booted, in Unix seconds (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|line| line.starts_with("btime "))?;
    line[6..].trim().parse().ok()
}

fn open_fds() -> Option<u64> {
    // The directory's own descriptor, open while it is read, is counted out.
    let count = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(count.saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    let done = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (done == 0).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_are_read_from_proc() {
        let stat = ProcessStat::read().expect("/proc/self/stat");
        assert!(stat.resident_bytes > 0);
        let start = stat.start_time_seconds.expect("start time");
        assert!(start > 1.0e9 && start <= unix_now() + 1.0, "{start}");
        assert!(open_fds().expect("fds") >= 3);
    }

    #[test]
    fn every_reload_outcome_is_exported_from_the_start() {
        let registry = MetricsRegistry::new();
        let metrics = RuntimeMetrics::register(&registry);
        metrics.reloaded(ReloadOutcome::Refused);
        let text = registry.encode(false);
        for outcome in ["applied", "unchanged", "failed"] {
            assert!(
                text.contains(&format!("sink_reloads_total{{outcome=\"{outcome}\"}} 0")),
                "{text}"
            );
        }
        assert!(text.contains("sink_reloads_total{outcome=\"refused\"} 1"));
        assert!(text.contains(&format!(
            "sink_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("process_cpu_seconds_total "));
        assert!(text.contains("process_start_time_seconds "));
    }
}
