//! A request's header fields, as HPACK decodes them, checked as RFC 9113
//! 8.2 and 8.3 ask and turned into what the call needs: for
//! `SendSensorValues` only its encoding and deadline (nothing allocated),
//! for any other path a whole HTTP request.

use std::ops::Range;
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;

use super::super::body::Encoding;

/// Where a request goes, with what it needs.
pub enum Route {
    Sensor {
        encoding: Result<Encoding, Status>,
        timeout: Option<Duration>,
    },
    Other(http::request::Parts),
}

/// Collects one header block's fields.
pub struct Fields<'s> {
    /// The pseudo-headers' values, one after another.
    scratch: &'s mut Vec<u8>,
    limit: usize,
    /// The header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it.
    size: usize,
    malformed: Option<&'static str>,
    method: Option<Range<usize>>,
    scheme: Option<Range<usize>>,
    authority: Option<Range<usize>>,
    path: Option<Range<usize>>,
    /// A regular field has come: no more pseudo-headers.
    regular: bool,
    /// Decided at the first regular field (pseudo-headers come first).
    sensor: bool,
    encoding: Option<Result<Encoding, Status>>,
    timeout: Option<Duration>,
    /// An other path's headers.
    headers: Option<http::HeaderMap>,
}

impl<'s> Fields<'s> {
    /// Fields of a header list of at most `limit` bytes.
    pub fn new(scratch: &'s mut Vec<u8>, limit: usize) -> Self {
        scratch.clear();
        Self {
            scratch,
            limit,
            size: 0,
            malformed: None,
            method: None,
            scheme: None,
            authority: None,
            path: None,
            regular: false,
            sensor: false,
            encoding: None,
            timeout: None,
            headers: None,
        }
    }

    /// One field. Past the limit, or once malformed, fields are only
    /// counted: a header list that refuses itself costs no memory.
    #[inline]
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.size > self.limit || self.malformed.is_some() {
            return;
        }
        if let Err(why) = self.take(name, value) {
            self.malformed = Some(why);
        }
    }

    fn take(&mut self, name: &[u8], value: &[u8]) -> Result<(), &'static str> {
        if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err("a field value with NUL, CR or LF");
        }
        if name.first() == Some(&b':') {
            if self.regular {
                return Err("a pseudo-header after a regular field");
            }
            let slot = match name {
                b":method" => &mut self.method,
                b":scheme" => &mut self.scheme,
                b":authority" => &mut self.authority,
                b":path" => &mut self.path,
                _ => return Err("an unknown pseudo-header"),
            };
            if slot.is_some() {
                return Err("a pseudo-header twice");
            }
            let start = self.scratch.len();
            self.scratch.extend_from_slice(value);
            *slot = Some(start..self.scratch.len());
            return Ok(());
        }
        if !self.regular {
            self.regular = true;
            self.route();
        }
        // HTTP/2 refuses uppercase names rather than folding them (8.2.1).
        if name.is_empty() || name.iter().any(u8::is_ascii_uppercase) {
            return Err("an invalid field name");
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Err("a connection-specific field"),
            b"te" if value != b"trailers" => return Err("te other than trailers"),
            _ => {}
        }
        if let Some(headers) = &mut self.headers {
            let name = http::HeaderName::from_bytes(name).map_err(|_| "an invalid field name")?;
            let value =
                http::HeaderValue::from_bytes(value).map_err(|_| "an invalid field value")?;
            headers.append(name, value);
            return Ok(());
        }
        match name {
            b"grpc-encoding" => self.encoding = Some(Encoding::from_value(value)),
            b"grpc-timeout" => self.timeout = grpc_timeout(value),
            _ => {}
        }
        Ok(())
    }

    fn text(&self, range: &Option<Range<usize>>) -> Option<&[u8]> {
        range.clone().map(|range| &self.scratch[range])
    }

    /// Decides where the request goes, from its `:path`.
    fn route(&mut self) {
        self.sensor = self.text(&self.path) == Some(sink_proto::SEND_SENSOR_VALUES_PATH.as_bytes());
        if !self.sensor {
            self.headers = Some(http::HeaderMap::new());
        }
    }

    /// The request, or why it is refused: `None` when its header list is
    /// over the limit, else what is malformed.
    pub fn finish(mut self) -> Result<Route, Option<&'static str>> {
        if self.size > self.limit {
            return Err(None);
        }
        if let Some(why) = self.malformed {
            return Err(Some(why));
        }
        if self.method.is_none() || self.scheme.is_none() || self.path.is_none() {
            return Err(Some("a request without :method, :scheme or :path"));
        }
        if self.text(&self.path).is_some_and(<[u8]>::is_empty) {
            return Err(Some("an empty :path"));
        }
        if !self.regular {
            self.route();
        }
        if self.sensor {
            return Ok(Route::Sensor {
                encoding: self.encoding.unwrap_or(Ok(Encoding::Identity)),
                timeout: self.timeout,
            });
        }
        let method = http::Method::from_bytes(self.text(&self.method).unwrap_or_default())
            .map_err(|_| Some("an invalid :method"))?;
        let mut uri = http::Uri::builder();
        if let Some(authority) = self.text(&self.authority) {
            uri = uri
                .scheme(self.text(&self.scheme).unwrap_or_default())
                .authority(authority);
        }
        let uri = uri
            .path_and_query(self.text(&self.path).unwrap_or_default())
            .build()
            .map_err(|_| Some("an invalid :path, :scheme or :authority"))?;
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = method;
        parts.uri = uri;
        parts.version = http::Version::HTTP_2;
        parts.headers = self.headers.take().unwrap_or_default();
        Ok(Route::Other(parts))
    }
}

