//! Reads the one message of a unary call's request body by hand, instead of
//! with tonic's `Grpc::unary`, so that every limit acts before the bytes that
//! would break it are held:
//!
//! - the 5-byte gRPC prefix (compression flag and length) is read first, so
//!   an oversize message is refused (RESOURCE_EXHAUSTED) and the rate limit
//!   charged on the encoded size before any of the body is read or decoded;
//! - the body is collected as it arrives, in a buffer that grows with the
//!   bytes received, never reserved at the announced length (a 5-byte prefix
//!   announcing 1 GiB costs 5 bytes, not 1 GiB), and its bytes can be
//!   reserved from a memory budget as they arrive ([`BodyReader::metered`]);
//! - the caller bounds each read with a deadline (`body_timeout`);
//! - a second message in the same unary call is refused, and nothing of the
//!   call is accepted;
//! - gzip and zstd messages (`grpc-encoding`) are inflated into a buffer
//!   bounded by `max_message_bytes`, so a decompression bomb is refused;
//!   every gzip member and zstd frame is inflated, and trailing bytes that
//!   are neither refuse the call.

use std::fmt;
use std::future::poll_fn;
use std::io::Read;
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sink_api::{MemoryBudget, Reservation};
use tonic::codegen::{Body, StdError};
use tonic::{Code, Status};

/// Length of the gRPC message prefix: a compression flag and a big-endian u32.
const PREFIX_LEN: usize = 5;

/// The `grpc-encoding` a call's message is compressed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// The encodings this server inflates, for `grpc-accept-encoding`.
pub const ACCEPTED_ENCODINGS: &str = "identity,gzip,zstd";

impl Encoding {
    /// The encoding `headers` announce (identity when none).
    pub fn from_headers(headers: &tonic::codegen::http::HeaderMap) -> Result<Self, Status> {
        headers
            .get("grpc-encoding")
            .map_or(Ok(Self::Identity), |value| {
                Self::from_value(value.as_bytes())
            })
    }

    /// The encoding a `grpc-encoding` value names; an unknown one is
    /// UNIMPLEMENTED, as the gRPC spec asks, naming the ones accepted.
    pub fn from_value(value: &[u8]) -> Result<Self, Status> {
        match value {
            b"identity" => Ok(Self::Identity),
            b"gzip" => Ok(Self::Gzip),
            b"zstd" => Ok(Self::Zstd),
            other => {
                let mut status = Status::unimplemented(format!(
                    "grpc-encoding {:?} is not supported; use one of {ACCEPTED_ENCODINGS}",
                    String::from_utf8_lossy(other)
                ));
                status.metadata_mut().insert(
                    "grpc-accept-encoding",
                    tonic::metadata::MetadataValue::from_static(ACCEPTED_ENCODINGS),
                );
                Err(status)
            }
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        })
    }
}

/// The 5-byte prefix of the call's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Whether the message is compressed with the call's `grpc-encoding`.
    pub compressed: bool,
    /// The length of the message as sent (compressed, if it is).
    pub len: usize,
}

/// A request body, read frame by frame into a buffer that grows only with
/// the bytes received.
pub struct BodyReader<B> {
    body: B,
    /// Bytes received and not yet taken.
    buf: Received,
    /// Once [`metered`](Self::metered): the budget the bytes received are
    /// reserved from as they arrive, what is reserved, and how many bytes
    /// have arrived in all.
    meter: Option<Meter>,
}

/// The bytes of a body reserved as they arrive.
struct Meter {
    budget: MemoryBudget,
    held: Option<Reservation>,
    received: u64,
}

impl Meter {
    /// Reserves what has arrived beyond what is held, waiting for room: a
    /// body that finds none is not read further, and HTTP/2 flow control
    /// holds its client back.
    async fn cover(&mut self, arrived: usize) -> Result<(), Status> {
        self.received += arrived as u64;
        let held = self.held.as_ref().map_or(0, Reservation::bytes);
        if self.received <= held {
            return Ok(());
        }
        let more = match self.budget.try_reserve(self.received - held) {
            Ok(more) => more,
            Err(_) => self
                .budget
                .reserve(self.received - held)
                .await
                .map_err(|err| Status::resource_exhausted(err.to_string()))?,
        };
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }
}

