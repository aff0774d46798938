//! # capsules-client
//!
//! The HTTP client of the Capsules example server's `/v1` API, with the same call shapes as
//! [`capsules_core::Capsules`]: the quickstart reads the same against a server.
//!
//! ```no_run
//! use capsules_client::Capsules;
//! use capsules_core::{Scope, TokenSpec};
//!
//! # async fn quickstart(owner_token: &str) -> capsules_core::Result<()> {
//! let capsules = Capsules::new("http://127.0.0.1:7878")?;
//! let agent = capsules
//!     .tokens(owner_token)
//!     .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
//!     .await?;
//! let cap = capsules.connect(&agent.secret)?.create("agent-pr-482").size("2x2gb").credit_limit("2.00").await?;
//! cap.upload_dir("examples/quickstart/project", "/workspace").await?;
//! let out = cap.exec(["npm", "test"]).await?;
//! println!("exit {}: {}", out.exit_code(), out.stdout_lossy());
//! cap.terminate().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Errors come back as [`capsules_core::Error`] with the server's kind and message; a server that
//! cannot be reached is `Unavailable` with the cause in the source chain.

mod capsule;
mod console;
mod http;
pub mod wire;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use capsules_core::records::{CapsuleRecord, TeamRecord};
use capsules_core::types::TeamCaps;
use capsules_core::{Error, Result, TokenSpec};
use reqwest::Method;

pub use capsule::{CapsuleHandle, ExecBuilder, UpdateBuilder};
pub use capsules_core::ListOptions;
pub use console::{ConsoleEvent, ConsoleReceiver, ConsoleSender, ConsoleSession, MAX_CONSOLE_SIDE};
use http::Http;
use wire::{
    CapsuleCreate, CapsulePage, Events, GrantRequest, Ledger, Revoked, TeamCreate, TeamCreated, TeamUsage, TokenCreate,
    TokenCreated, TokenInfo, TokenList,
};

/// The default address of the example server.
pub const DEFAULT_API: &str = "http://127.0.0.1:7878";

/// The front door, remote: one server. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Capsules {
    http: Http,
}

