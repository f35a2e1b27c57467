//! The data that moves through a pipeline: readings, batched.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::SensorName;

/// One sensor reading: a named value with labels and two timestamps.
///
/// ```
/// use sink_api::{Labels, Reading, Timestamp, Value};
/// let r = Reading {
///     sensor_name: "boiler".into(),
///     labels: Labels::from_iter([("site", "north"), ("unit", "C")]),
///     value: Some(Value::Float(21.5)),
///     created_at: Some(Timestamp::new(1_795_860_000, 0).unwrap()),
///     received_at: Timestamp::now(),
/// };
/// assert_eq!(r.value, Some(Value::Float(21.5)));
/// assert_eq!(r.labels.get("site"), Some("north"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Name of the sensor that produced the value, shared with the other
    /// readings of that sensor.
    pub sensor_name: SensorName,
    /// What tells this sensor's readings apart from others of the same name
    /// (site, device, unit); empty for most, and then free.
    pub labels: Labels,
    /// The measured value; `None` when the client sent no value (not the same as 0).
    pub value: Option<Value>,
    /// When the sensor took the measurement, if the client said.
    pub created_at: Option<Timestamp>,
    /// When the sink accepted the reading.
    pub received_at: Timestamp,
}

/// A measured value: an integer or a float, as the client sent it.
///
/// Two values are equal when they are the same variant with the same bits, so
/// that `Value` can be `Eq` (a NaN equals itself; `0.0` and `-0.0` differ),
/// and they order integers before floats, floats by [`f64::total_cmp`]. The
/// built-in sources refuse NaN and infinities: JSON cannot write them.
///
/// ```
/// use sink_api::Value;
/// assert_eq!(Value::from(42), Value::Int(42));
/// assert_eq!(Value::from(21.5).as_f64(), 21.5);
/// assert_eq!(Value::Int(3).as_f64(), 3.0);
/// assert_ne!(Value::Int(3), Value::Float(3.0));
/// ```
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// A whole number, exact.
    Int(i64),
    /// A floating-point number.
    Float(f64),
}

impl Value {
    /// The value as a float (an integer beyond 2^53 loses precision).
    pub fn as_f64(self) -> f64 {
        match self {
            Self::Int(value) => value as f64,
            Self::Float(value) => value,
        }
    }

    /// The integer, when the value is one.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Self::Int(value) => Some(value),
            Self::Float(_) => None,
        }
    }

    /// The value changed by `int` when it is an integer, by `float` when it
    /// is a float: a processor's way to rescale either kind.
    ///
    /// ```
    /// use sink_api::Value;
    /// let double = |v: Value| v.map(|i| i * 2, |f| f * 2.0);
    /// assert_eq!(double(Value::Int(21)), Value::Int(42));
    /// assert_eq!(double(Value::Float(1.25)), Value::Float(2.5));
    /// ```
    pub fn map(self, int: impl FnOnce(i64) -> i64, float: impl FnOnce(f64) -> f64) -> Self {
        match self {
            Self::Int(value) => Self::Int(int(value)),
            Self::Float(value) => Self::Float(float(value)),
        }
    }

    /// Whether JSON (and so every built-in sink) can write it: not NaN or an infinity.
    pub fn is_finite(self) -> bool {
        match self {
            Self::Int(_) => true,
            Self::Float(value) => value.is_finite(),
        }
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Self::Float(value)
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Self::Int(a), Self::Int(b)) => a.cmp(b),
            (Self::Float(a), Self::Float(b)) => a.total_cmp(b),
            (Self::Int(_), Self::Float(_)) => std::cmp::Ordering::Less,
            (Self::Float(_), Self::Int(_)) => std::cmp::Ordering::Greater,
        }
    }
}

