//! Built-in rotation of `json_file`: the `rotate`, `retain` and
//! `compression` keys, the names of rotated files, and the rename that
//! rotates. Compression and retention run in the background
//! ([`super::housekeeping`]); nothing here runs on the hot path but one
//! comparison per write.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sink_api::{ByteSize, ConfigError};

/// `rotate = { max_bytes = "100MiB", every = "1h" }`: when the active file is
/// renamed aside and a new one started. Either key or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// Rotate once the file holds this many bytes: an integer, or a size with
    /// a unit such as "64KiB", "100MiB" or "1GB". A batch is never split
    /// across files, so a file may exceed it by one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Rotate at every multiple of this interval since the Unix epoch, in
    /// UTC: "1h" starts files on the hour, "1d" at midnight UTC, whenever the
    /// process started. At least "1s".
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", extend("format" = "duration"))]
    pub every: Option<Duration>,
}

/// `retain = { max_files = 48, max_age = "7d" }`: which rotated files are
/// kept. Either key or both; the active file is never deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retain {
    /// Keep at most this many rotated files (compressed or not), deleting
    /// the oldest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u32>,
    /// Delete rotated files whose rotation time is older than this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", extend("format" = "duration"))]
    pub max_age: Option<Duration>,
}

/// How rotated files are compressed, in the background.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Rotated files stay as they are.
    #[default]
    None,
    /// `NAME.gz`, readable with `zcat`.
    Gzip,
    /// `NAME.zst`, readable with `zstdcat`.
    Zstd,
}

impl Compression {
    /// The extension a file compressed this way gets, without the dot.
    pub(super) fn extension(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Gzip => Some("gz"),
            Self::Zstd => Some("zst"),
        }
    }
}

/// Shorter intervals would rotate faster than a file system's timestamps
/// and a reader can follow.
const MIN_EVERY: Duration = Duration::from_secs(1);

/// Far beyond any useful interval; keeps the arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub(super) fn validate(
    rotate: Option<&Rotate>,
    retain: Option<&Retain>,
    path: &Path,
) -> Result<(), ConfigError> {
    if rotate.is_some() || retain.is_some() {
        Names::of(path).ok_or_else(|| {
            ConfigError::new(
                "path",
                "to rotate, the file name must be valid UTF-8 and not end in `..`",
            )
        })?;
    }
    if let Some(rotate) = rotate {
        if rotate.max_bytes.is_none() && rotate.every.is_none() {
            return Err(ConfigError::new(
                "rotate",
                "give `max_bytes`, `every` or both (leave `rotate` out to never rotate)",
            ));
        }
        if rotate.max_bytes == Some(ByteSize(0)) {
            return Err(ConfigError::new(
                "rotate.max_bytes",
                "must be at least 1 byte",
            ));
        }
        if let Some(every) = rotate.every {
            if every < MIN_EVERY {
                return Err(ConfigError::new("rotate.every", "must be at least 1s"));
            }
            if every > MAX_DURATION {
                return Err(ConfigError::new(
                    "rotate.every",
                    "must be at most 100 years",
                ));
            }
        }
    }
    if let Some(retain) = retain {
        if retain.max_files.is_none() && retain.max_age.is_none() {
            return Err(ConfigError::new(
                "retain",
                "give `max_files`, `max_age` or both (leave `retain` out to keep every rotated file)",
            ));
        }
        if retain.max_files == Some(0) {
            return Err(ConfigError::new(
                "retain.max_files",
                "must be at least 1 (leave `retain` out to keep every rotated file)",
            ));
        }
        if let Some(max_age) = retain.max_age {
            if max_age.is_zero() {
                return Err(ConfigError::new("retain.max_age", "must be longer than 0s"));
            }
            if max_age > MAX_DURATION {
                return Err(ConfigError::new(
                    "retain.max_age",
                    "must be at most 100 years",
                ));
            }
        }
    }
    Ok(())
}

/// When the period of `every` that holds `since` ends.
pub(super) fn period_end(since: SystemTime, every: Duration) -> SystemTime {
    let every_ms = every.as_millis().max(1);
    let since_ms = since
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let end_ms = (since_ms / every_ms + 1) * every_ms;
    UNIX_EPOCH + Duration::from_millis(u64::try_from(end_ms).unwrap_or(u64::MAX))
}

/// The names of the active file and of its rotated files: `DIR/STEM.EXT`
/// rotates to `DIR/STEM-2026-12-01T05-00-00.000Z.EXT`, compressed to
/// `....EXT.zst` or `....EXT.gz`, written first as `....zst.tmp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Names {
    pub dir: PathBuf,
    stem: String,
    /// `.EXT`, or empty.
    extension: String,
}

/// The length of `2026-12-01T05-00-00.000Z`.
const TIME_LEN: usize = 24;

