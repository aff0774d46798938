//! The host side of every capsule's network: a tap per capsule, a /30 from a pool, one nftables
//! table owned by the backend, and a DNS forwarder on the host side of each tap.
//!
//! One [`Network`] per backend. Lifecycle:
//! 1. [`Network::new`] checks privileges and tools, creates (or refreshes) `table inet <table>` and
//!    turns IPv4 forwarding on if it was off — then the table's *forwarding guard* drops every forwarded
//!    packet that neither enters nor leaves a capsule tap (of this backend or of another one on the
//!    host, which marks its packets with [`OWNED_MARK`]), so other interfaces forward nothing, as
//!    before. If forwarding was already on, other traffic is left alone.
//! 2. At backend start: [`Network::adopt`] each live (or sleeping) capsule from its state directory,
//!    then [`Network::sweep`] the leftovers no adopted capsule owns.
//! 3. Per capsule: [`Network::setup_capsule`] → [`CapsuleNet`] (tap name, MAC, addresses, kernel
//!    command line); [`Network::apply`] changes the policy in place (one nft transaction);
//!    [`Network::teardown`] removes everything.
//!
//! The allocation of a capsule (slot, tap, addresses, MAC, policy) is persisted in `net.json` in the
//! capsule's state directory, so a restarted backend gets the same addresses back (a sleeping guest's
//! memory snapshot keeps its IP configuration). Every link we create carries the alias
//! `capsules:<capsule id>`, so a sweep knows whose a link is without any state file.
//!
//! Dropping a [`Network`] stops its DNS forwarders but leaves taps and rules in place (running VMs
//! keep their network while the host process restarts); [`Network::destroy`] removes everything.
//!
//! Privileges: root or CAP_NET_ADMIN (taps, nftables) and CAP_NET_BIND_SERVICE (port 53); the VMM
//! itself runs unprivileged and only opens the tap it is given, which is created owned by
//! [`NetConfig::tap_owner`].

pub mod dns;
mod forwarder;
mod link;
mod nft;
mod provider;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use capsules_core::types::{AllowEntry, Cidr, NetworkPolicy};
use serde::{Deserialize, Serialize};

pub use forwarder::{MAX_TCP_CONNS, MAX_UDP_INFLIGHT};
pub use nft::OWNED_MARK;
pub use provider::attachment;

use forwarder::{Forwarder, Mode};
use link::{ALIAS_PREFIX, Ip};
use nft::{CapsuleRules, Nft};

/// File in the capsule's state directory that holds its network allocation.
pub const STATE_FILE: &str = "net.json";

/// Errors of the host network layer. Messages say what failed and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A required tool is not installed.
    #[error("{tool} not found ({path}): {hint}")]
    ToolMissing {
        /// `ip` or `nft`.
        tool: &'static str,
        /// Where it was looked for.
        path: String,
        /// How to install it.
        hint: &'static str,
    },
    /// The process lacks the privileges for taps and nftables.
    #[error(
        "managing taps and nftables needs root or CAP_NET_ADMIN (and CAP_NET_BIND_SERVICE for the DNS forwarder); run the backend as root or grant them with setcap"
    )]
    NotPrivileged,
    /// An `ip` or `nft` command failed.
    #[error("{what} failed: `{command}`: {detail}")]
    Command {
        /// What was being done.
        what: String,
        /// The command line.
        command: String,
        /// Its error output (and for nft, the script).
        detail: String,
    },
    /// No free /30 is left in the pool.
    #[error(
        "the address pool {pool} has no free /30 left ({used} in use); configure a larger pool (CAPSULES_NET_POOL)"
    )]
    PoolExhausted {
        /// The pool.
        pool: Cidr,
        /// Slots in use.
        used: usize,
    },
    /// The configuration is invalid.
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// The capsule has no network on this backend.
    #[error("capsule {0} has no network on this backend")]
    NotFound(String),
    /// A file or socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A persisted allocation (or nft's JSON) is unreadable.
    #[error("{context}")]
    State {
        /// What was being read.
        context: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl NetError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NetError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn spawn(tool: &'static str, path: &Path, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::ToolMissing {
                tool,
                path: path.display().to_string(),
                hint: tool_hint(tool),
            }
        } else {
            NetError::io(format!("running {}", path.display()), e)
        }
    }
}

fn tool_hint(tool: &str) -> &'static str {
    match tool {
        "nft" => "apt-get install nftables",
        _ => "apt-get install iproute2",
    }
}

impl From<NetError> for capsules_core::Error {
    fn from(e: NetError) -> Self {
        let msg = e.to_string();
        match &e {
            NetError::PoolExhausted { .. } => capsules_core::Error::unavailable(msg),
            NetError::ToolMissing { .. } | NetError::NotPrivileged => capsules_core::Error::unsupported(msg),
            NetError::Config(_) => capsules_core::Error::invalid_input(msg),
            NetError::NotFound(_) => capsules_core::Error::not_found(msg),
            _ => capsules_core::Error::internal(msg),
        }
    }
}

