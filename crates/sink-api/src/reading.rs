//! The data that moves through a pipeline: readings, batched.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// One sensor reading, as the gRPC source accepted it.
///
/// ```
/// use sink_api::{Reading, Timestamp};
/// let r = Reading {
///     sensor_name: "t1".into(),
///     value: Some(42),
///     created_at: Some(Timestamp::new(1_795_860_000, 0).unwrap()),
///     received_at: Timestamp::now(),
/// };
/// assert_eq!(r.value, Some(42));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Name of the sensor that produced the value.
    pub sensor_name: String,
    /// The measured value; `None` when the client sent no value (not the same as 0).
    pub value: Option<i64>,
    /// When the sensor took the measurement, if the client said.
    pub created_at: Option<Timestamp>,
    /// When the sink accepted the reading.
    pub received_at: Timestamp,
}

/// A UTC instant with nanosecond precision, limited to the years 0001 to 9999
/// that RFC 3339 (and `google.protobuf.Timestamp`) can express.
///
/// ```
/// use sink_api::Timestamp;
/// let t = Timestamp::new(1_795_860_000, 512_000_000).unwrap();
/// assert_eq!(t.to_string(), "2026-11-28T10:00:00.512Z");
/// assert!(Timestamp::new(i64::MAX, 0).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    seconds: i64,
    nanos: u32,
}

/// 0001-01-01T00:00:00Z in Unix seconds.
const MIN_SECONDS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in Unix seconds.
const MAX_SECONDS: i64 = 253_402_300_799;

impl Timestamp {
    /// The instant `seconds` + `nanos` after the Unix epoch, or `None` when it
    /// falls outside 0001..=9999 or `nanos` is not below one second.
    pub fn new(seconds: i64, nanos: u32) -> Option<Self> {
        ((MIN_SECONDS..=MAX_SECONDS).contains(&seconds) && nanos < 1_000_000_000)
            .then_some(Self { seconds, nanos })
    }

    /// The current time of the system clock.
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since_epoch.as_secs() as i64,
            nanos: since_epoch.subsec_nanos(),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn seconds(self) -> i64 {
        self.seconds
    }

    /// Nanoseconds past [`seconds`](Self::seconds).
    pub fn nanos(self) -> u32 {
        self.nanos
    }

    /// Appends the RFC 3339 form (`2026-11-28T10:00:00.512Z`) to `out`, with 0, 3,
    /// 6 or 9 fractional digits, the fewest that keep the value exact (as the
    /// protobuf JSON mapping does). Formats by hand: this runs for every reading.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        self.write_date_time(out);
        self.write_fraction_and_zone(out);
    }

    /// Appends `YYYY-MM-DDTHH:MM:SS`, the part of the RFC 3339 form that
    /// whole seconds decide (always 19 bytes: years have four digits).
    pub(crate) fn write_date_time(self, out: &mut Vec<u8>) {
        let days = self.seconds.div_euclid(86_400);
        let secs_of_day = self.seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let mut text = *b"0000-00-00T00:00:00";
        put_digits(&mut text[0..4], year as u32);
        put_digits(&mut text[5..7], month);
        put_digits(&mut text[8..10], day);
        put_digits(&mut text[11..13], secs_of_day / 3600);
        put_digits(&mut text[14..16], secs_of_day / 60 % 60);
        put_digits(&mut text[17..19], secs_of_day % 60);
        out.extend_from_slice(&text);
    }

    /// Appends the fraction of a second, if any, and the `Z`.
    pub(crate) fn write_fraction_and_zone(self, out: &mut Vec<u8>) {
        if self.nanos != 0 {
            let mut fraction = *b".000000000";
            put_digits(&mut fraction[1..], self.nanos);
            let digits = if self.nanos.is_multiple_of(1_000_000) {
                3
            } else if self.nanos.is_multiple_of(1_000) {
                6
            } else {
                9
            };
            out.extend_from_slice(&fraction[..=digits]);
        }
        out.push(b'Z');
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = Vec::with_capacity(30);
        self.write_rfc3339(&mut text);
        // Only ASCII digits and punctuation were written.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// Writes `value` as zero-padded decimal filling all of `slot`.
fn put_digits(slot: &mut [u8], mut value: u32) {
    for byte in slot.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Year, month and day of the day `days` after 1970-01-01 in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc3339(seconds: i64, nanos: u32) -> String {
        Timestamp::new(seconds, nanos).unwrap().to_string()
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(1_795_860_000, 512_000_000),
            "2026-11-28T10:00:00.512Z"
        );
        assert_eq!(rfc3339(1, 1_000), "1970-01-01T00:00:01.000001Z");
        assert_eq!(rfc3339(1, 1), "1970-01-01T00:00:01.000000001Z");
        assert_eq!(rfc3339(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(MIN_SECONDS, 0), "0001-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(MAX_SECONDS, 999_999_999),
            "9999-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn agrees_with_humantime_over_many_days() {
        // humantime formats only from 1970 on; compare a day-stepped sweep there.
        for day in (0..2_932_896).step_by(997) {
            let secs = day * 86_400 + 3_723;
            let expected =
                humantime::format_rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(secs as u64));
            assert_eq!(rfc3339(secs, 0), expected.to_string());
        }
    }

    #[test]
    fn refuses_out_of_range() {
        assert!(Timestamp::new(MAX_SECONDS + 1, 0).is_none());
        assert!(Timestamp::new(MIN_SECONDS - 1, 0).is_none());
        assert!(Timestamp::new(0, 1_000_000_000).is_none());
    }
}
