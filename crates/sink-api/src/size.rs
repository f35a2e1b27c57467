//! Sizes in bytes as `pipeline.toml` writes them: `65536`, `"64KiB"`, `"1GB"`.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, written in a config as an integer or as a string with a
/// unit: `B`, decimal `KB` `MB` `GB` `TB` (powers of 1000) or binary `KiB`
/// `MiB` `GiB` `TiB` (powers of 1024), in any case, with an optional space.
/// Serialized as the plain integer.
///
/// ```
/// use sink_api::ByteSize;
/// assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65_536));
/// assert_eq!("1 GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
/// assert!("3 parsecs".parse::<ByteSize>().is_err());
///
/// #[derive(serde::Deserialize)]
/// struct Limits { max_bytes: ByteSize }
/// let limits: Limits = toml::from_str(r#"max_bytes = "100MiB""#).unwrap();
/// assert_eq!(limits.max_bytes.0, 100 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const UNITS: [(&str, u64); 9] = [
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// No digits first.
    #[error(
        "`{0}` is not a size: write an integer of bytes or one with a unit, such as \"64KiB\" or \"100MB\""
    )]
    NotANumber(String),
    /// A unit this parser does not know.
    #[error("`{0}` has an unknown unit `{1}`; known units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")]
    UnknownUnit(String, String),
    /// More than 2^64 - 1 bytes.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let digits = trimmed.len()
            - trimmed
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        let (number, unit) = trimmed.split_at(digits);
        let number: u64 = match number.parse() {
            Ok(number) => number,
            Err(err) if *err.kind() == std::num::IntErrorKind::PosOverflow => {
                return Err(ByteSizeError::TooLarge(text.into()));
            }
            Err(_) => return Err(ByteSizeError::NotANumber(text.into())),
        };
        let unit = unit.trim_start();
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                .map(|(_, factor)| *factor)
                .ok_or_else(|| ByteSizeError::UnknownUnit(text.into(), unit.into()))?
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::TooLarge(text.into()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: an integer of bytes or a string such as \"64KiB\"")
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                text.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["integer", "string"],
            "format": "size",
            "description": "bytes: an integer, or a string with a unit such as \"64KiB\" or \"1GB\"",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_mistakes() {
        for (text, bytes) in [
            ("0", 0),
            ("17", 17),
            ("17B", 17),
            ("64KiB", 65_536),
            ("64 kib", 65_536),
            ("100MiB", 100 << 20),
            ("1GB", 1_000_000_000),
            ("2TiB", 2 << 40),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        assert!(matches!(
            "5 parsecs".parse::<ByteSize>(),
            Err(ByteSizeError::UnknownUnit(_, unit)) if unit == "parsecs"
        ));
        assert!(matches!(
            "MiB".parse::<ByteSize>(),
            Err(ByteSizeError::NotANumber(_))
        ));
        assert!(matches!(
            "-1".parse::<ByteSize>(),
            Err(ByteSizeError::NotANumber(_))
        ));
        assert!(matches!(
            "20000000TiB".parse::<ByteSize>(),
            Err(ByteSizeError::TooLarge(_))
        ));
    }
}