/// Bytes received and not yet taken: the first data frame as it came, so
/// that a message sent in one frame (most are) is never copied; frames are
/// gathered into one buffer only once a second one arrives.
#[derive(Default)]
struct Received {
    /// The first frame's bytes, while `gathered` is empty.
    first: Bytes,
    gathered: BytesMut,
}

impl Received {
    fn bytes(&self) -> &[u8] {
        if self.gathered.is_empty() {
            &self.first
        } else {
            &self.gathered
        }
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, mut data: impl Buf) {
        if self.is_empty() {
            // No copy when `data` is `Bytes`, as this server's, hyper's and tonic's are.
            self.first = data.copy_to_bytes(data.remaining());
            return;
        }
        if !self.first.is_empty() {
            self.gathered.extend_from_slice(&self.first);
            self.first = Bytes::new();
        }
        self.gathered.put(data);
    }

    /// The first `len` bytes (at most [`len`](Self::len)).
    fn take(&mut self, len: usize) -> Bytes {
        if self.gathered.is_empty() {
            self.first.split_to(len)
        } else {
            self.gathered.split_to(len).freeze()
        }
    }
}

impl<B> BodyReader<B>
where
    B: Body + Unpin,
    B::Error: Into<StdError>,
{
    pub fn new(body: B) -> Self {
        Self {
            body,
            buf: Received::default(),
            meter: None,
        }
    }

    /// From now on, reserves every byte received from `budget` as it
    /// arrives (what is buffered already at once), waiting for room when
    /// there is none; given back when the reader is dropped. So what bodies
    /// still arriving hold is bounded by `budget` and paid for byte by byte
    /// by their senders, while a body announced and not sent holds nothing.
    pub async fn metered(&mut self, budget: MemoryBudget) -> Result<(), Status> {
        let mut meter = Meter {
            budget,
            held: None,
            received: 0,
        };
        meter.cover(self.buf.len()).await?;
        self.meter = Some(meter);
        Ok(())
    }

    /// Reads the message prefix; `Ok(None)` when the body ends with no
    /// message at all.
    pub async fn prefix(&mut self) -> Result<Option<Prefix>, Status> {
        if !self.fill(PREFIX_LEN).await? {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(Status::internal(
                "the request body ends inside a gRPC message prefix",
            ));
        }
        let prefix = &self.buf.bytes()[..PREFIX_LEN];
        let compressed = match prefix[0] {
            0 => false,
            1 => true,
            flag => {
                return Err(Status::internal(format!(
                    "bad gRPC compression flag {flag} (0 or 1)"
                )));
            }
        };
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        Ok(Some(Prefix {
            compressed,
            len: len as usize,
        }))
    }

    /// Reads the message `prefix` announced (the prefix must have come from
    /// [`prefix`](Self::prefix)), then the rest of the body, which must be
    /// empty: a unary call carries exactly one message.
    pub async fn message(&mut self, prefix: Prefix) -> Result<Bytes, Status> {
        let end = PREFIX_LEN + prefix.len;
        if !self.fill(end).await? {
            return Err(Status::internal(format!(
                "the request body ends after {} of the {} bytes its gRPC prefix announced",
                self.buf.len() - PREFIX_LEN,
                prefix.len
            )));
        }
        self.buf.take(PREFIX_LEN);
        let message = self.buf.take(prefix.len);
        if self.fill(1).await? {
            return Err(Status::internal(
                "a unary call carries one message, this one carried more; nothing of it was accepted",
            ));
        }
        Ok(message)
    }

    /// Reads data frames until at least `len` bytes are buffered (`true`) or
    /// the body ends first (`false`). Trailers are skipped.
    async fn fill(&mut self, len: usize) -> Result<bool, Status> {
        while self.buf.len() < len {
            // Taken whole by a plain function: no frame (whose data need not
            // be `Send`) is held across the meter's await.
            let arrived = match absorb(
                &mut self.buf,
                poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await,
            )? {
                Some(arrived) => arrived,
                None => return Ok(false),
            };
            if let Some(meter) = &mut self.meter {
                meter.cover(arrived).await?;
            }
        }
        Ok(true)
    }
}

