//! The plan: everything one run does, decided from the manifest, the state and what the host
//! shows (unit files, systemd's view of our units, free ports), acting on nothing.
//! `deployer-agent plan` prints it; `run` computes the same plan and executes its steps in
//! order ([`crate::reconcile`]), deciding nothing more: how a deploy goes (in place, or side by
//! side on a port), whether its release command runs, which infrastructure starts, which
//! units go and how a failure is undone are all written in the step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use deploy_manifest::model::{InfraService, Manifest, Service};
use deploy_manifest::rollout::Gate;
use serde::Serialize;

use crate::config::AgentConfig;
use crate::host::Host;
use crate::names::{self, UnitRole};
use crate::rollout::{Gated, Rollouts};
use crate::state::{Generation, Health, RouteState, ServiceState, State};
use crate::unit::text_hash;
use crate::{AgentError, infra};

/// The identity of a service's manifest entry: any change to it (but its rollout policy)
/// is a new generation.
pub fn spec_hash(service: &Service) -> String {
    deploy_manifest::rollout::spec_hash(service)
}

/// What one run does, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The manifest planned against (for an unchanged one, the version applied before).
    pub manifest_version: Option<String>,
    /// `manifest.json` is unchanged since the last run: only drift is repaired.
    pub unchanged: bool,
    pub steps: Vec<Step>,
    /// The services rolled out in waves, and what their gates said to this host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<Gated>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum Step {
    /// A unit of ours that no state records and nothing may need (a generation or release
    /// unit left by a killed run, a removed service's, unneeded infrastructure): stopped,
    /// its file removed.
    Retire { unit: String },
    /// Infrastructure, made to run as `condition` says; with `ready`, the run waits until
    /// it answers (a critical one that does not fails the deploys that need it).
    Infra(Box<InfraStep>),
    /// A new generation of a service.
    Deploy(Box<Deploy>),
    /// Deployed already: its unit is put back as recorded if `condition` says it drifted;
    /// with `recheck`, an earlier failure is cleared once it passes its health checks, and
    /// then `retire_after` (units of this service no state records) are stopped.
    #[serde(rename_all = "camelCase")]
    Keep {
        service: String,
        artifact: String,
        unit: String,
        condition: Condition,
        recheck: bool,
        retire_after: Vec<String>,
    },
    /// Deployed by an older agent as `from` (`deployer-<service>.service`): the recorded
    /// generation is moved, as it is, to `to` (`<service>.service`): `to` is written from
    /// the recorded unit file, `from` stopped, `to` started and health-checked, then `from`
    /// removed. If `to` does not come up, it is removed and `from` started again.
    Rename {
        service: String,
        from: String,
        to: String,
    },
    /// Its new version is rolled out in waves and this host's may not start yet (or the
    /// rollout was aborted): what runs keeps running (a `Keep` step before this one).
    Hold { service: String, reason: String },
    /// This exact spec failed before; not retried until the manifest changes it.
    Skip { service: String, reason: String },
    /// Cannot be deployed on this run (no free port, undeclared infrastructure); the next
    /// run tries again.
    Wait { service: String, reason: String },
    /// No longer declared for this host: its unit is stopped and removed; data is kept.
    Remove { service: String, unit: String },
    /// Infrastructure no declared service needs: stopped, unit removed, data kept.
    StopInfra { name: String, unit: String },
    /// Apply every recorded route to the proxy (heals a proxy that lost its config).
    Routes,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InfraStep {
    pub name: String,
    pub unit: String,
    pub condition: Condition,
    pub ready: bool,
    /// Why it cannot be started (its unit could not be made): the step fails with this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The unit file it runs from.
    #[serde(skip)]
    pub unit_file: String,
    /// Its declaration (full runs; an unchanged manifest repairs from the state alone).
    #[serde(skip)]
    pub spec: Option<InfraService>,
    /// The ports the state keeps for it: a dedicated server's, picked once.
    #[serde(rename = "ports", skip_serializing_if = "BTreeMap::is_empty")]
    pub keep_ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deploy {
    pub service: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: Reason,
    pub strategy: Strategy,
    /// The unit the new generation runs as.
    pub unit: String,
    /// Side by side: the port it listens on (`$PORT`).
    pub port: Option<u16>,
    /// The unit of the generation it replaces, when that is another unit. Side by side: stopped
    /// once the new one is healthy and has the route (after the drain period with `drain`).
    /// In place (a unit an older agent named `deployer-<service>.service`): stopped before
    /// the new one starts, its file removed once the new one is healthy, started again if
    /// it is not ([`Recovery::StartReplaced`]).
    pub replaces: Option<String>,
    pub drain: bool,
    /// The release command runs first (once per artifact); if it fails, nothing changed.
    pub release: bool,
    /// Infrastructure it needs (started by `Infra` steps before it).
    pub infra: Vec<String>,
    /// What its generated env file is made from ([`infra::endpoints_hash`]), recorded
    /// with the generation.
    #[serde(skip)]
    pub infra_hash: Option<String>,
    /// The route to the new generation, switched to once it is healthy.
    pub route: Option<RouteState>,
    /// Units of this service no state records (what may have served before a lost state):
    /// stopped once the new generation is healthy.
    pub retire_after: Vec<String>,
    /// What undoes a new generation that fails to start or to pass its health checks.
    pub on_failure: Recovery,
    /// With [`Recovery::RestoreFound`]: the unit file found, as it was.
    #[serde(skip)]
    pub found_unit: Option<String>,
    /// A revert ([`Reason::Reverted`]): the service as this host ran it before, and the
    /// manifest version it came from; deployed instead of the manifest's.
    #[serde(skip)]
    pub revert: Option<Box<(Service, Option<String>)>>,
    /// Deployed through the gate of its staged rollout: the spec hash, recorded with the
    /// generation (the host then watches the rollout, and an abort brings it back).
    #[serde(skip)]
    pub rollout: Option<String>,
}

impl Deploy {
    /// The unit that runs the service once a failure of this deploy was undone: the one it
    /// replaces with [`Recovery::StartReplaced`], its own otherwise.
    pub fn restored_unit(&self) -> &str {
        match (self.on_failure, &self.replaces) {
            (Recovery::StartReplaced, Some(old)) => old,
            _ => &self.unit,
        }
    }
}

/// Why a service is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    New,
    NewArtifact,
    SettingsChanged,
    /// Its rollout was aborted: back to the version this host ran before.
    Reverted,
    /// Infrastructure it is connected to changed (moved, or gone): its env file is made
    /// again.
    InfraChanged,
    /// Its unit file changed on the host and the one recorded for it is gone: it cannot be
    /// put back, so the manifest's spec is deployed again.
    RecordLost,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::New => "new on this host",
            Reason::NewArtifact => "new artifact",
            Reason::SettingsChanged => "service settings changed",
            Reason::Reverted => "its rollout was aborted: back to the version it ran before",
            Reason::InfraChanged => {
                "infrastructure it is connected to changed: its connection settings are made again"
            }
            Reason::RecordLost => {
                "its unit file changed and the one recorded for it is gone: deployed again"
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// The service's unit is rewritten and restarted.
    InPlace,
    /// The new generation starts as another unit beside the old one, which keeps running
    /// until the new one is healthy.
    SideBySide,
}

/// How a failed new generation is undone. A failure before its unit was written (secrets
/// file, fetch, infrastructure, the release command) changed nothing and needs none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Recovery {
    /// In place over a deployed generation: its unit file is put back and restarted.
    RestorePrevious,
    /// In place, nothing deployed before: the unit is stopped and removed.
    RemoveNew,
    /// In place over a unit of ours that the state does not know (state.json lost): the
    /// file found is put back and restarted, since it may be what served.
    RestoreFound,
    /// Side by side: the new unit is stopped and removed; the old one never stopped.
    StopNew,
    /// In place under a new name (`replaces`, an older agent's unit): the new unit is
    /// stopped and removed, and the old one, whose file was never touched, started again.
    StartReplaced,
}

