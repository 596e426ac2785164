//! Upload what a build produced, content-addressed and deduplicated: an object that is
//! already in the store (same key, same size) is never sent again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use deploy_manifest::archive;
use deploy_manifest::model::{ArchiveFormat, ArchiveRef, Artifact};
use deploy_manifest::store::ObjectStore;
use serde::Serialize;

use crate::PushError;
use crate::progress::Transfer;

/// Where the Nix binary cache lives in the store.
pub const NIX_CACHE_PREFIX: &str = "nix-cache/";

/// What an upload sent and what it found already there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Uploaded {
    pub objects: u64,
    pub bytes: u64,
    pub skipped_objects: u64,
    pub skipped_bytes: u64,
}

/// Pack `dir` (sha256 computed while packing) and upload it unless it is already there.
/// A tree unchanged since the last push of it (same [`archive::stamp`]) is not packed
/// again when the store still has its archive.
pub async fn upload_archive(
    store: &impl ObjectStore,
    dir: &Path,
    name: &str,
    format: ArchiveFormat,
    dry_run: bool,
) -> Result<(Artifact, Uploaded), PushError> {
    let stamp_of = |dir: PathBuf| async move {
        tokio::task::spawn_blocking(move || archive::stamp(&dir))
            .await
            .expect("stamping does not panic")
    };
    let before = stamp_of(dir.to_path_buf()).await?;
    let cache = PackCache::open(dir, name, format);
    if let Some(artifact) = cache.as_ref().and_then(|c| c.lookup(&before)) {
        let key = artifact.key();
        if store.head(&key).await? == Some(artifact.size) {
            eprintln!(
                "push: {} is unchanged since it was packed as {key}, which the store has; not packing or uploading",
                dir.display()
            );
            let report = Uploaded {
                skipped_objects: 1,
                skipped_bytes: artifact.size,
                ..Uploaded::default()
            };
            return Ok((Artifact::Archive(artifact), report));
        }
    }
    let tmp = tempfile::NamedTempFile::new().map_err(|e| PushError::Io {
        what: "creating a temporary file".into(),
        source: e,
    })?;
    let (dir_owned, file) = (
        dir.to_path_buf(),
        tmp.reopen().map_err(|e| PushError::Io {
            what: format!("opening {}", tmp.path().display()),
            source: e,
        })?,
    );
    let packed = tokio::task::spawn_blocking(move || archive::pack(&dir_owned, format, file))
        .await
        .expect("packing does not panic")?;
    let artifact = ArchiveRef {
        sha256: packed.sha256,
        name: name.to_owned(),
        size: packed.size,
        format: Some(format),
    };
    // Remember the tree only if it did not change while it was packed.
    if let Some(cache) = &cache
        && before.settled
        && stamp_of(dir.to_path_buf()).await? == before
    {
        cache.record(&before, &artifact);
    }
    let key = artifact.key();
    let mut report = Uploaded::default();
    if store.head(&key).await? == Some(artifact.size) {
        report.skipped_objects = 1;
        report.skipped_bytes = artifact.size;
        eprintln!("push: {key} is already in the store; not uploading");
    } else if dry_run {
        report.objects = 1;
        report.bytes = artifact.size;
    } else {
        let transfer = Transfer::start(&format!("uploading {key}"), artifact.size);
        store.put_file(&key, tmp.path(), &transfer).await?;
        transfer.finish();
        report.objects = 1;
        report.bytes = artifact.size;
    }
    Ok((Artifact::Archive(artifact), report))
}

/// What push last packed each output directory into: `<cache>/push/<hash of the
/// directory, name and format>.json` holding the tree's stamp and the archive it made.
struct PackCache {
    file: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Packed {
    fingerprint: String,
    artifact: ArchiveRef,
}

impl PackCache {
    fn open(dir: &Path, name: &str, format: ArchiveFormat) -> Option<PackCache> {
        use sha2::{Digest, Sha256};
        let dir = std::fs::canonicalize(dir).ok()?;
        // The packing's version: a change to how trees are packed must not be hidden by a
        // tree remembered before it.
        let id = format!("pack-v2\n{}\n{name}\n{format:?}", dir.display());
        let hash = deploy_manifest::hex(&Sha256::digest(id.as_bytes()));
        let cache = deploy_manifest::fsutil::private_cache_dir("push")?;
        Some(PackCache {
            file: cache.join(format!("{}.json", &hash[..32])),
        })
    }

    fn lookup(&self, stamp: &archive::TreeStamp) -> Option<ArchiveRef> {
        let bytes = std::fs::read(&self.file).ok()?;
        let packed: Packed = serde_json::from_slice(&bytes).ok()?;
        (packed.fingerprint == stamp.fingerprint).then_some(packed.artifact)
    }

