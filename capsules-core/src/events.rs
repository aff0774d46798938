//! The audit trail: append-only events per capsule and team.

use crate::state::CapsuleState;
use crate::types::{CapsuleId, MicroCredits, PublicUrl, TeamId, TokenId};

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    TeamCreated {
        name: String,
    },
    TeamCapsSet {
        caps: crate::types::TeamCaps,
    },
    Granted {
        amount: MicroCredits,
        reason: String,
    },
    TokenMinted {
        id: TokenId,
        scopes: Vec<String>,
    },
    TokensRevoked {
        ids: Vec<TokenId>,
    },
    Created {
        name: String,
        size: String,
        image: String,
        disk_gib: u32,
    },
    /// A state change; `reason` is e.g. `credit_limit_reached`, `idle_timeout`, `requested`.
    StateChanged {
        from: CapsuleState,
        to: CapsuleState,
        reason: String,
    },
    Exec {
        argv: Vec<String>,
        exit_code: Option<i32>,
        duration_ms: i64,
        error: Option<String>,
    },
    Spawned {
        argv: Vec<String>,
        handle: Option<String>,
    },
    Signalled {
        handle: String,
        signal: i32,
    },
    ConsoleAttached,
    ConsoleDetached {
        duration_ms: i64,
    },
    FileWritten {
        path: String,
        bytes: u64,
    },
    FilesUploaded {
        dest: String,
        bytes: u64,
    },
    FileRemoved {
        path: String,
    },
    FileRenamed {
        from: String,
        to: String,
    },
    UrlChanged {
        url: Option<PublicUrl>,
    },
    LimitsChanged {
        detail: String,
    },
    /// A policy refusal (`action` is the policy action name).
    Denied {
        action: String,
        message: String,
    },
    /// A credit limit, runtime limit, idle timeout or team cap stopped something.
    LimitReached {
        limit: String,
        detail: String,
    },
    /// The team balance could not pay (or went below zero through storage).
    InsufficientCredits {
        balance: MicroCredits,
    },
    Charged {
        what: String,
        quantity: u64,
        amount: MicroCredits,
    },
    Reconciled {
        detail: String,
    },
}

impl EventKind {
    /// Short snake-case name (`state_changed`, `exec`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::TeamCreated { .. } => "team_created",
            EventKind::TeamCapsSet { .. } => "team_caps_set",
            EventKind::Granted { .. } => "granted",
            EventKind::TokenMinted { .. } => "token_minted",
            EventKind::TokensRevoked { .. } => "tokens_revoked",
            EventKind::Created { .. } => "created",
            EventKind::StateChanged { .. } => "state_changed",
            EventKind::Exec { .. } => "exec",
            EventKind::Spawned { .. } => "spawned",
            EventKind::Signalled { .. } => "signalled",
            EventKind::ConsoleAttached => "console_attached",
            EventKind::ConsoleDetached { .. } => "console_detached",
            EventKind::FileWritten { .. } => "file_written",
            EventKind::FilesUploaded { .. } => "files_uploaded",
            EventKind::FileRemoved { .. } => "file_removed",
            EventKind::FileRenamed { .. } => "file_renamed",
            EventKind::UrlChanged { .. } => "url_changed",
            EventKind::LimitsChanged { .. } => "limits_changed",
            EventKind::Denied { .. } => "denied",
            EventKind::LimitReached { .. } => "limit_reached",
            EventKind::InsufficientCredits { .. } => "insufficient_credits",
            EventKind::Charged { .. } => "charged",
            EventKind::Reconciled { .. } => "reconciled",
        }
    }
}

/// An event to append (the store assigns the sequence number).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewEvent {
    pub at_ms: i64,
    pub team: Option<TeamId>,
    pub capsule: Option<CapsuleId>,
    pub token: Option<TokenId>,
    pub kind: EventKind,
}

impl NewEvent {
    pub fn new(at_ms: i64, kind: EventKind) -> Self {
        NewEvent {
            at_ms,
            team: None,
            capsule: None,
            token: None,
            kind,
        }
    }
    pub fn team(mut self, team: &TeamId) -> Self {
        self.team = Some(team.clone());
        self
    }
    pub fn capsule(mut self, capsule: &CapsuleId) -> Self {
        self.capsule = Some(capsule.clone());
        self
    }
    pub fn token(mut self, token: Option<&TokenId>) -> Self {
        self.token = token.cloned();
        self
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Store-wide order.
    pub seq: u64,
    #[serde(flatten)]
    pub event: NewEvent,
}

impl Event {
    pub fn kind(&self) -> &EventKind {
        &self.event.kind
    }
    /// The state-change reason or limit name, if this event has one.
    pub fn reason(&self) -> Option<&str> {
        match &self.event.kind {
            EventKind::StateChanged { reason, .. } => Some(reason),
            EventKind::LimitReached { limit, .. } => Some(limit),
            _ => None,
        }
    }
}
