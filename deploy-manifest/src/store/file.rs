//! `file:///path`: a local directory with the store layout.
//!
//! Writes go to a temporary file in the target's directory, are fsynced and renamed into
//! place, so a reader never sees half an object. Conditional writes hold an exclusive
//! `flock` on `<root>/.lock` while they compare and rename, which makes compare-and-swap
//! atomic between processes on the host. The ETag is the quoted sha256 of the content.
//!
//! Whoever can write the store may be an attacker, and the agent runs as root: no
//! operation follows a symlink inside the store. A key's directories are opened one by one
//! from the root with `O_NOFOLLOW` (and created the same way, with `mkdirat`), and the final
//! name is opened with `O_NOFOLLOW` or replaced by `renameat` within the directory already
//! opened, so a symlinked directory or file is refused ([`StoreError::Unsafe`]) instead of
//! being written through. The root itself is the operator's and may be a symlink.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::{
    Downloaded, Fetched, ObjectStore, Precondition, Progress, StoreError, Transfer, check_key,
    copy_hashed, max_object_bytes, too_large,
};

const LOCK_FILE: &str = ".lock";
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct FileStore {
    url: String,
    root: PathBuf,
}

/// A key's directory, opened without following symlinks, and the key's last segment.
struct Parent {
    dir: OwnedFd,
    name: String,
}

