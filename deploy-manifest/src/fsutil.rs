//! Local files that must never be seen half-written.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What `stat` says of a file that changes whenever its content may have: mode, size,
/// mtime, ctime, inode and device. The change time cannot be set back by a process (any
/// write, rename or chmod moves it on), so an unchanged stamp means unchanged content, as
/// git's index and make assume, provided the stamp was [`FileStamp::settled`] when taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp([i64; 8]);

impl FileStamp {
    pub fn of(m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp([
            m.mode() as i64,
            m.size() as i64,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino() as i64,
            m.dev() as i64,
        ])
    }

    /// The fields, to hash.
    pub fn fields(&self) -> [i64; 8] {
        self.0
    }

    /// Nothing changed the file in the 2 s before `now`: within the timestamps' resolution
    /// a write may still land without moving them, so a stamp taken earlier is not to be
    /// trusted later ("racily clean" in git's terms).
    pub fn settled(&self, now: std::time::SystemTime) -> bool {
        let nanos = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        let [_, _, mtime, mtime_ns, ctime, ctime_ns, ..] = self.0;
        nanos(mtime, mtime_ns).max(nanos(ctime, ctime_ns)) < now - 2_000_000_000
    }
}

/// Write `bytes` to `path` so that readers see the old content or the new, never a part,
/// even across a crash: temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, bytes, mode)?;
    File::open(path.parent().unwrap_or_else(|| Path::new(".")))?.sync_all()
}

/// [`write_atomically`] but for the last step: the file is written and synced under a
/// temp name and renamed into place; the rename is durable once the caller syncs the
/// directory (once for many files).
pub fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A private directory for a local cache: `$DEPLOY_CACHE_DIR/<sub>`, else
/// `$XDG_CACHE_HOME/deployer/<sub>`, else `~/.cache/deployer/<sub>`; created 0700. `None`
/// (with a warning) when there is no such place or it is not a directory of this user:
/// another user could otherwise feed it or read it.
pub fn private_cache_dir(sub: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    use std::path::PathBuf;
    let base = std::env::var_os("DEPLOY_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("deployer")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/deployer")))?;
    let dir = base.join(sub);
    let ready = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .and_then(|()| fs::symlink_metadata(&dir));
    match ready {
        Ok(m) if m.is_dir() && m.uid() == rustix::process::geteuid().as_raw() => {
            if m.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).ok()?;
            }
            Some(dir)
        }
        Ok(_) => {
            tracing::warn!(dir = %dir.display(), "not using this cache: not a directory of this user");
            None
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "not using this cache");
            None
        }
    }
}
