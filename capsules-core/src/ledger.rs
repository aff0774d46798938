//! The ledger: append-only entries (balance = sum), usage, and the metering rules as pure
//! functions every store runs inside its one transaction.
//!
//! Units (DESIGN.md §3 Metering): compute per started minute of running time, charged at the start
//! of the minute (minute k of a run covers [start + 60k s, start + 60(k+1) s)); storage per started
//! hour of the allocated GiB from create to terminate (asleep too); preview traffic per started MiB
//! (each completed MiB when it completes, the last partial one at terminate). Every rate is whole
//! micro-credits per unit: no rounding inside a charge, and no floating point anywhere here.

use crate::error::{Error, Result};
use crate::records::CapsuleRecord;
use crate::types::{CapsuleId, MicroCredits, RateCard, Size, TeamCaps, TeamId};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const MIB: u64 = 1 << 20;

/// What an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credit added (onboarding or by the operator).
    Grant,
    /// Compute minutes (quantity = minutes).
    Compute,
    /// Storage GiB-hours (quantity = GiB-hours).
    Storage,
    /// Preview traffic (quantity = MiB).
    Traffic,
    /// A lifecycle event, at zero cost (quantity = 1).
    Lifecycle,
    /// A charge given back (a create or wake that never started).
    Refund,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Compute => "compute",
            EntryKind::Storage => "storage",
            EntryKind::Traffic => "traffic",
            EntryKind::Lifecycle => "lifecycle",
            EntryKind::Refund => "refund",
        }
    }
}

/// An entry to append. `amount` is signed: grants and refunds positive, charges negative.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewEntry {
    pub at_ms: i64,
    pub team: TeamId,
    pub capsule: Option<CapsuleId>,
    pub kind: EntryKind,
    pub quantity: u64,
    pub amount: MicroCredits,
    /// Grant reason, lifecycle event name, refund reason.
    pub reason: Option<String>,
}

impl NewEntry {
    pub fn grant(at_ms: i64, team: &TeamId, amount: MicroCredits, reason: impl Into<String>) -> Self {
        NewEntry {
            at_ms,
            team: team.clone(),
            capsule: None,
            kind: EntryKind::Grant,
            quantity: 1,
            amount,
            reason: Some(reason.into()),
        }
    }
    pub fn lifecycle(at_ms: i64, rec: &CapsuleRecord, event: &str) -> Self {
        NewEntry {
            at_ms,
            team: rec.team.clone(),
            capsule: Some(rec.id.clone()),
            kind: EntryKind::Lifecycle,
            quantity: 1,
            amount: MicroCredits::ZERO,
            reason: Some(event.to_owned()),
        }
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerEntry {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: NewEntry,
}

/// One charge the meter decided on (`cost` positive; the entry's amount is its negation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub at_ms: i64,
    pub kind: EntryKind,
    pub quantity: u64,
    pub cost: MicroCredits,
}

impl Charge {
    pub fn entry(&self, rec: &CapsuleRecord) -> NewEntry {
        NewEntry {
            at_ms: self.at_ms,
            team: rec.team.clone(),
            capsule: Some(rec.id.clone()),
            kind: self.kind,
            quantity: self.quantity,
            amount: self.cost.negate(),
            reason: None,
        }
    }
}

/// Why the meter stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The next minute's charges would pass the capsule's credit limit.
    CreditLimit,
    /// The team balance cannot pay the next minute.
    InsufficientCredits,
    /// The capsule reached its max runtime.
    RuntimeLimit,
    /// No activity for the idle timeout.
    Idle,
}

impl StopReason {
    /// The event reason: `credit_limit_reached`, `insufficient_credits`, `runtime_limit_reached`, `idle_timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::CreditLimit => "credit_limit_reached",
            StopReason::InsufficientCredits => "insufficient_credits",
            StopReason::RuntimeLimit => "runtime_limit_reached",
            StopReason::Idle => "idle_timeout",
        }
    }
}

/// Storage hours whose start is ≤ `at_ms` (or < when `strict`), not yet charged.
fn storage_due(rec: &mut CapsuleRecord, at_ms: i64, rates: &RateCard, strict: bool) -> Result<Option<Charge>> {
    let elapsed = at_ms - rec.created_at_ms;
    if elapsed < 0 {
        return Ok(None);
    }
    let started = if strict {
        (elapsed + HOUR_MS - 1) / HOUR_MS
    } else {
        elapsed / HOUR_MS + 1
    } as u64;
    if started <= rec.meter.storage_hours_charged {
        return Ok(None);
    }
    let hours = started - rec.meter.storage_hours_charged;
    let gib_hours = hours * u64::from(rec.disk_gib);
    let cost = rates.storage_gib_hour.checked_mul(gib_hours)?;
    rec.meter.storage_hours_charged = started;
    rec.meter.spent = rec.meter.spent.checked_add(cost)?;
    Ok(Some(Charge {
        at_ms,
        kind: EntryKind::Storage,
        quantity: gib_hours,
        cost,
    }))
}

