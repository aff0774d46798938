use std::fmt;
use std::str::FromStr;

use rand::Rng;

use crate::error::{Error, Result};

/// Checks the DNS-label rule shared by capsule and team names.
fn check_label(what: &str, s: &str) -> Result<()> {
    const RULE: &str = "1-63 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'";
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "{what} {s:?} is not valid: {why}; a {what} is {RULE}"
        )))
    };
    if s.is_empty() {
        return bad("it is empty");
    }
    if s.len() > 63 {
        return bad(&format!("it is {} bytes long", s.len()));
    }
    if let Some(c) = s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-')) {
        return bad(&format!("it contains {c:?}"));
    }
    if !s.as_bytes()[0].is_ascii_lowercase() {
        return bad("it does not start with a letter");
    }
    if s.ends_with('-') {
        return bad("it ends with '-'");
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against the DNS-label rule.
            pub fn new(s: impl Into<String>) -> Result<Self> {
                let s = s.into();
                check_label($what, &s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A capsule's name: a DNS label, unique per team among live capsules.
    CapsuleName,
    "capsule name"
);
label_type!(
    /// A team's name: the same rules as a capsule name.
    TeamName,
    "team name"
);

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A new random id: the prefix, `_`, 16 lowercase base32 characters (80 bits).
            pub fn generate() -> Self {
                const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
                let mut rng = rand::rng();
                let tail: String = (0..16).map(|_| ALPHABET[rng.random_range(0..32)] as char).collect();
                Self(format!("{}_{}", $prefix, tail))
            }
            /// Parses an id (`<prefix>_<a-z2-7>{1,32}`).
            pub fn parse(s: &str) -> Result<Self> {
                let ok = s
                    .strip_prefix(concat!($prefix, "_"))
                    .is_some_and(|t| !t.is_empty() && t.len() <= 32 && t.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')));
                if ok {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(Error::invalid_input(format!(
                        "{s:?} is not a valid id: ids look like {}_ followed by lowercase base32",
                        $prefix
                    )))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::parse(s)
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A capsule's immutable id (`cap_...`). Records, events and ledger entries keep it, so a
    /// reused name never mixes two capsules' history.
    CapsuleId,
    "cap"
);
id_type!(
    /// A team's immutable id (`team_...`).
    TeamId,
    "team"
);
id_type!(
    /// A token's immutable id (`tok_...`); the public part of a token's secret.
    TokenId,
    "tok"
);

/// How a caller names a capsule: by name (the live capsule of that name) or by id. Ids contain
/// `_`, which names cannot, so one string parses unambiguously.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CapsuleRef {
    Name(CapsuleName),
    Id(CapsuleId),
}

impl CapsuleRef {
    pub fn parse(s: &str) -> Result<Self> {
        // Ids start with `cap_`; anything else is a name (and gets the name rules when it is not one).
        if s.starts_with("cap_") {
            CapsuleId::parse(s).map(Self::Id)
        } else {
            CapsuleName::new(s).map(Self::Name)
        }
    }
}

impl FromStr for CapsuleRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for CapsuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapsuleRef::Name(n) => n.fmt(f),
            CapsuleRef::Id(i) => i.fmt(f),
        }
    }
}

impl From<CapsuleName> for CapsuleRef {
    fn from(n: CapsuleName) -> Self {
        Self::Name(n)
    }
}
impl From<CapsuleId> for CapsuleRef {
    fn from(i: CapsuleId) -> Self {
        Self::Id(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "agent-pr-482", "a1", &"a".repeat(63)] {
            assert!(CapsuleName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Agent",
            "ünï",
            "1abc",
            "-a",
            "a-",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "<script>",
        ] {
            let e = CapsuleName::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(e.message().contains("a-z, 0-9"), "{}", e.message());
        }
    }

    #[test]
    fn ids_and_refs() {
        let id = CapsuleId::generate();
        assert!(id.as_str().starts_with("cap_"));
        assert_eq!(CapsuleId::parse(id.as_str()).unwrap(), id);
        assert_eq!(CapsuleRef::parse(id.as_str()).unwrap(), CapsuleRef::Id(id));
        assert!(matches!(CapsuleRef::parse("agent-1").unwrap(), CapsuleRef::Name(_)));
        assert!(CapsuleRef::parse("cap_UPPER").is_err());
        assert!(CapsuleId::parse("team_abc").is_err());
    }
}
