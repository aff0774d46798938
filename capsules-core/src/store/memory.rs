//! The in-memory store: one lock around everything, so every method is atomic.

mod capsules;

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{EventLog, Ledger, TokenStore};
use crate::error::{Error, Result};
use crate::events::{Event, EventKind, NewEvent};
use crate::ledger::{LedgerEntry, NewEntry};
use crate::records::{CapsuleRecord, TeamRecord};
use crate::tokens::TokenRecord;
use crate::types::{CapsuleId, CapsuleName, MicroCredits, Size, TeamId, TeamName, TokenId};

/// Tokens, teams, ledger, capsules and events in memory. Cheap to create; `Default` is empty.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tokens: HashMap<TokenId, TokenRecord>,
    children: HashMap<TokenId, Vec<TokenId>>,
    team_tokens: HashMap<TeamId, Vec<TokenId>>,
    teams: HashMap<TeamId, TeamRecord>,
    team_names: HashMap<TeamName, TeamId>,
    entries: Vec<LedgerEntry>,
    balances: HashMap<TeamId, MicroCredits>,
    team_entries: HashMap<TeamId, Vec<usize>>,
    capsule_entries: HashMap<CapsuleId, Vec<usize>>,
    capsules: HashMap<CapsuleId, CapsuleRecord>,
    team_capsules: HashMap<TeamId, Vec<CapsuleId>>,
    live_names: HashMap<(TeamId, CapsuleName), CapsuleId>,
    /// The most recently terminated capsule of each name.
    dead_names: HashMap<(TeamId, CapsuleName), CapsuleId>,
    labels: HashMap<String, CapsuleId>,
    events: Vec<Event>,
    capsule_events: HashMap<CapsuleId, Vec<usize>>,
    team_events: HashMap<TeamId, Vec<usize>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every method checks before it
        // writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn no_capsule(id: &CapsuleId) -> Error {
    Error::not_found(format!("capsule {id} does not exist"))
}

impl Inner {
    fn push_entry(&mut self, e: NewEntry) -> Result<LedgerEntry> {
        // Hot path (every charge): no key clones once a team or capsule has entries.
        let bal = self.balances.get(&e.team).copied().unwrap_or_default();
        let new_bal = bal.checked_add(e.amount)?;
        let idx = self.entries.len();
        let seq = idx as u64 + 1;
        match self.team_entries.get_mut(&e.team) {
            Some(v) => v.push(idx),
            None => {
                self.team_entries.insert(e.team.clone(), vec![idx]);
            }
        }
        if let Some(c) = &e.capsule {
            match self.capsule_entries.get_mut(c) {
                Some(v) => v.push(idx),
                None => {
                    self.capsule_entries.insert(c.clone(), vec![idx]);
                }
            }
        }
        match self.balances.get_mut(&e.team) {
            Some(b) => *b = new_bal,
            None => {
                self.balances.insert(e.team.clone(), new_bal);
            }
        }
        let le = LedgerEntry { seq, entry: e };
        self.entries.push(le.clone());
        Ok(le)
    }

    fn push_event(&mut self, e: NewEvent) -> Event {
        let idx = self.events.len();
        if let Some(c) = &e.capsule {
            self.capsule_events.entry(c.clone()).or_default().push(idx);
        }
        if let Some(t) = &e.team {
            self.team_events.entry(t.clone()).or_default().push(idx);
        }
        let ev = Event {
            seq: idx as u64 + 1,
            event: e,
        };
        self.events.push(ev.clone());
        ev
    }

    fn balance(&self, team: &TeamId) -> MicroCredits {
        self.balances.get(team).copied().unwrap_or_default()
    }

