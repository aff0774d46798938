//! `Capsules`: the one front door. Every operation authenticates the secret, runs
//! [`policy::check`](crate::policy::check), and only then touches the ledger and the backend (which
//! is private in here: there is no way around the enforcement point).

mod activity;
mod admin;
mod args;
mod capsule;
mod client;
mod exec;
mod preview;
mod update;

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use admin::{Bootstrapped, NewTeam, Operator, Tokens};
pub use args::Arg;
pub use capsule::{CapsuleHandle, CapsuleUsage};
pub use client::{Client, CreateBuilder, ListOptions, TeamUsage};
pub use exec::{Console, ExecBuilder};
pub use preview::{Preview, PreviewTarget};
pub use update::UpdateBuilder;

use crate::backend::{Backend, BackendState, Capabilities, CapsuleSpec};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{EventKind, NewEvent};
use crate::ledger::StopReason;
use crate::policy::{self, Action, Target};
use crate::records::CapsuleRecord;
use crate::state::{self, CapsuleState, Operation, Outcome};
use crate::store::{EndKind, Observed, StartKind, Store};
use crate::tokens::{self, Principal};
use crate::types::{CapsuleId, CapsuleRef, RateCard};

use activity::ActivityMap;

/// The library's front door. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct Capsules {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    backend: Arc<dyn Backend>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rates: RateCard,
    activity: ActivityMap,
}

/// Builds [`Capsules`]: a backend and a store are required; the clock defaults to the system
/// clock and the rates to DESIGN.md's defaults.
#[derive(Debug, Default)]
pub struct CapsulesBuilder {
    backend: Option<Arc<dyn Backend>>,
    store: Option<Arc<dyn Store>>,
    clock: Option<Arc<dyn Clock>>,
    rates: Option<RateCard>,
}

impl CapsulesBuilder {
    /// The backend (any `Backend`, including an `Arc<dyn Backend>`).
    pub fn backend<B: Backend>(mut self, backend: B) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }
    /// The store (e.g. [`MemoryStore`](crate::store::MemoryStore)).
    pub fn store<S: Store>(mut self, store: S) -> Self {
        self.store = Some(Arc::new(store));
        self
    }
    /// A store shared with someone else (tests inspecting it, a second service).
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }
    pub fn clock<C: Clock>(mut self, clock: C) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }
    pub fn rates(mut self, rates: RateCard) -> Self {
        self.rates = Some(rates);
        self
    }
    pub async fn build(self) -> Result<Capsules> {
        let backend = self
            .backend
            .ok_or_else(|| Error::invalid_input("Capsules needs a backend: call .backend(...)"))?;
        let store = self
            .store
            .ok_or_else(|| Error::invalid_input("Capsules needs a store: call .store(...)"))?;
        let rates = self.rates.unwrap_or_default();
        rates.validate()?;
        Ok(Capsules {
            inner: Arc::new(Inner {
                backend,
                store,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                rates,
                activity: ActivityMap::default(),
            }),
        })
    }
}

/// What one [`Capsules::tick`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Capsules metered.
    pub metered: usize,
    pub charged: crate::types::MicroCredits,
    /// Capsules put to sleep, and why.
    pub slept: Vec<(CapsuleId, StopReason)>,
    /// Capsules whose job failed (logged; retried next tick).
    pub errors: Vec<(CapsuleId, String)>,
}

impl Capsules {
    pub fn builder() -> CapsulesBuilder {
        CapsulesBuilder::default()
    }

    /// A client acting with `secret` (checked on every call, not here beyond its shape).
    pub fn connect(&self, secret: impl AsRef<str>) -> Result<Client> {
        tokens::parse_secret(secret.as_ref())?;
        Ok(Client::new(self.inner.clone(), secret.as_ref()))
    }

    /// Token management with `secret` (`tokens:write` or `admin`).
    pub fn tokens(&self, secret: impl AsRef<str>) -> Tokens {
        Tokens::new(self.inner.clone(), secret.as_ref())
    }

    /// Operator calls (teams, caps, grants) with the operator's `secret`.
    pub fn operator(&self, secret: impl AsRef<str>) -> Operator {
        Operator::new(self.inner.clone(), secret.as_ref())
    }

    /// The service clock's time in ms since the Unix epoch (the clock given to the builder), for
    /// callers that keep their own short-lived state (a server's console tickets).
    pub fn now_ms(&self) -> i64 {
        self.inner.now()
    }

    /// What the preview proxy needs: host label → capsule, authorization, traffic metering.
    pub fn preview(&self) -> Preview {
        Preview::new(self.inner.clone())
    }

