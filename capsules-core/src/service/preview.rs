//! What the preview proxy needs: host label → capsule, who may open it, a byte stream to its
//! port (waking it on use), and traffic metering (per MiB; counts as activity).

use std::sync::Arc;

use super::{Inner, traced};
use crate::backend::Connection;
use crate::error::{Error, Result};
use crate::policy::{Action, Target};
use crate::state::Operation;
use crate::types::{CapsuleId, CapsuleName, TeamId, UrlAccess};

/// The capsule behind a public URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewTarget {
    pub capsule: CapsuleId,
    pub team: TeamId,
    pub name: CapsuleName,
    pub port: u16,
    pub access: UrlAccess,
    pub host_label: String,
}

/// The preview proxy's entry points.
#[derive(Debug, Clone)]
pub struct Preview {
    inner: Arc<Inner>,
}

impl Preview {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Preview { inner }
    }

    /// The capsule exposed under `host_label`. `NotFound` when none is.
    pub async fn resolve(&self, host_label: &str) -> Result<PreviewTarget> {
        traced("preview_resolve", async {
            let rec = self
                .inner
                .store
                .capsule_by_host_label(host_label)
                .await?
                .filter(|c| c.state.is_live())
                .ok_or_else(|| Error::not_found(format!("no capsule is exposed at {host_label}")))?;
            let url = rec.url.clone().expect("filtered: exposed");
            tracing::Span::current().record("capsule", tracing::field::display(&rec.id));
            Ok(PreviewTarget {
                capsule: rec.id,
                team: rec.team,
                name: rec.name,
                port: url.port,
                access: url.access,
                host_label: url.host_label,
            })
        })
        .await
    }

    /// Resolves and authorizes: `public` URLs open for anyone; `token` URLs need a bearer token
    /// that can read the capsule, or a `preview` token minted for it.
    pub async fn authorize(&self, host_label: &str, bearer: Option<&str>) -> Result<PreviewTarget> {
        let t = self.resolve(host_label).await?;
        if t.access == UrlAccess::Public {
            return Ok(t);
        }
        traced("preview_authorize", async {
            let secret = bearer.ok_or_else(|| Error::unauthenticated("this URL needs a token"))?;
            let p = self.inner.authenticate(secret).await?;
            self.inner
                .check(
                    &p,
                    &Action::Preview,
                    Target::Capsule {
                        team: &t.team,
                        name: &t.name,
                        id: Some(&t.capsule),
                    },
                )
                .await?;
            Ok(t)
        })
        .await
    }

    /// A byte stream to the exposed port, waking the capsule if it sleeps (unless a limit
    /// forbids: the error names it). Counts as activity.
    pub async fn open(&self, target: &PreviewTarget) -> Result<Box<dyn Connection>> {
        traced("preview_open", async {
            let rec = self
                .inner
                .store
                .capsule(&target.capsule)
                .await?
                .ok_or_else(|| Error::not_found("the capsule is gone"))?;
            crate::state::refusal(rec.state, Operation::Use, rec.name.as_str())?;
            let rec = self.inner.ensure_running_system(rec).await?;
            self.inner.activity.touch(&rec.id, self.inner.now());
            self.inner.backend.connect(&rec.id, target.port).await
        })
        .await
    }

    /// Records `bytes` of traffic (both directions) through the URL: each completed MiB is
    /// charged; the remainder carries. Counts as activity.
    pub async fn record_traffic(&self, capsule: &CapsuleId, bytes: u64) -> Result<()> {
        traced("preview_traffic", async {
            let now = self.inner.now();
            self.inner.activity.touch(capsule, now);
            self.inner
                .store
                .record_traffic(capsule, bytes, now, &self.inner.rates)
                .await
                .map(|_| ())
        })
        .await
    }
}
