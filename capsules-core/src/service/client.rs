//! A client acting with one token: create, find and list capsules; the team's usage and ledger.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::args::{Arg, keep};
use super::capsule::CapsuleHandle;
use super::{Inner, traced};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::ledger::{LedgerEntry, Usage};
use crate::policy::{self, Action, Target};
use crate::records::{CapsuleRecord, NewCapsule};
use crate::state::CapsuleState;
use crate::types::{
    CapsuleId, CapsuleLimits, CapsuleName, CapsuleRef, DEFAULT_CREDIT_LIMIT, DEFAULT_DISK_GIB, Image, MicroCredits,
    NetworkPolicy, Region, Size, check_disk, check_duration,
};

/// A client: every call authenticates its secret again (revocation takes effect at once).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    secret: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client(..)")
    }
}

/// What `list` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListOptions {
    pub include_terminated: bool,
}

/// A team's usage and balance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TeamUsage {
    pub balance: MicroCredits,
    /// Capsules running now (creating, running, waking, suspending).
    pub running: u32,
    pub running_vcpus: u32,
    pub usage: Usage,
}

impl Client {
    pub(super) fn new(inner: Arc<Inner>, secret: &str) -> Self {
        Client {
            inner,
            secret: secret.to_owned(),
        }
    }

    /// Starts a create; set options, then `.await` it.
    pub fn create(&self, name: impl Into<String>) -> CreateBuilder {
        CreateBuilder {
            client: self.clone(),
            name: name.into(),
            size: None,
            image: None,
            region: None,
            credit_limit: None,
            disk_gib: None,
            network: None,
            idle_timeout: None,
            max_runtime: None,
        }
    }

    /// A handle to an existing capsule by name or id (`cap_...`). Checked when used.
    pub fn capsule(&self, name_or_id: &str) -> Result<CapsuleHandle> {
        Ok(CapsuleHandle::new(
            self.inner.clone(),
            &self.secret,
            CapsuleRef::parse(name_or_id)?,
        ))
    }

    /// The capsules in this token's reach (its prefix), live ones unless told otherwise.
    pub async fn list(&self) -> Result<Vec<CapsuleRecord>> {
        self.list_with(ListOptions::default()).await
    }

    pub async fn list_with(&self, opts: ListOptions) -> Result<Vec<CapsuleRecord>> {
        traced("list", async {
            let p = self.inner.authenticate(&self.secret).await?;
            let team = p
                .team
                .clone()
                .ok_or_else(|| Error::permission_denied("the operator token has no capsules"))?;
            self.inner.check(&p, &Action::List, Target::Team(&team)).await?;
            let mut v = self.inner.store.list_capsules(&team, opts.include_terminated).await?;
            v.retain(|c| policy::in_reach(&p, &c.name));
            Ok(v)
        })
        .await
    }

    /// The team's balance (`billing:read`).
    pub async fn balance(&self) -> Result<MicroCredits> {
        traced("balance", async {
            let team = self.billing().await?;
            self.inner.store.balance(&team).await
        })
        .await
    }

    /// The team's ledger entries (`billing:read`).
    pub async fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        traced("ledger", async {
            let team = self.billing().await?;
            self.inner.store.entries(&team).await
        })
        .await
    }

    /// The team's usage (`billing:read`).
    pub async fn usage(&self) -> Result<TeamUsage> {
        traced("team_usage", async {
            let team = self.billing().await?;
            let entries = self.inner.store.entries(&team).await?;
            let mut usage = Usage::from_entries(&entries)?;
            let caps = self.inner.store.list_capsules(&team, true).await?;
            usage.preview_bytes = caps.iter().map(|c| c.meter.traffic_bytes).sum();
            let running: Vec<_> = caps.iter().filter(|c| c.state.is_running()).collect();
            Ok(TeamUsage {
                balance: self.inner.store.balance(&team).await?,
                running: running.len() as u32,
                running_vcpus: running.iter().map(|c| c.size.vcpus()).sum(),
                usage,
            })
        })
        .await
    }

    /// The team's audit trail (`billing:read` or `admin`: it spans every capsule).
    pub async fn team_events(&self) -> Result<Vec<Event>> {
        traced("team_events", async {
            let team = self.billing().await?;
            self.inner.store.team_events(&team).await
        })
        .await
    }

    async fn billing(&self) -> Result<crate::types::TeamId> {
        let p = self.inner.authenticate(&self.secret).await?;
        let team = p
            .team
            .clone()
            .ok_or_else(|| Error::permission_denied("the operator token has no team ledger"))?;
        self.inner.check(&p, &Action::ReadBilling, Target::Team(&team)).await?;
        Ok(team)
    }
}

