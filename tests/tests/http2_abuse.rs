//! The grpc source's own HTTP/2 server under protocol abuse,
//! through the real binary on loopback. Every attack is written by hand in
//! raw frames over a plain TCP stream, and what the server sends back is
//! read and parsed frame by frame: rapid reset, streams the server must
//! reset (MadeYouReset), CONTINUATION floods, HPACK bombs, oversized
//! headers, PING and SETTINGS floods, frames that break the protocol,
//! windows overrun, streams past the limit, random frames, a client that
//! grants no window at shutdown, keepalive, and graceful shutdown as a
//! client sees it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use sink_e2e::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, watch};

/// What a client says first, before its SETTINGS.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// Error codes.
const NO_ERROR: u32 = 0x0;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

// Settings.
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The largest frame payload a peer must accept (SETTINGS_MAX_FRAME_SIZE's
/// default, which neither side changes here).
const MAX_FRAME: usize = 16_384;

/// The header list size the server grants (`server::MAX_HEADER_LIST_SIZE`).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// How much the sink's peak resident memory may grow under one attack.
const MAX_GROWTH_MIB: u64 = 32;

// ---------------------------------------------------------------------------
// Writing frames

/// One frame: the 9-byte header (length, type, flags, stream) and `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    assert!(len < 1 << 24, "a frame payload is at most 2^24 - 1 bytes");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame of `settings` (identifier, value).
fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()[..]].concat())
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// A HEADERS frame carrying the whole `block`.
fn headers_frame(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, block)
}

fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The acknowledgement of a SETTINGS or PING frame.
fn frame_ack(kind: u8, payload: &[u8]) -> Vec<u8> {
    frame(kind, ACK, 0, payload)
}

fn ping(flags: u8, payload: [u8; 8]) -> Vec<u8> {
    frame(PING, flags, 0, &payload)
}

/// A DATA frame ending the stream with `request` as one gRPC message.
fn message_frame(stream: u32, request: &sink_proto::SensorValuesRequest) -> Vec<u8> {
    let message = request.encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&u32::try_from(message.len()).expect("len").to_be_bytes());
    body.extend_from_slice(&message);
    frame(DATA, END_STREAM, stream, &body)
}

// ---------------------------------------------------------------------------
// HPACK, by hand (RFC 7541): no Huffman coding on the way out.

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1 << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A raw (not Huffman-coded) string literal.
fn hpack_str(out: &mut Vec<u8>, bytes: &[u8]) {
    hpack_int(out, 0, 7, bytes.len());
    out.extend_from_slice(bytes);
}

/// A literal field that does not enter the dynamic table, its name the
/// static table's entry `name_index`.
fn literal_indexed_name(out: &mut Vec<u8>, name_index: usize, value: &[u8]) {
    hpack_int(out, 0x00, 4, name_index);
    hpack_str(out, value);
}

/// A literal field with a new name that does not enter the dynamic table.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A literal field with a new name that enters the dynamic table (as its
/// entry 62, the first after the static table's 61).
fn literal_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x40);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A field taken whole from the table: one byte for an entry below 127.
fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

/// The header block of a `SendSensorValues` call: the pseudo-headers,
/// content-type and te, all outside the dynamic table, so that the same
/// bytes open any number of streams.
fn call_headers() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    literal_indexed_name(
        &mut block,
        4,
        sink_proto::SEND_SENSOR_VALUES_PATH.as_bytes(),
    );
    literal_indexed_name(&mut block, 1, b"sink"); // :authority
    literal_indexed_name(&mut block, 31, b"application/grpc"); // content-type
    literal(&mut block, b"te", b"trailers");
    block
}

/// The `:status` of a response header block as h2 writes it: first, either
/// a static-table field (200, 204, 206, 304, 400, 404, 500) or a literal
/// named by the static `:status` (index 8) whose value is digits, raw or
/// Huffman-coded. `None` for anything else.
fn response_status(block: &[u8]) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f).checked_sub(8)?;
        return STATIC.get(index).copied();
    }
    let name_index = match first {
        0x40..=0x7f => first & 0x3f, // with incremental indexing
        0x00..=0x1f => first & 0x0f, // without indexing, or never indexed
        _ => return None,            // a table size update
    };
    if name_index != 8 {
        return None;
    }
    let (&length, rest) = block[1..].split_first()?;
    let value = rest.get(..usize::from(length & 0x7f))?;
    let digits = if length & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// A Huffman-coded string of digits (RFC 7541, appendix B: '0' to '2' are
/// the 5-bit codes 0 to 2, '3' to '9' the 6-bit codes 0x19 to 0x1f, and
/// the end is padded with fewer than 8 one bits). `None` for anything else.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |i| (byte >> i) & 1))
        .collect();
    let code = |at: usize, n: usize| bits[at..at + n].iter().fold(0u8, |c, b| c << 1 | b);
    let (mut at, mut digits) = (0, String::new());
    while bits.len() - at >= 5 {
        let five = code(at, 5);
        if five <= 2 {
            digits.push(char::from(b'0' + five));
            at += 5;
            continue;
        }
        let six = (bits.len() - at >= 6).then(|| code(at, 6));
        match six {
            Some(six @ 0x19..=0x1f) => {
                digits.push(char::from(b'3' + six - 0x19));
                at += 6;
            }
            _ => break,
        }
    }
    (bits.len() - at < 8 && bits[at..].iter().all(|&bit| bit == 1)).then_some(digits)
}

