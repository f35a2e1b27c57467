//! Decodes the bytes of a `SensorValuesRequest` straight into a [`Batch`].
//!
//! Why this exists: decoding with prost builds a `Vec<SensorValue>`, each with
//! an `Option<Measurement>` holding two more optional messages, which the call
//! then converts into readings. At 100 readings per call the profile showed
//! that decode-then-convert costing about 0.18 µs per reading, against a
//! budget of 0.5 µs for the whole sink. This reader walks the wire format once
//! and writes each [`Reading`] directly; the only allocations left are the
//! batch itself (sized by a cheap first pass) and a name not seen lately
//! ([`SensorName::intern`]).
//!
//! The semantics are protobuf's, exactly as prost implements them, which the
//! tests below check against prost on generated, mutated and truncated input:
//!
//! - unknown fields (any wire type, groups included) are skipped, with prost's
//!   recursion limit for nested groups;
//! - a known field with the wrong wire type, a bad varint or key, a length
//!   past the end of its enclosing message, or a name that is not UTF-8 makes
//!   the whole request malformed;
//! - a scalar field that appears twice keeps its last value; a message field
//!   that appears twice is merged (so `created_at` sent as two halves is one
//!   timestamp), and each `items` field is one more reading;
//! - no `measurement` means no value and no timestamp; an `Int64Value` (or
//!   `DoubleValue`) present but empty is the value 0, as its `value` defaults
//!   to 0;
//! - `labels` is a map: each entry a message of `key = 1` and `value = 2`,
//!   either missing meaning the empty string, a key given twice keeping its
//!   later value.
//!
//! What the bytes say but a reading may not hold does not make them
//! malformed: a timestamp that RFC 3339 cannot express, both an integer and a
//! float value, a float that is NaN or infinite, an empty label key, a name or
//! labels past the source's [`ReadingLimits`]. Each is reported as
//! INVALID_ARGUMENT naming `items[i]`, but only after the call's other checks,
//! as it was when prost decoded first. Labels are allocated only once their
//! count is known to be within `max_labels`, and exactly for that count, so
//! that what decoding holds stays within [`decoded_bound`](super::acks::decoded_bound).

use std::fmt;

use prost::DecodeError;
use prost::encoding::{WireType, decode_key, decode_varint};
use sink_api::{Batch, Labels, Reading, ReadingLimits, SensorName, Timestamp, Value};
use tonic::Status;

/// `SensorValuesRequest.items`.
const ITEMS: u32 = 1;
/// `SensorValue.sensor_name`.
const SENSOR_NAME: u32 = 1;
/// `SensorValue.measurement`.
const MEASUREMENT: u32 = 2;
/// `Measurement.sensor_value` (field 1 is unused).
const SENSOR_VALUE: u32 = 2;
/// `Measurement.created_at`.
const CREATED_AT: u32 = 3;
/// `Measurement.sensor_value_float`.
const SENSOR_VALUE_FLOAT: u32 = 4;
/// `SensorValue.labels`, a `map<string, string>`.
const LABELS: u32 = 3;
/// A map entry's key.
const ENTRY_KEY: u32 = 1;
/// A map entry's value.
const ENTRY_VALUE: u32 = 2;
/// `google.protobuf.Int64Value.value` and `DoubleValue.value`.
const WRAPPED_VALUE: u32 = 1;
/// `google.protobuf.Timestamp.seconds`.
const SECONDS: u32 = 1;
/// `google.protobuf.Timestamp.nanos`.
const NANOS: u32 = 2;

/// How deep prost lets messages and groups nest: skipping an unknown field
/// at depth `d` may nest groups `RECURSION_LIMIT - d` deep.
const RECURSION_LIMIT: u32 = 100;

/// A decoded request: its readings, or the first item that made them
/// invalid.
#[derive(Debug)]
pub struct DecodedRequest {
    /// The readings in order, each stamped with the same `received_at`; or
    /// INVALID_ARGUMENT for the first item a reading cannot hold.
    pub readings: Result<Batch, Status>,
    /// How many labels the readings hold in all (what they cost in memory
    /// beyond the readings and the bytes of their text).
    pub labels: usize,
}

impl DecodedRequest {
    /// Whether the request held no items at all (costs nothing, sends nothing).
    pub fn is_empty(&self) -> bool {
        matches!(&self.readings, Ok(batch) if batch.is_empty())
    }
}

/// Decodes `message`, one whole encoded `SensorValuesRequest`, stamping every
/// reading `received_at`. Malformed bytes are INTERNAL, as tonic's prost codec
/// answers.
pub fn decode_request(
    message: &[u8],
    received_at: Timestamp,
    limits: &ReadingLimits,
) -> Result<DecodedRequest, Status> {
    decode_counted(message, received_at, limits, count_items(message))
}

/// As [`decode_request`], but a request of more than `max_items` readings is
/// refused with RESOURCE_EXHAUSTED before any reading is built: decoding
/// expands (an empty item is 2 bytes on the wire and a whole [`Reading`] in
/// memory), so the count is bounded, not only the bytes.
pub fn decode_request_at_most(
    message: &[u8],
    received_at: Timestamp,
    limits: &ReadingLimits,
    max_items: usize,
) -> Result<DecodedRequest, Status> {
    let count = count_items(message);
    if count > max_items {
        return Err(Status::resource_exhausted(format!(
            "the request holds {count} readings, more than max_readings_per_call ({max_items}); send fewer per call"
        )));
    }
    decode_counted(message, received_at, limits, count)
}

/// Decodes `message`, whose `items` fields number `count` (its batch's size).
fn decode_counted(
    message: &[u8],
    received_at: Timestamp,
    limits: &ReadingLimits,
    count: usize,
) -> Result<DecodedRequest, Status> {
    let mut batch = Batch::with_capacity(count);
    let mut labels = 0;
    let mut invalid = None;
    let mut index = 0;
    let mut buf = message;
    while !buf.is_empty() {
        let (tag, wire_type) = read_key(&mut buf).map_err(|err| malformed(None, err.into()))?;
        if tag != ITEMS {
            skip_field(wire_type, tag, &mut buf, RECURSION_LIMIT)
                .map_err(|err| malformed(None, err))?;
            continue;
        }
        let mut item = length_delimited(wire_type, &mut buf)
            .and_then(|bytes| sensor_value(bytes, limits.max_name_bytes))
            .map_err(|err| malformed(Some(index), err))?;
        if invalid.is_none() {
            match item.push_reading(limits, received_at, &mut batch) {
                // Slots allocated, duplicates included.
                Ok(()) => labels += item.label_entries,
                Err(why) => invalid = Some(why.status(index)),
            }
        }
        index += 1;
    }
    Ok(DecodedRequest {
        readings: invalid.map_or(Ok(batch), Err),
        labels,
    })
}

