//! The host's secrets files: `<secrets dir>/<service>.env` (or the service's `envFile`),
//! mode 600 and owned by root (by the agent's own user with `--user`). A file anyone else
//! could read or write is refused, with the commands that fix it. Their content is never
//! read by the agent: systemd reads it through `EnvironmentFile=`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::AgentError;

/// The env file a service gets, if any: `Ok(None)` when the default file does not exist.
pub fn env_file(
    service: &str,
    declared: Option<&str>,
    secrets_dir: &Path,
    owner_uid: u32,
) -> Result<Option<PathBuf>, AgentError> {
    let path = match declared {
        Some(p) => PathBuf::from(p),
        None => secrets_dir.join(format!("{service}.env")),
    };
    let refuse = |detail: String| AgentError::Secrets {
        service: service.to_owned(),
        path: path.display().to_string(),
        detail,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && declared.is_none() => {
            return Ok(None);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(format!(
                "the manifest names it but it does not exist; create it on this host: install -m 600 /dev/null {}",
                path.display()
            )));
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    if !meta.file_type().is_file() {
        return Err(refuse(
            "not a regular file (a symlink is not accepted)".into(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {mode:o} lets others read it; fix: chmod 600 {}",
            path.display()
        )));
    }
    if meta.uid() != owner_uid {
        return Err(refuse(format!(
            "owned by uid {}, not {owner_uid}; fix: chown {owner_uid} {}",
            meta.uid(),
            path.display()
        )));
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn modes_and_owners_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::fs::metadata(dir.path()).unwrap().uid();
        assert_eq!(env_file("a", None, dir.path(), uid).unwrap(), None);
        let f = dir.path().join("a.env");
        std::fs::write(&f, "K=v\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = env_file("a", None, dir.path(), uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            env_file("a", None, dir.path(), uid).unwrap(),
            Some(f.clone())
        );
        let e = env_file("a", None, dir.path(), uid + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chown"), "{e}");
        let missing = dir.path().join("nope.env");
        let e = env_file("a", missing.to_str(), dir.path(), uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
