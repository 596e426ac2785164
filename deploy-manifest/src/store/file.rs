//! `file:///path`: a local directory with the store layout.
//!
//! Writes go to a temporary file in the target's directory, are fsynced and renamed into
//! place, so a reader never sees half an object. Conditional writes hold an exclusive
//! `flock` on `<root>/.lock` while they compare and rename, which makes compare-and-swap
//! atomic between processes on the host. The ETag is the quoted sha256 of the content.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    Downloaded, Fetched, ObjectStore, Precondition, Progress, StoreError, check_key, copy_hashed,
};

const LOCK_FILE: &str = ".lock";
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct FileStore {
    url: String,
    root: PathBuf,
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

    fn get_blocking(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        let path = self.path_of(key)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Fetched::NotFound),
            Err(e) => return Err(Self::io("read", &path)(e)),
        };
        let etag = etag_of(&bytes);
        if if_none_match == Some(etag.as_str()) {
            return Ok(Fetched::NotModified);
        }
        Ok(Fetched::Found { bytes, etag })
    }

    fn put_blocking(
        &self,
        key: &str,
        bytes: &[u8],
        precondition: &Precondition,
    ) -> Result<String, StoreError> {
        let path = self.path_of(key)?;
        let dir = path.parent().expect("a key has a parent directory");
        fs::create_dir_all(dir).map_err(Self::io("create directory", dir))?;
        let _lock = self.lock()?;
        match precondition {
            Precondition::None => {}
            Precondition::IfAbsent => {
                if path.exists() {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_owned(),
                    });
                }
            }
            Precondition::IfMatch(expected) => {
                let current = match fs::read(&path) {
                    Ok(b) => Some(etag_of(&b)),
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => return Err(Self::io("read", &path)(e)),
                };
                if current.as_deref() != Some(expected.as_str()) {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_owned(),
                    });
                }
            }
        }
        crate::fsutil::write_atomically(&path, bytes, 0o644).map_err(Self::io("write", &path))?;
        Ok(etag_of(bytes))
    }

    /// An exclusive lock on the store, held until the returned file is dropped.
    fn lock(&self) -> Result<File, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Self::io("open lock", &path))?;
        file.lock().map_err(Self::io("lock", &path))?;
        Ok(file)
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
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
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io("stat", &path)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_owned());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io("remove", &path)(e)),
        }
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let target = self.path_of(key)?;
        let dir = target.parent().expect("a key has a parent directory");
        fs::create_dir_all(dir).map_err(Self::io("create directory", dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(Self::io("create temporary file in", dir))?;
        let source = tokio::fs::File::open(path)
            .await
            .map_err(Self::io("open", path))?;
        copy_hashed(source, tmp.path(), progress).await?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(Self::io("chmod", tmp.path()))?;
        tmp.persist(&target)
            .map_err(|e| Self::io("rename into", &target)(e.error))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io("fsync", dir))
    }

    async fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<Option<Downloaded>, StoreError> {
        let path = self.path_of(key)?;
        let source = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io("open", &path)(e)),
        };
        copy_hashed(source, dest, progress).await.map(Some)
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
}
