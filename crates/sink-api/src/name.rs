//! Sensor names that readings share instead of each holding a copy.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::Deref;
use std::str::Utf8Error;
use std::sync::Arc;

/// The name of the sensor a reading came from: immutable text, shared by
/// the readings that carry it. A clone costs a reference count, not an
/// allocation, so a batch of a thousand readings from ten sensors holds ten
/// names, and a source that reads names off the wire can hand out ones it
/// has seen before ([`SensorName::intern`]).
///
/// It reads as a `&str` (`Deref`) and compares with string types.
///
/// ```
/// use sink_api::SensorName;
/// let name = SensorName::from("boiler");
/// assert_eq!(name, "boiler");
/// assert_eq!(name.len(), 6); // any `str` method
/// let again = name.clone(); // shares the text
/// assert_eq!(again.as_str(), "boiler");
/// assert_eq!(SensorName::from(format!("boiler-{}", 2)), "boiler-2");
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SensorName(Arc<str>);

impl SensorName {
    /// The name spelled by `bytes`, shared with earlier names of the same
    /// bytes read on this thread when one is still remembered, so that a
    /// source decoding the same few sensors over and over allocates and
    /// checks UTF-8 only for a name it has not seen lately. Fails when the
    /// bytes are not UTF-8.
    ///
    /// Each thread remembers at most 1024 names of at most 128 bytes (a
    /// name of more is allocated every time), so what is remembered stays
    /// under 170 KiB per thread whatever the names sent.
    ///
    /// ```
    /// use sink_api::SensorName;
    /// let first = SensorName::intern(b"boiler").unwrap();
    /// let second = SensorName::intern(b"boiler").unwrap();
    /// assert!(SensorName::ptr_eq(&first, &second));
    /// assert!(SensorName::intern(b"\xff").is_err());
    /// ```
    pub fn intern(bytes: &[u8]) -> Result<Self, Utf8Error> {
        if bytes.len() > MAX_REMEMBERED_BYTES {
            return std::str::from_utf8(bytes).map(Self::from);
        }
        // The memory is gone only while the thread is being torn down.
        REMEMBERED
            .try_with(|remembered| remembered.borrow_mut().intern(bytes))
            .unwrap_or_else(|_| std::str::from_utf8(bytes).map(Self::from))
    }

    /// As [`intern`](Self::intern), for a name already known to be text.
    ///
    /// ```
    /// use sink_api::SensorName;
    /// let first = SensorName::intern_str("requests");
    /// assert!(SensorName::ptr_eq(&first, &SensorName::intern(b"requests").unwrap()));
    /// ```
    pub fn intern_str(name: &str) -> Self {
        // A `str` is UTF-8: the fallback is never taken.
        Self::intern(name.as_bytes()).unwrap_or_else(|_| Self::from(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `a` and `b` share one text (not only equal ones).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// How many names each thread remembers for [`SensorName::intern`]: more
/// than the sensors one sink usually hears from, few enough that the table
/// (16 KiB) stays in cache.
const REMEMBERED_NAMES: usize = 1024;

/// Longer names are not remembered, which bounds the remembered bytes.
const MAX_REMEMBERED_BYTES: usize = 128;

thread_local! {
    static REMEMBERED: RefCell<Remembered> = const { RefCell::new(Remembered(Vec::new())) };
}

/// The names a thread remembers: one slot per hash, a new name replacing
/// the one in its slot. A lookup is a hash and a comparison; names that
/// collide only cost the allocation that remembering would have saved.
struct Remembered(Vec<Option<SensorName>>);

impl Remembered {
    fn intern(&mut self, bytes: &[u8]) -> Result<SensorName, Utf8Error> {
        if self.0.is_empty() {
            self.0.resize(REMEMBERED_NAMES, None);
        }
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one(bytes);
        // The table's length is a power of two.
        let slot = &mut self.0[hash as usize & (REMEMBERED_NAMES - 1)];
        if let Some(name) = slot
            && name.as_bytes() == bytes
        {
            return Ok(name.clone());
        }
        let name = SensorName::from(std::str::from_utf8(bytes)?);
        *slot = Some(name.clone());
        Ok(name)
    }
}

impl Default for SensorName {
    /// The empty name, as a reading without one has.
    fn default() -> Self {
        // The empty string is valid UTF-8.
        Self::intern(b"").unwrap_or_else(|_| Self::from(""))
    }
}

impl Deref for SensorName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SensorName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for SensorName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SensorName {
    fn from(name: &str) -> Self {
        Self(Arc::from(name))
    }
}

impl From<String> for SensorName {
    fn from(name: String) -> Self {
        Self(Arc::from(name))
    }
}

impl From<&String> for SensorName {
    fn from(name: &String) -> Self {
        Self(Arc::from(name.as_str()))
    }
}

impl From<SensorName> for String {
    fn from(name: SensorName) -> Self {
        name.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for SensorName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for SensorName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for SensorName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<SensorName> for str {
    fn eq(&self, other: &SensorName) -> bool {
        *self == *other.0
    }
}

impl PartialEq<SensorName> for &str {
    fn eq(&self, other: &SensorName) -> bool {
        **self == *other.0
    }
}

impl PartialEq<SensorName> for String {
    fn eq(&self, other: &SensorName) -> bool {
        **self == *other.0
    }
}

impl fmt::Debug for SensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for SensorName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SensorName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_are_shared_checked_and_bounded() {
        let a = SensorName::intern(b"sensor-1").unwrap();
        assert!(SensorName::ptr_eq(
            &a,
            &SensorName::intern(b"sensor-1").unwrap()
        ));
        assert_eq!(SensorName::intern(b"sensor-2").unwrap(), "sensor-2");
        // Not UTF-8, whether or not a name was remembered in its slot.
        assert!(SensorName::intern(b"sensor-\xc3").is_err());
        assert!(SensorName::intern(&[0xff; 200]).is_err());
        // Long names are correct but never shared.
        let long = "n".repeat(MAX_REMEMBERED_BYTES + 1);
        let first = SensorName::intern(long.as_bytes()).unwrap();
        assert_eq!(first, long);
        assert!(!SensorName::ptr_eq(
            &first,
            &SensorName::intern(long.as_bytes()).unwrap()
        ));
        // Many more names than slots: each read back right, the table stays its size.
        for round in 0..2 {
            for i in 0..4 * REMEMBERED_NAMES {
                let text = format!("s{i}");
                assert_eq!(
                    SensorName::intern(text.as_bytes()).unwrap(),
                    text,
                    "round {round}"
                );
            }
        }
        REMEMBERED.with(|remembered| assert_eq!(remembered.borrow().0.len(), REMEMBERED_NAMES));
    }

    #[test]
    fn names_compare_and_print_as_their_text() {
        let name = SensorName::from("a\"b");
        assert_eq!(name, "a\"b");
        assert_eq!("a\"b", name);
        assert_eq!(name, String::from("a\"b"));
        assert_eq!(format!("{name} {name:?}"), "a\"b \"a\\\"b\"");
        assert_eq!(SensorName::default(), "");
        let (a, b) = (SensorName::from("a"), SensorName::from("b"));
        assert!(a < b);
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(serde_json::from_str::<SensorName>(&json).unwrap(), name);
    }
}
