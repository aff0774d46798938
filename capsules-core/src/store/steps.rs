//! The capsule steps, written once for every store.
//!
//! Each [`CapsuleStore`](super::CapsuleStore) method that changes a capsule together with the
//! ledger and the audit trail is one function here, over a [`StepTx`]: the few primitives a store
//! offers inside its atomic step (one lock guard in memory, one SQL transaction in SQLite). A
//! store's trait method opens its step and calls the function; so every store runs the same
//! state checks, metering and events, and a fix lands in all of them at once.

use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, EventKind, NewEvent};
use crate::ledger::{self, Charge, EntryKind, LedgerEntry, NewEntry, StopReason};
use crate::records::{CapsulePatch, CapsuleRecord, MeterState, NewCapsule};
use crate::state::{self, CapsuleState, Operation, Outcome};
use crate::store::{EndKind, MeterReport, Observed, StartKind, Transition};
use crate::types::{CapsuleId, CapsuleName, MicroCredits, PublicUrl, RateCard, Size, TeamId, TokenId};

/// What a store offers inside one atomic step. Everything a step writes through it commits
/// together, or (where the store can roll back) not at all.
pub trait StepTx {
    /// The capsule; `NotFound` if it does not exist.
    fn get(&mut self, id: &CapsuleId) -> Result<CapsuleRecord>;
    /// Inserts or replaces the record.
    fn put(&mut self, rec: &CapsuleRecord) -> Result<()>;
    /// Whether `id` names any capsule (live or terminated).
    fn id_taken(&mut self, id: &CapsuleId) -> Result<bool>;
    /// Whether a live capsule of the team holds `name`.
    fn name_taken(&mut self, team: &TeamId, name: &CapsuleName) -> Result<bool>;
    /// Reserves a new capsule's name (and files it under its team) before its first events.
    fn reserve(&mut self, rec: &CapsuleRecord) -> Result<()>;
    /// Frees a terminated capsule's name and host label (the record already says `terminated`).
    fn release(&mut self, rec: &CapsuleRecord) -> Result<()>;
    /// The live capsule holding a host label, if any.
    fn label_owner(&mut self, label: &str) -> Result<Option<CapsuleId>>;
    /// Records that `id` holds `label` (called after [`StepTx::label_owner`] found it free or its own).
    fn claim_label(&mut self, label: &str, id: &CapsuleId) -> Result<()>;
    /// The team's balance.
    fn balance(&mut self, team: &TeamId) -> Result<MicroCredits>;
    /// Team caps for one more running capsule of `size` (and, on create, `new_disk` GiB more disk),
    /// leaving `except` out of the count. See [`ledger::check_team_caps`].
    fn check_caps(
        &mut self,
        team: &TeamId,
        size: Size,
        new_disk: Option<u32>,
        except: Option<&CapsuleId>,
    ) -> Result<()>;
    /// Appends a ledger entry.
    fn push_entry(&mut self, e: NewEntry) -> Result<LedgerEntry>;
    /// Appends an event.
    fn push_event(&mut self, e: NewEvent) -> Result<Event>;
    /// Every ledger entry of one capsule, oldest first.
    fn capsule_entries(&mut self, id: &CapsuleId) -> Result<Vec<LedgerEntry>>;

    /// Appends charges as entries and `charged` events; notes a balance going below zero.
    /// Returns the total charged.
    fn apply_charges(
        &mut self,
        rec: &CapsuleRecord,
        charges: &[Charge],
        token: Option<&TokenId>,
    ) -> Result<MicroCredits> {
        let was_negative = self.balance(&rec.team)?.is_negative();
        let mut total = MicroCredits::ZERO;
        for c in charges {
            self.push_entry(c.entry(rec))?;
            total = total.checked_add(c.cost)?;
            self.push_event(
                NewEvent::new(
                    c.at_ms,
                    EventKind::Charged {
                        what: c.kind.as_str().to_owned(),
                        quantity: c.quantity,
                        amount: c.cost,
                    },
                )
                .team(&rec.team)
                .capsule(&rec.id)
                .token(token),
            )?;
        }
        if let Some(last) = charges.last() {
            let bal = self.balance(&rec.team)?;
            if bal.is_negative() && !was_negative {
                self.push_event(
                    NewEvent::new(last.at_ms, EventKind::InsufficientCredits { balance: bal })
                        .team(&rec.team)
                        .capsule(&rec.id),
                )?;
            }
        }
        Ok(total)
    }