impl FileStore {
    /// Open `file:///absolute/path`; the directory is created on first write.
    pub fn open(url: &str) -> Result<FileStore, StoreError> {
        let invalid = |reason: &str| StoreError::invalid_url(url, reason);
        let path = url
            .strip_prefix("file://")
            .ok_or_else(|| invalid("expected file:///absolute/path"))?;
        if !path.starts_with('/') {
            return Err(invalid("the path must be absolute: file:///absolute/path"));
        }
        if path.split('/').any(|s| s == "..") {
            return Err(invalid("'..' is not allowed in the path"));
        }
        let root = PathBuf::from(path.trim_end_matches('/'));
        let root = if root.as_os_str().is_empty() {
            PathBuf::from("/")
        } else {
            root
        };
        Ok(FileStore {
            url: url.to_owned(),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.display().to_string();
        move |source| StoreError::Io { op, path, source }
    }

    fn unsafe_path(&self, op: &'static str, key: &str, reason: String) -> StoreError {
        StoreError::Unsafe {
            op,
            url: self.url.clone(),
            key: key.to_owned(),
            reason,
        }
    }

    /// The store's root directory; `None` if it does not exist and `create` is false.
    fn open_root(&self, create: bool) -> Result<Option<OwnedFd>, StoreError> {
        if create {
            std::fs::create_dir_all(&self.root)
                .map_err(Self::io("create directory", &self.root))?;
        }
        match rustix::fs::open(
            &self.root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) if !create => Ok(None),
            Err(e) => Err(Self::io("open", &self.root)(e.into())),
        }
    }

    /// Open the directory that holds `key`, one segment at a time from the root, refusing
    /// any segment that is a symlink or not a directory. With `create`, missing directories
    /// are made (0755); without, a missing one gives `None`.
    fn parent(
        &self,
        op: &'static str,
        key: &str,
        create: bool,
    ) -> Result<Option<Parent>, StoreError> {
        check_key(key)?;
        let Some(mut dir) = self.open_root(create)? else {
            return Ok(None);
        };
        let segments: Vec<&str> = key.split('/').collect();
        let (name, dirs) = segments.split_last().expect("a key has a segment");
        let mut walked = PathBuf::new();
        for segment in dirs {
            walked.push(segment);
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let opened = match rustix::fs::openat(&dir, *segment, flags, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&dir, *segment, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(Self::io("create directory", &self.root.join(&walked))(
                                e.into(),
                            ));
                        }
                    }
                    rustix::fs::openat(&dir, *segment, flags, Mode::empty())
                }
                other => other,
            };
            dir = match opened {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(self.unsafe_path(
                        op,
                        key,
                        format!("{} is a symlink or not a directory", walked.display()),
                    ));
                }
                Err(e) => return Err(Self::io("open", &self.root.join(&walked))(e.into())),
            };
        }
        Ok(Some(Parent {
            dir,
            name: (*name).to_owned(),
        }))
    }

    /// [`Self::parent`], creating what is missing.
    fn parent_for_write(&self, key: &str) -> Result<Parent, StoreError> {
        self.parent("write", key, true)?.ok_or_else(|| {
            Self::io("create directory", &self.root.join(key))(ErrorKind::NotFound.into())
        })
    }

    /// Open `key` for reading without following a symlink; `None` if it does not exist.
    /// Anything but a regular file is refused (a FIFO would block a reader forever).
    fn open_object(&self, op: &'static str, key: &str) -> Result<Option<(File, u64)>, StoreError> {
        let Some(parent) = self.parent(op, key, false)? else {
            return Ok(None);
        };
        let path = self.root.join(key);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&parent.dir, &parent.name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => {
                return Err(self.unsafe_path(op, key, format!("{key} is a symlink")));
            }
            Err(e) => return Err(Self::io("open", &path)(e.into())),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| Self::io("stat", &path)(e.into()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(self.unsafe_path(op, key, format!("{key} is not a regular file")));
        }
        Ok(Some((File::from(fd), stat.st_size as u64)))
    }

    fn get_blocking(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        let Some((file, size)) = self.open_object("read", key)? else {
            return Ok(Fetched::NotFound);
        };
        let bytes = self.read_small(key, file, size)?;
        let etag = etag_of(&bytes);
        if if_none_match == Some(etag.as_str()) {
            return Ok(Fetched::NotModified);
        }
        Ok(Fetched::Found { bytes, etag })
    }

    /// Read a small object whole, refusing it over the cap (by its size, then while reading,
    /// as it may grow).
    fn read_small(&self, key: &str, file: File, size: u64) -> Result<Vec<u8>, StoreError> {
        let limit = max_object_bytes();
        if size > limit {
            return Err(too_large(&self.url, key, limit, size, true));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(Self::io("read", &self.root.join(key)))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(&self.url, key, limit, bytes.len() as u64, false));
        }
        Ok(bytes)
    }

    fn put_blocking(
        &self,
        key: &str,
        bytes: &[u8],
        precondition: &Precondition,
    ) -> Result<String, StoreError> {
        let path = self.path_of(key)?;
        let parent = self.parent_for_write(key)?;
        let _lock = self.lock()?;
        match precondition {
            Precondition::None => {}
            Precondition::IfAbsent => {
                match rustix::fs::statat(&parent.dir, &parent.name, AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => {}
                    Ok(_) => {
                        return Err(StoreError::PreconditionFailed {
                            key: key.to_owned(),
                        });
                    }
                    Err(e) => return Err(Self::io("stat", &path)(e.into())),
                }
            }
            Precondition::IfMatch(expected) => {
                let current = match self.open_object("write", key)? {
                    Some((file, size)) => Some(etag_of(&self.read_small(key, file, size)?)),
                    None => None,
                };
                if current.as_deref() != Some(expected.as_str()) {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_owned(),
                    });
                }
            }
        }
        let (tmp_name, mut tmp) = self.create_temp(&parent, key)?;
        let written = std::io::Write::write_all(&mut tmp, bytes)
            .and_then(|()| tmp.sync_all())
            .map_err(Self::io("write", &path));
        drop(tmp);
        written
            .and_then(|()| self.rename_into(&parent, &tmp_name, key))
            .inspect_err(|_| {
                let _ = rustix::fs::unlinkat(&parent.dir, &tmp_name, AtFlags::empty());
            })?;
        Ok(etag_of(bytes))
    }

    /// A new, empty 0644 file beside `parent.name`, created exclusively (never through a
    /// symlink); its name and the open file.
    fn create_temp(&self, parent: &Parent, key: &str) -> Result<(String, File), StoreError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir_path = self.root.join(key);
        let dir_path = dir_path.parent().unwrap_or(&self.root);
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default();
            let name = format!(
                "{TEMP_PREFIX}{}-{}-{nanos:x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&parent.dir, &name, flags, Mode::from_raw_mode(0o644)) {
                Ok(fd) => {
                    // The umask may have taken bits away: readers of the store need 0644.
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o644))
                        .map_err(|e| Self::io("chmod", &dir_path.join(&name))(e.into()))?;
                    return Ok((name, File::from(fd)));
                }
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    return Err(Self::io("create temporary file in", dir_path)(e.into()));
                }
            }
        }
    }

    /// Rename the temporary `tmp_name` over `parent.name` (which, if it is a symlink, is
    /// replaced, not followed) and make the rename durable.
    fn rename_into(&self, parent: &Parent, tmp_name: &str, key: &str) -> Result<(), StoreError> {
        let path = self.root.join(key);
        rustix::fs::renameat(&parent.dir, tmp_name, &parent.dir, &parent.name)
            .map_err(|e| Self::io("rename into", &path)(e.into()))?;
        rustix::fs::fsync(&parent.dir)
            .map_err(|e| Self::io("fsync", path.parent().unwrap_or(&self.root))(e.into()))
    }

    /// An exclusive lock on the store, held until the returned file is dropped.
    fn lock(&self) -> Result<File, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let root = self.open_root(true)?.expect("created");
        let fd = match rustix::fs::openat(
            &root,
            LOCK_FILE,
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => {
                return Err(self.unsafe_path(
                    "lock",
                    LOCK_FILE,
                    format!("{LOCK_FILE} is a symlink"),
                ));
            }
            Err(e) => return Err(Self::io("open lock", &path)(e.into())),
        };
        let file = File::from(fd);
        file.lock().map_err(Self::io("lock", &path))?;
        Ok(file)
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(Self::io("list", &dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == LOCK_FILE || name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let path = entry.path();
                // Does not follow symlinks: a symlinked directory is not listed through.
                let file_type = entry.file_type().map_err(Self::io("stat", &path))?;
                if file_type.is_dir() {
                    pending.push(path);
                } else if file_type.is_file() {
                    let rel = path.strip_prefix(&self.root).expect("below the root");
                    let key = rel.to_string_lossy().into_owned();
                    if key.starts_with(prefix) {
                        keys.push(key);
                    }
                }
            }
        }
        Ok(keys)
    }

    fn head_blocking(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let Some(parent) = self.parent("stat", key, false)? else {
            return Ok(None);
        };
        match rustix::fs::statat(&parent.dir, &parent.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => Ok(Some(stat.st_size as u64)),
                FileType::Symlink => {
                    Err(self.unsafe_path("stat", key, format!("{key} is a symlink")))
                }
                _ => Ok(None),
            },
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(Self::io("stat", &self.root.join(key))(e.into())),
        }
    }

    fn delete_blocking(&self, key: &str) -> Result<(), StoreError> {
        let Some(parent) = self.parent("delete", key, false)? else {
            return Ok(());
        };
        // unlinkat removes a symlink itself, never what it points to.
        match rustix::fs::unlinkat(&parent.dir, &parent.name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(Self::io("remove", &self.root.join(key))(e.into())),
        }
    }
}

