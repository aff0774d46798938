//! The network "must hold" cases of the QEMU issue on real QEMU capsules (DESIGN.md §5, §7).
//!
//! A real-VM target (`test = false`; `scripts/test.sh` runs it explicitly). The process moves into
//! a network namespace of its own before anything else; inside it the test makes the QEMU capsules'
//! taps, the backend's nftables table, a DNS stub as the forwarders' upstream, and one namespace
//! per target behind a veth pair, each with an HTTP listener: one in 10.0.0.0/8 (neither the
//! capsule pool 10.213.0.0/16 nor the host's resolver), one each in 172.16/12, 192.168/16,
//! 100.64/10, 169.254.169.254, a stand-in public target in 203.0.113.0/24, and a "web" namespace
//! holding the addresses the stub answers for `ok.test` and `other.test` (198.51.100.0/24). A
//! listener on every address of the test's host namespace stands for the server's API port. Every
//! address connected to belongs to a namespace made here; nothing leaves them.
//!
//! Two `1x1gb` capsules of the `small` image (A: `internet` at create, B: `allow` one CIDR at
//! create) serve every case; each case applies the policy it needs. A capsule connects with
//! [`support::PERL_PROBE`] (perl-base is in every image). The last case terminates both and checks
//! that no tap, rule or VMM is left, then removes the table. A missing prerequisite (root, QEMU,
//! nftables, the guest assets) reports every case as ignored with the reason.

mod support;

use std::future::Future;
use std::net::Ipv4Addr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_core::backend::{BackendState, CapsuleSpec, ExecRequest};
use capsules_core::testkit::backend::{spec, time_scale};
use capsules_core::types::NetworkPolicy;
use capsules_core::{Backend, BackendExt, CapsuleId};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::MicroVmBackend;
use capsules_microvm::net::{CapsuleNet, NetConfig, Network};
use capsules_microvm::testing::{QEMU_TOOLS, check_prerequisites};
use libtest_mimic::{Arguments, Failed, Trial};
use support::{
    HttpListener, OK_IP, OTHER_IP, PERL_HELD_CONNECTION, PERL_HTTP_SERVER, PERL_PROBE, Probe, Target, dns_stub,
    host_fetch, kill_all_with, links_with_prefix, parse_probe, pids_with, sh,
};

type B = MicroVmBackend<QemuVmm>;
type R = Result<(), String>;
type CaseFn = fn(Arc<World>) -> Pin<Box<dyn Future<Output = R> + Send>>;

const TABLE: &str = "capsules_net";
const TAP_PREFIX: &str = "cpn";
/// Port of every target's listener.
const PORT: u16 = 8080;
/// The stand-in for the server's API port: a listener on every address of the test's host namespace.
const API_PORT: u16 = 18080;
/// Port of the HTTP server inside capsule B.
const GUEST_PORT: u16 = 9090;
/// B's policy at create.
const B_ALLOW: &str = "allow:172.16.5.10/32";

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// The blocked targets: (what, host side, target address).
const PRIVATE: [(&str, Ipv4Addr, Ipv4Addr); 5] = [
    ("10/8", Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 10)),
    ("172.16/12", Ipv4Addr::new(172, 16, 5, 1), Ipv4Addr::new(172, 16, 5, 10)),
    (
        "192.168/16",
        Ipv4Addr::new(192, 168, 77, 1),
        Ipv4Addr::new(192, 168, 77, 10),
    ),
    ("100.64/10", Ipv4Addr::new(100, 64, 7, 1), Ipv4Addr::new(100, 64, 7, 10)),
    (
        "metadata",
        Ipv4Addr::new(169, 254, 169, 1),
        Ipv4Addr::new(169, 254, 169, 254),
    ),
];
const PUBLIC_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const WEB_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn at(ip: impl std::fmt::Display, port: u16) -> String {
    format!("{ip}:{port}")
}

fn private_addrs() -> Vec<String> {
    PRIVATE.iter().map(|(_, _, ip)| at(ip, PORT)).collect()
}

/// The two capsules every case uses.
#[derive(Clone)]
struct Pair {
    a: CapsuleId,
    b: CapsuleId,
    a_net: CapsuleNet,
    b_net: CapsuleNet,
}

struct World {
    backend: Mutex<Option<B>>,
    net: Mutex<Option<Arc<Network>>>,
    stub: support::DnsStub,
    scale: u32,
    pair: tokio::sync::Mutex<Option<Pair>>,
    made: Mutex<Vec<CapsuleId>>,
    _targets: Vec<Target>,
    _api: HttpListener,
}

