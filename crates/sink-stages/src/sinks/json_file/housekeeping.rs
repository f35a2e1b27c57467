//! What happens to rotated files after the rename, in the background on the
//! blocking pool: compression, retention, and finishing what a crash
//! interrupted. One pass does all three by looking at the directory, so the
//! same pass serves a rotation, a reload and a start after a crash.
//!
//! A pass never touches the active file, nor the file the sink has open
//! (should a rotation have renamed it without a new one opening).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::FileMetrics;
use super::open::identity;
use super::rotate::{Compression, Names, Retain, Rotated};

/// What a pass is to do.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub names: Names,
    pub compression: Compression,
    pub retain: Option<Retain>,
    pub metrics: FileMetrics,
}

/// Runs passes one at a time; a request while one runs is remembered and
/// run right after it, with the latest job.
#[derive(Debug, Default)]
pub(super) struct Housekeeper {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: bool,
    again: Option<Job>,
    /// The file the sink writes to, which no pass may touch.
    in_use: Option<(u64, u64)>,
    /// When a pass should run again without a rotation: to retry what
    /// failed, or to apply `max_age`.
    next_due: Option<SystemTime>,
}

/// A failed pass is tried again after this long.
const RETRY: Duration = Duration::from_secs(30);

/// With `max_age`, a pass runs at least this often.
const AGE_CHECK: Duration = Duration::from_secs(60);

impl Housekeeper {
    /// Starts a pass on the blocking pool (or, outside a runtime, runs it
    /// here), unless one runs: then it runs again when done.
    pub fn request(self: &Arc<Self>, job: Job) {
        {
            let mut state = self.lock();
            if state.running {
                state.again = Some(job);
                return;
            }
            state.running = true;
        }
        let housekeeper = Arc::clone(self);
        let work = move || housekeeper.run(job);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(work)),
            Err(_) => work(),
        }
    }

    /// Marks the file the sink writes to, by its identity.
    pub fn set_in_use(&self, metadata: Option<&std::fs::Metadata>) {
        self.lock().in_use = metadata.map(identity);
    }

    /// When a pass is due with no rotation to trigger it.
    pub fn next_due(&self) -> Option<SystemTime> {
        let state = self.lock();
        if state.running { None } else { state.next_due }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self, mut job: Job) {
        loop {
            let in_use = self.lock().in_use;
            let succeeded = pass(&job, in_use, SystemTime::now());
            let mut state = self.lock();
            state.next_due = match (succeeded, &job.retain) {
                (false, _) => Some(SystemTime::now() + RETRY),
                (
                    true,
                    Some(Retain {
                        max_age: Some(_), ..
                    }),
                ) => Some(SystemTime::now() + AGE_CHECK),
                (true, _) => None,
            };
            match state.again.take() {
                Some(next) => job = next,
                None => {
                    state.running = false;
                    return;
                }
            }
        }
    }
}

/// A rotated file and its other forms, by rotation time.
#[derive(Debug)]
struct Unit {
    time: SystemTime,
    base: String,
    plain: bool,
    compressed: Vec<Compression>,
    temporary: Vec<Compression>,
}

