//! What a run counts and how it reports it: live counters shared by the
//! workers, per-worker latency histograms, and the final report.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tonic::Code;

/// Number of gRPC status codes (0 `OK` to 16 `UNAUTHENTICATED`).
const CODES: usize = 17;

/// Counters every worker adds to, read by the progress line each second.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls the server answered OK.
    pub calls_ok: AtomicU64,
    /// Readings in those calls.
    pub readings_acked: AtomicU64,
    /// Calls given up: a status not worth retrying, or retries exhausted.
    pub calls_failed: AtomicU64,
    /// Attempts sent again after `UNAVAILABLE` or `RESOURCE_EXHAUSTED`.
    pub retries: AtomicU64,
    /// Every error answer, retried or not, by status code.
    errors: [AtomicU64; CODES],
}

impl Counters {
    /// Counts one error answer with `code`.
    pub fn error(&self, code: Code) {
        let index = (code as usize).min(CODES - 1);
        self.errors[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Error answers so far, of every code.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Error answers so far, by code name, leaving out codes never seen.
    pub fn errors_by_code(&self) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .enumerate()
            .map(|(code, count)| (code, count.load(Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
            .map(|(code, count)| (code_name(Code::from_i32(code as i32)), count))
            .collect()
    }
}

/// The canonical upper-case name of a status code, as gRPC documents it.
pub fn code_name(code: Code) -> String {
    // `Code`'s Debug is the CamelCase variant name: ResourceExhausted.
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// A latency histogram in microseconds, from 1 µs to one hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    /// From the first call sent to the last answer.
    pub elapsed: Duration,
    /// Calls answered OK.
    pub calls_ok: u64,
    /// Readings in those calls: what the server acknowledged.
    pub readings_acked: u64,
    /// Calls given up.
    pub calls_failed: u64,
    /// Attempts retried.
    pub retries: u64,
    /// Every error answer by status code name.
    pub errors: BTreeMap<String, u64>,
    /// Latency of each call, retries included, in µs.
    pub latency: Histogram<u64>,
}

impl Report {
    /// Calls answered OK per second.
    pub fn calls_per_second(&self) -> f64 {
        per_second(self.calls_ok, self.elapsed)
    }

    /// Readings acknowledged per second.
    pub fn readings_per_second(&self) -> f64 {
        per_second(self.readings_acked, self.elapsed)
    }

    /// The report as one JSON object, for scripts (`bench/run` reads it).
    pub fn to_json(&self) -> serde_json::Value {
        let q = |quantile| self.latency.value_at_quantile(quantile);
        serde_json::json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "calls_ok": self.calls_ok,
            "calls_failed": self.calls_failed,
            "readings_acknowledged": self.readings_acked,
            "retries": self.retries,
            "calls_per_s": self.calls_per_second(),
            "readings_per_s": self.readings_per_second(),
            "latency_us": {
                "p50": q(0.5),
                "p90": q(0.9),
                "p99": q(0.99),
                "max": self.latency.max(),
            },
            "errors": self.errors,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |micros: u64| micros as f64 / 1000.0;
        writeln!(
            f,
            "elapsed               {:.2} s",
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "calls                 {} ok, {} failed, {} retries",
            self.calls_ok, self.calls_failed, self.retries
        )?;
        writeln!(f, "calls/s               {:.0}", self.calls_per_second())?;
        writeln!(f, "readings/s            {:.0}", self.readings_per_second())?;
        writeln!(
            f,
            "latency ms            p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            ms(self.latency.value_at_quantile(0.5)),
            ms(self.latency.value_at_quantile(0.9)),
            ms(self.latency.value_at_quantile(0.99)),
            ms(self.latency.max()),
        )?;
        if self.errors.is_empty() {
            writeln!(f, "errors                none")?;
        } else {
            let listed: Vec<String> = self
                .errors
                .iter()
                .map(|(code, count)| format!("{code} {count}"))
                .collect();
            writeln!(f, "errors                {}", listed.join(", "))?;
        }
        write!(f, "readings acknowledged {}", self.readings_acked)
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_upper_snake_case() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::Ok), "OK");
    }

    #[test]
    fn errors_are_grouped_by_code() {
        let counters = Counters::default();
        counters.error(Code::Unavailable);
        counters.error(Code::Unavailable);
        counters.error(Code::InvalidArgument);
        assert_eq!(counters.total_errors(), 3);
        let by_code = counters.errors_by_code();
        assert_eq!(by_code["UNAVAILABLE"], 2);
        assert_eq!(by_code["INVALID_ARGUMENT"], 1);
        assert_eq!(by_code.len(), 2);
    }
}
