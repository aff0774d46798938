//! The store traits over [`Tx`]: each method is one transaction running the memory store's logic.

use async_trait::async_trait;
use capsules_core::events::{Event, EventKind, NewEvent};
use capsules_core::ledger::{self, EntryKind, LedgerEntry, NewEntry, StopReason};
use capsules_core::records::{CapsulePatch, CapsuleRecord, MeterState, NewCapsule, TeamRecord};
use capsules_core::state::{self, CapsuleState, Operation, Outcome};
use capsules_core::store::{
    CapsuleStore, EndKind, EventLog, Ledger, MeterReport, Observed, StartKind, TokenStore, Transition,
};
use capsules_core::tokens::TokenRecord;
use capsules_core::types::{
    CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, TeamCaps, TeamId, TeamName, TokenId,
};
use capsules_core::{Error, ErrorKind, Result};

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

fn free_name(rec: &mut CapsuleRecord, now_ms: i64) {
    // The name and the host label are freed by the row's state (`terminated`): the partial
    // unique indexes cover live capsules only; `put` stamps the termination order.
    rec.terminated_at_ms = Some(now_ms);
}

fn meter_tx(
    t: &Tx<'_>,
    rec: &mut CapsuleRecord,
    now_ms: i64,
    rates: &RateCard,
    idle_deadline_ms: Option<i64>,
    enforce: bool,
) -> Result<MeterReport> {
    if !rec.state.is_live() || rec.state == CapsuleState::Terminating {
        return Ok(MeterReport {
            record: rec.clone(),
            charged: MicroCredits::ZERO,
            stopped: None,
        });
    }
    let balance = t.balance(&rec.team)?;
    let running = rec.state == CapsuleState::Running;
    let idle = if running { idle_deadline_ms } else { None };
    let m = ledger::meter_run(rec, now_ms, rates, balance, idle, enforce)?;
    let charged = t.apply_charges(rec, &m.charges, None)?;
    let mut stopped = None;
    if let Some((at, why)) = m.stop {
        let from = rec.state;
        rec.state = CapsuleState::Suspending;
        rec.state_reason = why.as_str().to_owned();
        let detail = match why {
            StopReason::CreditLimit => format!(
                "credit limit {} reached (spent {})",
                rec.limits.credit_limit, rec.meter.spent
            ),
            StopReason::InsufficientCredits => {
                format!("team balance {} cannot pay the next minute", t.balance(&rec.team)?)
            }
            StopReason::RuntimeLimit => format!("max runtime of {} min reached", rec.limits.max_runtime_ms / 60_000),
            StopReason::Idle => format!("no activity for {} s", rec.limits.idle_timeout_ms / 1000),
        };
        t.push_event(
            NewEvent::new(
                at,
                EventKind::LimitReached {
                    limit: why.as_str().to_owned(),
                    detail,
                },
            )
            .team(&rec.team)
            .capsule(&rec.id),
        )?;
        t.state_event(rec, from, why.as_str(), at, None)?;
        stopped = Some(why);
    }
    t.put(rec)?;
    Ok(MeterReport {
        record: rec.clone(),
        charged,
        stopped,
    })
}

