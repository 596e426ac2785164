//! Put an artifact on this host, verified, or fail without installing anything.
//!
//! - Archives: one pass. The download is hashed as it streams (stopping at the declared
//!   size + 1 byte) while a blocking thread unpacks it into a private temp dir under
//!   `<state>/store/` within [`UnpackLimits`] (escapes refused). Only when the whole
//!   object's sha256 and size match the manifest is the tree made read-only and renamed to
//!   `<state>/store/<sha256>-<name>`; a mismatch is refused whatever the unpacker made of
//!   the bytes. Unverified bytes do reach the unpacker, so its limits and path checks are
//!   what bound a hostile archive before the hash refuses it. A directory of the final name
//!   was only ever created by that rename, so it is trusted as is. On any error (or a
//!   cancelled download) the temp dir is removed: nothing is installed.
//! - Nix store paths: used as is if the host's store has them; otherwise the closure's
//!   narinfos and NARs are fetched from the store's `nix-cache/` into a local binary cache
//!   (each NAR capped at its narinfo's `FileSize`, written to a temp file and renamed) and
//!   imported with `nix copy --from`, which checks every NAR's hash.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use deploy_manifest::archive::{self, UnpackLimits};
use deploy_manifest::model::{ArchiveRef, Artifact};
use deploy_manifest::store::{Fetched, ObjectStore};

use crate::AgentError;

/// Where the artifact is (or will be) on this host.
pub fn local_path(artifact: &Artifact, state_dir: &Path) -> PathBuf {
    match artifact {
        Artifact::StorePath(p) => PathBuf::from(p),
        Artifact::Archive(a) => state_dir
            .join("store")
            .join(format!("{}-{}", a.sha256, a.name)),
    }
}

/// Put `artifact` on this host. With `nix_trusted` keys, every narinfo fetched must carry a
/// valid signature by one of them (Nix's `trusted-public-keys` semantics). `host_limits`
/// are the host's caps on unpacking (`--max-unpacked-bytes`, `--max-archive-entries`).
pub async fn ensure(
    store: &impl ObjectStore,
    artifact: &Artifact,
    state_dir: &Path,
    nix_trusted: &[deploy_manifest::sign::PublicKey],
    host_limits: UnpackLimits,
) -> Result<PathBuf, AgentError> {
    match artifact {
        Artifact::Archive(a) => ensure_archive(store, a, state_dir, host_limits).await,
        Artifact::StorePath(p) => ensure_store_path(store, p, state_dir, nix_trusted).await,
    }
}

async fn ensure_archive(
    store: &impl ObjectStore,
    a: &ArchiveRef,
    state_dir: &Path,
    host_limits: UnpackLimits,
) -> Result<PathBuf, AgentError> {
    let dest = local_path(&Artifact::Archive(a.clone()), state_dir);
    if dest.is_dir() {
        return Ok(dest);
    }
    tracing::info!(artifact = %a.key(), "fetching");
    let store_dir = state_dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| AgentError::io(format!("creating {}", store_dir.display()), e))?;
    let tmp = Scratch(
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&store_dir)
            .map_err(|e| {
                AgentError::io(format!("creating a temp dir in {}", store_dir.display()), e)
            })?,
    );
    let root = tmp.path().join("root");
    let format = a.format.unwrap_or_default();
    let limits = UnpackLimits::for_archive(a.size, host_limits);
    // One pass: the download is hashed on this task while a blocking thread unpacks what
    // arrives into the temp dir. Nothing leaves the temp dir unless the hash matches.
    // Either end dropped closes the pipe: the unpacker sees the end of the stream, the
    // download a broken pipe.
    let (mut writer, reader) = tokio::io::duplex(PIPE_BYTES);
    let unpacker = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || unpack_stream(reader, format, &root, limits))
    };
    let got = store
        .get_into(&a.key(), &mut writer, &(), Some(a.size))
        .await;
    drop(writer); // the unpacker sees the end of the stream
    let unpacked = unpacker.await.expect("unpacking does not panic");
    let got = got?.ok_or_else(|| AgentError::Fetch {
        artifact: a.key(),
        detail: "not in the store; re-run push for this service".into(),
    })?;
    if got.sha256 != a.sha256 || got.size != a.size {
        return Err(AgentError::Fetch {
            artifact: a.key(),
            detail: format!(
                "hash mismatch: the manifest says sha256 {} ({} bytes), the store has {} ({} bytes); refusing to install it. The object changed after push: delete {} from the store and re-run push for this service",
                a.sha256,
                a.size,
                got.sha256,
                got.size,
                a.key()
            ),
        });
    }
    let refused = |e: archive::ArchiveError| AgentError::Fetch {
        artifact: a.key(),
        detail: e.to_string(),
    };
    unpacked.map_err(refused)?;
    // Read-only only now: a refused tree must stay removable by a non-root agent.
    let ro = root.clone();
    tokio::task::spawn_blocking(move || archive::make_read_only(&ro))
        .await
        .expect("chmod does not panic")
        .map_err(refused)?;
    std::fs::rename(&root, &dest)
        .map_err(|e| AgentError::io(format!("installing {}", dest.display()), e))?;
    Ok(dest)
}