/// The file store's ETag: the quoted sha256 of the content.
pub(crate) fn etag_of(bytes: &[u8]) -> String {
    format!("\"{}\"", crate::hex(&Sha256::digest(bytes)))
}

impl ObjectStore for FileStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        let (this, key, inm) = (
            self.clone(),
            key.to_owned(),
            if_none_match.map(str::to_owned),
        );
        blocking(move || this.get_blocking(&key, inm.as_deref())).await
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> Result<String, StoreError> {
        let (this, key) = (self.clone(), key.to_owned());
        blocking(move || this.put_blocking(&key, &bytes, &precondition)).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let (this, key) = (self.clone(), key.to_owned());
        blocking(move || this.head_blocking(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_owned());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.to_owned());
        blocking(move || this.delete_blocking(&key)).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let target = self.path_of(key)?;
        let (this, owned_key) = (self.clone(), key.to_owned());
        let (parent, tmp_name, tmp) = blocking(move || {
            let parent = this.parent_for_write(&owned_key)?;
            let (name, file) = this.create_temp(&parent, &owned_key)?;
            Ok((parent, name, file))
        })
        .await?;
        let copied = async {
            let source = tokio::fs::File::open(path)
                .await
                .map_err(Self::io("open", path))?;
            let transfer = Transfer {
                url: &self.url,
                key,
                max_bytes: None,
            };
            let mut tmp = tokio::fs::File::from_std(tmp);
            copy_hashed(source, &mut tmp, progress, &transfer).await?;
            tmp.sync_all().await.map_err(Self::io("fsync", &target))?;
            let this = self.clone();
            let (key, name) = (key.to_owned(), tmp_name.clone());
            let parent_fd = parent.dir.try_clone().map_err(Self::io("open", &target))?;
            let parent = Parent {
                dir: parent_fd,
                name: parent.name.clone(),
            };
            blocking(move || this.rename_into(&parent, &name, &key)).await
        }
        .await;
        if copied.is_err() {
            let _ = rustix::fs::unlinkat(&parent.dir, &tmp_name, AtFlags::empty());
        }
        copied
    }

    async fn get_into(
        &self,
        key: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> Result<Option<Downloaded>, StoreError> {
        let (this, owned_key) = (self.clone(), key.to_owned());
        let Some((source, size)) = blocking(move || this.open_object("read", &owned_key)).await?
        else {
            return Ok(None);
        };
        let transfer = Transfer {
            url: &self.url,
            key,
            max_bytes,
        };
        transfer.check_announced(size)?;
        copy_hashed(tokio::fs::File::from_std(source), out, progress, &transfer)
            .await
            .map(Some)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a file store task does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store", dir.path().display());
        (dir, FileStore::open(&url).unwrap())
    }

    #[tokio::test]
    async fn conditional_writes_compare_and_swap() {
        let (_d, s) = store();
        assert_eq!(s.get("m.json", None).await.unwrap(), Fetched::NotFound);
        let e1 = s
            .put("m.json", b"one".to_vec(), Precondition::IfAbsent)
            .await
            .unwrap();
        assert!(matches!(
            s.put("m.json", b"x".to_vec(), Precondition::IfAbsent).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        let e2 = s
            .put("m.json", b"two".to_vec(), Precondition::IfMatch(e1.clone()))
            .await
            .unwrap();
        assert!(matches!(
            s.put(
                "m.json",
                b"three".to_vec(),
                Precondition::IfMatch(e1.clone())
            )
            .await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        assert_eq!(
            s.get("m.json", Some(&e2)).await.unwrap(),
            Fetched::NotModified
        );
        assert_eq!(
            s.get("m.json", Some(&e1)).await.unwrap(),
            Fetched::Found {
                bytes: b"two".to_vec(),
                etag: e2
            }
        );
    }

    #[tokio::test]
    async fn list_finds_nested_keys_but_not_temp_files() {
        let (_d, s) = store();
        s.put("manifests/a.json", b"a".to_vec(), Precondition::None)
            .await
            .unwrap();
        s.put("manifests/b.json", b"b".to_vec(), Precondition::None)
            .await
            .unwrap();
        s.put("manifest.json", b"m".to_vec(), Precondition::None)
            .await
            .unwrap();
        fs::write(s.root().join("manifests/.tmp-x"), b"partial").unwrap();
        let mut keys = s.list("manifests/").await.unwrap();
        keys.sort();
        assert_eq!(keys, ["manifests/a.json", "manifests/b.json"]);
        assert_eq!(s.head("manifest.json").await.unwrap(), Some(1));
        s.delete("manifest.json").await.unwrap();
        s.delete("manifest.json").await.unwrap();
        assert_eq!(s.head("manifest.json").await.unwrap(), None);
    }

    #[tokio::test]
    async fn written_objects_are_world_readable() {
        let (_d, s) = store();
        s.put("manifest.json", b"{}".to_vec(), Precondition::None)
            .await
            .unwrap();
        let mode = fs::metadata(s.root().join("manifest.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn relative_or_dotdot_urls_are_refused() {
        assert!(FileStore::open("file://relative/dir").is_err());
        assert!(FileStore::open("file:///a/../b").is_err());
        assert!(FileStore::open("file:///srv/store/").is_ok());
    }

    /// An attacker with write access to the store links a directory or a file in it to a
    /// place outside: no write, delete or read goes through the link.
    #[tokio::test]
    async fn symlinks_inside_the_store_are_never_followed() {
        let (d, s) = store();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim.json"), b"precious").unwrap();
        s.put("manifest.json", b"{}".to_vec(), Precondition::None)
            .await
            .unwrap();
        symlink(&outside, s.root().join("status")).unwrap();
        for result in [
            s.put("status/victim.json", b"x".to_vec(), Precondition::None)
                .await
                .map(drop),
            s.put("status/new.json", b"x".to_vec(), Precondition::IfAbsent)
                .await
                .map(drop),
            s.put("status/deeper/new.json", b"x".to_vec(), Precondition::None)
                .await
                .map(drop),
            s.delete("status/victim.json").await,
            s.get("status/victim.json", None).await.map(drop),
            s.head("status/victim.json").await.map(drop),
        ] {
            let e = result.unwrap_err();
            assert!(matches!(e, StoreError::Unsafe { .. }), "{e}");
            assert!(e.to_string().contains("status is a symlink"), "{e}");
        }
        let local = d.path().join("local");
        let e = s
            .get_to_file("status/victim.json", &local, &(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unsafe { .. }), "{e}");
        let src = d.path().join("src");
        fs::write(&src, b"payload").unwrap();
        let e = s
            .put_file("status/victim.json", &src, &())
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unsafe { .. }), "{e}");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing new outside"
        );
        assert_eq!(fs::read(outside.join("victim.json")).unwrap(), b"precious");

        // A symlinked file: a read is refused; a write replaces the link, not its target.
        fs::remove_file(s.root().join("status")).unwrap();
        fs::create_dir(s.root().join("status")).unwrap();
        symlink(
            outside.join("victim.json"),
            s.root().join("status/biz.json"),
        )
        .unwrap();
        let e = s.get("status/biz.json", None).await.unwrap_err();
        assert!(
            e.to_string().contains("status/biz.json is a symlink"),
            "{e}"
        );
        assert!(matches!(
            s.put(
                "status/biz.json",
                b"x".to_vec(),
                Precondition::IfMatch("\"x\"".into())
            )
            .await,
            Err(StoreError::Unsafe { .. })
        ));
        s.put("status/biz.json", b"report".to_vec(), Precondition::None)
            .await
            .unwrap();
        assert_eq!(fs::read(outside.join("victim.json")).unwrap(), b"precious");
        assert!(
            !fs::symlink_metadata(s.root().join("status/biz.json"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            s.get("status/biz.json", None).await.unwrap(),
            Fetched::Found {
                bytes: b"report".to_vec(),
                etag: etag_of(b"report")
            }
        );

        // The lock file as a symlink is refused too (a conditional write opens it).
        fs::remove_file(s.root().join(".lock")).unwrap();
        symlink(outside.join("lock"), s.root().join(".lock")).unwrap();
        assert!(matches!(
            s.put("m.json", b"x".to_vec(), Precondition::IfAbsent).await,
            Err(StoreError::Unsafe { .. })
        ));
        assert!(!outside.join("lock").exists());
    }

    #[tokio::test]
    async fn a_fifo_in_the_store_is_refused_not_waited_on() {
        let (_d, s) = store();
        s.put("manifest.json", b"{}".to_vec(), Precondition::None)
            .await
            .unwrap();
        fs::remove_file(s.root().join("manifest.json")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            s.root().join("manifest.json"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = s.get("manifest.json", None).await.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[tokio::test]
    async fn oversized_objects_are_refused_before_they_are_read() {
        let (d, s) = store();
        fs::create_dir_all(s.root()).unwrap();
        // A sparse file: announced as 1 GiB, costs nothing; the refusal comes from its size.
        let big = fs::File::create(s.root().join("manifest.json")).unwrap();
        big.set_len(1 << 30).unwrap();
        let e = s.get("manifest.json", None).await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    size: 1073741824,
                    exact: true,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("DEPLOY_MAX_OBJECT_BYTES"), "{e}");

        // A download is refused by the size its reference declares.
        fs::write(s.root().join("artifact"), vec![7u8; 1000]).unwrap();
        let dest = d.path().join("dl");
        let e = s
            .get_to_file("artifact", &dest, &(), Some(740))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::LargerThanDeclared {
                    declared: 740,
                    size: 1000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!dest.exists(), "no partial download is left");
        let got = s
            .get_to_file("artifact", &dest, &(), Some(1000))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.size, 1000);
    }
}
