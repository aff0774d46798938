//! Tokens: scopes, secrets, the stored record, the authenticated [`Principal`], and attenuation.
//!
//! A secret is `cap_<token id>_<64 hex chars>` (256 bits from the OS CSPRNG), shown once; only its
//! SHA-256 is stored (enough: the secret is high-entropy) and compared in constant time.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::types::{CapsuleId, MicroCredits, Size, TeamId, TokenId};

/// What a token may do. See DESIGN.md §3 Scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// Get, list, logs, usage of capsules in reach.
    #[serde(rename = "capsules:read")]
    CapsulesRead,
    /// Create, exec, console, files, expose, sleep, wake, terminate.
    #[serde(rename = "capsules:write")]
    CapsulesWrite,
    /// `capsules:read` + `capsules:write`; must carry a name prefix.
    #[serde(rename = "agent:write")]
    AgentWrite,
    /// Mint and revoke attenuated tokens.
    #[serde(rename = "tokens:write")]
    TokensWrite,
    /// The team ledger and balance.
    #[serde(rename = "billing:read")]
    BillingRead,
    /// An `allow` list may include addresses in the blocked ranges.
    #[serde(rename = "network:private")]
    NetworkPrivate,
    /// Expose a URL with `public` access.
    #[serde(rename = "urls:public")]
    UrlsPublic,
    /// Opens one capsule's URL and nothing else.
    #[serde(rename = "preview")]
    Preview,
    /// Everything in the team.
    #[serde(rename = "admin")]
    Admin,
    /// Teams and grants; outside every team.
    #[serde(rename = "operator")]
    Operator,
}

impl Scope {
    pub const ALL: [Scope; 10] = [
        Scope::CapsulesRead,
        Scope::CapsulesWrite,
        Scope::AgentWrite,
        Scope::TokensWrite,
        Scope::BillingRead,
        Scope::NetworkPrivate,
        Scope::UrlsPublic,
        Scope::Preview,
        Scope::Admin,
        Scope::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CapsulesRead => "capsules:read",
            Scope::CapsulesWrite => "capsules:write",
            Scope::AgentWrite => "agent:write",
            Scope::TokensWrite => "tokens:write",
            Scope::BillingRead => "billing:read",
            Scope::NetworkPrivate => "network:private",
            Scope::UrlsPublic => "urls:public",
            Scope::Preview => "preview",
            Scope::Admin => "admin",
            Scope::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Scope::ALL.iter().copied().find(|x| x.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = Scope::ALL.iter().map(|x| x.as_str()).collect();
            Error::invalid_input(format!("scope {s:?} is not known; scopes are {}", all.join(", ")))
        })
    }

    /// The base scopes this one grants (itself, expanded): `agent:write` = read + write, `admin` =
    /// every team scope except `preview`'s one-capsule restriction.
    pub fn expand(self) -> &'static [Scope] {
        match self {
            Scope::AgentWrite => &[Scope::CapsulesRead, Scope::CapsulesWrite],
            Scope::Admin => &[
                Scope::CapsulesRead,
                Scope::CapsulesWrite,
                Scope::TokensWrite,
                Scope::BillingRead,
                Scope::NetworkPrivate,
                Scope::UrlsPublic,
                Scope::Preview,
                Scope::Admin,
            ],
            Scope::CapsulesRead => &[Scope::CapsulesRead],
            Scope::CapsulesWrite => &[Scope::CapsulesWrite],
            Scope::TokensWrite => &[Scope::TokensWrite],
            Scope::BillingRead => &[Scope::BillingRead],
            Scope::NetworkPrivate => &[Scope::NetworkPrivate],
            Scope::UrlsPublic => &[Scope::UrlsPublic],
            Scope::Preview => &[Scope::Preview],
            Scope::Operator => &[Scope::Operator],
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl FromStr for Scope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// The expanded base scopes of a set.
pub fn expanded(scopes: &BTreeSet<Scope>) -> BTreeSet<Scope> {
    scopes.iter().flat_map(|s| s.expand().iter().copied()).collect()
}

/// What to mint: scopes and optional bounds. Built with chained setters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSpec {
    pub scopes: BTreeSet<Scope>,
    pub prefix: Option<String>,
    pub sizes: Option<BTreeSet<Size>>,
    pub max_credit_limit: Option<MicroCredits>,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: Option<i64>,
    /// Time to live from the mint, ms (turned into `expires_at_ms` at mint).
    pub ttl_ms: Option<i64>,
    /// A free-text label for listings.
    pub label: Option<String>,
    /// For `preview` tokens: the one capsule it opens (set by the preview mint).
    pub capsule: Option<CapsuleId>,
}

