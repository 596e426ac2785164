//! What this host read of the staged rollouts it takes part in, and the gate each gives it
//! (data for [`crate::plan`]). The rules are [`deploy_manifest::rollout`]'s; the objects
//! are read and written by `reconcile::rollout`.

use std::collections::BTreeMap;
use std::fmt;

use deploy_manifest::model::Service;
use deploy_manifest::rollout::{Assigned, Cause, Gate, Policy, Progress, Stored};
use serde::Serialize;

/// The rollouts of the manifest's services this host takes part in, by service.
pub type Rollouts = BTreeMap<String, RolloutView>;

/// One service's rollout as this host read it.
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// The version rolled out (the service's spec hash in the manifest).
    pub spec_hash: String,
    /// This host's wave.
    pub wave: usize,
    /// The service's policy and its hosts by wave.
    pub policy: Policy,
    pub assigned: Vec<Assigned>,
    /// Where it stands; `Err`: its objects could not be read (why).
    pub progress: Result<Progress, String>,
    /// The objects as read (the record's ETag saves a GET when this host writes).
    pub stored: Stored,
    /// For a revert, the service as this host ran it before (from the manifest version
    /// that generation came from, and only if its spec hash is the one recorded):
    /// `Ok(None)`, nothing ran before; `Err`, why it is not available.
    pub previous: Result<Option<(Service, Option<String>)>, String>,
    /// This host deployed the version through its gate as the service's first generation
    /// here (an abort removes it rather than returning to an earlier one).
    pub first: bool,
    /// This host's deploy of the version failed in an earlier epoch, forgiven by a
    /// `resume`: it tries again.
    pub forgiven: bool,
}

impl RolloutView {
    /// The gate for this host, which runs the rolled-out version (`runs`) or not.
    pub fn gate(&self, runs: bool) -> Gate {
        match &self.progress {
            Ok(p) => deploy_manifest::rollout::gate(p, self.wave, runs),
            // Unknown: what runs keeps running, nothing new starts.
            Err(_) if runs => Gate::Watch,
            Err(e) => Gate::Hold {
                reason: format!("cannot read the rollout ({e}); the next run retries"),
            },
        }
    }

    /// What the plan shows of it for `service`: the gate, and the abort marker due.
    pub fn gated(&self, service: &str, runs: bool) -> Gated {
        Gated {
            service: service.to_owned(),
            spec_hash: self.spec_hash.clone(),
            wave: self.wave,
            waves: self.assigned.len(),
            gate: self.gate(runs),
            abort: self.abort_due(),
        }
    }

    /// The abort marker this host writes: the rollout must stop (a missed deadline, too
    /// many failures) and nobody wrote the marker yet.
    pub fn abort_due(&self) -> Option<(Cause, String)> {
        match &self.progress {
            Ok(Progress {
                phase: deploy_manifest::rollout::Phase::Aborting { cause, reason },
                ..
            }) => Some((*cause, reason.clone())),
            _ => None,
        }
    }
}

/// A service rolled out in waves, in the plan: what its gate said to this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gated {
    pub service: String,
    pub spec_hash: String,
    /// This host's wave (0 is the first), of `waves`.
    pub wave: usize,
    pub waves: usize,
    #[serde(flatten)]
    pub gate: Gate,
    /// The abort marker this run writes, with this cause and reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<(Cause, String)>,
}

impl fmt::Display for Gated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.gate {
            Gate::Go => "its wave is open: deploy".to_owned(),
            Gate::Hold { reason } => format!("hold: {reason}"),
            Gate::Revert { reason } => format!("{reason}: return to the version it ran before"),
            Gate::Watch => "runs it; the rollout is not done".to_owned(),
            Gate::Done => "runs it; the rollout is done".to_owned(),
        };
        write!(
            f,
            "{}: wave {} of {}: {what}",
            self.service,
            self.wave + 1,
            self.waves
        )?;
        if let Some((_, reason)) = &self.abort {
            write!(f, "; writes the abort marker ({reason})")?;
        }
        Ok(())
    }
}
