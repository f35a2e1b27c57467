//! Metrics a stage exports beside the built-in ones (`[api]` serves them at
//! `/metrics`).
//!
//! A stage gets its [`Metrics`] handle from [`Context::metrics`](crate::Context::metrics)
//! and creates its counters, gauges and histograms once, when it starts; each
//! is then updated with plain atomic operations, with no lock, so a stage can
//! move them once per batch on its hot path. Every series carries the stage's
//! `stage` (its id), `type` and `kind` labels; two stages of one type share a
//! metric family, told apart by those labels.
//!
//! ```
//! # async fn demo(mut input: sink_api::Input, cx: sink_api::Context) {
//! let dropped = cx.metrics().counter(
//!     "myfilter_dropped_readings_total",
//!     "Readings the filter dropped.",
//! );
//! while let Some(mut batch) = input.recv().await {
//!     let before = batch.len();
//!     batch.retain(|reading| reading.value.is_some());
//!     dropped.inc_by((before - batch.len()) as u64);
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;

use crate::StageKind;

/// The labels of one series: the stage's, then any the metric adds.
type Labels = Vec<(String, String)>;

/// The registry every metric of one process is registered in: the runtime
/// makes one, hands each stage a [`Metrics`] from it, and encodes it for
/// `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    families: HashMap<String, Registered>,
}

/// A family registered under a name, to hand out more series of it.
#[derive(Debug, Clone)]
enum Registered {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, Gauge>),
    Histogram(Family<Labels, Histogram, Buckets>),
}

/// The content type of [`MetricsRegistry::encode`]'s Prometheus text format.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The content type of [`MetricsRegistry::encode`]'s OpenMetrics text format.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle for stage `id` of `type_name` and `kind`: its metrics carry
    /// those three labels.
    pub fn for_stage(&self, id: &str, type_name: &str, kind: StageKind) -> Metrics {
        self.with_labels(vec![
            ("stage".into(), id.into()),
            ("type".into(), type_name.into()),
            ("kind".into(), kind.as_str().into()),
        ])
    }

    /// A handle whose metrics carry `labels` (none for process-wide ones).
    pub fn with_labels(&self, labels: Vec<(String, String)>) -> Metrics {
        Metrics {
            registry: Some(self.clone()),
            labels,
        }
    }

    /// Adds a collector, asked for its values at each scrape: for values the
    /// process already keeps (counters of the runtime, `/proc`).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().registry.register_collector(collector);
    }

    /// Registers directly in the underlying prometheus-client registry, for
    /// a metric the handles do not make (a gauge of `f64`).
    pub fn register_with(&self, register: impl FnOnce(&mut Registry)) {
        register(&mut self.lock().registry);
    }

    /// Everything registered, in the Prometheus text format (`openmetrics`
    /// false) or the OpenMetrics one.
    pub fn encode(&self, openmetrics: bool) -> String {
        let inner = self.lock();
        let mut text = String::with_capacity(16 * 1024);
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut text, &inner.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &inner.registry)
        };
        // Writing into a String cannot fail; a collector's error would leave
        // a partial text, which is still better than none.
        let _ = encoded;
        text
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Registration cannot leave the maps half-changed: a panic elsewhere
        // while holding the lock does not make them wrong.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The family registered as `name`, registering `make()` if none is.
    fn family(&self, name: &str, help: &str, make: impl FnOnce() -> Registered) -> Registered {
        let mut inner = self.lock();
        if let Some(found) = inner.families.get(name) {
            return found.clone();
        }
        let family = make();
        // prometheus-client adds a counter's `_total` itself.
        let registered_name = match family {
            Registered::Counter(_) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let help = help.trim_end_matches('.').to_string();
        match &family {
            Registered::Counter(f) => inner.registry.register(registered_name, help, f.clone()),
            Registered::Gauge(f) => inner.registry.register(registered_name, help, f.clone()),
            Registered::Histogram(f) => inner.registry.register(registered_name, help, f.clone()),
        }
        inner.families.insert(name.to_string(), family.clone());
        family
    }
}

/// A stage's handle for creating its own metrics; see the [module docs](self).
///
/// Create each metric once (they are cheap to clone and update) rather than
/// per batch: creating one takes a lock. A name that is already registered
/// with another type of metric gives a metric that is not exported.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// None for a handle that exports nothing (tests, tools).
    registry: Option<MetricsRegistry>,
    labels: Labels,
}

impl Metrics {
    /// A handle whose metrics count but are exported nowhere.
    pub fn detached() -> Self {
        Self::default()
    }

