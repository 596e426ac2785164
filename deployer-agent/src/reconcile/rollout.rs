//! The rollout objects of the services this host rolls out in waves
//! ([`deploy_manifest::rollout`]): read before the plan (`gather`: two GETs per service
//! whose rollout this host is not finished with, one more for a revert), written after
//! the run (`record`: this host's outcome by compare-and-swap when it changed, and the
//! abort marker when the rollout must stop).

use std::time::SystemTime;

use deploy_manifest::history::{Event, EventKind};
use deploy_manifest::model::{Manifest, Service};
use deploy_manifest::repo::version_key;
use deploy_manifest::rollout::{
    self, Abort, Gate, HostRecord, HostState, Phase, Policy, Stored, assign, wave_of,
};
use deploy_manifest::store::{Fetched, ObjectStore};
use deploy_manifest::validate::parse_manifest;

use super::{Agent, Outcome, RunReport};
use crate::plan::{Plan, desired, spec_hash};
use crate::rollout::{RolloutView, Rollouts};
use crate::state::{Health, RolloutMark, RolloutStage, ServiceState, State};

impl<S: ObjectStore, H> Agent<S, H> {
    /// The rollouts of `manifest` this host takes part in and is not finished with: their
    /// objects, where each stands now, and for a revert the spec this host ran before.
    /// With `create` (a run), a missing record of a version this host must wait for or
    /// deploy is created first.
    pub async fn gather(&self, manifest: &Manifest, state: &State, create: bool) -> Rollouts {
        let me = self.config.host.as_str();
        let now = SystemTime::now();
        let mut out = Rollouts::new();
        for s in desired(manifest, me) {
            let Some(policy) = Policy::of(manifest, s) else {
                continue;
            };
            let hash = spec_hash(s);
            let entry = state.services.get(&s.name);
            let mark = entry
                .and_then(|e| e.rollout.as_ref())
                .filter(|m| m.spec_hash == hash)
                .map(|m| m.stage);
            let runs = entry
                .and_then(|e| e.current.as_ref())
                .is_some_and(|c| c.spec_hash == hash);
            // Done with it, or runs it without having deployed it through its gate (before
            // the policy was set, or by an older agent): not part of its rollout, nothing
            // to read (and no unsigned object can make this host leave it).
            if mark == Some(RolloutStage::Done) || (runs && mark.is_none()) {
                continue;
            }
            let waves = assign(manifest, s, &policy);
            let Some(wave) = wave_of(&waves, me) else {
                continue;
            };
            let read = rollout::read(&self.store, &s.name, &hash).await;
            // The first host that must wait or act on a new version creates its record:
            // the rollout starts then (a run only; `plan` acts on nothing).
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
                    let p = stored.progress(&policy, &waves, now);
                    (stored, Ok(p))
                }
                Err(e) => (Stored::default(), Err(e.to_string())),
            };
            let stopped = progress.as_ref().is_ok_and(|p| p.phase.stopped());
            let previous = match entry {
                Some(entry) if runs && stopped => self.previous(s, entry).await,
                _ => Ok(None),
            };
            let forgiven = stored.record.as_ref().is_some_and(|r| {
                r.hosts
                    .get(me)
                    .is_some_and(|h| h.state == HostState::Failed && h.epoch < r.epoch)
            });
            out.insert(
                s.name.clone(),
                RolloutView {
                    spec_hash: hash,
                    wave,
                    policy,
                    assigned: waves,
                    progress,
                    stored,
                    previous,
                    first: mark == Some(RolloutStage::First),
                    forgiven,
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
    /// when it differs from what the record says) and the abort marker when the rollout
    /// must stop (checked again on a fresh read first: a `resume` may have come since the
    /// plan). Returns whether a rollout this host takes part in is not finished (the next
    /// poll must then read the manifest in full).
    pub async fn record(
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
            let runs = entry
                .and_then(|e| e.current.as_ref())
                .is_some_and(|c| c.spec_hash == g.spec_hash);
            let epoch = view.stored.record.as_ref().map_or(0, |r| r.epoch);
            let recorded = view
                .stored
                .record
                .as_ref()
                .and_then(|r| r.hosts.get(me))
                .map(|r| (r.state, r.epoch));
            let mine = outcome_record(
                &g.gate,
                report.services.get(&g.service),
                entry,
                runs,
                recorded,
            );
            let now = SystemTime::now();
            let mut abort = g.abort.is_some();
            if let Some(m) = mine.as_ref().filter(|m| recorded != Some((m.state, epoch))) {
                let known = (view.stored.record.clone(), view.stored.etag.clone());
                let written = rollout::update(
                    &self.store,
                    &g.service,
                    &g.spec_hash,
                    Some(known),
                    now,
                    |r| {
                        let new = HostRecord {
                            epoch: r.epoch,
                            ..m.clone()
                        };
                        let same = r.hosts.get(me).map(|h| (h.state, h.epoch))
                            == Some((new.state, new.epoch));
                        if !same {
                            r.hosts.insert(me.to_owned(), new);
                        }
                        !same
                    },
                )
                .await;
                match written {
                    // This host's failure may be the one too many.
                    Ok(_) => abort |= m.state == HostState::Failed,
                    Err(e) => {
                        tracing::warn!(service = %g.service, error = %e, "could not record this host's part in the rollout; the next run retries");
                        report.rollout_error =
                            Some(format!("{}: could not record its rollout: {e}", g.service));
                        pending = true;
                    }
                }
            }
            if abort {
                match self.abort_if_due(view, &g.service, &g.spec_hash, now).await {
                    Ok(Some(marker)) => report.events.push(Event {
                        error: Some(format!("{}: {}", marker.cause, marker.reason)),
                        ..Event::new(me, &g.service, EventKind::RolloutAborted, marker.at)
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        report.rollout_error =
                            Some(format!("{}: could not abort its rollout: {e}", g.service))
                    }
                }
            }
            let failed = entry
                .and_then(|e| e.failed.as_ref())
                .is_some_and(|f| f.spec_hash == g.spec_hash);
            match &stands.phase {
                // Every wave done: this host no longer reads this rollout's objects.
                Phase::Done if runs || failed => {
                    if let Some(e) = state.services.get_mut(&g.service) {
                        e.rollout = Some(RolloutMark {
                            spec_hash: g.spec_hash.clone(),
                            stage: RolloutStage::Done,
                        });
                    }
                }
                _ => pending = true,
            }
        }
        pending
    }

    /// Write the abort marker if the rollout, as it stands in the store now (read again),
    /// must stop and has no marker of its epoch yet; the marker, if this host wrote it.
    async fn abort_if_due(
        &self,
        view: &RolloutView,
        service: &str,
        hash: &str,
        now: SystemTime,
    ) -> Result<Option<Abort>, deploy_manifest::Error> {
        let fresh = rollout::read(&self.store, service, hash).await?;
        let stands = fresh.progress(&view.policy, &view.assigned, now);
        let Phase::Aborting { cause, reason } = stands.phase else {
            return Ok(None);
        };
        let marker = Abort {
            by: format!("host {}", self.config.host),
            cause,
            reason,
            at: deploy_manifest::repo::rfc3339(now),
            epoch: fresh.record.as_ref().map_or(0, |r| r.epoch),
        };
        let a = rollout::write_abort(&self.store, service, hash, marker.clone()).await?;
        tracing::warn!(%service, reason = %a.reason, by = %a.by, "rollout aborted");
        Ok((a.by == marker.by && a.at == marker.at).then_some(a))
    }
}

/// What this host records for its run's outcome with a gated service, if anything.
/// `recorded`: what the record says of it (state, epoch).
fn outcome_record(
    gate: &Gate,
    outcome: Option<&Outcome>,
    entry: Option<&ServiceState>,
    runs: bool,
    recorded: Option<(HostState, u32)>,
) -> Option<HostRecord> {
    let at = super::now();
    let (state, error) = match (gate, outcome?) {
        (Gate::Go, Outcome::Deployed) => (HostState::Healthy, None),
        // Runs it, healthy (a record the last run could not write).
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
        // Recorded healthy with it, and no longer runs it: it reverted (a run killed
        // before it could record so).
        (Gate::Hold { .. }, _)
            if !runs && recorded.is_some_and(|(s, _)| s == HostState::Healthy) =>
        {
            (HostState::Reverted, None)
        }
        _ => return None,
    };
    Some(HostRecord {
        state,
        at,
        error,
        epoch: 0,
    })
}
