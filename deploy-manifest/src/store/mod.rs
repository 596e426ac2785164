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
use std::time::Duration;

use tokio::io::AsyncWrite;

pub use file::FileStore;
#[cfg(feature = "s3")]
pub use s3::{S3Options, S3Store};

/// The default store: a local directory, for one machine and for demos.
pub const DEFAULT_STORE: &str = "file:///var/lib/deployer/store";

/// The most [`ObjectStore::get`] reads into memory (manifests, versions, host reports,
/// narinfos): 16 MiB, about a hundred times the largest real manifest. Override with
/// `DEPLOY_MAX_OBJECT_BYTES` (bytes).
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 16 << 20;

/// How long a download may go without receiving a byte before it is abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The cap [`ObjectStore::get`] applies: `DEPLOY_MAX_OBJECT_BYTES`, else
/// [`DEFAULT_MAX_OBJECT_BYTES`].
pub fn max_object_bytes() -> u64 {
    std::env::var("DEPLOY_MAX_OBJECT_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_OBJECT_BYTES)
}

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
    /// A small object over the cap for what is read into memory.
    #[error(
        "{key} at {url} is {}, over the {limit}-byte cap for manifests, versions, reports and narinfos; refusing to read it. \
         Nothing the tools write is that large: replace the object with a good copy (for manifest.json, a version from manifests/), \
         or raise DEPLOY_MAX_OBJECT_BYTES if it is legitimate",
        bytes_seen(*size, *exact)
    )]
    TooLarge {
        url: String,
        key: String,
        limit: u64,
        size: u64,
        /// `size` is the object's size (false: reading stopped there, there is more).
        exact: bool,
    },
    /// A download larger than the size its reference declares.
    #[error(
        "{key} at {url} is larger than its declared {declared} bytes ({} in the store); \
         stopped reading and refused it, nothing was installed. The object was replaced or the reference to it is wrong: push it again",
        bytes_seen(*size, *exact)
    )]
    LargerThanDeclared {
        url: String,
        key: String,
        declared: u64,
        size: u64,
        exact: bool,
    },
    #[error(
        "the store {url} did not answer {op} {key} within {secs} s ({bound}); check the store's endpoint and the network"
    )]
    Timeout {
        op: &'static str,
        url: String,
        key: String,
        secs: u64,
        bound: TimeoutBound,
    },
    /// A path inside a `file://` store that is not a plain directory or file (a symlink).
    #[error(
        "refusing to {op} {key} in the store at {url}: {reason}; a store holds only plain directories and files, \
         remove it (someone with write access to the store put it there)"
    )]
    Unsafe {
        op: &'static str,
        url: String,
        key: String,
        reason: String,
    },
}

/// Which limit a [`StoreError::Timeout`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutBound {
    /// The S3 client's operation timeout (all attempts of one request together).
    Operation,
    /// A download received nothing for [`IDLE_TIMEOUT`].
    Idle,
    /// The agent's budget of store time for one run (`--store-deadline`).
    Deadline,
}

impl std::fmt::Display for TimeoutBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutBound::Operation => "the S3 operation timeout",
            TimeoutBound::Idle => "no data received for that long",
            TimeoutBound::Deadline => {
                "the run's --store-deadline is used up; this host keeps running what it runs and the next run tries again"
            }
        })
    }
}

