//! The poll `run`, `plan` and `fetch` share: one conditional GET of `manifest.json`, then
//! validation and, with trusted keys, the signature, sequence and expiry checks, before
//! anything is planned.

use std::path::PathBuf;
use std::time::SystemTime;

use deploy_manifest::model::Manifest;
use deploy_manifest::repo::CURRENT_KEY;
use deploy_manifest::store::{Fetched, ObjectStore};
use deploy_manifest::validate::parse_manifest;

use super::Agent;
use crate::AgentError;
use crate::plan::desired;
use crate::state::State;

/// What one conditional GET of `manifest.json` found.
pub enum Polled {
    /// Unchanged since the ETag given.
    Unchanged,
    /// New or changed: valid and, with trusted keys, trusted.
    Changed {
        manifest: Box<Manifest>,
        etag: String,
    },
}

impl<S: ObjectStore, H> Agent<S, H> {
    /// One conditional GET of `manifest.json` (with `etag`, the one the last run saw), and
    /// the checks `run`, `plan` and `fetch` share: valid, and with trusted keys signed,
    /// newer than the applied one and not expired.
    pub async fn poll(&self, state: &State, etag: Option<&str>) -> Result<Polled, AgentError> {
        match self.store.get(CURRENT_KEY, etag).await? {
            Fetched::NotModified => Ok(Polled::Unchanged),
            Fetched::Found { bytes, etag } => {
                let manifest = parse_manifest(&bytes, &self.manifest_origin())?;
                self.trust(&manifest, state)?;
                Ok(Polled::Changed {
                    manifest: Box::new(manifest),
                    etag,
                })
            }
            Fetched::NotFound => Err(deploy_manifest::Error::NotInitialized {
                url: self.store.url().to_owned(),
            }
            .into()),
        }
    }

    /// `deployer-agent fetch`: download and verify the artifacts of this host's services
    /// (of the current manifest, checked as `run` checks it); installs nothing else.
    pub async fn prefetch(&self) -> Result<Vec<(String, PathBuf)>, AgentError> {
        let state = State::load(&self.config.state_dir, &self.config.host)?;
        let Polled::Changed { manifest, .. } = self.poll(&state, None).await? else {
            unreachable!("a GET without If-None-Match is never answered 304")
        };
        let mut fetched = Vec::new();
        for service in desired(&manifest, &self.config.host) {
            let path = crate::fetch::ensure(
                &self.store,
                &service.artifact,
                &self.config.state_dir,
                &self.config.nix_trusted_keys,
                self.config.unpack_limits,
            )
            .await?;
            fetched.push((service.name.clone(), path));
        }
        Ok(fetched)
    }

    fn manifest_origin(&self) -> String {
        format!("{}/{CURRENT_KEY}", self.store.url())
    }

    /// With trusted keys configured: the manifest must be signed by one of them, its
    /// sequence above the one this host applied (a replayed old version is not), and its
    /// expiry not passed (a frozen view of the store is not served forever).
    fn trust(&self, m: &Manifest, state: &State) -> Result<(), AgentError> {
        if self.config.trusted_keys.is_empty() {
            return Ok(());
        }
        use deploy_manifest::sign;
        let floor = crate::state::applied_floor(&self.config.state_dir, state)?;
        sign::verify(m, &self.config.trusted_keys)
            .and_then(|()| sign::check_sequence(m, floor.as_ref()))
            .and_then(|()| sign::check_expiry(m, SystemTime::now()))
            .map_err(|e| AgentError::Manifest(e.into()))
    }

    /// Accept `m`: raise this host's sequence floor to it before anything is applied, so
    /// that no older manifest is ever accepted again, even if `state.json` is lost.
    pub(super) fn accept(&self, m: &Manifest, state: &mut State) -> Result<(), AgentError> {
        state.expired = None;
        if self.config.trusted_keys.is_empty() {
            return Ok(());
        }
        let (Some(version), sequence) = (m.version.clone(), m.sequence.unwrap_or(0)) else {
            return Ok(());
        };
        crate::state::record_applied(
            &self.config.state_dir,
            &deploy_manifest::sign::Applied { version, sequence },
        )
    }
}
