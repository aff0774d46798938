//! Network policy tests for `capsules_microvm::net`, entirely inside network namespaces this binary
//! makes: the process unshares its network namespace before anything else, and every test runs in a
//! thread with yet another fresh namespace (its "host"), holding its own target namespaces, veth
//! "guests", a DNS stub as the forwarders' upstream, and the backend's table. When a test ends (also
//! by failing) its namespaces die with everything in them; the tests still check that teardown and
//! sweep leave nothing behind. No packet leaves these namespaces; every address connected to belongs
//! to a namespace made here.
//!
//! Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), `ip` and `nft`; without them every test is reported
//! as ignored with the reason.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsules_core::types::NetworkPolicy;
use capsules_microvm::net::{CapsuleNet, HostLink, NetConfig, Network, STATE_FILE, dns};
use capsules_microvm::testing::DnsStub;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use nix::sched::{CloneFlags, setns, unshare};

type R = Result<(), Failed>;
type TestFn = fn() -> R;

// ---------------------------------------------------------------------------------------------
// Namespaces

/// An unnamed network namespace, kept alive by an fd.
struct Ns {
    fd: OwnedFd,
}

impl Ns {
    fn new() -> Ns {
        let fd = std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            let f = File::open("/proc/thread-self/ns/net").expect("open own netns");
            let fd = OwnedFd::from(f);
            sh(&["ip", "link", "set", "lo", "up"]).expect("lo up");
            fd
        })
        .join()
        .expect("netns thread");
        Ns { fd }
    }

    /// A path `ip ... netns PATH` understands.
    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    /// Runs `f` on a thread inside this namespace (sockets it creates live there).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.fd, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Starts a long-running thread inside this namespace.
    fn spawn(&self, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
        let fd = self.fd.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            drop(fd);
            f()
        })
    }

    fn sh(&self, args: &[&str]) -> Result<String, String> {
        self.run(|| sh(args))
    }
}

