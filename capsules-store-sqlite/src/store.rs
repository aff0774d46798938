//! The store traits over [`Tx`]: each method is one transaction; the capsule steps are
//! [`capsules_core::store::steps`], the same code the memory store runs.

use async_trait::async_trait;
use capsules_core::events::{Event, EventKind, NewEvent};
use capsules_core::ledger::{LedgerEntry, NewEntry};
use capsules_core::records::{CapsulePatch, CapsuleRecord, NewCapsule, TeamRecord};
use capsules_core::state::CapsuleState;
use capsules_core::store::steps::{self, StepTx};
use capsules_core::store::{
    CapsuleStore, EndKind, EventLog, Ledger, MeterReport, Observed, StartKind, TokenStore, Transition,
};
use capsules_core::tokens::TokenRecord;
use capsules_core::types::{
    CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, Size, TeamCaps, TeamId, TeamName, TokenId,
};
use capsules_core::{Error, Result};

use crate::SqliteStore;
use crate::db::Tx;

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert_token(&self, token: TokenRecord, event: NewEvent) -> Result<()> {
        self.tx(move |t| {
            t.insert_token(&token)?;
            t.push_event(event)?;
            Ok(())
        })
        .await
    }

    async fn token_chain(&self, id: &TokenId) -> Result<Vec<TokenRecord>> {
        let id = id.clone();
        self.tx(move |t| {
            let mut out = Vec::new();
            let mut cur = Some(id);
            while let Some(c) = cur {
                match t.token(&c)? {
                    Some(tok) => {
                        cur = tok.parent.clone();
                        out.push(tok);
                    }
                    None => break,
                }
                if out.len() > 1000 {
                    return Err(Error::internal("a token's ancestry is too deep"));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_tokens(&self, team: &TeamId) -> Result<Vec<TokenRecord>> {
        let team = team.clone();
        self.tx(move |t| t.team_tokens(&team)).await
    }

    async fn revoke_token(&self, id: &TokenId, at_ms: i64, token: Option<TokenId>) -> Result<Vec<TokenId>> {
        let id = id.clone();
        self.tx(move |t| {
            let team = t
                .token(&id)?
                .ok_or_else(|| Error::not_found(format!("token {id} does not exist")))?
                .team;
            let mut stack = vec![id];
            let mut revoked = Vec::new();
            while let Some(cur) = stack.pop() {
                stack.extend(t.children(&cur)?);
                let mut rec = t
                    .token(&cur)?
                    .ok_or_else(|| Error::internal("a child token is not stored"))?;
                if rec.revoked_at_ms.is_none() {
                    rec.revoked_at_ms = Some(at_ms);
                    t.update_token(&rec)?;
                    revoked.push(cur);
                }
            }
            if !revoked.is_empty() {
                let mut ev =
                    NewEvent::new(at_ms, EventKind::TokensRevoked { ids: revoked.clone() }).token(token.as_ref());
                ev.team = team;
                t.push_event(ev)?;
            }
            Ok(revoked)
        })
        .await
    }
}

#[async_trait]
impl Ledger for SqliteStore {
    async fn bootstrap(
        &self,
        operator: TokenRecord,
        team: TeamRecord,
        owner: TokenRecord,
        grant: NewEntry,
    ) -> Result<()> {
        self.tx(move |t| {
            if t.any_token_or_team()? {
                return Err(Error::conflict(
                    "the store is not empty; bootstrap runs only once, on an empty store",
                ));
            }
            t.insert_token(&operator)?;
            t.insert_team(team, owner, grant)
        })
        .await
    }

    async fn create_team(&self, team: TeamRecord, owner: TokenRecord, grant: NewEntry) -> Result<()> {
        self.tx(move |t| t.insert_team(team, owner, grant)).await
    }

    async fn team(&self, id: &TeamId) -> Result<Option<TeamRecord>> {
        let id = id.clone();
        self.tx(move |t| t.team(&id)).await
    }

    async fn team_by_name(&self, name: &TeamName) -> Result<Option<TeamRecord>> {
        let name = name.clone();
        self.tx(move |t| t.team_by_name(name.as_str())).await
    }

    async fn list_teams(&self) -> Result<Vec<TeamRecord>> {
        self.tx(move |t| {
            let mut v = t.all_teams()?;
            v.sort_by_key(|t| (t.created_at_ms, t.name.clone()));
            Ok(v)
        })
        .await
    }

    async fn set_team_caps(&self, id: &TeamId, caps: TeamCaps, event: NewEvent) -> Result<TeamRecord> {
        let id = id.clone();
        self.tx(move |t| {
            let mut team = t
                .team(&id)?
                .ok_or_else(|| Error::not_found(format!("team {id} does not exist")))?;
            team.caps = caps;
            t.put_team(&team, false)?;
            t.push_event(event)?;
            Ok(team)
        })
        .await
    }

    async fn append_entry(&self, entry: NewEntry, event: Option<NewEvent>) -> Result<LedgerEntry> {
        self.tx(move |t| {
            if t.team(&entry.team)?.is_none() {
                return Err(Error::not_found(format!("team {} does not exist", entry.team)));
            }
            let e = t.push_entry(entry)?;
            if let Some(ev) = event {
                t.push_event(ev)?;
            }
            Ok(e)
        })
        .await
    }

    async fn balance(&self, team: &TeamId) -> Result<MicroCredits> {
        let team = team.clone();
        self.tx(move |t| t.balance(&team)).await
    }

    async fn entries(&self, team: &TeamId) -> Result<Vec<LedgerEntry>> {
        let team = team.clone();
        self.tx(move |t| t.team_entries(&team)).await
    }

    async fn capsule_entries(&self, capsule: &CapsuleId) -> Result<Vec<LedgerEntry>> {
        let capsule = capsule.clone();
        self.tx(move |t| t.capsule_entries(&capsule)).await
    }
}

/// The steps' view of one transaction.
impl StepTx for &Tx<'_> {
    fn get(&mut self, id: &CapsuleId) -> Result<CapsuleRecord> {
        Tx::get(self, id)
    }

    fn put(&mut self, rec: &CapsuleRecord) -> Result<()> {
        Tx::put(self, rec)
    }

    fn id_taken(&mut self, id: &CapsuleId) -> Result<bool> {
        Ok(self.find(id)?.is_some())
    }

    fn name_taken(&mut self, team: &TeamId, name: &CapsuleName) -> Result<bool> {
        Ok(self.live_by_name(team, name.as_str())?.is_some())
    }

    fn reserve(&mut self, rec: &CapsuleRecord) -> Result<()> {
        // The row first: the name is reserved by the partial unique index from here on.
        Tx::put(self, rec)
    }

    fn release(&mut self, _rec: &CapsuleRecord) -> Result<()> {
        // The name and the host label are freed by the row's state (`terminated`): the partial
        // unique indexes cover live capsules only; `put` stamps the termination order.
        Ok(())
    }

    fn label_owner(&mut self, label: &str) -> Result<Option<CapsuleId>> {
        Ok(Tx::label_owner(self, label)?.map(|c| c.id))
    }

    fn claim_label(&mut self, _label: &str, _id: &CapsuleId) -> Result<()> {
        // The label is a column of the row `put` writes.
        Ok(())
    }

    fn balance(&mut self, team: &TeamId) -> Result<MicroCredits> {
        Tx::balance(self, team)
    }

    fn check_caps(
        &mut self,
        team: &TeamId,
        size: Size,
        new_disk: Option<u32>,
        except: Option<&CapsuleId>,
    ) -> Result<()> {
        Tx::check_caps(self, team, size, new_disk, except)
    }

    fn push_entry(&mut self, e: NewEntry) -> Result<LedgerEntry> {
        Tx::push_entry(self, e)
    }

    fn push_event(&mut self, e: NewEvent) -> Result<Event> {
        Tx::push_event(self, e)
    }

    fn capsule_entries(&mut self, id: &CapsuleId) -> Result<Vec<LedgerEntry>> {
        Tx::capsule_entries(self, id)
    }
}

/// Every capsule step is one transaction running [`steps`].
#[async_trait]
impl CapsuleStore for SqliteStore {
    async fn create_capsule(&self, new: NewCapsule, rates: &RateCard, token: Option<TokenId>) -> Result<CapsuleRecord> {
        let rates = *rates;
        self.tx(move |mut t| steps::create_capsule(&mut t, new, &rates, token.as_ref()))
            .await
    }

    async fn capsule(&self, id: &CapsuleId) -> Result<Option<CapsuleRecord>> {
        let id = id.clone();
        self.tx(move |t| t.find(&id)).await
    }

    async fn capsule_by_name(
        &self,
        team: &TeamId,
        name: &CapsuleName,
        fallback: bool,
    ) -> Result<Option<CapsuleRecord>> {
        let (team, name) = (team.clone(), name.clone());
        self.tx(move |t| match t.live_by_name(&team, name.as_str())? {
            Some(r) => Ok(Some(r)),
            None if fallback => t.dead_by_name(&team, name.as_str()),
            None => Ok(None),
        })
        .await
    }

    async fn list_capsules(&self, team: &TeamId, include_terminated: bool) -> Result<Vec<CapsuleRecord>> {
        let team = team.clone();
        self.tx(move |t| t.team_capsules(&team, include_terminated)).await
    }

    async fn live_capsules(&self) -> Result<Vec<CapsuleRecord>> {
        self.tx(move |t| t.live_capsules()).await
    }

    async fn capsule_by_host_label(&self, label: &str) -> Result<Option<CapsuleRecord>> {
        let label = label.to_owned();
        self.tx(move |t| Ok(t.label_owner(&label)?.filter(|c| c.url.is_some())))
            .await
    }

    async fn begin_start(
        &self,
        id: &CapsuleId,
        kind: StartKind,
        now_ms: i64,
        rates: &RateCard,
        token: Option<TokenId>,
    ) -> Result<Transition> {
        let (id, rates) = (id.clone(), *rates);
        // The outer result rolls back; the inner one is the answer (a refused start commits its
        // `limit_reached` event).
        self.tx(move |mut t| steps::begin_start(&mut t, &id, kind, now_ms, &rates, token.as_ref()))
            .await?
    }

    async fn end_run(
        &self,
        id: &CapsuleId,
        kind: EndKind,
        reason: &str,
        now_ms: i64,
        rates: &RateCard,
        token: Option<TokenId>,
    ) -> Result<Transition> {
        let (id, rates, reason) = (id.clone(), *rates, reason.to_owned());
        self.tx(move |mut t| steps::end_run(&mut t, &id, kind, &reason, now_ms, &rates, token.as_ref()))
            .await
    }

    async fn meter(
        &self,
        id: &CapsuleId,
        now_ms: i64,
        rates: &RateCard,
        idle_deadline_ms: Option<i64>,
        enforce: bool,
    ) -> Result<MeterReport> {
        let (id, rates) = (id.clone(), *rates);
        self.tx(move |mut t| steps::meter(&mut t, &id, now_ms, &rates, idle_deadline_ms, enforce))
            .await
    }

    async fn finish_transition(
        &self,
        id: &CapsuleId,
        from: CapsuleState,
        to: CapsuleState,
        reason: &str,
        now_ms: i64,
    ) -> Result<CapsuleRecord> {
        let (id, reason) = (id.clone(), reason.to_owned());
        self.tx(move |mut t| steps::finish_transition(&mut t, &id, from, to, &reason, now_ms))
            .await
    }

    async fn abort_start(&self, id: &CapsuleId, to: CapsuleState, reason: &str, now_ms: i64) -> Result<CapsuleRecord> {
        let (id, reason) = (id.clone(), reason.to_owned());
        self.tx(move |mut t| steps::abort_start(&mut t, &id, to, &reason, now_ms))
            .await
    }

    async fn update_capsule(&self, id: &CapsuleId, patch: CapsulePatch, event: NewEvent) -> Result<CapsuleRecord> {
        let id = id.clone();
        self.tx(move |mut t| steps::update_capsule(&mut t, &id, patch, event))
            .await
    }

    async fn set_url(&self, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord> {
        let id = id.clone();
        self.tx(move |mut t| steps::set_url(&mut t, &id, url, event)).await
    }

    async fn record_traffic(&self, id: &CapsuleId, bytes: u64, now_ms: i64, rates: &RateCard) -> Result<CapsuleRecord> {
        let (id, rates) = (id.clone(), *rates);
        self.tx(move |mut t| steps::record_traffic(&mut t, &id, bytes, now_ms, &rates))
            .await
    }

    async fn reconcile(
        &self,
        id: &CapsuleId,
        observed: Observed,
        now_ms: i64,
        rates: &RateCard,
    ) -> Result<MeterReport> {
        let (id, rates) = (id.clone(), *rates);
        self.tx(move |mut t| steps::reconcile(&mut t, &id, observed, now_ms, &rates))
            .await
    }
}

#[async_trait]
impl EventLog for SqliteStore {
    async fn append_event(&self, event: NewEvent) -> Result<Event> {
        self.tx(move |t| t.push_event(event)).await
    }

    async fn capsule_events(&self, capsule: &CapsuleId) -> Result<Vec<Event>> {
        let capsule = capsule.clone();
        self.tx(move |t| t.events_where("capsule", capsule.as_str())).await
    }

    async fn team_events(&self, team: &TeamId) -> Result<Vec<Event>> {
        let team = team.clone();
        self.tx(move |t| t.events_where("team", team.as_str())).await
    }
}
