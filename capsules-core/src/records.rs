//! What the store keeps about teams and capsules.

use crate::state::CapsuleState;
use crate::types::{
    CapsuleId, CapsuleLimits, CapsuleName, Image, MicroCredits, NetworkPolicy, PublicUrl, Region, Size, TeamCaps,
    TeamId, TeamName, TokenId,
};

/// A team: owns capsules, tokens and a balance (the sum of its ledger entries).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeamRecord {
    pub id: TeamId,
    pub name: TeamName,
    pub caps: TeamCaps,
    pub created_at_ms: i64,
}

/// Metering state of one capsule. Every field is integer; see DESIGN.md §3 Metering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MeterState {
    /// Start of the current run (creating/waking/running), ms.
    pub run_started_ms: Option<i64>,
    /// Minutes of the current run already charged (minute k starts at run start + 60 k s).
    pub run_minutes_charged: u64,
    /// Running time of finished runs, ms (for the max runtime).
    pub runtime_before_ms: i64,
    /// Compute minutes charged over the whole life.
    pub minutes_total: u64,
    /// Storage hours already charged (hour k starts at create + 3600 k s).
    pub storage_hours_charged: u64,
    /// Preview traffic bytes, both directions, over the whole life.
    pub traffic_bytes: u64,
    /// MiB of traffic already charged.
    pub traffic_mib_charged: u64,
    /// Everything charged to this capsule so far (checked against its credit limit).
    pub spent: MicroCredits,
}

/// One capsule, by immutable id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapsuleRecord {
    pub id: CapsuleId,
    pub team: TeamId,
    pub name: CapsuleName,
    pub size: Size,
    pub image: Image,
    pub region: Region,
    pub disk_gib: u32,
    pub network: NetworkPolicy,
    pub limits: CapsuleLimits,
    pub url: Option<PublicUrl>,
    /// Assigned at the first expose and kept for the capsule's life (also across unexpose).
    pub host_label: Option<String>,
    pub state: CapsuleState,
    /// Why it is in this state (`credit_limit_reached`, `idle_timeout`, `requested`, ...).
    pub state_reason: String,
    pub created_by: TokenId,
    pub created_at_ms: i64,
    pub terminated_at_ms: Option<i64>,
    pub meter: MeterState,
}

impl CapsuleRecord {
    /// Running time so far at `now`, ms.
    pub fn runtime_ms(&self, now_ms: i64) -> i64 {
        self.meter.runtime_before_ms + self.meter.run_started_ms.map_or(0, |s| (now_ms - s).max(0))
    }
}

/// What `create_capsule` needs (validated and authorized by core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCapsule {
    pub id: CapsuleId,
    pub team: TeamId,
    pub name: CapsuleName,
    pub size: Size,
    pub image: Image,
    pub region: Region,
    pub disk_gib: u32,
    pub network: NetworkPolicy,
    pub limits: CapsuleLimits,
    pub created_by: TokenId,
    pub now_ms: i64,
}

/// A change of limits after create (`None` = keep).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapsulePatch {
    pub credit_limit: Option<MicroCredits>,
    pub idle_timeout_ms: Option<i64>,
    pub max_runtime_ms: Option<i64>,
    pub network: Option<NetworkPolicy>,
}
