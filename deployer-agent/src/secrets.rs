//! The host's secrets, confined per service. A service may use only its own:
//! `<secrets dir>/<service>.env` (its env file, the default `envFile`) and files directly in
//! `<secrets dir>/<service>/` (another `envFile`, and the files `${secret:NAME}` reads). The
//! agent's own files live beside them where no service can name them: the generated
//! `<secrets dir>/deployer/` (so no service may be called `deployer`) and the infrastructure
//! admin credentials `<secrets dir>/infra-<name>.env` (so no service may be called `infra-*`).
//!
//! A path outside its service's place is refused before anything touches it. A file inside
//! is opened without following a symlink (`O_NOFOLLOW`) and must be a regular file, with no
//! group or other permission bits, owned by root (by the agent's own user with `--user`);
//! otherwise it is refused with the commands that fix it. systemd reads the operator's env
//! file for the service (`EnvironmentFile=`); the agent reads it only to mask its values in a
//! failed unit's log ([`crate::evidence`]), through [`read_checked`] like secret files and
//! admin credentials.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use deploy_manifest::validate::{is_normalised_absolute, is_plain_file_name};

use crate::AgentError;
use crate::unit::EnvFile;

/// The largest secret file the agent reads (a key, a password, a few admin settings).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

fn refuse(service: &str, path: &Path, detail: impl Into<String>) -> AgentError {
    AgentError::Secrets {
        service: service.to_owned(),
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Refuse a service name that would reach the agent's own files (see the module docs).
pub fn check_service_name(service: &str, secrets_dir: &Path) -> Result<(), AgentError> {
    match deploy_manifest::validate::reserved_service_name(service) {
        Some(why) => Err(refuse(
            service,
            secrets_dir,
            format!("the service name is not allowed: {why}; rename the service"),
        )),
        None => Ok(()),
    }
}

/// Where a service's secrets may live, for error messages.
fn allowed(service: &str, secrets_dir: &Path) -> String {
    format!(
        "a service's secrets file must be {} or a file directly in {}/",
        secrets_dir.join(format!("{service}.env")).display(),
        secrets_dir.join(service).display()
    )
}

/// The env file a service gets: a declared `envFile`, which must exist, or the default
/// `<secrets dir>/<service>.env`, optional (`EnvironmentFile=-…`: one created later is read
/// at the service's next restart, and checked by every run, [`recheck`]). A declared `envFile` must be `<secrets dir>/<service>.env` or directly in
/// `<secrets dir>/<service>/`; anything else is refused without being looked at.
pub fn env_file(
    service: &str,
    declared: Option<&str>,
    secrets_dir: &Path,
    owner_uid: u32,
) -> Result<EnvFile, AgentError> {
    check_service_name(service, secrets_dir)?;
    let default = secrets_dir.join(format!("{service}.env"));
    let path = match declared {
        None => default.clone(),
        Some(p) => {
            let path = PathBuf::from(p);
            let fits = is_normalised_absolute(p)
                && (path == default
                    || path.parent() == Some(&secrets_dir.join(service))
                        && path
                            .file_name()
                            .and_then(|f| f.to_str())
                            .is_some_and(is_plain_file_name));
            if !fits {
                return Err(refuse(
                    service,
                    &path,
                    format!(
                        "not this service's own: {}; put the file there and point envFile at it (or leave envFile out for the default)",
                        allowed(service, secrets_dir)
                    ),
                ));
            }
            path
        }
    };
    if path != default {
        check_service_dir(service, secrets_dir, owner_uid)?;
    }
    match open_checked(&path, owner_uid) {
        Ok(_) => Ok(EnvFile {
            path,
            optional: declared.is_none(),
        }),
        Err(Refusal::Missing) if declared.is_none() => Ok(EnvFile {
            path,
            optional: true,
        }),
        Err(Refusal::Missing) if path != default => {
            let dir = secrets_dir.join(service);
            Err(refuse(
                service,
                &path,
                format!(
                    "the manifest names it but it does not exist; create it on this host: install -d -m 700 {} && install -m 600 /dev/null {}",
                    dir.display(),
                    path.display()
                ),
            ))
        }
        Err(Refusal::Missing) => Err(refuse(
            service,
            &path,
            format!(
                "the manifest names it but it does not exist; create it on this host: install -m 600 /dev/null {}",
                path.display()
            ),
        )),
        Err(r) => Err(refuse(service, &path, r.explain(&path, owner_uid))),
    }
}

/// Check an env file a deployed unit names, as a deploy would: a missing optional one is
/// fine; one that exists must be a regular file, not readable by others, owned by the owner.
/// Returns what is wrong and how to fix it.
pub fn recheck(file: &EnvFile, owner_uid: u32) -> Result<(), String> {
    match open_checked(&file.path, owner_uid) {
        Ok(_) => Ok(()),
        Err(Refusal::Missing) if file.optional => Ok(()),
        Err(r) => Err(format!(
            "secrets file {}: {}",
            file.path.display(),
            r.explain(&file.path, owner_uid)
        )),
    }
}

/// Read the secret file `file` of `service`: `<secrets dir>/<service>/<file>`, with its
/// trailing newlines removed.
pub fn read_secret(
    service: &str,
    file: &str,
    secrets_dir: &Path,
    owner_uid: u32,
) -> Result<String, AgentError> {
    check_service_name(service, secrets_dir)?;
    let dir = secrets_dir.join(service);
    if !is_plain_file_name(file) {
        return Err(refuse(
            service,
            &dir,
            format!(
                "secret {file:?} is not a plain file name ([A-Za-z0-9_.-], not starting with '.'); a secret is a file directly in {}/",
                dir.display()
            ),
        ));
    }
    check_service_dir(service, secrets_dir, owner_uid)?;
    let path = dir.join(file);
    let text = read_checked(&path, owner_uid).map_err(|r| {
        let detail = match r {
            Refusal::Missing => format!(
                "does not exist; the service's secrets live in {}/: install -d -m 700 {} && install -m 600 /dev/null {} (then write the secret into it)",
                dir.display(),
                dir.display(),
                path.display()
            ),
            r => r.explain(&path, owner_uid),
        };
        refuse(service, &path, detail)
    })?;
    Ok(text.trim_end_matches('\n').to_owned())
}

/// `<secrets dir>/<service>/` must be a real directory (not a symlink to someone else's)
/// owned by the agent's owner and not writable by group or others. A missing one is left to
/// the file check (which says how to create both).
fn check_service_dir(service: &str, secrets_dir: &Path, owner_uid: u32) -> Result<(), AgentError> {
    let dir = secrets_dir.join(service);
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(refuse(service, &dir, e.to_string())),
    };
    if !meta.file_type().is_dir() {
        return Err(refuse(
            service,
            &dir,
            "not a directory (a symlink is not accepted); make it a directory of its own: install -d -m 700 <it>",
        ));
    }
    if meta.uid() != owner_uid {
        return Err(refuse(
            service,
            &dir,
            format!(
                "owned by uid {}, not {owner_uid}; fix: chown {owner_uid} {}",
                meta.uid(),
                dir.display()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(
            service,
            &dir,
            format!(
                "mode {mode:o} lets others change what is in it; fix: chmod 700 {}",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Why a file was not accepted.
#[derive(Debug)]
pub enum Refusal {
    Missing,
    NotRegular,
    Mode(u32),
    Owner(u32),
    TooLarge,
    Io(std::io::Error),
}

impl Refusal {
    /// What is wrong with `path` and the command that fixes it.
    pub fn explain(&self, path: &Path, owner_uid: u32) -> String {
        let p = path.display();
        match self {
            Refusal::Missing => {
                format!("does not exist; create it on this host: install -m 600 /dev/null {p}")
            }
            Refusal::NotRegular => {
                "not a regular file (a symlink is not accepted); replace it with the file itself"
                    .into()
            }
            Refusal::Mode(mode) => {
                format!("mode {mode:o} lets others read or change it; fix: chmod 600 {p}")
            }
            Refusal::Owner(uid) => {
                format!("owned by uid {uid}, not {owner_uid}; fix: chown {owner_uid} {p}")
            }
            Refusal::TooLarge => {
                format!("larger than {MAX_SECRET_BYTES} bytes; is it the right file?")
            }
            Refusal::Io(e) => e.to_string(),
        }
    }
}

/// Open `path` without following a symlink (and without blocking on a FIFO) and check it is
/// a regular file: for a file in a directory someone else can write.
pub fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata), Refusal> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Refusal::Missing,
            // O_NOFOLLOW on a symlink: ELOOP.
            _ if e.raw_os_error() == Some(libc::ELOOP) => Refusal::NotRegular,
            _ => Refusal::Io(e),
        })?;
    let meta = file.metadata().map_err(Refusal::Io)?;
    if !meta.file_type().is_file() {
        return Err(Refusal::NotRegular);
    }
    Ok((file, meta))
}

/// [`open_regular`], and check it has no group/other bits and is owned by `owner_uid`.
pub fn open_checked(path: &Path, owner_uid: u32) -> Result<File, Refusal> {
    let (file, meta) = open_regular(path)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Refusal::Mode(mode));
    }
    if meta.uid() != owner_uid {
        return Err(Refusal::Owner(meta.uid()));
    }
    Ok(file)
}

/// Read a small secret file (see [`open_checked`]), at most [`MAX_SECRET_BYTES`].
pub fn read_checked(path: &Path, owner_uid: u32) -> Result<String, Refusal> {
    let file = open_checked(path, owner_uid)?;
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(Refusal::Io)?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        return Err(Refusal::TooLarge);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes_and_owners_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::fs::metadata(dir.path()).unwrap().uid();
        let optional = EnvFile {
            path: dir.path().join("a.env"),
            optional: true,
        };
        // Missing: still named, optionally, so that one created later is used.
        assert_eq!(env_file("a", None, dir.path(), uid).unwrap(), optional);
        assert_eq!(recheck(&optional, uid), Ok(()));
        let f = dir.path().join("a.env");
        write(&f, "K=v\n", 0o644);
        let e = recheck(&optional, uid).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        let e = env_file("a", None, dir.path(), uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(env_file("a", None, dir.path(), uid).unwrap(), optional);
        assert_eq!(recheck(&optional, uid), Ok(()));
        assert!(recheck(&optional, uid + 1).is_err());
        assert!(recheck(&EnvFile::required(dir.path().join("gone.env")), uid).is_err());
        let e = env_file("a", None, dir.path(), uid + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chown"), "{e}");
        let missing = dir.path().join("a/nope.env");
        let e = env_file("a", missing.to_str(), dir.path(), uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn env_file_is_confined_to_the_services_own() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let uid = std::fs::metadata(s).unwrap().uid();
        write(&s.join("a.env"), "A=1\n", 0o600);
        write(&s.join("a/extra.env"), "A=1\n", 0o600);
        write(&s.join("b.env"), "B=1\n", 0o600);
        write(&s.join("b/extra.env"), "B=1\n", 0o600);
        write(&s.join("infra-db.env"), "PGPASSWORD=x\n", 0o600);
        write(&s.join("deployer/a.env"), "X=1\n", 0o600);
        write(&s.join("b/b.env"), "B=1\n", 0o600);
        let outside = tempfile::tempdir().unwrap();
        write(&outside.path().join("b.env"), "B=1\n", 0o600);
        write(&outside.path().join("b/x"), "B=1\n", 0o600);
        let path = |p: &Path| p.display().to_string();
        // What b may use.
        for good in [s.join("b.env"), s.join("b/extra.env"), s.join("b/b.env")] {
            assert_eq!(
                env_file("b", Some(&path(&good)), s, uid).unwrap(),
                EnvFile::required(good.clone())
            );
        }
        // Anything else, however it is spelled, and wherever the file is.
        for bad in [
            path(&s.join("a.env")),
            path(&s.join("a/extra.env")),
            path(&s.join("infra-db.env")),
            path(&s.join("deployer/a.env")),
            path(&s.join("deployer/b.env")),
            path(&outside.path().join("b.env")),
            path(&outside.path().join("b/x")),
            format!("{}/b/../a.env", s.display()),
            format!("{}/./b.env", s.display()),
            format!("{}//b.env", s.display()),
            "/etc/shadow".to_owned(),
            "/etc/b.env".to_owned(),
        ] {
            let e = env_file("b", Some(&bad), s, uid).unwrap_err().to_string();
            assert!(e.contains("not this service's own"), "{bad}: {e}");
            assert!(e.contains(&path(&s.join("b.env"))), "says where: {e}");
            assert!(
                !e.contains("chmod"),
                "never advises changing a foreign file: {e}"
            );
        }
        // Reserved names never reach the agent's own files.
        for name in ["deployer", "infra-db"] {
            assert!(env_file(name, None, s, uid).is_err(), "{name}");
            assert!(read_secret(name, "a.env", s, uid).is_err(), "{name}");
        }
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let uid = std::fs::metadata(s).unwrap().uid();
        write(&s.join("a.env"), "A=1\n", 0o600);
        write(&s.join("a/key"), "a-secret\n", 0o600);
        std::os::unix::fs::symlink(s.join("a.env"), s.join("b.env")).unwrap();
        let e = env_file("b", None, s, uid).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // A symlinked file in the service's directory, and a symlinked directory.
        std::fs::create_dir(s.join("b")).unwrap();
        std::os::unix::fs::symlink(s.join("a/key"), s.join("b/key")).unwrap();
        let e = read_secret("b", "key", s, uid).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        std::os::unix::fs::symlink(s.join("a"), s.join("c")).unwrap();
        let e = read_secret("c", "key", s, uid).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        let e = env_file("c", Some(&format!("{}/c/key", s.display())), s, uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink"), "{e}");
        // A FIFO does not block the agent.
        let fifo = s.join("d.env");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = env_file("d", None, s, uid).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn secrets_are_read_from_the_services_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let uid = std::fs::metadata(s).unwrap().uid();
        write(&s.join("a/key"), "a-secret\n", 0o600);
        write(&s.join("b/key"), "b-secret\n", 0o600);
        write(&s.join("key"), "top-level\n", 0o600);
        assert_eq!(read_secret("b", "key", s, uid).unwrap(), "b-secret");
        for bad in ["../a/key", "../key", ".key", "a/key", ""] {
            let e = read_secret("b", bad, s, uid).unwrap_err().to_string();
            assert!(e.contains("plain file name"), "{bad}: {e}");
        }
        let e = read_secret("b", "a.env", s, uid).unwrap_err().to_string();
        assert!(
            e.contains("does not exist")
                && e.contains(&format!("install -d -m 700 {}", s.join("b").display())),
            "{e}"
        );
        write(&s.join("b/open"), "x\n", 0o640);
        let e = read_secret("b", "open", s, uid).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(s.join("b"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = read_secret("b", "key", s, uid).unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }
}