async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("{what}: no answer within {d:?}"))
}

impl World {
    fn secs(&self, s: u64) -> Duration {
        Duration::from_secs(s * u64::from(self.scale))
    }

    fn backend(&self) -> Result<B, String> {
        self.backend
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| "the backend is gone (an earlier case removed it)".to_owned())
    }

    fn net(&self) -> Result<Arc<Network>, String> {
        self.net
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| "the network is gone".to_owned())
    }

    async fn create(&self, s: &CapsuleSpec) -> Result<CapsuleNet, String> {
        let b = self.backend()?;
        self.made.lock().unwrap().push(s.id.clone());
        let t = Instant::now();
        within(self.secs(60), "create", b.create(s))
            .await?
            .map_err(|e| format!("create: {e}"))?;
        eprintln!("  created {} ({}) in {:?}", s.id.as_str(), s.network, t.elapsed());
        self.net()?
            .get(s.id.as_str())
            .await
            .ok_or_else(|| format!("capsule {} has no network", s.id.as_str()))
    }

    /// A (internet) and B (one CIDR allowed at create), created at first use.
    async fn pair(&self) -> Result<Pair, String> {
        let mut p = self.pair.lock().await;
        if let Some(p) = p.as_ref() {
            return Ok(p.clone());
        }
        let a = spec();
        let mut b = spec();
        b.network = NetworkPolicy::parse(B_ALLOW).map_err(|e| e.to_string())?;
        let a_net = self.create(&a).await?;
        let b_net = self.create(&b).await?;
        let pair = Pair {
            a: a.id,
            b: b.id,
            a_net,
            b_net,
        };
        *p = Some(pair.clone());
        Ok(pair)
    }

    async fn apply(&self, id: &CapsuleId, policy: &str) -> R {
        let p = NetworkPolicy::parse(policy).map_err(|e| e.to_string())?;
        let b = self.backend()?;
        let t = Instant::now();
        within(self.secs(10), "apply_network", b.apply_network(id, &p))
            .await?
            .map_err(|e| format!("apply_network({policy}): {e}"))?;
        eprintln!("  applied {policy} in {:?}", t.elapsed());
        Ok(())
    }

    async fn exec(&self, id: &CapsuleId, argv: Vec<String>) -> Result<capsules_core::backend::ExecOutput, String> {
        let b = self.backend()?;
        within(self.secs(60), "exec", b.exec_collect(id, ExecRequest::new(argv)))
            .await?
            .map_err(|e| format!("exec: {e}"))
    }

    /// Runs [`PERL_PROBE`] in the capsule against `targets`.
    async fn probe(&self, id: &CapsuleId, targets: &[String]) -> Result<Vec<Probe>, String> {
        let mut argv: Vec<String> = vec!["perl".into(), "-e".into(), PERL_PROBE.into()];
        argv.extend(targets.iter().cloned());
        let o = self.exec(id, argv).await?;
        ensure!(
            o.status.success(),
            "the probe failed ({:?}): {}{}",
            o.status,
            o.stdout_lossy(),
            o.stderr_lossy()
        );
        parse_probe(&o.stdout_lossy(), targets)
    }

    /// `getent ahostsv4 name` in the capsule: the addresses, or `None` when it resolved nothing.
    async fn resolve(&self, id: &CapsuleId, name: &str) -> Result<Option<Vec<String>>, String> {
        let o = self
            .exec(id, vec!["getent".into(), "ahostsv4".into(), name.into()])
            .await?;
        if !o.status.success() {
            return Ok(None);
        }
        let mut ips: Vec<String> = o
            .stdout_lossy()
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        ips.dedup();
        Ok(Some(ips))
    }

    /// Every target must give exactly `want` (ok = reached the namespace at that address).
    async fn expect(&self, who: &str, id: &CapsuleId, want: &[(String, Probe)]) -> R {
        let targets: Vec<String> = want.iter().map(|(t, _)| t.clone()).collect();
        let got = self.probe(id, &targets).await?;
        let mut bad = Vec::new();
        for ((t, w), g) in want.iter().zip(&got) {
            if w != g {
                bad.push(format!("{t}: want {w:?}, got {g:?}"));
            }
        }
        ensure!(bad.is_empty(), "{who}: {}", bad.join("; "));
        Ok(())
    }

    async fn cleanup(&self) {
        let Ok(b) = self.backend() else { return };
        let ids: Vec<CapsuleId> = std::mem::take(&mut *self.made.lock().unwrap());
        for id in ids {
            match tokio::time::timeout(self.secs(30), b.terminate(&id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("cleanup: terminate {}: {e}", id.as_str()),
                Err(_) => eprintln!("cleanup: terminate {} timed out", id.as_str()),
            }
        }
    }
}

