//! After a run, still under the run lock: the metrics file and the host's signed report
//! (`status/<host>.json`), both from `state.json`.

use std::time::{Duration, SystemTime};

use deploy_manifest::store::ObjectStore;

use super::Agent;
use crate::host::Host;
use crate::state::State;
use crate::systemd::ServiceManager;

impl<S: ObjectStore, H: Host> Agent<S, H> {
    /// After a run: write the metrics file, and `status/<host>.json` when what it says
    /// changed or the last one is older than two intervals (a heartbeat, so that
    /// `deploy-manifest status` can tell a silent agent). Failures are logged, not fatal.
    pub(super) async fn publish(&self, state: &mut State, took: Duration) {
        crate::fault::point("publish");
        let dir = &self.config.state_dir;
        if let Some(path) = &self.config.metrics_file {
            // Only the metrics file needs the restart counts: one read per loaded unit.
            let units: Vec<&str> = state
                .services
                .values()
                .filter(|s| s.current.is_some())
                .map(|s| s.unit.as_str())
                .collect();
            let by_unit = self.host.manager().restarts(&units).await;
            let restarts = state
                .services
                .iter()
                .filter_map(|(name, s)| Some((name.clone(), *by_unit.get(&s.unit)?)))
                .collect();
            if let Err(e) = crate::report::write_metrics(path, state, &restarts, took) {
                tracing::warn!(error = %e, path = %path.display(), "could not write metrics");
            }
        }
        let mut report = crate::report::host_report(state, self.config.interval);
        let key = crate::report::host_key(dir, &self.config.host);
        // Which key signs it is part of what it says; the signature is made only for a
        // report that goes out.
        report.signature = key.as_ref().ok().map(|k| deploy_manifest::sign::Signature {
            key: k.name.clone(),
            value: String::new(),
        });
        let hash = crate::report::report_hash(&report);
        let heartbeat_due = state
            .reported_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age >= 2 * self.config.interval);
        if state.report_hash.as_deref() == Some(hash.as_str()) && !heartbeat_due {
            return;
        }
        match key {
            Ok(key) => key.sign_json(&mut report),
            Err(e) => tracing::warn!(
                error = %e,
                "publishing this report unsigned: readers given host keys will not count it"
            ),
        }
        let bytes = serde_json::to_vec_pretty(&report).expect("the report serialises");
        let key = deploy_manifest::status::report_key(&self.config.host);
        match self
            .store
            .put(&key, bytes, deploy_manifest::store::Precondition::None)
            .await
        {
            Ok(_) => {
                state.reported_at = Some(report.reported_at.clone());
                state.report_hash = Some(hash);
                if let Err(e) = self.host.save_state(state) {
                    tracing::warn!(error = %e, "could not record the report in state.json");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write {key}; retrying after the next run")
            }
        }
    }
}
