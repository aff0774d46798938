//! nftables: the text of the backend's table and of each capsule's rules, and running `nft -f -`.
//!
//! Layout of `table inet <prefix>` (everything matches only packets on our own taps, listed in the
//! `taps` set; other interfaces are untouched except by the forwarding guard, see below):
//! - `taps` (ifname set), `guests4` (our guest addresses, for NAT);
//! - `fwd_out` / `host_in`: verdict maps `tap name -> jump out_<slot> / in_<slot>`;
//! - chain `owned` (hook forward, before every filter chain): sets the packet-mark bit [`OWNED_MARK`]
//!   on forwarded packets that enter or leave one of our taps;
//! - chain `forward` (hook forward): capsule→capsule drop, return traffic to a tap only when
//!   established/related, no IPv6 from taps, then the tap's own `out_<slot>` chain; when the backend
//!   turned IPv4 forwarding on, a last `drop` (the *forwarding guard*) stops every forwarded packet
//!   without the [`OWNED_MARK`] bit — one that neither enters nor leaves a tap of this or of another
//!   capsules backend on the host (another table) — so the host forwards nothing else, as before, and
//!   two backends never drop each other's traffic;
//! - chain `input` (hook input): from a tap only DNS (udp/tcp 53) to that tap's host address;
//! - chain `postrouting` (nat): masquerade our guest addresses leaving through a non-tap interface;
//! - per capsule: chains `out_<slot>`, `in_<slot>` and the timeout set `dom_<slot>` (addresses the DNS
//!   forwarder resolved for the allow list's domains).
//!
//! A policy change is one `nft -f` transaction (flush the capsule's chain and refill it), so a
//! capsule never sees a half-applied policy.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use capsules_core::types::{AllowEntry, BLOCKED_RANGES, Cidr, NetworkPolicy};
use tokio::io::AsyncWriteExt;

use super::NetError;

/// Comment that marks the forwarding guard rule (also how a restarted backend knows it turned
/// forwarding on).
pub(crate) const GUARD_COMMENT: &str = "capsules: forwarding guard (host had ip_forward off)";

/// The packet-mark bit every capsules table sets (chain `owned`) on forwarded packets of its own
/// taps. The forwarding guard of any capsules table lets marked packets pass, so a second backend
/// (another table name, e.g. a test's) is not cut off by the guard of the first; each table's own
/// rules still decide what its capsules may reach. Only this bit of the mark is changed.
pub const OWNED_MARK: u32 = 0x0020_0000;

/// What one capsule's rules are made of.
#[derive(Debug, Clone)]
pub(crate) struct CapsuleRules<'a> {
    pub slot: u32,
    pub tap: &'a str,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub pool: Cidr,
    pub policy: &'a NetworkPolicy,
    /// conntrack mark of connections accepted through the domain set under this policy version.
    pub mark: u32,
}

/// The IPv4 blocked ranges from [`BLOCKED_RANGES`], plus `extra`, with nested ranges removed (nft
/// refuses overlapping intervals in one anonymous set).
pub(crate) fn v4_set(cidrs: impl IntoIterator<Item = Cidr>) -> Vec<Cidr> {
    let mut v: Vec<Cidr> = cidrs.into_iter().filter(|c| c.addr().is_ipv4()).collect();
    v.sort_by_key(|c| c.prefix());
    let mut out: Vec<Cidr> = Vec::new();
    for c in v {
        if !out.iter().any(|o| o.overlaps(&c)) {
            out.push(c);
        }
    }
    out.sort_by_key(|c| match c.addr() {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(_) => 0,
    });
    out
}

pub(crate) fn blocked_v4() -> Vec<Cidr> {
    v4_set(BLOCKED_RANGES.iter().filter_map(|r| Cidr::parse(r).ok()))
}