    /// A counter named `name` (ending in `_total`), explained by `help`.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.counter_with(name, help, &[])
    }

    /// A counter with `labels` beside the stage's own, such as
    /// `[("reason", "size")]`: one series of the family per label value.
    /// (Name them apart from `stage`, `type` and `kind`, which are taken: a
    /// label of one of those names is exported as `exported_<name>`.)
    ///
    /// ```
    /// let metrics = sink_api::metrics::Metrics::detached();
    /// let ok = metrics.counter_with("my_calls_total", "Calls.", &[("code", "OK")]);
    /// ok.inc();
    /// assert_eq!(ok.get(), 1);
    /// ```
    pub fn counter_with(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        let Some(registry) = &self.registry else {
            return Counter::default();
        };
        match registry.family(name, help, || Registered::Counter(Family::default())) {
            Registered::Counter(family) => family.get_or_create_owned(&self.labels_with(labels)),
            _ => Counter::default(),
        }
    }

    /// A gauge named `name`, explained by `help`.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.gauge_with(name, help, &[])
    }

    /// A gauge with `labels` beside the stage's own.
    pub fn gauge_with(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        let Some(registry) = &self.registry else {
            return Gauge::default();
        };
        match registry.family(name, help, || Registered::Gauge(Family::default())) {
            Registered::Gauge(family) => family.get_or_create_owned(&self.labels_with(labels)),
            _ => Gauge::default(),
        }
    }

    /// A histogram named `name` with upper bounds `buckets` (ascending; the
    /// `+Inf` bucket is added), explained by `help`. The buckets of the first
    /// stage to create the family are everyone's.
    ///
    /// ```
    /// let metrics = sink_api::metrics::Metrics::detached();
    /// let latency = metrics.histogram("my_seconds", "Latency.", &[0.01, 0.1, 1.0]);
    /// latency.observe(0.05);
    /// assert_eq!(latency.count(), 1);
    /// ```
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let wanted = Buckets(buckets.into());
        let Some(registry) = &self.registry else {
            return wanted.new_metric();
        };
        let make = || Registered::Histogram(Family::new_with_constructor(wanted.clone()));
        match registry.family(name, help, make) {
            Registered::Histogram(family) => family.get_or_create_owned(&self.labels),
            _ => wanted.new_metric(),
        }
    }

    /// The handle's labels and `extra`. An extra label named like one of
    /// the stage's own (`kind`, say) is renamed `exported_<name>`, as
    /// Prometheus does, because a series with a label twice would make the
    /// whole scrape fail.
    fn labels_with(&self, extra: &[(&str, &str)]) -> Labels {
        let mut labels = self.labels.clone();
        for (key, value) in extra {
            let key = if self.labels.iter().any(|(own, _)| own == key) {
                format!("exported_{key}")
            } else {
                key.to_string()
            };
            labels.push((key, value.to_string()));
        }
        labels
    }
}

/// The bucket bounds a histogram family makes its series with.
#[derive(Debug, Clone)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(&self.0)
    }
}

/// A histogram updated with atomics alone (prometheus-client's own takes a
/// lock per observation). Cheap to clone; clones share their counts.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: Box<[f64]>,
    /// One count per bound, plus `+Inf`; not cumulative.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with upper bounds `bounds` (sorted here; `+Inf` added).
    pub fn new(bounds: &[f64]) -> Self {
        let mut bounds: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            inner: Arc::new(HistogramInner {
                bounds: bounds.into(),
                counts,
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let inner = &*self.inner;
        let index = inner.bounds.partition_point(|bound| *bound < value);
        inner.counts[index].fetch_add(1, Ordering::Relaxed);
        let _ = inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.inner.sum.load(Ordering::Relaxed))
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let inner = &*self.inner;
        // The encoder adds the counts up itself: each bucket's own count here.
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(inner.counts.iter())
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum(),
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_stages_share_a_family_told_apart_by_their_labels() {
        let registry = MetricsRegistry::new();
        let a = registry.for_stage("a", "json_file", StageKind::Sink);
        let b = registry.for_stage("b", "json_file", StageKind::Sink);
        a.counter("x_bytes_total", "Bytes.").inc_by(3);
        b.counter("x_bytes_total", "Bytes.").inc_by(4);
        a.counter_with("x_flushes_total", "Flushes.", &[("reason", "size")])
            .inc();
        a.histogram("x_seconds", "Time.", &[0.1, 1.0]).observe(0.5);
        let text = registry.encode(false);
        assert_eq!(text.matches("# TYPE x_bytes_total counter").count(), 1);
        assert!(
            text.contains(r#"x_bytes_total{stage="a",type="json_file",kind="sink"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"x_bytes_total{stage="b",type="json_file",kind="sink"} 4"#));
        assert!(text.contains(
            r#"x_flushes_total{stage="a",type="json_file",kind="sink",reason="size"} 1"#
        ));
        assert!(
            text.contains(r#"x_seconds_bucket{stage="a",type="json_file",kind="sink",le="0.1"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"x_seconds_bucket{stage="a",type="json_file",kind="sink",le="1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"x_seconds_bucket{stage="a",type="json_file",kind="sink",le="+Inf"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"x_seconds_count{stage="a",type="json_file",kind="sink"} 1"#));
        assert!(registry.encode(true).ends_with("# EOF\n"));
    }

    #[test]
    fn an_extra_label_named_like_a_stage_label_is_renamed() {
        let registry = MetricsRegistry::new();
        let metrics = registry.for_stage("a", "t", StageKind::Source);
        metrics
            .counter_with("z_total", "Z.", &[("kind", "ack")])
            .inc();
        let text = registry.encode(false);
        assert!(
            text.contains(r#"z_total{stage="a",type="t",kind="source",exported_kind="ack"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_name_taken_by_another_type_gives_an_unexported_metric() {
        let registry = MetricsRegistry::new();
        let metrics = registry.for_stage("a", "t", StageKind::Source);
        metrics.counter("y_total", "Y.").inc();
        metrics.gauge("y_total", "Y.").set(5);
        assert!(!registry.encode(false).contains(" 5\n"));
    }
}