/// Appends the data of `frame` to `buf`, growing with what arrived however
/// much the prefix announced; says how many bytes that was (0 for trailers),
/// or `None` at the end of the body.
fn absorb<D: Buf, E: Into<StdError>>(
    buf: &mut Received,
    frame: Option<Result<http_body::Frame<D>, E>>,
) -> Result<Option<usize>, Status> {
    let Some(frame) = frame else {
        return Ok(None);
    };
    let frame = frame.map_err(|err| {
        let err: StdError = err.into();
        Status::cancelled(format!("the request body broke off: {err}"))
    })?;
    let Ok(data) = frame.into_data() else {
        return Ok(Some(0));
    };
    let arrived = data.remaining();
    buf.push(data);
    Ok(Some(arrived))
}

/// Inflates `message`, compressed with `encoding`, refusing with
/// RESOURCE_EXHAUSTED once it would exceed `max_bytes`: the output buffer
/// grows with what inflates, up to that bound and no further.
pub fn decompress(encoding: Encoding, message: &[u8], max_bytes: usize) -> Result<Bytes, Status> {
    let mut out = Vec::new();
    let limit = max_bytes as u64 + 1;
    let read = match encoding {
        Encoding::Identity => {
            return Err(Status::internal(
                "the message is flagged compressed but the call has no grpc-encoding",
            ));
        }
        // Every member: a gzip stream may be several concatenated members
        // (RFC 1952), and GzDecoder would stop after the first, answering OK
        // for readings it dropped. Bytes after the last member that are not
        // a member are an error, not ignored.
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(message)
            .take(limit)
            .read_to_end(&mut out),
        Encoding::Zstd => {
            zstd::stream::read::Decoder::with_buffer(message).and_then(|mut decoder| {
                // A zstd frame names the window its decoder must allocate: no
                // more than the largest message needs is granted, or 8 MiB, what
                // streaming compressors use up to level 19 (so a 20-byte frame
                // cannot claim zstd's default of 128 MiB).
                decoder.window_log_max(window_log(max_bytes))?;
                decoder.take(limit).read_to_end(&mut out)
            })
        }
    };
    read.map_err(|err| {
        Status::new(
            Code::Internal,
            format!("the {encoding} message does not decompress: {err}"),
        )
    })?;
    if out.len() > max_bytes {
        return Err(Status::resource_exhausted(format!(
            "the {encoding} message decompresses to more than max_message_bytes ({max_bytes} bytes)"
        )));
    }
    Ok(out.into())
}

/// What inflating a message of up to `max_bytes` takes beside its output:
/// the decoder's window (zstd's up to [`window_log`], gzip's 32 KiB) and the
/// output buffer's growth past the bytes it holds (it doubles).
pub fn decompression_overhead(encoding: Encoding, max_bytes: usize) -> u64 {
    let window = match encoding {
        Encoding::Zstd => 1u64 << window_log(max_bytes),
        Encoding::Gzip | Encoding::Identity => 32 << 10,
    };
    window.saturating_add(max_bytes as u64)
}

