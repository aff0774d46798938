//! The store: tokens, teams and ledger, capsule records, events — as traits one value implements.
//!
//! Every method is one atomic step: in memory, one lock; in SQL, one transaction. Core never
//! stitches an atomic step together from several calls. The metering and start checks are the
//! pure functions of [`crate::ledger`], which every implementation runs inside its transaction on
//! the rows it read, so all stores charge alike.
//!
//! The steps that span concerns:
//! - [`CapsuleStore::create_capsule`]: name reservation + team caps + balance + first charge + event.
//! - [`CapsuleStore::begin_start`]: (wake, restart) state check + team caps + limits + charge + state change.
//! - [`CapsuleStore::meter`]: a metering tick for one capsule: charge, or stop the run (→ `suspending`).
//! - [`CapsuleStore::end_run`]: (sleep, terminate) settle the run's charges + state change.

mod memory;
pub mod steps;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

pub use memory::MemoryStore;

use crate::error::Result;
use crate::events::{Event, NewEvent};
use crate::ledger::{LedgerEntry, NewEntry, StopReason};
use crate::records::{CapsulePatch, CapsuleRecord, NewCapsule, TeamRecord};
use crate::state::CapsuleState;
use crate::tokens::TokenRecord;
use crate::types::{CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, TeamCaps, TeamId, TeamName, TokenId};

/// Tokens: mint, look up by id, revoke.
#[async_trait]
pub trait TokenStore: Send + Sync + Debug + 'static {
    /// Stores a new token and its `token_minted` event. `AlreadyExists` on a duplicate id.
    async fn insert_token(&self, token: TokenRecord, event: NewEvent) -> Result<()>;
    /// The token and all its ancestors, itself first; empty if unknown.
    async fn token_chain(&self, id: &TokenId) -> Result<Vec<TokenRecord>>;
    /// Every token of a team (revoked ones included).
    async fn list_tokens(&self, team: &TeamId) -> Result<Vec<TokenRecord>>;
    /// Revokes the token and every descendant at once; returns the ids newly revoked (empty if all
    /// were revoked already). `NotFound` if unknown.
    async fn revoke_token(&self, id: &TokenId, at_ms: i64, token: Option<TokenId>) -> Result<Vec<TokenId>>;
}

/// Teams, balances and the append-only ledger.
#[async_trait]
pub trait Ledger: Send + Sync + Debug + 'static {
    /// On an empty store only (no tokens, no teams): the operator token, the first team, its owner
    /// token and the onboarding grant, together. `Conflict` otherwise.
    async fn bootstrap(
        &self,
        operator: TokenRecord,
        team: TeamRecord,
        owner: TokenRecord,
        grant: NewEntry,
    ) -> Result<()>;
    /// A new team with its owner token and the onboarding grant. `AlreadyExists` on a taken name.
    async fn create_team(&self, team: TeamRecord, owner: TokenRecord, grant: NewEntry) -> Result<()>;
    async fn team(&self, id: &TeamId) -> Result<Option<TeamRecord>>;
    async fn team_by_name(&self, name: &TeamName) -> Result<Option<TeamRecord>>;
    async fn list_teams(&self) -> Result<Vec<TeamRecord>>;
    /// `NotFound` if the team does not exist.
    async fn set_team_caps(&self, id: &TeamId, caps: TeamCaps, event: NewEvent) -> Result<TeamRecord>;
    /// Appends an entry (a grant) with its event, if any. `NotFound` for an unknown team.
    async fn append_entry(&self, entry: NewEntry, event: Option<NewEvent>) -> Result<LedgerEntry>;
    /// Sum of the team's entries.
    async fn balance(&self, team: &TeamId) -> Result<MicroCredits>;
    /// The team's entries in order.
    async fn entries(&self, team: &TeamId) -> Result<Vec<LedgerEntry>>;
    /// One capsule's entries in order.
    async fn capsule_entries(&self, capsule: &CapsuleId) -> Result<Vec<LedgerEntry>>;
}

/// How a run is started on an existing capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// From `sleeping` (or `suspending` once it is asleep): restore.
    Wake,
    /// From `sleeping`, `failed` or `running`: boot cold from the disk.
    Restart,
}

/// Why a run ends on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// → `suspending` (the caller then sleeps the VM and calls `finish_transition` to `sleeping`).
    Sleep,
    /// → `terminating` (then `terminated`); final charges.
    Terminate,
}

/// The result of a transition step: the record after it, and whether this call began it (false:
/// the capsule was already there or on its way, nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub record: CapsuleRecord,
    pub began: bool,
}

/// The result of one metering step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterReport {
    pub record: CapsuleRecord,
    pub charged: MicroCredits,
    /// The run stopped: the record is now `suspending`; the caller sleeps the VM.
    pub stopped: Option<StopReason>,
}

/// What reconciliation learned from the backend about one capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The VM runs: adopt it (charge the minutes it ran unmetered; stop it if that passes a limit).
    Running,
    Sleeping,
    Failed(String),
    /// The backend has nothing of it.
    Gone,
}