    /// On an empty store: the operator token, the first team with its owner token (`admin`) and
    /// the 5.00 onboarding grant. Both secrets are returned once. Refused on a non-empty store.
    pub async fn bootstrap(&self, team_name: &str) -> Result<Bootstrapped> {
        admin::bootstrap(&self.inner, team_name).await
    }

    /// What the backend can do.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    pub fn rates(&self) -> RateCard {
        self.inner.rates
    }

    /// Runs every lifecycle job due at the clock's now: metering (compute minutes, storage hours),
    /// credit limits and balance, max runtime, idle sleep. Activity is sampled here: an exec or file
    /// transfer in flight, an attached console, a running process the backend reports.
    pub async fn tick(&self) -> TickReport {
        self.inner.tick().instrument(tracing::info_span!("capsules.tick")).await
    }

    /// Runs [`tick`](Self::tick) every `interval` on the current tokio runtime until the handle is
    /// aborted (real deployments; tests call `tick` themselves).
    pub fn spawn_jobs(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                let r = me.tick().await;
                for (id, e) in &r.errors {
                    tracing::warn!(capsule = %id, error = %e, "lifecycle job failed");
                }
            }
        })
    }

    /// For durable stores after a restart: compares the records with [`Backend::list`], adopts
    /// running capsules (charging at once the minutes they ran unmetered; one that passed a limit
    /// sleeps at once), and marks the rest sleeping or failed. Returns the capsules it changed.
    pub async fn reconcile(&self) -> Result<Vec<CapsuleRecord>> {
        self.inner
            .reconcile()
            .instrument(tracing::info_span!("capsules.reconcile"))
            .await
    }
}

impl Inner {
    pub(crate) fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Secret → principal: shape, lookup by id, constant-time hash compare, then not revoked or
    /// expired, ancestors included.
    pub(crate) async fn authenticate(&self, secret: &str) -> Result<Principal> {
        let id = tokens::parse_secret(secret)?;
        let chain = self.store.token_chain(&id).await?;
        let Some(tok) = chain.first() else {
            return Err(Error::unauthenticated("the token is not known"));
        };
        if !tokens::verify_secret(secret, &tok.secret_hash) {
            return Err(Error::unauthenticated("the token is not known"));
        }
        let now = self.now();
        for t in &chain {
            if t.revoked_at_ms.is_some() {
                return Err(Error::unauthenticated(if t.id == tok.id {
                    "the token was revoked"
                } else {
                    "the token was revoked (a token it descends from was revoked)"
                }));
            }
            if !t.is_live(now) {
                return Err(Error::unauthenticated("the token has expired"));
            }
        }
        if chain.last().is_some_and(|root| root.parent.is_some()) {
            return Err(Error::unauthenticated("the token's ancestry is incomplete"));
        }
        let p = Principal::from_record(tok);
        let span = tracing::Span::current();
        span.record("token", tracing::field::display(&p.token));
        if let Some(t) = &p.team {
            span.record("team", tracing::field::display(t));
        }
        Ok(p)
    }