fn set_text(cidrs: &[Cidr]) -> String {
    let items: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Statements that create (idempotently) the table and its base chains, and refill the base chains.
pub(crate) fn base_script(table: &str, guard: bool) -> String {
    let t = format!("inet {table}");
    let mut s = String::new();
    s += &format!("add table {t}\n");
    s += &format!("add set {t} taps {{ type ifname; }}\n");
    s += &format!("add set {t} guests4 {{ type ipv4_addr; }}\n");
    s += &format!("add map {t} fwd_out {{ type ifname : verdict; }}\n");
    s += &format!("add map {t} host_in {{ type ifname : verdict; }}\n");
    s += &format!("add chain {t} owned {{ type filter hook forward priority -10; policy accept; }}\n");
    s += &format!("flush chain {t} owned\n");
    s += &format!("add rule {t} owned iifname @taps meta mark set meta mark | {OWNED_MARK:#010x}\n");
    s += &format!("add rule {t} owned oifname @taps meta mark set meta mark | {OWNED_MARK:#010x}\n");
    s += &format!("add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}\n");
    s += &format!("flush chain {t} forward\n");
    s += &format!("add rule {t} forward iifname @taps oifname @taps drop comment \"no capsule to capsule\"\n");
    s += &format!("add rule {t} forward oifname @taps ct state established,related accept\n");
    s += &format!("add rule {t} forward oifname @taps drop comment \"no inbound\"\n");
    s += &format!("add rule {t} forward iifname @taps meta nfproto ipv6 drop comment \"no IPv6 egress\"\n");
    s += &format!("add rule {t} forward iifname vmap @fwd_out\n");
    s += &format!("add rule {t} forward iifname @taps drop\n");
    if guard {
        s += &format!("add rule {t} forward meta mark & {OWNED_MARK:#010x} == 0 drop comment \"{GUARD_COMMENT}\"\n");
    }
    s += &format!("add chain {t} input {{ type filter hook input priority filter; policy accept; }}\n");
    s += &format!("flush chain {t} input\n");
    s += &format!("add rule {t} input iifname vmap @host_in\n");
    s += &format!("add rule {t} input iifname @taps drop\n");
    s += &format!("add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n");
    s += &format!("flush chain {t} postrouting\n");
    s += &format!("add rule {t} postrouting ip saddr @guests4 oifname != @taps masquerade\n");
    s
}

/// Statements that install or replace one capsule's rules (idempotent; one transaction).
pub(crate) fn capsule_script(table: &str, r: &CapsuleRules<'_>) -> String {
    let t = format!("inet {table}");
    let n = r.slot;
    let mut s = String::new();
    s += &format!("add chain {t} out_{n}\n");
    s += &format!("add chain {t} in_{n}\n");
    s += &format!("add set {t} dom_{n} {{ type ipv4_addr; flags timeout; }}\n");
    s += &format!("flush chain {t} out_{n}\n");
    s += &format!("flush chain {t} in_{n}\n");
    // The host: only its DNS forwarder on this tap's host address.
    s += &format!("add rule {t} in_{n} ip daddr {} udp dport 53 accept\n", r.host_ip);
    s += &format!("add rule {t} in_{n} ip daddr {} tcp dport 53 accept\n", r.host_ip);
    s += &format!("add rule {t} in_{n} drop\n");
    // Egress.
    s += &format!(
        "add rule {t} out_{n} ip saddr != {} drop comment \"spoofed source\"\n",
        r.guest_ip
    );
    s += &format!(
        "add rule {t} out_{n} ip daddr {} drop comment \"capsule pool\"\n",
        r.pool
    );
    let blocked = set_text(&blocked_v4());
    match r.policy {
        NetworkPolicy::Internet => {
            s += &format!("add rule {t} out_{n} ip daddr {blocked} drop\n");
            s += &format!("add rule {t} out_{n} accept\n");
        }
        NetworkPolicy::None => {
            s += &format!("add rule {t} out_{n} drop\n");
        }
        NetworkPolicy::Allow(list) => {
            let cidrs = v4_set(list.iter().filter_map(|e| match e {
                AllowEntry::Cidr(c) => Some(*c),
                AllowEntry::Domain(_) => None,
            }));
            if !cidrs.is_empty() {
                s += &format!("add rule {t} out_{n} ip daddr {} accept\n", set_text(&cidrs));
            }
            if list.iter().any(|e| matches!(e, AllowEntry::Domain(_))) {
                // Resolved addresses never open the blocked ranges (DNS rebinding).
                s += &format!("add rule {t} out_{n} ip daddr {blocked} drop\n");
                // Connections opened through the set outlive its elements' timeouts, but not a policy
                // change (the mark changes with every apply).
                s += &format!(
                    "add rule {t} out_{n} ct state established,related ct mark {:#010x} accept\n",
                    r.mark
                );
                s += &format!(
                    "add rule {t} out_{n} ip daddr @dom_{n} ct mark set {:#010x} accept\n",
                    r.mark
                );
            }
            s += &format!("add rule {t} out_{n} drop\n");
        }
    }
    s += &format!("add element {t} taps {{ \"{}\" }}\n", r.tap);
    s += &format!("add element {t} guests4 {{ {} }}\n", r.guest_ip);
    s += &format!("add element {t} fwd_out {{ \"{}\" : jump out_{n} }}\n", r.tap);
    s += &format!("add element {t} host_in {{ \"{}\" : jump in_{n} }}\n", r.tap);
    s
}

/// Statements that remove everything of one slot, whatever of it exists (each object is first added,
/// which is a no-op when it exists, then deleted — so one transaction works for any leftover state).
pub(crate) fn remove_script(table: &str, slot: u32, tap: &str, guest_ip: Ipv4Addr) -> String {
    let t = format!("inet {table}");
    let n = slot;
    let mut s = String::new();
    s += &format!("add chain {t} out_{n}\n");
    s += &format!("add chain {t} in_{n}\n");
    s += &format!("add set {t} dom_{n} {{ type ipv4_addr; flags timeout; }}\n");
    s += &format!("add element {t} taps {{ \"{tap}\" }}\n");
    s += &format!("add element {t} guests4 {{ {guest_ip} }}\n");
    s += &format!("add element {t} fwd_out {{ \"{tap}\" : jump out_{n} }}\n");
    s += &format!("add element {t} host_in {{ \"{tap}\" : jump in_{n} }}\n");
    s += &format!("delete element {t} fwd_out {{ \"{tap}\" }}\n");
    s += &format!("delete element {t} host_in {{ \"{tap}\" }}\n");
    s += &format!("delete element {t} taps {{ \"{tap}\" }}\n");
    s += &format!("delete element {t} guests4 {{ {guest_ip} }}\n");
    s += &format!("flush chain {t} out_{n}\n");
    s += &format!("flush chain {t} in_{n}\n");
    s += &format!("delete chain {t} out_{n}\n");
    s += &format!("delete chain {t} in_{n}\n");
    s += &format!("delete set {t} dom_{n}\n");
    s
}

/// Statements that (re)insert addresses into a capsule's domain set with fresh timeouts (add, delete,
/// add: `add` alone keeps an existing element's old timeout).
pub(crate) fn dom_elements_script(table: &str, slot: u32, elems: &[(Ipv4Addr, u32)]) -> String {
    let t = format!("inet {table}");
    let mut s = String::new();
    for (ip, secs) in elems {
        s += &format!("add element {t} dom_{slot} {{ {ip} timeout {secs}s }}\n");
        s += &format!("delete element {t} dom_{slot} {{ {ip} }}\n");
        s += &format!("add element {t} dom_{slot} {{ {ip} timeout {secs}s }}\n");
    }
    s
}

/// Runs `nft` with a fixed path.
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    pub bin: PathBuf,
}