/// How many `items` fields `message` holds, to size the batch once; stops
/// early at anything malformed, which the real pass then reports.
fn count_items(message: &[u8]) -> usize {
    let mut buf = message;
    let mut count = 0;
    while !buf.is_empty() {
        let Ok((tag, wire_type)) = read_key(&mut buf) else {
            break;
        };
        if tag == ITEMS && wire_type == WireType::LengthDelimited {
            if length_delimited(wire_type, &mut buf).is_err() {
                break;
            }
            count += 1;
        } else if skip_field(wire_type, tag, &mut buf, RECURSION_LIMIT).is_err() {
            break;
        }
    }
    count
}

/// An item's name as read. Within the length the limits allow, it is
/// interned at once: a sink hears the same few names again and again, and
/// a name this thread remembers needs no UTF-8 check or allocation. A longer
/// one is only checked, so that a name the reading's refusal will name never
/// takes memory.
#[derive(Debug)]
enum ItemName<'a> {
    Shared(SensorName),
    TooLong(&'a str),
}

/// One `SensorValue` as read so far: the fields of every occurrence merged.
#[derive(Debug, Default)]
struct Item<'a> {
    /// `None` when the item names none: the empty name.
    name: Option<ItemName<'a>>,
    value: Option<i64>,
    float: Option<f64>,
    /// `(seconds, nanos)`, unchecked.
    created_at: Option<(i64, i32)>,
    /// The item's bytes, read again for its labels when it has some.
    bytes: &'a [u8],
    /// How many `labels` entries the bytes hold (a key sent twice counts twice).
    label_entries: usize,
}

impl Item<'_> {
    /// Pushes the reading this item makes onto `batch` (built in place: a
    /// reading is a hundred bytes, moved once per reading otherwise), or says
    /// why it may not be one (INVALID_ARGUMENT naming `items[index]`, built by
    /// [`Invalid::status`] off the hot path).
    #[inline]
    fn push_reading(
        &mut self,
        limits: &ReadingLimits,
        received_at: Timestamp,
        batch: &mut Batch,
    ) -> Result<(), Invalid> {
        let created_at = self.created_at()?;
        let value = self.value()?;
        let sensor_name = self.name(limits)?;
        limits
            .check_label_count(self.label_entries)
            .map_err(Invalid::Limit)?;
        let labels = if self.label_entries == 0 {
            Labels::new()
        } else {
            self.labels(limits).map_err(Invalid::Limit)?
        };
        batch.push(Reading {
            sensor_name,
            labels,
            value,
            created_at,
            received_at,
        });
        Ok(())
    }

    /// The name, taken out of the item; refused past the limit.
    #[inline]
    fn name(&mut self, limits: &ReadingLimits) -> Result<SensorName, Invalid> {
        match self.name.take() {
            None => Ok(SensorName::default()),
            Some(ItemName::Shared(name)) => Ok(name),
            Some(ItemName::TooLong(text)) => limits
                .check_name(text)
                .map(|()| SensorName::from(text))
                .map_err(Invalid::Limit),
        }
    }

    /// The value: an integer, a float, or none; not both, and no float JSON
    /// cannot write.
    #[inline]
    fn value(&self) -> Result<Option<Value>, Invalid> {
        match (self.value, self.float) {
            (value, None) => Ok(value.map(Value::Int)),
            (None, Some(float)) if float.is_finite() => Ok(Some(Value::Float(float))),
            (None, Some(float)) => Err(Invalid::NotFinite(float)),
            (Some(_), Some(_)) => Err(Invalid::BothValues),
        }
    }

    /// The labels, each checked against `limits`, allocated once for their
    /// count (the bytes were read once already: they are well formed).
    fn labels(&self, limits: &ReadingLimits) -> Result<Labels, String> {
        let mut pairs = Vec::with_capacity(self.label_entries);
        let mut buf = self.bytes;
        while !buf.is_empty() {
            let Ok((tag, wire_type)) = read_key(&mut buf) else {
                break;
            };
            if tag != LABELS {
                if skip_field(wire_type, tag, &mut buf, RECURSION_LIMIT - 1).is_err() {
                    break;
                }
                continue;
            }
            let Ok((key, value)) = length_delimited(wire_type, &mut buf).and_then(label_entry)
            else {
                break;
            };
            limits.check_label(key, value)?;
            pairs.push((key.to_owned(), value.to_owned()));
        }
        Ok(Labels::from_pairs(pairs))
    }

    /// The timestamp as a [`Timestamp`], refusing what RFC 3339 cannot express.
    #[inline]
    fn created_at(&self) -> Result<Option<Timestamp>, Invalid> {
        let Some((seconds, nanos)) = self.created_at else {
            return Ok(None);
        };
        u32::try_from(nanos)
            .ok()
            .and_then(|nanos| Timestamp::new(seconds, nanos))
            .map(Some)
            .ok_or(Invalid::Timestamp(seconds, nanos))
    }
}

/// Why an item, well formed on the wire, cannot be a reading. Small, so that
/// the happy path moves a `Result<Reading, Invalid>` no bigger than a reading,
/// and the status text is written only when it is needed.
#[derive(Debug)]
enum Invalid {
    /// `created_at` as `(seconds, nanos)`, outside what RFC 3339 writes.
    Timestamp(i64, i32),
    /// Both `sensor_value` and `sensor_value_float`.
    BothValues,
    /// A float JSON cannot write.
    NotFinite(f64),
    /// A bound of [`ReadingLimits`] or an empty label key, as its check says.
    Limit(String),
}