/// The result of metering one capsule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterResult {
    pub charges: Vec<Charge>,
    /// The run stopped at this time for this reason (the caller puts the capsule to sleep).
    pub stop: Option<(i64, StopReason)>,
}

impl MeterResult {
    pub fn total(&self) -> Result<MicroCredits> {
        MicroCredits::sum(self.charges.iter().map(|c| c.cost))
    }
}

/// Meters a running capsule up to `now`: charges every minute whose start is ≤ now, each with the
/// storage hours starting by then, stopping at the first minute it cannot pay (credit limit, then
/// team balance) or at the runtime limit or idle deadline, whichever comes first. Storage due up to
/// `now` is charged in any case. With `enforce = false` (adopting capsules after downtime) every due
/// minute is charged, and a limit passed stops the run at `now`.
pub fn meter_run(
    rec: &mut CapsuleRecord,
    now_ms: i64,
    rates: &RateCard,
    balance: MicroCredits,
    idle_deadline_ms: Option<i64>,
    enforce: bool,
) -> Result<MeterResult> {
    let mut out = MeterResult::default();
    let Some(start) = rec.meter.run_started_ms else {
        if let Some(c) = storage_due(rec, now_ms, rates, false)? {
            out.charges.push(c);
        }
        return Ok(out);
    };
    let mut bal = balance;
    let runtime_end = start + (rec.limits.max_runtime_ms - rec.meter.runtime_before_ms).max(0);
    let mut stop: Option<(i64, StopReason)> = None;
    for (at, why) in [
        (runtime_end, StopReason::RuntimeLimit),
        (idle_deadline_ms.unwrap_or(i64::MAX), StopReason::Idle),
    ] {
        if at <= now_ms && stop.is_none_or(|(s, _)| at < s) {
            stop = Some((at, why));
        }
    }
    let compute = rates.compute_minute(rec.size);
    loop {
        let t = start + MINUTE_MS * rec.meter.run_minutes_charged as i64;
        if t > now_ms || stop.is_some_and(|(s, _)| t >= s) {
            break;
        }
        let saved = rec.meter;
        let storage = storage_due(rec, t, rates, false)?;
        let cost = compute.checked_add(storage.map_or(MicroCredits::ZERO, |c| c.cost))?;
        if enforce {
            let limit_hit = saved.spent.checked_add(cost)? > rec.limits.credit_limit;
            let broke = bal < cost;
            if limit_hit || broke {
                // Storage accrues regardless; only the minute is refused.
                rec.meter = saved;
                let why = if limit_hit {
                    StopReason::CreditLimit
                } else {
                    StopReason::InsufficientCredits
                };
                stop = Some((t, why));
                break;
            }
        }
        if let Some(c) = storage {
            out.charges.push(c);
        }
        out.charges.push(Charge {
            at_ms: t,
            kind: EntryKind::Compute,
            quantity: 1,
            cost: compute,
        });
        rec.meter.spent = rec.meter.spent.checked_add(compute)?;
        rec.meter.run_minutes_charged += 1;
        rec.meter.minutes_total += 1;
        bal = bal.checked_sub(cost)?;
    }
    if !enforce && stop.is_none() && (rec.meter.spent > rec.limits.credit_limit || bal.is_negative()) {
        let why = if rec.meter.spent > rec.limits.credit_limit {
            StopReason::CreditLimit
        } else {
            StopReason::InsufficientCredits
        };
        stop = Some((now_ms, why));
    }
    if let Some(c) = storage_due(rec, now_ms, rates, false)? {
        out.charges.push(c);
    }
    if let Some((at, _)) = stop {
        end_run(rec, at);
    }
    out.stop = stop;
    Ok(out)
}