// ---------------------------------------------------------------------------
// Reading frames

/// A frame the server sent.
#[derive(Debug, Clone)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code and debug data.
    fn go_away(&self) -> Option<(u32, String)> {
        let code = u32::from_be_bytes(self.payload.get(4..8)?.try_into().ok()?);
        (self.kind == GOAWAY).then(|| {
            (
                code,
                String::from_utf8_lossy(&self.payload[8..]).into_owned(),
            )
        })
    }

    /// A GOAWAY's last stream identifier: the last stream the server may
    /// have processed.
    fn last_stream(&self) -> Option<u32> {
        let id = u32::from_be_bytes(self.payload.get(..4)?.try_into().ok()?);
        (self.kind == GOAWAY).then_some(id & 0x7fff_ffff)
    }

    /// A RST_STREAM's error code.
    fn reset(&self) -> Option<u32> {
        (self.kind == RST_STREAM && self.payload.len() == 4)
            .then(|| u32::from_be_bytes(self.payload[..4].try_into().expect("4 bytes")))
    }

    /// The `:status` of a HEADERS frame (h2 sends neither padding nor
    /// priority, so the payload is the header block).
    fn status(&self) -> Option<u16> {
        (self.kind == HEADERS)
            .then(|| response_status(&self.payload))
            .flatten()
    }

    fn describe(&self) -> String {
        let name = match self.kind {
            DATA => "DATA",
            HEADERS => "HEADERS",
            RST_STREAM => "RST_STREAM",
            SETTINGS => "SETTINGS",
            PING => "PING",
            GOAWAY => "GOAWAY",
            WINDOW_UPDATE => "WINDOW_UPDATE",
            CONTINUATION => "CONTINUATION",
            _ => "UNKNOWN",
        };
        let detail = if let Some((code, debug)) = self.go_away() {
            let last = self.last_stream().unwrap_or_default();
            format!("last={last} code={code:#x} {debug:?}")
        } else if let Some(code) = self.reset() {
            format!("code={code:#x}")
        } else if let Some(status) = self.status() {
            format!(":status {status}")
        } else {
            format!("flags={:#x} len={}", self.flags, self.payload.len())
        };
        format!("{name}[{}] {detail}", self.stream)
    }
}

/// The next frame from `read`; `None` at the end of the stream.
async fn read_frame(read: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
    let mut head = [0; 9];
    match read.read_exact(&mut head).await {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    read.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff,
        payload,
    }))
}

/// What the server sent on one connection so far, and how it ended.
#[derive(Debug, Default, Clone)]
struct Seen {
    frames: Vec<Frame>,
    /// `closed` at the end of the stream, or the error reading it.
    ended: Option<String>,
}

impl Seen {
    fn go_away(&self) -> Option<(u32, String)> {
        self.frames.iter().find_map(Frame::go_away)
    }

    /// The first GOAWAY's last stream identifier.
    fn go_away_last_stream(&self) -> Option<u32> {
        self.frames.iter().find_map(Frame::last_stream)
    }

    /// The server is done with the connection: a GOAWAY, or its end.
    fn cut_off(&self) -> bool {
        self.ended.is_some() || self.go_away().is_some()
    }

    fn on(&self, stream: u32) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(move |f| f.stream == stream)
    }

    fn status(&self, stream: u32) -> Option<u16> {
        self.on(stream).find_map(Frame::status)
    }

    fn reset(&self, stream: u32) -> Option<u32> {
        self.on(stream).find_map(Frame::reset)
    }

    fn has_data(&self, stream: u32) -> bool {
        self.on(stream).any(|f| f.kind == DATA)
    }

    /// The call on `stream` was answered OK: this server answers a call
    /// that succeeded with an empty message (5 zero bytes) before its
    /// trailers, and one that failed with headers alone.
    fn answered_ok(&self, stream: u32) -> bool {
        self.on(stream)
            .any(|f| f.kind == DATA && f.payload == [0; 5])
    }

    /// The request on `stream` was refused: a GOAWAY, a RST_STREAM, a
    /// status other than 200, or the connection's end, and no OK answer.
    fn refused(&self, stream: u32) -> bool {
        !self.answered_ok(stream)
            && (self.cut_off()
                || self.reset(stream).is_some()
                || self.status(stream).is_some_and(|s| s != 200))
    }

    /// PINGs the server sent (not its answers to ours).
    fn pings(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| f.kind == PING && f.flags & ACK == 0)
            .count()
    }

    /// Whether the server answered our PING of `payload`.
    fn pong(&self, payload: [u8; 8]) -> bool {
        self.frames
            .iter()
            .any(|f| f.kind == PING && f.flags & ACK != 0 && f.payload == payload)
    }

    /// The server's own SETTINGS (not its acknowledgement of ours).
    fn server_settings(&self) -> Vec<(u16, u32)> {
        self.frames
            .iter()
            .filter(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .flat_map(|f| f.payload.chunks_exact(6))
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect()
    }

    /// Every frame (the last 30 at most) and the end, for failure messages.
    fn describe(&self) -> String {
        let skip = self.frames.len().saturating_sub(30);
        let mut lines: Vec<String> = self.frames[skip..].iter().map(Frame::describe).collect();
        if skip > 0 {
            lines.insert(0, format!("({skip} earlier frames)"));
        }
        lines.push(format!("ended: {:?}", self.ended));
        lines.join("; ")
    }
}

