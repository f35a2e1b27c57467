//! HPACK (RFC 7541): the decoder of request header blocks and the encoder of the few response
//! fields this server sends.
//!
//! The decoder hands every field to a callback as borrowed slices, so that decoding costs no
//! allocation per field: only entries the peer inserts into the dynamic table are copied, once.
//! The encoder never indexes anything in the peer's table, which keeps its output independent of
//! connection state and so precomputable.

use std::collections::VecDeque;

use super::huffman;

/// Why a header block could not be decoded: the connection must end with COMPRESSION_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HPACK: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// What RFC 7541 §4.1 adds to an entry's name and value lengths for its bookkeeping overhead
/// (and RFC 7540 §6.5.2 likewise to each field of a header list).
const ENTRY_OVERHEAD: usize = 32;

/// Integers are capped near 2^28 (at most four continuation bytes): nothing legitimate is that
/// large, and the cap keeps a hostile varint from overflowing anything.
const MAX_CONTINUATION_SHIFT: u32 = 21;

/// RFC 7541 Appendix A; index `i` is HPACK index `i + 1`.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The static index of `:status: 200`, and of the `:status` name for every other code.
const STATUS_INDEX: usize = 8;

/// One dynamic table entry: name and value share one allocation, so an insertion costs one
/// allocation and a lookup one pointer.
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn new(name: &[u8], value: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        Self {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        }
    }

    fn field(&self) -> (&[u8], &[u8]) {
        self.bytes.split_at(self.name_len)
    }

    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The dynamic table (RFC 7541 §2.3.2, §4): newest entry at the front, so that HPACK index
/// 62 + i is `entries[i]`, and eviction pops from the back.
struct DynamicTable {
    entries: VecDeque<Entry>,
    /// Sum of the entries' sizes, as §4.1 counts them.
    size: usize,
    /// The current maximum size, as last set by the peer's size update (§4.2).
    capacity: usize,
}

impl DynamicTable {
    fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            capacity,
        }
    }

    /// The field at an HPACK index (static or dynamic).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError("index 0")),
            1..=61 => Ok(STATIC_TABLE[index - 1]),
            _ => self
                .entries
                .get(index - 62)
                .map(Entry::field)
                .ok_or(DecodeError("index out of range")),
        }
    }

    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_to(capacity);
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some(oldest) = self.entries.pop_back() else {
                break;
            };
            self.size -= oldest.size();
        }
    }

    /// Adds an entry that fits (§4.4): older entries make room for it.
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        debug_assert!(size <= self.capacity);
        self.evict_to(self.capacity - size);
        self.size += size;
        self.entries.push_front(entry);
    }

    /// What adding an entry larger than the table does (§4.4): it empties the table and is
    /// not added.
    fn clear(&mut self) {
        self.entries.clear();
        self.size = 0;
    }
}

/// Reading position in a header block.
struct Cursor<'a> {
    block: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self, truncated: &'static str) -> Result<u8, DecodeError> {
        let byte = *self.block.get(self.pos).ok_or(DecodeError(truncated))?;
        self.pos += 1;
        Ok(byte)
    }

    /// An integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1), starting at the current byte.
    fn integer(&mut self, prefix_bits: u32) -> Result<usize, DecodeError> {
        let max_prefix = (1usize << prefix_bits) - 1;
        let mut value = usize::from(self.byte("truncated integer")?) & max_prefix;
        if value < max_prefix {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            if shift > MAX_CONTINUATION_SHIFT {
                return Err(DecodeError("integer overflow"));
            }
            let byte = self.byte("truncated integer")?;
            value += usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A string literal (RFC 7541 §5.2), as where its bytes end up: in the block when sent as
    /// they are, appended to `scratch` when Huffman-coded.
    fn string(&mut self, scratch: &mut Vec<u8>) -> Result<Span, DecodeError> {
        let huffman_coded = self.block.get(self.pos).is_some_and(|b| b & 0x80 != 0);
        let len = self.integer(7)?;
        let start = self.pos;
        if len > self.block.len() - start {
            return Err(DecodeError("string length beyond the block"));
        }
        self.pos += len;
        let raw = &self.block[start..self.pos];
        if huffman_coded {
            let from = scratch.len();
            huffman::decode(raw, scratch).map_err(DecodeError)?;
            Ok(Span::Scratch(from, scratch.len()))
        } else {
            Ok(Span::Block(start, self.pos))
        }
    }
}

/// Where a decoded string lives, kept as offsets until the scratch buffer stops growing.
#[derive(Clone, Copy)]
enum Span {
    Block(usize, usize),
    Scratch(usize, usize),
}

impl Span {
    fn resolve<'a>(self, block: &'a [u8], scratch: &'a [u8]) -> &'a [u8] {
        match self {
            Self::Block(start, end) => &block[start..end],
            Self::Scratch(start, end) => &scratch[start..end],
        }
    }
}

/// The HPACK decoder of one HTTP/2 connection (the state of its dynamic table).
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE we announced: no size update may exceed it.
    max_table_size: usize,
    /// Huffman-decoded names and values of the current field; kept to reuse its capacity.
    scratch: Vec<u8>,
}