impl Invalid {
    /// INVALID_ARGUMENT naming `items[index]` and what it may not hold.
    #[cold]
    fn status(self, index: usize) -> Status {
        Status::invalid_argument(match self {
            Invalid::Timestamp(seconds, nanos) => format!(
                "items[{index}].measurement.created_at ({seconds}s, {nanos}ns) is outside 0001-01-01..9999-12-31 or has nanos outside 0..1e9"
            ),
            Invalid::BothValues => format!(
                "items[{index}].measurement has both sensor_value and sensor_value_float; send one"
            ),
            Invalid::NotFinite(float) => format!(
                "items[{index}].measurement.sensor_value_float is {float}, which JSON cannot write; send a finite number"
            ),
            Invalid::Limit(why) => format!("items[{index}]: {why}"),
        })
    }
}

/// Reads the fields of one `SensorValue` (the bytes inside its `items`
/// field); a name longer than `max_name_bytes` is not made a name.
fn sensor_value(mut buf: &[u8], max_name_bytes: usize) -> Result<Item<'_>, Malformed> {
    // Depths as prost counts them: SensorValue's fields are one level down.
    const DEPTH: u32 = RECURSION_LIMIT - 1;
    let mut item = Item {
        bytes: buf,
        ..Item::default()
    };
    while !buf.is_empty() {
        let (tag, wire_type) = read_key(&mut buf)?;
        match tag {
            SENSOR_NAME => {
                let bytes = length_delimited(wire_type, &mut buf)?;
                item.name = Some(if bytes.len() > max_name_bytes {
                    ItemName::TooLong(utf8(bytes, "sensor_name")?)
                } else {
                    let name = SensorName::intern(bytes);
                    ItemName::Shared(name.map_err(|_| Malformed::NotUtf8("sensor_name"))?)
                });
            }
            MEASUREMENT => measurement(length_delimited(wire_type, &mut buf)?, &mut item)?,
            LABELS => {
                label_entry(length_delimited(wire_type, &mut buf)?)?;
                item.label_entries += 1;
            }
            _ => skip_field(wire_type, tag, &mut buf, DEPTH)?,
        }
    }
    Ok(item)
}

/// Reads one `labels` map entry: its key and value, either missing meaning
/// empty, the last of a repeated field winning.
fn label_entry(mut buf: &[u8]) -> Result<(&str, &str), Malformed> {
    const DEPTH: u32 = RECURSION_LIMIT - 2;
    let (mut key, mut value) = ("", "");
    while !buf.is_empty() {
        let (tag, wire_type) = read_key(&mut buf)?;
        match tag {
            ENTRY_KEY => key = utf8(length_delimited(wire_type, &mut buf)?, "a label key")?,
            ENTRY_VALUE => value = utf8(length_delimited(wire_type, &mut buf)?, "a label value")?,
            _ => skip_field(wire_type, tag, &mut buf, DEPTH)?,
        }
    }
    Ok((key, value))
}

#[inline]
fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, Malformed> {
    std::str::from_utf8(bytes).map_err(|_| Malformed::NotUtf8(field))
}

/// Merges the fields of one `Measurement` into `item`.
fn measurement(mut buf: &[u8], item: &mut Item<'_>) -> Result<(), Malformed> {
    const DEPTH: u32 = RECURSION_LIMIT - 2;
    while !buf.is_empty() {
        let (tag, wire_type) = read_key(&mut buf)?;
        match tag {
            SENSOR_VALUE => {
                let mut wrapper = length_delimited(wire_type, &mut buf)?;
                // Present, even empty, means a value: the wrapper's defaults to 0.
                let value = item.value.get_or_insert(0);
                while !wrapper.is_empty() {
                    let (tag, wire_type) = read_key(&mut wrapper)?;
                    match tag {
                        WRAPPED_VALUE => *value = varint(wire_type, &mut wrapper)? as i64,
                        _ => skip_field(wire_type, tag, &mut wrapper, DEPTH - 1)?,
                    }
                }
            }
            SENSOR_VALUE_FLOAT => {
                let mut wrapper = length_delimited(wire_type, &mut buf)?;
                let value = item.float.get_or_insert(0.0);
                while !wrapper.is_empty() {
                    let (tag, wire_type) = read_key(&mut wrapper)?;
                    match tag {
                        WRAPPED_VALUE => {
                            expect(WireType::SixtyFourBit, wire_type)?;
                            let Some((bits, rest)) = wrapper.split_first_chunk::<8>() else {
                                return Err(Malformed::Truncated);
                            };
                            *value = f64::from_le_bytes(*bits);
                            wrapper = rest;
                        }
                        _ => skip_field(wire_type, tag, &mut wrapper, DEPTH - 1)?,
                    }
                }
            }
            CREATED_AT => {
                let mut timestamp = length_delimited(wire_type, &mut buf)?;
                let (seconds, nanos) = item.created_at.get_or_insert((0, 0));
                while !timestamp.is_empty() {
                    let (tag, wire_type) = read_key(&mut timestamp)?;
                    match tag {
                        SECONDS => *seconds = varint(wire_type, &mut timestamp)? as i64,
                        // int32 on the wire is a varint truncated to 32 bits.
                        NANOS => *nanos = varint(wire_type, &mut timestamp)? as i32,
                        _ => skip_field(wire_type, tag, &mut timestamp, DEPTH - 1)?,
                    }
                }
            }
            _ => skip_field(wire_type, tag, &mut buf, DEPTH)?,
        }
    }
    Ok(())
}

/// A field's key, as prost's `decode_key` reads it. Nearly every key of
/// this message is one byte, read here without prost's general loop; any
/// other, and every error, is prost's.
#[inline(always)]
fn read_key(buf: &mut &[u8]) -> Result<(u32, WireType), DecodeError> {
    if let Some((&byte, rest)) = buf.split_first()
        && (8..0x80).contains(&byte)
    {
        let wire_type = match byte & 7 {
            0 => WireType::Varint,
            1 => WireType::SixtyFourBit,
            2 => WireType::LengthDelimited,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::ThirtyTwoBit,
            _ => return decode_key(buf),
        };
        *buf = rest;
        return Ok((u32::from(byte >> 3), wire_type));
    }
    decode_key(buf)
}

/// A varint, as prost's `decode_varint` reads it, the one-byte ones (most
/// lengths, small values) without prost's general loop.
#[inline(always)]
fn read_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    if let Some((&byte, rest)) = buf.split_first()
        && byte < 0x80
    {
        *buf = rest;
        return Ok(u64::from(byte));
    }
    decode_varint(buf)
}

/// The value of a varint field, which must have the varint wire type.
#[inline]
fn varint(wire_type: WireType, buf: &mut &[u8]) -> Result<u64, Malformed> {
    expect(WireType::Varint, wire_type)?;
    Ok(read_varint(buf)?)
}