    fn record(&self, stamp: &archive::TreeStamp, artifact: &ArchiveRef) {
        let packed = Packed {
            fingerprint: stamp.fingerprint.clone(),
            artifact: artifact.clone(),
        };
        let bytes = serde_json::to_vec(&packed).expect("serializable");
        if let Err(e) = deploy_manifest::fsutil::write_atomically(&self.file, &bytes, 0o600) {
            tracing::debug!(file = %self.file.display(), error = %e, "could not remember the packed tree");
        }
    }
}

/// The local staging binary cache `nix copy` writes into before upload. It persists between
/// pushes so unchanged paths are not compressed again.
pub fn default_staging() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEPLOY_NIX_STAGING") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("deployer/nix-cache")
}

/// Copy `store_path`'s closure into the staging cache with `nix copy`, then upload every
/// object the store's `nix-cache/` lacks: NARs first, then narinfos, then
/// `nix-cache-info`, so a reader never finds a narinfo whose NAR is missing.
pub async fn upload_nix_closure(
    store: &impl ObjectStore,
    store_path: &str,
    staging: &Path,
    dry_run: bool,
) -> Result<Uploaded, PushError> {
    // With DEPLOY_NIX_SECRET_KEY (a `nix-store --generate-binary-cache-key` secret), the
    // narinfos nix copy writes are signed, for hosts that check --nix-trusted-keys.
    let staging_url = match std::env::var("DEPLOY_NIX_SECRET_KEY") {
        Ok(key) if !key.is_empty() => format!("file://{}?secret-key={key}", staging.display()),
        _ => format!("file://{}", staging.display()),
    };
    let (path, url) = (store_path.to_owned(), staging_url.clone());
    tokio::task::spawn_blocking(move || {
        let status = Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
                &url,
                &path,
            ])
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(PushError::Nix(format!(
                "`nix copy --to {url} {path}` failed ({s}); its output is above"
            ))),
            Err(e) => Err(PushError::Nix(format!(
                "cannot run nix: {e}; is Nix installed?"
            ))),
        }
    })
    .await
    .expect("nix copy does not panic")?;

    let hash_part = store_path
        .strip_prefix("/nix/store/")
        .and_then(|rest| rest.split('-').next())
        .ok_or_else(|| PushError::Nix(format!("{store_path} is not a /nix/store path")))?;
    if !staging.join(format!("{hash_part}.narinfo")).is_file() {
        return Err(PushError::Nix(format!(
            "nix copy left no {hash_part}.narinfo in {staging_url}"
        )));
    }

    let remote: BTreeSet<String> = store.list(NIX_CACHE_PREFIX).await?.into_iter().collect();
    let mut local = local_cache_files(staging)?;
    // NARs, then narinfos, then nix-cache-info.
    local.sort_by_key(|(rel, _)| {
        (
            if rel.starts_with("nar/") {
                0
            } else if rel.ends_with(".narinfo") {
                1
            } else {
                2
            },
            rel.clone(),
        )
    });
    let mut report = Uploaded::default();
    let missing: Vec<&(String, u64)> = local
        .iter()
        .filter(|(rel, size)| {
            let there = remote.contains(&format!("{NIX_CACHE_PREFIX}{rel}"));
            if there {
                report.skipped_objects += 1;
                report.skipped_bytes += size;
            }
            !there
        })
        .collect();
    let total: u64 = missing.iter().map(|(_, size)| size).sum();
    report.objects = missing.len() as u64;
    report.bytes = total;
    if dry_run || missing.is_empty() {
        if missing.is_empty() {
            eprintln!("push: the closure of {store_path} is already in the store; not uploading");
        }
        return Ok(report);
    }
    let transfer = Transfer::start(
        &format!(
            "uploading {} objects of the closure of {store_path}",
            missing.len()
        ),
        total,
    );
    for (rel, _) in missing {
        store
            .put_file(
                &format!("{NIX_CACHE_PREFIX}{rel}"),
                &staging.join(rel),
                &transfer,
            )
            .await?;
    }
    transfer.finish();
    Ok(report)
}

/// The binary cache's files: `nix-cache-info`, `*.narinfo`, `nar/*`, with sizes.
fn local_cache_files(staging: &Path) -> Result<Vec<(String, u64)>, PushError> {
    let mut out = Vec::new();
    for sub in ["", "nar"] {
        let dir = staging.join(sub);
        let entries = std::fs::read_dir(&dir).map_err(|e| PushError::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = match entry.metadata() {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            let keep = if sub.is_empty() {
                name == "nix-cache-info" || name.ends_with(".narinfo")
            } else {
                !name.starts_with('.')
            };
            if keep {
                let rel = if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                };
                out.push((rel, meta.len()));
            }
        }
    }
    Ok(out)
}