impl Decoder {
    /// `max_table_size`: the SETTINGS_HEADER_TABLE_SIZE this side announced (we announce the default, 4096).
    pub fn new(max_table_size: usize) -> Self {
        Self {
            table: DynamicTable::new(max_table_size),
            max_table_size,
            scratch: Vec::new(),
        }
    }

    /// Decodes one complete header block (the concatenated HEADERS+CONTINUATION payloads),
    /// calling `field(name, value)` for every field in order, with borrowed bytes (from the block,
    /// from the dynamic/static table, or from a scratch buffer the decoder reuses for Huffman-decoded strings).
    /// Nothing is allocated per field except what the dynamic table keeps (inserted entries) and
    /// the scratch buffer growing (reused across calls).
    /// Returns the header list size as RFC 7540 6.5.2 counts it: the sum over fields of name.len() + value.len() + 32.
    /// The caller decides what to do with an oversized list; the decoder always decodes the whole block so the
    /// dynamic table stays in step (an "HPACK bomb" of many 1-byte references to a large entry must cost only
    /// the iteration, never materialise values: the callback just gets the borrowed slice).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<usize, DecodeError> {
        let mut cursor = Cursor { block, pos: 0 };
        let mut list_size = 0usize;
        // Size updates are only allowed before the first field (RFC 7541 §4.2).
        let mut at_start = true;
        while let Some(&first) = block.get(cursor.pos) {
            let (name_index_bits, indexing) = match first {
                // Indexed field (§6.1).
                0x80..=0xff => {
                    let (name, value) = self.table.get(cursor.integer(7)?)?;
                    field(name, value);
                    list_size = list_size.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
                    at_start = false;
                    continue;
                }
                // Literal with incremental indexing (§6.2.1).
                0x40..=0x7f => (6, true),
                // Dynamic table size update (§6.3).
                0x20..=0x3f => {
                    if !at_start {
                        return Err(DecodeError("table size update after a field"));
                    }
                    let size = cursor.integer(5)?;
                    if size > self.max_table_size {
                        return Err(DecodeError("table size update above the maximum"));
                    }
                    self.table.set_capacity(size);
                    continue;
                }
                // Literal without indexing (§6.2.2, 0000) or never indexed (§6.2.3, 0001): the
                // difference only matters to intermediaries re-encoding the field.
                0x00..=0x1f => (4, false),
            };
            at_start = false;

            self.scratch.clear();
            let name_index = cursor.integer(name_index_bits)?;
            let literal_name = if name_index == 0 {
                Some(cursor.string(&mut self.scratch)?)
            } else {
                // Validated now, looked up again below once the scratch buffer is settled.
                self.table.get(name_index)?;
                None
            };
            let value = cursor.string(&mut self.scratch)?;

            let name = match literal_name {
                Some(span) => span.resolve(block, &self.scratch),
                None => self.table.get(name_index)?.0,
            };
            let value = value.resolve(block, &self.scratch);
            let size = name.len() + value.len() + ENTRY_OVERHEAD;
            // Copied before the table changes: the name may be an entry the insertion evicts.
            let entry = (indexing && size <= self.table.capacity).then(|| Entry::new(name, value));
            field(name, value);
            list_size = list_size.saturating_add(size);
            if indexing {
                match entry {
                    Some(entry) => self.table.insert(entry),
                    None => self.table.clear(),
                }
            }
        }
        Ok(list_size)
    }
}

