//! Watching files for replacement, the way the pipeline file is watched: for
//! the runtime's hot reload and for any stage that reads files it should pick
//! up again when they change (the `grpc` source's TLS certificates).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long the directories must be quiet before a burst of events becomes one change.
const QUIET: Duration = Duration::from_millis(200);
/// The longest a burst may defer a change.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// Watches files through their parent directories, so that every way of
/// replacing one is seen: written in place, renamed over by an editor, deleted
/// and recreated, or swapped as a Kubernetes ConfigMap or Secret mount (where
/// the file is a symlink into `..data`, itself a symlink replaced atomically).
/// Each burst of events arrives as one change once the directories have been
/// quiet for a moment; the watcher says only *that* something may have
/// changed, so compare contents before acting.
///
/// ```no_run
/// # async fn demo() -> notify::Result<()> {
/// use std::path::Path;
/// let mut watcher = sink_api::watch::FileWatcher::start_all(&[
///     Path::new("tls/server.crt"),
///     Path::new("tls/server.key"),
/// ])?;
/// while watcher.changed().await.is_some() {
///     // read the files again; keep what runs if they fail to load
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::Receiver<()>,
}

impl FileWatcher {
    /// Starts watching `file`. Must be called within a tokio runtime.
    pub fn start(file: &Path) -> notify::Result<Self> {
        Self::start_all(&[file])
    }

    /// Starts watching every file of `files`, in as many directories as they
    /// name. Must be called within a tokio runtime.
    pub fn start_all(files: &[&Path]) -> notify::Result<Self> {
        // The names watched in each directory.
        let mut directories: BTreeMap<PathBuf, Vec<OsString>> = BTreeMap::new();
        for file in files {
            let directory = match file.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let names = directories.entry(directory).or_default();
            names.extend(file.file_name().map(|name| name.to_os_string()));
        }
        let names: Vec<OsString> = directories.values().flatten().cloned().collect();
        let (events, mut raw) = mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Reading a file (ours included) is no change; closing it
                // after writing is, and marks the end of an in-place write.
                let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
                if matches!(event.kind, EventKind::Access(_)) && event.kind != written {
                    return;
                }
                // A name of ours, or the `..data` family of a Kubernetes mount.
                // (A name watched in one directory and seen in another only
                // costs a needless comparison of contents.)
                let relevant = event.paths.iter().any(|path| {
                    path.file_name().is_some_and(|name| {
                        names.iter().any(|watched| watched == name)
                            || name.to_string_lossy().starts_with("..")
                    })
                });
                if relevant {
                    // A full channel already holds a pending change: nothing is lost.
                    let _ = events.try_send(());
                }
            })?;
        for directory in directories.keys() {
            watcher.watch(directory, RecursiveMode::NonRecursive)?;
        }

        let (debounced, changes) = mpsc::channel(1);
        tokio::spawn(async move {
            while raw.recv().await.is_some() {
                let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
                loop {
                    let quiet_until = (tokio::time::Instant::now() + QUIET).min(deadline);
                    match tokio::time::timeout_at(quiet_until, raw.recv()).await {
                        Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
                        Ok(None) => return,
                        _ => break,
                    }
                }
                if debounced.send(()).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            _watcher: watcher,
            changes,
        })
    }

    /// The next debounced change; `None` once the watcher has failed.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sees_a_rename_over_a_watched_file_in_either_directory() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let a = one.path().join("a.pem");
        let b = two.path().join("b.pem");
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let mut watcher = FileWatcher::start_all(&[&a, &b]).unwrap();

        // An unrelated file in a watched directory is no change.
        std::fs::write(one.path().join("other"), "x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_secs(1), watcher.changed()).await;
        assert!(quiet.is_err(), "an unrelated file counted as a change");

        let staged = two.path().join("b.pem.tmp");
        std::fs::write(&staged, "b2").unwrap();
        std::fs::rename(&staged, &b).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), watcher.changed()).await;
        assert_eq!(seen.expect("a change within 10 s"), Some(()));
    }
}
