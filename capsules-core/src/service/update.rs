//! Changing a capsule's limits after create, within the token's and team's bounds.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use super::args::{Arg, keep};
use super::capsule::CapsuleHandle;
use super::traced;
use crate::error::{Error, Result};
use crate::events::{EventKind, NewEvent};
use crate::policy::Action;
use crate::records::{CapsulePatch, CapsuleRecord};
use crate::state::Operation;
use crate::types::{MicroCredits, NetworkPolicy, check_duration};

/// A change of limits in preparation; `.await` applies it (within the token's and team's bounds).
#[must_use = "an update does nothing until awaited"]
pub struct UpdateBuilder {
    pub(super) handle: CapsuleHandle,
    pub(super) credit_limit: Option<Result<MicroCredits>>,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_runtime: Option<Duration>,
    pub(super) network: Option<Result<NetworkPolicy>>,
}

impl std::fmt::Debug for UpdateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateBuilder").finish_non_exhaustive()
    }
}

impl UpdateBuilder {
    pub fn credit_limit(mut self, c: impl Arg<MicroCredits>) -> Self {
        self.credit_limit = keep(c);
        self
    }
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }
    pub fn max_runtime(mut self, d: Duration) -> Self {
        self.max_runtime = Some(d);
        self
    }
    pub fn network(mut self, n: impl Arg<NetworkPolicy>) -> Self {
        self.network = keep(n);
        self
    }

    async fn run(self) -> Result<CapsuleRecord> {
        let h = self.handle;
        traced("update_limits", async move {
            let credit_limit = self.credit_limit.transpose()?;
            let network = self.network.transpose()?;
            let patch = CapsulePatch {
                credit_limit,
                idle_timeout_ms: self
                    .idle_timeout
                    .map(|d| check_duration("an idle timeout", d))
                    .transpose()?,
                max_runtime_ms: self
                    .max_runtime
                    .map(|d| check_duration("a max runtime", d))
                    .transpose()?,
                network: network.clone(),
            };
            let (p, rec) = h
                .prep(
                    Action::UpdateLimits {
                        credit_limit,
                        network: network.as_ref(),
                    },
                    Operation::Update,
                )
                .await?;
            if let Some(n) = &network
                && n != &rec.network
            {
                if !h.inner.backend.capabilities().network_policy {
                    return Err(Error::unsupported(format!(
                        "the {} backend cannot enforce network policies",
                        h.inner.backend.info().name
                    )));
                }
                h.inner.backend.apply_network(&rec.id, n).await?;
            }
            let detail = format!(
                "credit_limit={} idle_timeout_ms={} max_runtime_ms={} network={}",
                patch.credit_limit.map_or("-".into(), |c| c.to_string()),
                patch.idle_timeout_ms.map_or("-".into(), |c| c.to_string()),
                patch.max_runtime_ms.map_or("-".into(), |c| c.to_string()),
                patch.network.as_ref().map_or("-".into(), |c| c.to_string()),
            );
            let ev = NewEvent::new(h.inner.now(), EventKind::LimitsChanged { detail })
                .team(&rec.team)
                .capsule(&rec.id)
                .token(Some(&p.token));
            h.inner.store.update_capsule(&rec.id, patch, ev).await
        })
        .await
    }
}

impl IntoFuture for UpdateBuilder {
    type Output = Result<CapsuleRecord>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<CapsuleRecord>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
