//! Rates, per-capsule limits, team caps. Money here is integer micro-credits only.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::{MicroCredits, Size};

/// What each unit costs, in whole micro-credits per unit (so a charge never rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateCard {
    /// Per started minute of running time, by size.
    pub compute_1x1gb: MicroCredits,
    pub compute_2x2gb: MicroCredits,
    pub compute_2x4gb: MicroCredits,
    pub compute_4x8gb: MicroCredits,
    /// Per started hour of one allocated GiB (also while asleep).
    pub storage_gib_hour: MicroCredits,
    /// Per started MiB of preview traffic (both directions).
    pub traffic_mib: MicroCredits,
}

impl Default for RateCard {
    /// The defaults of DESIGN.md §3 Metering.
    fn default() -> Self {
        RateCard {
            compute_1x1gb: MicroCredits::from_micros(1000),
            compute_2x2gb: MicroCredits::from_micros(2000),
            compute_2x4gb: MicroCredits::from_micros(3000),
            compute_4x8gb: MicroCredits::from_micros(6000),
            storage_gib_hour: MicroCredits::from_micros(100),
            traffic_mib: MicroCredits::from_micros(50),
        }
    }
}

impl RateCard {
    /// The per-minute compute rate of `size`.
    pub fn compute_minute(&self, size: Size) -> MicroCredits {
        match size {
            Size::S1x1gb => self.compute_1x1gb,
            Size::S2x2gb => self.compute_2x2gb,
            Size::S2x4gb => self.compute_2x4gb,
            Size::S4x8gb => self.compute_4x8gb,
        }
    }
    /// The cost of one storage hour of a `disk_gib` disk.
    pub fn storage_hour(&self, disk_gib: u32) -> MicroCredits {
        MicroCredits::from_micros(self.storage_gib_hour.micros() * i64::from(disk_gib))
    }
    /// Refuses negative rates.
    pub fn validate(&self) -> Result<()> {
        let all = [
            self.compute_1x1gb,
            self.compute_2x2gb,
            self.compute_2x4gb,
            self.compute_4x8gb,
            self.storage_gib_hour,
            self.traffic_mib,
        ];
        if all.iter().any(|r| r.is_negative()) {
            return Err(Error::invalid_input(
                "a rate is negative; rates are whole micro-credits per unit, 0 or more",
            ));
        }
        Ok(())
    }
}

/// Default credit limit of a capsule: 1.00.
pub const DEFAULT_CREDIT_LIMIT: MicroCredits = MicroCredits::credits(1);
/// Default disk: 10 GiB.
pub const DEFAULT_DISK_GIB: u32 = 10;
/// Default max runtime: 24 h of running time.
pub const DEFAULT_MAX_RUNTIME: Duration = Duration::from_secs(24 * 3600);
/// Default idle timeout: 10 min.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// One-time onboarding grant of a new team: 5.00.
pub const ONBOARDING_GRANT: MicroCredits = MicroCredits::credits(5);

/// The limits of one capsule (all changeable after create, within token and team bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapsuleLimits {
    /// Everything the capsule costs (compute, storage, traffic) stays within this.
    pub credit_limit: MicroCredits,
    /// Sleep after this long without activity, in ms.
    pub idle_timeout_ms: i64,
    /// Sleep after this much running time, in ms.
    pub max_runtime_ms: i64,
}

impl Default for CapsuleLimits {
    fn default() -> Self {
        CapsuleLimits {
            credit_limit: DEFAULT_CREDIT_LIMIT,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT.as_millis() as i64,
            max_runtime_ms: DEFAULT_MAX_RUNTIME.as_millis() as i64,
        }
    }
}

/// Checks a disk size against the size's maximum.
pub fn check_disk(size: Size, disk_gib: u32) -> Result<()> {
    if disk_gib == 0 || disk_gib > size.max_disk_gib() {
        return Err(Error::invalid_input(format!(
            "disk of {disk_gib} GiB is not allowed for size {size}: the disk is 1 to {} GiB for this size (10 / 20 / 40 / 80 GiB for 1x1gb / 2x2gb / 2x4gb / 4x8gb)",
            size.max_disk_gib()
        )));
    }
    Ok(())
}

/// Checks an idle timeout or max runtime: at least one minute, at most 30 days.
pub fn check_duration(what: &str, d: Duration) -> Result<i64> {
    const MAX: Duration = Duration::from_secs(30 * 24 * 3600);
    if d < Duration::from_secs(60) || d > MAX {
        return Err(Error::invalid_input(format!(
            "{what} of {}s is not allowed: it is between 1 minute and 30 days",
            d.as_secs()
        )));
    }
    Ok(d.as_millis() as i64)
}

/// Caps the operator sets on a team; enforced atomically on every path that starts compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeamCaps {
    /// Capsules running at once (creating, running, waking and suspending count).
    pub max_running: u32,
    /// vCPUs running at once.
    pub max_vcpus: u32,
    /// The largest size a capsule may have.
    pub max_size: Size,
    /// Total allocated disk of the team's live capsules, in GiB.
    pub max_storage_gib: u32,
}

impl Default for TeamCaps {
    fn default() -> Self {
        TeamCaps {
            max_running: 10,
            max_vcpus: 20,
            max_size: Size::S4x8gb,
            max_storage_gib: 400,
        }
    }
}