// ---------------------------------------------------------------------------
// A raw client connection

/// Connects to `address` and opens HTTP/2 on it.
async fn handshake(address: SocketAddr, settings: &[(u16, u32)]) -> TcpStream {
    let tcp = TcpStream::connect(address).await.expect("connect");
    open(tcp, settings).await
}

/// Writes the client preface and a SETTINGS frame of `settings`.
async fn open(mut tcp: TcpStream, settings: &[(u16, u32)]) -> TcpStream {
    let _ = tcp.set_nodelay(true);
    let opening = [PREFACE, &settings_frame(settings)].concat();
    tcp.write_all(&opening).await.expect("preface");
    tcp
}

/// An HTTP/2 connection spoken in raw frames. A task reads every frame the
/// server sends into [`Seen`], acknowledges its SETTINGS and, if asked,
/// answers its PINGs.
struct Peer {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    seen: watch::Receiver<Seen>,
}

impl Peer {
    /// Connects, and returns once the server's SETTINGS are in (and
    /// acknowledged): no frame of ours can come between the frames of a
    /// header block from then on, but an answer to a PING.
    async fn connect(address: SocketAddr, settings: &[(u16, u32)], answer_pings: bool) -> Self {
        let peer = Self::start(handshake(address, settings).await, answer_pings);
        let seen = peer
            .wait(DEADLINE, |seen| {
                !seen.server_settings().is_empty() || seen.ended.is_some()
            })
            .await;
        assert!(
            !seen.server_settings().is_empty(),
            "no SETTINGS from the server: {}",
            seen.describe()
        );
        peer
    }