impl Nft {
    /// Runs `script` as one transaction (`nft -f -`).
    pub async fn run(&self, what: &str, script: &str) -> Result<(), NetError> {
        self.exec(what, &["-f", "-"], Some(script)).await.map(|_| ())
    }

    /// Runs `nft ARGS` and returns stdout.
    pub async fn exec(&self, what: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| NetError::spawn("nft", &self.bin, e))?;
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().ok_or_else(|| NetError::Command {
                what: what.to_owned(),
                command: "nft -f -".into(),
                detail: "no stdin pipe".into(),
            })?;
            pipe.write_all(text.as_bytes())
                .await
                .map_err(|e| NetError::io(format!("writing the nft script for {what}"), e))?;
            drop(pipe);
        }
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .map_err(|_| NetError::Command {
                what: what.to_owned(),
                command: format!("nft {}", args.join(" ")),
                detail: "timed out after 20 s".into(),
            })?
            .map_err(|e| NetError::io(format!("waiting for nft ({what})"), e))?;
        if !out.status.success() {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if let Some(text) = stdin {
                detail = format!("{detail}\n--- script ---\n{text}");
            }
            return Err(NetError::Command {
                what: what.to_owned(),
                command: format!("nft {}", args.join(" ")),
                detail,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_set_has_no_overlaps_and_covers_metadata() {
        let b = blocked_v4();
        for (i, x) in b.iter().enumerate() {
            for y in &b[i + 1..] {
                assert!(!x.overlaps(y), "{x} overlaps {y}");
            }
        }
        let md = Cidr::parse("169.254.169.254").unwrap();
        assert!(b.iter().any(|c| c.overlaps(&md)));
        // Nested ranges collapse into the larger one.
        let v = v4_set([Cidr::parse("10.1.0.0/16").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()]);
        assert_eq!(v, vec![Cidr::parse("10.0.0.0/8").unwrap()]);
    }

    #[test]
    fn scripts_mention_only_our_objects() {
        let pool = Cidr::parse("10.213.0.0/16").unwrap();
        for p in ["internet", "none", "allow:203.0.113.0/24,ok.test"] {
            let policy = NetworkPolicy::parse(p).unwrap();
            let r = CapsuleRules {
                slot: 3,
                tap: "cpt3",
                host_ip: Ipv4Addr::new(10, 213, 0, 13),
                guest_ip: Ipv4Addr::new(10, 213, 0, 14),
                pool,
                policy: &policy,
                mark: 0x1234,
            };
            let s = capsule_script("capsules", &r);
            for line in s.lines() {
                assert!(line.contains(" inet capsules "), "{line}");
                assert!(!line.starts_with("flush ruleset"));
            }
        }
        assert!(!base_script("capsules", false).contains("forwarding guard"));
        let guarded = base_script("capsules", true);
        let guard = guarded.lines().find(|l| l.contains(GUARD_COMMENT)).unwrap();
        // The guard spares packets of every capsules backend's taps (the mark the `owned` chains set).
        assert!(guard.contains("meta mark & 0x00200000 == 0 drop"), "{guard}");
        assert!(guarded.contains("add rule inet capsules owned iifname @taps meta mark set meta mark | 0x00200000"));
        assert!(guarded.contains("add rule inet capsules owned oifname @taps meta mark set meta mark | 0x00200000"));
    }
}
