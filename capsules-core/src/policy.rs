//! The one enforcement point: `check(principal, action, target)`. Every `Capsules` operation calls
//! it after authentication and before touching the ledger or the backend.

use crate::error::{Error, Result};
use crate::tokens::{Principal, Scope};
use crate::types::{CapsuleId, CapsuleName, MicroCredits, NetworkPolicy, Size, TeamId, UrlAccess};

/// What the caller wants to do (with the details policy needs to decide).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action<'a> {
    /// status, usage, events, logs, processes, file reads.
    Read,
    /// List capsules (filtered by prefix afterwards).
    List,
    Create {
        size: Size,
        credit_limit: MicroCredits,
        network: &'a NetworkPolicy,
    },
    /// exec, console, file writes, spawn/signal, connect, sleep, wake, restart, terminate.
    Write,
    /// Change limits (credit limit, idle timeout, max runtime, network policy).
    UpdateLimits {
        credit_limit: Option<MicroCredits>,
        network: Option<&'a NetworkPolicy>,
    },
    Expose {
        access: UrlAccess,
    },
    /// Open the capsule's public URL (token access).
    Preview,
    /// Mint a preview token for the capsule.
    MintPreview,
    MintToken,
    ListTokens,
    RevokeToken,
    ReadBilling,
    /// Operator: create teams, set caps, grant credits, list teams.
    Operate,
}

impl Action<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::List => "list",
            Action::Create { .. } => "create",
            Action::Write => "write",
            Action::UpdateLimits { .. } => "update_limits",
            Action::Expose { .. } => "expose",
            Action::Preview => "preview",
            Action::MintPreview => "mint_preview",
            Action::MintToken => "mint_token",
            Action::ListTokens => "list_tokens",
            Action::RevokeToken => "revoke_token",
            Action::ReadBilling => "read_billing",
            Action::Operate => "operate",
        }
    }
}

/// What the action is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// One capsule (by its resolved name and id; `id` is `None` before it exists).
    Capsule {
        team: &'a TeamId,
        name: &'a CapsuleName,
        id: Option<&'a CapsuleId>,
    },
    /// A team as a whole (list, billing, tokens).
    Team(&'a TeamId),
    /// Server-wide (operator calls).
    Server,
}

fn need(p: &Principal, scope: Scope, what: &str) -> Result<()> {
    if p.has(scope) {
        Ok(())
    } else {
        Err(Error::permission_denied(format!(
            "{what} needs the {scope} scope, which this token does not have"
        )))
    }
}

/// Whether `name` is within the principal's prefix.
pub fn in_reach(p: &Principal, name: &CapsuleName) -> bool {
    p.prefix.as_deref().is_none_or(|pre| name.as_str().starts_with(pre))
}

/// Decides. `Ok(())` means the backend and ledger may be touched.
pub fn check(p: &Principal, action: &Action<'_>, target: Target<'_>) -> Result<()> {
    // Operator calls are server-wide; the operator is outside every team.
    if let Action::Operate = action {
        return need(p, Scope::Operator, "managing teams and grants");
    }
    if p.is_operator() {
        return Err(Error::permission_denied(
            "the operator token manages teams and grants only; use a team token for capsules",
        ));
    }
    let team = match target {
        Target::Capsule { team, .. } | Target::Team(team) => team,
        Target::Server => return Err(Error::permission_denied("this call needs the operator scope")),
    };
    if p.team.as_ref() != Some(team) {
        // Do not reveal other teams' capsules.
        return Err(Error::not_found("no such capsule or resource in this token's team"));
    }
    if let Target::Capsule { name, id, .. } = target {
        if let Some(cap) = &p.capsule {
            if id != Some(cap) || !matches!(action, Action::Preview) {
                return Err(Error::permission_denied(
                    "a preview token opens its one capsule's URL and nothing else",
                ));
            }
            return Ok(());
        }
        if !in_reach(p, name) {
            return Err(Error::permission_denied(format!(
                "capsule {name:?} is outside this token's name prefix {:?}",
                p.prefix.as_deref().unwrap_or("")
            )));
        }
    } else if p.capsule.is_some() {
        return Err(Error::permission_denied(
            "a preview token opens its one capsule's URL and nothing else",
        ));
    }
    match action {
        Action::Read | Action::List => need(p, Scope::CapsulesRead, "reading capsules"),
        Action::Preview => need(p, Scope::CapsulesRead, "opening a capsule's URL"),
        Action::MintPreview => need(p, Scope::CapsulesRead, "minting a preview token"),
        Action::Write => need(p, Scope::CapsulesWrite, "changing capsules"),
        Action::Create {
            size,
            credit_limit,
            network,
        } => {
            need(p, Scope::CapsulesWrite, "creating capsules")?;
            if let Some(sizes) = &p.sizes
                && !sizes.contains(size)
            {
                let list: Vec<&str> = sizes.iter().map(|s| s.as_str()).collect();
                return Err(Error::permission_denied(format!(
                    "size {size} is not in this token's sizes ({})",
                    list.join(", ")
                )));
            }
            check_credit_cap(p, *credit_limit)?;
            check_network(p, network)
        }
        Action::UpdateLimits { credit_limit, network } => {
            need(p, Scope::CapsulesWrite, "changing limits")?;
            if let Some(c) = credit_limit {
                check_credit_cap(p, *c)?;
            }
            if let Some(n) = network {
                check_network(p, n)?;
            }
            Ok(())
        }
        Action::Expose { access } => {
            need(p, Scope::CapsulesWrite, "exposing a URL")?;
            if *access == UrlAccess::Public {
                need(p, Scope::UrlsPublic, "a public URL")?;
            }
            Ok(())
        }
        Action::MintToken | Action::ListTokens | Action::RevokeToken => need(p, Scope::TokensWrite, "managing tokens"),
        Action::ReadBilling => need(p, Scope::BillingRead, "reading the ledger"),
        Action::Operate => unreachable!("handled above"),
    }
}

fn check_credit_cap(p: &Principal, limit: MicroCredits) -> Result<()> {
    if let Some(cap) = p.max_credit_limit
        && limit > cap
    {
        return Err(Error::permission_denied(format!(
            "credit limit {limit} is above this token's max credit limit {cap}"
        )));
    }
    Ok(())
}

fn check_network(p: &Principal, n: &NetworkPolicy) -> Result<()> {
    if n.reaches_private() {
        need(
            p,
            Scope::NetworkPrivate,
            "an allow list with private or blocked addresses",
        )?;
    }
    Ok(())
}
