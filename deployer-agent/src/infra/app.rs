//! What a service gets from its infrastructure: `DATABASE_URL`, `REDIS_URL`, its own
//! requirements' env and its templated values, resolved and written to its generated env
//! file (`<secrets>/deployer/<service>.env`, mode 600).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use deploy_manifest::model::{Dialect, Manifest, Service};

use super::redis::{redis_index, redis_url};
use super::{Endpoint, err};
use crate::AgentError;

/// Where the agent keeps what it generates for services (env files, database passwords).
pub(super) fn generated_dir(secrets_dir: &Path) -> PathBuf {
    secrets_dir.join("deployer")
}

/// [`generated_dir`] (or `dir`, the same), made (mode 700) if it is not there.
fn make_generated_dir(dir: PathBuf) -> Result<PathBuf, AgentError> {
    std::fs::create_dir_all(&dir).map_err(|e| err("secrets", e.to_string()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("secrets", e.to_string()))?;
    Ok(dir)
}

/// Keep `text`, a secret the agent made, at `path` in [`generated_dir`] (the directory
/// mode 700, the file 600, written atomically).
pub(super) fn keep_generated(path: &Path, text: &str, what: &str) -> Result<(), AgentError> {
    make_generated_dir(
        path.parent()
            .expect("in the generated directory")
            .to_owned(),
    )?;
    deploy_manifest::fsutil::write_atomically(path, text.as_bytes(), 0o600)
        .map_err(|e| err(what, format!("{}: {e}", path.display())))
}

/// Write a server's config file `path` (mode 600) when it does not already say `text`.
pub(super) fn write_if_changed(path: &Path, text: &str, what: &str) -> Result<(), AgentError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    deploy_manifest::fsutil::write_atomically(path, text.as_bytes(), 0o600)
        .map_err(|e| err(what, format!("{}: {e}", path.display())))
}

/// Where the database password the agent generated for `service` is kept.
pub fn password_path(secrets_dir: &Path, service: &str, dialect: Dialect) -> PathBuf {
    let kind = match dialect {
        Dialect::Postgres => "postgres",
        Dialect::Mysql => "mysql",
    };
    generated_dir(secrets_dir).join(format!("{service}.{kind}-password"))
}

/// Every database password the agent may keep for `service`.
pub fn password_paths(secrets_dir: &Path, service: &str) -> [PathBuf; 2] {
    [Dialect::Postgres, Dialect::Mysql].map(|d| password_path(secrets_dir, service, d))
}

/// Where the password of a password-protected Redis `infra_name` is kept.
pub fn redis_password_path(secrets_dir: &Path, infra_name: &str) -> PathBuf {
    generated_dir(secrets_dir).join(format!("infra-{infra_name}.redis-password"))
}

/// A new password: 24 random bytes, hex.
pub fn new_password() -> Result<String, AgentError> {
    random_secret(24)
}

/// `n` random bytes from the kernel, hex.
pub(super) fn random_secret(n: usize) -> Result<String, AgentError> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| err("password", format!("reading /dev/urandom: {e}")))?;
    Ok(deploy_manifest::hex(&bytes))
}

/// `e` without `secret` in its text: a server's error may quote the statement that
/// carried it.
pub fn redact(e: AgentError, secret: &str) -> AgentError {
    match e {
        AgentError::Infra { what, detail } => AgentError::Infra {
            what,
            detail: detail.replace(secret, "<password>"),
        },
        other => other,
    }
}

/// The password kept in `path` (checked like every secret file), if there is one.
pub fn read_password(path: &Path, owner_uid: u32) -> Result<Option<String>, AgentError> {
    match crate::secrets::read_checked(path, owner_uid) {
        Ok(p) => Ok(Some(p.trim().to_owned()).filter(|p| !p.is_empty())),
        Err(crate::secrets::Refusal::Missing) => Ok(None),
        Err(r) => Err(err(
            "password",
            format!("{}: {}", path.display(), r.explain(path, owner_uid)),
        )),
    }
}

/// The connection URL env vars of `service` (`DATABASE_URL`, `REDIS_URL`), creating its
/// role and database, or assigning its Redis index, on the way.
pub struct AppLayer<'a> {
    pub secrets_dir: &'a Path,
    pub state_dir: &'a Path,
    /// Who must own the secret files the agent reads: root (the agent's own user with
    /// `--user`).
    pub owner_uid: u32,
}