    /// Team caps for one more running capsule of `size` (and, on create, `disk_gib` more disk).
    fn check_caps(&self, team: &TeamId, size: Size, new_disk: Option<u32>, except: Option<&CapsuleId>) -> Result<()> {
        let t = self
            .teams
            .get(team)
            .ok_or_else(|| Error::not_found(format!("team {team} does not exist")))?;
        let capsules = self
            .team_capsules
            .get(team)
            .into_iter()
            .flatten()
            .map(|id| &self.capsules[id]);
        crate::ledger::check_team_caps(t.caps, capsules, size, new_disk, except)
    }

    fn insert_token(&mut self, t: TokenRecord) -> Result<()> {
        if self.tokens.contains_key(&t.id) {
            return Err(Error::already_exists(format!("token {} exists", t.id)));
        }
        if let Some(p) = &t.parent {
            self.children.entry(p.clone()).or_default().push(t.id.clone());
        }
        if let Some(team) = &t.team {
            self.team_tokens.entry(team.clone()).or_default().push(t.id.clone());
        }
        self.tokens.insert(t.id.clone(), t);
        Ok(())
    }

    fn insert_team(&mut self, team: TeamRecord, owner: TokenRecord, grant: NewEntry) -> Result<()> {
        if self.team_names.contains_key(&team.name) {
            return Err(Error::already_exists(format!("team {} exists", team.name)));
        }
        if self.tokens.contains_key(&owner.id) {
            return Err(Error::already_exists(format!("token {} exists", owner.id)));
        }
        let at = team.created_at_ms;
        self.team_names.insert(team.name.clone(), team.id.clone());
        self.push_event(
            NewEvent::new(
                at,
                EventKind::TeamCreated {
                    name: team.name.to_string(),
                },
            )
            .team(&team.id),
        );
        self.teams.insert(team.id.clone(), team.clone());
        self.push_event(
            NewEvent::new(
                at,
                EventKind::TokenMinted {
                    id: owner.id.clone(),
                    scopes: owner.scopes.iter().map(|s| s.to_string()).collect(),
                },
            )
            .team(&team.id),
        );
        self.insert_token(owner)?;
        let amount = grant.amount;
        let reason = grant.reason.clone().unwrap_or_default();
        self.push_entry(grant)?;
        self.push_event(NewEvent::new(at, EventKind::Granted { amount, reason }).team(&team.id));
        Ok(())
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn insert_token(&self, token: TokenRecord, event: NewEvent) -> Result<()> {
        let mut g = self.lock();
        g.insert_token(token)?;
        g.push_event(event);
        Ok(())
    }

    async fn token_chain(&self, id: &TokenId) -> Result<Vec<TokenRecord>> {
        let g = self.lock();
        let mut out = Vec::new();
        let mut cur = Some(id.clone());
        while let Some(c) = cur {
            match g.tokens.get(&c) {
                Some(t) => {
                    cur = t.parent.clone();
                    out.push(t.clone());
                }
                None => break,
            }
            if out.len() > 1000 {
                return Err(Error::internal("a token's ancestry is too deep"));
            }
        }
        Ok(out)
    }

    async fn list_tokens(&self, team: &TeamId) -> Result<Vec<TokenRecord>> {
        let g = self.lock();
        Ok(g.team_tokens
            .get(team)
            .into_iter()
            .flatten()
            .map(|id| g.tokens[id].clone())
            .collect())
    }

    async fn revoke_token(&self, id: &TokenId, at_ms: i64, token: Option<TokenId>) -> Result<Vec<TokenId>> {
        let mut g = self.lock();
        let team = g
            .tokens
            .get(id)
            .ok_or_else(|| Error::not_found(format!("token {id} does not exist")))?
            .team
            .clone();
        let mut stack = vec![id.clone()];
        let mut revoked = Vec::new();
        while let Some(t) = stack.pop() {
            if let Some(kids) = g.children.get(&t) {
                stack.extend(kids.iter().cloned());
            }
            let rec = g.tokens.get_mut(&t).expect("children are stored tokens");
            if rec.revoked_at_ms.is_none() {
                rec.revoked_at_ms = Some(at_ms);
                revoked.push(t);
            }
        }
        if !revoked.is_empty() {
            let mut ev = NewEvent::new(at_ms, EventKind::TokensRevoked { ids: revoked.clone() }).token(token.as_ref());
            ev.team = team;
            g.push_event(ev);
        }
        Ok(revoked)
    }
}

#[async_trait]
impl Ledger for MemoryStore {
    async fn bootstrap(
        &self,
        operator: TokenRecord,
        team: TeamRecord,
        owner: TokenRecord,
        grant: NewEntry,
    ) -> Result<()> {
        let mut g = self.lock();
        if !g.tokens.is_empty() || !g.teams.is_empty() {
            return Err(Error::conflict(
                "the store is not empty; bootstrap runs only once, on an empty store",
            ));
        }
        g.insert_token(operator)?;
        g.insert_team(team, owner, grant)
    }

