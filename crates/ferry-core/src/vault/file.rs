//! Packs into a vault on this machine's disk, written past the page cache.
//!
//! A pack is written once and read again only by a restore or a check, so
//! its copy into the page cache buys little, and it was the costliest stage
//! of an initial snapshot into a local vault: on a virtual machine whose
//! host backs a guest page when it is first touched, the kernel's copy into
//! fresh page-cache pages ran at about 400 MB/s of a core, against 1.3 GB/s
//! for the disk itself with `O_DIRECT` and almost no CPU. So packs are
//! written with `O_DIRECT` where the filesystem takes it (block-aligned
//! writes from an aligned buffer; the unaligned tail through a second,
//! buffered handle), and through the page cache where it does not.
//!
//! Large reads of packs (a restore's spans, a check's packs) go the same
//! way: a restore soon after the snapshot would otherwise pay for fresh
//! page-cache pages on the read instead.
//!
//! Otherwise a put is what `object_store`'s local puts with fsync are: the
//! bytes go to a staging file beside the name (`<name>#<n>`, which its
//! listings skip), are synced, and are hard-linked to the name, so the
//! object appears whole or not at all and an object already there is never
//! touched; then the staging name goes and the directory is synced.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What `O_DIRECT` needs: buffer address, file offset and length multiples
/// of the logical block size (512 or 4096 on the disks we meet).
const ALIGN: usize = 4096;
/// Bytes per write: large enough that the disk streams, small enough to
/// keep a buffer per blocking thread.
const BLOCK: usize = 1 << 20;

thread_local! {
    /// This thread's aligned buffer, kept: a fresh one per pack would be
    /// fresh pages again.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether a create-only put wrote the object or found it there.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Put {
    Created,
    Existed,
}

/// Writes `bytes` to `path`, create-only and durable (see the module doc).
pub(super) fn put_new(path: &Path, bytes: &[u8]) -> io::Result<Put> {
    put(path, bytes, cfg!(target_os = "linux"))
}

/// `put_new`, trying `O_DIRECT` only if `direct`.
fn put(path: &Path, bytes: &[u8], direct: bool) -> io::Result<Put> {
    let (file, staging, direct) = open_staging(path, direct)?;
    let written = write(&file, &staging, bytes, direct).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let linked = std::fs::hard_link(&staging, path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(Put::Created)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Put::Existed),
        Err(e) => Err(e),
    }
}

/// Staging files (`<name>#<n>`) under `root` last written more than `age`
/// ago: what puts killed midway left. Removes them unless `dry_run`;
/// returns how many there were. Symlinks are not followed.
pub(super) fn sweep_staging(
    root: &Path,
    age: std::time::Duration,
    dry_run: bool,
) -> io::Result<u64> {
    let cutoff = std::time::SystemTime::now() - age;
    let mut found = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let is_staging = name
                .to_str()
                .and_then(|n| n.rsplit_once('#'))
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !kind.is_file() || !is_staging || entry.metadata()?.modified()? > cutoff {
                continue;
            }
            found += 1;
            if !dry_run {
                match std::fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
    }
    Ok(found)
}

/// Reads `range` of the file at `path`, with `O_DIRECT` where the
/// filesystem takes it: an aligned read around the range, sliced. Fewer
/// bytes than asked (the file is shorter) is `UnexpectedEof`.
pub(super) fn read_range(path: &Path, range: Range<u64>) -> io::Result<bytes::Bytes> {
    read(path, range, cfg!(target_os = "linux"))
}