#[async_trait]
impl CapsuleStore for SqliteStore {
    async fn create_capsule(&self, new: NewCapsule, rates: &RateCard, token: Option<TokenId>) -> Result<CapsuleRecord> {
        let rates = *rates;
        self.tx(move |t| {
            if t.live_by_name(&new.team, new.name.as_str())?.is_some() {
                return Err(Error::already_exists(format!(
                    "a capsule named {} exists in this team",
                    new.name
                )));
            }
            if t.find(&new.id)?.is_some() {
                return Err(Error::already_exists(format!("capsule id {} exists", new.id)));
            }
            t.check_caps(&new.team, new.size, Some(new.disk_gib), None)?;
            let mut rec = CapsuleRecord {
                id: new.id,
                team: new.team,
                name: new.name,
                size: new.size,
                image: new.image,
                region: new.region,
                disk_gib: new.disk_gib,
                network: new.network,
                limits: new.limits,
                url: None,
                host_label: None,
                state: CapsuleState::Creating,
                state_reason: "requested".into(),
                created_by: new.created_by,
                created_at_ms: new.now_ms,
                terminated_at_ms: None,
                meter: MeterState::default(),
            };
            let balance = t.balance(&rec.team)?;
            ledger::check_start(&rec, new.now_ms, &rates, balance)?;
            let m = ledger::start_run(&mut rec, new.now_ms, &rates, balance)?;
            if m.stop.is_some() {
                return Err(Error::internal(
                    "the first minute was refused after the start check passed",
                ));
            }
            // The row first: the name is reserved by the partial unique index from here on.
            t.put(&rec)?;
            t.push_event(
                NewEvent::new(
                    new.now_ms,
                    EventKind::Created {
                        name: rec.name.to_string(),
                        size: rec.size.to_string(),
                        image: rec.image.to_string(),
                        disk_gib: rec.disk_gib,
                    },
                )
                .team(&rec.team)
                .capsule(&rec.id)
                .token(token.as_ref()),
            )?;
            t.push_entry(NewEntry::lifecycle(new.now_ms, &rec, "creating"))?;
            t.apply_charges(&rec, &m.charges, token.as_ref())?;
            t.put(&rec)?;
            Ok(rec)
        })
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
        // `limit_reached` event, as the memory store keeps it).
        self.tx(move |t| -> Result<Result<Transition>> {
            let mut rec = t.get(&id)?;
            let op = match kind {
                StartKind::Wake => Operation::Wake,
                StartKind::Restart => Operation::Restart,
            };
            let from = rec.state;
            match state::refusal(from, op, rec.name.as_str())? {
                Outcome::Start => {}
                Outcome::Noop => {
                    return Ok(Ok(Transition {
                        record: rec,
                        began: false,
                    }));
                }
                _ => {
                    return Err(Error::unavailable(format!(
                        "capsule {} is {from}; retry once it has settled",
                        rec.name
                    )));
                }
            }
            if from == CapsuleState::Running {
                return Ok(Ok(Transition {
                    record: rec,
                    began: true,
                }));
            }
            let balance = t.balance(&rec.team)?;
            let checks = t
                .check_caps(&rec.team, rec.size, None, Some(&rec.id))
                .and_then(|_| ledger::check_start(&rec, now_ms, &rates, balance));
            if let Err(e) = checks {
                if e.kind() == ErrorKind::Internal || e.kind() == ErrorKind::Unavailable {
                    return Err(e);
                }
                let limit = match e.kind() {
                    ErrorKind::InsufficientCredits => "insufficient_credits",
                    _ => "limit",
                };
                t.push_event(
                    NewEvent::new(
                        now_ms,
                        EventKind::LimitReached {
                            limit: limit.into(),
                            detail: e.message().to_owned(),
                        },
                    )
                    .team(&rec.team)
                    .capsule(&rec.id)
                    .token(token.as_ref()),
                )?;
                return Ok(Err(e));
            }
            let m = ledger::start_run(&mut rec, now_ms, &rates, balance)?;
            rec.state = CapsuleState::Waking;
            rec.state_reason = match kind {
                StartKind::Wake => "wake".into(),
                StartKind::Restart => "restart".into(),
            };
            t.state_event(&rec, from, &rec.state_reason.clone(), now_ms, token.as_ref())?;
            t.apply_charges(&rec, &m.charges, token.as_ref())?;
            t.put(&rec)?;
            Ok(Ok(Transition {
                record: rec,
                began: true,
            }))
        })
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
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            let from = rec.state;
            let (op, to) = match kind {
                EndKind::Sleep => (Operation::Sleep, CapsuleState::Suspending),
                EndKind::Terminate => (Operation::Terminate, CapsuleState::Terminating),
            };
            match state::refusal(from, op, rec.name.as_str())? {
                Outcome::Start => {}
                _ => {
                    return Ok(Transition {
                        record: rec,
                        began: false,
                    });
                }
            }
            let charges = match kind {
                EndKind::Sleep => ledger::settle_run(&mut rec, now_ms, &rates)?,
                EndKind::Terminate => ledger::settle_terminate(&mut rec, now_ms, &rates)?,
            };
            rec.state = to;
            rec.state_reason = reason.clone();
            t.apply_charges(&rec, &charges, token.as_ref())?;
            t.state_event(&rec, from, &reason, now_ms, token.as_ref())?;
            t.put(&rec)?;
            Ok(Transition {
                record: rec,
                began: true,
            })
        })
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
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            meter_tx(t, &mut rec, now_ms, &rates, idle_deadline_ms, enforce)
        })
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
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            if rec.state != from {
                return Err(Error::conflict(format!(
                    "capsule {} is {}, not {from}; it changed state meanwhile",
                    rec.name, rec.state
                )));
            }
            rec.state = to;
            rec.state_reason = reason.clone();
            if to == CapsuleState::Terminated {
                free_name(&mut rec, now_ms);
            }
            t.state_event(&rec, from, &reason, now_ms, None)?;
            t.put(&rec)?;
            Ok(rec)
        })
        .await
    }

    async fn abort_start(&self, id: &CapsuleId, to: CapsuleState, reason: &str, now_ms: i64) -> Result<CapsuleRecord> {
        let (id, reason) = (id.clone(), reason.to_owned());
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            let from = rec.state;
            let run_start = rec.meter.run_started_ms;
            let entries = t.capsule_entries(&id)?;
            let refund = MicroCredits::sum(
                entries
                    .iter()
                    .map(|e| &e.entry)
                    .filter(|e| {
                        e.amount.is_negative()
                            && (e.kind == EntryKind::Compute && run_start.is_some_and(|s| e.at_ms >= s)
                                || to == CapsuleState::Terminated)
                    })
                    .map(|e| e.amount.negate()),
            )?;
            rec.meter.run_started_ms = None;
            rec.meter.run_minutes_charged = 0;
            rec.meter.spent = rec.meter.spent.checked_sub(refund)?;
            if refund > MicroCredits::ZERO {
                t.push_entry(NewEntry {
                    at_ms: now_ms,
                    team: rec.team.clone(),
                    capsule: Some(rec.id.clone()),
                    kind: EntryKind::Refund,
                    quantity: 1,
                    amount: refund,
                    reason: Some(reason.clone()),
                })?;
            }
            rec.state = to;
            rec.state_reason = reason.clone();
            if to == CapsuleState::Terminated {
                free_name(&mut rec, now_ms);
            }
            t.state_event(&rec, from, &reason, now_ms, None)?;
            t.put(&rec)?;
            Ok(rec)
        })
        .await
    }

    async fn update_capsule(&self, id: &CapsuleId, patch: CapsulePatch, event: NewEvent) -> Result<CapsuleRecord> {
        let id = id.clone();
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            state::refusal(rec.state, Operation::Update, rec.name.as_str())?;
            if let Some(c) = patch.credit_limit {
                rec.limits.credit_limit = c;
            }
            if let Some(i) = patch.idle_timeout_ms {
                rec.limits.idle_timeout_ms = i;
            }
            if let Some(m) = patch.max_runtime_ms {
                rec.limits.max_runtime_ms = m;
            }
            if let Some(n) = patch.network {
                rec.network = n;
            }
            t.push_event(event)?;
            t.put(&rec)?;
            Ok(rec)
        })
        .await
    }

    async fn set_url(&self, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord> {
        let id = id.clone();
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            state::refusal(rec.state, Operation::Update, rec.name.as_str())?;
            if let Some(u) = &url {
                if let Some(owner) = t.label_owner(&u.host_label)?
                    && owner.id != id
                {
                    return Err(Error::already_exists(format!("host label {} is taken", u.host_label)));
                }
                rec.host_label = Some(u.host_label.clone());
            }
            rec.url = url;
            t.push_event(event)?;
            t.put(&rec)?;
            Ok(rec)
        })
        .await
    }

    async fn record_traffic(&self, id: &CapsuleId, bytes: u64, now_ms: i64, rates: &RateCard) -> Result<CapsuleRecord> {
        let (id, rates) = (id.clone(), *rates);
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            if let Some(c) = ledger::add_traffic(&mut rec, bytes, now_ms, &rates)? {
                t.apply_charges(&rec, &[c], None)?;
            }
            t.put(&rec)?;
            Ok(rec)
        })
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
        self.tx(move |t| {
            let mut rec = t.get(&id)?;
            let from = rec.state;
            let note = |rec: &CapsuleRecord, detail: String| -> Result<()> {
                t.push_event(
                    NewEvent::new(now_ms, EventKind::Reconciled { detail })
                        .team(&rec.team)
                        .capsule(&rec.id),
                )?;
                Ok(())
            };
            let set = |rec: &mut CapsuleRecord, to: CapsuleState, reason: &str| -> Result<()> {
                rec.state = to;
                rec.state_reason = reason.to_owned();
                t.state_event(rec, from, reason, now_ms, None)
            };
            if from == CapsuleState::Terminating {
                let charges = ledger::settle_terminate(&mut rec, now_ms, &rates)?;
                t.apply_charges(&rec, &charges, None)?;
                set(&mut rec, CapsuleState::Terminated, "reconciled")?;
                free_name(&mut rec, now_ms);
            } else {
                match observed {
                    Observed::Running => {
                        if !matches!(
                            from,
                            CapsuleState::Running | CapsuleState::Creating | CapsuleState::Waking
                        ) {
                            rec.meter.run_started_ms = Some(now_ms);
                            rec.meter.run_minutes_charged = 0;
                        }
                        if from != CapsuleState::Running {
                            set(&mut rec, CapsuleState::Running, "adopted")?;
                        }
                        note(
                            &rec,
                            "adopted a running capsule; charged the minutes it ran unmetered".into(),
                        )?;
                        return meter_tx(t, &mut rec, now_ms, &rates, None, false);
                    }
                    Observed::Sleeping => {
                        let charges = ledger::settle_run(&mut rec, now_ms, &rates)?;
                        t.apply_charges(&rec, &charges, None)?;
                        if from != CapsuleState::Sleeping {
                            set(&mut rec, CapsuleState::Sleeping, "reconciled")?;
                        }
                    }
                    obs => {
                        let why = match obs {
                            Observed::Failed(w) => w,
                            _ => "the backend no longer has this capsule's VM".into(),
                        };
                        let charges = ledger::settle_run(&mut rec, now_ms, &rates)?;
                        t.apply_charges(&rec, &charges, None)?;
                        if from != CapsuleState::Failed {
                            set(&mut rec, CapsuleState::Failed, "vm_lost")?;
                        }
                        note(&rec, why)?;
                    }
                }
            }
            t.put(&rec)?;
            Ok(MeterReport {
                record: rec,
                charged: MicroCredits::ZERO,
                stopped: None,
            })
        })
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