impl AppLayer<'_> {
    /// Everything `service` gets from its infrastructure, resolved (the infrastructure
    /// itself started already; `infra` is this host's, as it runs: [`super::host_specs`]):
    /// `DATABASE_URL` (creating its user and database), `REDIS_URL` (assigning its index
    /// in a shared Redis; `indexes` is the state's copy, Redis wins), the env of its own
    /// requirements and its templated env values, written to its generated env file. That
    /// file, if there is anything in it.
    pub fn app_env(
        &self,
        service: &Service,
        manifest: &Manifest,
        infra: &BTreeMap<String, super::HostSpec>,
        indexes: &mut BTreeMap<String, u32>,
    ) -> Result<Option<PathBuf>, AgentError> {
        // A reserved name (`deployer`, `infra-*`) would reach the agent's own files.
        crate::secrets::check_service_name(&service.name, self.secrets_dir)?;
        let binding = super::binding(service, manifest)?;
        let at = |name: &str| {
            let h = infra
                .get(name)
                .ok_or_else(|| err(name, "is not declared for this host"))?;
            Ok::<_, AgentError>((&h.spec, super::endpoint_of(name, h)?))
        };
        let mut vars = BTreeMap::new();
        if let Some((name, dialect)) = &binding.database {
            let (spec, ep) = at(name)?;
            let url = match dialect {
                Dialect::Postgres => {
                    let config = spec.postgres_config().map_err(|e| err(name, e))?;
                    self.database_url(&service.name, &ep, name, &config)?
                }
                Dialect::Mysql => self.mysql_url(&service.name, &ep, name)?,
            };
            vars.insert("DATABASE_URL".to_owned(), url);
        }
        if let Some((name, dedicated)) = &binding.redis {
            let (spec, ep) = at(name)?;
            let password = match super::redis::password_wanted(spec) {
                true => Some(self.redis_password(name)?),
                false => None,
            };
            // Its own server is all the service's: DB 0. A shared one gives an index.
            let index = match dedicated {
                true => 0,
                false => {
                    let (index, in_redis) =
                        redis_index(&ep, password.as_deref(), &service.name, indexes)?;
                    for (name, i) in in_redis {
                        if name == service.name || indexes.contains_key(&name) {
                            indexes.insert(name, i);
                        }
                    }
                    index
                }
            };
            vars.insert(
                "REDIS_URL".to_owned(),
                redis_url(&ep, password.as_deref(), index),
            );
        }
        if let (Some(name), Some(need)) = (
            &binding.s3,
            service.infrastructure.as_ref().and_then(|i| i.s3()),
        ) {
            let (spec, ep) = at(name)?;
            vars.extend(self.s3_env(&service.name, &need, spec, &ep, name)?);
        }
        for (req, full) in &binding.owned {
            // Not among this host's (a version being returned to declared it): as declared.
            let own = service
                .infrastructure
                .as_ref()
                .and_then(|i| i.services.get(req));
            let (spec, ep) = match (infra.get(full), own) {
                (None, Some(spec)) => (spec, super::endpoint(full, spec)),
                _ => at(full)?,
            };
            for (k, v) in &spec.env {
                let (value, _) = resolve(
                    &service.name,
                    k,
                    v,
                    Some(&ep),
                    &spec.secrets,
                    self.secrets_dir,
                    self.owner_uid,
                )?;
                vars.insert(k.clone(), value);
            }
        }
        for (k, v) in &service.env {
            if v.contains("${") {
                let (value, _) = resolve(
                    &service.name,
                    k,
                    v,
                    None,
                    &Default::default(),
                    self.secrets_dir,
                    self.owner_uid,
                )?;
                vars.insert(k.clone(), value);
            }
        }
        self.write_env(&service.name, &vars)
    }

    /// The password this host's agent generated for `service`'s database, if it keeps one.
    pub(super) fn kept_password(
        &self,
        service: &str,
        dialect: Dialect,
    ) -> Result<Option<String>, AgentError> {
        self.generated_dir()?;
        read_password(
            &password_path(self.secrets_dir, service, dialect),
            self.owner_uid,
        )
    }

    /// The password of the password-protected Redis `infra_name` (made when it was
    /// prepared, before it started).
    fn redis_password(&self, infra_name: &str) -> Result<String, AgentError> {
        let path = redis_password_path(self.secrets_dir, infra_name);
        read_password(&path, self.owner_uid)?.ok_or_else(|| {
            err(
                infra_name,
                format!(
                    "{} is missing; the next run that starts it makes one",
                    path.display()
                ),
            )
        })
    }

    /// Keep `password` for `service`'s database (mode 600), once it was set.
    pub(super) fn keep_password(
        &self,
        service: &str,
        dialect: Dialect,
        password: &str,
    ) -> Result<(), AgentError> {
        let path = password_path(self.secrets_dir, service, dialect);
        keep_generated(&path, password, service)
    }

    pub(super) fn generated_dir(&self) -> Result<PathBuf, AgentError> {
        make_generated_dir(generated_dir(self.secrets_dir))
    }

    /// The admin credentials of the external server `infra_name`: the `KEY=value` lines of
    /// `<secrets>/infra-<name>.env` (checked like every secret file; no service can name
    /// it), values unquoted; `wanted` says what the operator writes there.
    pub(super) fn admin_credentials(
        &self,
        infra_name: &str,
        wanted: &str,
    ) -> Result<(PathBuf, Vec<(String, String)>), AgentError> {
        let path = self.secrets_dir.join(format!("infra-{infra_name}.env"));
        let text = crate::secrets::read_checked(&path, self.owner_uid).map_err(|r| {
            err(
                infra_name,
                format!(
                    "admin credentials {}: {}; write {wanted} there (mode 600)",
                    path.display(),
                    r.explain(&path, self.owner_uid)
                ),
            )
        })?;
        let pairs = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect();
        Ok((path, pairs))
    }

    /// Write the generated env file of `service` (mode 600); `None` when there is nothing.
    pub fn write_env(
        &self,
        service: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<PathBuf>, AgentError> {
        let path = self.generated_dir()?.join(format!("{service}.env"));
        if vars.is_empty() {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let mut text = String::from(
            "# Generated by deployer-agent: connection settings and resolved secrets.\n",
        );
        for (k, v) in vars {
            text.push_str(&format!("{k}={}\n", env_file_quote(v)?));
        }
        deploy_manifest::fsutil::write_atomically(&path, text.as_bytes(), 0o600)
            .map_err(|e| err(service, format!("{}: {e}", path.display())))?;
        Ok(Some(path))
    }
}

/// A value for a systemd EnvironmentFile: double-quoted, `\ " $` and backtick escaped; a
/// control character is refused.
fn env_file_quote(v: &str) -> Result<String, AgentError> {
    if v.chars().any(|c| c.is_control()) {
        return Err(err(
            "env",
            "a value with a control character cannot go into an env file",
        ));
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// Resolve `${host}`, `${port:name}` and `${secret:name}` in `value`. `ep` gives host and
/// ports (absent for a service's own env). `${secret:name}` is the file
/// `<secrets>/<service>/<file>`, where `file` is what the requirement's `secrets` map gives
/// for `name` (or `name` itself): only the service's own secrets, checked like every secret
/// file ([`crate::secrets::read_secret`]).
pub fn resolve(
    service: &str,
    key: &str,
    value: &str,
    ep: Option<&Endpoint>,
    secrets: &BTreeMap<String, String>,
    secrets_dir: &Path,
    owner_uid: u32,
) -> Result<(String, bool), AgentError> {
    use deploy_manifest::template::{Placeholder, expand};
    let mut lookup = |p: Placeholder<'_>| -> Result<String, String> {
        match p {
            Placeholder::Host => ep
                .map(|e| e.host.clone())
                .ok_or_else(|| "${host} has no infrastructure service here".to_owned()),
            Placeholder::Port(name) => ep
                .and_then(|e| e.ports.get(name))
                .map(u16::to_string)
                .ok_or_else(|| format!("unknown port {name:?}")),
            Placeholder::Secret(name) => {
                let file = secrets.get(name).map(String::as_str).unwrap_or(name);
                crate::secrets::read_secret(service, file, secrets_dir, owner_uid)
                    .map_err(|e| format!("secret {name:?}: {e}"))
            }
        }
    };
    expand(value, &mut lookup).map_err(|detail| err(&format!("{service}: env {key}"), detail))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn templates_resolve_or_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        std::fs::create_dir(dir.path().join("app")).unwrap();
        for (file, text) in [
            ("app/search_api_key", "k3y\n"),
            ("other.env", "x\n"),
            ("infra-db.env", "PGPASSWORD=x\n"),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
            std::fs::set_permissions(
                dir.path().join(file),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        let ep = Endpoint {
            name: "search".into(),
            host: "127.0.0.1".into(),
            ports: [("http".to_owned(), 9200)].into(),
            unit: None,
            preset: None,
            critical: true,
            startup_timeout: Duration::from_secs(1),
        };
        let secrets = [("apiKey".to_owned(), "search_api_key".to_owned())].into();
        let r = |v: &str| resolve("app", "K", v, Some(&ep), &secrets, dir.path(), uid);
        assert_eq!(
            r("http://${host}:${port:http}").unwrap(),
            ("http://127.0.0.1:9200".into(), false)
        );
        assert_eq!(r("${secret:apiKey}").unwrap(), ("k3y".into(), true));
        for bad in [
            "${port:grpc}",
            "${nope}",
            "${secret:missing}",
            "${host",
            // Another service's or the infrastructure's secrets, however they are named.
            "${secret:other.env}",
            "${secret:infra-db.env}",
            "${secret:../other.env}",
            "${secret:../app/search_api_key}",
        ] {
            let e = r(bad).unwrap_err().to_string();
            assert!(e.contains("app: env K"), "{bad}: {e}");
        }
        assert!(resolve("app", "K", "${host}", None, &secrets, dir.path(), uid).is_err());
        for file in ["../other.env", "../infra-db.env", ".hidden"] {
            let e = resolve(
                "app",
                "K",
                "${secret:x}",
                None,
                &[("x".to_owned(), file.to_owned())].into(),
                dir.path(),
                uid,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("plain file name"), "{file}: {e}");
        }
    }

    #[test]
    fn env_file_values_are_quoted() {
        assert_eq!(
            env_file_quote(r#"a"b$c`d\e"#).unwrap(),
            r#""a\"b\$c\`d\\e""#
        );
        assert!(env_file_quote("a\nb").is_err());
    }
}