/// Closes the current run at `at_ms`, charging the minutes that started before it (they ran).
pub fn settle_run(rec: &mut CapsuleRecord, at_ms: i64, rates: &RateCard) -> Result<Vec<Charge>> {
    let mut out = Vec::new();
    if let Some(start) = rec.meter.run_started_ms {
        let started = ((at_ms - start).max(0) + MINUTE_MS - 1) / MINUTE_MS;
        let started = started as u64;
        if started > rec.meter.run_minutes_charged {
            let n = started - rec.meter.run_minutes_charged;
            let cost = rates.compute_minute(rec.size).checked_mul(n)?;
            out.push(Charge {
                at_ms,
                kind: EntryKind::Compute,
                quantity: n,
                cost,
            });
            rec.meter.spent = rec.meter.spent.checked_add(cost)?;
            rec.meter.run_minutes_charged = started;
            rec.meter.minutes_total += n;
        }
        end_run(rec, at_ms);
    }
    if let Some(c) = storage_due(rec, at_ms, rates, false)? {
        out.push(c);
    }
    Ok(out)
}

/// Final charges at terminate: the run, storage hours started before now, the last partial MiB.
pub fn settle_terminate(rec: &mut CapsuleRecord, at_ms: i64, rates: &RateCard) -> Result<Vec<Charge>> {
    let mut out = Vec::new();
    if rec.meter.run_started_ms.is_some() {
        out.extend(
            settle_run(rec, at_ms, rates)?
                .into_iter()
                .filter(|c| c.kind == EntryKind::Compute),
        );
    }
    if let Some(c) = storage_due(rec, at_ms, rates, true)? {
        out.push(c);
    }
    let total_mib = rec.meter.traffic_bytes.div_ceil(MIB);
    if total_mib > rec.meter.traffic_mib_charged {
        let n = total_mib - rec.meter.traffic_mib_charged;
        let cost = rates.traffic_mib.checked_mul(n)?;
        rec.meter.traffic_mib_charged = total_mib;
        rec.meter.spent = rec.meter.spent.checked_add(cost)?;
        out.push(Charge {
            at_ms,
            kind: EntryKind::Traffic,
            quantity: n,
            cost,
        });
    }
    Ok(out)
}

fn end_run(rec: &mut CapsuleRecord, at_ms: i64) {
    if let Some(start) = rec.meter.run_started_ms.take() {
        rec.meter.runtime_before_ms += (at_ms - start).max(0);
        rec.meter.run_minutes_charged = 0;
    }
}

/// Adds preview traffic; charges each MiB it completes.
pub fn add_traffic(rec: &mut CapsuleRecord, bytes: u64, at_ms: i64, rates: &RateCard) -> Result<Option<Charge>> {
    rec.meter.traffic_bytes = rec.meter.traffic_bytes.saturating_add(bytes);
    let done = rec.meter.traffic_bytes / MIB;
    if done <= rec.meter.traffic_mib_charged {
        return Ok(None);
    }
    let n = done - rec.meter.traffic_mib_charged;
    let cost = rates.traffic_mib.checked_mul(n)?;
    rec.meter.traffic_mib_charged = done;
    rec.meter.spent = rec.meter.spent.checked_add(cost)?;
    Ok(Some(Charge {
        at_ms,
        kind: EntryKind::Traffic,
        quantity: n,
        cost,
    }))
}

/// Whether a run may start at `now` (create, wake, restart): the runtime limit, the credit limit
/// (the first minute and the storage due must fit) and the balance. The error names the limit.
pub fn check_start(rec: &CapsuleRecord, now_ms: i64, rates: &RateCard, balance: MicroCredits) -> Result<()> {
    if rec.meter.runtime_before_ms >= rec.limits.max_runtime_ms {
        return Err(Error::limit_exceeded(format!(
            "capsule {} reached its max runtime of {} min; raise the max runtime to run it again",
            rec.name,
            rec.limits.max_runtime_ms / MINUTE_MS
        )));
    }
    let mut probe = rec.clone();
    let storage = storage_due(&mut probe, now_ms, rates, false)?.map_or(MicroCredits::ZERO, |c| c.cost);
    let first = rates.compute_minute(rec.size).checked_add(storage)?;
    let after = rec.meter.spent.checked_add(first)?;
    if after > rec.limits.credit_limit {
        return Err(Error::limit_exceeded(format!(
            "capsule {} would pass its credit limit of {} (spent {}, the next minute costs {}); raise the credit limit",
            rec.name, rec.limits.credit_limit, rec.meter.spent, first
        )));
    }
    if balance < first {
        return Err(Error::insufficient_credits(format!(
            "the team balance of {balance} cannot pay the next minute ({first}); add credit"
        )));
    }
    Ok(())
}

/// Starts a run at `now` and charges its first minute (with storage due). Call [`check_start`] first.
pub fn start_run(rec: &mut CapsuleRecord, now_ms: i64, rates: &RateCard, balance: MicroCredits) -> Result<MeterResult> {
    rec.meter.run_started_ms = Some(now_ms);
    rec.meter.run_minutes_charged = 0;
    meter_run(rec, now_ms, rates, balance, None, true)
}