impl fmt::Display for Value {
    /// The JSON text of the value: a float always with a `.` or an exponent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = Vec::with_capacity(24);
        crate::json::write_value(*self, &mut text);
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// A reading's labels: string keys and values, kept sorted by key, each key
/// once. Empty labels allocate nothing, so readings without labels cost what
/// they did before labels existed.
///
/// ```
/// use sink_api::Labels;
/// let mut labels = Labels::new();
/// labels.insert("unit", "C");
/// labels.insert("site", "north");
/// assert_eq!(labels.insert("site", "south"), Some("north".to_string()));
/// let pairs: Vec<_> = labels.iter().collect();
/// assert_eq!(pairs, [("site", "south"), ("unit", "C")]);
/// assert_eq!(labels.get("unit"), Some("C"));
/// assert_eq!(labels.remove("unit"), Some("C".to_string()));
/// assert_eq!(labels.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// No labels (allocates nothing).
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.find(key).ok().map(|at| self.0[at].1.as_str())
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        let key = key.into();
        let value = value.into();
        // Labels usually arrive in order: appending is then the whole cost.
        if self.0.last().is_none_or(|(last, _)| *last < key) {
            self.0.push((key, value));
            return None;
        }
        match self.find(&key) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, value)),
            Err(at) => {
                self.0.insert(at, (key, value));
                None
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|at| self.0.remove(at).1)
    }

    /// The labels of `pairs` in any order; of a key given twice, the later
    /// value stays (as a protobuf map reads). Allocates nothing beyond `pairs`.
    ///
    /// ```
    /// use sink_api::Labels;
    /// let labels = Labels::from_pairs(vec![("b".into(), "1".into()), ("a".into(), "2".into()), ("b".into(), "3".into())]);
    /// assert_eq!(labels.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
    /// ```
    pub fn from_pairs(mut pairs: Vec<(String, String)>) -> Self {
        // Reversed, a stable sort puts the later of equal keys first, and
        // `dedup_by` keeps the first of each run.
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        Self(pairs)
    }

    /// Keeps the labels for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|(key, value)| keep(key, value));
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The bytes of every key and value together: what the bounds on labels
    /// and the memory budget count.
    pub fn text_bytes(&self) -> usize {
        self.0
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(probe, _)| probe.as_str().cmp(key))
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    /// A map of strings to strings; of a key given twice, the last value stays.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> serde::de::Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of label names to string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut labels = Labels::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    labels.insert(key, value);
                }
                Ok(labels)
            }
        }
        deserializer.deserialize_map(LabelsVisitor)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    /// Collects pairs; of a key given twice, the last value stays.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut labels = Self::new();
        labels.extend(pairs);
        labels
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Labels {
    /// Adds pairs; a key already set takes the new value.
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, pairs: I) {
        for (key, value) in pairs {
            self.insert(key, value);
        }
    }
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

    /// Reads an RFC 3339 time (`2026-11-28T10:00:00.512Z`, any offset, any
    /// number of fractional digits up to nine), or `None` when the text is
    /// not one or falls outside the years 0001 to 9999.
    ///
    /// ```
    /// use sink_api::Timestamp;
    /// let t = Timestamp::parse_rfc3339("2026-11-28T11:00:00.5+01:00").unwrap();
    /// assert_eq!(t.to_string(), "2026-11-28T10:00:00.500Z");
    /// assert!(Timestamp::parse_rfc3339("2026-02-30T00:00:00Z").is_none());
    /// ```
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<u32> {
            let part = bytes.get(range)?;
            part.iter().try_fold(0u32, |acc, &b| {
                b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
            })
        };
        let at = |i: usize, allowed: &[u8]| bytes.get(i).is_some_and(|b| allowed.contains(b));
        if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
            return None;
        }
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if year == 0 || day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let mut rest = &text[19..];
        let mut nanos = 0u32;
        if let Some(fraction) = rest.strip_prefix('.') {
            let count = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if count == 0 || count > 9 {
                return None;
            }
            nanos = fraction[..count].parse::<u32>().ok()? * 10u32.pow(9 - count as u32);
            rest = &fraction[count..];
        }
        let offset = match rest.as_bytes() {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let number = |a: u8, b: u8| {
                    (a.is_ascii_digit() && b.is_ascii_digit())
                        .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
                };
                let (hours, minutes) = (number(*h1, *h2)?, number(*m1, *m2)?);
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = hours * 3600 + minutes * 60;
                if *sign == b'-' { -offset } else { offset }
            }
            _ => return None,
        };
        // A leap second reads as the last second of its minute.
        let second = second.min(59);
        let days = days_from_civil(i64::from(year), month, day);
        let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
        Self::new(seconds, nanos)
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
        if self.nanos == 0 {
            out.push(b'Z');
            return;
        }
        // Each width is its own fixed-size array: the digits are then
        // written and copied without a loop or a length to look up.
        if self.nanos.is_multiple_of(1_000_000) {
            out.extend_from_slice(&fraction_and_zone::<5>(self.nanos / 1_000_000));
        } else if self.nanos.is_multiple_of(1_000) {
            out.extend_from_slice(&fraction_and_zone::<8>(self.nanos / 1_000));
        } else {
            out.extend_from_slice(&fraction_and_zone::<11>(self.nanos));
        }
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