impl TokenSpec {
    pub fn new<I: IntoIterator<Item = Scope>>(scopes: I) -> Self {
        TokenSpec {
            scopes: scopes.into_iter().collect(),
            ..TokenSpec::default()
        }
    }
    /// Parses scope names (`"agent:write"`); an unknown one is `InvalidInput` listing them all.
    pub fn parse_scopes<I: IntoIterator<Item = S>, S: AsRef<str>>(scopes: I) -> Result<Self> {
        let scopes = scopes
            .into_iter()
            .map(|s| Scope::parse(s.as_ref()))
            .collect::<Result<BTreeSet<_>>>()?;
        Ok(TokenSpec {
            scopes,
            ..TokenSpec::default()
        })
    }
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }
    pub fn sizes<I: IntoIterator<Item = Size>>(mut self, sizes: I) -> Self {
        self.sizes = Some(sizes.into_iter().collect());
        self
    }
    pub fn max_credit_limit(mut self, cap: MicroCredits) -> Self {
        self.max_credit_limit = Some(cap);
        self
    }
    pub fn expires_at_ms(mut self, at: i64) -> Self {
        self.expires_at_ms = Some(at);
        self
    }
    pub fn ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ttl_ms = Some(ttl.as_millis() as i64);
        self
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Checks the spec on its own (before attenuation): scopes present, prefix well-formed,
    /// `agent:write` carries a prefix, `preview` stands alone.
    pub fn validate(&self) -> Result<()> {
        if self.scopes.is_empty() {
            return Err(Error::invalid_input("a token needs at least one scope"));
        }
        if let Some(p) = &self.prefix {
            let ok = !p.is_empty()
                && p.len() <= 62
                && p.as_bytes()[0].is_ascii_lowercase()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(Error::invalid_input(format!(
                    "prefix {p:?} is not valid: a prefix is the start of a capsule name (a-z, 0-9, '-', starting with a letter)"
                )));
            }
        }
        if self.scopes.contains(&Scope::AgentWrite) && self.prefix.is_none() {
            return Err(Error::invalid_input("an agent:write token must carry a name prefix"));
        }
        if self.scopes.contains(&Scope::Preview) && self.scopes.len() > 1 {
            return Err(Error::invalid_input("a preview token has the preview scope only"));
        }
        if self.scopes.contains(&Scope::Preview) != self.capsule.is_some() {
            return Err(Error::invalid_input(
                "a preview token is minted for one capsule (use the capsule's preview_token)",
            ));
        }
        if self.scopes.contains(&Scope::Operator) && self.scopes.len() > 1 {
            return Err(Error::invalid_input("an operator token has the operator scope only"));
        }
        if let Some(c) = self.max_credit_limit
            && c.is_negative()
        {
            return Err(Error::invalid_input("a max credit limit cannot be negative"));
        }
        if matches!(&self.sizes, Some(s) if s.is_empty()) {
            return Err(Error::invalid_input("a size allow-list cannot be empty"));
        }
        Ok(())
    }
}

/// A token as stored: everything but the secret (only its hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    /// `None` for the operator (outside every team).
    pub team: Option<TeamId>,
    /// The token that minted this one (`None` for the operator and team owner tokens).
    pub parent: Option<TokenId>,
    pub scopes: BTreeSet<Scope>,
    pub prefix: Option<String>,
    pub sizes: Option<BTreeSet<Size>>,
    pub max_credit_limit: Option<MicroCredits>,
    pub expires_at_ms: Option<i64>,
    pub capsule: Option<CapsuleId>,
    pub label: Option<String>,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl TokenRecord {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }
}