fn bytes_seen(size: u64, exact: bool) -> String {
    if exact {
        format!("{size} bytes")
    } else {
        format!("more than {} bytes", size.saturating_sub(1))
    }
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

/// A listed object: its key and, where the listing gives one (S3), its ETag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub etag: Option<String>,
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

    /// [`ObjectStore::list`] with each object's ETag where the listing carries it (S3: the
    /// same requests, 1,000 keys each), so a reader can skip objects it already has.
    fn list_etags(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<Listed>, StoreError>> + Send {
        async move {
            let keys = self.list(prefix).await?;
            Ok(keys
                .into_iter()
                .map(|key| Listed { key, etag: None })
                .collect())
        }
    }

    /// Upload a local file, streaming it (multipart on S3 for large files). Unconditional:
    /// meant for content-addressed keys, whose integrity readers check by hash.
    fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stream an object into `out`, hashing it as it goes (one pass: `out` may be a pipe
    /// into an unpacker). `None` when the object does not exist. With `max_bytes`, an
    /// object larger than that is refused ([`StoreError::LargerThanDeclared`]): by its
    /// announced size before any byte is read where the backend knows it, else after
    /// `max_bytes + 1` bytes. A read that waits longer than [`IDLE_TIMEOUT`] ends the
    /// transfer. What reached `out` before an error is the caller's to throw away.
    fn get_into(
        &self,
        key: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> impl Future<Output = Result<Option<Downloaded>, StoreError>> + Send;

    /// [`ObjectStore::get_into`] a file `dest` (created or truncated), fsynced; `dest` is
    /// removed on any error and when the object does not exist.
    fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> impl Future<Output = Result<Option<Downloaded>, StoreError>> + Send {
        async move {
            let io = |op: &'static str| {
                let path = dest.display().to_string();
                move |source| StoreError::Io { op, path, source }
            };
            let mut out = tokio::fs::File::create(dest).await.map_err(io("create"))?;
            let result = match self.get_into(key, &mut out, progress, max_bytes).await {
                Ok(Some(got)) => out
                    .sync_all()
                    .await
                    .map(|()| Some(got))
                    .map_err(io("fsync")),
                other => other,
            };
            if !matches!(result, Ok(Some(_))) {
                let _ = tokio::fs::remove_file(dest).await;
            }
            result
        }
    }

    /// Requests made so far, where counted ([`Counted`]).
    fn requests(&self) -> Option<u64> {
        None
    }

    /// A new agent run starts: a [`Deadline`] gets its whole budget again.
    fn start_run(&self) {}
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

    async fn list_etags(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        self.count();
        self.inner.list_etags(prefix).await
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

    async fn get_into(
        &self,
        key: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> Result<Option<Downloaded>, StoreError> {
        self.count();
        self.inner.get_into(key, out, progress, max_bytes).await
    }

    fn requests(&self) -> Option<u64> {
        Some(self.n.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn start_run(&self) {
        self.inner.start_run()
    }
}

/// A store whose calls together may take at most `budget` per run (the agent's
/// `--store-deadline`): each call is bounded by what is left of it, and once it is used up
/// every call fails at once with [`StoreError::Timeout`]. [`ObjectStore::start_run`] gives
/// the whole budget back. Time spent outside store calls (health checks, unpacking) does
/// not count. A cancelled call is dropped mid-flight: a download's partial file is removed
/// by its caller's temporary directory.
#[derive(Debug)]
pub struct Deadline<S> {
    inner: S,
    budget: Duration,
    spent: std::sync::Mutex<Duration>,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, budget: Duration) -> Self {
        Deadline {
            inner,
            budget,
            spent: Default::default(),
        }
    }

    fn spent(&self) -> std::sync::MutexGuard<'_, Duration> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: ObjectStore> Deadline<S> {
    async fn bound<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let left = self.budget.saturating_sub(*self.spent());
        let started = tokio::time::Instant::now();
        let result = if left.is_zero() {
            None
        } else {
            tokio::time::timeout(left, call).await.ok()
        };
        *self.spent() += started.elapsed();
        result.unwrap_or_else(|| {
            Err(StoreError::Timeout {
                op,
                url: self.inner.url().to_owned(),
                key: key.to_owned(),
                secs: self.budget.as_secs(),
                bound: TimeoutBound::Deadline,
            })
        })
    }
}

impl<S: ObjectStore> ObjectStore for Deadline<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get(&self, key: &str, if_none_match: Option<&str>) -> Result<Fetched, StoreError> {
        self.bound("get", key, self.inner.get(key, if_none_match))
            .await
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        precondition: Precondition,
    ) -> Result<String, StoreError> {
        self.bound("put", key, self.inner.put(key, bytes, precondition))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.bound("head", key, self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.bound("list", prefix, self.inner.list(prefix)).await
    }

    async fn list_etags(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        self.bound("list", prefix, self.inner.list_etags(prefix))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.bound("delete", key, self.inner.delete(key)).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        self.bound("put", key, self.inner.put_file(key, path, progress))
            .await
    }

    async fn get_into(
        &self,
        key: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> Result<Option<Downloaded>, StoreError> {
        self.bound(
            "get",
            key,
            self.inner.get_into(key, out, progress, max_bytes),
        )
        .await
    }

    fn requests(&self) -> Option<u64> {
        self.inner.requests()
    }

    fn start_run(&self) {
        *self.spent() = Duration::ZERO;
        self.inner.start_run()
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

    async fn list_etags(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        match self {
            Store::File(s) => s.list_etags(prefix).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.list_etags(prefix).await,
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

    async fn get_into(
        &self,
        key: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        progress: &dyn Progress,
        max_bytes: Option<u64>,
    ) -> Result<Option<Downloaded>, StoreError> {
        match self {
            Store::File(s) => s.get_into(key, out, progress, max_bytes).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.get_into(key, out, progress, max_bytes).await,
        }
    }
}

/// What a transfer is about, for [`copy_hashed`]'s errors and its size limit.
pub(crate) struct Transfer<'a> {
    pub url: &'a str,
    pub key: &'a str,
    /// Refuse the object after `max_bytes + 1` bytes.
    pub max_bytes: Option<u64>,
}

impl Transfer<'_> {
    /// Refuse an object whose size is known before reading it.
    pub(crate) fn check_announced(&self, size: u64) -> Result<(), StoreError> {
        match self.max_bytes {
            Some(max) if size > max => Err(self.too_large(size, true)),
            _ => Ok(()),
        }
    }

    fn too_large(&self, size: u64, exact: bool) -> StoreError {
        StoreError::LargerThanDeclared {
            url: self.url.to_owned(),
            key: self.key.to_owned(),
            declared: self.max_bytes.unwrap_or_default(),
            size,
            exact,
        }
    }

    pub(crate) fn idle(&self) -> StoreError {
        StoreError::Timeout {
            op: "get",
            url: self.url.to_owned(),
            key: self.key.to_owned(),
            secs: IDLE_TIMEOUT.as_secs(),
            bound: TimeoutBound::Idle,
        }
    }
}

/// Stream `reader` into `out` with progress, hashing as it goes; at most
/// `transfer.max_bytes + 1` bytes are read, and a read that waits longer than
/// [`IDLE_TIMEOUT`] ends the transfer. `out` is flushed, not synced.
pub(crate) async fn copy_hashed(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    out: &mut (impl AsyncWrite + Unpin + ?Sized),
    progress: &dyn Progress,
    transfer: &Transfer<'_>,
) -> Result<Downloaded, StoreError> {
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |op: &'static str| {
        let path = format!("the destination of {}", transfer.key);
        move |source| StoreError::Io { op, path, source }
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    // Bytes read but not yet written: small network reads are gathered into writes of at
    // least WRITE_AT_LEAST, so a pipe to another thread is not woken per packet.
    const WRITE_AT_LEAST: usize = 256 << 10;
    let mut held = 0;
    let mut size = 0u64;
    loop {
        // Never read past the first byte beyond the limit.
        let room = buf.len() - held;
        let want = match transfer.max_bytes {
            Some(max) => (max + 1 - size).min(room as u64) as usize,
            None => room,
        };
        let n = tokio::time::timeout(IDLE_TIMEOUT, reader.read(&mut buf[held..held + want]))
            .await
            .map_err(|_| transfer.idle())?
            .map_err(io("read into"))?;
        size += n as u64;
        if transfer.max_bytes.is_some_and(|max| size > max) {
            return Err(transfer.too_large(size, false));
        }
        hasher.update(&buf[held..held + n]);
        held += n;
        if held >= WRITE_AT_LEAST || (n == 0 && held > 0) {
            out.write_all(&buf[..held]).await.map_err(io("write"))?;
            progress.advance(held as u64);
            held = 0;
        }
        if n == 0 {
            break;
        }
    }
    out.flush().await.map_err(io("flush"))?;
    Ok(Downloaded {
        size,
        sha256: crate::hex(&hasher.finalize()),
    })
}

/// Read at most `limit + 1` bytes of `reader` into memory; more is [`StoreError::TooLarge`].
#[cfg(any(feature = "s3", test))]
pub(crate) async fn read_capped(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    url: &str,
    key: &str,
    limit: u64,
) -> Result<Vec<u8>, StoreError> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut capped = (&mut reader).take(limit + 1);
    loop {
        let mut chunk = [0u8; 64 << 10];
        let n = tokio::time::timeout(IDLE_TIMEOUT, capped.read(&mut chunk))
            .await
            .map_err(|_| StoreError::Timeout {
                op: "get",
                url: url.to_owned(),
                key: key.to_owned(),
                secs: IDLE_TIMEOUT.as_secs(),
                bound: TimeoutBound::Idle,
            })?
            .map_err(|e| StoreError::Unreachable {
                url: url.to_owned(),
                detail: format!("reading {key}: {e}"),
            })?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    if bytes.len() as u64 > limit {
        return Err(too_large(url, key, limit, bytes.len() as u64, false));
    }
    Ok(bytes)
}

pub(crate) fn too_large(url: &str, key: &str, limit: u64, size: u64, exact: bool) -> StoreError {
    StoreError::TooLarge {
        url: url.to_owned(),
        key: key.to_owned(),
        limit,
        size,
        exact,
    }
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

    /// A store that accepts every call and never answers.
    struct Hanging;

    impl ObjectStore for Hanging {
        fn url(&self) -> &str {
            "s3://hanging"
        }
        async fn get(&self, _: &str, _: Option<&str>) -> Result<Fetched, StoreError> {
            std::future::pending().await
        }
        async fn put(&self, _: &str, _: Vec<u8>, _: Precondition) -> Result<String, StoreError> {
            std::future::pending().await
        }
        async fn head(&self, _: &str) -> Result<Option<u64>, StoreError> {
            Ok(Some(1))
        }
        async fn list(&self, _: &str) -> Result<Vec<String>, StoreError> {
            std::future::pending().await
        }
        async fn delete(&self, _: &str) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn put_file(&self, _: &str, _: &Path, _: &dyn Progress) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn get_into(
            &self,
            _: &str,
            out: &mut (dyn AsyncWrite + Unpin + Send),
            _: &dyn Progress,
            _: Option<u64>,
        ) -> Result<Option<Downloaded>, StoreError> {
            tokio::io::AsyncWriteExt::write_all(out, b"partial")
                .await
                .unwrap();
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_store_that_never_answers_times_out_at_the_deadline() {
        let store = Deadline::new(Hanging, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = store.get("manifest.json", None).await.unwrap_err();
        assert!(
            matches!(
                &e,
                StoreError::Timeout {
                    op: "get",
                    bound: TimeoutBound::Deadline,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--store-deadline"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The budget is used up: the next call fails at once, even one that would answer.
        assert!(matches!(
            store.head("x").await,
            Err(StoreError::Timeout { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("artifact");
        // A new run has the whole budget again; a download cut off leaves no file.
        store.start_run();
        assert_eq!(store.head("x").await.unwrap(), Some(1));
        let e = store
            .get_to_file("artifacts/a", &dest, &(), Some(10))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
        assert!(!dest.exists(), "the partial download was removed");
    }

    #[tokio::test]
    async fn downloads_stop_one_byte_past_the_declared_size() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dl");
        // An endless stream, as a lying server would send.
        let endless = tokio::io::repeat(b'x');
        let transfer = Transfer {
            url: "s3://b",
            key: "artifacts/a.tar.gz",
            max_bytes: Some(740),
        };
        let mut out = tokio::fs::File::create(&dest).await.unwrap();
        let e = copy_hashed(endless, &mut out, &(), &transfer)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                StoreError::LargerThanDeclared {
                    declared: 740,
                    size: 741,
                    exact: false,
                    ..
                }
            ),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("artifacts/a.tar.gz")
                && text.contains("740")
                && text.contains("more than 740 bytes"),
            "{text}"
        );
        assert!(std::fs::metadata(&dest).unwrap().len() <= 740);
        // Exactly the declared size passes.
        let exact = tokio::io::AsyncReadExt::take(tokio::io::repeat(b'x'), 740);
        let mut out = tokio::fs::File::create(&dest).await.unwrap();
        let got = copy_hashed(exact, &mut out, &(), &transfer).await.unwrap();
        assert_eq!(got.size, 740);
    }

    #[tokio::test]
    async fn small_reads_stop_one_byte_past_the_cap() {
        let e = read_capped(tokio::io::repeat(0), "s3://b", "manifest.json", 1000)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    size: 1001,
                    exact: false,
                    ..
                }
            ),
            "{e}"
        );
        let ok = tokio::io::AsyncReadExt::take(tokio::io::repeat(0), 1000);
        assert_eq!(
            read_capped(ok, "s3://b", "m", 1000).await.unwrap().len(),
            1000
        );
    }
}