/// `.`, `value` in `N - 2` digits, `Z`: the end of an RFC 3339 timestamp.
fn fraction_and_zone<const N: usize>(value: u32) -> [u8; N] {
    let mut text = [b'0'; N];
    text[0] = b'.';
    text[N - 1] = b'Z';
    put_digits(&mut text[1..N - 1], value);
    text
}

/// Writes `value` as zero-padded decimal filling all of `slot`, two digits
/// per division: a fraction's nine digits one at a time were about a tenth
/// of a reading's cost in `json_file`. (itoa, which does the same, counted
/// more here: its digits must then be copied into place.)
fn put_digits(slot: &mut [u8], mut value: u32) {
    let mut end = slot.len();
    while end >= 2 {
        let pair = (value % 100) as usize * 2;
        slot[end - 2..end].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        value /= 100;
        end -= 2;
    }
    if end == 1 {
        slot[0] = b'0' + (value % 10) as u8;
    }
}

/// `00`, `01`, … `99`, one after another.
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0; 200];
    let mut n = 0;
    while n < 100 {
        pairs[2 * n] = b'0' + (n / 10) as u8;
        pairs[2 * n + 1] = b'0' + (n % 10) as u8;
        n += 1;
    }
    pairs
};

/// Days from 1970-01-01 to `year`-`month`-`day` in the proleptic Gregorian
/// calendar (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = i64::from((month + 9) % 12);
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
    fn parses_what_it_writes_and_the_offsets_rfc3339_allows() {
        for day in (-719_162..2_932_896).step_by(9_973) {
            for nanos in [0, 1, 1_000, 512_000_000, 999_999_999] {
                let t = Timestamp::new(day * 86_400 + 45_296, nanos).unwrap();
                assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t));
            }
        }
        let noon = Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap();
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-28T13:30:00+01:30"),
            Some(noon)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-28t02:00:00-10:00"),
            Some(noon)
        );
        for bad in [
            "",
            "2026-11-28",
            "2026-11-28T12:00:00",
            "2026-13-01T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T12:00:00.Z",
            "2026-11-28T12:00:00.1234567890Z",
            "2026-11-28T12:00:00+1:00",
            "0000-01-01T00:00:00Z",
            "2026-11-28T12:00:00Zjunk",
            "２026-11-28T12:00:00Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn labels_stay_sorted_and_unique_whatever_the_order_of_insertion() {
        let labels = Labels::from_iter([("b", "1"), ("a", "2"), ("c", "3"), ("a", "4")]);
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            [("a", "4"), ("b", "1"), ("c", "3")]
        );
        assert_eq!(labels.text_bytes(), 6);
        assert_eq!(Labels::new().iter().count(), 0);
    }

    #[test]
    fn values_compare_by_variant_then_bits() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(0.0), Value::Float(-0.0));
        assert!(Value::Int(i64::MAX) < Value::Float(f64::NEG_INFINITY));
        assert!(Value::Float(1.0) < Value::Float(2.0));
    }

    #[test]
    fn refuses_out_of_range() {
        assert!(Timestamp::new(MAX_SECONDS + 1, 0).is_none());
        assert!(Timestamp::new(MIN_SECONDS - 1, 0).is_none());
        assert!(Timestamp::new(0, 1_000_000_000).is_none());
    }
}