/// `read_range`, trying `O_DIRECT` only if `direct`.
fn read(path: &Path, range: Range<u64>, direct: bool) -> io::Result<bytes::Bytes> {
    let len = usize::try_from(range.end.saturating_sub(range.start))
        .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    if direct {
        match open_read(path, true) {
            Ok(file) => {
                let first = range.start / ALIGN as u64 * ALIGN as u64;
                let skip = (range.start - first) as usize;
                let span = (skip + len).div_ceil(ALIGN) * ALIGN;
                let mut buf = vec![0u8; span + ALIGN];
                let at = buf.as_ptr().align_offset(ALIGN);
                match read_full(&file, &mut buf[at..at + span], first) {
                    Ok(got) if got >= skip + len => {
                        return Ok(bytes::Bytes::from(buf).slice(at + skip..at + skip + len));
                    }
                    Ok(_) => return Err(ErrorKind::UnexpectedEof.into()),
                    Err(e) if refused(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if refused(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; len];
    open_read(path, false)?.read_exact_at(&mut buf, range.start)?;
    Ok(buf.into())
}

fn open_read(path: &Path, direct: bool) -> io::Result<File> {
    open(OpenOptions::new().read(true), path, direct)
}

/// Reads into `buf` from `offset` until it is full or the file ends;
/// returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A new staging file beside `path` (its directory made if missing), opened
/// with `O_DIRECT` when the filesystem allows it; the flag says which.
fn open_staging(path: &Path, mut direct: bool) -> io::Result<(File, PathBuf, bool)> {
    let mut n = 1u64;
    loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = PathBuf::from(staging);
        match open_new(&staging, direct) {
            Ok(f) => return Ok((f, staging, direct)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => create_dirs(path)?,
            // Filesystems without O_DIRECT (tmpfs before Linux 6.6, some
            // FUSE and network filesystems) refuse the open.
            Err(e) if direct && refused(&e) => direct = false,
            Err(e) => return Err(e),
        }
    }
}

/// How filesystems say no to `O_DIRECT` (EINVAL on Linux's own, EOPNOTSUPP
/// on some others).
fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

fn open_new(path: &Path, direct: bool) -> io::Result<File> {
    open(
        OpenOptions::new().write(true).create_new(true),
        path,
        direct,
    )
}

/// Opens `path` with `o`, and `O_DIRECT` if `direct` (Linux only).
fn open(o: &mut OpenOptions, path: &Path, direct: bool) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    if direct {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    o.open(path)
}

/// Makes `path`'s directory and syncs the directory that gained it.
fn create_dirs(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent() else {
        return Err(ErrorKind::NotFound.into());
    };
    std::fs::create_dir_all(dir)?;
    if let Some(up) = dir.parent() {
        File::open(up)?.sync_all()?;
    }
    Ok(())
}

/// Writes `bytes` at the start of the empty `file`: the block-aligned part
/// from the aligned buffer when `direct`, the rest through a buffered
/// handle on the same file. A filesystem that opened with `O_DIRECT` but
/// refuses the first aligned write gets it all through the page cache.
fn write(file: &File, staging: &Path, bytes: &[u8], direct: bool) -> io::Result<()> {
    let mut done = 0;
    if direct {
        let aligned = bytes.len() / ALIGN * ALIGN;
        BUFFER.with_borrow_mut(|buf| {
            if buf.len() < BLOCK + ALIGN {
                buf.resize(BLOCK + ALIGN, 0);
            }
            let start = buf.as_ptr().align_offset(ALIGN);
            let buf = &mut buf[start..start + BLOCK];
            while done < aligned {
                let n = BLOCK.min(aligned - done);
                buf[..n].copy_from_slice(&bytes[done..done + n]);
                match file.write_all_at(&buf[..n], done as u64) {
                    Ok(()) => done += n,
                    Err(e) if done == 0 && refused(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
    }
    if done < bytes.len() {
        // Synced with the rest by the caller: fsync flushes the file, not
        // the handle.
        let tail = OpenOptions::new().write(true).open(staging)?;
        tail.write_all_at(&bytes[done..], done as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that differ at every offset, so a block written at the wrong
    /// place shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    fn staging_left(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('#'))
            .collect()
    }

    fn puts_every_length_whole(root: &Path, direct: bool) {
        let dir = root.join("packs").join("ab");
        for len in [
            0,
            1,
            511,
            4095,
            4096,
            4097,
            BLOCK,
            BLOCK + ALIGN + 3,
            3 * BLOCK + 17,
        ] {
            let path = dir.join(format!("object-{len}"));
            let bytes = pattern(len);
            assert_eq!(put(&path, &bytes, direct).unwrap(), Put::Created, "{len}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{len} bytes");
        }
        assert_eq!(staging_left(&dir), Vec::<String>::new());
    }

    #[test]
    fn every_length_arrives_whole_and_no_staging_file_stays() {
        let root = tempfile::tempdir().unwrap();
        puts_every_length_whole(root.path(), true);
    }

    /// The path a filesystem that refuses O_DIRECT takes.
    #[test]
    fn through_the_page_cache_every_length_arrives_whole() {
        let root = tempfile::tempdir().unwrap();
        puts_every_length_whole(root.path(), false);
    }

    /// tmpfs: with O_DIRECT since Linux 6.6, refused before; either way the
    /// bytes arrive.
    #[test]
    fn a_filesystem_in_memory_gets_the_same_bytes() {
        let root = tempfile::tempdir_in("/dev/shm").unwrap();
        puts_every_length_whole(root.path(), true);
    }

    /// Ranges at every alignment, to the file's last byte, through either
    /// path; a range past the end is an error, never short bytes.
    #[test]
    fn ranges_read_back_exactly() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("object");
        let bytes = pattern(3 * BLOCK + 4097);
        put_new(&path, &bytes).unwrap();
        let n = bytes.len() as u64;
        for direct in [true, false] {
            for r in [
                0..1,
                0..4096,
                1..4097,
                4095..4097,
                5000..BLOCK as u64 + 9,
                17..n,
                n - 3..n,
                0..n,
            ] {
                let got = read(&path, r.clone(), direct).unwrap();
                assert_eq!(
                    &got[..],
                    &bytes[r.start as usize..r.end as usize],
                    "{r:?} {direct}"
                );
            }
            let past = read(&path, n - 3..n + 1, direct).unwrap_err();
            assert_eq!(past.kind(), ErrorKind::UnexpectedEof, "{direct}");
            let missing = read(&root.path().join("none"), 0..10, direct).unwrap_err();
            assert_eq!(missing.kind(), ErrorKind::NotFound);
        }
    }

    /// Old staging files go, wherever they are; young ones (a live put's),
    /// objects, and names that only look alike stay; a dry run only counts.
    #[test]
    fn old_staging_files_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("packs").join("ab");
        std::fs::create_dir_all(&dir).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let make = |name: &str, old: bool| {
            let f = File::create(dir.join(name)).unwrap();
            if old {
                f.set_modified(hour_ago).unwrap();
            }
        };
        make("abcd#1", true);
        make("abcd#12", true);
        make("abcd#2", false);
        make("abcd", true);
        make("note#x", true);
        make("trailing#", true);
        let other = root.path().join("index");
        std::fs::create_dir_all(&other).unwrap();
        File::create(other.join("i#3"))
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        let age = std::time::Duration::from_secs(3600);
        assert_eq!(sweep_staging(root.path(), age, true).unwrap(), 3);
        assert!(dir.join("abcd#1").exists(), "a dry run removes nothing");
        assert_eq!(sweep_staging(root.path(), age, false).unwrap(), 3);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["abcd", "abcd#2", "note#x", "trailing#"]);
        assert!(!other.join("i#3").exists());
        assert_eq!(sweep_staging(root.path(), age, false).unwrap(), 0);
    }

    #[test]
    fn an_object_already_there_is_never_touched() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("p").join("object");
        let first = pattern(2 * ALIGN + 5);
        assert_eq!(put_new(&path, &first).unwrap(), Put::Created);
        let other = vec![0xEE; 3 * ALIGN];
        assert_eq!(put_new(&path, &other).unwrap(), Put::Existed);
        assert_eq!(std::fs::read(&path).unwrap(), first);
        assert_eq!(staging_left(&root.path().join("p")), Vec::<String>::new());
    }

    #[test]
    fn a_staging_name_in_use_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("object");
        std::fs::write(root.path().join("object#1"), b"another writer").unwrap();
        let bytes = pattern(ALIGN + 1);
        assert_eq!(put_new(&path, &bytes).unwrap(), Put::Created);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(
            std::fs::read(root.path().join("object#1")).unwrap(),
            b"another writer"
        );
    }
}
