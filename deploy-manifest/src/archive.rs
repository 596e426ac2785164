//! Content-addressed artifact archives: `push` packs, the agent unpacks; both live here so
//! the two sides cannot disagree on the format.
//!
//! Packing is deterministic: entries in byte order of their paths, mtime 0, owner 0:0, no
//! user or group names, modes normalised to 0755 (directories and executables) or 0644.
//! The same directory therefore always gives the same bytes and the same sha256, which is
//! what makes a second push of an unchanged build upload nothing. The sha256 is computed
//! while the archive is written, in the same pass.
//!
//! Unpacking refuses anything that could write outside the target directory: absolute
//! paths, `..`, links whose target leaves the tree, and device or fifo entries. It is also
//! capped ([`UnpackLimits`]): the bytes the entries hold, their number, and the metadata
//! (long names, pax headers) between two entries, so a small archive cannot fill the disk
//! or the memory.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::model::ArchiveFormat;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("archive entry {entry:?} refused: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error(
        "the archive unpacks to more than {limit} bytes (at entry {entry:?}), the cap for an archive of this size on this host; \
         refused, nothing installed. If the artifact is legitimate, raise --max-unpacked-bytes on the host"
    )]
    TooManyBytes { limit: u64, entry: String },
    #[error(
        "the archive holds more than {limit} entries, the cap for an archive of this size on this host; \
         refused, nothing installed. If the artifact is legitimate, raise --max-archive-entries on the host"
    )]
    TooManyEntries { limit: u64 },
}

/// Caps on what unpacking one archive may write. [`UnpackLimits::for_archive`] derives them
/// from the archive's declared (compressed) size within the host's caps: bytes at most
/// max(256 MiB, 200 × size), entries at most max(20,000, size / 16), and never more than the
/// host allows (default 16 GiB and 1,000,000). A 66 KB tar.zst that expands to 2 GB, or a
/// 585 KB one holding 200,000 files, is refused; real artifacts compress 2-10×.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The most bytes all entries together may hold.
    pub max_bytes: u64,
    /// The most entries (files, directories, links) the archive may hold.
    pub max_entries: u64,
}

impl UnpackLimits {
    /// The host's default caps (`--max-unpacked-bytes`, `--max-archive-entries`).
    pub const HOST_DEFAULT: UnpackLimits = UnpackLimits {
        max_bytes: 16 << 30,
        max_entries: 1_000_000,
    };
    /// Every archive may unpack to this many bytes (within the host's cap)…
    pub const MIN_BYTES: u64 = 256 << 20;
    /// …or to this many times its compressed size, whichever is more.
    pub const MAX_RATIO: u64 = 200;
    /// Every archive may hold this many entries (within the host's cap)…
    pub const MIN_ENTRIES: u64 = 20_000;
    /// …or one per this many bytes of its compressed size, whichever is more.
    pub const BYTES_PER_ENTRY: u64 = 16;

    /// The caps for an archive of `size` compressed bytes on a host whose caps are `host`.
    pub fn for_archive(size: u64, host: UnpackLimits) -> UnpackLimits {
        UnpackLimits {
            max_bytes: Self::MIN_BYTES
                .max(size.saturating_mul(Self::MAX_RATIO))
                .min(host.max_bytes),
            max_entries: Self::MIN_ENTRIES
                .max(size / Self::BYTES_PER_ENTRY)
                .min(host.max_entries),
        }
    }
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits::HOST_DEFAULT
    }
}

/// The most tar-stream bytes allowed between the end of one entry's data and the start of
/// the next's: its header plus long-name and pax records, which the tar reader holds in
/// memory. Real ones are a few KiB (PATH_MAX is 4 KiB).
const MAX_METADATA_BYTES: u64 = 256 << 10;

/// The decompressed tar stream, cut off where the entries seen so far do not account for
/// it: at most [`MAX_METADATA_BYTES`] past the end of the current entry's data.
struct Bounded<R> {
    inner: R,
    state: std::rc::Rc<std::cell::Cell<BoundedState>>,
}