/// Configuration of the host network layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the nftables table (`table inet <table>`); default `capsules`.
    pub table: String,
    /// Prefix of tap names: `<tap_prefix><slot>` (within IFNAMSIZ); default `cpt`.
    pub tap_prefix: String,
    /// IPv4 pool cut into /30s (host .1, guest .2 of each); default `10.213.0.0/16`.
    pub pool: Cidr,
    /// DNS upstreams of the forwarders; empty = the host's resolvers from `/etc/resolv.conf`.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Owner (uid, gid) of the taps: the unprivileged user the VMM runs as. `None` = root only.
    pub tap_owner: Option<(u32, u32)>,
    /// Create taps with `multi_queue` (must match how the VMM opens them; QEMU and CH with one queue
    /// pair do not).
    pub tap_multi_queue: bool,
    /// Shortest lifetime of a resolved address in an allow set, in seconds (TTLs below are raised).
    pub dns_min_ttl: u32,
    /// Longest lifetime of a resolved address in an allow set, in seconds.
    pub dns_max_ttl: u32,
    /// `ip` binary (a bare name is looked up in PATH, `/usr/sbin`, `/sbin`).
    pub ip_bin: PathBuf,
    /// `nft` binary (looked up like `ip_bin`).
    pub nft_bin: PathBuf,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            table: "capsules".into(),
            tap_prefix: "cpt".into(),
            pool: Cidr::parse("10.213.0.0/16").expect("valid default pool"),
            dns_upstreams: Vec::new(),
            tap_owner: None,
            tap_multi_queue: false,
            dns_min_ttl: 60,
            dns_max_ttl: 86_400,
            ip_bin: "ip".into(),
            nft_bin: "nft".into(),
        }
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr, NetError> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| NetError::Config(format!("DNS upstream {s:?} is not ip or ip:port (e.g. 192.0.2.53:53)")))
}

impl NetConfig {
    /// Defaults overridden by `CAPSULES_NET_TABLE`, `CAPSULES_NET_TAP_PREFIX`, `CAPSULES_NET_POOL`
    /// (CIDR), `CAPSULES_NET_DNS` (comma-separated `ip[:port]`), `CAPSULES_NET_TAP_OWNER` (`uid:gid`).
    pub fn from_env() -> Result<Self, NetError> {
        let mut c = NetConfig::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(t) = var("CAPSULES_NET_TABLE") {
            c.table = t;
        }
        if let Some(p) = var("CAPSULES_NET_TAP_PREFIX") {
            c.tap_prefix = p;
        }
        if let Some(p) = var("CAPSULES_NET_POOL") {
            c.pool = Cidr::parse(&p).map_err(|e| NetError::Config(format!("CAPSULES_NET_POOL: {}", e.message())))?;
        }
        if let Some(d) = var("CAPSULES_NET_DNS") {
            c.dns_upstreams = d.split(',').map(parse_upstream).collect::<Result<_, _>>()?;
        }
        if let Some(o) = var("CAPSULES_NET_TAP_OWNER") {
            let bad = || NetError::Config(format!("CAPSULES_NET_TAP_OWNER {o:?} is not uid:gid"));
            let (u, g) = o.split_once(':').ok_or_else(bad)?;
            c.tap_owner = Some((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?));
        }
        c.validate()?;
        Ok(c)
    }

    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }
    /// Sets the tap name prefix.
    pub fn with_tap_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.tap_prefix = prefix.into();
        self
    }
    /// Sets the address pool.
    pub fn with_pool(mut self, pool: Cidr) -> Self {
        self.pool = pool;
        self
    }
    /// Sets the DNS upstreams.
    pub fn with_dns_upstreams(mut self, upstreams: Vec<SocketAddr>) -> Self {
        self.dns_upstreams = upstreams;
        self
    }
    /// Sets the taps' owner.
    pub fn with_tap_owner(mut self, uid: u32, gid: u32) -> Self {
        self.tap_owner = Some((uid, gid));
        self
    }

    /// Number of /30 slots in the pool.
    pub fn slots(&self) -> u32 {
        let host_bits = 32 - u32::from(self.pool.prefix());
        (1u32 << host_bits.min(31)) / 4
    }

    /// Checks names and the pool.
    pub fn validate(&self) -> Result<(), NetError> {
        let t = &self.table;
        if t.is_empty()
            || t.len() > 32
            || !t.starts_with(|c: char| c.is_ascii_lowercase())
            || !t
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(NetError::Config(format!(
                "table name {t:?} must be 1-32 of a-z 0-9 _ starting with a letter"
            )));
        }
        let IpAddr::V4(_) = self.pool.addr() else {
            return Err(NetError::Config(format!("pool {} must be IPv4", self.pool)));
        };
        if !(8..=30).contains(&self.pool.prefix()) {
            return Err(NetError::Config(format!("pool {} must be a /8 to /30", self.pool)));
        }
        let p = &self.tap_prefix;
        let digits = (self.slots() - 1).to_string().len();
        if p.is_empty()
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || p.ends_with(|c: char| c.is_ascii_digit())
            || p.len() + digits > 15
        {
            return Err(NetError::Config(format!(
                "tap prefix {p:?} must be a-z 0-9 starting with a letter, not ending with a digit, and leave room for {digits} digits within 15 bytes"
            )));
        }
        if self.dns_min_ttl == 0 || self.dns_min_ttl > self.dns_max_ttl {
            return Err(NetError::Config("dns_min_ttl must be 1..=dns_max_ttl".into()));
        }
        Ok(())
    }
}

