//! System accounts, looked up through the C library (NSS: /etc/passwd, LDAP, systemd's
//! dynamic users, whatever the host is configured with), as systemd itself will when it
//! starts a unit with `User=`.

use std::ffi::CString;

/// Run a reentrant NSS lookup (`getpwnam_r`, `getgrnam_r`) of `name` with a buffer that
/// grows until the entry fits; what `call` made of the entry, if there is one.
fn lookup<T>(
    name: &str,
    mut call: impl FnMut(&CString, &mut [u8]) -> (i32, Option<T>),
) -> Option<T> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        let (rc, found) = call(&c, &mut buf);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return if rc == 0 { found } else { None };
    }
}

/// The uid and primary gid of user `name`, if the host has one.
pub fn user(name: &str) -> Option<(u32, u32)> {
    lookup(name, |c, buf| {
        // SAFETY: all pointers point to live, properly sized memory owned here; `getpwnam_r`
        // writes only into `pwd`, `buf` (at most `buf.len()` bytes) and `result`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, (!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
    })
}

/// Whether the host has a group `name`.
pub fn group_exists(name: &str) -> bool {
    lookup(name, |c, buf| {
        // SAFETY: as in `user`, with `getgrnam_r`.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, (!result.is_null()).then_some(()))
    })
    .is_some()
}

/// Whether `path` is a directory reached through no symlink (its canonical path is itself):
/// what [`check_exec`] asks of a writable path on the real host.
pub fn plain_dir(path: &str) -> bool {
    std::fs::canonicalize(path).is_ok_and(|c| c == std::path::Path::new(path) && c.is_dir())
}

/// What `exec` needs of the host and is not there, with how to fix it. `user_of` and
/// `group_of` look accounts up; `dir_exists` says whether a path is a directory reached
/// through no symlink (a link could lead a writable path anywhere); `protected` are the
/// agent's own directories (its state, its secrets, its units), never writable by a service.
pub fn check_exec(
    exec: &deploy_manifest::model::Exec,
    protected: &[&str],
    user_of: impl Fn(&str) -> bool,
    group_of: impl Fn(&str) -> bool,
    dir_exists: impl Fn(&str) -> bool,
) -> Result<(), String> {
    use deploy_manifest::model::RunAs;
    if let RunAs::Account(name) = exec.run_as()
        && !user_of(name)
    {
        return Err(format!(
            "exec.user: this host has no account {name:?}; create it (useradd --system --user-group {name}), or leave exec.user out to run as root, or set it to null for a dynamic user made while the service runs"
        ));
    }
    if let Some(group) = &exec.group
        && !group_of(group)
    {
        return Err(format!(
            "exec.group: this host has no group {group:?}; create it (groupadd --system {group}) or leave exec.group out"
        ));
    }
    for path in &exec.writable_paths {
        if let Some(why) = deploy_manifest::validate::writable_path_problem(path, protected) {
            return Err(format!("exec.writablePaths: {why}"));
        }
        if !dir_exists(path) {
            return Err(format!(
                "exec.writablePaths: {path} is not a directory on this host, or is reached through a symlink (refused: it could lead anywhere); create it (owned by the service's account), or use the service's state directory ($STATE_DIRECTORY) instead"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_a_made_up_name_does_not() {
        assert_eq!(user("root"), Some((0, 0)));
        assert!(group_exists("root"));
        assert_eq!(user("no-such-account-here"), None);
        assert!(!group_exists("no-such-group-here"));
        assert_eq!(user("ro\0ot"), None);
    }

    #[test]
    fn a_writable_path_through_a_symlink_is_not_a_plain_dir() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap().join("data");
        std::fs::create_dir(&real).unwrap();
        let link = real.with_file_name("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = real.with_file_name("file");
        std::fs::write(&file, "").unwrap();
        assert!(plain_dir(real.to_str().unwrap()));
        assert!(
            !plain_dir(link.to_str().unwrap()),
            "a symlink to a directory"
        );
        assert!(!plain_dir(link.join(".").to_str().unwrap()));
        assert!(!plain_dir(file.to_str().unwrap()), "a file");
        assert!(!plain_dir(real.join("gone").to_str().unwrap()), "missing");
    }

    #[test]
    fn what_an_exec_needs_is_checked() {
        let exec: deploy_manifest::model::Exec = serde_json::from_value(serde_json::json!({
            "command": null, "user": "app", "group": "app", "writablePaths": ["/srv/app"]
        }))
        .unwrap();
        let yes = |_: &str| true;
        assert_eq!(check_exec(&exec, &[], yes, yes, yes), Ok(()));
        let e = check_exec(&exec, &[], |u| u != "app", yes, yes).unwrap_err();
        assert!(
            e.contains("no account \"app\"") && e.contains("useradd"),
            "{e}"
        );
        let e = check_exec(&exec, &[], yes, |_| false, yes).unwrap_err();
        assert!(e.contains("groupadd --system app"), "{e}");
        let e = check_exec(&exec, &[], yes, yes, |_| false).unwrap_err();
        assert!(e.contains("/srv/app is not a directory"), "{e}");
        // The agent's own directories, wherever this host keeps them.
        let e = check_exec(&exec, &["/srv"], yes, yes, yes).unwrap_err();
        assert!(e.contains("overlaps /srv"), "{e}");
        // A dynamic user and root need no account.
        for exec in [
            serde_json::json!({"command": null, "user": null}),
            serde_json::json!({"command": null}),
        ] {
            let exec: deploy_manifest::model::Exec = serde_json::from_value(exec).unwrap();
            assert_eq!(check_exec(&exec, &[], |_| false, |_| false, yes), Ok(()));
        }
    }
}