/// How a unit stands against what it should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Condition {
    /// Its file is as it should be and it is active: nothing to do.
    Running,
    /// Its file is as it should be, it is not active: started again.
    Stopped,
    /// Its file is missing or different: written, the manager reloaded, started.
    Changed,
    /// systemd could not tell: nothing is done; the error is recorded.
    Unknown(String),
    /// It would be written or started, but its name now stands for a unit that is not ours
    /// (see [`foreign`]): nothing is done; the reason is recorded.
    Taken(String),
}

impl Step {
    /// The service (or infrastructure, or unit) the step is about.
    /// The service this step is about, if it is about one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Step::Deploy(d) => Some(&d.service),
            Step::Rename { service, .. }
            | Step::Keep { service, .. }
            | Step::Skip { service, .. }
            | Step::Hold { service, .. }
            | Step::Wait { service, .. }
            | Step::Remove { service, .. } => Some(service),
            Step::Infra(_) | Step::StopInfra { .. } | Step::Retire { .. } | Step::Routes => None,
        }
    }

    pub fn subject(&self) -> &str {
        if let Some(service) = self.service() {
            return service;
        }
        match self {
            Step::Infra(i) => &i.name,
            Step::StopInfra { name, .. } => name,
            Step::Retire { unit } => unit,
            Step::Routes => "routes",
            _ => unreachable!("a service's step"),
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

/// Whether each unit a plan looks at is active, as systemd said when asked once for all of
/// them (`ListUnitsByNames`): a run's cost in calls does not grow with the services it keeps.
struct Seen(BTreeMap<String, bool>);

impl Seen {
    async fn ask<H: Host>(host: &H, units: BTreeSet<&str>) -> Seen {
        use crate::systemd::{ActiveState, ServiceManager};
        let units: Vec<&str> = units.into_iter().collect();
        match host.manager().unit_states(&units).await {
            Ok(listed) => Seen(
                listed
                    .into_iter()
                    .map(|u| (u.name, u.active_state == ActiveState::Active))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "asking systemd about every unit at once failed; asking one by one");
                Seen(BTreeMap::new())
            }
        }
    }

    /// Whether `unit` is active: as said in the batch, else asked now.
    async fn active<H: Host>(&self, host: &H, unit: &str) -> Result<bool, String> {
        use crate::systemd::ServiceManager;
        match self.0.get(unit) {
            Some(active) => Ok(*active),
            None => match host.manager().status(unit).await {
                Ok(status) => Ok(status.is_active()),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// How `unit` stands against the file it should run from, whose hash is `hash`
/// ([`crate::unit::text_hash`]).
async fn condition<H: Host>(host: &H, seen: &Seen, unit: &str, hash: &str) -> Condition {
    let condition = match seen.active(host, unit).await {
        Err(e) => Condition::Unknown(e),
        Ok(_) if !host.unit_matches(unit, hash) => Condition::Changed,
        Ok(true) => Condition::Running,
        Ok(false) => Condition::Stopped,
    };
    // Before it is written or started again: is the name still ours?
    if matches!(condition, Condition::Changed | Condition::Stopped)
        && let Some(why) = foreign(host, unit).await
    {
        return Condition::Taken(why);
    }
    condition
}

/// Units of ours on the host: files in the unit directory with our header, and units
/// systemd still has loaded whose file is gone (a description of ours, not inactive).
async fn found_units<H: Host>(host: &H) -> BTreeSet<String> {
    use crate::systemd::{ActiveState, LoadState, ServiceManager};
    let mut found: BTreeSet<String> = host.our_unit_files().into_iter().collect();
    // Any name: a service's units carry its own name. Ours: named as ours, and described as
    // the unit of ours of that name is.
    match host.manager().list_units("*.service").await {
        Ok(units) => found.extend(
            units
                .into_iter()
                .filter(|u| {
                    u.load_state == LoadState::NotFound
                        && u.active_state != ActiveState::Inactive
                        && names::parse_unit(&u.name)
                            .is_some_and(|role| names::describes(&role, &u.description))
                })
                .map(|u| u.name),
        ),
        Err(e) => tracing::warn!(error = %e, "cannot list the units of ours systemd has"),
    }
    found.retain(|u| names::parse_unit(u).is_some_and(|r| !matches!(r, UnitRole::Probe(_))));
    found
}

/// Every unit the state records.
fn known_units(state: &State) -> BTreeSet<&str> {
    state
        .services
        .values()
        .flat_map(|s| {
            [
                Some(s.unit.as_str()),
                s.current.as_ref().and_then(|g| g.unit.as_deref()),
            ]
        })
        .flatten()
        .chain(state.infra.values().map(|i| i.unit.as_str()))
        .collect()
}

/// The plan for `manifest`, new or changed since the last run.
pub async fn plan<H: Host>(
    manifest: &Manifest,
    state: &State,
    host: &H,
    config: &AgentConfig,
    rollouts: &Rollouts,
) -> Plan {
    let me = config.host.as_str();
    let desired = desired(manifest, me);
    // None when some service's needs cannot be told: then no infrastructure is stopped.
    // The infrastructure as this host has it (`infrastructure.overrides` applied).
    let eff = infra::for_host(manifest, me);
    let needed = infra::needed_on(&eff, me).ok();

    // Units of ours no state records: retired after the routes are applied (one may be a
    // generation the proxy still sends traffic to, from a run killed during its drain),
    // or, of a service that may be served by them, once that service is healthy again.
    let known = known_units(state);
    let found = found_units(host).await;
    let host_specs = infra::host_specs(&eff, me, &state.infra);
    let infra_units: Vec<String> = host_specs
        .iter()
        .map(|h| names::infra_unit(&h.name))
        .collect();
    let seen = Seen::ask(
        host,
        known
            .iter()
            .copied()
            .chain(infra_units.iter().map(String::as_str))
            .collect(),
    )
    .await;
    let mut retire = Vec::new();
    let mut retire_after: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for unit in found.iter().cloned() {
        if known.contains(unit.as_str()) {
            continue;
        }
        match names::parse_unit(&unit) {
            Some(UnitRole::Infra(name)) => {
                if needed.as_ref().is_some_and(|n| !n.contains(&name)) {
                    retire.push(Step::Retire { unit });
                }
            }
            Some(
                UnitRole::Service(service)
                | UnitRole::Release(service)
                | UnitRole::Generation { service, .. },
            ) => {
                let declared = desired.iter().any(|s| s.name == service);
                let settled = state
                    .services
                    .get(&service)
                    .is_some_and(|s| s.current.is_some() && s.health == Health::Healthy);
                if !declared || settled {
                    retire.push(Step::Retire { unit });
                } else {
                    retire_after.entry(service).or_default().push(unit);
                }
            }
            Some(UnitRole::Probe(_)) | None => {}
        }
    }

    // The services, in the manifest's order.
    // A port whose generation unit exists is not free, even if nothing listens on it: the
    // new generation must never take the name of a unit this plan retires.
    let mut ports = Ports::new(state, config.port_range, &found);
    let mut services = Vec::new();
    let mut wanted = BTreeSet::new();
    let mut gates = Vec::new();
    let specs: BTreeMap<String, infra::HostSpec> = host_specs
        .iter()
        .map(|h| (h.name.clone(), h.clone()))
        .collect();
    for s in &desired {
        let needs = needs_of(
            eff.service(&s.name).unwrap_or(s),
            &eff,
            &specs,
            config.mode.as_deref(),
        );
        if let Ok(needs) = &needs {
            wanted.extend(needs.infra.iter().cloned());
        }
        // Rolled out in waves: the gate says whether this host deploys it now.
        let entry = state.services.get(&s.name);
        let view = rollouts.get(&s.name);
        let runs = view.is_some_and(|v| {
            entry
                .and_then(|e| e.current.as_ref())
                .is_some_and(|c| c.spec_hash == v.spec_hash)
        });
        let gated = view.map(|v| v.gated(&s.name, runs));
        let gate = gated.as_ref().map(|g| g.gate.clone());
        gates.extend(gated);
        match (gate, view) {
            (Some(Gate::Hold { reason }), _) => {
                if let Some((entry, current)) = entry.and_then(|e| Some((e, e.current.as_ref()?))) {
                    services.push(
                        keep_step(&s.name, entry, current, host, &seen, &mut retire_after).await,
                    );
                }
                services.push(Step::Hold {
                    service: s.name.clone(),
                    reason,
                });
            }
            (Some(Gate::Revert { reason }), Some(v)) => {
                let step = match &v.previous {
                    Ok(Some((before, version))) => {
                        let returned = infra::with_service_for_host(manifest, before, me);
                        let own = returned.service(&before.name).unwrap_or(before);
                        let needs = needs_of(own, &returned, &specs, config.mode.as_deref());
                        if let Ok(needs) = &needs {
                            wanted.extend(needs.infra.iter().cloned());
                        }
                        let step = service_step(
                            before,
                            needs,
                            state,
                            (host, &seen),
                            &mut ports,
                            &mut retire_after,
                            false,
                        )
                        .await;
                        match step {
                            Step::Deploy(mut d) => {
                                d.reason = Reason::Reverted;
                                d.revert = Some(Box::new((before.clone(), version.clone())));
                                Step::Deploy(d)
                            }
                            // Returning to it failed before: it keeps what runs, and says so.
                            Step::Skip { reason: why, .. } => Step::Wait {
                                service: s.name.clone(),
                                reason: format!(
                                    "{reason}; returning to the version it ran before failed ({why})"
                                ),
                            },
                            other => other,
                        }
                    }
                    // Its first generation here: it goes, as a removed service does.
                    Ok(None) if v.first => Step::Remove {
                        service: s.name.clone(),
                        unit: entry
                            .map_or_else(|| names::service_unit(&s.name), |e| e.unit.clone()),
                    },
                    Ok(None) => Step::Wait {
                        service: s.name.clone(),
                        reason: format!(
                            "{reason}; this host has no record of the version it ran before (its state was lost?): it keeps what runs"
                        ),
                    },
                    Err(e) => Step::Wait {
                        service: s.name.clone(),
                        reason: format!(
                            "{reason}; cannot return to the version it ran before: {e}"
                        ),
                    },
                };
                services.push(step);
            }
            (gate, view) => {
                // A failure forgiven by `rollout resume` is tried again.
                let forgiven = view.is_some_and(|v| v.forgiven);
                let mut step = service_step(
                    s,
                    needs,
                    state,
                    (host, &seen),
                    &mut ports,
                    &mut retire_after,
                    forgiven,
                )
                .await;
                if let (Some(Gate::Go), Some(v), Step::Deploy(d)) = (gate, view, &mut step) {
                    d.rollout = Some(v.spec_hash.clone());
                }
                services.push(step);
            }
        }
    }

    // Infrastructure the declared services need, provisioned here, before them. Recorded
    // infrastructure is changed (its unit rewritten from the manifest) and waited for only
    // when a service that needs it deploys, which also rewrites that service's connection
    // settings; otherwise it is only put back as recorded if it drifted.
    let deploying: BTreeSet<&str> = services
        .iter()
        .filter_map(|s| match s {
            Step::Deploy(d) => Some(d.infra.iter().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    let mut steps = Vec::new();
    for infra::HostSpec {
        name,
        mut spec,
        keeps_port,
    } in host_specs
    {
        if spec.external.is_some() || !wanted.contains(&name) {
            continue;
        }
        let unit = names::infra_unit(&name);
        let ready = deploying.contains(name.as_str());
        let recorded = state.infra.get(&name).filter(|_| !ready);
        // A dedicated server gets its port once, here; the state keeps it.
        let picked = match keeps_port && spec.ports.is_empty() && recorded.is_none() {
            true => ports.allocate(host).map(|p| {
                spec.ports.insert("tcp".to_owned(), p);
            }),
            false => Ok(()),
        };
        let keep_ports = match keeps_port {
            true => spec.ports.clone(),
            false => BTreeMap::new(),
        };
        let step = match recorded {
            Some(recorded) => InfraStep {
                condition: condition(host, &seen, &recorded.unit, &text_hash(&recorded.unit_file))
                    .await,
                unit_file: recorded.unit_file.clone(),
                ready,
                ..infra_step(&name, &recorded.unit, &spec)
            },
            None => match picked.and_then(|()| infra::unit_file(&name, &spec, config)) {
                Ok(unit_file) => InfraStep {
                    condition: condition(host, &seen, &unit, &text_hash(&unit_file)).await,
                    unit_file,
                    ready,
                    ..infra_step(&name, &unit, &spec)
                },
                Err(e) => InfraStep {
                    error: Some(e.to_string()),
                    ready,
                    ..infra_step(&name, &unit, &spec)
                },
            },
        };
        steps.push(Step::Infra(Box::new(InfraStep { keep_ports, ..step })));
    }
    steps.extend(services);
    for (name, entry) in &state.services {
        if !desired.iter().any(|s| &s.name == name) {
            let unit = Some(entry.unit.clone())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| names::service_unit(name));
            steps.push(Step::Remove {
                service: name.clone(),
                unit,
            });
        }
    }
    if let Some(needed) = &needed {
        for (name, recorded) in &state.infra {
            if !needed.contains(name) {
                steps.push(Step::StopInfra {
                    name: name.clone(),
                    unit: recorded.unit.clone(),
                });
            }
        }
    }
    if host.has_proxy() {
        steps.push(Step::Routes);
    }
    // A unit this plan deploys or renames to is not retired at its end (a run killed after
    // it wrote that unit left it unrecorded).
    let targets: BTreeSet<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Deploy(d) => Some(d.unit.as_str()),
            Step::Rename { to, .. } => Some(to.as_str()),
            _ => None,
        })
        .collect();
    retire.retain(|r| !matches!(r, Step::Retire { unit } if targets.contains(unit.as_str())));
    steps.extend(retire);
    Plan {
        manifest_version: manifest.version.clone(),
        unchanged: false,
        steps,
        rollouts: gates,
    }
}

fn infra_step(name: &str, unit: &str, spec: &InfraService) -> InfraStep {
    InfraStep {
        name: name.to_owned(),
        unit: unit.to_owned(),
        condition: Condition::Changed,
        ready: true,
        error: None,
        unit_file: String::new(),
        spec: Some(spec.clone()),
        keep_ports: BTreeMap::new(),
    }
}

/// What a service needs of the host's infrastructure: the infrastructure services, and the
/// hash of what its env file is made from ([`infra::endpoints_hash`]).
pub struct Needs {
    pub infra: Vec<String>,
    pub hash: Option<String>,
}

/// [`Needs`] of `s`, or why they cannot be told.
fn needs_of(
    s: &Service,
    manifest: &Manifest,
    specs: &BTreeMap<String, infra::HostSpec>,
    mode: Option<&str>,
) -> Result<Needs, AgentError> {
    Ok(Needs {
        infra: infra::needs(s, manifest)?,
        hash: infra::endpoints_hash(s, manifest, specs, mode),
    })
}

/// The step of one declared service; `needs`: the infrastructure it needs.
async fn service_step<H: Host>(
    s: &Service,
    needs: Result<Needs, AgentError>,
    state: &State,
    (host, seen): (&H, &Seen),
    ports: &mut Ports,
    retire_after: &mut BTreeMap<String, Vec<String>>,
    forgiven: bool,
) -> Step {
    let hash = spec_hash(s);
    let entry = state.services.get(&s.name);
    let current = entry.and_then(|e| e.current.as_ref());
    // Deployed by an older agent as `deployer-<service>.service`: moved to its own name,
    // unless that name is taken (then it stays as it is, kept).
    let legacy = entry.is_some_and(|e| e.unit == names::legacy_service_unit(&s.name));
    // (Not when its recorded unit file is gone: there is nothing to move.)
    if let (Some(entry), Some(c)) = (entry, current)
        && c.spec_hash == hash
        && legacy
        && recorded(state, host, &c.unit_hash)
    {
        let to = names::service_unit(&s.name);
        if foreign(host, &to).await.is_none() {
            return Step::Rename {
                service: s.name.clone(),
                from: entry.unit.clone(),
                to,
            };
        }
    }
    // Deployed before infrastructure hashes were kept: its connection settings are taken
    // as they are. Its needs cannot be told now (a shared server it is bound to is gone or
    // disabled here): it waits, running what it runs, and the run says why.
    let infra_same = |c: &Generation| match &needs {
        Ok(n) => c.infra_hash.is_none() || n.hash == c.infra_hash,
        Err(_) => false,
    };
    let mut lost = false;
    if let (Some(entry), Some(c)) = (entry, current)
        && c.spec_hash == hash
        && infra_same(c)
    {
        let keep = keep_step(&s.name, entry, c, host, seen, retire_after).await;
        // Changed on the host, and the recorded file to put back is gone: deployed again.
        lost = matches!(
            &keep,
            Step::Keep {
                condition: Condition::Changed,
                ..
            }
        ) && !recorded(state, host, &c.unit_hash);
        match keep {
            Step::Keep {
                retire_after: r, ..
            } if lost => {
                retire_after.insert(s.name.clone(), r);
            }
            keep => return keep,
        }
    }
    // A failure is tried again when the spec or the endpoints it is connected to change
    // (a failure recorded by an older agent: when the spec changes).
    let same_infra = |f: &crate::state::Failure| match &needs {
        Ok(n) => f.infra_hash.is_none() || f.infra_hash == n.hash,
        Err(_) => true,
    };
    if let Some(f) = entry
        .and_then(|e| e.failed.as_ref())
        .filter(|f| f.spec_hash == hash && same_infra(f) && !forgiven)
    {
        return Step::Skip {
            service: s.name.clone(),
            reason: format!("failed at {}: {}", f.at, f.error),
        };
    }
    let wait = |reason: String| Step::Wait {
        service: s.name.clone(),
        reason,
    };
    let (infra, infra_hash) = match needs {
        Ok(needs) => (needs.infra, needs.hash),
        Err(e) => return wait(e.to_string()),
    };
    let zero = host.has_proxy() && s.http.as_ref().and_then(|h| h.zero_downtime) == Some(true);
    let port = if zero {
        match ports.allocate(host) {
            Ok(p) => Some(p),
            Err(e) => return wait(e.to_string()),
        }
    } else {
        None
    };
    let unit = match port {
        Some(p) => names::generation_unit(&s.name, p),
        None => names::service_unit(&s.name),
    };
    let release =
        s.release.is_some() && entry.and_then(|e| e.released.as_ref()) != Some(&s.artifact);
    // A name this plan would give a unit that no state records as ours must not be
    // somebody else's.
    let fresh = [
        (entry.is_none_or(|e| e.unit != unit)).then(|| unit.clone()),
        release.then(|| names::release_unit(&s.name)),
    ];
    for name in fresh.into_iter().flatten() {
        if let Some(why) = foreign(host, &name).await {
            return wait(why);
        }
    }
    let old_unit = entry
        .map(|e| e.unit.clone())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| names::service_unit(&s.name));
    // A unit of ours an older agent named: moved in place (stopped, then the new one starts).
    let strategy = if unit == old_unit || (legacy && port.is_none()) {
        Strategy::InPlace
    } else {
        Strategy::SideBySide
    };
    // A unit file of ours that no state records: what ran before a lost state.json, under
    // the service's unit name or the one an older agent gave it. Ours, and this service's:
    // our header and its description (not another service's unit copied or linked under
    // its name).
    let description = format!("Description={}", names::description(&s.name));
    let ours = |name: &str| {
        host.read_unit(name)
            .filter(|t| t.starts_with(crate::unit::HEADER) && t.lines().any(|l| l == description))
    };
    let found_unit = match (strategy, current) {
        (Strategy::InPlace, None) => ours(&unit),
        // What runs now, edited on the host: what a failure of the new deploy puts back.
        (Strategy::InPlace, Some(_)) if lost => host.read_unit(&unit),
        _ => None,
    };
    let replaces = match strategy {
        Strategy::SideBySide => current.is_some().then_some(old_unit),
        Strategy::InPlace if current.is_some() => (old_unit != unit).then_some(old_unit),
        // Found under the name an older agent gave it (state.json lost too).
        Strategy::InPlace => {
            let legacy = names::legacy_service_unit(&s.name);
            (found_unit.is_none() && ours(&legacy).is_some()).then_some(legacy)
        }
    };
    let on_failure = match (strategy, current, &found_unit) {
        (Strategy::SideBySide, _, _) => Recovery::StopNew,
        (Strategy::InPlace, _, _) if replaces.is_some() => Recovery::StartReplaced,
        // The recorded generation's unit file is gone: there is no previous to restore.
        (Strategy::InPlace, Some(_), Some(_)) if lost => Recovery::RestoreFound,
        (Strategy::InPlace, Some(_), None) if lost => Recovery::RemoveNew,
        (Strategy::InPlace, Some(_), _) => Recovery::RestorePrevious,
        (Strategy::InPlace, None, Some(_)) => Recovery::RestoreFound,
        (Strategy::InPlace, None, None) => Recovery::RemoveNew,
    };
    let reason = match current {
        Some(_) if lost => Reason::RecordLost,
        None => Reason::New,
        Some(c) if c.artifact != s.artifact => Reason::NewArtifact,
        Some(c) if c.spec_hash == hash => Reason::InfraChanged,
        Some(_) => Reason::SettingsChanged,
    };
    let mut retire_after = retire_after.remove(&s.name).unwrap_or_default();
    retire_after.retain(|u| *u != unit && Some(u) != replaces.as_ref());
    Step::Deploy(Box::new(Deploy {
        service: s.name.clone(),
        from: current.map(|c| c.artifact.label()),
        to: s.artifact.label(),
        reason,
        strategy,
        drain: zero && replaces.is_some(),
        replaces,
        unit,
        port,
        release,
        infra,
        infra_hash,
        route: s.http.as_ref().map(|h| RouteState {
            domain: h.domain.to_ascii_lowercase(),
            path: deploy_manifest::validate::route_path(&h.path),
            port: port.unwrap_or(h.internal_port),
        }),
        retire_after,
        on_failure,
        found_unit,
        revert: None,
        rollout: None,
    }))
}

/// Whether the unit file recorded as `hash` can be had (in `units/`, or in a schema 1
/// state not yet moved there).
fn recorded<H: Host>(state: &State, host: &H, hash: &str) -> bool {
    state.migrated.contains_key(hash) || host.recorded_unit_text(hash).is_ok()
}

/// The recorded generation `current` of service `name`, kept (put back if it drifted).
async fn keep_step<H: Host>(
    name: &str,
    entry: &ServiceState,
    current: &Generation,
    host: &H,
    seen: &Seen,
    retire_after: &mut BTreeMap<String, Vec<String>>,
) -> Step {
    let recheck =
        entry.failed.is_some() || entry.last_error.is_some() || entry.health != Health::Healthy;
    let mut retire_after = retire_after.remove(name).unwrap_or_default();
    retire_after.retain(|u| *u != entry.unit);
    Step::Keep {
        service: name.to_owned(),
        artifact: current.artifact.label(),
        unit: entry.unit.clone(),
        condition: condition(host, seen, &entry.unit, &current.unit_hash).await,
        // Units to retire once it is healthy: probe it.
        recheck: recheck || !retire_after.is_empty(),
        retire_after,
    }
}

/// Why this host's `unit` is not the deployer's to write, if it is not: systemd gives the
/// name to a file that is not ours (a unit of the host's, like `nginx.service`, or one in
/// a directory that takes precedence over ours), it is another unit's alias, or it is
/// masked, or a unit whose file is gone still runs under it and is not described as ours.
/// A name no file defines, or our own file, is ours.
pub(crate) async fn foreign<H: Host>(host: &H, unit: &str) -> Option<String> {
    use crate::systemd::{LoadState, ServiceManager};
    let fix = "rename the service in the manifest (a service's units are named <service>.service), or remove that unit from this host";
    let source = match host.manager().source(unit).await {
        Ok(source) => source,
        Err(e) => return Some(format!("cannot tell whether {unit} is free: {e}")),
    };
    let ours = host.unit_path(unit);
    let same = |fragment: &Path| {
        fragment == ours
            || std::fs::canonicalize(fragment)
                .is_ok_and(|f| std::fs::canonicalize(&ours).is_ok_and(|o| o == f))
    };
    let described_as_ours =
        names::parse_unit(unit).is_some_and(|role| names::describes(&role, &source.description));
    let taken = if source.id != unit {
        format!("{unit} is another name of {} on this host", source.id)
    } else if source.load_state == LoadState::Masked {
        format!("{unit} is masked on this host")
    } else if source.load_state == LoadState::NotFound && source.running && !described_as_ours {
        format!(
            "{unit} is a unit of this host's that still runs ({:?}), its file gone",
            source.description
        )
    } else if source.load_state == LoadState::NotFound
        || same(Path::new(&source.fragment_path))
            && host
                .read_unit(unit)
                .is_none_or(|t| t.starts_with(crate::unit::HEADER))
    {
        return None;
    } else if source.fragment_path.is_empty() {
        format!("{unit} is a unit of this host's (loaded without a file of ours)")
    } else {
        format!(
            "{unit} is a unit of this host's, from {}",
            source.fragment_path
        )
    };
    Some(format!("the unit name is taken: {taken}; {fix}"))
}

/// Ports for side-by-side generations: in the configured range, used by no recorded
/// generation, not given to another step of this plan, and free on the host.
struct Ports {
    used: BTreeSet<u16>,
    range: (u16, u16),
}

impl Ports {
    /// `found`: units of ours on the host; their generation ports are taken too.
    fn new(state: &State, range: (u16, u16), found: &BTreeSet<String>) -> Ports {
        let generations = found.iter().filter_map(|u| match names::parse_unit(u) {
            Some(UnitRole::Generation { port, .. }) => Some(port),
            _ => None,
        });
        let used = state
            .services
            .values()
            .flat_map(|s| [s.current.as_ref(), s.previous.as_ref()])
            .flatten()
            .filter_map(|g| g.route.as_ref().map(|r| r.port))
            .chain(generations)
            .chain(state.infra.values().flat_map(|i| i.ports.values().copied()))
            .collect();
        Ports { used, range }
    }

    fn allocate<H: Host>(&mut self, host: &H) -> Result<u16, AgentError> {
        let (first, last) = self.range;
        let port = (first..=last)
            .find(|p| !self.used.contains(p) && host.port_free(*p))
            .ok_or(AgentError::NoFreePort { first, last })?;
        self.used.insert(port);
        Ok(port)
    }
}

/// The plan when `manifest.json` is unchanged since the last run (or cannot be read):
/// every recorded unit is put back as recorded if it drifted, from the state alone.
pub async fn plan_unchanged<H: Host>(state: &State, host: &H) -> Plan {
    let seen = Seen::ask(host, known_units(state)).await;
    let mut steps = Vec::new();
    for (name, recorded) in &state.infra {
        steps.push(Step::Infra(Box::new(InfraStep {
            name: name.clone(),
            unit: recorded.unit.clone(),
            condition: condition(host, &seen, &recorded.unit, &text_hash(&recorded.unit_file))
                .await,
            ready: false,
            error: None,
            unit_file: recorded.unit_file.clone(),
            spec: None,
            keep_ports: recorded.ports.clone(),
        })));
    }
    for (name, entry) in &state.services {
        if let Some(current) = &entry.current {
            steps.push(Step::Keep {
                service: name.clone(),
                artifact: current.artifact.label(),
                unit: entry.unit.clone(),
                condition: condition(host, &seen, &entry.unit, &current.unit_hash).await,
                recheck: false,
                retire_after: Vec::new(),
            });
        }
    }
    if host.has_proxy() {
        steps.push(Step::Routes);
    }
    Plan {
        manifest_version: state.manifest_version.clone(),
        unchanged: true,
        steps,
        rollouts: Vec::new(),
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Running => f.write_str("running"),
            Condition::Stopped => f.write_str("stopped: start it again"),
            Condition::Changed => f.write_str("unit file missing or changed: write it, start"),
            Condition::Unknown(e) => write!(f, "systemd cannot tell ({e}): left alone"),
            Condition::Taken(e) => write!(f, "{e}: left alone"),
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = self.manifest_version.as_deref().unwrap_or("?");
        if self.unchanged {
            writeln!(
                f,
                "plan for manifest {version} (unchanged: drift repair only):"
            )?;
        } else {
            writeln!(f, "plan for manifest {version}:")?;
        }
        if self.steps.is_empty() {
            writeln!(f, "  nothing to do: no service is declared for this host")?;
        }
        for step in &self.steps {
            match step {
                Step::Deploy(d) => {
                    writeln!(
                        f,
                        "  deploy  {}: {} -> {} ({})",
                        d.service,
                        d.from.as_deref().unwrap_or("(nothing)"),
                        d.to,
                        d.reason
                    )?;
                    let how = match (d.strategy, d.port) {
                        (Strategy::InPlace, _) => format!("in place as {}", d.unit),
                        (Strategy::SideBySide, Some(p)) => {
                            format!("side by side as {} on port {p}", d.unit)
                        }
                        (Strategy::SideBySide, None) => format!("side by side as {}", d.unit),
                    };
                    writeln!(f, "          {how}")?;
                    if d.release {
                        writeln!(f, "          runs its release command first")?;
                    }
                    if !d.infra.is_empty() {
                        writeln!(f, "          needs {}", d.infra.join(", "))?;
                    }
                    if let Some(r) = &d.route {
                        writeln!(
                            f,
                            "          route {}{} -> port {}",
                            r.domain, r.path, r.port
                        )?;
                    }
                    if let Some(old) = &d.replaces {
                        let drain = if d.drain {
                            ", after the drain period"
                        } else {
                            ""
                        };
                        writeln!(f, "          then stops {old}{drain}")?;
                    }
                    for u in &d.retire_after {
                        writeln!(f, "          then stops {u} (no state records it)")?;
                    }
                    let undo = match d.on_failure {
                        Recovery::RestorePrevious => "restore the previous generation",
                        Recovery::RemoveNew => "stop and remove the new unit",
                        Recovery::RestoreFound => "put back the unit file found on the host",
                        Recovery::StopNew => "stop the new unit; the old one keeps running",
                        Recovery::StartReplaced => {
                            "remove the new unit, start the one it replaces again"
                        }
                    };
                    writeln!(f, "          if it fails: {undo}")?;
                }
                Step::Keep {
                    service,
                    artifact,
                    condition,
                    recheck,
                    retire_after,
                    ..
                } => {
                    let recheck = if *recheck {
                        "; probe it to clear the recorded failure"
                    } else {
                        ""
                    };
                    writeln!(f, "  keep    {service}: {artifact} ({condition}{recheck})")?;
                    for u in retire_after {
                        writeln!(f, "          then stops {u} (no state records it)")?;
                    }
                }
                Step::Rename { service, from, to } => writeln!(
                    f,
                    "  rename  {service}: {from} -> {to} (the recorded generation, restarted)"
                )?,
                Step::Skip { service, reason } => writeln!(f, "  skip    {service}: {reason}")?,
                Step::Hold { service, reason } => {
                    writeln!(f, "  hold    {service}: {reason}; what runs keeps running")?
                }
                Step::Wait { service, reason } => {
                    writeln!(f, "  wait    {service}: {reason}; the next run retries")?
                }
                Step::Remove { service, unit } => {
                    writeln!(f, "  remove  {service}: stop {unit} (data kept)")?
                }
                Step::Infra(i) => match &i.error {
                    Some(e) => writeln!(f, "  infra   {}: cannot start: {e}", i.name)?,
                    None if i.keep_ports.is_empty() => {
                        writeln!(f, "  infra   {}: {}", i.name, i.condition)?
                    }
                    None => {
                        let ports: Vec<String> =
                            i.keep_ports.values().map(u16::to_string).collect();
                        writeln!(
                            f,
                            "  infra   {}: {} (port {}, picked once and kept)",
                            i.name,
                            i.condition,
                            ports.join(", ")
                        )?
                    }
                },
                Step::StopInfra { name, .. } => writeln!(
                    f,
                    "  stop    infrastructure {name}: no service here needs it (data kept)"
                )?,
                Step::Retire { unit } => {
                    writeln!(f, "  retire  {unit}: ours, and no state records it")?
                }
                Step::Routes => writeln!(f, "  routes  apply every recorded route")?,
            }
        }
        for g in &self.rollouts {
            writeln!(f, "  rollout {g}")?;
        }
        Ok(())
    }
}