#[derive(Debug, Clone, Copy)]
struct BoundedState {
    read: u64,
    allowed: u64,
    exceeded: bool,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state.get();
        let left = state.allowed.saturating_sub(state.read);
        if left == 0 {
            state.exceeded = true;
            self.state.set(state);
            return Err(io::Error::other(
                "archive metadata (long names, pax headers) too large",
            ));
        }
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        state.read += n as u64;
        self.state.set(state);
        Ok(n)
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.display().to_string();
    move |source| ArchiveError::Io { op, path, source }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub sha256: String,
    pub size: u64,
    pub files: u64,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The hex sha256 and byte count of everything written, and the inner writer.
    pub fn finish(self) -> (String, u64, W) {
        (
            crate::hex(&self.hasher.finalize()),
            self.written,
            self.inner,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }

    /// The hex sha256 and byte count of everything read so far.
    pub fn finish(self) -> (String, u64) {
        (crate::hex(&self.hasher.finalize()), self.read)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Every entry below `root`, relative, sorted by path bytes, with its metadata (not
/// following symlinks) as the walk found it.
fn sorted_entries(root: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, ArchiveError> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        let mut children: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(io_err("read directory", &dir))?
            .map(|e| e.map(|e| rel.join(e.file_name())))
            .collect::<Result<_, _>>()
            .map_err(io_err("read directory", &dir))?;
        children.sort();
        for child in children.into_iter().rev() {
            let meta = fs::symlink_metadata(root.join(&child))
                .map_err(io_err("stat", &root.join(&child)))?;
            if meta.is_dir() {
                pending.push(child.clone());
            }
            out.push((child, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A fingerprint of the tree at `root` taken from metadata alone (no file is read): every
/// entry's path, type, mode, size, modification and change times, inode and device, and
/// each symlink's target. The change time (ctime) cannot be set back by an unprivileged
/// process, so a tree whose stamp is unchanged has unchanged content, as git's index and
/// make assume. `settled`: nothing in it changed in the last 2 seconds; a stamp taken while
/// something may still be writing within the timestamps' resolution is not to be trusted
/// later ("racily clean" in git's terms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeStamp {
    pub fingerprint: String,
    pub settled: bool,
}

pub fn stamp(root: &Path) -> Result<TreeStamp, ArchiveError> {
    use std::os::unix::ffi::OsStrExt;
    let now = std::time::SystemTime::now();
    let mut hasher = Sha256::new();
    let mut settled = true;
    for (rel, m) in sorted_entries(root)? {
        hasher.update(rel.as_os_str().as_bytes());
        hasher.update([0]);
        let stamp = crate::fsutil::FileStamp::of(&m);
        for n in stamp.fields() {
            hasher.update(n.to_le_bytes());
        }
        if m.file_type().is_symlink() {
            let path = root.join(&rel);
            let target = fs::read_link(&path).map_err(io_err("read link", &path))?;
            hasher.update(target.as_os_str().as_bytes());
            hasher.update([0]);
        }
        settled &= stamp.settled(now);
    }
    Ok(TreeStamp {
        fingerprint: crate::hex(&hasher.finalize()),
        settled,
    })
}

/// Pack the directory `root` into `out` (a tar stream compressed as `format`). The same
/// tree packs to the same bytes on any machine: sorted entries, no owners or times, and
/// zstd on as many threads as there are CPUs (its multi-threaded output does not depend on
/// the number of threads). Hard links within the tree stay links.
pub fn pack(root: &Path, format: ArchiveFormat, out: impl Write) -> Result<Packed, ArchiveError> {
    // At most 8: enough for the 2-8 CPUs of build machines without zstd's per-worker
    // buffers adding up on a large one (the output is the same either way).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8) as u32);
    pack_on(root, format, out, workers)
}

fn pack_on(
    root: &Path,
    format: ArchiveFormat,
    out: impl Write,
    zstd_workers: u32,
) -> Result<Packed, ArchiveError> {
    let entries = sorted_entries(root)?;
    let hashing = HashingWriter::new(BufWriter::with_capacity(1 << 20, out));
    let out_path = Path::new("(archive)");
    let (sha256, size, files) = match format {
        ArchiveFormat::TarZst => {
            let mut encoder =
                zstd::Encoder::new(hashing, 3).map_err(io_err("compress", out_path))?;
            // Always at least one worker: zstd's output with workers differs from without.
            encoder
                .multithread(zstd_workers.max(1))
                .map_err(io_err("compress", out_path))?;
            let (encoder, files) = write_tar(root, &entries, encoder)?;
            let hashing = encoder.finish().map_err(io_err("compress", out_path))?;
            finish(hashing, files, out_path)?
        }
        ArchiveFormat::TarGz => {
            let encoder = flate2::GzBuilder::new()
                .mtime(0)
                .write(hashing, flate2::Compression::new(6));
            let (encoder, files) = write_tar(root, &entries, encoder)?;
            let hashing = encoder.finish().map_err(io_err("compress", out_path))?;
            finish(hashing, files, out_path)?
        }
    };
    Ok(Packed {
        sha256,
        size,
        files,
    })
}

fn finish<W: Write>(
    hashing: HashingWriter<BufWriter<W>>,
    files: u64,
    out_path: &Path,
) -> Result<(String, u64, u64), ArchiveError> {
    let (sha, size, mut inner) = hashing.finish();
    inner.flush().map_err(io_err("write", out_path))?;
    Ok((sha, size, files))
}

fn write_tar<W: Write>(
    root: &Path,
    entries: &[(PathBuf, fs::Metadata)],
    out: W,
) -> Result<(W, u64), ArchiveError> {
    use std::os::unix::fs::MetadataExt;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut files = 0;
    // (device, inode) of each multiply-linked file already packed → its path: later names
    // of the same file are packed as hard links to it (entries are sorted, so the target
    // comes first and is unpacked before its links).
    let mut linked: std::collections::HashMap<(u64, u64), &Path> = Default::default();
    for (rel, meta) in entries {
        let path = root.join(rel);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let ft = meta.file_type();
        let executable = meta.permissions().mode() & 0o111 != 0;
        let tar_err = io_err("archive", &path);
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, rel, io::empty())
                .map_err(tar_err)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err("read link", &path))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, rel, &target)
                .map_err(tar_err)?;
        } else if let Some(first) = (ft.is_file() && meta.nlink() > 1)
            .then(|| linked.get(&(meta.dev(), meta.ino())))
            .flatten()
        {
            header.set_entry_type(tar::EntryType::Link);
            header.set_mode(if executable { 0o755 } else { 0o644 });
            header.set_size(0);
            tar.append_link(&mut header, rel, first).map_err(tar_err)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                linked.insert((meta.dev(), meta.ino()), rel);
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if executable { 0o755 } else { 0o644 });
            header.set_size(meta.len());
            let file = File::open(&path).map_err(io_err("open", &path))?;
            tar.append_data(&mut header, rel, BufReader::new(file))
                .map_err(tar_err)?;
            files += 1;
        } else {
            return Err(ArchiveError::Unsupported {
                path: path.display().to_string(),
                reason: "only regular files, directories and symlinks can be archived".into(),
            });
        }
    }
    let out = tar
        .into_inner()
        .map_err(io_err("archive", Path::new("(archive)")))?;
    Ok((out, files))
}

/// Is `rel` a plain relative path that stays inside its root?
fn safe_relative(rel: &Path) -> bool {
    let mut depth = 0usize;
    for c in rel.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    depth > 0
}

/// Does a symlink at `link` (relative to the root) pointing to `target` stay in the tree?
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = link.components().count().saturating_sub(1) as isize;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpack an archive read from `input` into `dest` (which must exist and should be empty),
/// within `limits`. Returns the number of regular files written. On error, what was
/// written so far stays in `dest` for the caller to remove.
pub fn unpack(
    input: impl Read,
    format: ArchiveFormat,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<u64, ArchiveError> {
    let dest_err = io_err("unpack into", dest);
    match format {
        ArchiveFormat::TarZst => {
            let decoder = zstd::Decoder::new(input).map_err(dest_err)?;
            unpack_tar(decoder, dest, limits)
        }
        ArchiveFormat::TarGz => unpack_tar(flate2::read::GzDecoder::new(input), dest, limits),
    }
}

fn unpack_tar(input: impl Read, dest: &Path, limits: UnpackLimits) -> Result<u64, ArchiveError> {
    let state = std::rc::Rc::new(std::cell::Cell::new(BoundedState {
        read: 0,
        allowed: MAX_METADATA_BYTES,
        exceeded: false,
    }));
    let bounded = Bounded {
        inner: input,
        state: state.clone(),
    };
    let mut last_entry = String::from("(the first)");
    let result = unpack_entries(bounded, dest, limits, &state, &mut last_entry);
    if state.get().exceeded {
        return Err(ArchiveError::Unsafe {
            entry: last_entry,
            reason: format!(
                "more than {MAX_METADATA_BYTES} bytes of metadata (long names, pax headers) after it"
            ),
        });
    }
    result
}

fn unpack_entries<R: Read>(
    input: Bounded<R>,
    dest: &Path,
    limits: UnpackLimits,
    state: &std::cell::Cell<BoundedState>,
    last_entry: &mut String,
) -> Result<u64, ArchiveError> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    let mut files = 0;
    let (mut entries, mut bytes) = (0u64, 0u64);
    for entry in archive.entries().map_err(io_err("read archive", dest))? {
        let mut entry = entry.map_err(io_err("read archive", dest))?;
        let path = entry
            .path()
            .map_err(io_err("read archive", dest))?
            .into_owned();
        *last_entry = path.display().to_string();
        // This entry's data is accounted for; after it, only the next header and its
        // metadata may come before the next entry.
        let mut s = state.get();
        s.allowed = (entry.raw_file_position() + entry.size().div_ceil(512) * 512)
            .saturating_add(MAX_METADATA_BYTES);
        state.set(s);
        entries += 1;
        if entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        bytes = bytes.saturating_add(entry.size());
        if bytes > limits.max_bytes {
            return Err(ArchiveError::TooManyBytes {
                limit: limits.max_bytes,
                entry: path.display().to_string(),
            });
        }
        let refuse = |reason: &str| ArchiveError::Unsafe {
            entry: path.display().to_string(),
            reason: reason.to_owned(),
        };
        if !safe_relative(&path) {
            return Err(refuse("absolute path or '..' component"));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => files += 1,
            tar::EntryType::Directory => {}
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io_err("read archive", dest))?
                    .ok_or_else(|| refuse("symlink without a target"))?;
                if !link_stays_inside(&path, &target) {
                    return Err(refuse(&format!(
                        "symlink to {} leaves the artifact",
                        target.display()
                    )));
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(io_err("read archive", dest))?
                    .ok_or_else(|| refuse("hard link without a target"))?;
                if !safe_relative(&target) {
                    return Err(refuse("hard link target outside the artifact"));
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => return Err(refuse(&format!("entry type {other:?} is not allowed"))),
        }
        let executable = entry
            .header()
            .mode()
            .map(|m| m & 0o111 != 0)
            .unwrap_or(false);
        // unpack_in also refuses entries whose parent resolves outside `dest` through a
        // symlink unpacked earlier.
        let written = entry
            .unpack_in(dest)
            .map_err(io_err("unpack", &dest.join(&path)))?;
        if !written {
            return Err(refuse("would be written outside the target directory"));
        }
        if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            let full = dest.join(&path);
            let mode = if executable { 0o755 } else { 0o644 };
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &full))?;
        }
    }
    Ok(files)
}