/// The bytes of a length-delimited field, taken off the front of `buf`.
#[inline]
fn length_delimited<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    expect(WireType::LengthDelimited, wire_type)?;
    let len = read_varint(buf)?;
    if len > buf.len() as u64 {
        return Err(Malformed::Truncated);
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

#[inline]
fn expect(expected: WireType, found: WireType) -> Result<(), Malformed> {
    if expected == found {
        Ok(())
    } else {
        Err(Malformed::WireType { expected, found })
    }
}

/// Skips an unknown field, as prost's `skip_field` does, with `depth` the
/// recursion budget prost would have left at this point.
fn skip_field(wire_type: WireType, tag: u32, buf: &mut &[u8], depth: u32) -> Result<(), Malformed> {
    if depth == 0 {
        return Err(Malformed::TooDeep);
    }
    let len = match wire_type {
        WireType::Varint => read_varint(buf).map(|_| 0)?,
        WireType::ThirtyTwoBit => 4,
        WireType::SixtyFourBit => 8,
        WireType::LengthDelimited => read_varint(buf)?,
        WireType::StartGroup => loop {
            let (inner_tag, inner_wire_type) = read_key(buf)?;
            match inner_wire_type {
                WireType::EndGroup if inner_tag == tag => break 0,
                WireType::EndGroup => return Err(Malformed::UnexpectedEndGroup),
                _ => skip_field(inner_wire_type, inner_tag, buf, depth - 1)?,
            }
        },
        WireType::EndGroup => return Err(Malformed::UnexpectedEndGroup),
    };
    if len > buf.len() as u64 {
        return Err(Malformed::Truncated);
    }
    *buf = &buf[len as usize..];
    Ok(())
}

/// Why bytes are no `SensorValuesRequest`.
#[derive(Debug)]
enum Malformed {
    /// A bad varint or field key, as prost's helpers found it.
    Wire(prost::DecodeError),
    /// A known field with another wire type than its declared type has.
    WireType { expected: WireType, found: WireType },
    /// A length or fixed-size field running past the end of its message.
    Truncated,
    /// A string field (named) that is not UTF-8.
    NotUtf8(&'static str),
    /// An end-group key that closes no open group.
    UnexpectedEndGroup,
    /// Groups nested deeper than prost allows.
    TooDeep,
}

impl From<prost::DecodeError> for Malformed {
    fn from(err: prost::DecodeError) -> Self {
        Self::Wire(err)
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Wire(err) => err.fmt(f),
            Self::WireType { expected, found } => {
                write!(f, "invalid wire type {found:?} (expected {expected:?})")
            }
            Self::Truncated => f.write_str("a field runs past the end of its message"),
            Self::NotUtf8(field) => write!(f, "{field} is not UTF-8"),
            Self::UnexpectedEndGroup => f.write_str("unexpected end-group tag"),
            Self::TooDeep => f.write_str("groups nested too deep"),
        }
    }
}

/// The status for bytes that are no `SensorValuesRequest`: INTERNAL, as
/// tonic's prost codec answers.
#[cold]
fn malformed(item: Option<usize>, err: Malformed) -> Status {
    match item {
        Some(index) => Status::internal(format!(
            "undecodable SensorValuesRequest: items[{index}]: {err}"
        )),
        None => Status::internal(format!("undecodable SensorValuesRequest: {err}")),
    }
}

#[cfg(test)]
mod tests {
    //! The decoder against prost's, the reference: prost decoding plus the
    //! conversion the service used before this module existed.

    use prost::Message;
    use prost::encoding::{MAX_TAG, encode_key, encode_varint};
    use sink_proto::sensor_value::Measurement;
    use sink_proto::{SensorValue, SensorValuesRequest};
    use tonic::Code;

    use super::*;

    /// What a decoding came to: the batch, or the status code and, for
    /// invalid timestamps, the message (malformed bytes are worded apart).
    type Outcome = Result<Batch, (Code, Option<String>)>;

    fn received_at() -> Timestamp {
        Timestamp::new(1_795_860_001, 250).expect("in range")
    }

    /// The old path: prost, then the conversion into readings.
    fn reference(message: &[u8]) -> Outcome {
        let request = SensorValuesRequest::decode(message).map_err(|_| (Code::Internal, None))?;
        let mut batch = Batch::with_capacity(request.items.len());
        for (index, item) in request.items.into_iter().enumerate() {
            let measurement = item.measurement.unwrap_or_default();
            let created_at = match measurement.created_at {
                None => None,
                Some(t) => Some(
                    u32::try_from(t.nanos)
                        .ok()
                        .and_then(|nanos| Timestamp::new(t.seconds, nanos))
                        .ok_or_else(|| {
                            (Code::InvalidArgument, Some(format!(
                                "items[{index}].measurement.created_at ({}s, {}ns) is outside 0001-01-01..9999-12-31 or has nanos outside 0..1e9",
                                t.seconds, t.nanos
                            )))
                        })?,
                ),
            };
            let invalid =
                |why: String| (Code::InvalidArgument, Some(format!("items[{index}]{why}")));
            let value = match (measurement.sensor_value, measurement.sensor_value_float) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        ".measurement has both sensor_value and sensor_value_float; send one"
                            .into(),
                    ));
                }
                (None, Some(float)) if !float.is_finite() => {
                    return Err(invalid(format!(
                        ".measurement.sensor_value_float is {float}, which JSON cannot write; send a finite number"
                    )));
                }
                (None, Some(float)) => Some(Value::Float(float)),
                (value, None) => value.map(Value::Int),
            };
            let limits = ReadingLimits::default();
            limits
                .check_name(&item.sensor_name)
                .and_then(|()| limits.check_label_count(item.labels.len()))
                .and_then(|()| {
                    item.labels
                        .iter()
                        .try_for_each(|(k, v)| limits.check_label(k, v))
                })
                .map_err(|why| invalid(format!(": {why}")))?;
            batch.push(Reading {
                sensor_name: item.sensor_name.into(),
                labels: item.labels.into_iter().collect(),
                value,
                created_at,
                received_at: received_at(),
            });
        }
        Ok(batch)
    }

    fn ours(message: &[u8]) -> Outcome {
        match decode_request(message, received_at(), &ReadingLimits::default()) {
            Err(status) => Err((status.code(), None)),
            Ok(decoded) => {
                let empty = decoded.is_empty();
                let readings = decoded
                    .readings
                    .map_err(|status| (status.code(), Some(status.message().to_owned())));
                assert_eq!(empty, readings.as_ref().is_ok_and(|batch| batch.is_empty()));
                readings
            }
        }
    }

    #[track_caller]
    fn assert_same(message: &[u8]) -> Outcome {
        let expected = reference(message);
        assert_eq!(ours(message), expected, "message {message:02x?}");
        expected
    }

    /// xorshift64*: enough randomness for generating inputs, reproducible
    /// from the seed that a failure names.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn one_in(&mut self, n: usize) -> bool {
            self.below(n) == 0
        }
        fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
            choices[self.below(choices.len())]
        }
    }

    fn name(rng: &mut Rng) -> String {
        match rng.below(6) {
            0 => String::new(),
            1 => "t1".into(),
            2 => "ünïcødé 温度 🌡".into(),
            3 => "x".repeat(200),
            _ => format!("sensor-{}", rng.below(1000)),
        }
    }

    fn value(rng: &mut Rng) -> i64 {
        let random = rng.next() as i64;
        rng.pick(&[0, 1, -1, 42, i64::MIN, i64::MAX, random])
    }

    fn timestamp(rng: &mut Rng) -> prost_types::Timestamp {
        // Mostly in range, so that most requests are accepted.
        let random_nanos = rng.below(1_000_000_000) as i32;
        let (seconds, nanos) = if rng.one_in(8) {
            (
                rng.pick(&[-62_135_596_801, 253_402_300_800, i64::MIN, i64::MAX]),
                rng.pick(&[-1, 1_000_000_000, i32::MIN, i32::MAX, 0]),
            )
        } else {
            (
                rng.pick(&[0, 1_795_860_000, -62_135_596_800, 253_402_300_799]),
                rng.pick(&[0, 512_000_000, 999_999_999, random_nanos]),
            )
        };
        prost_types::Timestamp { seconds, nanos }
    }

    fn float(rng: &mut Rng) -> f64 {
        let random = f64::from_bits(rng.next());
        rng.pick(&[
            0.0,
            -0.0,
            21.5,
            1e300,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
            random,
        ])
    }

    fn measurement(rng: &mut Rng) -> Measurement {
        // Mostly one value of either kind; sometimes both, which is invalid.
        let (sensor_value, sensor_value_float) = match rng.below(8) {
            0 => (None, None),
            1 => (Some(value(rng)), Some(float(rng))),
            2 | 3 => (None, Some(float(rng))),
            _ => (Some(value(rng)), None),
        };
        Measurement {
            sensor_value,
            created_at: (!rng.one_in(4)).then(|| timestamp(rng)),
            sensor_value_float,
        }
    }

    fn label_text(rng: &mut Rng) -> String {
        let random = rng.below(5);
        rng.pick(&["", "site", "ünït", "a\nb", "z"])
            .to_string()
            .repeat(1 + random)
    }

    fn sensor_value(rng: &mut Rng) -> SensorValue {
        SensorValue {
            sensor_name: name(rng),
            measurement: (!rng.one_in(4)).then(|| measurement(rng)),
            labels: (0..rng.pick(&[0, 0, 1, 3]))
                .map(|_| (label_text(rng), label_text(rng)))
                .collect(),
        }
    }

    fn request(rng: &mut Rng) -> SensorValuesRequest {
        let random = rng.below(40);
        let count = rng.pick(&[0, 1, 2, 3, 10, random]);
        SensorValuesRequest {
            items: (0..count).map(|_| sensor_value(rng)).collect(),
        }
    }

    /// A varint, sometimes padded with redundant continuation bytes up to the
    /// 10 bytes a varint may take (still valid), rarely one too long.
    fn varint(rng: &mut Rng, mut value: u64, out: &mut Vec<u8>) {
        if rng.one_in(200) {
            // 11 bytes, or a 10th byte over 1: invalid either way.
            out.extend_from_slice(&[0xff; 9]);
            out.push(rng.pick(&[0x02, 0x80]));
            out.push(0x01);
            return;
        }
        if !rng.one_in(5) {
            encode_varint(value, out);
            return;
        }
        let len = 10 - rng.below(3);
        for _ in 1..len {
            out.push(0x80 | (value & 0x7f) as u8);
            value >>= 7;
        }
        // value now holds at most the 10th byte's share, 0 or 1.
        out.push(value as u8);
    }

    fn key(rng: &mut Rng, tag: u32, wire_type: WireType, out: &mut Vec<u8>) {
        varint(rng, u64::from(tag << 3 | wire_type as u32), out);
    }

    fn len_field(rng: &mut Rng, tag: u32, payload: &[u8], out: &mut Vec<u8>) {
        key(rng, tag, WireType::LengthDelimited, out);
        varint(rng, payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    /// A field its message does not declare, of any wire type; rarely one
    /// that it does declare, with a random wire type.
    fn unknown_field(rng: &mut Rng, known: &[u32], depth: usize, out: &mut Vec<u8>) {
        let tag = if !known.is_empty() && rng.one_in(40) {
            rng.pick(known)
        } else {
            loop {
                let tag = rng.pick(&[1, 2, 3, 4, 5, 15, 16, 1000, MAX_TAG]);
                if !known.contains(&tag) {
                    break tag;
                }
            }
        };
        match rng.below(if depth < 3 { 5 } else { 4 }) {
            0 => {
                key(rng, tag, WireType::Varint, out);
                let value = rng.next() >> rng.below(64);
                varint(rng, value, out);
            }
            1 => {
                key(rng, tag, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&(rng.next() as u32).to_le_bytes());
            }
            2 => {
                key(rng, tag, WireType::SixtyFourBit, out);
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
            3 => {
                let payload: Vec<u8> = (0..rng.below(12)).map(|_| rng.next() as u8).collect();
                len_field(rng, tag, &payload, out);
            }
            _ => {
                key(rng, tag, WireType::StartGroup, out);
                for _ in 0..rng.below(3) {
                    unknown_field(rng, &[], depth + 1, out);
                }
                key(rng, tag, WireType::EndGroup, out);
            }
        }
    }

    /// Encoded fields of a `google.protobuf.Int64Value`: prost's encodings
    /// of random values, one after the other (so that the last wins), hand
    /// written ones and unknown fields.
    fn wrapper_payload(rng: &mut Rng, out: &mut Vec<u8>) {
        for _ in 0..rng.pick(&[0, 1, 1, 2, 3]) {
            match rng.below(3) {
                0 => value(rng).encode(out).expect("room"),
                1 => {
                    key(rng, WRAPPED_VALUE, WireType::Varint, out);
                    let value = value(rng);
                    varint(rng, value as u64, out);
                }
                _ => unknown_field(rng, &[WRAPPED_VALUE], 0, out),
            }
        }
    }

    fn timestamp_payload(rng: &mut Rng, out: &mut Vec<u8>) {
        for _ in 0..rng.pick(&[0, 1, 1, 2, 3]) {
            match rng.below(4) {
                0 | 1 => timestamp(rng).encode(out).expect("room"),
                2 => {
                    let t = timestamp(rng);
                    if rng.one_in(2) {
                        key(rng, SECONDS, WireType::Varint, out);
                        varint(rng, t.seconds as u64, out);
                    } else {
                        key(rng, NANOS, WireType::Varint, out);
                        // int32 is sign-extended to 64 bits on the wire; a
                        // wider varint is truncated when read.
                        let wide = if rng.one_in(4) {
                            rng.next()
                        } else {
                            i64::from(t.nanos) as u64
                        };
                        varint(rng, wide, out);
                    }
                }
                _ => unknown_field(rng, &[SECONDS, NANOS], 0, out),
            }
        }
    }

    fn measurement_payload(rng: &mut Rng, out: &mut Vec<u8>) {
        for _ in 0..rng.pick(&[0, 1, 1, 2, 3]) {
            match rng.below(4) {
                0 => measurement(rng).encode(out).expect("room"),
                1 => {
                    let mut payload = Vec::new();
                    wrapper_payload(rng, &mut payload);
                    len_field(rng, SENSOR_VALUE, &payload, out);
                }
                2 => {
                    let mut payload = Vec::new();
                    timestamp_payload(rng, &mut payload);
                    len_field(rng, CREATED_AT, &payload, out);
                }
                3 if rng.one_in(2) => {
                    let mut payload = Vec::new();
                    if !rng.one_in(4) {
                        key(rng, WRAPPED_VALUE, WireType::SixtyFourBit, &mut payload);
                        payload.extend_from_slice(&float(rng).to_le_bytes());
                    }
                    len_field(rng, SENSOR_VALUE_FLOAT, &payload, out);
                }
                _ => unknown_field(rng, &[SENSOR_VALUE, CREATED_AT, SENSOR_VALUE_FLOAT], 0, out),
            }
        }
    }

    fn item_payload(rng: &mut Rng, out: &mut Vec<u8>) {
        for _ in 0..rng.pick(&[0, 1, 1, 1, 2, 3]) {
            match rng.below(5) {
                0 | 1 => sensor_value(rng).encode(out).expect("room"),
                2 => {
                    let mut payload = Vec::new();
                    measurement_payload(rng, &mut payload);
                    len_field(rng, MEASUREMENT, &payload, out);
                }
                3 => {
                    let mut name = name(rng).into_bytes();
                    if rng.one_in(10) {
                        // Not UTF-8: a lone continuation byte, or a cut
                        // multi-byte character.
                        name.push(rng.pick(&[0x80, 0xc3, 0xff]));
                    }
                    len_field(rng, SENSOR_NAME, &name, out);
                }
                4 if rng.one_in(2) => {
                    // A map entry as any encoder might write it: fields in
                    // either order, repeated or missing, unknown ones between.
                    let mut entry = Vec::new();
                    for _ in 0..rng.pick(&[0, 1, 2, 2, 3]) {
                        match rng.below(5) {
                            0 | 1 => {
                                let text = label_text(rng);
                                len_field(rng, ENTRY_KEY, text.as_bytes(), &mut entry)
                            }
                            2 | 3 => {
                                let mut text = label_text(rng).into_bytes();
                                if rng.one_in(20) {
                                    text.push(0xff);
                                }
                                len_field(rng, ENTRY_VALUE, &text, &mut entry)
                            }
                            _ => unknown_field(rng, &[ENTRY_KEY, ENTRY_VALUE], 0, &mut entry),
                        }
                    }
                    len_field(rng, LABELS, &entry, out);
                }
                _ => unknown_field(rng, &[SENSOR_NAME, MEASUREMENT, LABELS], 0, out),
            }
        }
    }

    /// A request as any protobuf encoder might write it: prost's encodings
    /// of whole requests and items, hand-built items whose fields repeat
    /// and interleave with unknown ones, non-canonical varints.
    fn wire_request(rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.pick(&[0, 1, 2, 5, 10]) {
            match rng.below(6) {
                0 => request(rng).encode(&mut out).expect("room"),
                1..=3 => {
                    let mut payload = Vec::new();
                    item_payload(rng, &mut payload);
                    len_field(rng, ITEMS, &payload, &mut out);
                }
                _ => unknown_field(rng, &[ITEMS], 0, &mut out),
            }
        }
        out
    }

    #[test]
    fn prost_encoded_requests_decode_to_the_same_readings() {
        for seed in 0..3_000 {
            let mut rng = Rng::new(seed);
            let request = request(&mut rng);
            let message = request.encode_to_vec();
            assert_eq!(message.len(), request.encoded_len());
            let outcome = assert_same(&message);
            if let Ok(batch) = outcome {
                assert_eq!(batch.len(), request.items.len(), "seed {seed}");
            }
        }
    }

    #[test]
    fn requests_with_repeated_unknown_and_odd_fields_decode_as_prost_does() {
        let (mut accepted, mut invalid, mut malformed) = (0, 0, 0);
        for seed in 0..20_000 {
            let mut rng = Rng::new(seed);
            match assert_same(&wire_request(&mut rng)) {
                Ok(_) => accepted += 1,
                Err((Code::InvalidArgument, _)) => invalid += 1,
                Err(_) => malformed += 1,
            }
        }
        // The generator reaches every outcome, mostly acceptance.
        assert!(accepted > 10_000, "{accepted} accepted");
        assert!(invalid > 500, "{invalid} invalid timestamps");
        assert!(malformed > 500, "{malformed} malformed");
    }

    #[test]
    fn every_truncation_decodes_as_prost_does() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let message = if seed % 2 == 0 {
                request(&mut rng).encode_to_vec()
            } else {
                wire_request(&mut rng)
            };
            for end in 0..message.len() {
                let _ = assert_same(&message[..end]);
            }
        }
    }

    #[test]
    fn random_mutations_decode_as_prost_does_and_never_panic() {
        for seed in 0..20_000 {
            let mut rng = Rng::new(seed);
            let mut message = if seed % 2 == 0 {
                request(&mut rng).encode_to_vec()
            } else {
                wire_request(&mut rng)
            };
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(message.len() + 1);
                match rng.below(6) {
                    0 if at < message.len() => message[at] ^= 1 << rng.below(8),
                    1 if at < message.len() => {
                        let random = rng.next() as u8;
                        message[at] = rng.pick(&[0, 0x7f, 0x80, 0xff, random])
                    }
                    2 if at < message.len() => {
                        message.remove(at);
                    }
                    3 => {
                        let end = (at + rng.below(8)).min(message.len());
                        let copy = message[at..end].to_vec();
                        message.splice(at..at, copy);
                    }
                    _ => message.insert(at, rng.next() as u8),
                }
            }
            let _ = assert_same(&message);
        }
    }

    #[test]
    fn pure_garbage_is_refused_or_read_as_prost_does() {
        for seed in 0..20_000 {
            let mut rng = Rng::new(seed);
            let message: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            let _ = assert_same(&message);
        }
    }

    /// The length-delimited field `tag` holding `payload`, canonically encoded.
    fn wrap(tag: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(tag, WireType::LengthDelimited, &mut out);
        encode_varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// An unknown group (field 9) holding itself, `levels` deep.
    fn nested_groups(levels: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..levels {
            encode_key(9, WireType::StartGroup, &mut out);
        }
        for _ in 0..levels {
            encode_key(9, WireType::EndGroup, &mut out);
        }
        out
    }

    #[test]
    fn groups_nested_near_the_recursion_limit_at_every_level_decode_as_prost_does() {
        let (mut accepted, mut refused) = (0, 0);
        for levels in 94..=101 {
            let groups = nested_groups(levels);
            let in_wrapper = wrap(MEASUREMENT, &wrap(SENSOR_VALUE, &groups));
            let in_timestamp = wrap(MEASUREMENT, &wrap(CREATED_AT, &groups));
            let in_measurement = wrap(MEASUREMENT, &groups);
            for item in [&groups, &in_measurement, &in_wrapper, &in_timestamp] {
                for message in [groups.clone(), wrap(ITEMS, item)] {
                    match assert_same(&message) {
                        Ok(_) => accepted += 1,
                        Err(_) => refused += 1,
                    }
                }
            }
        }
        assert!(accepted > 0 && refused > 0);
    }

    /// The one reading of a request whose one item holds `fields`.
    fn one_reading(fields: &[u8]) -> Reading {
        let mut batch = assert_same(&wrap(ITEMS, fields)).expect("accepted");
        assert_eq!(batch.len(), 1);
        batch.remove(0)
    }

    /// The one reading of a request whose one measurement holds `fields`.
    fn one_measured(fields: &[u8]) -> Reading {
        one_reading(&wrap(MEASUREMENT, fields))
    }

    #[test]
    fn edge_cases_read_as_protobuf_says() {
        // Nothing at all: an empty request.
        let empty = decode_request(&[], received_at(), &ReadingLimits::default()).expect("valid");
        assert!(empty.is_empty());

        // An empty item: one reading with an empty name, no value and no
        // timestamp; an empty measurement is the same.
        for reading in [one_reading(&[]), one_measured(&[])] {
            assert_eq!(reading.sensor_name, "");
            assert_eq!((reading.value, reading.created_at), (None, None));
            assert!(reading.labels.is_empty());
        }

        // An empty wrapper is the value 0; an empty timestamp the epoch.
        assert_eq!(
            one_measured(&wrap(SENSOR_VALUE, &[])).value,
            Some(Value::Int(0))
        );
        assert_eq!(
            one_measured(&wrap(SENSOR_VALUE_FLOAT, &[])).value,
            Some(Value::Float(0.0))
        );
        assert_eq!(
            one_measured(&wrap(CREATED_AT, &[])).created_at,
            Timestamp::new(0, 0)
        );

        // Repeated scalar: the last name wins. Repeated message: merged, so
        // a timestamp sent in two halves is whole.
        let first = SensorValue {
            sensor_name: "first".into(),
            measurement: Some(Measurement {
                sensor_value: Some(7),
                created_at: Some(prost_types::Timestamp {
                    seconds: 1_795_860_000,
                    nanos: 0,
                }),
                sensor_value_float: None,
            }),
            labels: [("site".into(), "a".into())].into(),
        };
        let second = SensorValue {
            sensor_name: "second".into(),
            measurement: Some(Measurement {
                sensor_value: None,
                created_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 5,
                }),
                sensor_value_float: None,
            }),
            labels: [("site".into(), "b".into()), ("unit".into(), "C".into())].into(),
        };
        let merged = one_reading(&[first.encode_to_vec(), second.encode_to_vec()].concat());
        assert_eq!(merged.sensor_name, "second");
        assert_eq!(merged.value, Some(Value::Int(7)));
        assert_eq!(
            merged.labels.iter().collect::<Vec<_>>(),
            [("site", "b"), ("unit", "C")]
        );
        assert_eq!(merged.created_at, Timestamp::new(1_795_860_000, 5));

        // The longest varint, 10 bytes: -1 as the value.
        let minus_one = (-1i64).encode_to_vec();
        assert_eq!(minus_one.len(), 11, "key and a 10-byte varint");
        assert_eq!(
            one_measured(&wrap(SENSOR_VALUE, &minus_one)).value,
            Some(Value::Int(-1))
        );

        // An unknown field with the largest tag is skipped.
        let mut unknown = Vec::new();
        encode_key(MAX_TAG, WireType::SixtyFourBit, &mut unknown);
        unknown.extend_from_slice(&[0xff; 8]);
        assert_eq!(one_reading(&unknown).sensor_name, "");

        // Not UTF-8: malformed, INTERNAL, naming the item.
        let message = wrap(ITEMS, &wrap(SENSOR_NAME, &[0xff]));
        let refused = decode_request(&message, received_at(), &ReadingLimits::default())
            .expect_err("not UTF-8");
        assert_eq!(refused.code(), Code::Internal);
        assert!(
            refused.message().contains("items[0]"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn an_invalid_timestamp_names_its_item_but_malformed_bytes_win() {
        let item = |nanos| SensorValue {
            sensor_name: "t".into(),
            measurement: Some(Measurement {
                sensor_value: None,
                created_at: Some(prost_types::Timestamp { seconds: 0, nanos }),
                sensor_value_float: None,
            }),
            labels: Default::default(),
        };
        let request = SensorValuesRequest {
            items: vec![item(0), item(-1), item(1_000_000_000)],
        };
        let message = request.encode_to_vec();
        let decoded = decode_request(&message, received_at(), &ReadingLimits::default())
            .expect("well formed");
        assert!(!decoded.is_empty());
        let invalid = decoded.readings.expect_err("nanos -1");
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(
            invalid
                .message()
                .starts_with("items[1].measurement.created_at (0s, -1ns)"),
            "{}",
            invalid.message()
        );

        // Nanos sent as a varint wider than 32 bits are truncated, as prost
        // reads int32: 2^32 - 1 is -1.
        let mut wide = Vec::new();
        encode_key(NANOS, WireType::Varint, &mut wide);
        encode_varint(u64::from(u32::MAX), &mut wide);
        assert_eq!(
            assert_same(&wrap(ITEMS, &wrap(MEASUREMENT, &wrap(CREATED_AT, &wide))))
                .expect_err("nanos -1")
                .0,
            Code::InvalidArgument
        );

        // Bytes malformed after an invalid timestamp: malformed wins.
        let mut truncated_later = message;
        truncated_later.extend_from_slice(&[(ITEMS << 3 | 2) as u8, 5]);
        let refused = decode_request(&truncated_later, received_at(), &ReadingLimits::default())
            .expect_err("truncated");
        assert_eq!(refused.code(), Code::Internal);
    }

    fn item_with(measurement: Measurement, labels: &[(&str, &str)], name: &str) -> Vec<u8> {
        SensorValuesRequest {
            items: vec![
                SensorValue {
                    sensor_name: "fine".into(),
                    measurement: None,
                    labels: Default::default(),
                },
                SensorValue {
                    sensor_name: name.into(),
                    measurement: Some(measurement),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
            ],
        }
        .encode_to_vec()
    }

    fn refusal(message: &[u8]) -> String {
        let decoded =
            decode_request(message, received_at(), &ReadingLimits::default()).expect("well formed");
        let status = decoded.readings.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
        status.message().to_owned()
    }

    #[test]
    fn what_a_reading_cannot_hold_is_invalid_argument_naming_the_item() {
        let float = |value| Measurement {
            sensor_value_float: Some(value),
            ..Measurement::default()
        };
        let both = Measurement {
            sensor_value: Some(1),
            sensor_value_float: Some(1.0),
            created_at: None,
        };
        assert_eq!(
            refusal(&item_with(both, &[], "t")),
            "items[1].measurement has both sensor_value and sensor_value_float; send one"
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let message = refusal(&item_with(float(bad), &[], "t"));
            assert!(
                message.starts_with("items[1].measurement.sensor_value_float is "),
                "{message}"
            );
            assert!(message.contains("JSON cannot write"), "{message}");
        }
        assert_eq!(
            refusal(&item_with(float(1.0), &[("", "x")], "t")),
            "items[1]: a label key is empty"
        );
        let long_key = "k".repeat(129);
        assert!(
            refusal(&item_with(float(1.0), &[(&long_key, "x")], "t"))
                .contains("max_label_key_bytes (128)")
        );
        let long_value = "v".repeat(1025);
        assert!(
            refusal(&item_with(float(1.0), &[("k", &long_value)], "t"))
                .contains("max_label_value_bytes (1024)")
        );
        let many: Vec<(String, String)> = (0..65)
            .map(|i| (format!("k{i:02}"), String::new()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            refusal(&item_with(float(1.0), &many, "t")),
            "items[1]: 65 labels, over max_labels (64)"
        );
        assert!(
            refusal(&item_with(float(1.0), &[], &"n".repeat(1025)))
                .contains("max_name_bytes (1024)")
        );
        // At the bounds, accepted.
        let at_bounds = item_with(float(2.5), &many[..64], &"n".repeat(1024));
        let batch = assert_same(&at_bounds).expect("within bounds");
        assert_eq!(batch[1].labels.len(), 64);
        assert_eq!(batch[1].value, Some(Value::Float(2.5)));
    }

    #[test]
    fn names_are_shared_across_calls_and_checked_as_text_at_any_length() {
        let names = |message: &[u8]| -> Vec<SensorName> {
            decode_request(message, received_at(), &ReadingLimits::default())
                .expect("well formed")
                .readings
                .expect("valid")
                .iter()
                .map(|reading| reading.sensor_name.clone())
                .collect()
        };
        let plain = Measurement::default();
        let first = names(&item_with(plain, &[], "pump"));
        let second = names(&item_with(plain, &[], "pump"));
        assert_eq!(first[1], "pump");
        assert!(SensorName::ptr_eq(&first[1], &second[1]));
        assert!(SensorName::ptr_eq(&first[0], &second[0]));
        // Not UTF-8 is malformed whatever the length, as prost reads it,
        // before any limit: a name past max_name_bytes is checked too.
        for len in [10, 1025] {
            let mut name = vec![b'n'; len];
            name[len / 2] = 0xff;
            let message = wrap(ITEMS, &wrap(SENSOR_NAME, &name));
            let status = decode_request(&message, received_at(), &ReadingLimits::default())
                .expect_err("malformed");
            assert_eq!(status.code(), Code::Internal, "{len}: {status:?}");
        }
    }

    #[test]
    fn labels_of_many_entries_are_refused_before_any_is_allocated() {
        // 100 000 empty entries in one item: 2 bytes each on the wire.
        let mut item = Vec::new();
        for _ in 0..100_000 {
            item.extend_from_slice(&wrap(LABELS, &[]));
        }
        let message = wrap(ITEMS, &item);
        let decoded = decode_request(&message, received_at(), &ReadingLimits::default())
            .expect("well formed");
        assert_eq!(decoded.labels, 0);
        assert!(
            decoded
                .readings
                .unwrap_err()
                .message()
                .contains("100000 labels")
        );
    }
}