/// A secret token, shown once. Debug never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret text, for handing to the user once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}
impl fmt::Display for Secret {
    /// The secret itself (so `println!("{}", token.secret)` hands it over).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A freshly minted token: its record and its secret (the only time it is visible).
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub id: TokenId,
    pub secret: Secret,
    pub record: TokenRecord,
}

/// Generates a new id and secret; returns (id, secret, hash).
pub fn generate_secret() -> Result<(TokenId, Secret, [u8; 32])> {
    use rand::TryRngCore;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut raw)
        .map_err(|e| Error::internal("the OS random number generator failed").with_source(e))?;
    let id = TokenId::generate();
    let secret = Secret(format!("cap_{}_{}", id, hex::encode(raw)));
    let hash = hash_secret(secret.expose());
    Ok((id, secret, hash))
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Splits a secret into its token id, checking only the shape (`cap_<id>_<64 hex>`).
pub fn parse_secret(secret: &str) -> Result<TokenId> {
    let bad = || Error::unauthenticated("the token is malformed; tokens look like cap_tok_..._<64 hex characters>");
    let rest = secret.strip_prefix("cap_").ok_or_else(bad)?;
    let (id, random) = rest.rsplit_once('_').ok_or_else(bad)?;
    if random.len() != 64 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    TokenId::parse(id).map_err(|_| bad())
}

/// Constant-time comparison of a presented secret with a stored hash.
pub fn verify_secret(secret: &str, stored: &[u8; 32]) -> bool {
    let h = hash_secret(secret);
    bool::from(h.ct_eq(stored))
}

/// Who is calling: an authenticated, live token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token: TokenId,
    pub team: Option<TeamId>,
    pub scopes: BTreeSet<Scope>,
    /// The base scopes (expanded once at authentication).
    pub effective: BTreeSet<Scope>,
    pub prefix: Option<String>,
    pub sizes: Option<BTreeSet<Size>>,
    pub max_credit_limit: Option<MicroCredits>,
    pub expires_at_ms: Option<i64>,
    pub capsule: Option<CapsuleId>,
}

impl Principal {
    pub fn from_record(r: &TokenRecord) -> Self {
        Principal {
            token: r.id.clone(),
            team: r.team.clone(),
            effective: expanded(&r.scopes),
            scopes: r.scopes.clone(),
            prefix: r.prefix.clone(),
            sizes: r.sizes.clone(),
            max_credit_limit: r.max_credit_limit,
            expires_at_ms: r.expires_at_ms,
            capsule: r.capsule.clone(),
        }
    }
    pub fn has(&self, scope: Scope) -> bool {
        self.effective.contains(&scope)
    }
    pub fn is_operator(&self) -> bool {
        self.has(Scope::Operator)
    }
}

