//! The JSON shapes of the `/v1` API, shared by the server (which parses requests with
//! `deny_unknown_fields`) and this client. Money travels as decimal strings (`"2.00"`) in requests
//! and as integer micro-credits in responses (no floats anywhere money flows).

use std::collections::{BTreeMap, BTreeSet};

use capsules_core::backend::{ExitStatus, FileStat};
use capsules_core::events::Event;
use capsules_core::ledger::{LedgerEntry, Usage};
use capsules_core::records::{CapsuleRecord, TeamRecord};
use capsules_core::tokens::{Scope, TokenRecord};
use capsules_core::types::{CapsuleId, MicroCredits, PublicUrl, Size, TeamId, TokenId, UrlAccess};
use capsules_core::{Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// `{"error": {"kind": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub kind: String,
    pub message: String,
}

impl ErrorBody {
    pub fn from_error(e: &Error) -> Self {
        ErrorBody {
            error: ErrorDetail {
                kind: e.kind().as_str().to_owned(),
                message: e.message().to_owned(),
            },
        }
    }

    /// Back into an [`Error`] of the same kind and message (an unknown kind is `Internal`).
    pub fn into_error(self) -> Error {
        Error::new(kind_from_str(&self.error.kind), self.error.message)
    }
}

/// The inverse of [`ErrorKind::as_str`].
pub fn kind_from_str(s: &str) -> ErrorKind {
    match s {
        "invalid_input" => ErrorKind::InvalidInput,
        "unauthenticated" => ErrorKind::Unauthenticated,
        "permission_denied" => ErrorKind::PermissionDenied,
        "not_found" => ErrorKind::NotFound,
        "already_exists" => ErrorKind::AlreadyExists,
        "conflict" => ErrorKind::Conflict,
        "limit_exceeded" => ErrorKind::LimitExceeded,
        "insufficient_credits" => ErrorKind::InsufficientCredits,
        "unsupported" => ErrorKind::Unsupported,
        "unavailable" => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<Vec<String>>,
    /// Decimal credits, e.g. `"2.00"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_credit_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A token as listed (never its secret or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: TokenId,
    pub team: Option<TeamId>,
    pub parent: Option<TokenId>,
    pub scopes: BTreeSet<Scope>,
    pub prefix: Option<String>,
    pub sizes: Option<BTreeSet<Size>>,
    pub max_credit_limit: Option<MicroCredits>,
    pub expires_at_ms: Option<i64>,
    pub capsule: Option<CapsuleId>,
    pub label: Option<String>,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(r: &TokenRecord) -> Self {
        TokenInfo {
            id: r.id.clone(),
            team: r.team.clone(),
            parent: r.parent.clone(),
            scopes: r.scopes.clone(),
            prefix: r.prefix.clone(),
            sizes: r.sizes.clone(),
            max_credit_limit: r.max_credit_limit,
            expires_at_ms: r.expires_at_ms,
            capsule: r.capsule.clone(),
            label: r.label.clone(),
            created_at_ms: r.created_at_ms,
            revoked_at_ms: r.revoked_at_ms,
        }
    }
}

/// A minted token: the secret is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: TokenId,
    pub secret: String,
    pub token: TokenInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub revoked: Vec<TokenId>,
}

/// `POST /v1/capsules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsuleCreate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Decimal credits, e.g. `"2.00"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u32>,
    /// `internet`, `none`, `allow:<cidr or domain>,...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime_secs: Option<u64>,
}

/// `PATCH /v1/capsules/{ref}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsuleUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// One page of `GET /v1/capsules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsulePage {
    pub capsules: Vec<CapsuleRecord>,
    /// Pass as `?cursor=` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// The spec of a command: `POST .../exec` (JSON body, or the `Capsule-Exec` header with stdin as
/// the raw body) and `POST .../processes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_cap: Option<u64>,
}

/// One NDJSON line of an exec or process output stream. Output bytes are base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecLine {
    Stdout(String),
    Stderr(String),
    Exit(ExitStatus),
    Error(ErrorDetail),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub entries: Vec<FileStat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub bytes: u64,
}

/// `PUT /v1/capsules/{ref}/url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    pub port: u16,
    /// `token` (default) or `public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
}

/// A capsule's public URL as the API shows it: the settings and `href`, its absolute address
/// (`http(s)://<host label>.<preview domain>:<server port>/`). The `url` of capsule JSON and the
/// answer of `PUT /v1/capsules/{ref}/url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedUrl {
    pub port: u16,
    pub access: UrlAccess,
    pub host_label: String,
    pub href: String,
}

impl ExposedUrl {
    /// The settings without the address.
    pub fn public_url(&self) -> PublicUrl {
        PublicUrl {
            port: self.port,
            access: self.access,
            host_label: self.host_label.clone(),
        }
    }

    /// The address a browser opens once with a preview token: `href?capsule_token=<secret>` (the
    /// proxy turns it into a cookie and redirects to `href`).
    pub fn browser_url(&self, preview_secret: &str) -> String {
        format!("{}?capsule_token={preview_secret}", self.href)
    }
}

/// `POST /v1/capsules/{ref}/preview-token` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewTokenRequest {
    /// Lifetime in seconds: 1 to 604800 (7 days); default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A capsule's usage trail and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleUsage {
    pub capsule: CapsuleRecord,
    pub usage: Usage,
    pub entries: Vec<LedgerEntry>,
    pub events: Vec<Event>,
}

/// A team's usage and balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamUsage {
    pub balance: MicroCredits,
    pub running: u32,
    pub running_vcpus: u32,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Events {
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub balance: MicroCredits,
    pub entries: Vec<LedgerEntry>,
}

/// `POST /v1/teams`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamCreate {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamCreated {
    pub team: TeamRecord,
    pub owner: TokenCreated,
}

/// `POST /v1/teams/{team}/grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Decimal credits, e.g. `"10.00"`.
    pub amount: String,
    pub reason: String,
}

// ---- console ----

/// `POST /v1/capsules/{capsule}/console/ticket` → 201: a single-use ticket for the console
/// WebSocket (`?ticket=`), for clients that cannot send an `Authorization` header (browsers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleTicket {
    /// `ct_` + 64 hex characters (32 random bytes).
    pub ticket: String,
    pub expires_in_secs: u64,
}

/// A text frame from the client on the console WebSocket (binary frames are terminal input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsoleControl {
    /// `{"type":"resize","cols":N,"rows":N}` (1-1000 each).
    Resize { cols: u16, rows: u16 },
}

/// A text frame from the server on the console WebSocket (binary frames are terminal output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConsoleNotice {
    /// `{"type":"exit","code":N}`: the program ended (128 + signal for a signal); the server
    /// closes the socket next.
    Exit { code: i32 },
    /// `{"type":"error","message":"..."}` (a refused control message; the session goes on), or
    /// `{"type":"error","kind":"conflict","message":"..."}` (the session ended: the server
    /// closes the socket next; `kind` as in the API's error bodies).
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        message: String,
    },
}
