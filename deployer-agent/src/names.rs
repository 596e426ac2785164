//! Every name the agent generates: units, log files, proxy upstreams and route ids, the
//! directories of infrastructure. One place, so that no two things can get the same name.
//!
//! Names the manifest gives (services, infrastructure services, a service's own
//! infrastructure requirements) match `[a-z0-9][a-z0-9_-]*`: they never contain a dot. A
//! service's units carry its own name, so that `systemctl restart <service>` and
//! `journalctl -u <service>` work as typed: `<service>[.<role>].service`, where the role,
//! after the one dot, says which unit of that service it is: none for the service itself,
//! `<port>` for a zero-downtime generation, `release` for the release command, `probe-<hex>`
//! for one run of an exec probe. Infrastructure's units are `deployer-infra-<name>.service`
//! (and `deployer-infra-<name>.probe-<hex>.service`); the validator refuses service names
//! `deployer`, `deployer-*`, `infra-*` and `systemd-*`, so none of these can be a service's. [`parse_unit`] reads a name back, and also the names units of a service
//! had before (`deployer-<service>[.<role>].service`), so a host deployed by an older agent
//! converges ([`legacy_service_unit`]).
//!
//! A name of that shape can still belong to somebody else (`nginx.service`): a unit is ours
//! only when its file carries our header or, loaded without a file, our description; the
//! plan refuses to write a unit whose name systemd already gives to another file
//! (`plan::foreign`).
//!
//! A service's own infrastructure requirement `<req>` is the infrastructure service
//! `<service>-<req>` (its unit `deployer-infra-<service>-<req>.service`, as documented); the
//! validator refuses a manifest in which two of those, or one of those and a shared
//! infrastructure service, get the same name (`validate.rs`, naming both).

use std::path::{Path, PathBuf};

const PREFIX: &str = "deployer-";
const SUFFIX: &str = ".service";

/// The unit of service `service`: `<service>.service`.
pub fn service_unit(service: &str) -> String {
    format!("{service}{SUFFIX}")
}

/// The unit `service` ran as before units carried the service's own name
/// (`deployer-<service>.service`): a recorded one is renamed at the next run.
pub fn legacy_service_unit(service: &str) -> String {
    format!("{PREFIX}{service}{SUFFIX}")
}

/// Whether `description` is what a unit of ours in `role` is described as (a loaded unit
/// whose file is gone is told as ours by it).
pub fn describes(role: &UnitRole, description: &str) -> bool {
    match role {
        UnitRole::Service(s) | UnitRole::Generation { service: s, .. } => {
            description == self::description(s)
        }
        UnitRole::Release(s) => description == format!("{} release", self::description(s)),
        UnitRole::Infra(name) => description == infra_description(name),
        UnitRole::Probe(_) => description.starts_with("deployer probe: "),
    }
}

/// The `Description=` of infrastructure service `name`'s unit.
pub fn infra_description(name: &str) -> String {
    format!("deployer infrastructure: {name}")
}

/// The `Description=` of `service`'s units (its release unit adds ` release`).
pub fn description(service: &str) -> String {
    format!("deployer: {service}")
}

/// The state directory (under /var/lib) of every unit of `service` (its generations, its
/// release, its probes): `deployer-<service>`, the service's `$STATE_DIRECTORY`.
pub fn state_directory(service: &str) -> String {
    format!("{PREFIX}{service}")
}

/// The dynamic account (`"user": null`) of every unit of `service`, so its probes and its
/// release share the service's uid: `deployer-<service>` (the validator keeps it within the
/// 31 characters of an account name, and refuses `deployer-*` as a named `exec.user`).
pub fn dynamic_user(service: &str) -> String {
    format!("{PREFIX}{service}")
}

/// The unit of a zero-downtime generation of `service` listening on `port`.
pub fn generation_unit(service: &str, port: u16) -> String {
    format!("{service}.{port}{SUFFIX}")
}

/// The one-shot unit that runs `service`'s release command.
pub fn release_unit(service: &str) -> String {
    format!("{service}.release{SUFFIX}")
}

