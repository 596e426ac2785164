//! The object store: where manifests, artifacts and host reports live.
//!
//! One small trait, [`ObjectStore`], with two real backends: [`FileStore`] (`file:///path`,
//! the embedded default) and [`S3Store`] (`s3://bucket/prefix`). [`Store`] picks one from a
//! URL. Keys are relative to the store's root or prefix (`manifest.json`,
//! `manifests/manifest-….json`, `artifacts/…`).

mod file;
#[cfg(feature = "s3")]
mod s3;

use std::future::Future;
use std::path::Path;

pub use file::FileStore;
#[cfg(feature = "s3")]
pub use s3::{S3Options, S3Store};

/// The default store: a local directory, for one machine and for demos.
pub const DEFAULT_STORE: &str = "file:///var/lib/deployer/store";

/// What a conditional read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Found {
        bytes: Vec<u8>,
        etag: String,
    },
    /// The object still has the ETag the caller passed as `If-None-Match`.
    NotModified,
    NotFound,
}

/// A write's precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// Write only if no object exists at the key (`If-None-Match: *`).
    IfAbsent,
    /// Write only if the object still has this ETag (`If-Match`).
    IfMatch(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error(
        "cannot reach the store {url}: {detail}; check the URL, AWS_ENDPOINT_URL and the network"
    )]
    Unreachable { url: String, detail: String },
    #[error(
        "no usable AWS credentials for {url}: {detail}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    )]
    Credentials { url: String, detail: String },
    #[error(
        "access denied to {url} ({key}): {detail}; check the credentials' permissions on the bucket"
    )]
    AccessDenied {
        url: String,
        key: String,
        detail: String,
    },
    #[error("bucket {bucket:?} does not exist at {url}; create it or fix the store URL")]
    NoSuchBucket { url: String, bucket: String },
    #[error("{key} changed since it was read")]
    PreconditionFailed { key: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {key} at {url} failed: {detail}")]
    Other {
        op: &'static str,
        url: String,
        key: String,
        detail: String,
    },
}

impl StoreError {
    pub(crate) fn invalid_url(url: &str, reason: &str) -> StoreError {
        StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// Receives byte counts as a transfer goes (a progress bar, a log line, or nothing: `()`).
pub trait Progress: Send + Sync {
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _bytes: u64) {}
}

/// What [`ObjectStore::get_to_file`] wrote, hashed while it streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    pub sha256: String,
}

/// The store operations everything else is built on. Implementations are cheap to share
/// (`&self` everywhere) and safe to call from many tasks at once.
pub trait ObjectStore: Send + Sync {
    /// The URL this store was opened from, for messages.
    fn url(&self) -> &str;

    /// Read an object; with `if_none_match`, answer [`Fetched::NotModified`] when its ETag
    /// is unchanged (one request, no body).
    fn get(
        &self,
        key: &str,
        if_none_match: Option<&str>,
    ) -> impl Future<Output = Result<Fetched, StoreError>> + Send;

    /// Write an object whole, atomically; returns its new ETag.
    fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Does the object exist? Returns its size.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Every key that starts with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Remove an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Upload a local file, streaming it (multipart on S3 for large files). Unconditional:
    /// meant for content-addressed keys, whose integrity readers check by hash.
    fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Download an object into `dest` (created or truncated), hashing it as it streams.
    /// `None` when the object does not exist.
    fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> impl Future<Output = Result<Option<Downloaded>, StoreError>> + Send;

    /// Requests made so far, where counted ([`Counted`]).
    fn requests(&self) -> Option<u64> {
        None
    }
}

