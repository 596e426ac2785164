//! Run a namespace's build and say what it produced. The build's own output goes to our
//! stderr as it happens, so a failure shows why; our stdout stays free for `--json`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::PushError;
use crate::config::Build;

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Built {
    /// A directory to archive.
    Directory(PathBuf),
    /// A path in the Nix store (`/nix/store/<hash>-<name>`).
    StorePath(String),
}

fn stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

/// Run `program args…` in `dir`; its stdout is returned, its stderr shown.
fn run(
    namespace: &str,
    dir: &Path,
    program: &str,
    args: &[&str],
    capture: bool,
) -> Result<String, PushError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .env("DEPLOY_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(if capture { Stdio::piped() } else { stderr() })
        .stderr(stderr());
    let output = cmd.output().map_err(|e| PushError::BuildFailed {
        namespace: namespace.to_owned(),
        detail: format!("cannot run {program}: {e}"),
    })?;
    if !output.status.success() {
        return Err(PushError::BuildFailed {
            namespace: namespace.to_owned(),
            detail: format!(
                "`{program} {}` {}; its output is above",
                args.join(" "),
                match output.status.code() {
                    Some(c) => format!("exited with status {c}"),
                    None => "was killed by a signal".to_owned(),
                }
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The top-level store path containing `path`, if it is inside `/nix/store`.
fn store_path_of(path: &Path) -> Option<String> {
    let rest = path.strip_prefix("/nix/store").ok()?;
    let first = rest.components().next()?;
    Some(format!(
        "/nix/store/{}",
        first.as_os_str().to_string_lossy()
    ))
}

/// Run the build in `dir` (the config file's directory).
pub fn build(namespace: &str, dir: &Path, build: &Build) -> Result<Built, PushError> {
    let _span = tracing::info_span!("build", namespace).entered();
    match build {
        Build::Archive {
            command, output, ..
        } => {
            run(namespace, dir, "sh", &["-c", command], false)?;
            if !output.is_dir() {
                return Err(PushError::BuildFailed {
                    namespace: namespace.to_owned(),
                    detail: format!(
                        "the build succeeded but its output {} is not a directory; fix `output` in deploy.toml",
                        output.display()
                    ),
                });
            }
            Ok(Built::Directory(output.clone()))
        }
        Build::NixAttribute { file, attribute } => {
            let file = file.to_string_lossy();
            let out = run(
                namespace,
                dir,
                "nix-build",
                &[&file, "-A", attribute, "--no-out-link"],
                true,
            )?;
            let path = out.lines().rev().find(|l| l.starts_with("/nix/store/"));
            path.map(|p| Built::StorePath(p.trim().to_owned()))
                .ok_or_else(|| PushError::BuildFailed {
                    namespace: namespace.to_owned(),
                    detail: format!("nix-build printed no store path: {out:?}"),
                })
        }
        Build::NixCommand { command, output } => {
            run(namespace, dir, "sh", &["-c", command], false)?;
            let resolved = output.canonicalize().map_err(|e| PushError::BuildFailed {
                namespace: namespace.to_owned(),
                detail: format!("the build's output {}: {e}", output.display()),
            })?;
            if let Some(p) = store_path_of(&resolved) {
                return Ok(Built::StorePath(p));
            }
            let out = run(
                namespace,
                dir,
                "nix-store",
                &["--add", &resolved.to_string_lossy()],
                true,
            )?;
            Ok(Built::StorePath(out.trim().to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_found_from_inner_paths() {
        assert_eq!(
            store_path_of(Path::new("/nix/store/abc-x/bin/x")).as_deref(),
            Some("/nix/store/abc-x")
        );
        assert_eq!(store_path_of(Path::new("/tmp/x")), None);
    }
}
