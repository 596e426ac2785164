//! The rollout objects of the services this host rolls out in waves
//! ([`deploy_manifest::rollout`]): read before the plan (`gather`: two GETs per service
//! whose rollout this host is not finished with, one more for a revert), written after
//! the run (`record`: this host's outcome by compare-and-swap when it changed, and the
//! abort marker when the rollout must stop).

use std::time::SystemTime;

use deploy_manifest::model::{Manifest, Service};
use deploy_manifest::repo::version_key;
use deploy_manifest::rollout::{
    self, Abort, Gate, HostRecord, HostState, Phase, Policy, Stored, assign, progress, wave_of,
};
use deploy_manifest::store::{Fetched, ObjectStore};
use deploy_manifest::validate::parse_manifest;

use super::{Agent, Outcome, RunReport};
use crate::plan::{Plan, desired, spec_hash};
use crate::rollout::{RolloutView, Rollouts};
use crate::state::{Health, ServiceState, State};

impl<S: ObjectStore, H> Agent<S, H> {
    /// The rollouts of `manifest` this host takes part in and is not finished with: their
    /// objects, where each stands now, and for a revert the spec this host ran before.
    /// With `create` (a run), a missing record of a version this host must wait for or
    /// deploy is created first.
    pub(crate) async fn gather(
        &self,
        manifest: &Manifest,
        state: &State,
        create: bool,
    ) -> Rollouts {
        let me = self.config.host.as_str();
        let now = SystemTime::now();
        let mut out = Rollouts::new();
        for s in desired(manifest, me) {
            let Some(policy) = Policy::of(manifest, s) else {
                continue;
            };
            let hash = spec_hash(s);
            let entry = state.services.get(&s.name);
            if entry.and_then(|e| e.rolled_out.as_deref()) == Some(hash.as_str()) {
                continue;
            }
            let waves = assign(manifest, s, &policy);
            let Some(wave) = wave_of(&waves, me) else {
                continue;
            };
            let runs = entry
                .and_then(|e| e.current.as_ref())
                .is_some_and(|c| c.spec_hash == hash);
            let read = rollout::read(&self.store, &s.name, &hash).await;
            // The first host that must wait or act on a new version creates its record:
            // the rollout starts then (a run only; `plan` acts on nothing). A host that
            // runs the version already while no record exists ran it before the policy.
            let read = match read {
                Ok(mut stored) if create && !runs && stored.record.is_none() => {
                    let fresh = (None, None);
                    rollout::update(&self.store, &s.name, &hash, Some(fresh), now, |_| false)
                        .await
                        .map(|(record, etag)| {
                            stored.record = Some(record);
                            stored.etag = Some(etag);
                            stored
                        })
                }
                other => other,
            };
            let (stored, progress) = match read {
                Ok(stored) => {
                    let p = progress(
                        &policy,
                        &waves,
                        stored.record.as_ref(),
                        stored.abort.as_ref(),
                        now,
                    );
                    (stored, Ok(p))
                }
                Err(e) => (Stored::default(), Err(e.to_string())),
            };
            let stopped = progress.as_ref().is_ok_and(|p| p.phase.stopped());
            let previous = match entry {
                Some(entry) if runs && stopped => self.previous(s, entry).await,
                _ => Ok(None),
            };
            out.insert(
                s.name.clone(),
                RolloutView {
                    spec_hash: hash,
                    wave,
                    waves: waves.len(),
                    policy,
                    assigned: waves,
                    progress,
                    stored,
                    previous,
                },
            );
        }
        out
    }

    /// The service as this host ran it before its current generation: from the manifest
    /// version that generation came from, and only if its spec hash is the one recorded
    /// then (so the store cannot hand it another).
    async fn previous(
        &self,
        s: &Service,
        entry: &ServiceState,
    ) -> Result<Option<(Service, Option<String>)>, String> {
        let Some(before) = &entry.previous else {
            return Ok(None);
        };
        let Some(version) = &before.version else {
            return Err("its previous generation does not say which manifest it came from".into());
        };
        let key = version_key(version);
        let bytes = match self.store.get(&key, None).await {
            Ok(Fetched::Found { bytes, .. }) => bytes,
            Ok(_) => return Err(format!("{key} is not in the store")),
            Err(e) => return Err(e.to_string()),
        };
        let m = parse_manifest(&bytes, &key).map_err(|e| e.to_string())?;
        match m.service(&s.name) {
            Some(spec) if spec_hash(spec) == before.spec_hash => {
                Ok(Some((spec.clone(), Some(version.clone()))))
            }
            _ => Err(format!(
                "{key} does not hold the spec {} this host ran",
                &before.spec_hash[..12.min(before.spec_hash.len())]
            )),
        }
    }