impl Capsules {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:7878`; `http` only).
    pub fn new(base: impl AsRef<str>) -> Result<Self> {
        Ok(Capsules {
            http: Http::new(base.as_ref())?,
        })
    }

    /// The server's address.
    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// A client acting with `secret`.
    pub fn connect(&self, secret: impl AsRef<str>) -> Result<Client> {
        capsules_core::tokens::parse_secret(secret.as_ref())?;
        Ok(Client {
            http: self.http.clone(),
            secret: secret.as_ref().to_owned(),
        })
    }

    /// Token management with `secret` (`tokens:write` or `admin`).
    pub fn tokens(&self, secret: impl AsRef<str>) -> Tokens {
        Tokens {
            http: self.http.clone(),
            secret: secret.as_ref().to_owned(),
        }
    }

    /// Operator calls (teams, caps, grants) with the operator's `secret`.
    pub fn operator(&self, secret: impl AsRef<str>) -> Operator {
        Operator {
            http: self.http.clone(),
            secret: secret.as_ref().to_owned(),
        }
    }
}

/// Token management for one caller.
#[derive(Clone)]
pub struct Tokens {
    http: Http,
    secret: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    /// Mints a token no broader than the caller's. The secret is in the answer, once.
    pub async fn create(&self, spec: TokenSpec) -> Result<TokenCreated> {
        let body = TokenCreate {
            scopes: spec.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            prefix: spec.prefix.clone(),
            sizes: spec
                .sizes
                .as_ref()
                .map(|s| s.iter().map(|z| z.as_str().to_owned()).collect()),
            max_credit_limit: spec.max_credit_limit.map(|c| c.to_string()),
            expires_in_secs: spec.ttl_ms.map(|t| (t.max(0) as u64).div_ceil(1000)),
            label: spec.label.clone(),
        };
        if spec.expires_at_ms.is_some() {
            return Err(Error::invalid_input(
                "the HTTP API takes an expiry as a duration (TokenSpec::ttl), not an instant",
            ));
        }
        self.http
            .json(Method::POST, "/v1/tokens", &self.secret, Some(&body))
            .await
    }

    /// The tokens this caller may see.
    pub async fn list(&self) -> Result<Vec<TokenInfo>> {
        let l: TokenList = self
            .http
            .json(Method::GET, "/v1/tokens", &self.secret, None::<&()>)
            .await?;
        Ok(l.tokens)
    }

    /// Revokes a token and its descendants; returns the ids revoked.
    pub async fn revoke(&self, id: &str) -> Result<Vec<capsules_core::types::TokenId>> {
        let path = format!("/v1/tokens/{}", http::seg(id));
        let r: Revoked = self.http.json(Method::DELETE, &path, &self.secret, None::<&()>).await?;
        Ok(r.revoked)
    }
}

/// The operator's calls.
#[derive(Clone)]
pub struct Operator {
    http: Http,
    secret: String,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Operator(..)")
    }
}

impl Operator {
    /// A new team with its owner token (shown once) and the onboarding grant.
    pub async fn create_team(&self, name: &str) -> Result<TeamCreated> {
        let body = TeamCreate { name: name.to_owned() };
        self.http
            .json(Method::POST, "/v1/teams", &self.secret, Some(&body))
            .await
    }

    /// Grants `amount` credits (decimal, `"10.00"`) to a team, with a reason.
    pub async fn grant(&self, team: &str, amount: &str, reason: &str) -> Result<capsules_core::ledger::LedgerEntry> {
        let body = GrantRequest {
            amount: amount.to_owned(),
            reason: reason.to_owned(),
        };
        let path = format!("/v1/teams/{}/grants", http::seg(team));
        self.http.json(Method::POST, &path, &self.secret, Some(&body)).await
    }

    /// Sets a team's caps.
    pub async fn set_caps(&self, team: &str, caps: TeamCaps) -> Result<TeamRecord> {
        let path = format!("/v1/teams/{}/caps", http::seg(team));
        self.http.json(Method::PUT, &path, &self.secret, Some(&caps)).await
    }
}

/// A client acting with one token.
#[derive(Clone)]
pub struct Client {
    http: Http,
    secret: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client(..)")
    }
}

impl Client {
    /// Starts a create; set options, then `.await` it.
    pub fn create(&self, name: impl Into<String>) -> CreateBuilder {
        CreateBuilder {
            client: self.clone(),
            body: CapsuleCreate {
                name: name.into(),
                ..CapsuleCreate::default()
            },
            idempotency_key: None,
        }
    }

    /// A handle to a capsule by name or id. Checked when used.
    pub fn capsule(&self, name_or_id: &str) -> Result<CapsuleHandle> {
        capsules_core::types::CapsuleRef::parse(name_or_id)?;
        Ok(CapsuleHandle::new(self.http.clone(), &self.secret, name_or_id))
    }

    /// Every capsule in reach (all pages), live ones unless told otherwise.
    pub async fn list(&self) -> Result<Vec<CapsuleRecord>> {
        self.list_with(ListOptions::default()).await
    }

    pub async fn list_with(&self, opts: ListOptions) -> Result<Vec<CapsuleRecord>> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_page(opts, 100, cursor.as_deref()).await?;
            out.extend(page.capsules);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// One page of the list.
    pub async fn list_page(&self, opts: ListOptions, limit: u32, cursor: Option<&str>) -> Result<CapsulePage> {
        let mut path = format!("/v1/capsules?limit={limit}");
        if opts.include_terminated {
            path.push_str("&include_terminated=true");
        }
        if let Some(c) = cursor {
            path.push_str("&cursor=");
            path.push_str(&http::seg(c));
        }
        self.http.json(Method::GET, &path, &self.secret, None::<&()>).await
    }

    /// The team's balance (`billing:read`).
    pub async fn balance(&self) -> Result<capsules_core::MicroCredits> {
        Ok(self.usage().await?.balance)
    }

    /// The team's ledger (`billing:read`).
    pub async fn ledger(&self) -> Result<Ledger> {
        self.http
            .json(Method::GET, "/v1/team/ledger", &self.secret, None::<&()>)
            .await
    }

    /// The team's usage and balance (`billing:read`).
    pub async fn usage(&self) -> Result<TeamUsage> {
        self.http
            .json(Method::GET, "/v1/team/usage", &self.secret, None::<&()>)
            .await
    }

    /// The team's audit trail.
    pub async fn team_events(&self) -> Result<Vec<capsules_core::events::Event>> {
        let e: Events = self
            .http
            .json(Method::GET, "/v1/team/events", &self.secret, None::<&()>)
            .await?;
        Ok(e.events)
    }
}

/// A create in preparation; `.await` runs it.
#[must_use = "a create does nothing until awaited"]
#[derive(Debug)]
pub struct CreateBuilder {
    client: Client,
    body: CapsuleCreate,
    idempotency_key: Option<String>,
}

impl CreateBuilder {
    /// `1x1gb` (default), `2x2gb`, `2x4gb`, `4x8gb`.
    pub fn size(mut self, size: impl Into<String>) -> Self {
        self.body.size = Some(size.into());
        self
    }
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.body.image = Some(image.into());
        self
    }
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.body.region = Some(region.into());
        self
    }
    /// In credits (`"2.00"`).
    pub fn credit_limit(mut self, limit: impl Into<String>) -> Self {
        self.body.credit_limit = Some(limit.into());
        self
    }
    pub fn disk_gib(mut self, gib: u32) -> Self {
        self.body.disk_gib = Some(gib);
        self
    }
    pub fn network(mut self, policy: impl Into<String>) -> Self {
        self.body.network = Some(policy.into());
        self
    }
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.body.idle_timeout_secs = Some(d.as_secs());
        self
    }
    pub fn max_runtime(mut self, d: Duration) -> Self {
        self.body.max_runtime_secs = Some(d.as_secs());
        self
    }
    /// Retrying with the same key answers with the capsule the first call created.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    async fn run(self) -> Result<CapsuleHandle> {
        let c = self.client;
        let mut req = c.http.request(Method::POST, "/v1/capsules", &c.secret).json(&self.body);
        if let Some(k) = &self.idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = c.http.send(req).await?;
        let rec: CapsuleRecord = http::read_json(resp).await?;
        Ok(CapsuleHandle::with_record(c.http.clone(), &c.secret, rec))
    }
}

impl IntoFuture for CreateBuilder {
    type Output = Result<CapsuleHandle>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<CapsuleHandle>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