/// One rotated file, as its name tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rotated {
    /// Its rotation time.
    pub time: SystemTime,
    /// Its name before compression: what groups a file with its compressed
    /// and temporary forms.
    pub base: String,
    /// Compressed with, if it is.
    pub compression: Compression,
    /// A compression still being written (or cut short by a crash).
    pub temporary: bool,
}

impl Names {
    /// `None` for a name that cannot be split (not UTF-8, or no file name).
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        let (stem, extension) = match name.rsplit_once('.') {
            Some((stem, extension)) if !stem.is_empty() => (stem, format!(".{extension}")),
            _ => (name, String::new()),
        };
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some(Self {
            dir,
            stem: stem.to_string(),
            extension,
        })
    }

    /// The name a file rotated at `time` gets (milliseconds, UTC; `:` is
    /// written `-` so that every file system takes it).
    pub fn rotated(&self, time: SystemTime) -> PathBuf {
        let stamp = humantime::format_rfc3339_millis(time)
            .to_string()
            .replace(':', "-");
        self.dir
            .join(format!("{}-{stamp}{}", self.stem, self.extension))
    }

    /// What a file name in [`dir`](Self::dir) is, if it is one of ours.
    pub fn parse(&self, name: &str) -> Option<Rotated> {
        let rest = name.strip_prefix(&self.stem)?.strip_prefix('-')?;
        let stamp = rest.get(..TIME_LEN)?;
        let mut rest = rest[TIME_LEN..].strip_prefix(self.extension.as_str())?;
        let temporary = match rest.strip_suffix(".tmp") {
            Some(stripped) => {
                rest = stripped;
                true
            }
            None => false,
        };
        let compression = match rest {
            "" => Compression::None,
            ".gz" => Compression::Gzip,
            ".zst" => Compression::Zstd,
            _ => return None,
        };
        if temporary && compression == Compression::None {
            return None;
        }
        // `2026-12-01T05-00-00.000Z` back to RFC 3339.
        let mut rfc3339 = stamp.to_string();
        if rfc3339.as_bytes().get(13) != Some(&b'-') || rfc3339.as_bytes().get(16) != Some(&b'-') {
            return None;
        }
        rfc3339.replace_range(13..14, ":");
        rfc3339.replace_range(16..17, ":");
        let time = humantime::parse_rfc3339(&rfc3339).ok()?;
        Some(Rotated {
            time,
            base: format!("{}-{stamp}{}", self.stem, self.extension),
            compression,
            temporary,
        })
    }
}

/// Renames `from` to `to` unless `to` exists, atomically where the file
/// system can (`renameat2` with `RENAME_NOREPLACE`).
pub(super) fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
    };
    let (c_from, c_to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if done == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // A file system without the flag: check, then rename (not atomic,
        // but only this sink writes these names).
        Some(libc::EINVAL | libc::ENOSYS) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn rotated_names_sort_in_time_and_parse_back() {
        let names = Names::of(Path::new("data/telemetry-sink.log.json")).unwrap();
        let time = at("2026-12-01T05:00:00.000Z");
        let rotated = names.rotated(time);
        assert_eq!(
            rotated,
            Path::new("data/telemetry-sink.log-2026-12-01T05-00-00.000Z.json")
        );
        let base = "telemetry-sink.log-2026-12-01T05-00-00.000Z.json";
        let parsed = names.parse(base).unwrap();
        assert_eq!((parsed.time, parsed.base.as_str()), (time, base));
        let zst = names.parse(&format!("{base}.zst.tmp")).unwrap();
        assert_eq!(
            (zst.compression, zst.temporary, zst.base.as_str()),
            (Compression::Zstd, true, base)
        );
        for foreign in [
            "telemetry-sink.log.json",
            "telemetry-sink.log.json.1",
            "telemetry-sink.log-2026-12-01T05-00-00.000Z.json.bz2",
            "telemetry-sink.log-2026-12-01T05-00-00.000Z.json.tmp",
            "other-2026-12-01T05-00-00.000Z.json",
        ] {
            assert_eq!(names.parse(foreign), None, "{foreign}");
        }
        let later = names.rotated(at("2026-12-01T05:00:00.001Z"));
        assert!(later > rotated);

        let bare = Names::of(Path::new("out")).unwrap();
        assert_eq!(
            bare.rotated(time),
            Path::new("./out-2026-12-01T05-00-00.000Z")
        );
        assert!(bare.parse("out-2026-12-01T05-00-00.000Z.gz").is_some());
    }

    #[test]
    fn periods_are_aligned_to_the_epoch() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            period_end(at("2026-12-01T05:17:42.5Z"), hour),
            at("2026-12-01T06:00:00Z")
        );
        assert_eq!(
            period_end(at("2026-12-01T06:00:00Z"), hour),
            at("2026-12-01T07:00:00Z")
        );
    }

    #[test]
    fn rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let err = rename_no_replace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_file(&b).unwrap();
        rename_no_replace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "a");
    }
}
