//! The capsule records and the steps that change them with the ledger, in memory.

use async_trait::async_trait;

use super::{Inner, MemoryStore};
use crate::error::{Error, Result};
use crate::events::{EventKind, NewEvent};
use crate::ledger::{self, EntryKind, NewEntry, StopReason};
use crate::records::{CapsulePatch, CapsuleRecord, MeterState, NewCapsule};
use crate::state::{self, CapsuleState, Operation, Outcome};
use crate::store::{CapsuleStore, EndKind, MeterReport, Observed, StartKind, Transition};
use crate::types::{CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, TeamId, TokenId};

#[async_trait]
impl CapsuleStore for MemoryStore {
    async fn create_capsule(&self, new: NewCapsule, rates: &RateCard, token: Option<TokenId>) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let key = (new.team.clone(), new.name.clone());
        if g.live_names.contains_key(&key) {
            return Err(Error::already_exists(format!(
                "a capsule named {} exists in this team",
                new.name
            )));
        }
        if g.capsules.contains_key(&new.id) {
            return Err(Error::already_exists(format!("capsule id {} exists", new.id)));
        }
        g.check_caps(&new.team, new.size, Some(new.disk_gib), None)?;
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
        let balance = g.balance(&rec.team);
        ledger::check_start(&rec, new.now_ms, rates, balance)?;
        let m = ledger::start_run(&mut rec, new.now_ms, rates, balance)?;
        if m.stop.is_some() {
            return Err(Error::internal(
                "the first minute was refused after the start check passed",
            ));
        }
        g.live_names.insert(key, rec.id.clone());
        g.team_capsules
            .entry(rec.team.clone())
            .or_default()
            .push(rec.id.clone());
        g.push_event(
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
        );
        g.push_entry(NewEntry::lifecycle(new.now_ms, &rec, "creating"))?;
        g.apply_charges(&rec, &m.charges, token.as_ref())?;
        g.put(rec.clone());
        Ok(rec)
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
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        let op = match kind {
            StartKind::Wake => Operation::Wake,
            StartKind::Restart => Operation::Restart,
        };
        let from = rec.state;
        match state::refusal(from, op, rec.name.as_str())? {
            Outcome::Start => {}
            Outcome::Noop => {
                return Ok(Transition {
                    record: rec,
                    began: false,
                });
            }
            _ => {
                return Err(Error::unavailable(format!(
                    "capsule {} is {from}; retry once it has settled",
                    rec.name
                )));
            }
        }
        if from == CapsuleState::Running {
            // restart of a running capsule: the run goes on; the caller reboots it.
            return Ok(Transition {
                record: rec,
                began: true,
            });
        }
        let balance = g.balance(&rec.team);
        let checks = g
            .check_caps(&rec.team, rec.size, None, Some(&rec.id))
            .and_then(|_| ledger::check_start(&rec, now_ms, rates, balance));
        if let Err(e) = checks {
            let limit = match e.kind() {
                crate::error::ErrorKind::InsufficientCredits => "insufficient_credits",
                _ => "limit",
            };
            g.push_event(
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
            );
            return Err(e);
        }
        let m = ledger::start_run(&mut rec, now_ms, rates, balance)?;
        rec.state = CapsuleState::Waking;
        rec.state_reason = match kind {
            StartKind::Wake => "wake".into(),
            StartKind::Restart => "restart".into(),
        };
        g.state_event(&rec, from, &rec.state_reason.clone(), now_ms, token.as_ref())?;
        g.apply_charges(&rec, &m.charges, token.as_ref())?;
        g.put(rec.clone());
        Ok(Transition {
            record: rec,
            began: true,
        })
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
        let mut g = self.lock();
        let mut rec = g.get(id)?;
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
            EndKind::Sleep => ledger::settle_run(&mut rec, now_ms, rates)?,
            EndKind::Terminate => ledger::settle_terminate(&mut rec, now_ms, rates)?,
        };
        rec.state = to;
        rec.state_reason = reason.to_owned();
        g.apply_charges(&rec, &charges, token.as_ref())?;
        g.state_event(&rec, from, reason, now_ms, token.as_ref())?;
        g.put(rec.clone());
        Ok(Transition {
            record: rec,
            began: true,
        })
    }

    async fn meter(
        &self,
        id: &CapsuleId,
        now_ms: i64,
        rates: &RateCard,
        idle_deadline_ms: Option<i64>,
        enforce: bool,
    ) -> Result<MeterReport> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        meter_locked(&mut g, &mut rec, now_ms, rates, idle_deadline_ms, enforce)
    }

    async fn finish_transition(
        &self,
        id: &CapsuleId,
        from: CapsuleState,
        to: CapsuleState,
        reason: &str,
        now_ms: i64,
    ) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        if rec.state != from {
            return Err(Error::conflict(format!(
                "capsule {} is {}, not {from}; it changed state meanwhile",
                rec.name, rec.state
            )));
        }
        rec.state = to;
        rec.state_reason = reason.to_owned();
        if to == CapsuleState::Terminated {
            free_name(&mut g, &mut rec, now_ms);
        }
        g.state_event(&rec, from, reason, now_ms, None)?;
        g.put(rec.clone());
        Ok(rec)
    }

    async fn abort_start(&self, id: &CapsuleId, to: CapsuleState, reason: &str, now_ms: i64) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        let from = rec.state;
        // Refund the compute charged for this run (storage of a capsule that never existed too).
        let run_start = rec.meter.run_started_ms;
        let refund: MicroCredits = MicroCredits::sum(
            g.capsule_entries
                .get(id)
                .into_iter()
                .flatten()
                .map(|&i| &g.entries[i].entry)
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
            g.push_entry(NewEntry {
                at_ms: now_ms,
                team: rec.team.clone(),
                capsule: Some(rec.id.clone()),
                kind: EntryKind::Refund,
                quantity: 1,
                amount: refund,
                reason: Some(reason.to_owned()),
            })?;
        }
        rec.state = to;
        rec.state_reason = reason.to_owned();
        if to == CapsuleState::Terminated {
            free_name(&mut g, &mut rec, now_ms);
        }
        g.state_event(&rec, from, reason, now_ms, None)?;
        g.put(rec.clone());
        Ok(rec)
    }

    async fn update_capsule(&self, id: &CapsuleId, patch: CapsulePatch, event: NewEvent) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
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
        g.push_event(event);
        g.put(rec.clone());
        Ok(rec)
    }

    async fn set_url(&self, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        state::refusal(rec.state, Operation::Update, rec.name.as_str())?;
        if let Some(u) = &url {
            match g.labels.get(&u.host_label) {
                Some(owner) if owner != id => {
                    return Err(Error::already_exists(format!("host label {} is taken", u.host_label)));
                }
                _ => {
                    g.labels.insert(u.host_label.clone(), id.clone());
                }
            }
        }
        if let Some(u) = &url {
            rec.host_label = Some(u.host_label.clone());
        }
        rec.url = url;
        g.push_event(event);
        g.put(rec.clone());
        Ok(rec)
    }

    async fn record_traffic(&self, id: &CapsuleId, bytes: u64, now_ms: i64, rates: &RateCard) -> Result<CapsuleRecord> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        if let Some(c) = ledger::add_traffic(&mut rec, bytes, now_ms, rates)? {
            g.apply_charges(&rec, &[c], None)?;
        }
        g.put(rec.clone());
        Ok(rec)
    }

    async fn reconcile(
        &self,
        id: &CapsuleId,
        observed: Observed,
        now_ms: i64,
        rates: &RateCard,
    ) -> Result<MeterReport> {
        let mut g = self.lock();
        let mut rec = g.get(id)?;
        let from = rec.state;
        let note = |g: &mut Inner, rec: &CapsuleRecord, detail: String| {
            g.push_event(
                NewEvent::new(now_ms, EventKind::Reconciled { detail })
                    .team(&rec.team)
                    .capsule(&rec.id),
            );
        };
        let set = |g: &mut Inner, rec: &mut CapsuleRecord, to: CapsuleState, reason: &str| -> Result<()> {
            rec.state = to;
            rec.state_reason = reason.to_owned();
            g.state_event(rec, from, reason, now_ms, None)
        };
        if from == CapsuleState::Terminating {
            let charges = ledger::settle_terminate(&mut rec, now_ms, rates)?;
            g.apply_charges(&rec, &charges, None)?;
            set(&mut g, &mut rec, CapsuleState::Terminated, "reconciled")?;
            free_name(&mut g, &mut rec, now_ms);
        } else {
            match observed {
                Observed::Running => {
                    if !matches!(
                        from,
                        CapsuleState::Running | CapsuleState::Creating | CapsuleState::Waking
                    ) {
                        // The backend runs it although the record says otherwise: meter it from now.
                        rec.meter.run_started_ms = Some(now_ms);
                        rec.meter.run_minutes_charged = 0;
                    }
                    if from != CapsuleState::Running {
                        set(&mut g, &mut rec, CapsuleState::Running, "adopted")?;
                    }
                    note(
                        &mut g,
                        &rec,
                        "adopted a running capsule; charged the minutes it ran unmetered".into(),
                    );
                    return meter_locked(&mut g, &mut rec, now_ms, rates, None, false);
                }
                Observed::Sleeping => {
                    let charges = ledger::settle_run(&mut rec, now_ms, rates)?;
                    g.apply_charges(&rec, &charges, None)?;
                    if from != CapsuleState::Sleeping {
                        set(&mut g, &mut rec, CapsuleState::Sleeping, "reconciled")?;
                    }
                }
                obs => {
                    let why = match obs {
                        Observed::Failed(w) => w,
                        _ => "the backend no longer has this capsule's VM".into(),
                    };
                    let charges = ledger::settle_run(&mut rec, now_ms, rates)?;
                    g.apply_charges(&rec, &charges, None)?;
                    if from != CapsuleState::Failed {
                        set(&mut g, &mut rec, CapsuleState::Failed, "vm_lost")?;
                    }
                    note(&mut g, &rec, why);
                }
            }
        }
        g.put(rec.clone());
        Ok(MeterReport {
            record: rec,
            charged: MicroCredits::ZERO,
            stopped: None,
        })
    }
}