/// The value of a `grpc-timeout` header: up to 8 digits and a unit (H, M,
/// S, m, u, n); `None` when malformed, as tonic ignored those.
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(fields: &[(&str, &str)]) -> Result<Route, Option<&'static str>> {
        let mut scratch = Vec::new();
        let mut collected = Fields::new(&mut scratch, 16 * 1024);
        for (name, value) in fields {
            collected.field(name.as_bytes(), value.as_bytes());
        }
        collected.finish()
    }

    const CALL: [(&str, &str); 4] = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", sink_proto::SEND_SENSOR_VALUES_PATH),
        (":authority", "sink"),
    ];

    #[test]
    fn a_sensor_call_takes_only_its_encoding_and_deadline() {
        let mut fields = CALL.to_vec();
        fields.extend([
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-encoding", "gzip"),
            ("grpc-timeout", "250m"),
        ]);
        let Ok(Route::Sensor { encoding, timeout }) = route(&fields) else {
            panic!("not a sensor call");
        };
        assert_eq!(encoding.unwrap(), Encoding::Gzip);
        assert_eq!(timeout, Some(Duration::from_millis(250)));
        let Ok(Route::Sensor { encoding, .. }) = route(&CALL) else {
            panic!("not a sensor call");
        };
        assert_eq!(encoding.unwrap(), Encoding::Identity);
    }

    #[test]
    fn any_other_path_is_a_whole_request() {
        let fields = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "sink:4000"),
            (":path", "/grpc.health.v1.Health/Check"),
            ("content-type", "application/grpc"),
            ("x-custom", "a"),
            ("x-custom", "b"),
        ];
        let Ok(Route::Other(parts)) = route(&fields) else {
            panic!("not another request");
        };
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(
            parts.uri.to_string(),
            "https://sink:4000/grpc.health.v1.Health/Check"
        );
        assert_eq!(parts.headers.get_all("x-custom").iter().count(), 2);
    }

    #[test]
    fn malformed_requests_are_refused_with_their_reason() {
        let with = |extra: (&'static str, &'static str)| {
            let mut fields = CALL.to_vec();
            fields.push(extra);
            route(&fields).err().flatten()
        };
        assert!(with(("Content-Type", "x")).is_some());
        assert!(with(("connection", "close")).is_some());
        assert!(with(("te", "gzip")).is_some());
        assert!(with(("x-bad", "a\nb")).is_some());
        assert!(with((":status", "200")).is_some());
        let mut late = CALL.to_vec();
        late.insert(0, ("content-type", "application/grpc"));
        assert!(route(&late).err().flatten().is_some());
        assert!(route(&CALL[..2]).err().flatten().is_some());
        let mut twice = CALL.to_vec();
        twice.push((":path", "/x"));
        assert!(route(&twice).err().flatten().is_some());
    }

    #[test]
    fn a_list_over_the_limit_is_refused_and_not_kept() {
        let mut scratch = Vec::new();
        let mut fields = Fields::new(&mut scratch, 1024);
        for (name, value) in CALL {
            fields.field(name.as_bytes(), value.as_bytes());
        }
        let big = vec![b'v'; 4000];
        for _ in 0..1000 {
            fields.field(b"x-big", &big);
        }
        assert!(fields.scratch.len() < 1024);
        assert!(matches!(fields.finish(), Err(None)));
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"S", b"123456789S", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(
                grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