/// The zstd window log that covers `max_bytes`, at least 8 MiB's and within
/// what zstd allows.
fn window_log(max_bytes: usize) -> u32 {
    let log = usize::BITS - max_bytes.saturating_sub(1).leading_zeros();
    log.clamp(23, 31)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::Write;
    use std::task::{Context, Poll};

    use super::*;

    /// A request body that delivers `frames` one data frame each.
    struct Frames(VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|data| Ok(http_body::Frame::data(data))),
            )
        }
    }

    /// What a reader makes of `body` cut into frames at `cuts`.
    async fn read_cut(body: &[u8], cuts: &[usize]) -> Result<Bytes, Status> {
        let mut frames = VecDeque::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&body.len()]) {
            frames.push_back(Bytes::copy_from_slice(&body[from..to]));
            from = to;
        }
        let mut reader = BodyReader::new(Frames(frames));
        let prefix = reader.prefix().await?.expect("a prefix");
        reader.message(prefix).await
    }

    #[tokio::test]
    async fn a_message_is_read_whole_however_its_frames_cut_it() {
        let message = b"0123456789";
        let mut body = vec![0, 0, 0, 0, message.len() as u8];
        body.extend_from_slice(message);
        for cuts in [&[][..], &[2], &[5], &[7], &[2, 5, 6, 14]] {
            let read = read_cut(&body, cuts).await.expect("the message");
            assert_eq!(&read[..], message, "cut at {cuts:?}");
        }
        // A second message after the first, in the same frame or the next.
        let mut twice = body.clone();
        twice.extend_from_slice(&body);
        for cuts in [&[][..], &[15], &[3, 17]] {
            let status = read_cut(&twice, cuts).await.expect_err("two messages");
            assert!(status.message().contains("one message"), "{status:?}");
        }
    }

    #[test]
    fn gzip_and_zstd_inflate_and_bombs_are_refused() {
        let plain = vec![7u8; 100_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&plain[..], 3).unwrap();
        for (encoding, packed) in [(Encoding::Gzip, &gz), (Encoding::Zstd, &zst)] {
            assert_eq!(
                decompress(encoding, packed, plain.len()).unwrap(),
                &plain[..]
            );
            let bomb = decompress(encoding, packed, plain.len() - 1).unwrap_err();
            assert_eq!(bomb.code(), Code::ResourceExhausted, "{encoding}");
            let garbage = decompress(encoding, b"not compressed at all", 1000).unwrap_err();
            assert_eq!(garbage.code(), Code::Internal, "{encoding}");
        }
        let flagged = decompress(Encoding::Identity, &gz, 1000).unwrap_err();
        assert_eq!(flagged.code(), Code::Internal);
    }

    #[test]
    fn every_gzip_member_is_inflated_and_trailing_garbage_refused() {
        let member = |bytes: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(bytes).unwrap();
            gz.finish().unwrap()
        };
        let mut two = member(b"first ");
        two.extend(member(b"second"));
        assert_eq!(
            decompress(Encoding::Gzip, &two, 1000).unwrap(),
            &b"first second"[..]
        );
        let mut garbage = member(b"first ");
        garbage.extend_from_slice(b"not a gzip member");
        let refused = decompress(Encoding::Gzip, &garbage, 1000).unwrap_err();
        assert_eq!(refused.code(), Code::Internal, "{refused:?}");
        let mut zstd_two = zstd::stream::encode_all(&b"first "[..], 3).unwrap();
        zstd_two.extend(zstd::stream::encode_all(&b"second"[..], 3).unwrap());
        assert_eq!(
            decompress(Encoding::Zstd, &zstd_two, 1000).unwrap(),
            &b"first second"[..]
        );
        zstd_two.extend_from_slice(b"not a zstd frame");
        let refused = decompress(Encoding::Zstd, &zstd_two, 1000).unwrap_err();
        assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    }

    #[test]
    fn window_log_covers_the_largest_message() {
        assert_eq!(window_log(1), 23);
        assert_eq!(window_log(8 << 20), 23);
        assert_eq!(window_log((8 << 20) + 1), 24);
        assert_eq!(window_log(usize::MAX), 31);
    }

    #[test]
    fn only_known_encodings_are_accepted() {
        assert_eq!(Encoding::from_value(b"gzip").unwrap(), Encoding::Gzip);
        assert_eq!(Encoding::from_value(b"zstd").unwrap(), Encoding::Zstd);
        assert_eq!(
            Encoding::from_value(b"identity").unwrap(),
            Encoding::Identity
        );
        let status = Encoding::from_value(b"snappy").unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(status.metadata().get("grpc-accept-encoding").is_some());
    }
}
