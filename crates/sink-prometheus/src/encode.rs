//! Remote write 1.0 requests: a protobuf `WriteRequest`
//! (`proto/prometheus/remote_write.proto`), snappy-compressed in the block
//! format.
//!
//! The request is encoded by hand straight from the [`Series`] into one
//! reused buffer: building prost messages first would copy every label
//! string once more per request. [`proto`] holds the same messages as prost
//! structs, which decode what this encodes (the tests, the test servers).

use std::ops::Range;

use bytes::Bytes;
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::mapping::Series;

/// The messages of `proto/prometheus/remote_write.proto` as prost structs,
/// for decoding a request (tests, a stand-in receiver).
pub mod proto {
    /// A remote write request: the series it carries.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        /// The series, each with its labels and samples.
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
    }

    /// One series: its labels, sorted by name, and its samples in time order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        /// Sorted by name; `__name__` is the metric name.
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        /// In timestamp order.
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
    }

    /// A label: name and value.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        /// The label's name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// The label's value.
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// A value at a time.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// The value.
        #[prost(double, tag = "1")]
        pub value: f64,
        /// Milliseconds since the Unix epoch.
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }

    /// Decodes a snappy-compressed `WriteRequest`, as a receiver does.
    pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
        let raw = snap::raw::Decoder::new()
            .decompress_vec(body)
            .map_err(|err| format!("not snappy: {err}"))?;
        prost::Message::decode(raw.as_slice()).map_err(|err| format!("not a WriteRequest: {err}"))
    }
}

/// Samples `samples` of `series`: a series, or the part of it that fits in
/// one request.
#[derive(Debug, Clone)]
pub struct Part {
    /// Index of the series.
    pub series: usize,
    /// Which of its samples.
    pub samples: Range<usize>,
}

/// Encodes requests, reusing its buffers from one to the next.
pub struct Encoder {
    raw: Vec<u8>,
    snappy: snap::raw::Encoder,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            raw: Vec::new(),
            snappy: snap::raw::Encoder::new(),
        }
    }
}

/// Protobuf wire types.
const LEN: u8 = 2;
const I64: u8 = 1;
const VARINT: u8 = 0;

/// The key byte of field `tag` (every tag here is below 16: one byte).
const fn key(tag: u8, wire: u8) -> u8 {
    (tag << 3) | wire
}

impl Encoder {
    /// The snappy-compressed `WriteRequest` carrying `parts` of `series`.
    pub fn encode(&mut self, series: &[Series], parts: &[Part]) -> Bytes {
        self.raw.clear();
        for part in parts {
            let series = &series[part.series];
            let samples = &series.samples[part.samples.clone()];
            let labels_len: usize = series
                .labels
                .iter()
                .map(|(name, value)| delimited_len(label_len(name, value)))
                .sum();
            let samples_len: usize = samples
                .iter()
                .map(|sample| delimited_len(sample_len(sample.timestamp)))
                .sum();
            self.raw.push(key(1, LEN));
            encode_varint((labels_len + samples_len) as u64, &mut self.raw);
            for (name, value) in &series.labels {
                self.raw.push(key(1, LEN));
                encode_varint(label_len(name, value) as u64, &mut self.raw);
                self.string(1, name);
                self.string(2, value);
            }
            for sample in samples {
                self.raw.push(key(2, LEN));
                encode_varint(sample_len(sample.timestamp) as u64, &mut self.raw);
                self.raw.push(key(1, I64));
                self.raw.extend_from_slice(&sample.value.to_le_bytes());
                self.raw.push(key(2, VARINT));
                encode_varint(sample.timestamp as u64, &mut self.raw);
            }
        }
        let mut out = vec![0; snap::raw::max_compress_len(self.raw.len())];
        let len = self
            .snappy
            .compress(&self.raw, &mut out)
            .expect("the output has the room snappy asks for");
        out.truncate(len);
        Bytes::from(out)
    }
}

impl Encoder {
    fn string(&mut self, tag: u8, text: &str) {
        self.raw.push(key(tag, LEN));
        encode_varint(text.len() as u64, &mut self.raw);
        self.raw.extend_from_slice(text.as_bytes());
    }
}

/// The length of a field holding a message of `len` bytes, key included.
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn label_len(name: &str, value: &str) -> usize {
    delimited_len(name.len()) + delimited_len(value.len())
}

/// Both fields written, even when zero: valid protobuf, and no branch.
fn sample_len(timestamp: i64) -> usize {
    1 + 8 + 1 + encoded_len_varint(timestamp as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Sample;

    #[test]
    fn what_is_encoded_decodes_as_the_specification_s_messages() {
        let series = vec![
            Series {
                labels: vec![
                    ("__name__".into(), "temp".into()),
                    ("site".into(), "nörth".into()),
                ],
                samples: vec![
                    Sample {
                        timestamp: 1_700_000_000_000,
                        value: 21.5,
                    },
                    Sample {
                        timestamp: 1_700_000_001_000,
                        value: 0.0,
                    },
                    Sample {
                        timestamp: -5,
                        value: -1e300,
                    },
                ],
            },
            Series {
                labels: vec![("__name__".into(), "x".repeat(300))],
                samples: vec![Sample {
                    timestamp: 0,
                    value: f64::NAN,
                }],
            },
        ];
        let parts = [
            Part {
                series: 0,
                samples: 1..3,
            },
            Part {
                series: 1,
                samples: 0..1,
            },
        ];
        let mut encoder = Encoder::default();
        // Twice: the reused buffer must not carry the first over.
        encoder.encode(&series, &parts[..1]);
        let request = proto::decode(&encoder.encode(&series, &parts)).expect("decodes");
        assert_eq!(request.timeseries.len(), 2);
        let first = &request.timeseries[0];
        let labels: Vec<(&str, &str)> = first
            .labels
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect();
        assert_eq!(labels, [("__name__", "temp"), ("site", "nörth")]);
        let samples: Vec<(i64, f64)> = first
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect();
        assert_eq!(samples, [(1_700_000_001_000, 0.0), (-5, -1e300)]);
        let second = &request.timeseries[1];
        assert_eq!(second.labels[0].value.len(), 300);
        assert!(second.samples[0].value.is_nan());
    }

    #[test]
    fn an_empty_request_is_valid() {
        let request = proto::decode(&Encoder::default().encode(&[], &[])).expect("decodes");
        assert!(request.timeseries.is_empty());
    }
}