fn ok(ip: impl std::fmt::Display) -> Probe {
    Probe::Ok(ip.to_string())
}

// ---------------------------------------------------------------- cases

async fn private_ranges_blocked_dns_works(w: Arc<World>) -> R {
    // The targets are real: this namespace reaches every one of them.
    for (what, _, ip) in PRIVATE.iter().copied().chain([("public", PUBLIC_HOST, PUBLIC)]) {
        let got = host_fetch(&at(ip, PORT)).map_err(|e| format!("test setup ({what}): {e}"))?;
        ensure!(got == ip.to_string(), "test setup: {ip} answered as {got}");
    }
    let p = w.pair().await?;
    w.apply(&p.a, "internet").await?;
    let mut want: Vec<(String, Probe)> = private_addrs().into_iter().map(|t| (t, Probe::Fail)).collect();
    want.push((at(PUBLIC, PORT), ok(PUBLIC)));
    want.push((at(OK_IP, PORT), ok(OK_IP)));
    w.expect("A under internet", &p.a, &want).await?;

    let before = w.stub.queries.load(Ordering::SeqCst);
    let r = w.resolve(&p.a, "ok.test").await?;
    ensure!(
        r == Some(vec![OK_IP.to_string()]),
        "ok.test through the forwarder: {r:?}"
    );
    let r = w.resolve(&p.a, "other.test").await?;
    ensure!(r == Some(vec![OTHER_IP.to_string()]), "other.test: {r:?}");
    let r = w.resolve(&p.a, "nxdomain.test").await?;
    ensure!(r.is_none(), "nxdomain.test resolved: {r:?}");
    let asked = w.stub.queries.load(Ordering::SeqCst) - before;
    ensure!(asked >= 3, "the stub upstream got {asked} queries for 3 names");
    Ok(())
}

async fn allow_lists_one_target(w: Arc<World>) -> R {
    let p = w.pair().await?;
    let open = at(PRIVATE[0].2, PORT);
    w.apply(&p.a, &format!("allow:{}/32", PRIVATE[0].2)).await?;
    let mut want: Vec<(String, Probe)> = private_addrs()
        .into_iter()
        .map(|t| {
            let r = if t == open { ok(PRIVATE[0].2) } else { Probe::Fail };
            (t, r)
        })
        .collect();
    want.push((at(PUBLIC, PORT), Probe::Fail));
    w.expect("A under allow (applied on the running capsule)", &p.a, &want)
        .await?;

    // B was created with one CIDR allowed.
    let open = at(PRIVATE[1].2, PORT);
    let mut want: Vec<(String, Probe)> = private_addrs()
        .into_iter()
        .map(|t| {
            let r = if t == open { ok(PRIVATE[1].2) } else { Probe::Fail };
            (t, r)
        })
        .collect();
    want.push((at(PUBLIC, PORT), Probe::Fail));
    w.expect(&format!("B under {B_ALLOW} (at create)"), &p.b, &want).await?;
    let r = w.resolve(&p.b, "ok.test").await?;
    ensure!(r == Some(vec![OK_IP.to_string()]), "DNS under allow: {r:?}");
    Ok(())
}

async fn allow_domain_opens_resolved_addresses_only(w: Arc<World>) -> R {
    let p = w.pair().await?;
    w.apply(&p.a, "allow:ok.test").await?;
    w.expect(
        "allow:ok.test, before resolving",
        &p.a,
        &[(at(OK_IP, PORT), Probe::Fail)],
    )
    .await?;
    // `curl http://ok.test:8080/`: the name is resolved through the forwarder, then fetched.
    w.expect(
        "allow:ok.test, fetching http://ok.test:8080/",
        &p.a,
        &[("ok.test:8080".into(), ok(OK_IP))],
    )
    .await?;
    let r = w.resolve(&p.a, "other.test").await?;
    ensure!(
        r == Some(vec![OTHER_IP.to_string()]),
        "other.test resolves though not listed: {r:?}"
    );
    w.expect(
        "allow:ok.test, unlisted names and addresses",
        &p.a,
        &[
            ("other.test:8080".into(), Probe::Fail),
            (at(OTHER_IP, PORT), Probe::Fail),
            (at(PUBLIC, PORT), Probe::Fail),
            (at(PRIVATE[0].2, PORT), Probe::Fail),
        ],
    )
    .await?;
    Ok(())
}

