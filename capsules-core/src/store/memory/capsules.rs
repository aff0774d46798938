//! The capsule records in memory: the read queries, and the steps of [`crate::store::steps`]
//! over the one lock.

use async_trait::async_trait;

use super::{Inner, MemoryStore, no_capsule};
use crate::error::Result;
use crate::events::{Event, NewEvent};
use crate::ledger::{LedgerEntry, NewEntry};
use crate::records::{CapsulePatch, CapsuleRecord, NewCapsule};
use crate::state::CapsuleState;
use crate::store::steps::{self, StepTx};
use crate::store::{CapsuleStore, EndKind, MeterReport, Observed, StartKind, Transition};
use crate::types::{CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, Size, TeamId, TokenId};

impl StepTx for Inner {
    fn get(&mut self, id: &CapsuleId) -> Result<CapsuleRecord> {
        self.capsules.get(id).cloned().ok_or_else(|| no_capsule(id))
    }

    fn put(&mut self, rec: &CapsuleRecord) -> Result<()> {
        match self.capsules.get_mut(&rec.id) {
            Some(r) => r.clone_from(rec),
            None => {
                self.capsules.insert(rec.id.clone(), rec.clone());
            }
        }
        Ok(())
    }

    fn id_taken(&mut self, id: &CapsuleId) -> Result<bool> {
        Ok(self.capsules.contains_key(id))
    }

    fn name_taken(&mut self, team: &TeamId, name: &CapsuleName) -> Result<bool> {
        Ok(self.live_names.contains_key(&(team.clone(), name.clone())))
    }

    fn reserve(&mut self, rec: &CapsuleRecord) -> Result<()> {
        self.live_names
            .insert((rec.team.clone(), rec.name.clone()), rec.id.clone());
        self.team_capsules
            .entry(rec.team.clone())
            .or_default()
            .push(rec.id.clone());
        self.put(rec)
    }

    fn release(&mut self, rec: &CapsuleRecord) -> Result<()> {
        let key = (rec.team.clone(), rec.name.clone());
        if self.live_names.get(&key) == Some(&rec.id) {
            self.live_names.remove(&key);
        }
        self.dead_names.insert(key, rec.id.clone());
        if let Some(l) = &rec.host_label {
            self.labels.remove(l);
        }
        Ok(())
    }

    fn label_owner(&mut self, label: &str) -> Result<Option<CapsuleId>> {
        Ok(self.labels.get(label).cloned())
    }

    fn claim_label(&mut self, label: &str, id: &CapsuleId) -> Result<()> {
        self.labels.insert(label.to_owned(), id.clone());
        Ok(())
    }

    fn balance(&mut self, team: &TeamId) -> Result<MicroCredits> {
        Ok(Inner::balance(self, team))
    }

    fn check_caps(
        &mut self,
        team: &TeamId,
        size: Size,
        new_disk: Option<u32>,
        except: Option<&CapsuleId>,
    ) -> Result<()> {
        Inner::check_caps(self, team, size, new_disk, except)
    }

    fn push_entry(&mut self, e: NewEntry) -> Result<LedgerEntry> {
        Inner::push_entry(self, e)
    }

    fn push_event(&mut self, e: NewEvent) -> Result<Event> {
        Ok(Inner::push_event(self, e))
    }

    fn capsule_entries(&mut self, id: &CapsuleId) -> Result<Vec<LedgerEntry>> {
        Ok(self
            .capsule_entries
            .get(id)
            .into_iter()
            .flatten()
            .map(|&i| self.entries[i].clone())
            .collect())
    }
}

#[async_trait]
impl CapsuleStore for MemoryStore {
    async fn create_capsule(&self, new: NewCapsule, rates: &RateCard, token: Option<TokenId>) -> Result<CapsuleRecord> {
        steps::create_capsule(&mut *self.lock(), new, rates, token.as_ref())
    }

    async fn capsule(&self, id: &CapsuleId) -> Result<Option<CapsuleRecord>> {
        Ok(self.lock().capsules.get(id).cloned())
    }

    async fn capsule_by_name(
        &self,
        team: &TeamId,
        name: &CapsuleName,
        fallback: bool,
    ) -> Result<Option<CapsuleRecord>> {
        let g = self.lock();
        let key = (team.clone(), name.clone());
        let id = g
            .live_names
            .get(&key)
            .or(if fallback { g.dead_names.get(&key) } else { None });
        Ok(id.map(|id| g.capsules[id].clone()))
    }

    async fn list_capsules(&self, team: &TeamId, include_terminated: bool) -> Result<Vec<CapsuleRecord>> {
        let g = self.lock();
        Ok(g.team_capsules
            .get(team)
            .into_iter()
            .flatten()
            .map(|id| &g.capsules[id])
            .filter(|c| include_terminated || c.state.is_live())
            .cloned()
            .collect())
    }

    async fn live_capsules(&self) -> Result<Vec<CapsuleRecord>> {
        let g = self.lock();
        let mut v: Vec<_> = g.capsules.values().filter(|c| c.state.is_live()).cloned().collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(v)
    }

    async fn capsule_by_host_label(&self, label: &str) -> Result<Option<CapsuleRecord>> {
        let g = self.lock();
        Ok(g.labels
            .get(label)
            .map(|id| g.capsules[id].clone())
            .filter(|c| c.url.is_some()))
    }

    async fn begin_start(
        &self,
        id: &CapsuleId,
        kind: StartKind,
        now_ms: i64,
        rates: &RateCard,
        token: Option<TokenId>,
    ) -> Result<Transition> {
        steps::begin_start(&mut *self.lock(), id, kind, now_ms, rates, token.as_ref())?
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
        steps::end_run(&mut *self.lock(), id, kind, reason, now_ms, rates, token.as_ref())
    }

    async fn meter(
        &self,
        id: &CapsuleId,
        now_ms: i64,
        rates: &RateCard,
        idle_deadline_ms: Option<i64>,
        enforce: bool,
    ) -> Result<MeterReport> {
        steps::meter(&mut *self.lock(), id, now_ms, rates, idle_deadline_ms, enforce)
    }

    async fn finish_transition(
        &self,
        id: &CapsuleId,
        from: CapsuleState,
        to: CapsuleState,
        reason: &str,
        now_ms: i64,
    ) -> Result<CapsuleRecord> {
        steps::finish_transition(&mut *self.lock(), id, from, to, reason, now_ms)
    }

    async fn abort_start(&self, id: &CapsuleId, to: CapsuleState, reason: &str, now_ms: i64) -> Result<CapsuleRecord> {
        steps::abort_start(&mut *self.lock(), id, to, reason, now_ms)
    }

    async fn update_capsule(&self, id: &CapsuleId, patch: CapsulePatch, event: NewEvent) -> Result<CapsuleRecord> {
        steps::update_capsule(&mut *self.lock(), id, patch, event)
    }

    async fn set_url(&self, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord> {
        steps::set_url(&mut *self.lock(), id, url, event)
    }

    async fn record_traffic(&self, id: &CapsuleId, bytes: u64, now_ms: i64, rates: &RateCard) -> Result<CapsuleRecord> {
        steps::record_traffic(&mut *self.lock(), id, bytes, now_ms, rates)
    }

    async fn reconcile(
        &self,
        id: &CapsuleId,
        observed: Observed,
        now_ms: i64,
        rates: &RateCard,
    ) -> Result<MeterReport> {
        steps::reconcile(&mut *self.lock(), id, observed, now_ms, rates)
    }
}
