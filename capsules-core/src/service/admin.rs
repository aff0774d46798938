//! Bootstrap, the operator's calls, and token management.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::{Inner, traced};
use crate::error::{Error, Result};
use crate::events::{EventKind, NewEvent};
use crate::ledger::{LedgerEntry, NewEntry};
use crate::policy::{Action, Target};
use crate::records::TeamRecord;
use crate::tokens::{self, MintedToken, Principal, Scope, TokenRecord, TokenSpec};
use crate::types::{MicroCredits, ONBOARDING_GRANT, TeamCaps, TeamId, TeamName, TokenId};

use super::args::Arg;

/// What [`Capsules::bootstrap`](super::Capsules::bootstrap) returns. The secrets are shown once.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    pub operator: MintedToken,
    pub team: TeamRecord,
    pub owner: MintedToken,
}

/// A team created by the operator, with its owner token (scope `admin`), shown once.
#[derive(Debug, Clone)]
pub struct NewTeam {
    pub team: TeamRecord,
    pub owner: MintedToken,
}

fn new_token(
    team: Option<&TeamId>,
    parent: Option<&TokenId>,
    spec: &TokenSpec,
    expires: Option<i64>,
    now: i64,
) -> Result<MintedToken> {
    let (id, secret, hash) = tokens::generate_secret()?;
    let record = TokenRecord {
        id: id.clone(),
        team: team.cloned(),
        parent: parent.cloned(),
        scopes: spec.scopes.clone(),
        prefix: spec.prefix.clone(),
        sizes: spec.sizes.clone(),
        max_credit_limit: spec.max_credit_limit,
        expires_at_ms: expires,
        capsule: spec.capsule.clone(),
        label: spec.label.clone(),
        secret_hash: hash,
        created_at_ms: now,
        revoked_at_ms: None,
    };
    Ok(MintedToken { id, secret, record })
}

fn team_with_owner(name: &str, now: i64) -> Result<(TeamRecord, MintedToken, NewEntry)> {
    let name = TeamName::new(name)?;
    let team = TeamRecord {
        id: TeamId::generate(),
        name,
        caps: TeamCaps::default(),
        created_at_ms: now,
    };
    let owner = new_token(
        Some(&team.id),
        None,
        &TokenSpec::new([Scope::Admin]).label("owner"),
        None,
        now,
    )?;
    let grant = NewEntry::grant(now, &team.id, ONBOARDING_GRANT, "onboarding grant");
    Ok((team, owner, grant))
}

pub(super) async fn bootstrap(inner: &Arc<Inner>, team_name: &str) -> Result<Bootstrapped> {
    traced("bootstrap", async {
        let now = inner.now();
        let (team, owner, grant) = team_with_owner(team_name, now)?;
        let operator = new_token(
            None,
            None,
            &TokenSpec::new([Scope::Operator]).label("operator"),
            None,
            now,
        )?;
        inner
            .store
            .bootstrap(operator.record.clone(), team.clone(), owner.record.clone(), grant)
            .await?;
        Ok(Bootstrapped { operator, team, owner })
    })
    .await
}

/// The operator's calls: teams, caps, grants. Every call checks the `operator` scope.
#[derive(Debug, Clone)]
pub struct Operator {
    inner: Arc<Inner>,
    secret: String,
}

impl Operator {
    pub(super) fn new(inner: Arc<Inner>, secret: &str) -> Self {
        Operator {
            inner,
            secret: secret.to_owned(),
        }
    }

    async fn principal(&self) -> Result<Principal> {
        let p = self.inner.authenticate(&self.secret).await?;
        self.inner.check(&p, &Action::Operate, Target::Server).await?;
        Ok(p)
    }

    async fn team_id(&self, team: &str) -> Result<TeamRecord> {
        let r = if team.contains('_') {
            self.inner.store.team(&TeamId::parse(team)?).await?
        } else {
            self.inner.store.team_by_name(&TeamName::new(team)?).await?
        };
        r.ok_or_else(|| Error::not_found(format!("team {team} does not exist")))
    }

    /// A new team with its owner token and the one-time 5.00 onboarding grant.
    pub async fn create_team(&self, name: &str) -> Result<NewTeam> {
        traced("create_team", async {
            self.principal().await?;
            let now = self.inner.now();
            let (team, owner, grant) = team_with_owner(name, now)?;
            self.inner
                .store
                .create_team(team.clone(), owner.record.clone(), grant)
                .await?;
            Ok(NewTeam { team, owner })
        })
        .await
    }

    /// Sets a team's caps (by name or id).
    pub async fn set_caps(&self, team: &str, caps: TeamCaps) -> Result<TeamRecord> {
        traced("set_team_caps", async {
            let p = self.principal().await?;
            if caps.max_running == 0 || caps.max_vcpus == 0 {
                return Err(Error::invalid_input(
                    "team caps of 0 running capsules or vCPUs are not allowed; suspend tokens instead",
                ));
            }
            let t = self.team_id(team).await?;
            let ev = NewEvent::new(self.inner.now(), EventKind::TeamCapsSet { caps })
                .team(&t.id)
                .token(Some(&p.token));
            self.inner.store.set_team_caps(&t.id, caps, ev).await
        })
        .await
    }