/// Capsule records and the steps that change them with the ledger.
#[async_trait]
pub trait CapsuleStore: Send + Sync + Debug + 'static {
    /// Atomically: the name is free among the team's live capsules (`AlreadyExists`), the team caps
    /// hold counting this one (`LimitExceeded` naming the cap), the first minute and storage hour
    /// fit the credit limit (`LimitExceeded`) and the balance (`InsufficientCredits`); then the
    /// record (`creating`, run started at `now`), the first charges and the `created` event.
    async fn create_capsule(&self, new: NewCapsule, rates: &RateCard, token: Option<TokenId>) -> Result<CapsuleRecord>;
    async fn capsule(&self, id: &CapsuleId) -> Result<Option<CapsuleRecord>>;
    /// The live capsule of that name; with `fallback`, else the most recently terminated one.
    async fn capsule_by_name(&self, team: &TeamId, name: &CapsuleName, fallback: bool)
    -> Result<Option<CapsuleRecord>>;
    async fn list_capsules(&self, team: &TeamId, include_terminated: bool) -> Result<Vec<CapsuleRecord>>;
    /// Every capsule not terminated, of every team (for ticks and reconciliation).
    async fn live_capsules(&self) -> Result<Vec<CapsuleRecord>>;
    async fn capsule_by_host_label(&self, label: &str) -> Result<Option<CapsuleRecord>>;

    /// Atomically: the state allows the start (`Conflict`/`Unavailable` per the state table),
    /// team caps counting this one, runtime and credit limits (`LimitExceeded` naming the limit),
    /// balance (`InsufficientCredits`); then → `waking`, a new run at `now` and its first charges.
    /// `began` is false when the table says noop (already running or waking): nothing changed.
    /// A restart of a running capsule begins without a state change (the run goes on).
    async fn begin_start(
        &self,
        id: &CapsuleId,
        kind: StartKind,
        now_ms: i64,
        rates: &RateCard,
        token: Option<TokenId>,
    ) -> Result<Transition>;
    /// Atomically: settle the run (minutes started before `now`, storage, and for terminate the
    /// last partial MiB) and move to `suspending` or `terminating` with `reason`. `began` is false
    /// when the table says noop (already asleep or suspending; already terminating or terminated).
    async fn end_run(
        &self,
        id: &CapsuleId,
        kind: EndKind,
        reason: &str,
        now_ms: i64,
        rates: &RateCard,
        token: Option<TokenId>,
    ) -> Result<Transition>;
    /// Atomically: one metering tick ([`crate::ledger::meter_run`] against the team balance and
    /// `idle_deadline_ms`); charges and their events, or the stop (→ `suspending`, a
    /// `limit_reached` event). `enforce = false` adopts downtime (charges all due minutes first).
    async fn meter(
        &self,
        id: &CapsuleId,
        now_ms: i64,
        rates: &RateCard,
        idle_deadline_ms: Option<i64>,
        enforce: bool,
    ) -> Result<MeterReport>;
    /// Compare-and-set of the state (`Conflict` if it is not `from`), with a `state_changed`
    /// event and a zero-cost lifecycle entry. `to = terminated` frees the name.
    async fn finish_transition(
        &self,
        id: &CapsuleId,
        from: CapsuleState,
        to: CapsuleState,
        reason: &str,
        now_ms: i64,
    ) -> Result<CapsuleRecord>;
    /// A start that never happened (backend create or wake failed): refund the run's charges and
    /// move to `to` (`terminated` for a failed create, `sleeping` or `failed` for a wake).
    async fn abort_start(&self, id: &CapsuleId, to: CapsuleState, reason: &str, now_ms: i64) -> Result<CapsuleRecord>;
    /// Changes limits (with a `limits_changed` event).
    async fn update_capsule(&self, id: &CapsuleId, patch: CapsulePatch, event: NewEvent) -> Result<CapsuleRecord>;
    /// Sets or clears the public URL. A new label must be unique across all capsules
    /// (`AlreadyExists` if taken: the caller draws another). An existing label is kept.
    async fn set_url(&self, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord>;
    /// Adds preview traffic bytes and charges the MiB they complete.
    async fn record_traffic(&self, id: &CapsuleId, bytes: u64, now_ms: i64, rates: &RateCard) -> Result<CapsuleRecord>;
    /// Reconciliation: sets the record from what the backend reports, charging adopted downtime.
    async fn reconcile(&self, id: &CapsuleId, observed: Observed, now_ms: i64, rates: &RateCard)
    -> Result<MeterReport>;
}

/// The audit trail.
#[async_trait]
pub trait EventLog: Send + Sync + Debug + 'static {
    async fn append_event(&self, event: NewEvent) -> Result<Event>;
    async fn capsule_events(&self, capsule: &CapsuleId) -> Result<Vec<Event>>;
    async fn team_events(&self, team: &TeamId) -> Result<Vec<Event>>;
}

/// Everything `Capsules` needs from its store; implemented by any type with all four.
pub trait Store: TokenStore + Ledger + CapsuleStore + EventLog {}
impl<T: TokenStore + Ledger + CapsuleStore + EventLog> Store for T {}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;