/// A create in preparation; `.await` runs it. Every option is validated before anything is
/// reserved or charged.
#[must_use = "a create does nothing until awaited"]
pub struct CreateBuilder {
    client: Client,
    name: String,
    size: Option<Result<Size>>,
    image: Option<Result<Image>>,
    region: Option<Result<Region>>,
    credit_limit: Option<Result<MicroCredits>>,
    disk_gib: Option<u32>,
    network: Option<Result<NetworkPolicy>>,
    idle_timeout: Option<Duration>,
    max_runtime: Option<Duration>,
}

impl std::fmt::Debug for CreateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateBuilder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CreateBuilder {
    /// `1x1gb` (default), `2x2gb`, `2x4gb`, `4x8gb`.
    pub fn size(mut self, size: impl Arg<Size>) -> Self {
        self.size = keep(size);
        self
    }
    /// `full` (default) or `small`.
    pub fn image(mut self, image: impl Arg<Image>) -> Self {
        self.image = keep(image);
        self
    }
    /// `eu-central` (the only one at launch).
    pub fn region(mut self, region: impl Arg<Region>) -> Self {
        self.region = keep(region);
        self
    }
    /// In credits (`"2.00"`); default 1.00, bounded by the token's max credit limit.
    pub fn credit_limit(mut self, limit: impl Arg<MicroCredits>) -> Self {
        self.credit_limit = keep(limit);
        self
    }
    /// Disk in GiB (default 10; at most 10 / 20 / 40 / 80 by size).
    pub fn disk_gib(mut self, gib: u32) -> Self {
        self.disk_gib = Some(gib);
        self
    }
    /// `internet` (default), `none`, `allow:<cidr or domain>,...`.
    pub fn network(mut self, policy: impl Arg<NetworkPolicy>) -> Self {
        self.network = keep(policy);
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

    async fn run(self) -> Result<CapsuleHandle> {
        let inner = self.client.inner.clone();
        let secret = self.client.secret.clone();
        traced("create", async move {
            let p = inner.authenticate(&secret).await?;
            let team = p
                .team
                .clone()
                .ok_or_else(|| Error::permission_denied("the operator token cannot create capsules"))?;
            // Validate everything first; nothing is reserved or charged on bad input.
            let name = CapsuleName::new(self.name)?;
            let size = self.size.transpose()?.unwrap_or(Size::S1x1gb);
            let image = self.image.transpose()?.unwrap_or_default();
            let region = self.region.transpose()?.unwrap_or_default();
            let network = self.network.transpose()?.unwrap_or_default();
            let disk_gib = self.disk_gib.unwrap_or(DEFAULT_DISK_GIB.min(size.max_disk_gib()));
            check_disk(size, disk_gib)?;
            let mut limits = CapsuleLimits::default();
            if let Some(d) = self.idle_timeout {
                limits.idle_timeout_ms = check_duration("an idle timeout", d)?;
            }
            if let Some(d) = self.max_runtime {
                limits.max_runtime_ms = check_duration("a max runtime", d)?;
            }
            limits.credit_limit = match self.credit_limit.transpose()? {
                Some(c) => c,
                None => p
                    .max_credit_limit
                    .map_or(DEFAULT_CREDIT_LIMIT, |cap| cap.min(DEFAULT_CREDIT_LIMIT)),
            };
            inner
                .check(
                    &p,
                    &Action::Create {
                        size,
                        credit_limit: limits.credit_limit,
                        network: &network,
                    },
                    Target::Capsule {
                        team: &team,
                        name: &name,
                        id: None,
                    },
                )
                .await?;
            if network != NetworkPolicy::Internet && !inner.backend.capabilities().network_policy {
                return Err(Error::unsupported(format!(
                    "the {} backend cannot enforce network policies; use the default (internet)",
                    inner.backend.info().name
                )));
            }
            let new = NewCapsule {
                id: CapsuleId::generate(),
                team,
                name,
                size,
                image,
                region,
                disk_gib,
                network,
                limits,
                created_by: p.token.clone(),
                now_ms: inner.now(),
            };
            tracing::Span::current().record("capsule", tracing::field::display(&new.id));
            let rec = inner
                .store
                .create_capsule(new, &inner.rates, Some(p.token.clone()))
                .await?;
            match inner.backend.create(&Inner::spec(&rec)).await {
                Ok(()) => {
                    inner.activity.touch(&rec.id, inner.now());
                    inner
                        .store
                        .finish_transition(
                            &rec.id,
                            CapsuleState::Creating,
                            CapsuleState::Running,
                            "created",
                            inner.now(),
                        )
                        .await?;
                }
                Err(e) => {
                    let _ = inner.backend.terminate(&rec.id).await;
                    let _ = inner
                        .store
                        .abort_start(&rec.id, CapsuleState::Terminated, "create_failed", inner.now())
                        .await;
                    return Err(e);
                }
            }
            Ok(CapsuleHandle::new(inner.clone(), &secret, CapsuleRef::Id(rec.id)))
        })
        .await
    }
}

impl IntoFuture for CreateBuilder {
    type Output = Result<CapsuleHandle>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<CapsuleHandle>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