    fn start(tcp: TcpStream, answer_pings: bool) -> Self {
        let (read, write) = tcp.into_split();
        let writer = Arc::new(Mutex::new(write));
        let (seen, receiver) = watch::channel(Seen::default());
        let replies = Arc::clone(&writer);
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            let ended = loop {
                match read_frame(&mut read).await {
                    Ok(Some(frame)) => {
                        let reply = match (frame.kind, frame.flags & ACK) {
                            (SETTINGS, 0) => Some(frame_ack(SETTINGS, &[])),
                            (PING, 0) if answer_pings => Some(frame_ack(PING, &frame.payload)),
                            _ => None,
                        };
                        if let Some(reply) = reply {
                            let _ = replies.lock().await.write_all(&reply).await;
                        }
                        seen.send_modify(|seen| seen.frames.push(frame));
                    }
                    Ok(None) => break "closed".to_owned(),
                    Err(err) => break err.to_string(),
                }
            };
            seen.send_modify(|seen| seen.ended = Some(ended));
        });
        Self {
            writer,
            seen: receiver,
        }
    }

    async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    /// What the server sent so far.
    fn seen(&self) -> Seen {
        self.seen.borrow().clone()
    }

    /// Waits at most `within` until `condition` holds of what the server
    /// sent; returns what it sent by then.
    async fn wait(&self, within: Duration, condition: impl FnMut(&Seen) -> bool) -> Seen {
        let mut seen = self.seen.clone();
        let _ = tokio::time::timeout(within, seen.wait_for(condition)).await;
        self.seen()
    }

    /// Writes what `next` makes, again and again, until the server is done
    /// with the connection (GOAWAY, its end, a failed write, or a write
    /// stalled for 2 s) or `max_chunks` are written. Returns the chunks and
    /// bytes written.
    async fn flood(&self, max_chunks: usize, mut next: impl FnMut() -> Vec<u8>) -> (usize, usize) {
        let (mut chunks, mut bytes) = (0, 0);
        while chunks < max_chunks && !self.seen.borrow().cut_off() {
            let chunk = next();
            match tokio::time::timeout(Duration::from_secs(2), self.send(&chunk)).await {
                Ok(Ok(())) => {
                    chunks += 1;
                    bytes += chunk.len();
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (chunks, bytes)
    }
}

// ---------------------------------------------------------------------------
// The sink

/// grpc (with `source` keys) -> buffered(max_events = 1) -> out.json.
fn pipeline_with_source(source: &str) -> String {
    [
        grpc("sensors", source),
        buffered("batch", &["sensors"], "max_events = 1"),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

/// Asserts the sink's peak resident memory grew by less than
/// [`MAX_GROWTH_MIB`] since `before` (kB).
#[track_caller]
fn assert_memory_bounded(sink: &SinkProcess, before: u64, attack: &str) {
    let grown_mib = peak_rss_kb(sink.pid()).saturating_sub(before) / 1024;
    assert!(
        grown_mib < MAX_GROWTH_MIB,
        "{attack}: the sink's peak resident memory grew by {grown_mib} MiB"
    );
}

/// An honest client on a fresh connection is served at once: two calls of
/// three readings `<prefix><i>`, answered within 5 s. Returns the names.
async fn served(sink: &SinkProcess, prefix: &str) -> Vec<String> {
    let mut client = tokio::time::timeout(DEADLINE, sink.client("sensors"))
        .await
        .expect("an honest client connects");
    tokio::time::timeout(Duration::from_secs(5), send_all(&mut client, prefix, 2, 3))
        .await
        .unwrap_or_else(|_| panic!("{prefix}: an honest client not served within 5 s"))
}

/// An honest client is still served after the attack, and the sink, once
/// stopped, has written each honest reading (`names` and these) once.
async fn served_to_the_end(mut sink: SinkProcess, mut names: Vec<String>, prefix: &str) {
    names.extend(served(&sink, prefix).await);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

// ---------------------------------------------------------------------------
// The attacks

/// A GOAWAY, if the server sent one, says ENHANCE_YOUR_CALM: the connection
/// was closed for abuse, not for an error of the server's.
fn assert_calm(seen: &Seen) {
    if let Some((code, debug)) = seen.go_away() {
        assert_eq!(
            code,
            ENHANCE_YOUR_CALM,
            "GOAWAY {debug:?}: {}",
            seen.describe()
        );
    }
}

/// Streams an attack opens at most, 100 per write.
const ATTACK_STREAMS: u32 = 10_000;

/// Opens up to [`ATTACK_STREAMS`] calls on `attacker`, each followed at once
/// by the frames `then` gives for its stream, until the server cuts the
/// connection off, which it must; any GOAWAY must say ENHANCE_YOUR_CALM.
async fn open_streams_until_cut_off(attacker: &Peer, then: impl Fn(u32) -> Vec<u8>) -> Seen {
    let block = call_headers();
    let mut next = 1;
    let (chunks, _) = attacker
        .flood((ATTACK_STREAMS / 100) as usize, || {
            let mut chunk = Vec::new();
            for _ in 0..100 {
                chunk.extend(headers_frame(next, &block, false));
                chunk.extend(then(next));
                next += 2;
            }
            chunk
        })
        .await;
    let seen = attacker.wait(DEADLINE, Seen::cut_off).await;
    assert!(
        seen.cut_off(),
        "{} streams opened, and the connection is still open: {}",
        chunks * 100,
        seen.describe()
    );
    assert_calm(&seen);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_enhance_your_calm_and_honest_clients_are_served() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let attacker = Peer::connect(address, &[], true).await;
    // CVE-2023-44487: streams opened and cancelled at once.
    let seen = open_streams_until_cut_off(&attacker, |stream| rst_stream(stream, CANCEL)).await;
    if seen.go_away().is_some() {
        // It gave up long before the attack's end (stream 2 * ATTACK_STREAMS - 1).
        let last = seen.go_away_last_stream().unwrap_or_default();
        assert!(last < ATTACK_STREAMS, "processed up to stream {last}");
    }
    // No stream was answered as a call.
    assert!(
        !seen
            .frames
            .iter()
            .any(|f| f.kind == HEADERS || f.kind == DATA),
        "{}",
        seen.describe()
    );
    served_to_the_end(sink, Vec::new(), "after-reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_must_reset_get_enhance_your_calm() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let attacker = Peer::connect(address, &[], true).await;
    // MadeYouReset (CVE-2025-8671): each stream opened and then sent a
    // WINDOW_UPDATE that overflows its window, a stream error the server
    // must answer with RST_STREAM; the client never resets a stream itself,
    // so only the server's own bound on the streams it resets for errors
    // (1024) stops it.
    let seen = open_streams_until_cut_off(&attacker, |stream| {
        frame(WINDOW_UPDATE, 0, stream, &0x7fff_ffffu32.to_be_bytes())
    })
    .await;
    let (code, _) = seen.go_away().expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM, "{}", seen.describe());
    let last = seen.go_away_last_stream().unwrap_or_default();
    assert!(last < 2 * ATTACK_STREAMS, "processed up to stream {last}");
    served_to_the_end(sink, Vec::new(), "after-made-you-reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_within_a_few_frames() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    let before = peak_rss_kb(sink.pid());
    let attacker = Peer::connect(address, &[], false).await;
    // A header whose value is announced 64 MiB long (HPACK integers stop
    // near 2^28): HEADERS without END_HEADERS, then full CONTINUATION
    // frames of it, without end.
    let mut block = call_headers();
    block.push(0x00);
    hpack_str(&mut block, b"x-endless");
    hpack_int(&mut block, 0, 7, 1 << 26);
    block.resize(MAX_FRAME, b'a');
    let mut first = Some(frame(HEADERS, 0, 1, &block));
    let continuation = frame(CONTINUATION, 0, 1, &[b'a'; MAX_FRAME]);
    // At most 256 MiB.
    let (frames, bytes) = attacker
        .flood(16_384, || {
            first.take().unwrap_or_else(|| continuation.clone())
        })
        .await;
    let seen = attacker.wait(DEADLINE, Seen::cut_off).await;
    assert!(
        seen.cut_off(),
        "{frames} frames ({} MiB) of one header block, and the connection is still open: {}",
        bytes >> 20,
        seen.describe()
    );
    assert_calm(&seen);
    // Cut off within what the socket buffers hold, not after the budget.
    assert!(
        bytes < 16 << 20,
        "{frames} frames ({} MiB) written before the connection was cut off",
        bytes >> 20
    );
    assert_memory_bounded(&sink, before, "CONTINUATION flood");
    served_to_the_end(sink, names, "after-continuation").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_is_refused_without_being_expanded() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    let before = peak_rss_kb(sink.pid());
    let attacker = Peer::connect(address, &[], true).await;
    // One 4000-byte value into the dynamic table (entry 62), then
    // referenced, one byte each, until the frame is full: 16 KiB on the
    // wire that decode to about 48 MB of header list, 3000 times the
    // 16 KiB the server grants.
    let mut block = call_headers();
    literal_indexed(&mut block, b"x-bomb", &[b'b'; 4000]);
    let references = MAX_FRAME - block.len();
    for _ in 0..references {
        indexed(&mut block, 62);
    }
    assert_eq!(block.len(), MAX_FRAME);
    attacker
        .send(&headers_frame(1, &block, true))
        .await
        .expect("send the bomb");
    let seen = attacker.wait(DEADLINE, |seen| seen.refused(1)).await;
    assert!(
        seen.refused(1),
        "{references} references to a 4000-byte entry not refused: {}",
        seen.describe()
    );
    assert_calm(&seen);
    assert_memory_bounded(&sink, before, "HPACK bomb");
    served_to_the_end(sink, names, "after-bomb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_16_kib_are_refused_and_the_connection_serves_on() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let client = Peer::connect(address, &[], true).await;
    let seen = client.seen();
    assert!(
        seen.server_settings()
            .contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)),
        "the server's SETTINGS do not announce a 16 KiB header list: {:?}",
        seen.server_settings()
    );
    // One literal header of 20 KiB: HEADERS, then a CONTINUATION of the rest.
    let mut block = call_headers();
    literal(&mut block, b"x-big", &vec![b'v'; 20 * 1024]);
    let (head, rest) = block.split_at(MAX_FRAME);
    let request = [
        frame(HEADERS, END_STREAM, 1, head),
        frame(CONTINUATION, END_HEADERS, 1, rest),
    ]
    .concat();
    client.send(&request).await.expect("send the headers");
    let seen = client.wait(DEADLINE, |seen| seen.refused(1)).await;
    assert!(
        seen.refused(1),
        "20 KiB of headers not refused: {}",
        seen.describe()
    );
    if let Some(status) = seen.status(1) {
        assert_eq!(status, 431, "{}", seen.describe());
    }
    // Refused as a stream, the connection serves the next call.
    if seen.go_away().is_none() {
        let call = [
            headers_frame(3, &call_headers(), false),
            message_frame(3, &request_range("same-connection", 0..1)),
        ]
        .concat();
        client.send(&call).await.expect("send a call");
        let seen = client
            .wait(DEADLINE, |seen| seen.answered_ok(3) || seen.cut_off())
            .await;
        assert!(
            seen.answered_ok(3),
            "the next call on the connection was not answered OK: {}",
            seen.describe()
        );
    }
    let mut names = served(&sink, "after-big-headers").await;
    sink.stop();
    if seen.go_away().is_none() {
        names.push("same-connection0".to_owned());
    }
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_never_reads_is_held_back() {
    let payload = *b"flooding";
    flood_without_reading("PING", &ping(0, payload), |frame| {
        frame.kind == PING && frame.flags & ACK != 0 && frame.payload == payload
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_flood_from_a_client_that_never_reads_is_held_back() {
    // Each SETTINGS must be acknowledged: the same flood, in other frames.
    flood_without_reading("SETTINGS", &settings_frame(&[(0x3, 100)]), |frame| {
        frame.kind == SETTINGS && frame.flags & ACK != 0
    })
    .await;
}

/// Writes `frame` up to 2 million times (tens of MB) on a connection whose
/// client never reads: the server must stop reading it (the write stalls)
/// or close it, its memory must stay bounded, others must be served, and
/// the answers it did write (`is_answer`) wait on the socket.
async fn flood_without_reading(what: &str, frame: &[u8], is_answer: impl Fn(&Frame) -> bool) {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let mut names = served(&sink, "before").await;
    let before = peak_rss_kb(sink.pid());
    // Small buffers on the client's side, so that the answers the server
    // cannot deliver back up soon.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_send_buffer_size(4096).expect("SO_SNDBUF");
    let tcp = socket.connect(address).await.expect("connect");
    let mut tcp = open(tcp, &[]).await;
    let chunk: Vec<u8> = (0..1000).flat_map(|_| frame.to_vec()).collect();
    const MAX_FRAMES: usize = 2_000_000;
    let started = Instant::now();
    let (mut sent, mut outcome) = (0, None);
    while sent < MAX_FRAMES {
        match tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&chunk)).await {
            Ok(Ok(())) => sent += 1000,
            Ok(Err(err)) => {
                outcome = Some(format!("closed: {err}"));
                break;
            }
            Err(_) => {
                outcome = Some("stalled".to_owned());
                break;
            }
        }
    }
    let outcome = outcome.unwrap_or_else(|| {
        panic!(
            "{sent} {what} frames written in {:?} and the server read them all",
            started.elapsed()
        )
    });
    assert_memory_bounded(&sink, before, what);
    // While the flooding connection stays open (and stalled), others are served.
    names.extend(served(&sink, &format!("during-{what}-flood")).await);
    // The server answered: the first answers wait on the socket.
    let mut read = BufReader::new(tcp);
    let mut first = Vec::new();
    let answered = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(frame)) = read_frame(&mut read).await {
            let done = frame.go_away().is_some() || is_answer(&frame);
            first.push(frame.describe());
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(answered, Ok(true)),
        "after {sent} {what} frames ({outcome}), no answer among {first:?}"
    );
    drop(read);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &names);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_grants_no_window_cannot_hold_up_shutdown() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    // It answers PINGs (it looks alive) but its streams get no window.
    let client = Peer::connect(address, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)], true).await;
    let call = [
        headers_frame(1, &call_headers(), false),
        message_frame(1, &request("zero-window", 1)),
    ]
    .concat();
    client.send(&call).await.expect("send a call");
    // The call is taken and answered: its headers go out (they are not
    // flow-controlled), its message waits for a window that never opens.
    let seen = client.wait(DEADLINE, |seen| seen.status(1).is_some()).await;
    assert_eq!(seen.status(1), Some(200), "{}", seen.describe());

    let signalled = Instant::now();
    sink.signal(libc::SIGTERM);
    let status = sink.wait_exit();
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the sink took {took:?} to exit; log:\n{}",
        sink.log_text()
    );
    assert!(status.success(), "exit {status}; log:\n{}", sink.log_text());
    let seen = client.wait(DEADLINE, |seen| seen.ended.is_some()).await;
    assert_eq!(
        seen.go_away().map(|(code, _)| code),
        Some(NO_ERROR),
        "{}",
        seen.describe()
    );
    assert!(
        !seen.has_data(1),
        "data past a zero window: {}",
        seen.describe()
    );
    assert!(seen.ended.is_some(), "{}", seen.describe());
    // What was acknowledged (to the sink's knowledge) was written.
    assert_eq!(sensor_names(&sink.path("out.json")), ["zero-window0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_a_client_that_never_answers_and_keeps_one_that_does() {
    let interval = Duration::from_millis(300);
    let timeout = Duration::from_millis(700);
    let mut sink = SinkProcess::start(&pipeline_with_source(
        "keepalive_interval = \"300ms\"\nkeepalive_timeout = \"700ms\"",
    ));
    let address = sink.address("sensors");
    let opened = Instant::now();
    let silent = Peer::connect(address, &[], false).await;
    let answering = Peer::connect(address, &[], true).await;

    let seen = silent.wait(DEADLINE, |seen| seen.ended.is_some()).await;
    let closed_after = opened.elapsed();
    assert!(seen.ended.is_some(), "never dropped: {}", seen.describe());
    assert!(seen.pings() >= 1, "dropped unpinged: {}", seen.describe());
    assert!(
        closed_after >= interval + timeout && closed_after < Duration::from_secs(5),
        "the silent client was dropped after {closed_after:?}"
    );

    // The answering client stays through five rounds (1.5 s and more),
    // well past the silent one's end.
    let seen = answering
        .wait(DEADLINE, |seen| seen.pings() >= 5 || seen.ended.is_some())
        .await;
    assert!(seen.ended.is_none(), "dropped: {}", seen.describe());
    assert!(seen.pings() >= 5, "{}", seen.describe());
    assert!(opened.elapsed() > interval + timeout + interval);
    // And it is served: its own PING is answered.
    let payload = *b"alive?!!";
    answering.send(&ping(0, payload)).await.expect("ping");
    let seen = answering
        .wait(DEADLINE, |seen| seen.pong(payload) || seen.ended.is_some())
        .await;
    assert!(seen.pong(payload), "{}", seen.describe());
    sink.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_idle_connections_a_goaway_and_the_sink_exits() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let idle = Peer::connect(address, &[], true).await;
    // Another one that does not answer the PING that follows the GOAWAY.
    let mute = Peer::connect(address, &[], false).await;

    let signalled = Instant::now();
    sink.signal(libc::SIGTERM);
    for peer in [&idle, &mute] {
        let seen = peer.wait(DEADLINE, |seen| seen.go_away().is_some()).await;
        assert_eq!(
            seen.go_away().map(|(code, _)| code),
            Some(NO_ERROR),
            "{}",
            seen.describe()
        );
    }
    // The one that answered is closed by the server once it has.
    let seen = idle.wait(DEADLINE, |seen| seen.ended.is_some()).await;
    assert_eq!(seen.ended.as_deref(), Some("closed"), "{}", seen.describe());
    let status = sink.wait_exit();
    let took = signalled.elapsed();
    assert!(status.success(), "exit {status}; log:\n{}", sink.log_text());
    assert!(
        took < Duration::from_secs(5),
        "the sink took {took:?} to exit"
    );
    let seen = mute.wait(DEADLINE, |seen| seen.ended.is_some()).await;
    assert!(seen.ended.is_some(), "{}", seen.describe());
}

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;
const PADDED: u8 = 0x8;
const PUSH_PROMISE: u8 = 0x5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_protocol_close_the_connection_with_their_code() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    let open_stream = headers_frame(1, &call_headers(), false);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "a frame past SETTINGS_MAX_FRAME_SIZE",
            frame(PING, 0, 0, &[0; MAX_FRAME + 1]),
            FRAME_SIZE_ERROR,
        ),
        ("DATA on stream 0", frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
        (
            "DATA on a stream never opened",
            frame(DATA, 0, 7, b"x"),
            PROTOCOL_ERROR,
        ),
        (
            "a stream a client may not open (even)",
            headers_frame(2, &call_headers(), true),
            PROTOCOL_ERROR,
        ),
        (
            "a connection window past 2^31-1",
            frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
            FLOW_CONTROL_ERROR,
        ),
        (
            "a WINDOW_UPDATE of 0 on the connection",
            frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()),
            PROTOCOL_ERROR,
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE past 2^31-1",
            settings_frame(&[(SETTINGS_INITIAL_WINDOW_SIZE, 0x8000_0000)]),
            FLOW_CONTROL_ERROR,
        ),
        (
            "PUSH_PROMISE from a client",
            frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            PROTOCOL_ERROR,
        ),
        (
            "CONTINUATION outside a header block",
            frame(CONTINUATION, END_HEADERS, 1, &[]),
            PROTOCOL_ERROR,
        ),
        (
            "a frame inside a header block",
            [frame(HEADERS, 0, 1, &call_headers()), ping(0, *b"between!")].concat(),
            PROTOCOL_ERROR,
        ),
        (
            "padding past the frame",
            [open_stream.clone(), frame(DATA, PADDED, 1, &[10, 1, 2])].concat(),
            PROTOCOL_ERROR,
        ),
        (
            "a header block HPACK cannot decode (index 0)",
            headers_frame(1, &[0x80], true),
            COMPRESSION_ERROR,
        ),
        (
            "a PING not 8 bytes long",
            frame(PING, 0, 0, &[1, 2, 3]),
            FRAME_SIZE_ERROR,
        ),
    ];
    for (what, bytes, code) in cases {
        let peer = Peer::connect(address, &[], true).await;
        peer.send(&bytes).await.expect("send");
        let seen = peer.wait(DEADLINE, |seen| seen.ended.is_some()).await;
        assert_eq!(
            seen.go_away().map(|(code, _)| code),
            Some(code),
            "{what}: {}",
            seen.describe()
        );
        assert!(
            seen.ended.is_some(),
            "{what}: not closed: {}",
            seen.describe()
        );
    }
    // Not HTTP/2 at all: closed without a call.
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: sink\r\n\r\n")
        .await
        .expect("send");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an HTTP/1.1 request left the connection open"
    );
    served_to_the_end(sink, names, "after-protocol-errors").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_continuation_frames_is_cut_off() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    let attacker = Peer::connect(address, &[], true).await;
    // Empty CONTINUATIONs never grow the block: only a bound on their
    // number stops them.
    let mut first = Some(frame(HEADERS, 0, 1, &call_headers()));
    let empty = frame(CONTINUATION, 0, 1, &[]);
    let (chunks, _) = attacker
        .flood(1000, || {
            let mut chunk = first.take().unwrap_or_default();
            for _ in 0..1000 {
                chunk.extend_from_slice(&empty);
            }
            chunk
        })
        .await;
    let seen = attacker.wait(DEADLINE, Seen::cut_off).await;
    assert!(
        seen.cut_off(),
        "{} empty CONTINUATION frames, and the connection is still open: {}",
        chunks * 1000,
        seen.describe()
    );
    assert_eq!(
        seen.go_away().map(|(code, _)| code),
        Some(ENHANCE_YOUR_CALM),
        "{}",
        seen.describe()
    );
    served_to_the_end(sink, names, "after-empty-continuations").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused_and_the_connection_serves_on() {
    let mut sink = SinkProcess::start(&pipeline_with_source("max_concurrent_calls = 2"));
    let address = sink.address("sensors");
    let client = Peer::connect(address, &[], true).await;
    assert!(
        client
            .seen()
            .server_settings()
            .contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 2)),
        "{}",
        client.seen().describe()
    );
    // Two calls open, waiting for their messages; a third is one too many.
    let opening = [
        headers_frame(1, &call_headers(), false),
        headers_frame(3, &call_headers(), false),
        headers_frame(5, &call_headers(), false),
    ]
    .concat();
    client.send(&opening).await.expect("send");
    let seen = client.wait(DEADLINE, |seen| seen.reset(5).is_some()).await;
    assert_eq!(seen.reset(5), Some(REFUSED_STREAM), "{}", seen.describe());
    let messages = [
        message_frame(1, &request("first", 1)),
        message_frame(3, &request("second", 1)),
    ]
    .concat();
    client.send(&messages).await.expect("send");
    let seen = client
        .wait(DEADLINE, |seen| seen.answered_ok(1) && seen.answered_ok(3))
        .await;
    assert!(
        seen.answered_ok(1) && seen.answered_ok(3),
        "{}",
        seen.describe()
    );
    sink.stop();
    assert_each_once(
        &sensor_names(&sink.path("out.json")),
        &["first0".to_owned(), "second0".to_owned()],
    );
}

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The stream window the server grants (`STREAM_WINDOW`).
const STREAM_WINDOW: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sent_past_its_window_is_reset_and_the_connection_serves_on() {
    let sink = SinkProcess::start(&pipeline_with_source(
        "max_concurrent_calls = 1\nmax_message_bytes = 1048576\nbody_timeout = \"30s\"",
    ));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    // One call holds the only permit: its message is announced 100 bytes
    // long and 10 come.
    let holder = Peer::connect(address, &[], true).await;
    let mut slow = vec![0, 0, 0, 0, 100];
    slow.extend_from_slice(&[0; 10]);
    holder
        .send(
            &[
                headers_frame(1, &call_headers(), false),
                frame(DATA, 0, 1, &slow),
            ]
            .concat(),
        )
        .await
        .expect("send");
    // Another call waits for that permit, its body unread, and its client
    // sends 400 KiB on a stream granted 256 KiB.
    let attacker = Peer::connect(address, &[], true).await;
    let mut message = vec![0];
    message.extend_from_slice(&(400u32 * 1024).to_be_bytes());
    message.resize(5 + 400 * 1024, 0);
    let mut bytes = headers_frame(1, &call_headers(), false);
    for chunk in message.chunks(MAX_FRAME) {
        bytes.extend(frame(DATA, 0, 1, chunk));
    }
    attacker.send(&bytes).await.expect("send");
    let seen = attacker
        .wait(DEADLINE, |seen| seen.reset(1).is_some() || seen.cut_off())
        .await;
    assert_eq!(
        seen.reset(1),
        Some(FLOW_CONTROL_ERROR),
        "{}",
        seen.describe()
    );
    assert!(seen.go_away().is_none(), "{}", seen.describe());
    assert!(message.len() > STREAM_WINDOW + MAX_FRAME);
    // The connection serves on once the permit is free: the holder cancels.
    holder.send(&rst_stream(1, CANCEL)).await.expect("send");
    let call = [
        headers_frame(3, &call_headers(), false),
        message_frame(3, &request("after-overrun", 1)),
    ]
    .concat();
    attacker.send(&call).await.expect("send");
    let seen = attacker
        .wait(DEADLINE, |seen| seen.answered_ok(3) || seen.cut_off())
        .await;
    assert!(seen.answered_ok(3), "{}", seen.describe());
    let mut names = names;
    names.push("after-overrun0".to_owned());
    served_to_the_end(sink, names, "after-window-overrun").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_larger_than_both_windows_arrive_whole_side_by_side() {
    let mut sink = SinkProcess::start(&pipeline_with_source("max_message_bytes = 2097152"));
    let client = sink.client("sensors").await;
    // Four calls of about 900 KiB at once on one connection: each past its
    // stream's window, together past the connection's, so every byte
    // arrives only as the windows are given back.
    let mut calls = tokio::task::JoinSet::new();
    for call in 0..4 {
        let mut client = client.clone();
        calls.spawn(async move {
            let mut request = request_range(&format!("big{call}-"), 0..1000);
            for item in &mut request.items {
                item.sensor_name = format!("{}-{}", item.sensor_name, "n".repeat(900));
            }
            client.send_sensor_values(request).await
        });
    }
    let answers = tokio::time::timeout(DEADLINE, calls.join_all())
        .await
        .expect("four large calls answered");
    for answer in answers {
        answer.expect("a large call accepted");
    }
    sink.stop();
    let written = sensor_names(&sink.path("out.json"));
    let expected: Vec<String> = (0..4)
        .flat_map(|call| (0..1000).map(move |i| format!("big{call}-{i}-{}", "n".repeat(900))))
        .collect();
    assert_each_once(&written, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_never_bring_the_server_down() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let names = served(&sink, "before").await;
    // A fixed seed: the same frames on every run (xorshift64*).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: u64| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    };
    let valid = call_headers();
    let message = message_frame(1, &request("random", 1))[9..].to_vec();
    for connection in 0..200 {
        let peer = Peer::connect(address, &[], true).await;
        let mut bytes = Vec::new();
        for _ in 0..(1 + next(12)) {
            let kind = next(11) as u8;
            let flags = [
                0,
                END_STREAM,
                END_HEADERS,
                END_STREAM | END_HEADERS,
                PADDED,
                0x20,
                0xff,
            ][next(7) as usize];
            let stream = next(8) as u32;
            let mut payload = match next(4) {
                0 => valid.clone(),
                1 => message.clone(),
                _ => (0..next(40)).map(|_| next(256) as u8).collect(),
            };
            // Some valid payloads, a byte changed.
            if !payload.is_empty() && next(2) == 0 {
                let at = next(payload.len() as u64) as usize;
                payload[at] = next(256) as u8;
            }
            bytes.extend(frame(kind, flags, stream, &payload));
        }
        if peer.send(&bytes).await.is_err() {
            continue;
        }
        // Then a PING of our own: answered, or the connection closed; never
        // a server that stopped listening.
        let payload = (connection as u64).to_be_bytes();
        let _ = peer.send(&ping(0, payload)).await;
        let seen = peer
            .wait(DEADLINE, |seen| seen.pong(payload) || seen.ended.is_some())
            .await;
        assert!(
            seen.pong(payload) || seen.ended.is_some(),
            "connection {connection}: neither answered nor closed: {}",
            seen.describe()
        );
    }
    assert!(!sink.log_text().contains("panicked"), "{}", sink.log_text());
    served_to_the_end(sink, names, "after-random-frames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_shrinks_its_hpack_table_is_told_in_the_next_answer() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    // SETTINGS_HEADER_TABLE_SIZE 0: a strict decoder (nghttp2's) then
    // expects a dynamic table size update at the start of the next block.
    let client = Peer::connect(address, &[(0x1, 0)], true).await;
    let call = [
        headers_frame(1, &call_headers(), false),
        message_frame(1, &request("small-table", 1)),
    ]
    .concat();
    client.send(&call).await.expect("send a call");
    let seen = client.wait(DEADLINE, |seen| seen.answered_ok(1)).await;
    assert!(seen.answered_ok(1), "{}", seen.describe());
    let head = seen
        .on(1)
        .find(|frame| frame.kind == HEADERS)
        .expect("the answer's headers");
    assert_eq!(head.payload.first(), Some(&0x20), "{}", seen.describe());
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")), ["small-table0"]);
}