/// What a capsule or team used, summed from the ledger (and the capsule's traffic counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub compute_minutes: u64,
    pub storage_gib_hours: u64,
    pub traffic_mib: u64,
    pub preview_bytes: u64,
    pub lifecycle_events: u64,
    pub compute_cost: MicroCredits,
    pub storage_cost: MicroCredits,
    pub traffic_cost: MicroCredits,
    /// Everything charged, net of refunds (positive = cost).
    pub cost: MicroCredits,
}

impl Usage {
    /// Sums `entries` (grants are ignored: usage is what was spent).
    pub fn from_entries<'a, I: IntoIterator<Item = &'a LedgerEntry>>(entries: I) -> Result<Usage> {
        let mut u = Usage::default();
        for e in entries {
            let e = &e.entry;
            let cost = e.amount.negate();
            match e.kind {
                EntryKind::Grant => continue,
                EntryKind::Compute => {
                    u.compute_minutes += e.quantity;
                    u.compute_cost = u.compute_cost.checked_add(cost)?;
                }
                EntryKind::Storage => {
                    u.storage_gib_hours += e.quantity;
                    u.storage_cost = u.storage_cost.checked_add(cost)?;
                }
                EntryKind::Traffic => {
                    u.traffic_mib += e.quantity;
                    u.traffic_cost = u.traffic_cost.checked_add(cost)?;
                }
                EntryKind::Lifecycle => u.lifecycle_events += e.quantity,
                EntryKind::Refund => {}
            }
            u.cost = u.cost.checked_add(cost)?;
        }
        Ok(u)
    }
}