/// One pass over the directory; logs each failure at WARN with the path and
/// the OS's reason, and says whether everything went well.
pub(super) fn pass(job: &Job, in_use: Option<(u64, u64)>, now: SystemTime) -> bool {
    let dir = &job.names.dir;
    let mut units = match scan(&job.names) {
        Ok(units) => units,
        Err(err) => {
            tracing::warn!(
                "cannot list `{}` to compress or retain rotated files: {err}",
                dir.display()
            );
            job.metrics.housekeeping_errors.inc();
            return false;
        }
    };
    let busy = |path: &Path| {
        in_use.is_some()
            && std::fs::metadata(path)
                .map(|m| Some(identity(&m)) == in_use)
                .unwrap_or(false)
    };
    let mut succeeded = true;
    let mut remove = |path: &Path, why: &str| match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(err) if err.kind() == io::ErrorKind::NotFound => true,
        Err(err) => {
            tracing::warn!("cannot remove `{}` ({why}): {err}", path.display());
            job.metrics.housekeeping_errors.inc();
            succeeded = false;
            false
        }
    };

    // Finish what a crash interrupted. A temporary file is removed once its
    // source is confirmed whole; a compressed file exists only after it was
    // written in full and synced, so its uncompressed source can go.
    for unit in &mut units {
        let plain = dir.join(&unit.base);
        for codec in std::mem::take(&mut unit.temporary) {
            let temporary = temporary_path(&plain, codec);
            if unit.plain {
                remove(&temporary, "an unfinished compression");
            } else {
                tracing::warn!(
                    "`{}` is an unfinished compression whose source `{}` is gone; left as it is",
                    temporary.display(),
                    plain.display()
                );
            }
        }
        if unit.plain && !unit.compressed.is_empty() && !busy(&plain) {
            unit.plain = !remove(&plain, "already compressed");
        }
    }

    // A file dated in the future (rotated while the clock was ahead) would
    // never reach `max_age`: it is renamed to now, and ages from here.
    for unit in &mut units {
        if unit.time > now + FUTURE_SLACK {
            redate(job, unit, now);
        }
    }
    units.sort_by(|a, b| (a.time, &a.base).cmp(&(b.time, &b.base)));

    // Retention, before compressing what would be deleted anyway.
    if let Some(retain) = &job.retain {
        let too_many = retain
            .max_files
            .map_or(0, |max| units.len().saturating_sub(max as usize));
        let cutoff = retain.max_age.and_then(|age| now.checked_sub(age));
        let mut kept = Vec::with_capacity(units.len());
        for (index, unit) in units.into_iter().enumerate() {
            let expired = index < too_many || cutoff.is_some_and(|cutoff| unit.time < cutoff);
            let plain = dir.join(&unit.base);
            if !expired || busy(&plain) {
                kept.push(unit);
                continue;
            }
            let mut all_gone = !unit.plain || remove(&plain, "past `retain`");
            for codec in &unit.compressed {
                all_gone &= remove(&compressed_path(&plain, *codec), "past `retain`");
            }
            if all_gone {
                job.metrics.retention_removed.inc();
            } else {
                kept.push(unit);
            }
        }
        units = kept;
    }

    if job.compression != Compression::None {
        for unit in units.iter().filter(|u| u.plain && u.compressed.is_empty()) {
            let plain = dir.join(&unit.base);
            if busy(&plain) {
                continue;
            }
            match compress(&plain, job.compression) {
                Ok(()) => {
                    job.metrics.compressed.inc();
                }
                Err(err) => {
                    tracing::warn!(
                        "cannot compress `{}`: {err}; it stays uncompressed for now and is tried again",
                        plain.display()
                    );
                    job.metrics.housekeeping_errors.inc();
                    succeeded = false;
                }
            }
        }
    }
    succeeded
}

/// The rotated files of `names`, oldest first. Only regular files count:
/// a symbolic link (or anything else) with a rotated-style name is not ours,
/// and is never read, compressed or removed, so that no pass reaches outside
/// the directory it owns.
fn scan(names: &Names) -> io::Result<Vec<Unit>> {
    let mut found: Vec<Rotated> = Vec::new();
    for entry in std::fs::read_dir(&names.dir)? {
        let entry = entry?;
        let Some(rotated) = entry.file_name().to_str().and_then(|n| names.parse(n)) else {
            continue;
        };
        // The entry's own type: a link is not followed.
        if entry.file_type()?.is_file() {
            found.push(rotated);
        }
    }
    found.sort_by(|a, b| (a.time, &a.base).cmp(&(b.time, &b.base)));
    let mut units: Vec<Unit> = Vec::new();
    for rotated in found {
        let unit = match units.last_mut() {
            Some(last) if last.base == rotated.base => last,
            _ => {
                units.push(Unit {
                    time: rotated.time,
                    base: rotated.base.clone(),
                    plain: false,
                    compressed: Vec::new(),
                    temporary: Vec::new(),
                });
                units.last_mut().expect("just pushed")
            }
        };
        match (rotated.compression, rotated.temporary) {
            (Compression::None, _) => unit.plain = true,
            (codec, true) => unit.temporary.push(codec),
            (codec, false) => unit.compressed.push(codec),
        }
    }
    Ok(units)
}