/// Appends an integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1); `flags` fills the bits
/// of the first byte above the prefix.
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u32, flags: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a string literal as it is: these are short ASCII values, where Huffman would save
/// little and precomputation makes its cost moot either way.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// Encodes the few response header fields this server sends, without touching the peer's dynamic table
/// (literal never indexed / without indexing, static-indexed names where possible, no Huffman), so that
/// encoded blocks can be precomputed once and written as they are.
pub fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    debug_assert!(
        !name.iter().any(u8::is_ascii_uppercase),
        "HTTP/2 field names are lowercase"
    );
    // Literal without indexing (§6.2.2): 0000 then the name's static index, or 0 and the name.
    match STATIC_TABLE.iter().position(|&(n, _)| n == name) {
        Some(i) => encode_integer(out, i + 1, 4, 0x00),
        None => {
            out.push(0x00);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

/// A dynamic table size update (RFC 7541 §6.3), owed at the start of the next block once the
/// peer lowers SETTINGS_HEADER_TABLE_SIZE below what it allowed before. This encoder never adds
/// to the table, so the update only confirms the new size.
pub fn encode_table_size(out: &mut Vec<u8>, size: usize) {
    encode_integer(out, size, 5, 0x20);
}

/// `:status` as a header field: 200 is the static index 8 (one byte 0x88); others a literal with the
/// static name index 8.
pub fn encode_status(out: &mut Vec<u8>, status: u16) {
    if status == 200 {
        encode_integer(out, STATUS_INDEX, 7, 0x80);
        return;
    }
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut rest = status;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    encode_integer(out, STATUS_INDEX, 4, 0x00);
    encode_string(out, &digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::super::XorShift;
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    type FieldList = &'static [(&'static str, &'static str)];

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn decode_all(decoder: &mut Decoder, block: &[u8]) -> Result<(Fields, usize), DecodeError> {
        let mut fields = Vec::new();
        let size = decoder.decode(block, |n, v| fields.push((n.to_vec(), v.to_vec())))?;
        Ok((fields, size))
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn list_size(fields: &Fields) -> usize {
        fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum()
    }

    fn table(decoder: &Decoder) -> Vec<(String, String)> {
        decoder
            .table
            .entries
            .iter()
            .map(|e| {
                let (n, v) = e.field();
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Decodes each block in turn on one decoder, checking the fields, the list size, and the
    /// table afterwards (entries newest first, and their total size) against RFC 7541 Appendix C.
    fn check_sequence(max_table_size: usize, steps: &[(&str, FieldList, FieldList, usize)]) {
        let mut decoder = Decoder::new(max_table_size);
        for (i, (wire, expected, expected_table, table_size)) in steps.iter().enumerate() {
            let (got, size) = decode_all(&mut decoder, &hex(wire)).unwrap();
            let expected = fields(expected);
            assert_eq!(got, expected, "block {i}");
            assert_eq!(size, list_size(&expected), "block {i}");
            assert_eq!(table(&decoder), owned(expected_table), "block {i}");
            assert_eq!(decoder.table.size, *table_size, "block {i}");
        }
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQ_TABLE1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const REQ_TABLE2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const REQ_TABLE3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn rfc7541_c3_requests_without_huffman() {
        check_sequence(
            4096,
            &[
                (
                    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    REQ1,
                    REQ_TABLE1,
                    57,
                ),
                ("8286 84be 5808 6e6f 2d63 6163 6865", REQ2, REQ_TABLE2, 110),
                (
                    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                    REQ3,
                    REQ_TABLE3,
                    164,
                ),
            ],
        );
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        check_sequence(
            4096,
            &[
                (
                    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                    REQ1,
                    REQ_TABLE1,
                    57,
                ),
                ("8286 84be 5886 a8eb 1064 9cbf", REQ2, REQ_TABLE2, 110),
                (
                    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                    REQ3,
                    REQ_TABLE3,
                    164,
                ),
            ],
        );
    }

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOCATION: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
    const RESP1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOCATION),
    ];
    const RESP2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOCATION),
    ];
    const RESP3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", DATE2),
        ("location", LOCATION),
        ("content-encoding", "gzip"),
        ("set-cookie", COOKIE),
    ];
    const RESP_TABLE1: &[(&str, &str)] = &[
        ("location", LOCATION),
        ("date", DATE1),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    // ":status: 302" was evicted to make room for ":status: 307".
    const RESP_TABLE2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", LOCATION),
        ("date", DATE1),
        ("cache-control", "private"),
    ];
    // Four older entries were evicted for the three new ones.
    const RESP_TABLE3: &[(&str, &str)] = &[
        ("set-cookie", COOKIE),
        ("content-encoding", "gzip"),
        ("date", DATE2),
    ];

    #[test]
    fn rfc7541_c5_responses_without_huffman_evict() {
        check_sequence(
            256,
            &[
                (
                    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420
                     3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77
                     7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    RESP1,
                    RESP_TABLE1,
                    222,
                ),
                ("4803 3330 37c1 c0bf", RESP2, RESP_TABLE2, 222),
                (
                    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32
                     3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a
                     584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33
                     3630 303b 2076 6572 7369 6f6e 3d31",
                    RESP3,
                    RESP_TABLE3,
                    215,
                ),
            ],
        );
    }

    #[test]
    fn rfc7541_c6_responses_with_huffman_evict() {
        check_sequence(
            256,
            &[
                (
                    "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81
                     66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                    RESP1,
                    RESP_TABLE1,
                    222,
                ),
                ("4883 640e ffc1 c0bf", RESP2, RESP_TABLE2, 222),
                (
                    "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a
                     839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36
                     72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                    RESP3,
                    RESP_TABLE3,
                    215,
                ),
            ],
        );
    }

    fn decode_err(max_table_size: usize, block: &[u8]) -> DecodeError {
        decode_all(&mut Decoder::new(max_table_size), block).unwrap_err()
    }

    #[test]
    fn index_zero_is_an_error() {
        assert_eq!(decode_err(4096, &[0x80]), DecodeError("index 0"));
    }

    #[test]
    fn index_out_of_range_is_an_error() {
        // 62 with an empty dynamic table.
        assert_eq!(decode_err(4096, &[0xbe]), DecodeError("index out of range"));
        // As the name of a literal.
        assert_eq!(
            decode_err(4096, &[0x7e, 0x00]),
            DecodeError("index out of range")
        );
        // 63 with one entry.
        let mut decoder = Decoder::new(4096);
        let mut block = vec![0x40, 0x01, b'a', 0x01, b'b', 0xbe];
        assert!(decode_all(&mut decoder, &block).is_ok());
        block.push(0xbf);
        assert_eq!(
            decode_all(&mut decoder, &block[5..]).unwrap_err(),
            DecodeError("index out of range")
        );
    }

    #[test]
    fn truncated_integer_is_an_error() {
        assert_eq!(decode_err(4096, &[0xff]), DecodeError("truncated integer"));
        assert_eq!(
            decode_err(4096, &[0xff, 0x80]),
            DecodeError("truncated integer")
        );
        // A literal whose name length is missing.
        assert_eq!(decode_err(4096, &[0x00]), DecodeError("truncated integer"));
        // A literal whose value length is missing.
        assert_eq!(decode_err(4096, &[0x01]), DecodeError("truncated integer"));
    }

    #[test]
    fn oversized_integer_is_an_error() {
        assert_eq!(
            decode_err(4096, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            DecodeError("integer overflow")
        );
        // Four continuation bytes are still accepted (here: a string length beyond the block).
        assert_eq!(
            decode_err(4096, &[0x00, 0x7f, 0xff, 0xff, 0xff, 0x7f]),
            DecodeError("string length beyond the block")
        );
    }

    #[test]
    fn truncated_string_is_an_error() {
        assert_eq!(
            decode_err(4096, &[0x00, 0x05, b'a']),
            DecodeError("string length beyond the block")
        );
        assert_eq!(
            decode_err(4096, &[0x01, 0x83, 0xff]),
            DecodeError("string length beyond the block")
        );
    }

    #[test]
    fn bad_huffman_is_an_error() {
        // "a" is 00011, so 0x1f pads with 111: fine; 0x1e pads with 110.
        let mut decoder = Decoder::new(4096);
        let (got, _) = decode_all(&mut decoder, &[0x01, 0x81, 0x1f]).unwrap();
        assert_eq!(got, fields(&[(":authority", "a")]));
        assert_eq!(
            decode_err(4096, &[0x01, 0x81, 0x1e]),
            DecodeError("invalid Huffman padding")
        );
        assert_eq!(
            decode_err(4096, &[0x01, 0x84, 0xff, 0xff, 0xff, 0xff]),
            DecodeError("EOS in Huffman string")
        );
    }

    #[test]
    fn table_size_update_above_max_is_an_error() {
        // 4097 = 31 + 4066: 0x3f 0xe2 0x1f.
        assert_eq!(
            decode_err(4096, &[0x3f, 0xe2, 0x1f]),
            DecodeError("table size update above the maximum")
        );
        assert_eq!(
            decode_err(0, &[0x21]),
            DecodeError("table size update above the maximum")
        );
    }

    #[test]
    fn table_size_update_after_a_field_is_an_error() {
        assert_eq!(
            decode_err(4096, &[0x82, 0x20]),
            DecodeError("table size update after a field")
        );
        assert_eq!(
            decode_err(4096, &[0x41, 0x00, 0x20]),
            DecodeError("table size update after a field")
        );
    }

    #[test]
    fn table_size_updates_at_the_start_apply() {
        let mut decoder = Decoder::new(4096);
        decode_all(&mut decoder, &[0x40, 0x01, b'a', 0x01, b'b']).unwrap();
        assert_eq!(decoder.table.size, 34);
        // Several updates in a row: down to 0 (evicting everything), back to 4096.
        let (got, size) = decode_all(&mut decoder, &[0x20, 0x3f, 0xe1, 0x1f, 0x82]).unwrap();
        assert_eq!(got, fields(&[(":method", "GET")]));
        assert_eq!(size, 42);
        assert_eq!(decoder.table.size, 0);
        assert_eq!(decoder.table.capacity, 4096);
        assert_eq!(
            decode_all(&mut decoder, &[0xbe]).unwrap_err(),
            DecodeError("index out of range")
        );
        // A block of nothing but an update is fine.
        decode_all(&mut decoder, &[0x3f, 0x01]).unwrap();
        assert_eq!(decoder.table.capacity, 32);
    }

    #[test]
    fn entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(64);
        // 1 + 1 + 32 = 34 fits.
        decode_all(&mut decoder, &[0x40, 0x01, b'a', 0x01, b'b']).unwrap();
        assert_eq!(table(&decoder), owned(&[("a", "b")]));
        // Another of 34: 68 > 64, the first is evicted.
        decode_all(&mut decoder, &[0x40, 0x01, b'c', 0x01, b'd']).unwrap();
        assert_eq!(table(&decoder), owned(&[("c", "d")]));
        // 1 + 32 + 32 = 65 > 64: table emptied, entry not added, field still delivered.
        let mut block = vec![0x40, 0x01, b'e', 0x20];
        block.extend_from_slice(&[b'v'; 32]);
        let (got, _) = decode_all(&mut decoder, &block).unwrap();
        assert_eq!(got, vec![(b"e".to_vec(), vec![b'v'; 32])]);
        assert!(table(&decoder).is_empty());
        assert_eq!(decoder.table.size, 0);
    }

    #[test]
    fn indexed_name_of_an_entry_the_insertion_evicts() {
        let mut decoder = Decoder::new(40);
        decode_all(&mut decoder, &[0x40, 0x01, b'a', 0x01, b'b']).unwrap();
        // Name = index 62 ("a"), new value "c": inserting evicts ("a", "b") itself.
        let (got, _) = decode_all(&mut decoder, &[0x7e, 0x01, b'c']).unwrap();
        assert_eq!(got, fields(&[("a", "c")]));
        assert_eq!(table(&decoder), owned(&[("a", "c")]));
    }

    #[test]
    fn literals_without_indexing_leave_the_table_alone() {
        let mut decoder = Decoder::new(4096);
        // Without indexing (0000), never indexed (0001), with literal and indexed names.
        let block = [
            0x00, 0x01, b'x', 0x01, b'1', 0x10, 0x01, b'y', 0x01, b'2', 0x04, 0x01, b'/', 0x1f,
            0x28, 0x01, b'z',
        ];
        let (got, size) = decode_all(&mut decoder, &block).unwrap();
        let expected = fields(&[("x", "1"), ("y", "2"), (":path", "/"), ("set-cookie", "z")]);
        assert_eq!(got, expected);
        assert_eq!(size, list_size(&expected));
        assert!(table(&decoder).is_empty());
    }

    #[test]
    fn hpack_bomb_costs_only_the_iteration() {
        const REFERENCES: usize = 12_000;
        let value = vec![b'v'; 4000];
        let mut block = vec![0x40, 0x06];
        block.extend_from_slice(b"x-bomb");
        encode_integer(&mut block, value.len(), 7, 0x00);
        block.extend_from_slice(&value);
        block.extend(std::iter::repeat_n(0xbe, REFERENCES));

        let mut decoder = Decoder::new(4096);
        let mut calls = 0;
        let mut pointers = std::collections::HashSet::new();
        let size = decoder
            .decode(&block, |name, v| {
                calls += 1;
                assert_eq!(name, b"x-bomb");
                assert_eq!(v.len(), 4000);
                pointers.insert(v.as_ptr() as usize);
            })
            .unwrap();
        assert_eq!(calls, REFERENCES + 1);
        assert_eq!(size, (REFERENCES + 1) * 4038);
        // The literal (from the block) and every reference, the same bytes in the table.
        assert_eq!(pointers.len(), 2);
        let (_, stored) = decoder.table.get(62).unwrap();
        assert!(pointers.contains(&(stored.as_ptr() as usize)));
    }

    #[test]
    fn encoded_fields_decode_back() {
        let long = "x".repeat(300);
        let cases: &[(&str, &str)] = &[
            ("content-type", "application/grpc"),
            ("grpc-status", "0"),
            ("grpc-message", ""),
            ("www-authenticate", "Bearer"),
            (":authority", ""),
            ("x-long", &long),
            (&long, "v"),
        ];
        let mut block = Vec::new();
        for (name, value) in cases {
            encode_field(&mut block, name.as_bytes(), value.as_bytes());
        }
        let mut decoder = Decoder::new(4096);
        for _ in 0..2 {
            let (got, size) = decode_all(&mut decoder, &block).unwrap();
            let expected = fields(cases);
            assert_eq!(got, expected);
            assert_eq!(size, list_size(&expected));
            assert!(table(&decoder).is_empty());
        }
    }

    #[test]
    fn encoded_field_bytes() {
        let mut out = Vec::new();
        encode_field(&mut out, b"content-type", b"application/grpc");
        // Index 31 = 15 + 16 with a 4-bit prefix, then a 16-byte raw string.
        let mut expected = vec![0x0f, 0x10, 0x10];
        expected.extend_from_slice(b"application/grpc");
        assert_eq!(out, expected);

        out.clear();
        encode_field(&mut out, b"grpc-status", b"0");
        let mut expected = vec![0x00, 0x0b];
        expected.extend_from_slice(b"grpc-status");
        expected.extend_from_slice(&[0x01, b'0']);
        assert_eq!(out, expected);
    }

    #[test]
    fn encoded_status_decodes_back() {
        let mut out = Vec::new();
        encode_status(&mut out, 200);
        assert_eq!(out, [0x88]);
        out.clear();
        encode_status(&mut out, 404);
        assert_eq!(out, [0x08, 0x03, b'4', b'0', b'4']);

        let mut decoder = Decoder::new(4096);
        for status in [200u16, 100, 204, 404, 415, 500, 503, 0, 7, 65535] {
            let mut block = Vec::new();
            encode_status(&mut block, status);
            let (got, _) = decode_all(&mut decoder, &block).unwrap();
            assert_eq!(
                got,
                vec![(b":status".to_vec(), status.to_string().into_bytes())]
            );
        }
        assert!(table(&decoder).is_empty());
    }

    #[test]
    fn integers_round_trip() {
        for prefix_bits in 1..=8 {
            for value in [
                0,
                1,
                30,
                31,
                126,
                127,
                128,
                254,
                255,
                256,
                4096,
                1 << 20,
                1 << 27,
            ] {
                let mut out = Vec::new();
                encode_integer(&mut out, value, prefix_bits, 0x00);
                let mut cursor = Cursor {
                    block: &out,
                    pos: 0,
                };
                assert_eq!(cursor.integer(prefix_bits), Ok(value));
                assert_eq!(cursor.pos, out.len());
            }
        }
    }

    #[test]
    fn decodes_what_a_reference_encoder_writes() {
        use httlib_hpack::Encoder;
        // Literal without indexing, never indexed, with indexing (BEST_FORMAT: indexed when
        // the table has the field or its name), each with and without Huffman.
        const FLAG_SETS: [u8; 8] = [0x00, 0x03, 0x08, 0x0b, 0x14, 0x15, 0x16, 0x17];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for (round, &table_size) in [4096usize, 256, 0, 1000].iter().enumerate() {
            let mut encoder = Encoder::with_dynamic_size(table_size as u32);
            let mut decoder = Decoder::new(table_size);
            // Repeated names and values, so that later fields hit the dynamic table.
            let names: Vec<Vec<u8>> = (0..12)
                .map(|i| match i % 3 {
                    0 => STATIC_TABLE[rng.below(61)].0.to_vec(),
                    _ => {
                        let mut n = b"x-".to_vec();
                        n.extend(rng.bytes(20).iter().map(|b| b'a' + b % 26));
                        n
                    }
                })
                .collect();
            let values: Vec<Vec<u8>> = (0..12).map(|_| rng.bytes(120)).collect();
            for block_no in 0..40 {
                let mut block = Vec::new();
                if round == 3 && block_no % 10 == 5 {
                    // Shrink then restore the table at the start of the block.
                    encoder.update_max_dynamic_size(100, &mut block).unwrap();
                    encoder
                        .update_max_dynamic_size(table_size as u32, &mut block)
                        .unwrap();
                }
                let count = rng.below(12);
                let mut expected = Vec::new();
                for _ in 0..count {
                    let name = names[rng.below(names.len())].clone();
                    let value = if rng.below(5) == 0 {
                        rng.bytes(300)
                    } else {
                        values[rng.below(values.len())].clone()
                    };
                    let flags = FLAG_SETS[rng.below(FLAG_SETS.len())];
                    encoder
                        .encode((name.clone(), value.clone(), flags), &mut block)
                        .unwrap();
                    expected.push((name, value));
                }
                let (got, size) = decode_all(&mut decoder, &block)
                    .unwrap_or_else(|e| panic!("round {round} block {block_no}: {e:?}"));
                assert_eq!(got, expected, "round {round} block {block_no}");
                assert_eq!(size, list_size(&expected));
            }
        }
    }

    #[test]
    fn a_table_size_update_decodes_and_resizes() {
        let mut block = Vec::new();
        encode_table_size(&mut block, 100);
        encode_field(&mut block, b"grpc-status", b"0");
        let mut decoder = Decoder::new(4096);
        let (fields, _) = decode_all(&mut decoder, &block).unwrap();
        assert_eq!(fields, self::fields(&[("grpc-status", "0")]));
        let mut too_big = Vec::new();
        encode_table_size(&mut too_big, 5000);
        assert!(decode_all(&mut decoder, &too_big).is_err());
    }

    #[test]
    fn any_bytes_decode_or_fail_without_panicking_and_the_table_stays_bounded() {
        let mut rng = XorShift(0x5eed_cafe_f00d_beef);
        let mut decoder = Decoder::new(4096);
        for _ in 0..20_000 {
            let mut block = rng.bytes(64);
            // Now and then a valid start, to reach deeper states.
            if rng.below(3) == 0 {
                block.insert(0, 0x40 | (rng.below(62) as u8));
            }
            let mut fields = 0usize;
            let _ = decoder.decode(&block, |_, _| fields += 1);
            let held: usize = decoder
                .table
                .entries
                .iter()
                .map(|entry| {
                    let (name, value) = entry.field();
                    name.len() + value.len() + 32
                })
                .sum();
            assert!(held <= 4096, "the table holds {held} bytes");
        }
    }
}