/// The unit of infrastructure service `name` (shared, or `<service>-<req>`).
pub fn infra_unit(name: &str) -> String {
    format!("{PREFIX}infra-{name}{SUFFIX}")
}

/// The name of one run of an exec probe of `owner` (a service name, or [`infra_owner`]):
/// `<owner>.probe-<hex>.service`.
pub fn probe_unit(owner: &str, hex: &str) -> String {
    format!("{owner}.probe-{hex}{SUFFIX}")
}

/// The probe owner of infrastructure service `name`: its unit's stem.
pub fn infra_owner(name: &str) -> String {
    format!("{PREFIX}infra-{name}")
}

/// The infrastructure service that is `service`'s own requirement `req`.
pub fn owned_infra(service: &str, req: &str) -> String {
    format!("{service}-{req}")
}

/// What a unit of ours is, read back from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitRole {
    /// `<service>.service`
    Service(String),
    /// `<service>.<port>.service`
    Generation { service: String, port: u16 },
    /// `<service>.release.service`
    Release(String),
    /// `deployer-infra-<name>.service`
    Infra(String),
    /// `<owner>.probe-<hex>.service`: transient, ends with its probe.
    Probe(String),
}

/// Which unit of ours `unit` would be, by its shape (`None`: none of ours has that name,
/// `deployer.service`, the agent itself, included). The shape alone does not make it ours:
/// see the module's notes. Names of an older agent (`deployer-<service>[.<role>].service`)
/// read as the same roles.
pub fn parse_unit(unit: &str) -> Option<UnitRole> {
    let stem = unit.strip_suffix(SUFFIX)?;
    let name_ok = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
    };
    let (owner, role) = match stem.split_once('.') {
        Some((owner, role)) => (owner, Some(role)),
        None => (stem, None),
    };
    // Infrastructure, or a service's unit named by an older agent; a service of its own is
    // never `deployer` nor `deployer-*` (the validator refuses them).
    let (owner, infra) = match owner.strip_prefix(PREFIX) {
        Some(rest) => match rest.strip_prefix("infra-") {
            Some(infra) => (infra, true),
            None => (rest, false),
        },
        None if owner == "deployer" || owner.starts_with("systemd-") => return None,
        None => (owner, false),
    };
    if !name_ok(owner) {
        return None;
    }
    let owner = owner.to_owned();
    match role {
        None if infra => Some(UnitRole::Infra(owner)),
        None => Some(UnitRole::Service(owner)),
        Some(r) if r.starts_with("probe-") => {
            let hex = &r["probe-".len()..];
            let owner = if infra { infra_owner(&owner) } else { owner };
            (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .then_some(UnitRole::Probe(owner))
        }
        Some(_) if infra => None,
        Some("release") => Some(UnitRole::Release(owner)),
        Some(port) => {
            let valid = !port.starts_with('0') && port.bytes().all(|b| b.is_ascii_digit());
            let port = port.parse::<u16>().ok().filter(|_| valid)?;
            Some(UnitRole::Generation {
                service: owner,
                port,
            })
        }
    }
}

/// The log file of a unit under a user manager (no journal there): `<logs>/<unit stem>.log`.
pub fn log_file(logs: &Path, unit: &str) -> PathBuf {
    let stem = unit.strip_suffix(SUFFIX).unwrap_or(unit);
    logs.join(format!("{}.log", stem.strip_prefix(PREFIX).unwrap_or(stem)))
}

/// The directory of infrastructure service `name`: `<state>/infra/<name>`.
pub fn infra_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("infra").join(name)
}

/// The `@id` of `service`'s Caddy route. Routes without this prefix are never touched.
pub fn caddy_route_id(service: &str) -> String {
    format!("{PREFIX}{service}")
}

/// Whether a Caddy route `@id` is one of ours.
pub fn is_caddy_route_id(id: &str) -> bool {
    id.starts_with(PREFIX)
}

