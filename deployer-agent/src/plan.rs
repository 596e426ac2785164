//! The plan: what a run would do, computed from the manifest and the state alone, acting
//! on nothing. `deployer-agent plan` prints it; `run` executes the same plan.

use deploy_manifest::model::{Manifest, Service};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::state::State;

/// The identity of a service's manifest entry: any change to it is a new generation.
pub fn spec_hash(service: &Service) -> String {
    let bytes = serde_json::to_vec(service).expect("the model serialises");
    deploy_manifest::hex(&Sha256::digest(bytes))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum Step {
    /// Fetch, write the unit, restart, check health, record; roll back on failure.
    Deploy {
        service: String,
        from: Option<String>,
        to: String,
        reason: String,
    },
    /// Already deployed: only make sure it runs (drift repair).
    Keep { service: String, artifact: String },
    /// This exact spec failed before; not retried until the manifest changes it.
    Skip { service: String, reason: String },
    /// No longer declared for this host: stop and remove the unit; data is kept.
    Remove { service: String },
}

impl Step {
    pub fn service(&self) -> &str {
        match self {
            Step::Deploy { service, .. }
            | Step::Keep { service, .. }
            | Step::Skip { service, .. }
            | Step::Remove { service } => service,
        }
    }
}

/// The services of `manifest` that run on `host`.
pub fn desired<'m>(manifest: &'m Manifest, host: &str) -> Vec<&'m Service> {
    manifest
        .services
        .iter()
        .filter(|s| s.hosts.iter().any(|h| h == host))
        .collect()
}

pub fn plan(manifest: &Manifest, state: &State, host: &str) -> Vec<Step> {
    let desired = desired(manifest, host);
    let mut steps = Vec::new();
    for s in &desired {
        let hash = spec_hash(s);
        let known = state.services.get(&s.name);
        let current = known.and_then(|k| k.current.as_ref());
        let failed = known.and_then(|k| k.failed.as_ref());
        if current.is_some_and(|c| c.spec_hash == hash) {
            steps.push(Step::Keep {
                service: s.name.clone(),
                artifact: s.artifact.label(),
            });
        } else if let Some(f) = failed.filter(|f| f.spec_hash == hash) {
            steps.push(Step::Skip {
                service: s.name.clone(),
                reason: format!("failed at {}: {}", f.at, f.error),
            });
        } else {
            let reason = match current {
                None => "new on this host".to_owned(),
                Some(c) if c.artifact != s.artifact => "new artifact".to_owned(),
                Some(_) => "service settings changed".to_owned(),
            };
            steps.push(Step::Deploy {
                service: s.name.clone(),
                from: current.map(|c| c.artifact.label()),
                to: s.artifact.label(),
                reason,
            });
        }
    }
    for name in state.services.keys() {
        if !desired.iter().any(|s| &s.name == name) {
            steps.push(Step::Remove {
                service: name.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Failure, Generation, ServiceState};
    use deploy_manifest::model::Artifact;

    fn manifest() -> Manifest {
        let mut m = Manifest::empty();
        for (name, host) in [("a", "biz"), ("b", "biz"), ("c", "other"), ("d", "biz")] {
            deploy_manifest::edit::add_service(
                &mut m,
                &serde_json::json!({"name": name, "artifact": {"storePath": format!("/nix/store/{name}")}, "hosts": [host]}),
            )
            .unwrap();
        }
        m
    }

    fn generation(s: &Service) -> Generation {
        Generation {
            artifact: s.artifact.clone(),
            path: String::new(),
            spec_hash: spec_hash(s),
            version: None,
            deployed_at: String::new(),
            unit_file: String::new(),
            unit: None,
            route: None,
        }
    }

    #[test]
    fn plans_deploy_keep_skip_and_remove() {
        let m = manifest();
        let mut state = State::default();
        state.services.insert(
            "a".into(),
            ServiceState {
                current: Some(generation(m.service("a").unwrap())),
                ..Default::default()
            },
        );
        let mut old_b = generation(m.service("b").unwrap());
        old_b.artifact = Artifact::StorePath("/nix/store/old".into());
        old_b.spec_hash = "old".into();
        state.services.insert(
            "b".into(),
            ServiceState {
                current: Some(old_b),
                ..Default::default()
            },
        );
        state.services.insert(
            "d".into(),
            ServiceState {
                failed: Some(Failure {
                    spec_hash: spec_hash(m.service("d").unwrap()),
                    artifact: m.service("d").unwrap().artifact.clone(),
                    version: None,
                    error: "unhealthy".into(),
                    at: "t".into(),
                }),
                ..Default::default()
            },
        );
        state
            .services
            .insert("gone".into(), ServiceState::default());
        let steps = plan(&m, &state, "biz");
        let summary: Vec<(&str, &str)> = steps
            .iter()
            .map(|s| {
                let kind = match s {
                    Step::Deploy { .. } => "deploy",
                    Step::Keep { .. } => "keep",
                    Step::Skip { .. } => "skip",
                    Step::Remove { .. } => "remove",
                };
                (kind, s.service())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("keep", "a"),
                ("deploy", "b"),
                ("skip", "d"),
                ("remove", "gone")
            ]
        );
        assert!(matches!(&steps[1], Step::Deploy { reason, .. } if reason == "new artifact"));
    }
}