/// The team caps for starting one more capsule of `size` (and, on create, `new_disk` GiB more
/// storage), given the team's `capsules` (the one being started, `except`, is not counted). Every
/// store runs this inside the atomic step that starts compute, on the rows it read.
pub fn check_team_caps<'a>(
    caps: TeamCaps,
    capsules: impl IntoIterator<Item = &'a CapsuleRecord>,
    size: Size,
    new_disk: Option<u32>,
    except: Option<&CapsuleId>,
) -> Result<()> {
    if size > caps.max_size {
        return Err(Error::limit_exceeded(format!(
            "size {size} is above the team's max size {}",
            caps.max_size
        )));
    }
    let (mut running, mut vcpus, mut disk) = (0u32, 0u32, 0u32);
    for c in capsules.into_iter().filter(|c| Some(&c.id) != except) {
        if c.state.is_running() {
            running += 1;
            vcpus += c.size.vcpus();
        }
        if c.state.is_live() {
            disk += c.disk_gib;
        }
    }
    if running + 1 > caps.max_running {
        return Err(Error::limit_exceeded(format!(
            "the team cap of {} running capsules is reached",
            caps.max_running
        )));
    }
    if vcpus + size.vcpus() > caps.max_vcpus {
        return Err(Error::limit_exceeded(format!(
            "the team cap of {} running vCPUs is reached ({vcpus} running, this one needs {})",
            caps.max_vcpus,
            size.vcpus()
        )));
    }
    if let Some(d) = new_disk
        && disk + d > caps.max_storage_gib
    {
        return Err(Error::limit_exceeded(format!(
            "the team cap of {} GiB of storage is reached ({disk} GiB allocated, this one needs {d})",
            caps.max_storage_gib
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{CapsuleRecord, MeterState};
    use crate::state::CapsuleState;
    use crate::types::{CapsuleId, CapsuleLimits, CapsuleName, Image, NetworkPolicy, Region, Size, TeamId, TokenId};

    fn rec(size: Size, limit: i64) -> CapsuleRecord {
        CapsuleRecord {
            id: CapsuleId::generate(),
            team: TeamId::generate(),
            name: CapsuleName::new("t").unwrap(),
            size,
            image: Image::Full,
            region: Region::EuCentral,
            disk_gib: 10,
            network: NetworkPolicy::Internet,
            limits: CapsuleLimits {
                credit_limit: MicroCredits::from_micros(limit),
                ..CapsuleLimits::default()
            },
            url: None,
            host_label: None,
            state: CapsuleState::Running,
            state_reason: String::new(),
            created_by: TokenId::generate(),
            created_at_ms: 0,
            terminated_at_ms: None,
            meter: MeterState::default(),
        }
    }

    const RICH: MicroCredits = MicroCredits::credits(1000);

    #[test]
    fn credit_limit_stops_at_minute_four() {
        let rates = RateCard::default();
        let mut r = rec(Size::S2x2gb, 10_000);
        let m = start_run(&mut r, 0, &rates, RICH).unwrap();
        assert_eq!(m.total().unwrap().micros(), 3000);
        let mut stop = None;
        for t in (10..=300).step_by(10) {
            let m = meter_run(&mut r, t * 1000, &rates, RICH, None, true).unwrap();
            if m.stop.is_some() {
                stop = m.stop;
                break;
            }
        }
        assert_eq!(stop, Some((240_000, StopReason::CreditLimit)));
        assert_eq!(r.meter.spent.micros(), 9000);
        assert_eq!(r.meter.run_started_ms, None);
        assert_eq!(r.meter.runtime_before_ms, 240_000);
        assert!(
            check_start(&r, 250_000, &rates, RICH)
                .unwrap_err()
                .message()
                .contains("credit limit")
        );
    }

    #[test]
    fn minutes_start_at_their_first_millisecond() {
        let rates = RateCard::default();
        let mut r = rec(Size::S1x1gb, 1_000_000);
        start_run(&mut r, 0, &rates, RICH).unwrap();
        meter_run(&mut r, 59_999, &rates, RICH, None, true).unwrap();
        assert_eq!(r.meter.minutes_total, 1);
        meter_run(&mut r, 60_000, &rates, RICH, None, true).unwrap();
        assert_eq!(r.meter.minutes_total, 2);
        // A sleep exactly at 120 s: minute 2 never started.
        settle_run(&mut r, 120_000, &rates).unwrap();
        assert_eq!(r.meter.minutes_total, 2);
        // A late tick charges every minute that started, in order.
        start_run(&mut r, 200_000, &rates, RICH).unwrap();
        meter_run(&mut r, 200_000 + 5 * 60_000, &rates, RICH, None, true).unwrap();
        assert_eq!(r.meter.minutes_total, 2 + 6);
    }

    #[test]
    fn balance_and_idle_and_runtime_stops() {
        let rates = RateCard::default();
        let mut r = rec(Size::S1x1gb, 1_000_000);
        start_run(&mut r, 0, &rates, RICH).unwrap();
        let m = meter_run(&mut r, 60_000, &rates, MicroCredits::from_micros(999), None, true).unwrap();
        assert_eq!(m.stop, Some((60_000, StopReason::InsufficientCredits)));
        let mut r = rec(Size::S1x1gb, 1_000_000);
        start_run(&mut r, 0, &rates, RICH).unwrap();
        let m = meter_run(&mut r, 200_000, &rates, RICH, Some(120_000), true).unwrap();
        assert_eq!(m.stop, Some((120_000, StopReason::Idle)));
        assert_eq!(r.meter.minutes_total, 2);
        let mut r = rec(Size::S1x1gb, 1_000_000);
        r.limits.max_runtime_ms = 90_000;
        start_run(&mut r, 0, &rates, RICH).unwrap();
        let m = meter_run(&mut r, 600_000, &rates, RICH, None, true).unwrap();
        assert_eq!(m.stop, Some((90_000, StopReason::RuntimeLimit)));
        assert_eq!(r.meter.minutes_total, 2);
        assert_eq!(
            check_start(&r, 700_000, &rates, RICH).unwrap_err().kind(),
            crate::ErrorKind::LimitExceeded
        );
    }

    #[test]
    fn storage_and_traffic() {
        let rates = RateCard::default();
        let mut r = rec(Size::S1x1gb, 1_000_000_000);
        r.meter.storage_hours_charged = 0;
        // Asleep: storage only, per started hour.
        let m = meter_run(&mut r, HOUR_MS * 2 + 1, &rates, RICH, None, true).unwrap();
        assert_eq!(m.charges.iter().map(|c| c.quantity).sum::<u64>(), 30);
        let c = add_traffic(&mut r, MIB + 5, 0, &rates).unwrap().unwrap();
        assert_eq!((c.quantity, c.cost.micros()), (1, 50));
        assert!(add_traffic(&mut r, MIB - 6, 0, &rates).unwrap().is_none());
        let end = settle_terminate(&mut r, HOUR_MS * 3, &rates).unwrap();
        let traffic: Vec<_> = end.iter().filter(|c| c.kind == EntryKind::Traffic).collect();
        assert_eq!(traffic.len(), 1);
        assert_eq!(traffic[0].quantity, 1, "the last partial MiB");
        assert!(
            end.iter().all(|c| c.kind != EntryKind::Storage),
            "hour 3 starts exactly at terminate"
        );
    }
}