    /// A `state_changed` event (from `from` to the record's state) and its zero-cost lifecycle entry.
    fn state_event(
        &mut self,
        rec: &CapsuleRecord,
        from: CapsuleState,
        reason: &str,
        at: i64,
        token: Option<&TokenId>,
    ) -> Result<()> {
        self.push_event(
            NewEvent::new(
                at,
                EventKind::StateChanged {
                    from,
                    to: rec.state,
                    reason: reason.to_owned(),
                },
            )
            .team(&rec.team)
            .capsule(&rec.id)
            .token(token),
        )?;
        self.push_entry(NewEntry::lifecycle(at, rec, rec.state.as_str()))?;
        Ok(())
    }
}

/// Moves the record to `to` with its event; `terminated` frees the name and the label.
fn set_state(
    t: &mut impl StepTx,
    rec: &mut CapsuleRecord,
    from: CapsuleState,
    to: CapsuleState,
    reason: &str,
    now_ms: i64,
    token: Option<&TokenId>,
) -> Result<()> {
    rec.state = to;
    rec.state_reason = reason.to_owned();
    if to == CapsuleState::Terminated {
        rec.terminated_at_ms = Some(now_ms);
        t.release(rec)?;
    }
    t.state_event(rec, from, reason, now_ms, token)
}

/// [`CapsuleStore::create_capsule`](super::CapsuleStore::create_capsule).
pub fn create_capsule(
    t: &mut impl StepTx,
    new: NewCapsule,
    rates: &RateCard,
    token: Option<&TokenId>,
) -> Result<CapsuleRecord> {
    if t.name_taken(&new.team, &new.name)? {
        return Err(Error::already_exists(format!(
            "a capsule named {} exists in this team",
            new.name
        )));
    }
    if t.id_taken(&new.id)? {
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
    ledger::check_start(&rec, new.now_ms, rates, balance)?;
    let m = ledger::start_run(&mut rec, new.now_ms, rates, balance)?;
    if m.stop.is_some() {
        return Err(Error::internal(
            "the first minute was refused after the start check passed",
        ));
    }
    t.reserve(&rec)?;
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
        .token(token),
    )?;
    t.push_entry(NewEntry::lifecycle(new.now_ms, &rec, "creating"))?;
    t.apply_charges(&rec, &m.charges, token)?;
    t.put(&rec)?;
    Ok(rec)
}

/// [`CapsuleStore::begin_start`](super::CapsuleStore::begin_start). The outer error means
/// "write nothing"; the inner one is a refusal whose `limit_reached` event is kept.
pub fn begin_start(
    t: &mut impl StepTx,
    id: &CapsuleId,
    kind: StartKind,
    now_ms: i64,
    rates: &RateCard,
    token: Option<&TokenId>,
) -> Result<Result<Transition>> {
    let mut rec = t.get(id)?;
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
        // restart of a running capsule: the run goes on; the caller reboots it.
        return Ok(Ok(Transition {
            record: rec,
            began: true,
        }));
    }
    let balance = t.balance(&rec.team)?;
    let checks = t
        .check_caps(&rec.team, rec.size, None, Some(&rec.id))
        .and_then(|_| ledger::check_start(&rec, now_ms, rates, balance));
    if let Err(e) = checks {
        if matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable) {
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
            .token(token),
        )?;
        return Ok(Err(e));
    }
    let m = ledger::start_run(&mut rec, now_ms, rates, balance)?;
    let reason = match kind {
        StartKind::Wake => "wake",
        StartKind::Restart => "restart",
    };
    set_state(t, &mut rec, from, CapsuleState::Waking, reason, now_ms, token)?;
    t.apply_charges(&rec, &m.charges, token)?;
    t.put(&rec)?;
    Ok(Ok(Transition {
        record: rec,
        began: true,
    }))
}