/// Give this user write and search permission on every directory under `root` (symlinks
/// are not followed), so the tree can be removed whatever modes its entries had. Best
/// effort: errors are ignored, the removal that follows reports what is left.
pub fn open_up(root: &Path) {
    let Ok(meta) = fs::symlink_metadata(root) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        open_up(&entry.path());
    }
}

/// Make a tree read-only (files 0444/0555, directories 0555), as an installed artifact is.
pub fn make_read_only(root: &Path) -> Result<(), ArchiveError> {
    for (rel, meta) in sorted_entries(root)?.iter().rev() {
        let path = root.join(rel);
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        let ro = if meta.is_dir() || mode & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(ro))
            .map_err(io_err("chmod", &path))?;
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o555)).map_err(io_err("chmod", root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("share/doc")).unwrap();
        fs::write(dir.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(dir.join("bin/app"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(dir.join("share/doc/README"), b"docs").unwrap();
        symlink("../share/doc/README", dir.join("bin/readme")).unwrap();
    }

    fn packed(dir: &Path, format: ArchiveFormat) -> (Vec<u8>, Packed) {
        let mut out = Vec::new();
        let p = pack(dir, format, &mut out).unwrap();
        (out, p)
    }

    #[test]
    fn multithreaded_packing_gives_the_same_bytes_whatever_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        // 24 MiB of compressible text: several zstd jobs, so the workers really split it.
        let mut text = Vec::with_capacity(24 << 20);
        let mut x: u64 = 1;
        while text.len() < 24 << 20 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.extend_from_slice(format!("line {} of {}\n", x >> 40, x % 1000).as_bytes());
        }
        fs::write(dir.path().join("data"), &text).unwrap();
        let on = |workers| {
            let mut out = Vec::new();
            pack_on(dir.path(), ArchiveFormat::TarZst, &mut out, workers).unwrap();
            out
        };
        let one = on(1);
        assert!(one.len() < text.len() / 2, "compressed: {}", one.len());
        assert_eq!(on(2), one);
        assert_eq!(on(4), one);
        assert_eq!(
            on(0),
            one,
            "0 means one worker, not the single-threaded format"
        );
    }

    #[test]
    fn hard_links_are_packed_once_and_unpacked_as_links() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("lib")).unwrap();
        let blob: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        fs::write(dir.path().join("lib/a.so"), &blob).unwrap();
        fs::hard_link(dir.path().join("lib/a.so"), dir.path().join("lib/b.so")).unwrap();
        fs::hard_link(dir.path().join("lib/a.so"), dir.path().join("z.so")).unwrap();
        let (bytes, p) = packed(dir.path(), ArchiveFormat::TarZst);
        // One copy of the megabyte, not three.
        assert!(p.size < 2 * blob.len() as u64, "{} bytes", p.size);
        let mut kinds = Vec::new();
        let mut tar = tar::Archive::new(zstd::Decoder::new(&bytes[..]).unwrap());
        for e in tar.entries().unwrap() {
            let e = e.unwrap();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            kinds.push((
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
                link,
            ));
        }
        use tar::EntryType::{Directory, Link, Regular};
        assert_eq!(
            kinds,
            [
                ("lib".into(), Directory, None),
                ("lib/a.so".into(), Regular, None),
                ("lib/b.so".into(), Link, Some("lib/a.so".into())),
                ("z.so".into(), Link, Some("lib/a.so".into())),
            ]
        );
        let out = tempfile::tempdir().unwrap();
        unpack(
            &bytes[..],
            ArchiveFormat::TarZst,
            out.path(),
            UnpackLimits::for_archive(p.size, UnpackLimits::HOST_DEFAULT),
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        let a = fs::metadata(out.path().join("lib/a.so")).unwrap();
        assert_eq!(a.nlink(), 3);
        assert_eq!(
            fs::metadata(out.path().join("z.so")).unwrap().ino(),
            a.ino()
        );
        assert_eq!(fs::read(out.path().join("lib/b.so")).unwrap(), blob);
    }

    #[test]
    fn packing_is_deterministic_and_hashed_in_the_same_pass() {
        for format in [ArchiveFormat::TarZst, ArchiveFormat::TarGz] {
            let a = tempfile::tempdir().unwrap();
            let b = tempfile::tempdir().unwrap();
            sample(a.path());
            sample(b.path());
            // Different mtimes and modes that normalise the same way.
            fs::set_permissions(b.path().join("bin/app"), fs::Permissions::from_mode(0o755))
                .unwrap();
            let (bytes_a, pa) = packed(a.path(), format);
            let (bytes_b, pb) = packed(b.path(), format);
            assert_eq!(bytes_a, bytes_b, "{format:?}");
            assert_eq!(pa, pb);
            assert_eq!(pa.sha256, crate::hex(&Sha256::digest(&bytes_a)));
            assert_eq!(pa.size, bytes_a.len() as u64);
            assert_eq!(pa.files, 2);
            fs::write(b.path().join("share/doc/README"), b"docs!").unwrap();
            assert_ne!(packed(b.path(), format).1.sha256, pa.sha256);
        }
    }

    #[test]
    fn round_trip_keeps_content_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let (bytes, _) = packed(src.path(), ArchiveFormat::TarZst);
        let dest = tempfile::tempdir().unwrap();
        assert_eq!(
            unpack(
                &bytes[..],
                ArchiveFormat::TarZst,
                dest.path(),
                UnpackLimits::default()
            )
            .unwrap(),
            2
        );
        assert_eq!(
            fs::read(dest.path().join("bin/app")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = fs::metadata(dest.path().join("bin/app"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read(dest.path().join("bin/readme")).unwrap(), b"docs");
        make_read_only(dest.path()).unwrap();
        let mode = fs::metadata(dest.path().join("share/doc/README"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        let mode = fs::metadata(dest.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
        // Let the temp dir clean up.
        for p in [
            dest.path().to_path_buf(),
            dest.path().join("bin"),
            dest.path().join("share"),
            dest.path().join("share/doc"),
        ] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// A hand-built tar with one entry, to craft what `pack` would never write.
    fn evil_tar(path: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(if kind == tar::EntryType::Regular {
            4
        } else {
            0
        });
        header.set_mode(0o644);
        {
            // Write the raw name so the builder's own checks do not stop us.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
        }
        if let Some(l) = link {
            header.set_link_name(l).unwrap();
        }
        header.set_cksum();
        let mut out = Vec::new();
        out.extend_from_slice(header.as_bytes());
        if kind == tar::EntryType::Regular {
            let mut block = [0u8; 512];
            block[..4].copy_from_slice(b"evil");
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&[0u8; 1024]);
        let mut compressed = Vec::new();
        let mut enc = flate2::write::GzEncoder::new(&mut compressed, flate2::Compression::fast());
        enc.write_all(&out).unwrap();
        enc.finish().unwrap();
        compressed
    }

    #[test]
    fn escaping_entries_are_refused() {
        let cases = [
            ("../escape", tar::EntryType::Regular, None),
            ("/abs/escape", tar::EntryType::Regular, None),
            ("a/../../escape", tar::EntryType::Regular, None),
            ("link", tar::EntryType::Symlink, Some("/etc/passwd")),
            ("dir/link", tar::EntryType::Symlink, Some("../../outside")),
            ("hard", tar::EntryType::Link, Some("/etc/passwd")),
            ("dev", tar::EntryType::Char, None),
            ("fifo", tar::EntryType::Fifo, None),
        ];
        for (path, kind, link) in cases {
            let outer = tempfile::tempdir().unwrap();
            let dest = outer.path().join("dest");
            fs::create_dir(&dest).unwrap();
            let tar = evil_tar(path, kind, link);
            let err = unpack(
                &tar[..],
                ArchiveFormat::TarGz,
                &dest,
                UnpackLimits::default(),
            )
            .unwrap_err();
            assert!(matches!(err, ArchiveError::Unsafe { .. }), "{path}: {err}");
            assert!(!outer.path().join("escape").exists());
            assert_eq!(
                fs::read_dir(outer.path()).unwrap().count(),
                1,
                "{path}: nothing beside dest"
            );
        }
    }

    #[test]
    fn a_symlink_then_a_file_through_it_is_refused() {
        // Two entries: `d -> .` (inside, allowed) is fine, but `x -> ..` is not.
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let tar = evil_tar("x", tar::EntryType::Symlink, Some(".."));
        assert!(
            unpack(
                &tar[..],
                ArchiveFormat::TarGz,
                &dest,
                UnpackLimits::default()
            )
            .is_err()
        );
        assert!(link_stays_inside(Path::new("d"), Path::new(".")));
        assert!(link_stays_inside(Path::new("bin/x"), Path::new("../lib/x")));
        assert!(!link_stays_inside(Path::new("bin/x"), Path::new("../../x")));
    }

    /// A tar.zst built entry by entry, as an attacker would: `add` appends to the builder.
    fn zstd_tar(add: impl FnOnce(&mut tar::Builder<zstd::Encoder<'static, Vec<u8>>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(zstd::Encoder::new(Vec::new(), 3).unwrap());
        add(&mut builder);
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn file_header(size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    fn written(dir: &Path) -> (u64, u64) {
        let (mut files, mut bytes) = (0, 0);
        for (_, meta) in sorted_entries(dir).unwrap() {
            if meta.is_file() {
                files += 1;
                bytes += meta.len();
            }
        }
        (files, bytes)
    }

    #[test]
    fn limits_follow_the_declared_size_within_the_host_caps() {
        let host = UnpackLimits::HOST_DEFAULT;
        // The bombs the issue found: 66 KB -> 2.1 GB and 585 KB -> 200,000 files.
        let small = UnpackLimits::for_archive(66_000, host);
        assert_eq!(small.max_bytes, 256 << 20);
        assert!(small.max_bytes < 2_100_000_000);
        let many = UnpackLimits::for_archive(585_000, host);
        assert!(many.max_entries < 200_000, "{many:?}");
        // A 100 MB artifact may unpack to 20 GB, but the host caps it at 16 GiB.
        let large = UnpackLimits::for_archive(100_000_000, host);
        assert_eq!(large.max_bytes, 16 << 30);
        assert_eq!(
            UnpackLimits::for_archive(u64::MAX, host),
            UnpackLimits::HOST_DEFAULT
        );
        let strict = UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 10,
        };
        assert_eq!(UnpackLimits::for_archive(66_000, strict), strict);
    }

    #[test]
    fn a_small_archive_that_expands_past_the_cap_is_refused_before_writing_it() {
        // 512 MiB of zeros in one entry: the archive is a few tens of KB.
        let bomb = zstd_tar(|b| {
            let size = 512u64 << 20;
            b.append(&file_header(size), io::repeat(0).take(size))
                .unwrap();
        });
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let dest = tempfile::tempdir().unwrap();
        let limits = UnpackLimits::for_archive(bomb.len() as u64, UnpackLimits::HOST_DEFAULT);
        let err = unpack(&bomb[..], ArchiveFormat::TarZst, dest.path(), limits).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyBytes { .. }), "{err}");
        assert!(err.to_string().contains("--max-unpacked-bytes"), "{err}");
        assert_eq!(written(dest.path()), (0, 0), "refused before writing");
    }

    #[test]
    fn bytes_are_counted_across_entries() {
        // Three 1 MiB files against a 2.5 MiB cap: the third is refused.
        let archive = zstd_tar(|b| {
            for i in 0..3 {
                let mut h = file_header(1 << 20);
                b.append_data(&mut h, format!("f{i}"), io::repeat(b'x').take(1 << 20))
                    .unwrap();
            }
        });
        let dest = tempfile::tempdir().unwrap();
        let limits = UnpackLimits {
            max_bytes: 5 << 19,
            max_entries: 100,
        };
        let err = unpack(&archive[..], ArchiveFormat::TarZst, dest.path(), limits).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::TooManyBytes { entry, .. } if entry == "f2"),
            "{err}"
        );
        assert_eq!(written(dest.path()), (2, 2 << 20));
        // The same archive within a cap that fits it.
        let dest = tempfile::tempdir().unwrap();
        let fits = UnpackLimits {
            max_bytes: 3 << 20,
            max_entries: 3,
        };
        assert_eq!(
            unpack(&archive[..], ArchiveFormat::TarZst, dest.path(), fits).unwrap(),
            3
        );
    }

    #[test]
    fn an_archive_of_many_tiny_entries_is_refused_at_the_entry_cap() {
        let bomb = zstd_tar(|b| {
            for i in 0..2_000 {
                let mut h = file_header(0);
                b.append_data(&mut h, format!("d/{i}"), io::empty())
                    .unwrap();
            }
        });
        let limits = UnpackLimits {
            max_entries: 1_500,
            ..UnpackLimits::default()
        };
        let dest = tempfile::tempdir().unwrap();
        let err = unpack(&bomb[..], ArchiveFormat::TarZst, dest.path(), limits).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyEntries { .. }), "{err}");
        assert!(err.to_string().contains("--max-archive-entries"), "{err}");
        assert_eq!(written(dest.path()).0, limits.max_entries);
    }

    #[test]
    fn huge_metadata_between_entries_is_cut_off() {
        // A 4 MiB pax header (it could be gigabytes): the tar reader holds it in memory.
        let bomb = zstd_tar(|b| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(4 << 20);
            h.set_mode(0o644);
            h.set_path("pax").unwrap();
            h.set_cksum();
            b.append(&h, io::repeat(b'a').take(4 << 20)).unwrap();
            let mut f = file_header(1);
            b.append_data(&mut f, "after", &b"x"[..]).unwrap();
        });
        let dest = tempfile::tempdir().unwrap();
        let err = unpack(
            &bomb[..],
            ArchiveFormat::TarZst,
            dest.path(),
            UnpackLimits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("metadata"), "{err}");
    }
}
