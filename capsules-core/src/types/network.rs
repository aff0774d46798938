use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Ranges a capsule can never reach under `internet`, and that an `allow` list may only name with the
/// `network:private` scope. The host itself (except its DNS forwarder) is blocked by the backend.
pub const BLOCKED_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "224.0.0.0/4",
    "0.0.0.0/8",
    "255.255.255.255/32",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
    "ff00::/8",
];

/// An IPv4 or IPv6 network in CIDR notation (host bits must be zero; a bare address is a /32 or /128).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid_input(format!(
                "{s:?} is not a valid CIDR ({why}); write e.g. 203.0.113.0/24 or 2001:db8::/32"
            ))
        };
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => {
                let n: u8 = p.parse().map_err(|_| bad("the prefix length is not a number"))?;
                if n > max {
                    return Err(bad("the prefix length is too long"));
                }
                n
            }
        };
        let c = Cidr { addr, prefix };
        if c.network_bits() != c.bits() {
            return Err(bad("it has host bits set"));
        }
        Ok(c)
    }

    fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        }
    }
    fn width(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }
    fn mask(&self) -> u128 {
        let w = self.width() as u32;
        let p = self.prefix as u32;
        if p == 0 {
            0
        } else {
            let full = if w == 128 { u128::MAX } else { (1u128 << w) - 1 };
            full & !((1u128 << (w - p)) - 1).min(full)
        }
    }
    fn network_bits(&self) -> u128 {
        self.bits() & self.mask()
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let p = self.prefix.min(other.prefix);
        let m = Cidr {
            addr: self.addr,
            prefix: p,
        }
        .mask();
        (self.bits() & m) == (other.bits() & m)
    }

    /// Whether this network touches any of [`BLOCKED_RANGES`].
    pub fn is_blocked_range(&self) -> bool {
        BLOCKED_RANGES
            .iter()
            .any(|r| Cidr::parse(r).map(|b| b.overlaps(self)).unwrap_or(false))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
impl FromStr for Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// One entry of an `allow` list.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum AllowEntry {
    Cidr(Cidr),
    /// A domain name (lowercase, dot-separated DNS labels); its answered addresses become reachable.
    Domain(String),
}

impl AllowEntry {
    pub fn parse(s: &str) -> Result<Self> {
        if s.parse::<IpAddr>().is_ok() || s.contains('/') || s.contains(':') {
            return Cidr::parse(s).map(AllowEntry::Cidr);
        }
        let d = s.trim_end_matches('.');
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if d.len() <= 253 && d.contains('.') && d.split('.').all(label_ok) {
            Ok(AllowEntry::Domain(d.to_owned()))
        } else {
            Err(Error::invalid_input(format!(
                "allow entry {s:?} is neither a CIDR nor a domain name; write e.g. 203.0.113.0/24 or registry.npmjs.org (lowercase)"
            )))
        }
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Cidr(c) => c.fmt(f),
            AllowEntry::Domain(d) => f.write_str(d),
        }
    }
}

/// What a capsule may reach. Inbound traffic only ever arrives through its one public URL.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub enum NetworkPolicy {
    /// Public egress; [`BLOCKED_RANGES`] and the host are blocked.
    #[default]
    Internet,
    /// No network at all.
    None,
    /// Nothing but the listed networks and domains (plus DNS through the host's forwarder).
    Allow(Vec<AllowEntry>),
}

impl NetworkPolicy {
    /// Parses `internet`, `none`, or `allow:<entry>,<entry>,...`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "internet" => Ok(NetworkPolicy::Internet),
            "none" => Ok(NetworkPolicy::None),
            _ => match s.strip_prefix("allow:") {
                Some(list) => {
                    let entries = list
                        .split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(AllowEntry::parse)
                        .collect::<Result<Vec<_>>>()?;
                    if entries.is_empty() {
                        return Err(Error::invalid_input(
                            "an allow list is empty; write allow:<cidr or domain>,... or use none",
                        ));
                    }
                    Ok(NetworkPolicy::Allow(entries))
                }
                None => Err(Error::invalid_input(format!(
                    "network policy {s:?} is not known; policies are internet, none, allow:<cidr or domain>,..."
                ))),
            },
        }
    }

    /// Whether this policy names addresses in the blocked ranges (needs `network:private`).
    pub fn reaches_private(&self) -> bool {
        match self {
            NetworkPolicy::Allow(list) => list
                .iter()
                .any(|e| matches!(e, AllowEntry::Cidr(c) if c.is_blocked_range())),
            _ => false,
        }
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkPolicy::Internet => f.write_str("internet"),
            NetworkPolicy::None => f.write_str("none"),
            NetworkPolicy::Allow(list) => {
                f.write_str("allow:")?;
                for (i, e) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    e.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for NetworkPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
impl serde::Serialize for NetworkPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> serde::Deserialize<'de> for NetworkPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NetworkPolicy::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(Cidr::parse("10.0.0.0/8").unwrap().is_blocked_range());
        assert!(Cidr::parse("10.1.2.3").unwrap().is_blocked_range());
        assert!(Cidr::parse("169.254.169.254/32").unwrap().is_blocked_range());
        assert!(!Cidr::parse("203.0.113.0/24").unwrap().is_blocked_range());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().is_blocked_range());
        assert!(Cidr::parse("10.0.0.1/8").is_err());
        assert!(Cidr::parse("fd00::/8").unwrap().is_blocked_range());
        assert!(!Cidr::parse("2001:db8::/32").unwrap().is_blocked_range());
    }

    #[test]
    fn policies_round_trip() {
        for s in ["internet", "none", "allow:203.0.113.0/24,ok.test"] {
            assert_eq!(NetworkPolicy::parse(s).unwrap().to_string(), s);
        }
        assert!(NetworkPolicy::parse("allow:10.0.0.0/8").unwrap().reaches_private());
        assert!(NetworkPolicy::parse("open").is_err());
        assert!(NetworkPolicy::parse("allow:").is_err());
        assert!(NetworkPolicy::parse("allow:Bad_Domain").is_err());
    }
}