/// [`CapsuleStore::end_run`](super::CapsuleStore::end_run).
pub fn end_run(
    t: &mut impl StepTx,
    id: &CapsuleId,
    kind: EndKind,
    reason: &str,
    now_ms: i64,
    rates: &RateCard,
    token: Option<&TokenId>,
) -> Result<Transition> {
    let mut rec = t.get(id)?;
    let from = rec.state;
    let (op, to) = match kind {
        EndKind::Sleep => (Operation::Sleep, CapsuleState::Suspending),
        EndKind::Terminate => (Operation::Terminate, CapsuleState::Terminating),
    };
    if state::refusal(from, op, rec.name.as_str())? != Outcome::Start {
        return Ok(Transition {
            record: rec,
            began: false,
        });
    }
    let charges = match kind {
        EndKind::Sleep => ledger::settle_run(&mut rec, now_ms, rates)?,
        EndKind::Terminate => ledger::settle_terminate(&mut rec, now_ms, rates)?,
    };
    rec.state = to;
    rec.state_reason = reason.to_owned();
    t.apply_charges(&rec, &charges, token)?;
    t.state_event(&rec, from, reason, now_ms, token)?;
    t.put(&rec)?;
    Ok(Transition {
        record: rec,
        began: true,
    })
}

/// [`CapsuleStore::meter`](super::CapsuleStore::meter).
pub fn meter(
    t: &mut impl StepTx,
    id: &CapsuleId,
    now_ms: i64,
    rates: &RateCard,
    idle_deadline_ms: Option<i64>,
    enforce: bool,
) -> Result<MeterReport> {
    let mut rec = t.get(id)?;
    meter_record(t, &mut rec, now_ms, rates, idle_deadline_ms, enforce)
}

fn meter_record(
    t: &mut impl StepTx,
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
    let idle = if rec.state == CapsuleState::Running {
        idle_deadline_ms
    } else {
        None
    };
    let m = ledger::meter_run(rec, now_ms, rates, balance, idle, enforce)?;
    let charged = t.apply_charges(rec, &m.charges, None)?;
    let mut stopped = None;
    if let Some((at, why)) = m.stop {
        let from = rec.state;
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
        set_state(t, rec, from, CapsuleState::Suspending, why.as_str(), at, None)?;
        stopped = Some(why);
    }
    t.put(rec)?;
    Ok(MeterReport {
        record: rec.clone(),
        charged,
        stopped,
    })
}

/// [`CapsuleStore::finish_transition`](super::CapsuleStore::finish_transition).
pub fn finish_transition(
    t: &mut impl StepTx,
    id: &CapsuleId,
    from: CapsuleState,
    to: CapsuleState,
    reason: &str,
    now_ms: i64,
) -> Result<CapsuleRecord> {
    let mut rec = t.get(id)?;
    if rec.state != from {
        return Err(Error::conflict(format!(
            "capsule {} is {}, not {from}; it changed state meanwhile",
            rec.name, rec.state
        )));
    }
    set_state(t, &mut rec, from, to, reason, now_ms, None)?;
    t.put(&rec)?;
    Ok(rec)
}

/// [`CapsuleStore::abort_start`](super::CapsuleStore::abort_start): refunds the compute charged
/// for this run (and, for a capsule that never existed, its storage too).
pub fn abort_start(
    t: &mut impl StepTx,
    id: &CapsuleId,
    to: CapsuleState,
    reason: &str,
    now_ms: i64,
) -> Result<CapsuleRecord> {
    let mut rec = t.get(id)?;
    let from = rec.state;
    let run_start = rec.meter.run_started_ms;
    let entries = t.capsule_entries(id)?;
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
            reason: Some(reason.to_owned()),
        })?;
    }
    set_state(t, &mut rec, from, to, reason, now_ms, None)?;
    t.put(&rec)?;
    Ok(rec)
}