/// Attenuation: a child may be no broader than its parent in any dimension. Returns the first
/// dimension that is broader as `PermissionDenied`.
pub fn check_attenuation(parent: &Principal, child: &TokenSpec, child_expiry: Option<i64>) -> Result<()> {
    let deny = |m: String| Err(Error::permission_denied(m));
    let child_eff = expanded(&child.scopes);
    if let Some(s) = child_eff.iter().find(|s| !parent.effective.contains(s)) {
        return deny(format!(
            "the new token would have scope {s}, which the minting token does not have"
        ));
    }
    if let Some(pp) = &parent.prefix {
        match &child.prefix {
            Some(cp) if cp.starts_with(pp.as_str()) => {}
            Some(cp) => {
                return deny(format!(
                    "prefix {cp:?} does not start with the minting token's prefix {pp:?}"
                ));
            }
            None => {
                return deny(format!(
                    "the new token needs a prefix starting with {pp:?}, like the minting token"
                ));
            }
        }
    }
    if let Some(ps) = &parent.sizes {
        match &child.sizes {
            Some(cs) if cs.is_subset(ps) => {}
            _ => return deny("the new token's sizes are not a subset of the minting token's sizes".into()),
        }
    }
    if let Some(pc) = parent.max_credit_limit {
        match child.max_credit_limit {
            Some(cc) if cc <= pc => {}
            _ => {
                return deny(format!(
                    "the new token's max credit limit would be above the minting token's {pc}"
                ));
            }
        }
    }
    if let Some(pe) = parent.expires_at_ms {
        match child_expiry {
            Some(ce) if ce <= pe => {}
            _ => return deny("the new token would expire after the minting token".into()),
        }
    }
    if let Some(pcap) = &parent.capsule
        && child.capsule.as_ref() != Some(pcap)
    {
        return deny("a token for one capsule can only mint tokens for that capsule".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn secrets() {
        let (id, secret, hash) = generate_secret().unwrap();
        assert!(secret.expose().starts_with(&format!("cap_{id}_")));
        assert_eq!(secret.expose().len(), 4 + id.as_str().len() + 1 + 64);
        assert_eq!(parse_secret(secret.expose()).unwrap(), id);
        assert!(verify_secret(secret.expose(), &hash));
        let mut wrong = secret.expose().to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(!verify_secret(&wrong, &hash));
        for bad in [
            "",
            "cap_",
            "tok_abc",
            "cap_tok_abc_123",
            &format!("cap_x_{}", "0".repeat(64)),
        ] {
            assert_eq!(parse_secret(bad).unwrap_err().kind(), ErrorKind::Unauthenticated);
        }
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }

    #[test]
    fn scopes_parse_and_list() {
        assert_eq!(Scope::parse("agent:write").unwrap(), Scope::AgentWrite);
        let e = Scope::parse("root").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.message().contains("capsules:read") && e.message().contains("operator"));
        assert!(TokenSpec::new([Scope::AgentWrite]).validate().is_err());
        assert!(TokenSpec::new([Scope::AgentWrite]).prefix("agent-").validate().is_ok());
        assert!(TokenSpec::new([Scope::AgentWrite]).prefix("Agent").validate().is_err());
    }

    fn principal(spec: TokenSpec) -> Principal {
        let (id, _, hash) = generate_secret().unwrap();
        Principal::from_record(&TokenRecord {
            id,
            team: Some(TeamId::generate()),
            parent: None,
            scopes: spec.scopes,
            prefix: spec.prefix,
            sizes: spec.sizes,
            max_credit_limit: spec.max_credit_limit,
            expires_at_ms: spec.expires_at_ms,
            capsule: None,
            label: None,
            secret_hash: hash,
            created_at_ms: 0,
            revoked_at_ms: None,
        })
    }

    #[test]
    fn attenuation_in_every_dimension() {
        let parent = principal(
            TokenSpec::new([Scope::AgentWrite, Scope::TokensWrite])
                .prefix("a-")
                .sizes([Size::S1x1gb, Size::S2x2gb])
                .max_credit_limit(MicroCredits::credits(2))
                .expires_at_ms(1000),
        );
        let ok = TokenSpec::new([Scope::CapsulesRead])
            .prefix("a-b-")
            .sizes([Size::S1x1gb])
            .max_credit_limit(MicroCredits::credits(1));
        check_attenuation(&parent, &ok, Some(999)).unwrap();
        let broader = [
            (
                TokenSpec {
                    scopes: [Scope::BillingRead].into(),
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    prefix: Some("b-".into()),
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    prefix: None,
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    sizes: Some([Size::S4x8gb].into()),
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    sizes: None,
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    max_credit_limit: Some(MicroCredits::credits(3)),
                    ..ok.clone()
                },
                Some(999),
            ),
            (
                TokenSpec {
                    max_credit_limit: None,
                    ..ok.clone()
                },
                Some(999),
            ),
            (ok.clone(), Some(1001)),
            (ok.clone(), None),
        ];
        for (spec, exp) in broader {
            let e = check_attenuation(&parent, &spec, exp).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{spec:?}");
        }
        // admin can mint everything in the team but not operator
        let admin = principal(TokenSpec::new([Scope::Admin]));
        check_attenuation(
            &admin,
            &TokenSpec::new([Scope::NetworkPrivate, Scope::UrlsPublic]),
            None,
        )
        .unwrap();
        assert!(check_attenuation(&admin, &TokenSpec::new([Scope::Operator]), None).is_err());
    }
}