/// How far in the future a rotated file's date may be before it is taken
/// for the mark of a clock that was wrong.
const FUTURE_SLACK: Duration = Duration::from_secs(60);

/// Renames every form of `unit` to the name of a rotation at `now` (a few
/// milliseconds later if that is taken), never replacing a file; on a
/// failure (logged) the unit keeps its old name and is tried next pass.
fn redate(job: &Job, unit: &mut Unit, now: SystemTime) {
    let dir = &job.names.dir;
    let old_plain = dir.join(&unit.base);
    let mut forms: Vec<Compression> = unit.compressed.clone();
    if unit.plain {
        forms.push(Compression::None);
    }
    for step in 0..1000u64 {
        let time = now + Duration::from_millis(step);
        let new_plain = job.names.rotated(time);
        let taken = forms
            .iter()
            .any(|codec| std::fs::symlink_metadata(compressed_path(&new_plain, *codec)).is_ok());
        if taken {
            continue;
        }
        for codec in &forms {
            let from = compressed_path(&old_plain, *codec);
            let to = compressed_path(&new_plain, *codec);
            if let Err(err) = super::rotate::rename_no_replace(&from, &to) {
                tracing::warn!(
                    "cannot rename `{}`, dated in the future, to `{}`: {err}",
                    from.display(),
                    to.display()
                );
                job.metrics.housekeeping_errors.inc();
                return;
            }
        }
        tracing::info!(
            "`{}` was dated in the future (a clock that was ahead?); renamed to `{}` so that retention ages it from now",
            old_plain.display(),
            new_plain.display()
        );
        unit.time = time;
        if let Some(name) = new_plain.file_name().and_then(|n| n.to_str()) {
            unit.base = name.to_string();
        }
        return;
    }
}

fn compressed_path(plain: &Path, codec: Compression) -> PathBuf {
    let mut name = plain.as_os_str().to_owned();
    if let Some(extension) = codec.extension() {
        name.push(".");
        name.push(extension);
    }
    PathBuf::from(name)
}