    async fn create_team(&self, team: TeamRecord, owner: TokenRecord, grant: NewEntry) -> Result<()> {
        self.lock().insert_team(team, owner, grant)
    }

    async fn team(&self, id: &TeamId) -> Result<Option<TeamRecord>> {
        Ok(self.lock().teams.get(id).cloned())
    }

    async fn team_by_name(&self, name: &TeamName) -> Result<Option<TeamRecord>> {
        let g = self.lock();
        Ok(g.team_names.get(name).map(|id| g.teams[id].clone()))
    }

    async fn list_teams(&self) -> Result<Vec<TeamRecord>> {
        let g = self.lock();
        let mut v: Vec<_> = g.teams.values().cloned().collect();
        v.sort_by_key(|t| (t.created_at_ms, t.name.clone()));
        Ok(v)
    }

    async fn set_team_caps(&self, id: &TeamId, caps: crate::types::TeamCaps, event: NewEvent) -> Result<TeamRecord> {
        let mut g = self.lock();
        let t = g
            .teams
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("team {id} does not exist")))?;
        t.caps = caps;
        let t = t.clone();
        g.push_event(event);
        Ok(t)
    }

    async fn append_entry(&self, entry: NewEntry, event: Option<NewEvent>) -> Result<LedgerEntry> {
        let mut g = self.lock();
        if !g.teams.contains_key(&entry.team) {
            return Err(Error::not_found(format!("team {} does not exist", entry.team)));
        }
        let e = g.push_entry(entry)?;
        if let Some(ev) = event {
            g.push_event(ev);
        }
        Ok(e)
    }

    async fn balance(&self, team: &TeamId) -> Result<MicroCredits> {
        Ok(self.lock().balance(team))
    }

    async fn entries(&self, team: &TeamId) -> Result<Vec<LedgerEntry>> {
        let g = self.lock();
        Ok(g.team_entries
            .get(team)
            .into_iter()
            .flatten()
            .map(|&i| g.entries[i].clone())
            .collect())
    }

    async fn capsule_entries(&self, capsule: &CapsuleId) -> Result<Vec<LedgerEntry>> {
        let g = self.lock();
        Ok(g.capsule_entries
            .get(capsule)
            .into_iter()
            .flatten()
            .map(|&i| g.entries[i].clone())
            .collect())
    }
}

#[async_trait]
impl EventLog for MemoryStore {
    async fn append_event(&self, event: NewEvent) -> Result<Event> {
        Ok(self.lock().push_event(event))
    }

    async fn capsule_events(&self, capsule: &CapsuleId) -> Result<Vec<Event>> {
        let g = self.lock();
        Ok(g.capsule_events
            .get(capsule)
            .into_iter()
            .flatten()
            .map(|&i| g.events[i].clone())
            .collect())
    }

    async fn team_events(&self, team: &TeamId) -> Result<Vec<Event>> {
        let g = self.lock();
        Ok(g.team_events
            .get(team)
            .into_iter()
            .flatten()
            .map(|&i| g.events[i].clone())
            .collect())
    }
}