/// Holds a connection from the capsule to the public target open, applies `policy` (if any) while
/// it is open, and says whether the connection still carried data afterwards ("ok" or "cut").
async fn held_connection(w: &World, id: &CapsuleId, policy: Option<&str>) -> Result<String, String> {
    let (ready, go) = ("/tmp/held-ready", "/tmp/held-go");
    let b = w.backend()?;
    let clear = format!("rm -f {ready} {go}");
    w.exec(id, vec!["sh".into(), "-c".into(), clear]).await?;
    let held = {
        let (b, id, d) = (b.clone(), id.clone(), w.secs(60));
        let argv = ["perl", "-e", PERL_HELD_CONNECTION, &at(PUBLIC, PORT), ready, go].map(String::from);
        tokio::spawn(async move { tokio::time::timeout(d, b.exec_collect(&id, ExecRequest::new(argv))).await })
    };
    let t = Instant::now();
    loop {
        let o = w.exec(id, vec!["test".into(), "-e".into(), ready.into()]).await?;
        if o.status.success() {
            break;
        }
        ensure!(t.elapsed() < w.secs(20), "the held connection never got going");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(p) = policy {
        w.apply(id, p).await?;
    }
    w.exec(id, vec!["touch".into(), go.into()]).await?;
    let o = held
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the held connection did not finish".to_owned())?
        .map_err(|e| format!("exec: {e}"))?;
    let out = o.stdout_lossy();
    ensure!(
        out.contains("before ok"),
        "the held connection: {out:?} {}",
        o.stderr_lossy()
    );
    out.lines()
        .find_map(|l| l.strip_prefix("after ").map(str::to_owned))
        .ok_or_else(|| format!("the held connection printed {out:?}"))
}

async fn apply_none_cuts_egress_and_internet_restores(w: Arc<World>) -> R {
    let p = w.pair().await?;
    w.apply(&p.a, "internet").await?;
    w.expect("internet", &p.a, &[(at(PUBLIC, PORT), ok(PUBLIC))]).await?;
    // A connection held open keeps working while nothing changes, and is cut by `none` at once.
    let control = held_connection(&w, &p.a, None).await?;
    ensure!(control == "ok", "a held connection under internet: {control}");
    let cut = held_connection(&w, &p.a, Some("none")).await?;
    ensure!(cut == "cut", "a held connection across apply(none): {cut}");
    w.expect("none, right after apply", &p.a, &[(at(PUBLIC, PORT), Probe::Fail)])
        .await?;
    let before = w.stub.queries.load(Ordering::SeqCst);
    let r = w.resolve(&p.a, "ok.test").await?;
    ensure!(r.is_none(), "none: DNS still resolves: {r:?}");
    ensure!(
        w.stub.queries.load(Ordering::SeqCst) == before,
        "none: the forwarder asked the upstream"
    );
    w.apply(&p.a, "internet").await?;
    w.expect(
        "internet again",
        &p.a,
        &[(at(PUBLIC, PORT), ok(PUBLIC)), (at(PRIVATE[2].2, PORT), Probe::Fail)],
    )
    .await?;
    Ok(())
}

async fn capsules_cannot_reach_each_other_or_the_host(w: Arc<World>) -> R {
    let p = w.pair().await?;
    w.apply(&p.a, "internet").await?;
    w.apply(&p.b, "internet").await?;
    let b = w.backend()?;
    // A server in B on all of B's addresses.
    within(
        w.secs(30),
        "spawn",
        b.spawn(&p.b, ExecRequest::new(["perl", "-e", PERL_HTTP_SERVER, "9090"])),
    )
    .await?
    .map_err(|e| format!("spawn the server in B: {e}"))?;
    let b_self = at(p.b_net.guest_ip, GUEST_PORT);
    let mut up = false;
    for _ in 0..10 {
        if w.probe(&p.b, std::slice::from_ref(&b_self)).await? == [ok(p.b_net.guest_ip)] {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ensure!(up, "test setup: B does not reach its own server at {b_self}");
    let api = host_fetch(&at("127.0.0.1", API_PORT))?;
    ensure!(api == "127.0.0.1", "test setup: the API stand-in answered {api}");

    // The host side of A's own tap is reachable at all: on the DNS forwarder's port only.
    w.expect(
        "A to its own tap's host side",
        &p.a,
        &[
            (at(p.a_net.host_ip, 53), Probe::Open),
            (at(p.a_net.host_ip, API_PORT), Probe::Fail),
            (at(p.a_net.host_ip, 22), Probe::Fail),
        ],
    )
    .await?;
    w.expect(
        "A to B and to the host's other addresses",
        &p.a,
        &[
            (b_self.clone(), Probe::Fail),
            (at(p.b_net.host_ip, API_PORT), Probe::Fail),
            (at(p.b_net.host_ip, 53), Probe::Fail),
            (at(PUBLIC_HOST, API_PORT), Probe::Fail),
            (at(WEB_HOST, API_PORT), Probe::Fail),
            (at(PRIVATE[0].1, API_PORT), Probe::Fail),
        ],
    )
    .await?;
    w.expect(
        "B to the host and to A",
        &p.b,
        &[
            (at(p.b_net.host_ip, API_PORT), Probe::Fail),
            (at(p.a_net.host_ip, API_PORT), Probe::Fail),
            (at(PUBLIC_HOST, API_PORT), Probe::Fail),
            (at(p.a_net.guest_ip, 22), Probe::Fail),
        ],
    )
    .await?;
    Ok(())
}

async fn terminate_leaves_no_taps_or_rules(w: Arc<World>) -> R {
    let p = w.pair().await?;
    let b = w.backend()?;
    for id in [&p.a, &p.b] {
        let t = Instant::now();
        within(w.secs(30), "terminate", b.terminate(id))
            .await?
            .map_err(|e| format!("terminate: {e}"))?;
        eprintln!("  terminated {} in {:?}", id.as_str(), t.elapsed());
        ensure!(
            matches!(b.state(id).await, Ok(BackendState::Gone)),
            "state after terminate: {:?}",
            b.state(id).await
        );
        let left = pids_with(&format!("guest={}", id.as_str()));
        ensure!(left.is_empty(), "QEMU processes left after terminate: {left:?}");
    }
    *w.pair.lock().await = None;
    let taps = links_with_prefix(TAP_PREFIX)?;
    ensure!(taps.is_empty(), "taps left after terminate: {taps:?}");
    let table = sh(&["nft", "list", "table", "inet", TABLE])?;
    for what in [
        p.a_net.tap_name.clone(),
        p.b_net.tap_name.clone(),
        p.a_net.guest_ip.to_string(),
        p.b_net.guest_ip.to_string(),
        "chain out_".into(),
        "set dom_".into(),
    ] {
        ensure!(
            !table.contains(&what),
            "the table still has {what:?} after terminate:\n{table}"
        );
    }
    // After the test: the backend goes, its network layer removes the table.
    drop(b);
    let backend = w.backend.lock().unwrap().take();
    drop(backend);
    let mut net = w.net.lock().unwrap().take().ok_or("the network is gone")?;
    // The backend's supervisor tasks let go of it as they finish.
    let t = Instant::now();
    let net = loop {
        match Arc::try_unwrap(net) {
            Ok(n) => break n,
            Err(again) if t.elapsed() < Duration::from_secs(10) => {
                net = again;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return Err("the network layer is still shared 10 s after the backend went".into()),
        }
    };
    net.destroy().await.map_err(|e| format!("destroy the network: {e}"))?;
    let tables = sh(&["nft", "list", "tables"])?;
    ensure!(!tables.contains(TABLE), "the table outlived the backend: {tables}");
    let taps = links_with_prefix(TAP_PREFIX)?;
    ensure!(taps.is_empty(), "taps left after the test: {taps:?}");
    Ok(())
}

// ---------------------------------------------------------------- main

const CASES: [(&str, CaseFn); 6] = [
    ("net_private_ranges_blocked_public_reachable_dns_works", |w| {
        Box::pin(private_ranges_blocked_dns_works(w))
    }),
    ("net_allow_lists_one_target_at_create_and_by_apply", |w| {
        Box::pin(allow_lists_one_target(w))
    }),
    ("net_allow_domain_opens_resolved_addresses_only", |w| {
        Box::pin(allow_domain_opens_resolved_addresses_only(w))
    }),
    ("net_apply_none_cuts_egress_and_internet_restores", |w| {
        Box::pin(apply_none_cuts_egress_and_internet_restores(w))
    }),
    ("net_capsules_cannot_reach_each_other_or_the_host", |w| {
        Box::pin(capsules_cannot_reach_each_other_or_the_host(w))
    }),
    ("net_terminate_leaves_no_taps_or_rules", |w| {
        Box::pin(terminate_leaves_no_taps_or_rules(w))
    }),
];

/// Kills any QEMU of this test's state directory and removes what the test made, whatever happened.
struct Guard {
    state: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        kill_all_with(&self.state);
        for tap in links_with_prefix(TAP_PREFIX).unwrap_or_default() {
            let _ = sh(&["ip", "link", "del", &tap]);
        }
        let _ = sh(&["nft", "delete", "table", "inet", TABLE]);
    }
}

fn setup(rt: &tokio::runtime::Runtime, state: &std::path::Path) -> Result<World, String> {
    let mut targets = Vec::new();
    for (i, (_, host, ip)) in PRIVATE.iter().enumerate() {
        targets.push(Target::new(&format!("vtp{i}"), *host, *ip, &[], PORT)?);
    }
    targets.push(Target::new("vtpub", PUBLIC_HOST, PUBLIC, &[], PORT)?);
    targets.push(Target::new("vtweb", WEB_HOST, OK_IP, &[OTHER_IP], PORT)?);
    let api = HttpListener::start(None, API_PORT)?;
    let stub = dns_stub()?;
    let (backend, net) = rt.block_on(async {
        capsules_microvm::testing::ensure_assets(&[BaseImage::Small]).await?;
        let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let net = Arc::new(
            Network::new(
                NetConfig::default()
                    .with_table(TABLE)
                    .with_tap_prefix(TAP_PREFIX)
                    .with_dns_upstreams(vec![stub.addr]),
            )
            .await
            .map_err(|e| e.to_string())?,
        );
        let backend = MicroVmBackend::builder(vmm)
            .state_dir(state)
            .network(net.clone())
            .build()
            .await
            .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
        Ok::<_, String>((backend, net))
    })?;
    let scale = time_scale(&backend);
    Ok(World {
        backend: Mutex::new(Some(backend)),
        net: Mutex::new(Some(net)),
        stub,
        scale,
        pair: tokio::sync::Mutex::new(None),
        made: Mutex::new(Vec::new()),
        _targets: targets,
        _api: api,
    })
}

fn main() {
    let mut args = Arguments::from_args();
    // A TCG guest takes a core: never run two cases at once.
    args.test_threads = Some(1);
    let ignore_all = |why: String| -> Vec<Trial> {
        CASES
            .iter()
            .map(|c| {
                Trial::test(c.0, || Ok(()))
                    .with_ignored_flag(true)
                    .with_kind(why.clone())
            })
            .collect()
    };
    if let Err(why) = check_prerequisites(QEMU_TOOLS) {
        libtest_mimic::run(&args, ignore_all(why)).exit();
    }
    // First thing: leave the machine's network namespace for good (every thread and child
    // process made from here on lives in this one).
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        libtest_mimic::run(&args, ignore_all(format!("cannot create a network namespace: {e}"))).exit();
    }
    let _ = sh(&["ip", "link", "set", "lo", "up"]);

    let rt = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    let state = tempfile::Builder::new()
        .prefix("capsules-net-qemu-")
        .tempdir()
        .expect("a temp state dir");
    let guard = Guard {
        state: state.path().to_string_lossy().into_owned(),
    };
    let world = match setup(&rt, state.path()) {
        Ok(w) => Arc::new(w),
        Err(why) => libtest_mimic::run(&args, ignore_all(why)).exit(),
    };
    if let Ok(b) = world.backend() {
        eprintln!("backend: {:?}", b.info());
    }
    let trials: Vec<Trial> = CASES
        .iter()
        .map(|&(name, body)| {
            let (w, rt) = (world.clone(), rt.clone());
            Trial::test(name, move || {
                let limit = Duration::from_secs(600);
                let t0 = Instant::now();
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    rt.block_on(async {
                        tokio::time::timeout(limit, body(w.clone()))
                            .await
                            .unwrap_or_else(|_| Err(format!("the case took longer than {limit:?}")))
                    })
                }));
                eprintln!("  {name}: {:?}", t0.elapsed());
                match r {
                    Ok(r) => r.map_err(Failed::from),
                    Err(_) => Err(Failed::from("panicked")),
                }
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    rt.block_on(world.cleanup());
    // `exit` skips destructors: drop everything first.
    drop(world);
    drop(guard);
    if let Err(e) = state.close() {
        eprintln!("cleanup: the state dir: {e}");
    }
    conclusion.exit();
}