    /// Policy, with denials written to the audit trail.
    pub(crate) async fn check(&self, p: &Principal, action: &Action<'_>, target: Target<'_>) -> Result<()> {
        match policy::check(p, action, target) {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.kind() == ErrorKind::PermissionDenied {
                    let mut ev = NewEvent::new(
                        self.now(),
                        EventKind::Denied {
                            action: action.name().to_owned(),
                            message: e.message().to_owned(),
                        },
                    )
                    .token(Some(&p.token));
                    match target {
                        Target::Capsule { team, id, .. } => {
                            ev.team = Some(team.clone());
                            ev.capsule = id.cloned();
                        }
                        Target::Team(t) => ev.team = Some(t.clone()),
                        Target::Server => ev.team = p.team.clone(),
                    }
                    if let Err(err) = self.store.append_event(ev).await {
                        tracing::warn!(error = %err, "could not record a denial");
                    }
                }
                Err(e)
            }
        }
    }

    /// Finds the capsule a principal means. Names resolve to the live capsule; with `fallback`
    /// (read-only calls and terminate) to the most recently terminated one where none is live.
    pub(crate) async fn resolve(&self, p: &Principal, target: &CapsuleRef, fallback: bool) -> Result<CapsuleRecord> {
        let team = p
            .team
            .as_ref()
            .ok_or_else(|| Error::permission_denied("the operator token manages teams and grants only"))?;
        let rec = match target {
            CapsuleRef::Name(n) => self.store.capsule_by_name(team, n, fallback).await?,
            CapsuleRef::Id(id) => self.store.capsule(id).await?.filter(|c| &c.team == team),
        };
        let rec = match rec {
            Some(r) => r,
            None => {
                // Say why a name that did exist is gone from calls that need a live capsule.
                let terminated = match (target, fallback) {
                    (CapsuleRef::Name(n), false) => self.store.capsule_by_name(team, n, true).await?.is_some(),
                    _ => false,
                };
                return Err(Error::not_found(if terminated {
                    format!(
                        "capsule {target} was terminated; no live capsule has that name (create it again to reuse it)"
                    )
                } else {
                    format!("capsule {target} does not exist")
                }));
            }
        };
        tracing::Span::current().record("capsule", tracing::field::display(&rec.id));
        Ok(rec)
    }

    /// Authenticate, resolve, check policy and the state table for `op`. Use operations wake a
    /// sleeping capsule first (through caps and limits).
    pub(crate) async fn prepare(
        &self,
        secret: &str,
        target: &CapsuleRef,
        action: Action<'_>,
        op: Operation,
    ) -> Result<(Principal, CapsuleRecord)> {
        let p = self.authenticate(secret).await?;
        let fallback = matches!(op, Operation::Read | Operation::Terminate);
        let rec = self.resolve(&p, target, fallback).await?;
        self.check(
            &p,
            &action,
            Target::Capsule {
                team: &rec.team,
                name: &rec.name,
                id: Some(&rec.id),
            },
        )
        .await?;
        let rec = match op {
            Operation::Use => self.ensure_running(&p, rec).await?,
            _ => {
                state::refusal(rec.state, op, rec.name.as_str())?;
                rec
            }
        };
        Ok((p, rec))
    }

    /// Wake-on-use: waits out a sleep in progress, wakes a sleeping capsule.
    pub(crate) async fn ensure_running(&self, p: &Principal, mut rec: CapsuleRecord) -> Result<CapsuleRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match state::refusal(rec.state, Operation::Use, rec.name.as_str())? {
                Outcome::Proceed => return Ok(rec),
                Outcome::WakeFirst => return self.start(Some(p), rec, StartKind::Wake).await,
                _ => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(Error::unavailable(format!(
                            "capsule {} is still {}; retry shortly",
                            rec.name, rec.state
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    rec = self
                        .store
                        .capsule(&rec.id)
                        .await?
                        .ok_or_else(|| Error::not_found(format!("capsule {} is gone", rec.id)))?;
                }
            }
        }
    }

    /// Wake-on-use for system callers (the preview proxy): the same path without a token.
    pub(crate) async fn ensure_running_system(&self, rec: CapsuleRecord) -> Result<CapsuleRecord> {
        if rec.state == CapsuleState::Sleeping {
            return self.start(None, rec, StartKind::Wake).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut rec = rec;
        while rec.state != CapsuleState::Running {
            state::refusal(rec.state, Operation::Use, rec.name.as_str())?;
            if rec.state == CapsuleState::Sleeping {
                return self.start(None, rec, StartKind::Wake).await;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::unavailable(format!(
                    "capsule {} is still {}; retry shortly",
                    rec.name, rec.state
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            rec = self
                .store
                .capsule(&rec.id)
                .await?
                .ok_or_else(|| Error::not_found("the capsule is gone"))?;
        }
        Ok(rec)
    }

    /// Wake or restart through the store's atomic start step, then the backend.
    pub(crate) async fn start(
        &self,
        p: Option<&Principal>,
        rec: CapsuleRecord,
        kind: StartKind,
    ) -> Result<CapsuleRecord> {
        if kind == StartKind::Restart && !self.backend.capabilities().restart {
            return Err(Error::unsupported(format!(
                "the {} backend cannot restart capsules",
                self.backend.info().name
            )));
        }
        let token = p.map(|p| p.token.clone());
        let was = rec.state;
        let t = self
            .store
            .begin_start(&rec.id, kind, self.now(), &self.rates, token)
            .await?;
        let rec = t.record;
        if !t.began {
            // Already running, or another call is waking it: wait for that to finish.
            return self.wait_for(&rec, CapsuleState::Running).await;
        }
        let res = match kind {
            StartKind::Wake => self.backend.wake(&rec.id).await,
            StartKind::Restart => self.backend.restart(&rec.id).await,
        };
        if rec.state == CapsuleState::Running {
            // Restart of a running capsule: same run, rebooted.
            res?;
            self.store
                .append_event(
                    NewEvent::new(
                        self.now(),
                        EventKind::StateChanged {
                            from: CapsuleState::Running,
                            to: CapsuleState::Running,
                            reason: "restarted".into(),
                        },
                    )
                    .team(&rec.team)
                    .capsule(&rec.id)
                    .token(p.map(|p| &p.token)),
                )
                .await?;
            return Ok(rec);
        }
        match res {
            Ok(()) => {
                self.activity.touch(&rec.id, self.now());
                self.store
                    .finish_transition(&rec.id, CapsuleState::Waking, CapsuleState::Running, "woke", self.now())
                    .await
            }
            Err(e) => {
                let back = if was == CapsuleState::Failed || kind == StartKind::Restart {
                    CapsuleState::Failed
                } else {
                    CapsuleState::Sleeping
                };
                let _ = self.store.abort_start(&rec.id, back, "wake_failed", self.now()).await;
                Err(e)
            }
        }
    }

    /// Sleep through the store (settle + suspending), then the backend, then `sleeping`.
    pub(crate) async fn sleep(
        &self,
        p: Option<&Principal>,
        rec: &CapsuleRecord,
        reason: &str,
    ) -> Result<CapsuleRecord> {
        let t = self
            .store
            .end_run(
                &rec.id,
                EndKind::Sleep,
                reason,
                self.now(),
                &self.rates,
                p.map(|p| p.token.clone()),
            )
            .await?;
        let rec = t.record;
        if !t.began {
            // Already asleep, or a sleep is in progress elsewhere: wait for it.
            return self.wait_for(&rec, CapsuleState::Sleeping).await;
        }
        self.finish_sleep(&rec, reason).await
    }

    /// Waits (bounded) until the capsule reaches `target`; a different settled state is an error
    /// naming it.
    async fn wait_for(&self, rec: &CapsuleRecord, target: CapsuleState) -> Result<CapsuleRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut rec = rec.clone();
        loop {
            if rec.state == target {
                return Ok(rec);
            }
            let moving = matches!(
                rec.state,
                CapsuleState::Creating | CapsuleState::Waking | CapsuleState::Suspending
            );
            if !moving {
                return Err(Error::conflict(format!(
                    "capsule {} is {}, not {target}",
                    rec.name, rec.state
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::unavailable(format!(
                    "capsule {} is still {}; retry shortly",
                    rec.name, rec.state
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            rec = self
                .store
                .capsule(&rec.id)
                .await?
                .ok_or_else(|| Error::not_found("the capsule is gone"))?;
        }
    }

    async fn finish_sleep(&self, rec: &CapsuleRecord, reason: &str) -> Result<CapsuleRecord> {
        match self.backend.sleep(&rec.id).await {
            Ok(()) => {
                self.store
                    .finish_transition(
                        &rec.id,
                        CapsuleState::Suspending,
                        CapsuleState::Sleeping,
                        reason,
                        self.now(),
                    )
                    .await
            }
            Err(e) => {
                let _ = self
                    .store
                    .finish_transition(
                        &rec.id,
                        CapsuleState::Suspending,
                        CapsuleState::Failed,
                        "sleep_failed",
                        self.now(),
                    )
                    .await;
                Err(e)
            }
        }
    }

    pub(crate) async fn terminate(&self, p: Option<&Principal>, rec: &CapsuleRecord) -> Result<CapsuleRecord> {
        if rec.state == CapsuleState::Terminated {
            return Ok(rec.clone());
        }
        let rec = self
            .store
            .end_run(
                &rec.id,
                EndKind::Terminate,
                "requested",
                self.now(),
                &self.rates,
                p.map(|p| p.token.clone()),
            )
            .await?;
        let rec = rec.record;
        if rec.state != CapsuleState::Terminating {
            return Ok(rec);
        }
        // Also when another call began it (began = false): terminate is idempotent end to end.
        self.backend.terminate(&rec.id).await?;
        self.activity.forget(&rec.id);
        match self
            .store
            .finish_transition(
                &rec.id,
                CapsuleState::Terminating,
                CapsuleState::Terminated,
                "terminated",
                self.now(),
            )
            .await
        {
            Ok(r) => Ok(r),
            // A concurrent terminate finished first: terminate is idempotent.
            Err(e) if e.kind() == ErrorKind::Conflict => self
                .store
                .capsule(&rec.id)
                .await?
                .ok_or_else(|| Error::not_found("the capsule is gone")),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn spec(rec: &CapsuleRecord) -> CapsuleSpec {
        CapsuleSpec {
            id: rec.id.clone(),
            name: rec.name.clone(),
            team: rec.team.clone(),
            size: rec.size,
            image: rec.image,
            disk_gib: rec.disk_gib,
            network: rec.network.clone(),
        }
    }

    async fn is_active(&self, rec: &CapsuleRecord) -> bool {
        if self.activity.busy(&rec.id) {
            return true;
        }
        match self.backend.processes(&rec.id).await {
            Ok(ps) => ps.iter().any(|p| p.running),
            Err(_) => false,
        }
    }

    async fn tick(&self) -> TickReport {
        let mut report = TickReport::default();
        let now = self.now();
        let live = match self.store.live_capsules().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "tick could not list capsules");
                return report;
            }
        };
        for rec in live {
            let res = async {
                let idle_deadline = match rec.state {
                    CapsuleState::Running => {
                        if self.is_active(&rec).await {
                            self.activity.touch(&rec.id, now);
                        }
                        let since = self
                            .activity
                            .last(&rec.id)
                            .into_iter()
                            .chain(rec.meter.run_started_ms)
                            .max()
                            .unwrap_or(now);
                        Some(since + rec.limits.idle_timeout_ms)
                    }
                    CapsuleState::Sleeping | CapsuleState::Failed => None,
                    // In flight: the operation that moves it owns it now.
                    _ => return Ok::<_, Error>(None),
                };
                let m = self.store.meter(&rec.id, now, &self.rates, idle_deadline, true).await?;
                report.metered += 1;
                report.charged = report.charged.checked_add(m.charged)?;
                if let Some(why) = m.stopped {
                    self.finish_sleep(&m.record, why.as_str()).await?;
                    return Ok(Some(why));
                }
                Ok(None)
            }
            .instrument(tracing::info_span!("capsules.tick.capsule", capsule = %rec.id, team = %rec.team))
            .await;
            match res {
                Ok(Some(why)) => report.slept.push((rec.id.clone(), why)),
                Ok(None) => {}
                Err(e) => report.errors.push((rec.id.clone(), e.to_string())),
            }
        }
        report
    }

    async fn reconcile(&self) -> Result<Vec<CapsuleRecord>> {
        let seen: std::collections::HashMap<CapsuleId, BackendState> = self
            .backend
            .list()
            .await?
            .into_iter()
            .map(|c| (c.id, c.state))
            .collect();
        let mut changed = Vec::new();
        for rec in self.store.live_capsules().await? {
            let observed = match seen.get(&rec.id) {
                Some(BackendState::Running) => Observed::Running,
                Some(BackendState::Sleeping) => Observed::Sleeping,
                Some(BackendState::Failed { reason }) => Observed::Failed(reason.clone()),
                Some(BackendState::Gone) | None => Observed::Gone,
            };
            let same = matches!(
                (rec.state, &observed),
                (CapsuleState::Sleeping, Observed::Sleeping) | (CapsuleState::Failed, Observed::Failed(_))
            );
            if same {
                continue;
            }
            // A create or wake the host died in the middle of never started: refund it like a
            // failed one (a create whose VM is gone ends terminated, a wake whose snapshot is
            // intact goes back to sleep), instead of charging minutes that did not run.
            let interrupted = match (rec.state, &observed) {
                (CapsuleState::Creating, Observed::Failed(_) | Observed::Gone) => {
                    Some((CapsuleState::Terminated, "create_interrupted"))
                }
                (CapsuleState::Waking, Observed::Sleeping) => Some((CapsuleState::Sleeping, "wake_interrupted")),
                _ => None,
            };
            if let Some((to, reason)) = interrupted {
                if to == CapsuleState::Terminated
                    && let Err(e) = self.backend.terminate(&rec.id).await
                {
                    tracing::warn!(capsule = %rec.id, error = %e, "could not clean up an interrupted create");
                }
                changed.push(self.store.abort_start(&rec.id, to, reason, self.now()).await?);
                continue;
            }
            let m = self.store.reconcile(&rec.id, observed, self.now(), &self.rates).await?;
            let r = if m.stopped.is_some() {
                let why = m.record.state_reason.clone();
                self.finish_sleep(&m.record, &why).await?
            } else {
                m.record
            };
            changed.push(r);
        }
        Ok(changed)
    }
}

/// Runs `fut` in a span named `op` with empty capsule/team/token fields (filled in as they are
/// known; never a secret).
pub(crate) async fn traced<T>(op: &'static str, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let span = tracing::info_span!(
        "capsules",
        op,
        capsule = tracing::field::Empty,
        team = tracing::field::Empty,
        token = tracing::field::Empty
    );
    async move {
        let r = fut.await;
        if let Err(e) = &r {
            tracing::debug!(kind = %e.kind(), error = %e, "refused");
        }
        r
    }
    .instrument(span)
    .await
}