/// A store that counts the requests made through it (the agent reports them: an idle
/// poll must cost one).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    n: std::sync::atomic::AtomicU64,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Self {
        Counted {
            inner,
            n: Default::default(),
        }
    }

    fn count(&self) {
        self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S: ObjectStore> ObjectStore for Counted<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        self.count();
        self.inner.get(key, if_none_match).await
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> Result<String, StoreError> {
        self.count();
        self.inner.put(key, bytes, precondition).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.count();
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.count();
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count();
        self.inner.delete(key).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        self.count();
        self.inner.put_file(key, path, progress).await
    }

    async fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<Option<Downloaded>, StoreError> {
        self.count();
        self.inner.get_to_file(key, dest, progress).await
    }

    fn requests(&self) -> Option<u64> {
        Some(self.n.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A store opened from a URL: the backend the URL names.
#[derive(Debug, Clone)]
pub enum Store {
    File(FileStore),
    #[cfg(feature = "s3")]
    S3(S3Store),
}

impl Store {
    /// Open `file:///path` or `s3://bucket[/prefix]`. S3 settings come from the standard
    /// AWS environment (see `S3Options::from_env`).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("file://") {
            return Ok(Store::File(FileStore::open(url)?));
        }
        if url.starts_with("s3://") {
            #[cfg(feature = "s3")]
            return Ok(Store::S3(
                S3Store::connect(url, S3Options::from_env()).await?,
            ));
            #[cfg(not(feature = "s3"))]
            return Err(StoreError::invalid_url(
                url,
                "this build has no S3 support (cargo feature \"s3\")",
            ));
        }
        Err(StoreError::invalid_url(
            url,
            "expected file:///absolute/path or s3://bucket/prefix",
        ))
    }
}

impl ObjectStore for Store {
    fn url(&self) -> &str {
        match self {
            Store::File(s) => s.url(),
            #[cfg(feature = "s3")]
            Store::S3(s) => s.url(),
        }
    }

    async fn get(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        match self {
            Store::File(s) => s.get(key, if_none_match).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.get(key, if_none_match).await,
        }
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> Result<String, StoreError> {
        match self {
            Store::File(s) => s.put(key, bytes, precondition).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.put(key, bytes, precondition).await,
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::File(s) => s.head(key).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.head(key).await,
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::File(s) => s.list(prefix).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.list(prefix).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.delete(key).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.delete(key).await,
        }
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.put_file(key, path, progress).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.put_file(key, path, progress).await,
        }
    }

    async fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<Option<Downloaded>, StoreError> {
        match self {
            Store::File(s) => s.get_to_file(key, dest, progress).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.get_to_file(key, dest, progress).await,
        }
    }
}

/// Stream `reader` into `dest` with progress, hashing as it goes.
pub(crate) async fn copy_hashed(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<Downloaded, StoreError> {
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |op: &'static str| {
        let path = dest.display().to_string();
        move |source| StoreError::Io { op, path, source }
    };
    let mut out = tokio::fs::File::create(dest).await.map_err(io("create"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(io("read into"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).await.map_err(io("write"))?;
        size += n as u64;
        progress.advance(n as u64);
    }
    out.sync_all().await.map_err(io("fsync"))?;
    Ok(Downloaded {
        size,
        sha256: crate::hex(&hasher.finalize()),
    })
}

/// Keys are relative paths of safe characters: no empty, `.` or `..` segment, no leading `/`.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if key.is_empty() || key.len() > 1024 {
        return bad("must be 1 to 1024 characters");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/+=@".contains(&b))
    {
        return bad("only letters, digits and ._-/+=@ are allowed");
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return bad("empty, '.' and '..' path segments are not allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_store() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "a/./b",
            "sp ace",
            "nl\n",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "manifest.json",
            "manifests/manifest-20261122T140000Z-3f2a9c1d.json",
            "artifacts/ab-x.tar.gz",
        ] {
            assert!(check_key(good).is_ok(), "{good:?} refused");
        }
    }

    #[tokio::test]
    async fn unknown_scheme_is_refused() {
        let e = Store::open("http://example.com").await.unwrap_err();
        assert!(e.to_string().contains("expected file://"), "{e}");
    }
}