/// The temp dir of a fetch. An archive may hold directories without write permission (its
/// entries' modes), which a non-root agent could not empty: they are opened up first.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        archive::open_up(self.0.path());
    }
}

/// What the download may run ahead of the unpacker.
const PIPE_BYTES: usize = 4 << 20;

/// Unpack the archive arriving on `input` into `root` (created here), then read `input` to
/// its end whatever happened, so the download's hash covers every byte and the downloader
/// is never left blocked on a full pipe.
fn unpack_stream(
    input: tokio::io::DuplexStream,
    format: deploy_manifest::model::ArchiveFormat,
    root: &Path,
    limits: UnpackLimits,
) -> Result<(), archive::ArchiveError> {
    let mut input = tokio_util::io::SyncIoBridge::new(input);
    let result = std::fs::create_dir(root)
        .map_err(|e| archive::ArchiveError::Io {
            op: "create",
            path: root.display().to_string(),
            source: e,
        })
        // Each decoder buffers its own input.
        .and_then(|()| archive::unpack(&mut input, format, root, limits).map(drop));
    let _ = std::io::copy(&mut input, &mut std::io::sink());
    result
}

fn hash_part(store_path_or_name: &str) -> &str {
    let base = store_path_or_name
        .strip_prefix("/nix/store/")
        .unwrap_or(store_path_or_name);
    base.split('-').next().unwrap_or(base)
}

async fn ensure_store_path(
    store: &impl ObjectStore,
    path: &str,
    state_dir: &Path,
    nix_trusted: &[deploy_manifest::sign::PublicKey],
) -> Result<PathBuf, AgentError> {
    if Path::new(path).exists() {
        return Ok(PathBuf::from(path));
    }
    tracing::info!(store_path = %path, "fetching the closure");
    let fail = |detail: String| AgentError::Fetch {
        artifact: path.to_owned(),
        detail,
    };
    let mirror = state_dir.join("nix-cache");
    std::fs::create_dir_all(mirror.join("nar"))
        .map_err(|e| AgentError::io(format!("creating {}", mirror.display()), e))?;
    let info = match store.get("nix-cache/nix-cache-info", None).await? {
        Fetched::Found { bytes, .. } => bytes,
        _ => {
            return Err(fail(
                "the store has no nix-cache/; push this service with a nix builder".into(),
            ));
        }
    };
    write(&mirror.join("nix-cache-info"), &info)?;
    let mut queue = vec![hash_part(path).to_owned()];
    let mut seen = BTreeSet::new();
    while let Some(hash) = queue.pop() {
        if !seen.insert(hash.clone()) {
            continue;
        }
        let key = format!("nix-cache/{hash}.narinfo");
        let bytes = match store.get(&key, None).await? {
            Fetched::Found { bytes, .. } => bytes,
            _ => {
                return Err(fail(format!(
                    "{key} is not in the store; re-run push for this service"
                )));
            }
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !nix_trusted.is_empty() {
            deploy_manifest::sign::verify_narinfo(&text, nix_trusted)
                .map_err(|e| fail(format!("{key}: {e}; refusing to import it")))?;
        }
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let url = field("URL:").ok_or_else(|| fail(format!("{key} has no URL")))?;
        if url.contains("..") || url.starts_with('/') {
            return Err(fail(format!("{key} has an unsafe URL {url:?}")));
        }
        let nar = mirror.join(&url);
        if !nar.exists() {
            let dir = nar.parent().unwrap_or(&mirror);
            std::fs::create_dir_all(dir)
                .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
            // The compressed NAR's size, or for an uncompressed one its NAR size.
            let size = field("FileSize:")
                .or_else(|| {
                    (field("Compression:").as_deref() == Some("none"))
                        .then(|| field("NarSize:"))
                        .flatten()
                })
                .and_then(|s| s.parse::<u64>().ok());
            // A temp file renamed into place: a download cut short never looks complete.
            let tmp = tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(dir)
                .map_err(|e| {
                    AgentError::io(format!("creating a temp file in {}", dir.display()), e)
                })?;
            store
                .get_to_file(&format!("nix-cache/{url}"), tmp.path(), &(), size)
                .await?
                .ok_or_else(|| fail(format!("nix-cache/{url} is missing; re-run push")))?;
            tmp.persist(&nar)
                .map_err(|e| AgentError::io(format!("installing {}", nar.display()), e.error))?;
        }
        write(&mirror.join(format!("{hash}.narinfo")), &bytes)?;
        for reference in field("References:").unwrap_or_default().split_whitespace() {
            if !Path::new("/nix/store").join(reference).exists() {
                queue.push(hash_part(reference).to_owned());
            }
        }
    }
    let from = format!("file://{}", mirror.display());
    let (p, f) = (path.to_owned(), from.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--no-check-sigs",
                "--from",
                &f,
                &p,
            ])
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("nix copy does not panic")
    .map_err(|e| fail(format!("cannot run nix: {e}; install Nix on this host")))?;
    if !output.status.success() || !Path::new(path).exists() {
        return Err(fail(format!(
            "nix copy --from {from} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(PathBuf::from(path))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    deploy_manifest::fsutil::write_atomically(path, bytes, 0o644)
        .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
}