/// [`CapsuleStore::update_capsule`](super::CapsuleStore::update_capsule).
pub fn update_capsule(
    t: &mut impl StepTx,
    id: &CapsuleId,
    patch: CapsulePatch,
    event: NewEvent,
) -> Result<CapsuleRecord> {
    let mut rec = t.get(id)?;
    state::refusal(rec.state, Operation::Update, rec.name.as_str())?;
    if let Some(c) = patch.credit_limit {
        if c < rec.meter.spent {
            return Err(Error::invalid_input(format!(
                "capsule {} has already spent {}; its credit limit can be lowered to {} at the least, not {c}",
                rec.name, rec.meter.spent, rec.meter.spent
            )));
        }
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
}

/// [`CapsuleStore::set_url`](super::CapsuleStore::set_url).
pub fn set_url(t: &mut impl StepTx, id: &CapsuleId, url: Option<PublicUrl>, event: NewEvent) -> Result<CapsuleRecord> {
    let mut rec = t.get(id)?;
    state::refusal(rec.state, Operation::Update, rec.name.as_str())?;
    if let Some(u) = &url {
        if t.label_owner(&u.host_label)?.is_some_and(|owner| owner != *id) {
            return Err(Error::already_exists(format!("host label {} is taken", u.host_label)));
        }
        t.claim_label(&u.host_label, id)?;
        rec.host_label = Some(u.host_label.clone());
    }
    rec.url = url;
    t.push_event(event)?;
    t.put(&rec)?;
    Ok(rec)
}

/// [`CapsuleStore::record_traffic`](super::CapsuleStore::record_traffic).
pub fn record_traffic(
    t: &mut impl StepTx,
    id: &CapsuleId,
    bytes: u64,
    now_ms: i64,
    rates: &RateCard,
) -> Result<CapsuleRecord> {
    let mut rec = t.get(id)?;
    if let Some(c) = ledger::add_traffic(&mut rec, bytes, now_ms, rates)? {
        t.apply_charges(&rec, &[c], None)?;
    }
    t.put(&rec)?;
    Ok(rec)
}

/// [`CapsuleStore::reconcile`](super::CapsuleStore::reconcile): the record follows what the
/// backend reports; an adopted running capsule is charged the minutes it ran unmetered.
pub fn reconcile(
    t: &mut impl StepTx,
    id: &CapsuleId,
    observed: Observed,
    now_ms: i64,
    rates: &RateCard,
) -> Result<MeterReport> {
    let mut rec = t.get(id)?;
    let from = rec.state;
    if from == CapsuleState::Terminating {
        let charges = ledger::settle_terminate(&mut rec, now_ms, rates)?;
        t.apply_charges(&rec, &charges, None)?;
        set_state(t, &mut rec, from, CapsuleState::Terminated, "reconciled", now_ms, None)?;
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
                    set_state(t, &mut rec, from, CapsuleState::Running, "adopted", now_ms, None)?;
                }
                reconciled(
                    t,
                    &rec,
                    "adopted a running capsule; charged the minutes it ran unmetered",
                    now_ms,
                )?;
                return meter_record(t, &mut rec, now_ms, rates, None, false);
            }
            Observed::Sleeping => {
                let charges = ledger::settle_run(&mut rec, now_ms, rates)?;
                t.apply_charges(&rec, &charges, None)?;
                if from != CapsuleState::Sleeping {
                    set_state(t, &mut rec, from, CapsuleState::Sleeping, "reconciled", now_ms, None)?;
                }
            }
            obs => {
                let why = match obs {
                    Observed::Failed(w) => w,
                    _ => "the backend no longer has this capsule's VM".into(),
                };
                let charges = ledger::settle_run(&mut rec, now_ms, rates)?;
                t.apply_charges(&rec, &charges, None)?;
                if from != CapsuleState::Failed {
                    set_state(t, &mut rec, from, CapsuleState::Failed, "vm_lost", now_ms, None)?;
                }
                reconciled(t, &rec, &why, now_ms)?;
            }
        }
    }
    t.put(&rec)?;
    Ok(MeterReport {
        record: rec,
        charged: MicroCredits::ZERO,
        stopped: None,
    })
}

fn reconciled(t: &mut impl StepTx, rec: &CapsuleRecord, detail: &str, now_ms: i64) -> Result<()> {
    t.push_event(
        NewEvent::new(
            now_ms,
            EventKind::Reconciled {
                detail: detail.to_owned(),
            },
        )
        .team(&rec.team)
        .capsule(&rec.id),
    )?;
    Ok(())
}