fn temporary_path(plain: &Path, codec: Compression) -> PathBuf {
    let mut name = compressed_path(plain, codec).into_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes `NAME.EXT.tmp`, syncs it, renames it to `NAME.EXT`, then removes
/// `NAME`: at every instant one complete copy exists under a final name.
fn compress(plain: &Path, codec: Compression) -> io::Result<()> {
    let temporary = temporary_path(plain, codec);
    let written = write_compressed(plain, &temporary, codec).and_then(|()| {
        let done = compressed_path(plain, codec);
        std::fs::rename(&temporary, &done)?;
        if let Some(dir) = plain.parent() {
            // The rename is durable before the source goes.
            File::open(dir).and_then(|dir| dir.sync_all()).ok();
        }
        std::fs::remove_file(plain)
    });
    if written.is_err() {
        std::fs::remove_file(&temporary).ok();
    }
    written
}

fn write_compressed(plain: &Path, temporary: &Path, codec: Compression) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Neither end follows a link put in place since the scan: the source is
    // read only if it is still our file, and the temporary is a new file.
    let mut source = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(plain)?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temporary)?;
    let out = BufWriter::with_capacity(256 * 1024, created);
    let file = match codec {
        Compression::None => return Ok(()),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            io::copy(&mut source, &mut encoder)?;
            encoder.finish()?
        }
        Compression::Zstd => {
            let mut encoder = zstd::stream::write::Encoder::new(out, 3)?;
            io::copy(&mut source, &mut encoder)?;
            encoder.finish()?
        }
    };
    let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn setup(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Names) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let names = Names::of(&dir.path().join("out.json")).unwrap();
        (dir, names)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    const A: &str = "out-2026-12-01T05-00-00.000Z.json";
    const B: &str = "out-2026-12-01T06-00-00.000Z.json";
    const C: &str = "out-2026-12-01T07-00-00.000Z.json";

    #[test]
    fn compresses_with_both_codecs_and_reads_back() {
        for (codec, ext) in [(Compression::Zstd, "zst"), (Compression::Gzip, "gz")] {
            let text = b"{\"a\":1}\n".repeat(1000);
            let (dir, names) = setup(&[(A, &text), ("out.json", b"")]);
            let job = Job {
                names,
                compression: codec,
                retain: None,
                metrics: FileMetrics::default(),
            };
            assert!(pass(&job, None, SystemTime::now()));
            assert_eq!(job.metrics.compressed.get(), 1);
            assert_eq!(
                listing(dir.path()),
                vec![format!("{A}.{ext}"), "out.json".into()]
            );
            let file = File::open(dir.path().join(format!("{A}.{ext}"))).unwrap();
            let mut back = Vec::new();
            match codec {
                Compression::Zstd => zstd::stream::read::Decoder::new(file)
                    .unwrap()
                    .read_to_end(&mut back),
                _ => flate2::read::GzDecoder::new(file).read_to_end(&mut back),
            }
            .unwrap();
            assert_eq!(back, text);
        }
    }

    #[test]
    fn a_crash_is_finished_on_the_next_pass() {
        let (dir, names) = setup(&[
            // Killed while compressing: the temporary goes, the source is compressed again.
            (A, b"{\"a\":1}\n"),
            (&format!("{A}.zst.tmp"), b"garbage"),
            // Killed after the rename: the source goes.
            (B, b"{\"b\":1}\n"),
            (
                &format!("{B}.zst"),
                &zstd::encode_all(&b"{\"b\":1}\n"[..], 3).unwrap(),
            ),
        ]);
        let job = Job {
            names,
            compression: Compression::Zstd,
            retain: None,
            metrics: FileMetrics::default(),
        };
        assert!(pass(&job, None, SystemTime::now()));
        assert_eq!(job.metrics.compressed.get(), 1);
        assert_eq!(
            listing(dir.path()),
            vec![format!("{A}.zst"), format!("{B}.zst")]
        );
    }

    #[test]
    fn retention_by_count_and_age_spares_the_open_file() {
        let (dir, names) = setup(&[
            (A, b"a"),
            (&format!("{B}.gz"), b"b"),
            (C, b"c"),
            ("out.json", b""),
        ]);
        let count = Job {
            names: names.clone(),
            compression: Compression::None,
            retain: Some(Retain {
                max_files: Some(2),
                max_age: None,
            }),
            metrics: FileMetrics::default(),
        };
        // The oldest is the file the sink has open: it stays.
        let open = std::fs::metadata(dir.path().join(A)).unwrap();
        assert!(pass(&count, Some(identity(&open)), SystemTime::now()));
        assert_eq!(listing(dir.path()).len(), 4);
        assert!(pass(&count, None, SystemTime::now()));
        assert_eq!(count.metrics.retention_removed.get(), 1);
        assert_eq!(
            listing(dir.path()),
            vec![format!("{B}.gz"), C.into(), "out.json".into()]
        );

        let age = Job {
            names,
            compression: Compression::None,
            retain: Some(Retain {
                max_files: None,
                max_age: Some(Duration::from_secs(1800)),
            }),
            metrics: FileMetrics::default(),
        };
        let now = humantime::parse_rfc3339("2026-12-01T07:10:00Z").unwrap();
        assert!(pass(&age, None, now));
        assert_eq!(age.metrics.retention_removed.get(), 1);
        assert_eq!(listing(dir.path()), vec![C.to_string(), "out.json".into()]);
    }
}
