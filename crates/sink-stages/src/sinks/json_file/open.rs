//! Opening the output file so that nothing can block or go wrong quietly:
//! only a regular file is written to, a FIFO cannot block the open, a parent
//! that is a file is named as such, and a line cut short by an earlier run is
//! repaired before anything is appended to it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::SystemTime;

/// An output file, open to append, and what is known about it.
#[derive(Debug)]
pub(super) struct Opened {
    pub file: File,
    /// Its length once repaired.
    pub len: u64,
    /// When it was last written, if it holds anything.
    pub modified: Option<SystemTime>,
}

/// Opens `path` to append, creating it and its missing parents. Refuses
/// anything but a regular file. The open itself uses `O_NONBLOCK`, so that a
/// FIFO put at the path cannot hang it (it fails or is refused after
/// `fstat`); on a regular file the flag changes nothing.
pub(super) fn open_output(path: &Path) -> io::Result<Opened> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|err| explain_parent(parent, err))?;
    }
    // `stat` first, for a clear word on a FIFO nobody reads (its non-blocking
    // open would fail with "No such device or address").
    if let Ok(metadata) = std::fs::metadata(path) {
        refuse_unless_regular(&metadata)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| match path.parent() {
            Some(parent) if err.raw_os_error() == Some(libc::ENOTDIR) => {
                explain_parent(parent, err)
            }
            _ => err,
        })?;
    // Checked again on what was opened: the path may have changed since.
    let metadata = file.metadata()?;
    refuse_unless_regular(&metadata)?;
    let len = repair_tail(&file, metadata.len(), path)?;
    let modified = if len > 0 {
        metadata.modified().ok()
    } else {
        None
    };
    Ok(Opened {
        file,
        len,
        modified,
    })
}

/// The identity of an open file, to tell whether a path still names it.
pub(super) fn identity(metadata: &std::fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

/// Refuses anything but a regular file, naming what it is.
pub(super) fn refuse_unless_regular(metadata: &std::fs::Metadata) -> io::Result<()> {
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}; json_file writes only to regular files"),
    ))
}

/// "File exists" or "Not a directory" on a path whose parent is a file
/// becomes: which parent is not a directory.
fn explain_parent(parent: &Path, err: io::Error) -> io::Error {
    let not_a_directory = parent
        .ancestors()
        .find(|ancestor| std::fs::metadata(ancestor).is_ok_and(|m| !m.is_dir()));
    match not_a_directory {
        Some(file) => io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("parent `{}` is not a directory", file.display()),
        ),
        None => err,
    }
}

/// Makes a file that does not end with a newline end with one, and returns
/// its new length. A fragment that starts like one of our lines (`{`) is a
/// write cut short (a crash, a kill, a disk that filled before the cut back
/// could run): its readings were never written whole, so the loss count
/// already counted them, and the fragment is truncated so that every line
/// parses. Any other ending is someone else's text: a newline is appended,
/// so nothing foreign is destroyed and our next line starts on its own.
fn repair_tail(file: &File, len: u64, path: &Path) -> io::Result<u64> {
    if len == 0 || last_byte(file, len)? == b'\n' {
        return Ok(len);
    }
    let fragment_start = match last_newline(file, len)? {
        Some(newline) => newline + 1,
        None => 0,
    };
    let mut first = [0];
    file.read_exact_at(&mut first, fragment_start)?;
    if first[0] == b'{' {
        file.set_len(fragment_start)?;
        tracing::warn!(
            "`{}` ended in a partial line of {} bytes (a write cut short before); removed it",
            path.display(),
            len - fragment_start
        );
        Ok(fragment_start)
    } else {
        let mut appender = file;
        io::Write::write_all(&mut appender, b"\n")?;
        tracing::warn!(
            "`{}` did not end with a newline; added one before appending",
            path.display()
        );
        Ok(len + 1)
    }
}

fn last_byte(file: &File, len: u64) -> io::Result<u8> {
    let mut byte = [0];
    file.read_exact_at(&mut byte, len - 1)?;
    Ok(byte[0])
}

/// The offset of the last newline, reading backwards in chunks.
fn last_newline(file: &File, len: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut buffer = vec![0; CHUNK as usize];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buffer[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(at) = chunk.iter().rposition(|&byte| byte == b'\n') {
            return Ok(Some(start + at as u64));
        }
        end = start;
    }
    Ok(None)
}

/// Truncates the last `partial` bytes of `file`: a line a failed write cut
/// short. Refuses when the file is shorter (someone truncated it meanwhile).
pub(super) fn cut_back(file: &File, partial: u64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let Some(keep) = len.checked_sub(partial) else {
        return Err(io::Error::other("the file shrank under the write"));
    };
    file.set_len(keep)?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn opened_text(initial: &[u8]) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        std::fs::write(&path, initial).unwrap();
        let opened = open_output(&path).unwrap();
        (std::fs::read(&path).unwrap(), opened.len)
    }

    #[test]
    fn a_cut_line_is_removed_and_a_foreign_ending_gets_a_newline() {
        let whole = b"{\"a\":1}\n";
        assert_eq!(opened_text(whole), (whole.to_vec(), 8));
        assert_eq!(
            opened_text(b"{\"a\":1}\n{\"received_at\":\"2026-12-0"),
            (whole.to_vec(), 8)
        );
        assert_eq!(opened_text(b"{\"cut"), (Vec::new(), 0));
        assert_eq!(
            opened_text(b"notes\nno newline"),
            (b"notes\nno newline\n".to_vec(), 17)
        );
        // Longer than one backward chunk.
        let mut long = whole.to_vec();
        long.extend(std::iter::repeat_n(b'{', 200_000));
        assert_eq!(opened_text(&long), (whole.to_vec(), 8));
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_output(dir.path()).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let err = open_output(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("a device"), "{err}");
    }

    #[test]
    fn a_parent_that_is_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x");
        std::fs::write(&file, "").unwrap();
        for path in [file.join("out.json"), file.join("deeper/out.json")] {
            let err = open_output(&path).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("parent `{}` is not a directory", file.display())
            );
        }
    }

    #[test]
    fn cut_back_removes_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        let mut opened = open_output(&path).unwrap();
        opened.file.write_all(b"{\"a\":1}\n{\"b\"").unwrap();
        assert_eq!(cut_back(&opened.file, 4).unwrap(), 8);
        opened.file.write_all(b"{\"b\":2}\n").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"a\":1}\n{\"b\":2}\n".to_vec()
        );
        assert!(cut_back(&opened.file, 100).is_err());
    }
}