fn free_name(g: &mut Inner, rec: &mut CapsuleRecord, now_ms: i64) {
    rec.terminated_at_ms = Some(now_ms);
    let key = (rec.team.clone(), rec.name.clone());
    if g.live_names.get(&key) == Some(&rec.id) {
        g.live_names.remove(&key);
    }
    g.dead_names.insert(key, rec.id.clone());
    if let Some(l) = &rec.host_label {
        g.labels.remove(l);
    }
}

fn meter_locked(
    g: &mut Inner,
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
    let balance = g.balance(&rec.team);
    let running = rec.state == CapsuleState::Running;
    let idle = if running { idle_deadline_ms } else { None };
    let m = ledger::meter_run(rec, now_ms, rates, balance, idle, enforce)?;
    let charged = g.apply_charges(rec, &m.charges, None)?;
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
                format!("team balance {} cannot pay the next minute", g.balance(&rec.team))
            }
            StopReason::RuntimeLimit => format!("max runtime of {} min reached", rec.limits.max_runtime_ms / 60_000),
            StopReason::Idle => format!("no activity for {} s", rec.limits.idle_timeout_ms / 1000),
        };
        g.push_event(
            NewEvent::new(
                at,
                EventKind::LimitReached {
                    limit: why.as_str().to_owned(),
                    detail,
                },
            )
            .team(&rec.team)
            .capsule(&rec.id),
        );
        g.state_event(rec, from, why.as_str(), at, None)?;
        stopped = Some(why);
    }
    g.put(rec.clone());
    Ok(MeterReport {
        record: rec.clone(),
        charged,
        stopped,
    })
}