    /// Write what this run changed of this host's part in its rollouts: its outcome (only
    /// when it differs from what the record says; the record is created if missing) and
    /// the abort marker when the rollout must stop. Returns whether a rollout this host
    /// takes part in is not finished (the next poll must then read the manifest in full).
    pub(crate) async fn record(
        &self,
        plan: &Plan,
        views: &Rollouts,
        state: &mut State,
        report: &mut RunReport,
    ) -> bool {
        let me = self.config.host.as_str();
        let mut pending = false;
        for g in &plan.rollouts {
            let Some(view) = views.get(&g.service) else {
                continue;
            };
            let Ok(stands) = &view.progress else {
                pending = true;
                continue;
            };
            let entry = state.services.get(&g.service);
            let mine = outcome_record(&g.gate, report.services.get(&g.service), entry);
            let recorded = view
                .stored
                .record
                .as_ref()
                .and_then(|r| r.hosts.get(me))
                .map(|r| r.state);
            let now = SystemTime::now();
            let mut abort = g.abort.clone();
            if mine.is_some() && mine.as_ref().map(|m| m.state) != recorded {
                let known = (view.stored.record.clone(), view.stored.etag.clone());
                let written = rollout::update(
                    &self.store,
                    &g.service,
                    &g.spec_hash,
                    Some(known),
                    now,
                    |r| match &mine {
                        Some(m) if r.hosts.get(me).map(|h| h.state) != Some(m.state) => {
                            r.hosts.insert(me.to_owned(), m.clone());
                            true
                        }
                        _ => false,
                    },
                )
                .await;
                match written {
                    Ok((record, _)) => {
                        // This host's failure may be the one too many.
                        if abort.is_none() && view.stored.abort.is_none() {
                            let after = rollout::progress(
                                &view.policy,
                                &view.assigned,
                                Some(&record),
                                None,
                                now,
                            );
                            if let Phase::Aborting { cause, reason } = after.phase {
                                abort = Some((cause, reason));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(service = %g.service, error = %e, "could not record this host's part in the rollout; the next run retries");
                        report.rollout_error =
                            Some(format!("{}: could not record its rollout: {e}", g.service));
                        pending = true;
                    }
                }
            }
            if let Some((cause, reason)) = abort {
                let marker = Abort {
                    by: format!("host {me}"),
                    cause,
                    reason,
                    at: deploy_manifest::repo::rfc3339(now),
                };
                match rollout::write_abort(&self.store, &g.service, &g.spec_hash, marker).await {
                    Ok(a) => {
                        tracing::warn!(service = %g.service, reason = %a.reason, by = %a.by, "rollout aborted")
                    }
                    Err(e) => {
                        report.rollout_error =
                            Some(format!("{}: could not abort its rollout: {e}", g.service));
                    }
                }
            }
            match (&g.gate, &stands.phase) {
                // Every wave done: this host no longer reads this rollout's objects.
                (Gate::Done, _) | (_, Phase::Done) => {
                    if let Some(e) = state.services.get_mut(&g.service) {
                        e.rolled_out = Some(g.spec_hash.clone());
                    }
                }
                _ => pending = true,
            }
        }
        pending
    }
}

/// What this host records for its run's outcome with a gated service, if anything.
fn outcome_record(
    gate: &Gate,
    outcome: Option<&Outcome>,
    entry: Option<&ServiceState>,
) -> Option<HostRecord> {
    let at = super::now();
    let (state, error) = match (gate, outcome?) {
        (Gate::Go, Outcome::Deployed) => (HostState::Healthy, None),
        // Runs it, healthy (a record the last run could not write, or a version deployed
        // before its policy was set).
        (Gate::Watch | Gate::Done, Outcome::Kept | Outcome::Repaired)
            if entry.is_some_and(|e| e.health == Health::Healthy) =>
        {
            (HostState::Healthy, None)
        }
        (Gate::Go, Outcome::RolledBack { error }) => (HostState::Failed, Some(error.clone())),
        (Gate::Go, Outcome::Skipped) => (
            HostState::Failed,
            entry
                .and_then(|e| e.failed.as_ref())
                .map(|f| f.error.clone()),
        ),
        (Gate::Revert { .. }, Outcome::Deployed | Outcome::Removed) => (HostState::Reverted, None),
        _ => return None,
    };
    Some(HostRecord { state, at, error })
}