/// How the host side of a capsule's link is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostLink {
    /// A persistent tap owned by [`NetConfig::tap_owner`], handed to the VMM by name.
    Tap,
    /// A veth pair whose other end (`peer`, left in this namespace for the caller to move) stands in
    /// for a VM: for tests and hosts that attach a guest differently. The rules are the same.
    Veth {
        /// Name of the other end.
        peer: String,
    },
}

/// One capsule's network, as allocated (and persisted in its state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleNet {
    /// The capsule this network belongs to.
    pub capsule_id: String,
    /// Index of the /30 in the pool.
    pub slot: u32,
    /// Host-side link name (`<tap_prefix><slot>`).
    pub tap_name: String,
    /// MAC address for the guest's NIC (`52:54:00:..`).
    pub mac: String,
    /// Host side of the /30: gateway and DNS forwarder.
    pub host_ip: Ipv4Addr,
    /// Guest side of the /30.
    pub guest_ip: Ipv4Addr,
    /// Always 30.
    pub prefix_len: u8,
    /// The DNS server the guest uses (the forwarder, = `host_ip`).
    pub dns_ip: Ipv4Addr,
    /// What the host-side link is.
    pub link: HostLink,
    /// Owner (uid, gid) the tap was created with.
    #[serde(default)]
    pub tap_owner: Option<(u32, u32)>,
}

impl CapsuleNet {
    /// Kernel command-line fragment the guest's init reads:
    /// `capsules.ip=GUEST/30 capsules.gw=HOST capsules.dns=HOST`.
    pub fn kernel_cmdline(&self) -> String {
        format!(
            "capsules.ip={}/{} capsules.gw={} capsules.dns={}",
            self.guest_ip, self.prefix_len, self.host_ip, self.dns_ip
        )
    }

    /// The tap as a VMM driver takes it.
    pub fn tap_config(&self) -> crate::vmm::TapConfig {
        crate::vmm::TapConfig {
            name: self.tap_name.clone(),
            mac: self.mac.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    version: u32,
    table: String,
    net: CapsuleNet,
    policy: NetworkPolicy,
}

/// What a [`Network::sweep`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Links deleted.
    pub links: Vec<String>,
    /// Slots whose rules and sets were deleted.
    pub slots: Vec<u32>,
    /// Stray set/map elements deleted.
    pub elements: usize,
}

#[derive(Debug)]
struct Entry {
    net: CapsuleNet,
    state_dir: Option<PathBuf>,
    policy: NetworkPolicy,
    mark: u32,
    fwd: Forwarder,
}

/// The host network of one backend. See the module docs.
#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    ip: Ip,
    nft: Nft,
    upstreams: Vec<SocketAddr>,
    guard: bool,
    inner: tokio::sync::Mutex<HashMap<String, Entry>>,
}