/// Runs a command in the calling thread's namespace.
fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -d -j link show dev NAME` of the calling thread's namespace, or `None` if there is no such link.
fn link_info(name: &str) -> Option<serde_json::Value> {
    let out = sh(&["ip", "-d", "-j", "link", "show", "dev", name]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.get(0).cloned()
}

fn ensure(cond: bool, msg: impl Into<String>) -> R {
    if cond { Ok(()) } else { Err(msg.into().into()) }
}

// ---------------------------------------------------------------------------------------------
// Listeners and the DNS stub

/// Stops its threads on drop.
struct Stopper {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP server on 0.0.0.0:port: says `hello <local addr>\n`, then echoes lines.
fn tcp_server(ns: Option<&Ns>, port: u16) -> Stopper {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = stop.clone();
    let body = move || {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind test server");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !s2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((c, _)) => {
                    let s3 = s2.clone();
                    conns.push(std::thread::spawn(move || serve_echo(c, s3)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    };
    let t = match ns {
        Some(ns) => ns.spawn(body),
        None => std::thread::spawn(body),
    };
    rx.recv_timeout(Duration::from_secs(5)).expect("test server started");
    Stopper { stop, threads: vec![t] }
}

fn serve_echo(c: TcpStream, stop: Arc<AtomicBool>) {
    c.set_nonblocking(false).ok();
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let local = c.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut w = c.try_clone().unwrap();
    if writeln!(w, "hello {local}").is_err() {
        return;
    }
    let mut r = BufReader::new(c);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(_) => continue,
        }
    }
}

const OK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
/// What the forwarders' upstream (a [`DnsStub`]) answers.
const STUB_ANSWERS: &[(&str, Ipv4Addr)] = &[("ok.test", OK_IP), ("www.ok.test", OK_IP), ("other.test", OTHER_IP)];

// ---------------------------------------------------------------------------------------------
// The world of one test

const PORT: u16 = 8080;
/// Blocked targets (each an address of the "outside" namespace): name → address.
const BLOCKED: &[(&str, Ipv4Addr)] = &[
    ("10/8", Ipv4Addr::new(10, 77, 0, 10)),
    ("172.16/12", Ipv4Addr::new(172, 16, 5, 10)),
    ("192.168/16", Ipv4Addr::new(192, 168, 77, 10)),
    ("100.64/10", Ipv4Addr::new(100, 64, 7, 10)),
    ("metadata", Ipv4Addr::new(169, 254, 169, 254)),
];
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const HOST_OUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

struct World {
    rt: tokio::runtime::Runtime,
    net: Option<Network>,
    dns: DnsStub,
    _outside: Ns,
    dirs: tempfile::TempDir,
    guests: HashMap<String, Guest>,
    _servers: Vec<Stopper>,
    next_peer: AtomicU64,
}

struct Guest {
    ns: Ns,
    net: CapsuleNet,
}

impl World {
    /// Builds the topology in the calling thread's (fresh) namespace and a `Network` on it.
    fn new(cfg: impl FnOnce(NetConfig) -> NetConfig) -> Result<World, Failed> {
        let outside = Ns::new();
        sh(&["ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1"])?;
        sh(&["ip", "link", "set", "out1", "netns", &outside.path()])?;
        sh(&["ip", "addr", "add", "192.0.2.1/24", "dev", "out0"])?;
        sh(&["ip", "link", "set", "out0", "up"])?;
        outside.sh(&["ip", "addr", "add", "192.0.2.2/24", "dev", "out1"])?;
        outside.sh(&["ip", "link", "set", "out1", "up"])?;
        outside.sh(&["ip", "route", "add", "default", "via", "192.0.2.1"])?;
        let mut targets: Vec<Ipv4Addr> = BLOCKED.iter().map(|(_, a)| *a).collect();
        targets.extend([PUBLIC, OK_IP, OTHER_IP]);
        for t in &targets {
            outside.sh(&["ip", "addr", "add", &format!("{t}/32"), "dev", "lo"])?;
            sh(&[
                "ip",
                "route",
                "add",
                &format!("{t}/32"),
                "via",
                "192.0.2.2",
                "dev",
                "out0",
            ])?;
        }
        let servers = vec![
            tcp_server(Some(&outside), PORT),
            // A listener on the host itself (all addresses, incl. every tap's host side).
            tcp_server(None, 2222),
        ];
        let dns = DnsStub::start(STUB_ANSWERS).expect("the DNS stub");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let config = cfg(NetConfig::default().with_dns_upstreams(vec![dns.addr]));
        let net = rt.block_on(Network::new(config))?;
        Ok(World {
            rt,
            net: Some(net),
            dns,
            _outside: outside,
            dirs: tempfile::tempdir()?,
            guests: HashMap::new(),
            _servers: servers,
            next_peer: AtomicU64::new(0),
        })
    }

    fn net(&self) -> &Network {
        self.net.as_ref().expect("network")
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        let d = self.dirs.path().join(id);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A veth "guest" with the capsule's addresses, default route via the host side.
    fn guest(&mut self, id: &str, policy: &str) -> Result<CapsuleNet, Failed> {
        self.guest_on(None, id, policy)
    }

    /// [`World::guest`] on another backend's network (`None`: this world's).
    fn guest_on(&mut self, net: Option<&Network>, id: &str, policy: &str) -> Result<CapsuleNet, Failed> {
        let policy = NetworkPolicy::parse(policy).map_err(|e| e.to_string())?;
        let peer = format!("gp{}", self.next_peer.fetch_add(1, Ordering::SeqCst));
        let dir = self.state_dir(id);
        let net = net.unwrap_or_else(|| self.net.as_ref().expect("network"));
        let n = self.rt.block_on(net.setup_capsule_with(
            id,
            Some(&dir),
            &policy,
            HostLink::Veth { peer: peer.clone() },
            None,
        ))?;
        let ns = Ns::new();
        sh(&["ip", "link", "set", &peer, "netns", &ns.path()])?;
        ns.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/{}", n.guest_ip, n.prefix_len),
            "dev",
            &peer,
        ])?;
        ns.sh(&["ip", "link", "set", &peer, "up"])?;
        ns.sh(&["ip", "route", "add", "default", "via", &n.host_ip.to_string()])?;
        let g = Guest { ns, net: n.clone() };
        // Wait until the link carries traffic (a veth is not up at once): the forwarder answers
        // (NXDOMAIN, or REFUSED under none; the name is listed nowhere, so nothing is opened).
        let t = Instant::now();
        while g.resolve_with("ready.test", false, Duration::from_millis(100)).is_err() {
            if t.elapsed() > Duration::from_secs(5) {
                return Err(format!("guest {id}: the forwarder never answered").into());
            }
        }
        self.guests.insert(id.to_owned(), g);
        Ok(n)
    }

    fn g(&self, id: &str) -> &Guest {
        &self.guests[id]
    }

    fn apply(&self, id: &str, policy: &str) -> R {
        let policy = NetworkPolicy::parse(policy).map_err(|e| e.to_string())?;
        Ok(self.rt.block_on(self.net().apply(id, &policy))?)
    }

    fn table(&self) -> String {
        self.rt
            .block_on(self.net().list_table())
            .unwrap_or_else(|e| format!("<{e}>"))
    }
}

impl Guest {
    /// Connects to `ip:port` and reads the greeting.
    fn connect(&self, ip: Ipv4Addr, port: u16) -> std::io::Result<String> {
        self.ns.run(|| {
            let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), port), CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            if line.is_empty() {
                return Err(std::io::Error::other("connection closed without a greeting"));
            }
            Ok(line.trim().to_owned())
        })
    }

    fn open(&self, ip: Ipv4Addr, port: u16) -> std::io::Result<BufReader<TcpStream>> {
        self.ns.run(|| {
            let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), port), CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line)?;
            Ok(r)
        })
    }

    /// Asks the forwarder (UDP, or TCP) for `name`'s A records: (rcode, addresses).
    fn resolve(&self, name: &str, tcp: bool) -> std::io::Result<(u8, Vec<Ipv4Addr>)> {
        self.resolve_with(name, tcp, Duration::from_secs(3))
    }

    fn resolve_with(&self, name: &str, tcp: bool, timeout: Duration) -> std::io::Result<(u8, Vec<Ipv4Addr>)> {
        let server = SocketAddr::new(IpAddr::V4(self.net.dns_ip), 53);
        let q = dns::build_query(0x4242, name, 1).expect("query");
        let resp = self.ns.run(|| -> std::io::Result<Vec<u8>> {
            if tcp {
                let mut s = TcpStream::connect_timeout(&server, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                let mut out = (q.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&q);
                s.write_all(&out)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut buf)?;
                Ok(buf)
            } else {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(timeout))?;
                s.send_to(&q, server)?;
                let mut buf = [0u8; 4096];
                let (n, _) = s.recv_from(&mut buf)?;
                Ok(buf[..n].to_vec())
            }
        })?;
        let r = dns::parse_response(&resp).map_err(std::io::Error::other)?;
        if r.header.id != 0x4242 {
            return Err(std::io::Error::other("wrong id"));
        }
        let ips = r
            .answers
            .iter()
            .filter_map(|a| match a.data {
                dns::RData::A(ip) => Some(ip),
                _ => None,
            })
            .collect();
        Ok((r.header.rcode(), ips))
    }
}

fn expect_ok(g: &Guest, ip: Ipv4Addr, port: u16, why: &str) -> R {
    match g.connect(ip, port) {
        Ok(greeting) => ensure(
            greeting == format!("hello {ip}"),
            format!("{why}: odd greeting {greeting:?}"),
        ),
        Err(e) => Err(format!("{why}: connecting to {ip}:{port} failed: {e}").into()),
    }
}

fn expect_blocked(g: &Guest, ip: Ipv4Addr, port: u16, why: &str) -> R {
    match g.connect(ip, port) {
        Ok(greeting) => Err(format!("{why}: {ip}:{port} was reachable ({greeting})").into()),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

fn blocked_ranges_and_dns_under_internet() -> R {
    let mut w = World::new(|c| c)?;
    w.guest("cap_a", "internet")?;
    let a = w.g("cap_a");
    // The targets are real: the host namespace reaches every one of them.
    for (name, ip) in BLOCKED.iter().copied().chain([("public", PUBLIC)]) {
        let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), PORT), CONNECT_TIMEOUT);
        ensure(s.is_ok(), format!("test setup: host cannot reach {name} {ip}"))?;
    }
    for (name, ip) in BLOCKED {
        expect_blocked(a, *ip, PORT, &format!("internet must block {name}"))?;
    }
    expect_ok(a, PUBLIC, PORT, "internet reaches the public stand-in")?;
    let (rcode, ips) = a.resolve("ok.test", false)?;
    ensure(rcode == 0 && ips == vec![OK_IP], format!("udp dns: {rcode} {ips:?}"))?;
    let (rcode, ips) = a.resolve("other.test", true)?;
    ensure(rcode == 0 && ips == vec![OTHER_IP], format!("tcp dns: {rcode} {ips:?}"))?;
    let (rcode, _) = a.resolve("nxdomain.test", false)?;
    ensure(rcode == 3, format!("nxdomain relayed, got rcode {rcode}"))?;
    expect_ok(a, OK_IP, PORT, "internet reaches a resolved public address")?;
    // Garbage never takes the forwarder down: random bytes, truncated queries, responses, a TCP
    // length prefix with no body; afterwards it still answers.
    let server = SocketAddr::new(IpAddr::V4(a.net.dns_ip), 53);
    a.ns.run(|| -> std::io::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let q = dns::build_query(7, "ok.test", 1).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..300usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut pkt = q.clone();
            match i % 3 {
                0 => pkt = x.to_le_bytes().repeat(1 + i % 40),
                1 => pkt.truncate((x as usize) % q.len()),
                _ => {
                    pkt[2] |= 0x80;
                    let n = pkt.len();
                    pkt[(x as usize) % n] = (x >> 8) as u8;
                }
            }
            s.send_to(&pkt, server)?;
        }
        let mut t = TcpStream::connect_timeout(&server, CONNECT_TIMEOUT)?;
        t.write_all(&[0xff, 0xff, 1, 2, 3])?;
        drop(t);
        Ok(())
    })?;
    // (Garbage that happens to parse as a query holds one of the bounded in-flight slots until
    // the upstream deadline, so allow a few seconds.)
    let mut answered = false;
    for _ in 0..4 {
        if let Ok((0, ips)) = a.resolve("ok.test", false)
            && ips == vec![OK_IP]
        {
            answered = true;
            break;
        }
    }
    ensure(answered, "forwarder still answers after garbage")?;
    println!("--- ruleset (internet) ---\n{}", w.table());
    Ok(())
}

fn allow_cidrs_open_exactly_the_listed_targets() -> R {
    let mut w = World::new(|c| c)?;
    let list: Vec<String> = BLOCKED.iter().map(|(_, ip)| format!("{ip}/32")).collect();
    w.guest("cap_a", &format!("allow:{}", list.join(",")))?;
    w.guest("cap_b", "allow:10.77.0.10/32")?;
    let (a, b) = (w.g("cap_a"), w.g("cap_b"));
    for (name, ip) in BLOCKED {
        expect_ok(a, *ip, PORT, &format!("allow lists {name}"))?;
    }
    expect_blocked(a, PUBLIC, PORT, "allow does not list the public target")?;
    expect_ok(b, Ipv4Addr::new(10, 77, 0, 10), PORT, "allow lists 10.77.0.10")?;
    for (name, ip) in &BLOCKED[1..] {
        expect_blocked(b, *ip, PORT, &format!("allow does not list {name}"))?;
    }
    let (rcode, ips) = b.resolve("ok.test", false)?;
    ensure(rcode == 0 && ips == vec![OK_IP], "DNS works under allow")?;
    Ok(())
}

fn allow_domain_opens_resolved_addresses_only() -> R {
    let mut w = World::new(|c| c)?;
    let n = w.guest("cap_a", "allow:ok.test")?;
    let a = w.g("cap_a");
    expect_blocked(a, OK_IP, PORT, "before ok.test was resolved")?;
    let (rcode, ips) = a.resolve("ok.test", false)?;
    ensure(
        rcode == 0 && ips == vec![OK_IP],
        format!("resolving ok.test: {rcode} {ips:?}"),
    )?;
    expect_ok(a, OK_IP, PORT, "after resolving ok.test")?;
    let (rcode, ips) = a.resolve("other.test", false)?;
    ensure(rcode == 0 && ips == vec![OTHER_IP], "other.test resolves")?;
    expect_blocked(a, OTHER_IP, PORT, "other.test is not listed")?;
    expect_blocked(a, PUBLIC, PORT, "public target not listed")?;
    let set = sh(&["nft", "list", "set", "inet", "capsules", &format!("dom_{}", n.slot)])?;
    ensure(
        set.contains("198.51.100.7 timeout 5m") && !set.contains("198.51.100.8"),
        format!("set holds ok.test's address with its TTL: {set}"),
    )?;
    println!("--- ruleset (allow:ok.test, after resolving) ---\n{}", w.table());
    Ok(())
}

fn allow_domain_connections_outlive_ttl_but_not_a_policy_change() -> R {
    let mut w = World::new(|mut c| {
        c.dns_min_ttl = 1;
        c.dns_max_ttl = 2;
        c
    })?;
    let n = w.guest("cap_a", "allow:ok.test")?;
    let a = w.g("cap_a");
    ensure(
        a.resolve("www.ok.test", false)?.1 == vec![OK_IP],
        "a subdomain of a listed name resolves",
    )?;
    expect_ok(a, OK_IP, PORT, "subdomain of a listed name opens its address")?;
    let mut conn = a.open(OK_IP, PORT)?;
    std::thread::sleep(Duration::from_millis(3200));
    let set = sh(&["nft", "list", "set", "inet", "capsules", &format!("dom_{}", n.slot)])?;
    ensure(
        !set.contains("198.51.100.7"),
        format!("element expired after its TTL: {set}"),
    )?;
    expect_blocked(a, OK_IP, PORT, "new connections need a fresh resolution")?;
    writeln!(conn.get_mut(), "still")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    ensure(line.trim() == "still", "an established connection outlives the element")?;
    // A policy change re-checks it: with ok.test no longer listed it is cut.
    w.apply("cap_a", "allow:other.test")?;
    writeln!(conn.get_mut(), "after")?;
    line.clear();
    ensure(
        conn.read_line(&mut line).is_err() || line.is_empty(),
        format!("apply cuts the domain connection, got {line:?}"),
    )?;
    Ok(())
}

fn apply_revokes_addresses_of_unlisted_domains() -> R {
    let mut w = World::new(|c| c)?;
    w.guest("cap_a", "allow:ok.test")?;
    let a = w.g("cap_a");
    ensure(a.resolve("ok.test", false)?.1 == vec![OK_IP], "resolve ok.test")?;
    expect_ok(a, OK_IP, PORT, "ok.test listed and resolved")?;
    w.apply("cap_a", "allow:other.test")?;
    let a = w.g("cap_a");
    expect_blocked(a, OK_IP, PORT, "ok.test no longer listed")?;
    expect_blocked(a, OTHER_IP, PORT, "other.test not resolved yet")?;
    ensure(
        a.resolve("other.test", true)?.1 == vec![OTHER_IP],
        "resolve other.test over TCP",
    )?;
    expect_ok(a, OTHER_IP, PORT, "other.test listed and resolved")?;
    // Same domains, other CIDRs: resolved addresses stay.
    w.apply("cap_a", "allow:other.test,203.0.113.10/32")?;
    expect_ok(w.g("cap_a"), OTHER_IP, PORT, "still resolved")?;
    expect_ok(w.g("cap_a"), PUBLIC, PORT, "new CIDR")?;
    println!("--- ruleset (allow:other.test,203.0.113.10/32) ---\n{}", w.table());
    Ok(())
}

fn backend_provider_round_trip() -> R {
    use capsules_core::types::CapsuleId;
    use capsules_microvm::backend::NetworkProvider;
    let w = World::new(|c| c)?;
    let id = CapsuleId::parse("cap_provider").map_err(|e| e.to_string())?;
    let net = w.net();
    let att =
        w.rt.block_on(NetworkProvider::setup(
            net,
            &id,
            &NetworkPolicy::Internet,
            Some((65534, 65534)),
        ))
        .map_err(|e| e.to_string())?;
    ensure(
        att.cmdline.contains("capsules.ip=") && att.tap.starts_with("cpt"),
        format!("{att:?}"),
    )?;
    ensure(link_info(&att.tap).is_some(), "tap created")?;
    // Restart: a new Network adopts from the attachment alone, then sweeps.
    let mut w = w;
    drop(w.net.take());
    let net2 =
        w.rt.block_on(Network::new(NetConfig::default().with_dns_upstreams(vec![w.dns.addr])))?;
    let p = |s: &str| NetworkPolicy::parse(s).unwrap();
    w.rt.block_on(NetworkProvider::adopt(&net2, &id, &att, &p("none")))
        .map_err(|e| e.to_string())?;
    w.rt.block_on(NetworkProvider::sweep(&net2, std::slice::from_ref(&id)))
        .map_err(|e| e.to_string())?;
    ensure(link_info(&att.tap).is_some(), "kept through sweep")?;
    w.rt.block_on(NetworkProvider::apply(&net2, &id, &att, &p("allow:ok.test")))
        .map_err(|e| e.to_string())?;
    ensure(
        w.rt.block_on(net2.policy(id.as_str())) == Some(p("allow:ok.test")),
        "policy applied",
    )?;
    w.rt.block_on(NetworkProvider::teardown(&net2, &id, &att))
        .map_err(|e| e.to_string())?;
    ensure(link_info(&att.tap).is_none(), "tap gone")?;
    let table = w.rt.block_on(net2.list_table())?;
    ensure(!table.contains("out_"), format!("no rules left: {table}"))?;
    Ok(())
}

fn none_and_live_apply() -> R {
    let mut w = World::new(|c| c)?;
    w.guest("cap_a", "internet")?;
    expect_ok(w.g("cap_a"), PUBLIC, PORT, "internet")?;
    let mut conn = w.g("cap_a").open(PUBLIC, PORT)?;
    writeln!(conn.get_mut(), "ping1")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    ensure(line.trim() == "ping1", "echo on the established connection")?;

    let t = Instant::now();
    w.apply("cap_a", "none")?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let a = w.g("cap_a");
    expect_blocked(a, PUBLIC, PORT, "none blocks new connections")?;
    writeln!(conn.get_mut(), "ping2")?;
    line.clear();
    ensure(
        conn.read_line(&mut line).is_err() || line.is_empty(),
        format!("none cuts the established connection too, got {line:?}"),
    )?;
    let (rcode, ips) = a.resolve("ok.test", false)?;
    ensure(
        rcode == 5 && ips.is_empty(),
        format!("none answers DNS REFUSED itself, got {rcode}"),
    )?;
    let before = w.dns.queries.load(Ordering::SeqCst);
    let _ = a.resolve("ok.test", true)?;
    ensure(
        w.dns.queries.load(Ordering::SeqCst) == before,
        "none forwards nothing upstream",
    )?;
    println!("--- ruleset (none) ---\n{}", w.table());

    w.apply("cap_a", "internet")?;
    expect_ok(w.g("cap_a"), PUBLIC, PORT, "back to internet")?;
    println!("measure: apply internet->none took {apply_ms:.1} ms");
    Ok(())
}

fn capsules_cannot_reach_each_other_or_the_host() -> R {
    let mut w = World::new(|c| c)?;
    let na = w.guest("cap_a", "internet")?;
    let nb = w.guest("cap_b", "internet")?;
    let _srv_b = tcp_server(Some(&w.g("cap_b").ns), 9000);
    let _srv_b53 = tcp_server(Some(&w.g("cap_b").ns), 53);
    // The listeners are real: B reaches its own, the host reaches its own.
    ensure(w.g("cap_b").connect(nb.guest_ip, 9000).is_ok(), "setup: B's listener")?;
    ensure(
        TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(na.host_ip), 2222), CONNECT_TIMEOUT).is_ok(),
        "setup: host listener on 2222",
    )?;
    let a = w.g("cap_a");
    expect_blocked(a, nb.guest_ip, 9000, "A -> B's guest address")?;
    expect_blocked(a, nb.guest_ip, 53, "A -> B's guest address port 53")?;
    for port in [22, 80, 2222, 8080] {
        expect_blocked(a, na.host_ip, port, "A -> its own host side")?;
        expect_blocked(a, nb.host_ip, port, "A -> B's host side")?;
    }
    expect_blocked(a, HOST_OUT, 2222, "A -> the host's other address")?;
    // Port 53 on its own host side answers DNS (UDP and TCP), on B's host side it does not.
    ensure(a.resolve("ok.test", false)?.1 == vec![OK_IP], "A's DNS over UDP")?;
    ensure(a.resolve("ok.test", true)?.1 == vec![OK_IP], "A's DNS over TCP")?;
    let other =
        a.ns.run(|| TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(nb.host_ip), 53), CONNECT_TIMEOUT).is_ok());
    ensure(!other, "A reaches B's forwarder")?;
    Ok(())
}

fn real_tap_owner_addresses_and_cleanup() -> R {
    let w = World::new(|c| {
        c.with_table("captest")
            .with_tap_prefix("ctp")
            .with_tap_owner(65534, 65534)
    })?;
    let dir = w.state_dir("cap_tap");
    let t = Instant::now();
    let n =
        w.rt.block_on(w.net().setup_capsule("cap_tap", Some(&dir), &NetworkPolicy::Internet))?;
    let setup_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure(
        n.tap_name.starts_with("ctp") && n.tap_name.len() <= 15,
        format!("tap name {}", n.tap_name),
    )?;
    // (/sys/class/net shows the namespace sysfs was mounted in, so ask over netlink.)
    let info = link_info(&n.tap_name).ok_or("tap exists")?;
    let tun = &info["linkinfo"]["info_data"];
    ensure(
        info["linkinfo"]["info_kind"] == "tun" && tun["type"] == "tap",
        format!("a tap: {info}"),
    )?;
    ensure(tun["persist"] == true, "persistent tap")?;
    let user = nix::unistd::User::from_uid(65534.into()).ok().flatten().map(|u| u.name);
    let group = nix::unistd::Group::from_gid(65534.into())
        .ok()
        .flatten()
        .map(|g| g.name);
    let is = |v: &serde_json::Value, name: Option<String>| {
        v == &serde_json::json!(65534)
            || v.as_str() == Some("65534")
            || (name.is_some() && v.as_str() == name.as_deref())
    };
    ensure(
        is(&tun["user"], user) && is(&tun["group"], group),
        format!("tap owned by the VMM user: {tun}"),
    )?;
    ensure(info["ifalias"] == "capsules:cap_tap", "alias names the capsule")?;
    let addrs = sh(&["ip", "-4", "-o", "addr", "show", "dev", &n.tap_name])?;
    ensure(
        addrs.contains(&format!("{}/30", n.host_ip)),
        format!("host address: {addrs}"),
    )?;
    ensure(
        n.kernel_cmdline()
            == format!(
                "capsules.ip={}/30 capsules.gw={} capsules.dns={}",
                n.guest_ip, n.host_ip, n.host_ip
            ),
        "cmdline",
    )?;
    ensure(n.mac.starts_with("52:54:00:"), "mac")?;
    ensure(dir.join(STATE_FILE).exists(), "net.json persisted")?;
    // The forwarder is bound on the tap's host address even without a VM on the tap.
    let bound = sh(&["ss", "-H", "-uln", "sport", "= :53"]).unwrap_or_default();
    ensure(
        bound.contains(&n.host_ip.to_string()),
        format!("forwarder bound: {bound}"),
    )?;
    let table = w.table();
    ensure(table.contains(&format!("chain out_{}", n.slot)), "rules installed")?;
    println!("--- ruleset (tap, internet, table captest) ---\n{table}");

    let t = Instant::now();
    w.rt.block_on(w.net().teardown("cap_tap"))?;
    let teardown_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure(link_info(&n.tap_name).is_none(), "tap removed")?;
    ensure(!dir.join(STATE_FILE).exists(), "net.json removed")?;
    let table = w.table();
    ensure(
        !table.contains("out_") && !table.contains("in_") && !table.contains("dom_") && !table.contains("ctp"),
        format!("no capsule objects left: {table}"),
    )?;
    let bound = sh(&["ss", "-H", "-uln", "sport", "= :53"]).unwrap_or_default();
    ensure(!bound.contains(&n.host_ip.to_string()), "forwarder stopped")?;
    // Teardown is idempotent.
    w.rt.block_on(w.net().teardown("cap_tap"))?;
    println!("measure: one tap capsule: setup {setup_ms:.1} ms, teardown {teardown_ms:.1} ms");
    Ok(())
}

fn restart_adopt_sweep_and_destroy_leave_nothing() -> R {
    let mut w = World::new(|c| c)?;
    let kept = w.guest("cap_keep", "allow:ok.test")?;
    let dirs: Vec<PathBuf> = ["cap_x", "cap_y"].iter().map(|id| w.state_dir(id)).collect();
    for (id, dir) in ["cap_x", "cap_y"].iter().zip(&dirs) {
        w.rt.block_on(w.net().setup_capsule(id, Some(dir), &NetworkPolicy::Internet))?;
    }
    // "Restart": the old Network goes away (forwarders stop, taps and rules stay).
    drop(w.net.take());
    ensure(
        link_info("cpt1").is_some(),
        "taps survive a restart of the host process",
    )?;
    let net =
        w.rt.block_on(Network::new(NetConfig::default().with_dns_upstreams(vec![w.dns.addr])))?;
    let dir = w.state_dir("cap_keep");
    let adopted = w.rt.block_on(net.adopt("cap_keep", &dir))?;
    ensure(adopted.as_ref() == Some(&kept), "adopt gives the same allocation back")?;
    // A link named like ours but not made by us (no alias) is never swept.
    sh(&["ip", "link", "add", "cpt9", "type", "veth", "peer", "name", "zz9"])?;
    let report = w.rt.block_on(net.sweep(&["cap_keep"]))?;
    println!("sweep removed: {report:?}");
    w.net = Some(net);
    let links = sh(&["ip", "-o", "link", "show"])?;
    ensure(links.contains(&kept.tap_name), "kept link stays")?;
    ensure(report.links.len() == 2, format!("two leftovers swept: {report:?}"))?;
    for d in &dirs {
        // Sweep does not know these dirs; the links and rules are gone though.
        ensure(d.exists(), "state dirs are the caller's")?;
    }
    let table = w.table();
    ensure(
        table.matches("chain out_").count() == 1 && table.contains(&format!("chain out_{}", kept.slot)),
        format!("only the kept capsule's rules remain: {table}"),
    )?;
    // The adopted capsule works: forwarder restarted, allow set in place.
    let g = w.g("cap_keep");
    expect_blocked(g, OK_IP, PORT, "adopted: before resolving")?;
    ensure(
        g.resolve("ok.test", false)?.1 == vec![OK_IP],
        "adopted forwarder answers",
    )?;
    expect_ok(g, OK_IP, PORT, "adopted: after resolving")?;

    // Setup again for a capsule whose net.json exists gives the same allocation.
    let again = w.rt.block_on(w.net().setup_capsule_with(
        "cap_keep",
        Some(&dir),
        &NetworkPolicy::parse("allow:ok.test").unwrap(),
        kept.link.clone(),
        None,
    ))?;
    ensure(again == kept, "setup is idempotent")?;

    ensure(
        link_info("cpt9").is_some(),
        "a foreign link named like ours survives the sweep",
    )?;
    sh(&["ip", "link", "del", "cpt9"])?;
    let net = w.net.take().unwrap();
    let guard = net.forwarding_guard();
    w.rt.block_on(net.destroy())?;
    let links = sh(&["ip", "-o", "link", "show"])?;
    ensure(!links.contains("cpt"), format!("no taps left: {links}"))?;
    ensure(sh(&["nft", "list", "table", "inet", "capsules"]).is_err(), "table gone")?;
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    ensure(!guard || fwd.trim() == "0", "forwarding restored to off")?;
    Ok(())
}

fn forwarding_guard_keeps_other_interfaces_unforwarded() -> R {
    // Two namespaces routed through the test's host namespace, on non-tap interfaces.
    let x = Ns::new();
    let y = Ns::new();
    for (ns, n, hostip, nsip, other) in [
        (&x, "x", "10.99.1.1", "10.99.1.2", "10.99.2.0/24"),
        (&y, "y", "10.99.2.1", "10.99.2.2", "10.99.1.0/24"),
    ] {
        sh(&[
            "ip",
            "link",
            "add",
            &format!("{n}0"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("{n}1"),
        ])?;
        sh(&["ip", "link", "set", &format!("{n}1"), "netns", &ns.path()])?;
        sh(&["ip", "addr", "add", &format!("{hostip}/24"), "dev", &format!("{n}0")])?;
        sh(&["ip", "link", "set", &format!("{n}0"), "up"])?;
        ns.sh(&["ip", "addr", "add", &format!("{nsip}/24"), "dev", &format!("{n}1")])?;
        ns.sh(&["ip", "link", "set", &format!("{n}1"), "up"])?;
        ns.sh(&["ip", "route", "add", other, "via", hostip])?;
    }
    let _srv = tcp_server(Some(&y), 7000);
    let reach = || x.run(|| TcpStream::connect_timeout(&"10.99.2.2:7000".parse().unwrap(), CONNECT_TIMEOUT).is_ok());
    let fwd = || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim()
            .to_owned()
    };
    ensure(fwd() == "0", "a fresh namespace starts with forwarding off")?;
    ensure(!reach(), "setup: nothing forwarded before")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let dns = DnsStub::start(STUB_ANSWERS).expect("the DNS stub");
    let cfg = NetConfig::default().with_dns_upstreams(vec![dns.addr]);
    let net = rt.block_on(Network::new(cfg.clone()))?;
    ensure(fwd() == "1" && net.forwarding_guard(), "forwarding on, with the guard")?;
    ensure(!reach(), "the guard keeps x->y unforwarded")?;
    // A restarted backend keeps the guard (it knows it turned forwarding on).
    drop(net);
    let net = rt.block_on(Network::new(cfg.clone()))?;
    ensure(net.forwarding_guard(), "guard kept across restart")?;
    rt.block_on(net.destroy())?;
    ensure(fwd() == "0", "destroy turns forwarding off again")?;

    // Forwarding already on: other traffic is left alone.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    ensure(reach(), "setup: x->y forwarded when the host forwards")?;
    let net = rt.block_on(Network::new(cfg))?;
    ensure(!net.forwarding_guard(), "no guard when forwarding was on")?;
    ensure(reach(), "x->y still forwarded with our table")?;
    rt.block_on(net.destroy())?;
    ensure(fwd() == "1", "forwarding left on")?;
    Ok(())
}

fn two_backends_on_one_host_do_not_cut_each_other_off() -> R {
    // The first backend finds forwarding off: it turns it on, with its guard.
    let mut w = World::new(|c| c)?;
    ensure(w.net().forwarding_guard(), "the first backend has the guard")?;
    w.guest("cap_a", "internet")?;
    expect_ok(w.g("cap_a"), PUBLIC, PORT, "first backend, alone")?;
    // A second backend (other table, prefix and pool) finds forwarding on: no guard of its own,
    // and the first one's guard must not drop its capsules' traffic.
    let cfg = NetConfig::default()
        .with_table("capsules_two")
        .with_tap_prefix("cpw")
        .with_pool(capsules_core::types::Cidr::parse("10.215.0.0/16").unwrap())
        .with_dns_upstreams(vec![w.dns.addr]);
    let two = w.rt.block_on(Network::new(cfg))?;
    ensure(!two.forwarding_guard(), "the second backend found forwarding on")?;
    w.guest_on(Some(&two), "cap_b", "internet")?;
    let (a, b) = (w.g("cap_a"), w.g("cap_b"));
    expect_ok(b, PUBLIC, PORT, "second backend's capsule beside the first's guard")?;
    expect_ok(a, PUBLIC, PORT, "first backend's capsule beside the second")?;
    expect_blocked(b, BLOCKED[0].1, PORT, "the second backend's own rules still apply")?;
    let (rcode, ips) = b.resolve("ok.test", false)?;
    ensure(rcode == 0 && ips == vec![OK_IP], "DNS on the second backend")?;
    // Other forwarded traffic is still dropped by the first's guard: a namespace routed through
    // the host on a plain veth reaches nothing.
    let x = Ns::new();
    sh(&["ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"])?;
    sh(&["ip", "link", "set", "x1", "netns", &x.path()])?;
    sh(&["ip", "addr", "add", "10.99.1.1/24", "dev", "x0"])?;
    sh(&["ip", "link", "set", "x0", "up"])?;
    x.sh(&["ip", "addr", "add", "10.99.1.2/24", "dev", "x1"])?;
    x.sh(&["ip", "link", "set", "x1", "up"])?;
    x.sh(&["ip", "route", "add", "default", "via", "10.99.1.1"])?;
    let public = SocketAddr::new(IpAddr::V4(PUBLIC), PORT);
    ensure(
        x.run(|| TcpStream::connect_timeout(&public, CONNECT_TIMEOUT).is_err()),
        "a non-capsule interface is still not forwarded",
    )?;
    w.rt.block_on(two.destroy())?;
    expect_ok(w.g("cap_a"), PUBLIC, PORT, "first backend after the second went")?;
    Ok(())
}

fn failed_setup_removes_everything() -> R {
    let w = World::new(|c| c)?;
    // Occupy the first slot's DNS port so the forwarder cannot bind (without SO_REUSEADDR).
    let host_ip = "10.213.0.1";
    sh(&["ip", "addr", "add", &format!("{host_ip}/32"), "dev", "lo"])?;
    let blocker = UdpSocket::bind((host_ip, 53))?;
    sh(&["ip", "addr", "del", &format!("{host_ip}/32"), "dev", "lo"])?;
    let dir = w.state_dir("cap_fail");
    let r =
        w.rt.block_on(w.net().setup_capsule("cap_fail", Some(&dir), &NetworkPolicy::Internet));
    drop(blocker);
    let err = match r {
        Ok(n) => return Err(format!("setup should fail, got {n:?}").into()),
        Err(e) => e.to_string(),
    };
    ensure(
        err.contains("DNS forwarder") && err.contains("10.213.0.1:53"),
        format!("error names it: {err}"),
    )?;
    ensure(link_info("cpt0").is_none(), "tap removed after failed setup")?;
    ensure(!dir.join(STATE_FILE).exists(), "no net.json")?;
    let table = w.table();
    ensure(
        !table.contains("out_0") && !table.contains("cpt0"),
        format!("no rules left: {table}"),
    )?;
    // The slot is free again.
    let n =
        w.rt.block_on(w.net().setup_capsule("cap_ok", None, &NetworkPolicy::Internet))?;
    ensure(n.slot == 0, "slot reused")?;
    Ok(())
}

fn measure_setup_teardown_and_dns_latency() -> R {
    let mut w = World::new(|c| c)?;
    // Setup/teardown of tap capsules.
    const N: usize = 20;
    let mut setup = Vec::new();
    let mut teardown = Vec::new();
    let ids: Vec<String> = (0..N).map(|i| format!("cap_m{i}")).collect();
    for id in &ids {
        let dir = w.state_dir(id);
        let t = Instant::now();
        w.rt.block_on(w.net().setup_capsule(id, Some(&dir), &NetworkPolicy::Internet))?;
        setup.push(t.elapsed());
    }
    let t = Instant::now();
    w.apply(&ids[0], "allow:ok.test,203.0.113.0/24")?;
    let apply = t.elapsed();
    for id in &ids {
        let t = Instant::now();
        w.rt.block_on(w.net().teardown(id))?;
        teardown.push(t.elapsed());
    }
    let ms = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2].as_secs_f64() * 1e3, v[v.len() - 1].as_secs_f64() * 1e3)
    };
    let (s50, smax) = ms(&mut setup);
    let (t50, tmax) = ms(&mut teardown);
    println!(
        "measure: tap capsule network setup median {s50:.1} ms (max {smax:.1}), teardown median {t50:.1} ms (max {tmax:.1}), apply {:.1} ms, N={N}",
        apply.as_secs_f64() * 1e3
    );
    ensure(s50 < 2000.0 && t50 < 2000.0, "setup/teardown within liveness bounds")?;

    // DNS latency: direct to the stub (from the host) vs through the forwarder (from a guest).
    w.guest("cap_i", "internet")?;
    w.guest("cap_d", "allow:ok.test")?;
    const Q: usize = 200;
    let direct = {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let q = dns::build_query(1, "ok.test", 1).unwrap();
        let mut buf = [0u8; 512];
        let mut v = Vec::new();
        for _ in 0..Q {
            let t = Instant::now();
            s.send_to(&q, w.dns.addr)?;
            s.recv_from(&mut buf)?;
            v.push(t.elapsed());
        }
        v
    };
    let through = |id: &str| -> Result<Vec<Duration>, Failed> {
        let g = w.g(id);
        let server = SocketAddr::new(IpAddr::V4(g.net.dns_ip), 53);
        Ok(g.ns.run(|| -> std::io::Result<Vec<Duration>> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let q = dns::build_query(1, "ok.test", 1).unwrap();
            let mut buf = [0u8; 512];
            let mut v = Vec::new();
            for _ in 0..Q {
                let t = Instant::now();
                s.send_to(&q, server)?;
                s.recv_from(&mut buf)?;
                v.push(t.elapsed());
            }
            Ok(v)
        })?)
    };
    // Cold: the first answer for an address costs an nft transaction (the set update happens
    // before the answer is returned); a policy change with other domains forgets what was added.
    let mut cold = Vec::new();
    for i in 0..10 {
        w.apply(
            "cap_d",
            if i % 2 == 0 {
                "allow:ok.test,zz.test"
            } else {
                "allow:ok.test"
            },
        )?;
        let g = w.g("cap_d");
        let t = Instant::now();
        ensure(g.resolve("ok.test", false)?.1 == vec![OK_IP], "cold resolve")?;
        cold.push(t.elapsed());
    }
    let mut direct = direct;
    let mut fwd_i = through("cap_i")?;
    let mut fwd_d = through("cap_d")?;
    let us = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    };
    let (d, i, a, c) = (us(&mut direct), us(&mut fwd_i), us(&mut fwd_d), us(&mut cold));
    println!(
        "measure: DNS median per query over UDP, N={Q}: direct to upstream {d:.0} us; via forwarder (internet) {i:.0} us (+{:.0} us); via forwarder, allow-domain, address already in the set {a:.0} us (+{:.0} us); allow-domain, first answer (nft set update) {c:.0} us (N=10)",
        i - d,
        a - d
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn prerequisite_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, taps, nftables)".into());
    }
    for tool in ["ip", "nft", "ss"] {
        if Command::new(tool).arg("-V").output().is_err() && Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("`{tool}` not installed (apt-get install iproute2 nftables)"));
        }
    }
    None
}

/// Runs a test body on a thread in a fresh network namespace.
fn isolated(name: &'static str, body: fn() -> R, skip: Option<String>) -> Trial {
    Trial::ignorable_test(name, move || {
        if let Some(reason) = skip {
            return Ok(Completion::ignored_with(reason));
        }
        let r = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| Failed::from(format!("unshare: {e}")))?;
                sh(&["ip", "link", "set", "lo", "up"])?;
                body()
            })
            .expect("spawn")
            .join();
        match r {
            Ok(r) => r.map(|()| Completion::Completed),
            Err(p) => Err(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )
            .into()),
        }
    })
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    // First thing: leave the machine's network namespace for good.
    let skip = prerequisite_missing().or_else(|| {
        unshare(CloneFlags::CLONE_NEWNET)
            .err()
            .map(|e| format!("cannot create a network namespace: {e}"))
    });
    let tests: Vec<(&'static str, TestFn)> = vec![
        (
            "net_internet_blocks_private_ranges_and_dns_works",
            blocked_ranges_and_dns_under_internet,
        ),
        (
            "net_allow_cidrs_open_exactly_the_listed_targets",
            allow_cidrs_open_exactly_the_listed_targets,
        ),
        (
            "net_allow_domain_opens_resolved_addresses_only",
            allow_domain_opens_resolved_addresses_only,
        ),
        ("net_none_and_live_apply", none_and_live_apply),
        (
            "net_allow_domain_connections_outlive_ttl_but_not_a_policy_change",
            allow_domain_connections_outlive_ttl_but_not_a_policy_change,
        ),
        (
            "net_apply_revokes_addresses_of_unlisted_domains",
            apply_revokes_addresses_of_unlisted_domains,
        ),
        ("net_backend_provider_round_trip", backend_provider_round_trip),
        (
            "net_capsules_cannot_reach_each_other_or_the_host",
            capsules_cannot_reach_each_other_or_the_host,
        ),
        (
            "net_real_tap_owner_addresses_and_cleanup",
            real_tap_owner_addresses_and_cleanup,
        ),
        (
            "net_restart_adopt_sweep_and_destroy_leave_nothing",
            restart_adopt_sweep_and_destroy_leave_nothing,
        ),
        (
            "net_forwarding_guard",
            forwarding_guard_keeps_other_interfaces_unforwarded,
        ),
        (
            "net_two_backends_on_one_host_do_not_cut_each_other_off",
            two_backends_on_one_host_do_not_cut_each_other_off,
        ),
        ("net_failed_setup_removes_everything", failed_setup_removes_everything),
        (
            "net_measure_setup_teardown_and_dns_latency",
            measure_setup_teardown_and_dns_latency,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| isolated(name, f, skip.clone()))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