/// The nginx upstream of `service`: `deployer-<service>` (service names are valid host
/// names for `proxy_pass`, and distinct services get distinct upstreams).
pub fn upstream(service: &str) -> String {
    format!("{PREFIX}{service}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Names that used to collide: `app`'s release unit was service `app-release`'s unit,
    /// `app`'s generation on 20001 was service `app-20001`'s, `a-b` and `a_b` shared an
    /// nginx upstream.
    const TRICKY: &[&str] = &[
        "app",
        "app-release",
        "app-20001",
        "a-b",
        "a_b",
        "db",
        "probe",
        "app-probe",
    ];

    #[test]
    fn generated_names_never_collide() {
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut add = |name: String, what: String| {
            if let Some(before) = seen.insert(name.clone(), what.clone()) {
                panic!("{name} is both {before} and {what}");
            }
        };
        for s in TRICKY {
            add(service_unit(s), format!("service {s}"));
            add(release_unit(s), format!("release of {s}"));
            add(generation_unit(s, 20001), format!("generation of {s}"));
            add(infra_unit(s), format!("infrastructure {s}"));
            add(probe_unit(s, "00ff"), format!("probe of {s}"));
            add(upstream(s) + " (upstream)", format!("upstream of {s}"));
        }
    }

    #[test]
    fn unit_names_read_back() {
        for s in TRICKY {
            assert_eq!(
                parse_unit(&service_unit(s)),
                Some(UnitRole::Service(s.to_string()))
            );
            assert_eq!(
                parse_unit(&release_unit(s)),
                Some(UnitRole::Release(s.to_string()))
            );
            assert_eq!(
                parse_unit(&generation_unit(s, 20001)),
                Some(UnitRole::Generation {
                    service: s.to_string(),
                    port: 20001
                })
            );
            assert_eq!(
                parse_unit(&infra_unit(s)),
                Some(UnitRole::Infra(s.to_string()))
            );
            assert_eq!(
                parse_unit(&probe_unit(s, "00ff")),
                Some(UnitRole::Probe(s.to_string()))
            );
        }
        // What an older agent named a service's units reads as the same roles.
        let legacy = [
            ("deployer-app.service", UnitRole::Service("app".into())),
            (
                "deployer-app.release.service",
                UnitRole::Release("app".into()),
            ),
            (
                "deployer-app.20001.service",
                UnitRole::Generation {
                    service: "app".into(),
                    port: 20001,
                },
            ),
            (
                "deployer-infra-db.probe-0a.service",
                UnitRole::Probe("deployer-infra-db".into()),
            ),
        ];
        for (name, role) in legacy {
            assert_eq!(parse_unit(name), Some(role), "{name}");
        }
        assert_eq!(legacy_service_unit("app"), "deployer-app.service");
        // Names none of ours can have (whether a unit named like ours is ours is told by
        // its file or description, not here).
        for not_ours in [
            "deployer.service",
            "deployer-.service",
            "systemd-journald.service",
            "deployer-a.timer",
            "a.timer",
            "A.service",
            "deployer-A.service",
            "a.070.service",
            "deployer-a.070.service",
            "a.99999.service",
            "a.x.service",
            "deployer-infra-.service",
            "deployer-infra-db.release.service",
            ".service",
        ] {
            assert_eq!(parse_unit(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn dynamic_users_are_valid_account_names() {
        assert_eq!(dynamic_user("web"), "deployer-web");
        let longest = "x".repeat(deploy_manifest::validate::MAX_DYNAMIC_NAME);
        assert_eq!(dynamic_user(&longest).len(), 31);
    }

    #[test]
    fn log_files_follow_units() {
        let logs = Path::new("/l");
        assert_eq!(log_file(logs, &service_unit("a")), Path::new("/l/a.log"));
        assert_eq!(
            log_file(logs, &release_unit("a")),
            Path::new("/l/a.release.log")
        );
        assert_eq!(
            log_file(logs, &infra_unit("db")),
            Path::new("/l/infra-db.log")
        );
    }
}
