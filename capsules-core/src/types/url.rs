//! Public URL settings: at most one per capsule.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::types::CapsuleName;

/// Who may open a capsule's public URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UrlAccess {
    /// Anyone (needs `urls:public` to set).
    Public,
    /// A bearer token that can read the capsule, or a `preview` token for it.
    #[default]
    Token,
}

impl UrlAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlAccess::Public => "public",
            UrlAccess::Token => "token",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "public" => Ok(UrlAccess::Public),
            "token" => Ok(UrlAccess::Token),
            _ => Err(Error::invalid_input(format!(
                "URL access {s:?} is not known; access is public or token"
            ))),
        }
    }
}

impl FromStr for UrlAccess {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
impl fmt::Display for UrlAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A capsule's public URL: the port inside it, who may open it, and its host label.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublicUrl {
    pub port: u16,
    pub access: UrlAccess,
    /// `<name cut to 50 bytes>-<8 random base32>`: assigned at first expose and kept.
    pub host_label: String,
}

/// A fresh host label for `name`: the name cut to 50 bytes, `-`, 8 random base32 characters.
pub fn new_host_label(name: &CapsuleName) -> String {
    use rand::Rng;
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let cut = &name.as_str()[..name.as_str().len().min(50)];
    let cut = cut.trim_end_matches('-');
    let mut rng = rand::rng();
    let tail: String = (0..8).map(|_| ALPHABET[rng.random_range(0..32)] as char).collect();
    format!("{cut}-{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_labels() {
        let n = CapsuleName::new("a".repeat(63)).unwrap();
        let l = new_host_label(&n);
        assert_eq!(l.len(), 59);
        assert!(l.starts_with(&"a".repeat(50)));
        let n = CapsuleName::new("agent-pr-482").unwrap();
        let (a, b) = (new_host_label(&n), new_host_label(&n));
        assert!(a.starts_with("agent-pr-482-") && a.len() == 21);
        assert_ne!(a, b);
        assert!(CapsuleName::new(a).is_ok(), "a host label is a DNS label");
        assert!(UrlAccess::parse("private").is_err());
    }
}