    /// Grants credit to a team (a `grant` entry with the reason).
    pub async fn grant(&self, team: &str, amount: impl Arg<MicroCredits>, reason: &str) -> Result<LedgerEntry> {
        let amount = amount.into_arg();
        traced("grant", async {
            let p = self.principal().await?;
            let amount = amount?;
            if amount <= MicroCredits::ZERO {
                return Err(Error::invalid_input("a grant is a positive amount of credits"));
            }
            if reason.trim().is_empty() {
                return Err(Error::invalid_input("a grant needs a reason"));
            }
            let t = self.team_id(team).await?;
            let now = self.inner.now();
            let ev = NewEvent::new(
                now,
                EventKind::Granted {
                    amount,
                    reason: reason.to_owned(),
                },
            )
            .team(&t.id)
            .token(Some(&p.token));
            self.inner
                .store
                .append_entry(NewEntry::grant(now, &t.id, amount, reason), Some(ev))
                .await
        })
        .await
    }

    pub async fn teams(&self) -> Result<Vec<TeamRecord>> {
        traced("list_teams", async {
            self.principal().await?;
            self.inner.store.list_teams().await
        })
        .await
    }

    pub async fn balance(&self, team: &str) -> Result<MicroCredits> {
        traced("team_balance", async {
            self.principal().await?;
            let t = self.team_id(team).await?;
            self.inner.store.balance(&t.id).await
        })
        .await
    }
}

/// Token management for one caller (`tokens:write` or `admin`).
#[derive(Debug, Clone)]
pub struct Tokens {
    inner: Arc<Inner>,
    secret: String,
}

impl Tokens {
    pub(super) fn new(inner: Arc<Inner>, secret: &str) -> Self {
        Tokens {
            inner,
            secret: secret.to_owned(),
        }
    }

    async fn principal(&self, action: Action<'_>) -> Result<Principal> {
        let p = self.inner.authenticate(&self.secret).await?;
        let team = p.team.clone().ok_or_else(|| {
            Error::permission_denied("the operator token mints owner tokens only through create_team")
        })?;
        self.inner.check(&p, &action, Target::Team(&team)).await?;
        Ok(p)
    }

    /// Mints a token no broader than the caller's (scopes, prefix, sizes, credit cap, expiry).
    pub async fn create(&self, spec: TokenSpec) -> Result<MintedToken> {
        traced("mint_token", async {
            let p = self.principal(Action::MintToken).await?;
            mint(&self.inner, &p, spec).await
        })
        .await
    }

    /// Who the caller is.
    pub async fn whoami(&self) -> Result<Principal> {
        self.inner.authenticate(&self.secret).await
    }

    /// `admin`: every token of the team; `tokens:write`: the ones it minted and their descendants.
    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        traced("list_tokens", async {
            let p = self.principal(Action::ListTokens).await?;
            self.visible(&p).await
        })
        .await
    }

    async fn visible(&self, p: &Principal) -> Result<Vec<TokenRecord>> {
        let team = p.team.as_ref().expect("checked: a team token");
        let all = self.inner.store.list_tokens(team).await?;
        if p.scopes.contains(&Scope::Admin) {
            return Ok(all);
        }
        let mut kids: HashMap<&TokenId, Vec<&TokenRecord>> = HashMap::new();
        for t in &all {
            if let Some(parent) = &t.parent {
                kids.entry(parent).or_default().push(t);
            }
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![&p.token];
        while let Some(id) = stack.pop() {
            for k in kids.get(id).into_iter().flatten() {
                if seen.insert(&k.id) {
                    out.push((*k).clone());
                    stack.push(&k.id);
                }
            }
        }
        out.sort_by_key(|t| t.created_at_ms);
        Ok(out)
    }

    /// Revokes a token and all its descendants at once. Returns the ids revoked.
    pub async fn revoke(&self, id: &str) -> Result<Vec<TokenId>> {
        traced("revoke_token", async {
            let p = self.principal(Action::RevokeToken).await?;
            let id = TokenId::parse(id)?;
            let allowed = id == p.token || self.visible(&p).await?.iter().any(|t| t.id == id);
            if !allowed {
                return Err(Error::not_found(format!(
                    "token {id} is not one this token minted (or a descendant of one)"
                )));
            }
            self.inner
                .store
                .revoke_token(&id, self.inner.now(), Some(p.token.clone()))
                .await
        })
        .await
    }
}

/// Mints `spec` under `parent` after validation and attenuation.
pub(super) async fn mint(inner: &Inner, parent: &Principal, mut spec: TokenSpec) -> Result<MintedToken> {
    spec.validate()?;
    let now = inner.now();
    let expiry = match (spec.expires_at_ms, spec.ttl_ms) {
        (Some(a), Some(t)) => Some(a.min(now + t)),
        (a, t) => a.or(t.map(|t| now + t)),
    };
    if expiry.is_some_and(|e| e <= now) {
        return Err(Error::invalid_input("the token would already be expired"));
    }
    tokens::check_attenuation(parent, &spec, expiry)?;
    spec.ttl_ms = None;
    let team = parent.team.as_ref();
    let t = new_token(team, Some(&parent.token), &spec, expiry, now)?;
    let mut ev = NewEvent::new(
        now,
        EventKind::TokenMinted {
            id: t.id.clone(),
            scopes: spec
                .scopes
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        },
    )
    .token(Some(&parent.token));
    ev.team = team.cloned();
    ev.capsule = spec.capsule.clone();
    inner.store.insert_token(t.record.clone(), ev).await?;
    Ok(t)
}