fn find_tool(bin: &Path, tool: &'static str) -> Result<PathBuf, NetError> {
    if bin.components().count() > 1 {
        return if bin.exists() {
            Ok(bin.to_owned())
        } else {
            Err(NetError::ToolMissing {
                tool,
                path: bin.display().to_string(),
                hint: tool_hint(tool),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .ok_or(NetError::ToolMissing {
            tool,
            path: format!("{} in PATH", bin.display()),
            hint: tool_hint(tool),
        })
}

/// Whether this process may manage links and nftables (root or CAP_NET_ADMIN effective).
pub fn has_net_admin() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// The host's resolvers from `/etc/resolv.conf` (port 53).
pub fn host_resolvers() -> Result<Vec<SocketAddr>, NetError> {
    let text = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
        NetError::io(
            "reading /etc/resolv.conf for the DNS upstream (or set CAPSULES_NET_DNS)",
            e,
        )
    })?;
    let v: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if v.is_empty() {
        return Err(NetError::Config(
            "/etc/resolv.conf names no nameserver; set CAPSULES_NET_DNS=ip:port".into(),
        ));
    }
    Ok(v)
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn new_mark(prev: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(7))
        .unwrap_or(1);
    let mut m = nanos | 1; // never 0: every unmarked connection has mark 0
    if m == prev {
        m = m.wrapping_add(2);
    }
    m
}

fn mode_for(policy: &NetworkPolicy) -> Mode {
    match policy {
        NetworkPolicy::None => Mode::Refuse,
        NetworkPolicy::Internet => Mode::Forward { domains: Vec::new() },
        NetworkPolicy::Allow(list) => Mode::Forward {
            domains: list
                .iter()
                .filter_map(|e| match e {
                    AllowEntry::Domain(d) => Some(d.clone()),
                    AllowEntry::Cidr(_) => None,
                })
                .collect(),
        },
    }
}

impl Network {
    /// Checks privileges and tools, reads the DNS upstream, creates or refreshes the backend's table
    /// and enables IPv4 forwarding if it was off (with the forwarding guard). Must run inside a tokio
    /// runtime (the forwarders are tasks on it).
    pub async fn new(cfg: NetConfig) -> Result<Self, NetError> {
        cfg.validate()?;
        if !has_net_admin() {
            return Err(NetError::NotPrivileged);
        }
        let ip = Ip {
            bin: find_tool(&cfg.ip_bin, "ip")?,
        };
        let nft = Nft {
            bin: find_tool(&cfg.nft_bin, "nft")?,
        };
        let upstreams = if cfg.dns_upstreams.is_empty() {
            host_resolvers()?
        } else {
            cfg.dns_upstreams.clone()
        };
        let forward_on = std::fs::read_to_string(IP_FORWARD)
            .map_err(|e| NetError::io(format!("reading {IP_FORWARD}"), e))?
            .trim()
            == "1";
        // Forwarding on and our table carries the guard: we turned it on earlier; keep the guard.
        let existing = nft
            .exec("reading the table", &["list", "table", "inet", &cfg.table], None)
            .await;
        let had_guard = existing.as_deref().is_ok_and(|t| t.contains(nft::GUARD_COMMENT));
        let guard = !forward_on || had_guard;
        nft.run("installing the capsules table", &nft::base_script(&cfg.table, guard))
            .await?;
        if !forward_on {
            std::fs::write(IP_FORWARD, "1")
                .map_err(|e| NetError::io(format!("enabling IPv4 forwarding ({IP_FORWARD})"), e))?;
            tracing::info!(table = %cfg.table, "enabled IPv4 forwarding; the table drops all other forwarded traffic");
        }
        Ok(Network {
            cfg,
            ip,
            nft,
            upstreams,
            guard,
            inner: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The DNS upstreams the forwarders use.
    pub fn dns_upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Whether this backend turned IPv4 forwarding on (and its table drops all other forwarded traffic).
    pub fn forwarding_guard(&self) -> bool {
        self.guard
    }

    /// `nft list table inet <table>` (for diagnostics).
    pub async fn list_table(&self) -> Result<String, NetError> {
        self.nft
            .exec("listing the table", &["list", "table", "inet", &self.cfg.table], None)
            .await
    }

    /// The network of a capsule this backend manages.
    pub async fn get(&self, capsule_id: &str) -> Option<CapsuleNet> {
        self.inner.lock().await.get(capsule_id).map(|e| e.net.clone())
    }

    fn slot_addrs(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let IpAddr::V4(base) = self.cfg.pool.addr() else {
            unreachable!("validated IPv4 pool")
        };
        let net = u32::from(base) + slot * 4;
        (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2))
    }

    fn tap_name(&self, slot: u32) -> String {
        format!("{}{slot}", self.cfg.tap_prefix)
    }

    /// The slot of one of our link names (`<prefix><digits>`).
    fn slot_of(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.cfg.tap_prefix)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) || (rest.len() > 1 && rest.starts_with('0')) {
            return None;
        }
        rest.parse().ok().filter(|s| *s < self.cfg.slots())
    }

    /// Sets up a capsule's network with a tap owned by [`NetConfig::tap_owner`]. See
    /// [`Network::setup_capsule_with`].
    pub async fn setup_capsule(
        &self,
        capsule_id: &str,
        state_dir: Option<&Path>,
        policy: &NetworkPolicy,
    ) -> Result<CapsuleNet, NetError> {
        self.setup_capsule_with(capsule_id, state_dir, policy, HostLink::Tap, None)
            .await
    }

    /// Sets up a capsule's network: allocates a /30, creates the host link (a tap owned by `owner`,
    /// default [`NetConfig::tap_owner`]), installs the capsule's rules and starts its DNS forwarder.
    /// With `state_dir`, the allocation is persisted in `state_dir/net.json` (otherwise the caller
    /// keeps the returned [`CapsuleNet`] and hands it to [`Network::adopt_net`] after a restart).
    /// Idempotent: a capsule that already has a network (here or in `state_dir`) gets the same one
    /// back, with `policy` applied. On failure everything created is removed again.
    pub async fn setup_capsule_with(
        &self,
        capsule_id: &str,
        state_dir: Option<&Path>,
        policy: &NetworkPolicy,
        link: HostLink,
        owner: Option<(u32, u32)>,
    ) -> Result<CapsuleNet, NetError> {
        let mut inner = self.inner.lock().await;
        if inner.contains_key(capsule_id) {
            drop(inner);
            self.apply(capsule_id, policy).await?;
            return self
                .get(capsule_id)
                .await
                .ok_or_else(|| NetError::NotFound(capsule_id.into()));
        }
        if let Some(dir) = state_dir
            && let Some(p) = self.read_state(dir)?
            && p.net.capsule_id == capsule_id
            && p.table == self.cfg.table
        {
            if let Some(other) = inner.values().find(|e| e.net.slot == p.net.slot) {
                return Err(NetError::Config(format!(
                    "{} claims slot {} of capsule {}; remove the file to allocate a new network",
                    dir.join(STATE_FILE).display(),
                    p.net.slot,
                    other.net.capsule_id
                )));
            }
            let net = self.install(&mut inner, p.net, state_dir, policy.clone()).await?;
            return Ok(net);
        }
        let used: HashSet<u32> = inner.values().map(|e| e.net.slot).collect();
        let links: HashSet<u32> = self
            .ip
            .list()
            .await?
            .iter()
            .filter_map(|l| self.slot_of(&l.name))
            .collect();
        let slot = (0..self.cfg.slots())
            .find(|s| !used.contains(s) && !links.contains(s))
            .ok_or(NetError::PoolExhausted {
                pool: self.cfg.pool,
                used: used.len().max(links.len()),
            })?;
        let (host_ip, guest_ip) = self.slot_addrs(slot);
        let net = CapsuleNet {
            capsule_id: capsule_id.to_owned(),
            slot,
            tap_name: self.tap_name(slot),
            mac: format!("52:54:00:ca:{:02x}:{:02x}", (slot >> 8) & 0xff, slot & 0xff),
            host_ip,
            guest_ip,
            prefix_len: 30,
            dns_ip: host_ip,
            link,
            tap_owner: owner.or(self.cfg.tap_owner),
        };
        self.install(&mut inner, net, state_dir, policy.clone()).await
    }

    /// Creates (or re-creates what is missing of) a capsule's link, rules and forwarder; persists.
    async fn install(
        &self,
        inner: &mut HashMap<String, Entry>,
        net: CapsuleNet,
        state_dir: Option<&Path>,
        policy: NetworkPolicy,
    ) -> Result<CapsuleNet, NetError> {
        let created_link = !self.ip.exists(&net.tap_name).await?;
        let r = self.install_inner(&net, state_dir, &policy, created_link).await;
        match r {
            Ok((mark, fwd)) => {
                inner.insert(
                    net.capsule_id.clone(),
                    Entry {
                        net: net.clone(),
                        state_dir: state_dir.map(Path::to_owned),
                        policy,
                        mark,
                        fwd,
                    },
                );
                Ok(net)
            }
            Err(e) => {
                tracing::warn!(capsule = %net.capsule_id, error = %e, "network setup failed; cleaning up");
                if let Err(c) = self.remove_objects(net.slot, &net.tap_name, net.guest_ip).await {
                    tracing::warn!(error = %c, "cleanup of the capsule's rules failed");
                }
                if created_link && let Err(c) = self.ip.delete(&net.tap_name).await {
                    tracing::warn!(error = %c, "cleanup of the capsule's link failed");
                }
                Err(e)
            }
        }
    }

    async fn install_inner(
        &self,
        net: &CapsuleNet,
        state_dir: Option<&Path>,
        policy: &NetworkPolicy,
        create_link: bool,
    ) -> Result<(u32, Forwarder), NetError> {
        if create_link {
            match &net.link {
                HostLink::Tap => {
                    self.ip
                        .add_tap(&net.tap_name, net.tap_owner, self.cfg.tap_multi_queue)
                        .await?
                }
                HostLink::Veth { peer } => self.ip.add_veth(&net.tap_name, peer).await?,
            }
        }
        self.ip
            .configure(&net.tap_name, &net.capsule_id, net.host_ip, net.prefix_len)
            .await?;
        let mark = new_mark(0);
        self.nft
            .run(
                &format!("installing the rules of capsule {}", net.capsule_id),
                &nft::capsule_script(&self.cfg.table, &self.rules(net, policy, mark)),
            )
            .await?;
        let fwd = Forwarder::start(net.host_ip, self.forwarder_shared(net.slot), mode_for(policy)).await?;
        if let Some(dir) = state_dir {
            self.write_state(dir, net, policy)?;
        }
        Ok((mark, fwd))
    }

    fn rules<'a>(&'a self, net: &'a CapsuleNet, policy: &'a NetworkPolicy, mark: u32) -> CapsuleRules<'a> {
        CapsuleRules {
            slot: net.slot,
            tap: &net.tap_name,
            host_ip: net.host_ip,
            guest_ip: net.guest_ip,
            pool: self.cfg.pool,
            policy,
            mark,
        }
    }

    fn forwarder_shared(&self, slot: u32) -> forwarder::Shared {
        forwarder::Shared {
            table: self.cfg.table.clone(),
            slot,
            nft: self.nft.clone(),
            upstreams: self.upstreams.clone(),
            min_ttl: self.cfg.dns_min_ttl,
            max_ttl: self.cfg.dns_max_ttl,
            blocked: nft::blocked_v4(),
        }
    }

    fn read_state(&self, state_dir: &Path) -> Result<Option<Persisted>, NetError> {
        let path = state_dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(NetError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| NetError::State {
            context: format!("{} is unreadable; remove it to allocate a new network", path.display()),
            source,
        })
    }

    fn write_state(&self, state_dir: &Path, net: &CapsuleNet, policy: &NetworkPolicy) -> Result<(), NetError> {
        use std::io::Write;
        let p = Persisted {
            version: 1,
            table: self.cfg.table.clone(),
            net: net.clone(),
            policy: policy.clone(),
        };
        let text = serde_json::to_vec_pretty(&p).map_err(|source| NetError::State {
            context: "serialising the network allocation".into(),
            source,
        })?;
        let path = state_dir.join(STATE_FILE);
        let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
        let ctx = |what: &str| format!("{what} {}", path.display());
        let mut f = std::fs::File::create(&tmp).map_err(|e| NetError::io(ctx("writing"), e))?;
        f.write_all(&text).map_err(|e| NetError::io(ctx("writing"), e))?;
        f.sync_all().map_err(|e| NetError::io(ctx("syncing"), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| NetError::io(ctx("renaming into"), e))?;
        if let Ok(d) = std::fs::File::open(state_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Re-adopts a capsule after a restart of the host process: reads `state_dir/net.json`, makes
    /// sure its link, rules and set exist (re-creating what is missing) and starts its forwarder with
    /// the persisted policy. `Ok(None)` when the directory holds no network of this capsule.
    pub async fn adopt(&self, capsule_id: &str, state_dir: &Path) -> Result<Option<CapsuleNet>, NetError> {
        let mut inner = self.inner.lock().await;
        if let Some(e) = inner.get(capsule_id) {
            return Ok(Some(e.net.clone()));
        }
        let Some(p) = self.read_state(state_dir)? else {
            return Ok(None);
        };
        if p.net.capsule_id != capsule_id || p.table != self.cfg.table {
            return Ok(None);
        }
        if let Some(other) = inner.values().find(|e| e.net.slot == p.net.slot) {
            return Err(NetError::Config(format!(
                "{} claims slot {} of capsule {}",
                state_dir.join(STATE_FILE).display(),
                p.net.slot,
                other.net.capsule_id
            )));
        }
        self.install(&mut inner, p.net, Some(state_dir), p.policy)
            .await
            .map(Some)
    }

    /// Re-adopts a capsule whose [`CapsuleNet`] the caller kept (instead of a `net.json`): makes sure
    /// its link, rules and set exist and starts its forwarder with `policy`.
    pub async fn adopt_net(&self, net: CapsuleNet, policy: &NetworkPolicy) -> Result<CapsuleNet, NetError> {
        let mut inner = self.inner.lock().await;
        if let Some(e) = inner.get(&net.capsule_id) {
            return Ok(e.net.clone());
        }
        if let Some(other) = inner.values().find(|e| e.net.slot == net.slot) {
            return Err(NetError::Config(format!(
                "capsule {} claims slot {} of capsule {}",
                net.capsule_id, net.slot, other.net.capsule_id
            )));
        }
        self.install(&mut inner, net, None, policy.clone()).await
    }

    /// Changes a live capsule's policy in place: its rules in one nft transaction (established
    /// connections are re-checked against the new rules at their next packet, so `internet` →
    /// `none` cuts them at once), and the forwarder's mode. Persists the new policy.
    pub async fn apply(&self, capsule_id: &str, policy: &NetworkPolicy) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        let e = inner
            .get_mut(capsule_id)
            .ok_or_else(|| NetError::NotFound(capsule_id.to_owned()))?;
        let mark = new_mark(e.mark);
        let mode = mode_for(policy);
        // Addresses resolved for domains no longer listed must stop being reachable.
        let flush = mode != mode_for(&e.policy);
        let mut script = String::new();
        if flush {
            script += &format!("flush set inet {} dom_{}\n", self.cfg.table, e.net.slot);
        }
        script += &nft::capsule_script(&self.cfg.table, &self.rules(&e.net, policy, mark));
        self.nft
            .run(&format!("applying policy {policy} to capsule {capsule_id}"), &script)
            .await?;
        e.fwd.set_mode(mode, flush);
        e.mark = mark;
        e.policy = policy.clone();
        match &e.state_dir {
            Some(dir) => self.write_state(dir, &e.net, policy),
            None => Ok(()),
        }
    }

    /// The policy in force for a capsule.
    pub async fn policy(&self, capsule_id: &str) -> Option<NetworkPolicy> {
        self.inner.lock().await.get(capsule_id).map(|e| e.policy.clone())
    }

    async fn remove_objects(&self, slot: u32, tap: &str, guest_ip: Ipv4Addr) -> Result<(), NetError> {
        self.nft
            .run(
                &format!("removing the rules of {tap}"),
                &nft::remove_script(&self.cfg.table, slot, tap, guest_ip),
            )
            .await
    }

    /// Removes a capsule's network: forwarder, rules, set, link, and `net.json`. Idempotent; a
    /// capsule not adopted here is found by its link's alias.
    pub async fn teardown(&self, capsule_id: &str) -> Result<(), NetError> {
        let mut inner = self.inner.lock().await;
        if let Some(e) = inner.remove(capsule_id) {
            drop(e.fwd);
            self.remove_objects(e.net.slot, &e.net.tap_name, e.net.guest_ip).await?;
            self.ip.delete(&e.net.tap_name).await?;
            if let Some(dir) = &e.state_dir {
                let f = dir.join(STATE_FILE);
                if let Err(err) = std::fs::remove_file(&f)
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(NetError::io(format!("removing {}", f.display()), err));
                }
            }
            return Ok(());
        }
        let alias = format!("{ALIAS_PREFIX}{capsule_id}");
        for l in self.ip.list().await? {
            if l.alias.as_deref() == Some(alias.as_str())
                && let Some(slot) = self.slot_of(&l.name)
            {
                self.remove_objects(slot, &l.name, self.slot_addrs(slot).1).await?;
                self.ip.delete(&l.name).await?;
            }
        }
        Ok(())
    }

    /// Removes every leftover with our prefix that no capsule in `keep` owns: links named
    /// `<tap_prefix><slot>` that carry our `capsules:<id>` alias (a link named like ours without it is
    /// left alone), per-slot chains and sets, and stray elements of the shared sets and maps.
    /// Capsules adopted here but not in `keep` are torn down. Call after adopting the live capsules.
    pub async fn sweep<S: AsRef<str>>(&self, keep: &[S]) -> Result<SweepReport, NetError> {
        let keep: HashSet<&str> = keep.iter().map(|s| s.as_ref()).collect();
        let mut report = SweepReport::default();
        let stale: Vec<String> = {
            let inner = self.inner.lock().await;
            inner.keys().filter(|k| !keep.contains(k.as_str())).cloned().collect()
        };
        for id in stale {
            if let Some(n) = self.get(&id).await {
                report.links.push(n.tap_name.clone());
                report.slots.push(n.slot);
            }
            self.teardown(&id).await?;
        }
        let inner = self.inner.lock().await;
        let mut kept_slots: HashSet<u32> = inner.values().map(|e| e.net.slot).collect();
        let mut kept_guests: HashSet<Ipv4Addr> = inner.values().map(|e| e.net.guest_ip).collect();
        for l in self.ip.list().await? {
            let Some(slot) = self.slot_of(&l.name) else { continue };
            if kept_slots.contains(&slot) {
                continue;
            }
            let Some(owner) = l.alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) else {
                // Named like ours but not labelled by us: not ours to delete.
                tracing::warn!(link = %l.name, "sweep: link has our prefix but not our alias; left alone");
                continue;
            };
            if keep.contains(owner) {
                // Kept by the caller though not adopted here: leave it whole.
                kept_slots.insert(slot);
                kept_guests.insert(self.slot_addrs(slot).1);
                continue;
            }
            self.remove_objects(slot, &l.name, self.slot_addrs(slot).1).await?;
            self.ip.delete(&l.name).await?;
            report.links.push(l.name.clone());
            report.slots.push(slot);
        }
        // Per-slot objects without a link, and stray elements.
        let json = self
            .nft
            .exec(
                "listing the table",
                &["-j", "list", "table", "inet", &self.cfg.table],
                None,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|source| NetError::State {
            context: "nft -j list table gave unreadable JSON".into(),
            source,
        })?;
        let mut stale_slots: HashSet<u32> = HashSet::new();
        let mut stray: Vec<String> = Vec::new();
        let t = format!("inet {}", self.cfg.table);
        for obj in v.get("nftables").and_then(|x| x.as_array()).into_iter().flatten() {
            let (kind, body) = match obj.as_object().and_then(|o| o.iter().next()) {
                Some((k, b)) => (k.as_str(), b),
                None => continue,
            };
            let name = body.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let slot_from = |prefix: &str| name.strip_prefix(prefix).and_then(|n| n.parse::<u32>().ok());
            match kind {
                "chain" => {
                    if let Some(s) = slot_from("out_").or_else(|| slot_from("in_"))
                        && !kept_slots.contains(&s)
                    {
                        stale_slots.insert(s);
                    }
                }
                "set" | "map" => {
                    if let Some(s) = slot_from("dom_") {
                        if !kept_slots.contains(&s) {
                            stale_slots.insert(s);
                        }
                        continue;
                    }
                    for el in body.get("elem").and_then(|e| e.as_array()).into_iter().flatten() {
                        let key = match el {
                            serde_json::Value::String(s) => Some(s.clone()),
                            serde_json::Value::Array(a) => a.first().and_then(|k| k.as_str()).map(str::to_owned),
                            other => other
                                .get("elem")
                                .and_then(|e| e.get("val"))
                                .and_then(|k| k.as_str())
                                .map(str::to_owned),
                        };
                        let Some(key) = key else { continue };
                        let stale = match name {
                            "taps" | "fwd_out" | "host_in" => {
                                !self.slot_of(&key).is_some_and(|s| kept_slots.contains(&s))
                            }
                            "guests4" => !key.parse::<Ipv4Addr>().is_ok_and(|ip| kept_guests.contains(&ip)),
                            _ => false,
                        };
                        if stale {
                            let k = if name == "guests4" { key } else { format!("\"{key}\"") };
                            stray.push(format!("delete element {t} {name} {{ {k} }}\n"));
                        }
                    }
                }
                _ => {}
            }
        }
        if !stray.is_empty() {
            // Map elements first (they reference chains), then the sets.
            stray.sort_by_key(|l| !(l.contains(" fwd_out ") || l.contains(" host_in ")));
            self.nft.run("removing stray elements", &stray.concat()).await?;
            report.elements = stray.len();
        }
        let mut stale_slots: Vec<u32> = stale_slots.into_iter().collect();
        stale_slots.sort_unstable();
        for s in stale_slots {
            self.remove_objects(s, &self.tap_name(s), self.slot_addrs(s).1).await?;
            if !report.slots.contains(&s) {
                report.slots.push(s);
            }
        }
        Ok(report)
    }

    /// Removes everything this backend created: every capsule's network, the table, and — if this
    /// backend turned IPv4 forwarding on — turns it off again.
    pub async fn destroy(self) -> Result<(), NetError> {
        self.sweep::<&str>(&[]).await?;
        self.nft
            .exec(
                "deleting the table",
                &["delete", "table", "inet", &self.cfg.table],
                None,
            )
            .await?;
        if self.guard {
            std::fs::write(IP_FORWARD, "0").map_err(|e| NetError::io(format!("restoring {IP_FORWARD}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let c = NetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.slots(), 16384);
        assert!(c.clone().with_tap_prefix("a-b").validate().is_err());
        assert!(c.clone().with_tap_prefix("abcdefghijk").validate().is_err());
        assert!(c.clone().with_tap_prefix("cpt1").validate().is_err());
        assert!(c.clone().with_table("Bad").validate().is_err());
        assert!(
            c.clone()
                .with_pool(Cidr::parse("2001:db8::/64").unwrap())
                .validate()
                .is_err()
        );
        assert!(c.with_pool(Cidr::parse("10.0.0.0/31").unwrap()).validate().is_err());
        assert_eq!(parse_upstream("127.0.0.1").unwrap(), "127.0.0.1:53".parse().unwrap());
        assert_eq!(
            parse_upstream("127.0.0.1:5300").unwrap(),
            "127.0.0.1:5300".parse().unwrap()
        );
        assert!(parse_upstream("resolver").is_err());
    }

    #[test]
    fn cmdline() {
        let n = CapsuleNet {
            capsule_id: "cap_x".into(),
            slot: 1,
            tap_name: "cpt1".into(),
            mac: "52:54:00:ca:00:01".into(),
            host_ip: Ipv4Addr::new(10, 213, 0, 5),
            guest_ip: Ipv4Addr::new(10, 213, 0, 6),
            prefix_len: 30,
            dns_ip: Ipv4Addr::new(10, 213, 0, 5),
            link: HostLink::Tap,
            tap_owner: Some((1000, 1000)),
        };
        assert_eq!(
            n.kernel_cmdline(),
            "capsules.ip=10.213.0.6/30 capsules.gw=10.213.0.5 capsules.dns=10.213.0.5"
        );
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<CapsuleNet>(&json).unwrap(), n);
    }

    #[test]
    fn marks_are_never_zero_and_change() {
        for p in [0, 1, 3, u32::MAX] {
            let m = new_mark(p);
            assert_ne!(m, 0);
            assert_ne!(m, p);
        }
    }
}
