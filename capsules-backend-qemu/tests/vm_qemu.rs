//! The QEMU issue's remaining "must hold" cases, on real QEMU microVMs.
//!
//! A real-VM target like `contract_qemu` (run it explicitly, one case at a time). The whole process
//! first moves into a network namespace of its own; every address a case connects to belongs to a
//! namespace the case made inside it. Each case gets its own `1x1gb` capsule(s) of the `small`
//! image, has a hard timeout, and its capsules are terminated afterwards even when it fails. A
//! missing prerequisite (root, QEMU, nftables, the guest assets) reports every case as ignored.
//!
//! Three cases build backends of their own: capacity for exactly two `1x1gb` capsules; a state
//! directory on a small tmpfs (mounted and unmounted by the case) that cannot hold a memory
//! snapshot; and recovery, where this binary re-executes itself as a separate "host process" that
//! creates the capsules, is killed with SIGKILL by its PID, and a new backend takes over its state
//! directory. The forwarders' DNS upstream is a stub in the test's namespace.

mod support;

use std::future::Future;
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_core::backend::{BackendState, CapsuleSpec, ExecEvent, ExecOutput, ExecRequest};
use capsules_core::testkit::backend::{spec, time_scale};
use capsules_core::types::{Cidr, NetworkPolicy};
use capsules_core::{Backend, BackendExt, CapsuleId, ErrorKind};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::{Capacity, MicroVmBackend};
use capsules_microvm::net::{NetConfig, Network};
use futures::StreamExt;
use libtest_mimic::{Arguments, Failed, Trial};
use nix::sched::{CloneFlags, unshare};
use sha2::{Digest, Sha256};
use support::{
    OK_IP, PERL_PROBE, Probe, Target, dns_stub, kill_all_with, links_with_prefix, parse_probe, pids_with, sh,
};

type B = MicroVmBackend<QemuVmm>;
type R = Result<(), String>;
type CaseFn = fn(Arc<Ctx>) -> Pin<Box<dyn Future<Output = R> + Send>>;

const TABLE: &str = "capsules_vm";
const TAP_PREFIX: &str = "cpv";

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------- host helpers

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

// ---------------------------------------------------------------- the context

struct Ctx {
    backend: B,
    net: Arc<Network>,
    /// Capsules the running case made: terminated after it, whatever happened.
    made: Mutex<Vec<CapsuleId>>,
}

impl Ctx {
    fn scale(&self) -> u32 {
        time_scale(&self.backend)
    }
    fn secs(&self, s: u64) -> Duration {
        Duration::from_secs(s * u64::from(self.scale()))
    }

    async fn create(&self, disk_gib: u32) -> Result<CapsuleSpec, String> {
        let mut s = spec();
        s.disk_gib = disk_gib;
        self.create_spec(&s).await?;
        Ok(s)
    }

    async fn create_spec(&self, s: &CapsuleSpec) -> R {
        self.made.lock().unwrap().push(s.id.clone());
        let t = Instant::now();
        within(self.secs(60), "create", self.backend.create(s))
            .await?
            .map_err(|e| format!("create: {e}"))?;
        eprintln!("  created {} in {:?}", s.id.as_str(), t.elapsed());
        Ok(())
    }

    async fn run(&self, id: &CapsuleId, script: &str) -> Result<ExecOutput, String> {
        self.run_for(id, script, 30).await
    }

    async fn run_for(&self, id: &CapsuleId, script: &str, secs: u64) -> Result<ExecOutput, String> {
        within(
            self.secs(secs),
            &format!("exec {script:?}"),
            self.backend.exec_collect(id, ExecRequest::new(["sh", "-c", script])),
        )
        .await?
        .map_err(|e| format!("exec {script:?}: {e}"))
    }

    /// Runs `script`, which must succeed; returns its stdout.
    async fn ok(&self, id: &CapsuleId, script: &str) -> Result<String, String> {
        let o = self.run(id, script).await?;
        ensure!(
            o.status.success(),
            "{script:?} failed ({:?}): {}{}",
            o.status,
            o.stdout_lossy(),
            o.stderr_lossy()
        );
        Ok(o.stdout_lossy())
    }

    async fn sleep(&self, id: &CapsuleId) -> R {
        let t = Instant::now();
        within(self.secs(60), "sleep", self.backend.sleep(id))
            .await?
            .map_err(|e| format!("sleep: {e}"))?;
        eprintln!("  slept in {:?}", t.elapsed());
        Ok(())
    }

    async fn wake(&self, id: &CapsuleId) -> R {
        let t = Instant::now();
        within(self.secs(60), "wake", self.backend.wake(id))
            .await?
            .map_err(|e| format!("wake: {e}"))?;
        eprintln!("  woke in {:?}", t.elapsed());
        Ok(())
    }

    async fn cleanup(&self) {
        let ids: Vec<CapsuleId> = std::mem::take(&mut *self.made.lock().unwrap());
        for id in ids {
            match tokio::time::timeout(self.secs(30), self.backend.terminate(&id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("cleanup: terminate {}: {e}", id.as_str()),
                Err(_) => eprintln!("cleanup: terminate {} timed out", id.as_str()),
            }
        }
    }
}

async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("{what}: no answer within {d:?}"))
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- cases

async fn clock_after_wake(c: Arc<Ctx>) -> R {
    let s = c.create(2).await?;
    c.sleep(&s.id).await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    c.wake(&s.id).await?;
    let before = now_unix();
    let out = c.ok(&s.id, "date +%s").await?;
    let after = now_unix();
    let guest: f64 = out.trim().parse().map_err(|_| format!("date +%s printed {out:?}"))?;
    // `date +%s` truncates: the guest's real time is in [guest, guest + 1).
    let in_range = guest + 1.0 >= before - 2.0 && guest <= after + 2.0;
    ensure!(
        in_range,
        "guest clock {guest} vs host [{before:.1}, {after:.1}] after 15 s asleep"
    );
    eprintln!("  guest {guest}, host [{before:.2}, {after:.2}]");
    Ok(())
}

async fn storage_limit_enospc(c: Arc<Ctx>) -> R {
    let s = c.create(1).await?;
    let id = &s.id;
    let o = c
        .run_for(id, "dd if=/dev/zero of=/workspace/big bs=1M count=2000 2>&1", 300)
        .await?;
    ensure!(
        !o.status.success(),
        "dd of 2000 MiB into a 1 GiB disk succeeded: {}",
        o.stdout_lossy()
    );
    let size: u64 = c
        .ok(id, "stat -c %s /workspace/big")
        .await?
        .trim()
        .parse()
        .map_err(|e| format!("stat size: {e}"))?;
    let gib = size as f64 / f64::from(1u32 << 30);
    eprintln!(
        "  dd stopped at {size} bytes ({gib:.3} GiB): {}",
        o.stdout_lossy().trim()
    );
    ensure!(
        (0.8..=1.05).contains(&gib),
        "the file stopped at {gib:.3} GiB ({size} bytes)"
    );
    ensure!(c.ok(id, "echo ok").await?.trim() == "ok", "echo ok after ENOSPC");
    c.ok(id, "rm /workspace/big").await?;
    c.ok(
        id,
        "dd if=/dev/zero of=/workspace/small bs=1M count=10 conv=fsync 2>/dev/null",
    )
    .await?;
    let n = c.ok(id, "stat -c %s /workspace/small").await?;
    ensure!(n.trim() == "10485760", "the 10 MB write after rm: {n:?}");
    Ok(())
}

async fn files_survive_five_sleeps(c: Arc<Ctx>) -> R {
    let s = c.create(2).await?;
    let id = &s.id;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let content = |name: &str, round: usize| -> Vec<u8> {
        let mut v = format!("{name} round {round}\n").into_bytes();
        v.extend((0..(4096 + round * 777)).map(|i| (i * 31 + round) as u8));
        v
    };
    for n in 0..3 {
        files.push((format!("/workspace/keep/f{n}"), content(&format!("f{n}"), 0)));
    }
    let write = |path: String, data: Vec<u8>| {
        let c = c.clone();
        let id = id.clone();
        async move {
            within(
                c.secs(30),
                "write_file",
                c.backend.write_bytes(&id, &path, Bytes::from(data)),
            )
            .await?
            .map(|_| ())
            .map_err(|e| format!("write {path}: {e}"))
        }
    };
    for (p, d) in &files {
        write(p.clone(), d.clone()).await?;
    }
    for round in 1..=5 {
        c.sleep(id).await?;
        c.wake(id).await?;
        let edit = round % files.len();
        files[edit].1 = content(&format!("f{edit}"), round);
        write(files[edit].0.clone(), files[edit].1.clone()).await?;
        let path = format!("/workspace/keep/new{round}");
        let data = content(&format!("new{round}"), round);
        write(path.clone(), data.clone()).await?;
        files.push((path, data));
        // Check every file after each cycle.
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        let out = c.ok(id, &format!("sha256sum {}", paths.join(" "))).await?;
        for (p, d) in &files {
            let want = format!("{}  {p}", sha_hex(d));
            ensure!(
                out.lines().any(|l| l == want),
                "round {round}: {p} is not intact (want {want}), sha256sum said:\n{out}"
            );
        }
    }
    Ok(())
}

async fn terminate_cleans_up(c: Arc<Ctx>) -> R {
    let s = c.create(2).await?;
    let id = s.id.clone();
    let cn = c
        .net
        .get(id.as_str())
        .await
        .ok_or("the capsule has no network attachment")?;
    let needle = format!("guest={}", id.as_str());
    ensure!(
        !pids_with(&needle).is_empty(),
        "no QEMU process with {needle} before terminate"
    );
    let mut st = within(
        c.secs(10),
        "exec",
        c.backend.exec(
            &id,
            ExecRequest::new(["sh", "-c", "while true; do echo x; sleep 0.2; done"]),
        ),
    )
    .await?
    .map_err(|e| format!("exec: {e}"))?;
    // Wait for output first.
    match within(c.secs(10), "first output", st.events.next()).await? {
        Some(Ok(ExecEvent::Stdout(_))) => {}
        other => return Err(format!("first event: {other:?}")),
    }
    let b = c.backend.clone();
    let id2 = id.clone();
    let term = tokio::spawn(async move { b.terminate(&id2).await });
    let t0 = Instant::now();
    let limit = c.secs(5);
    let end = within(limit, "the stream after terminate", async {
        loop {
            match st.events.next().await {
                Some(Ok(ExecEvent::Stdout(_))) | Some(Ok(ExecEvent::Stderr(_))) => continue,
                other => return other,
            }
        }
    })
    .await?;
    eprintln!("  stream ended {:?} after terminate with {end:?}", t0.elapsed());
    match end {
        Some(Err(e)) if e.kind() == ErrorKind::Conflict && e.message().contains("terminated") => {}
        other => {
            return Err(format!(
                "the stream must end with Conflict \"terminated\", got {other:?}"
            ));
        }
    }
    within(c.secs(30), "terminate", term)
        .await?
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("terminate: {e}"))?;
    ensure!(
        pids_with(&needle).is_empty(),
        "a QEMU process with {needle} outlived terminate"
    );
    let taps = links_with_prefix(TAP_PREFIX)?;
    ensure!(taps.is_empty(), "taps left after terminate: {taps:?}");
    let table = sh(&["nft", "list", "table", "inet", TABLE])?;
    for what in [
        id.as_str().to_owned(),
        cn.tap_name.clone(),
        cn.guest_ip.to_string(),
        cn.host_ip.to_string(),
    ] {
        ensure!(!table.contains(&what), "the nft table still mentions {what}:\n{table}");
    }
    ensure!(
        matches!(c.backend.state(&id).await, Ok(BackendState::Gone)),
        "state after terminate: {:?}",
        c.backend.state(&id).await
    );
    ensure!(
        !c.backend.capsule_dir(&id).exists(),
        "the capsule dir outlived terminate"
    );
    // Same name, new id.
    let mut again = spec();
    again.name = s.name.clone();
    c.create_spec(&again).await?;
    ensure!(
        c.ok(&again.id, "echo again").await?.trim() == "again",
        "exec in the new capsule"
    );
    Ok(())
}

async fn stale_snapshot_never_restored(c: Arc<Ctx>) -> R {
    let s = c.create(2).await?;
    let id = &s.id;
    c.sleep(id).await?;
    c.wake(id).await?;
    within(
        c.secs(30),
        "write_file",
        c.backend.write_bytes(
            id,
            "/workspace/after-wake.txt",
            Bytes::from_static(b"written after wake\n"),
        ),
    )
    .await?
    .map_err(|e| format!("write: {e}"))?;
    c.ok(id, "sync").await?;
    let needle = format!("guest={}", id.as_str());
    let pids = pids_with(&needle);
    ensure!(pids.len() == 1, "QEMU processes for {needle}: {pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("kill -9 {}: {e}", pids[0]))?;
    let t0 = Instant::now();
    let state = loop {
        let st = c.backend.state(id).await.map_err(|e| e.to_string())?;
        if matches!(st, BackendState::Failed { .. }) || t0.elapsed() > Duration::from_secs(5) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("  state {:?} after kill -9: {state:?}", t0.elapsed());
    ensure!(
        matches!(state, BackendState::Failed { .. }),
        "state after kill -9: {state:?}"
    );
    let t = Instant::now();
    within(c.secs(60), "restart", c.backend.restart(id))
        .await?
        .map_err(|e| format!("restart: {e}"))?;
    eprintln!("  restarted cold in {:?}", t.elapsed());
    let out = c.ok(id, "cat /workspace/after-wake.txt; cat /proc/uptime").await?;
    ensure!(out.starts_with("written after wake\n"), "after restart: {out:?}");
    let uptime: f64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| format!("uptime in {out:?}"))?;
    let cold = uptime < t.elapsed().as_secs_f64() + 5.0;
    ensure!(cold, "uptime {uptime}: the restart did not boot cold");
    Ok(())
}

const PERL_CONNECT: &str =
    r#"use IO::Socket::INET; IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3) or exit 1"#;

async fn can_connect(c: &Ctx, id: &CapsuleId, addr: &str) -> Result<bool, String> {
    let o = within(
        c.secs(30),
        "perl connect",
        c.backend
            .exec_collect(id, ExecRequest::new(["perl", "-e", PERL_CONNECT, addr])),
    )
    .await?
    .map_err(|e| format!("exec perl: {e}"))?;
    Ok(o.status.success())
}

async fn apply_network_cuts_egress(c: Arc<Ctx>) -> R {
    let _public = Target::new(
        "vtpub0",
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(203, 0, 113, 10),
        &[],
        8080,
    )?;
    let _private = Target::new(
        "vtprv0",
        Ipv4Addr::new(10, 77, 0, 1),
        Ipv4Addr::new(10, 77, 0, 10),
        &[],
        8080,
    )?;
    // The targets are real: this namespace reaches both.
    for a in ["203.0.113.10:8080", "10.77.0.10:8080"] {
        let addr: std::net::SocketAddr = a.parse().map_err(|e| format!("{e}"))?;
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("test setup: the host cannot reach {a}: {e}"))?;
    }
    let s = c.create(2).await?;
    let id = &s.id;
    let apply = |p: NetworkPolicy| {
        let c = c.clone();
        let id = id.clone();
        async move {
            within(c.secs(10), "apply_network", c.backend.apply_network(&id, &p))
                .await?
                .map_err(|e| format!("apply_network({p:?}): {e}"))
        }
    };
    ensure!(
        can_connect(&c, id, "203.0.113.10:8080").await?,
        "internet: 203.0.113.10 unreachable"
    );
    ensure!(
        !can_connect(&c, id, "10.77.0.10:8080").await?,
        "internet: the blocked 10.77.0.10 was reachable"
    );
    apply(NetworkPolicy::None).await?;
    ensure!(
        !can_connect(&c, id, "203.0.113.10:8080").await?,
        "none: 203.0.113.10 still reachable"
    );
    ensure!(
        !can_connect(&c, id, "10.77.0.10:8080").await?,
        "none: 10.77.0.10 reachable"
    );
    apply(NetworkPolicy::Internet).await?;
    ensure!(
        can_connect(&c, id, "203.0.113.10:8080").await?,
        "internet again: 203.0.113.10 unreachable"
    );
    ensure!(
        !can_connect(&c, id, "10.77.0.10:8080").await?,
        "internet again: 10.77.0.10 reachable"
    );
    Ok(())
}

// ---------------------------------------------------------------- recovery (own backends)

const REC_TABLE: &str = "capsules_vmrec";
const REC_PREFIX: &str = "cpr";
/// Set (to the state directory) in the environment of this binary re-executed as the "host
/// process" of the recovery case; `HOST_DNS_ENV` carries the DNS stub's address.
const HOST_ENV: &str = "CAPSULES_VM_QEMU_HOST_PROCESS";
const HOST_DNS_ENV: &str = "CAPSULES_VM_QEMU_HOST_DNS";
/// The recovery case's public stand-in target.
const REC_TARGET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

fn rec_config(dns: SocketAddr) -> Result<NetConfig, String> {
    Ok(NetConfig::default()
        .with_table(REC_TABLE)
        .with_tap_prefix(REC_PREFIX)
        .with_pool(Cidr::parse("10.214.0.0/16").map_err(|e| e.to_string())?)
        .with_dns_upstreams(vec![dns]))
}

async fn rec_backend(state: &Path, dns: SocketAddr) -> Result<(B, Arc<Network>), String> {
    let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let net = Arc::new(Network::new(rec_config(dns)?).await.map_err(|e| e.to_string())?);
    let b = MicroVmBackend::builder(vmm)
        .state_dir(state)
        .network(net.clone())
        .build()
        .await
        .map_err(|e| format!("build: {e}"))?;
    Ok((b, net))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| e.to_string())
}

/// The "host process" of the recovery case (this binary, re-executed with [`HOST_ENV`]): builds a
/// backend on the state directory, creates two capsules, starts a background process in the first,
/// puts the second to sleep, prints `READY <running id> <sleeping id>` and waits to be killed.
fn host_process(state: &str) -> ! {
    let r = runtime().and_then(|rt| {
        rt.block_on(async {
            let dns: SocketAddr = std::env::var(HOST_DNS_ENV)
                .map_err(|e| format!("{HOST_DNS_ENV}: {e}"))?
                .parse()
                .map_err(|e| format!("{HOST_DNS_ENV}: {e}"))?;
            let (be, _net) = rec_backend(Path::new(state), dns).await?;
            let d = Duration::from_secs(60 * u64::from(time_scale(&be)));
            let (a, b) = (spec(), spec());
            for s in [&a, &b] {
                within(d, "create", be.create(s))
                    .await?
                    .map_err(|e| format!("create: {e}"))?;
            }
            within(d, "spawn", be.spawn(&a.id, ExecRequest::new(["sleep", "900"])))
                .await?
                .map_err(|e| format!("spawn: {e}"))?;
            within(d, "sleep", be.sleep(&b.id))
                .await?
                .map_err(|e| format!("sleep: {e}"))?;
            println!("READY {} {}", a.id.as_str(), b.id.as_str());
            // Running, with its forwarders and supervisors, until the kill -9.
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        })
    });
    if let Err(e) = r {
        println!("ERROR {e}");
    }
    std::process::exit(1)
}

/// Kills the host process (by PID) if it is still there, and reaps it.
struct HostProcess(std::process::Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn recovery_after_host_kill() -> R {
    let dir = tempfile::Builder::new()
        .prefix("capsules-vm-qemu-rec-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let state: PathBuf = dir.path().to_owned();
    let stub = dns_stub()?;
    let _target = Target::new("vtrec0", Ipv4Addr::new(203, 0, 113, 1), REC_TARGET, &[], 8080)?;
    let mut ids: Vec<CapsuleId> = Vec::new();
    let r = recovery_body(&state, stub.addr, &mut ids);
    // Clean up with whatever backend can still be built on the state dir.
    let cleanup = runtime().and_then(|rt| {
        rt.block_on(async {
            let (be, _net) = rec_backend(&state, stub.addr).await?;
            for c in be.list().await.map_err(|e| e.to_string())? {
                if let Err(e) = be.terminate(&c.id).await {
                    eprintln!("cleanup: terminate {}: {e}", c.id.as_str());
                }
            }
            Ok::<(), String>(())
        })
    });
    kill_all_with(&state.to_string_lossy());
    for tap in links_with_prefix(REC_PREFIX).unwrap_or_default() {
        let _ = sh(&["ip", "link", "del", &tap]);
    }
    let _ = sh(&["nft", "delete", "table", "inet", REC_TABLE]);
    r?;
    cleanup
}

/// Starts the host process and waits for its `READY` line: the two capsule ids.
fn start_host_process(
    state: &Path,
    dns: SocketAddr,
    limit: Duration,
) -> Result<(HostProcess, CapsuleId, CapsuleId), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(HOST_ENV, state)
        .env(HOST_DNS_ENV, dns.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the host process: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout pipe")?;
    let host = HostProcess(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("READY ") || line.starts_with("ERROR ") {
                let _ = tx.send(line);
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(limit)
        .map_err(|_| format!("the host process did not get ready within {limit:?}"))?;
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next()) {
        (Some("READY"), Some(a), Some(b)) => {
            let parse = |s: &str| CapsuleId::parse(s).map_err(|e| format!("host process id {s:?}: {e}"));
            Ok((host, parse(a)?, parse(b)?))
        }
        _ => Err(format!("the host process failed: {line}")),
    }
}

async fn probe(be: &B, id: &CapsuleId, d: Duration, targets: &[String]) -> Result<Vec<Probe>, String> {
    let mut argv: Vec<String> = vec!["perl".into(), "-e".into(), PERL_PROBE.into()];
    argv.extend(targets.iter().cloned());
    let o = within(d, "probe", be.exec_collect(id, ExecRequest::new(argv)))
        .await?
        .map_err(|e| format!("exec probe: {e}"))?;
    parse_probe(&o.stdout_lossy(), targets)
}

fn recovery_body(state: &Path, dns: SocketAddr, ids: &mut Vec<CapsuleId>) -> R {
    let (mut host, a, b) = start_host_process(state, dns, Duration::from_secs(900))?;
    ids.extend([a.clone(), b.clone()]);
    let (qa, qb) = (
        pids_with(&format!("guest={}", a.as_str())),
        pids_with(&format!("guest={}", b.as_str())),
    );
    ensure!(
        qa.len() == 1 && qb.is_empty(),
        "QEMUs before the kill: running {qa:?}, sleeping {qb:?}"
    );
    let pid = host.0.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill -9 {pid}: {e}"))?;
    let status = host.0.wait().map_err(|e| e.to_string())?;
    eprintln!("  killed the host process {pid} with SIGKILL: {status:?}");
    ensure!(
        pids_with(&format!("guest={}", a.as_str())) == qa,
        "the running capsule's QEMU did not outlive the host process"
    );
    let target = format!("{REC_TARGET}:8080");
    let rt = runtime()?;
    let t0 = Instant::now();
    rt.block_on(async {
        let (be, _net) = within(
            Duration::from_secs(600),
            "rebuilding the backend",
            rec_backend(state, dns),
        )
        .await??;
        eprintln!("  rebuilt the backend in {:?}", t0.elapsed());
        let d = Duration::from_secs(60 * u64::from(time_scale(&be)));
        let list = be.list().await.map_err(|e| format!("list: {e}"))?;
        let state_of = |id: &CapsuleId| list.iter().find(|c| &c.id == id).map(|c| c.state.clone());
        ensure!(list.len() == 2, "list after the restart: {list:?}");
        ensure!(state_of(&a) == Some(BackendState::Running), "the running one: {list:?}");
        ensure!(
            state_of(&b) == Some(BackendState::Sleeping),
            "the sleeping one: {list:?}"
        );
        let procs = within(d, "processes", be.processes(&a))
            .await?
            .map_err(|e| format!("processes: {e}"))?;
        ensure!(
            procs.iter().any(|p| p.running && p.argv == ["sleep", "900"]),
            "the background `sleep 900` after recovery: {procs:?}"
        );
        let t = Instant::now();
        within(d, "wake", be.wake(&b))
            .await?
            .map_err(|e| format!("wake: {e}"))?;
        eprintln!("  woke the sleeping one in {:?}", t.elapsed());
        // Its network works: DNS through the new backend's forwarder to the stub, and egress.
        let o = within(
            d,
            "getent",
            be.exec_collect(&b, ExecRequest::new(["getent", "ahostsv4", "ok.test"])),
        )
        .await?
        .map_err(|e| format!("exec getent: {e}"))?;
        ensure!(
            o.status.success() && o.stdout_lossy().starts_with(&OK_IP.to_string()),
            "DNS in the woken capsule: {:?} {}{}",
            o.status,
            o.stdout_lossy(),
            o.stderr_lossy()
        );
        let mut bad = Vec::new();
        for (who, id) in [("woken", &b), ("adopted", &a)] {
            let got = probe(&be, id, d, std::slice::from_ref(&target)).await?;
            if got != [Probe::Ok(REC_TARGET.to_string())] {
                bad.push(format!("the {who} capsule reaching {target}: {got:?}"));
            }
        }
        ensure!(
            bad.is_empty(),
            "{}\n--- table ---\n{}\n--- addresses ---\n{}",
            bad.join("; "),
            sh(&["nft", "list", "table", "inet", REC_TABLE]).unwrap_or_default(),
            sh(&["ip", "-o", "addr"]).unwrap_or_default()
        );
        let taps = links_with_prefix(REC_PREFIX)?;
        ensure!(taps.len() == 2, "taps after recovery: {taps:?}");
        for id in [&a, &b] {
            within(d, "terminate", be.terminate(id))
                .await?
                .map_err(|e| format!("terminate: {e}"))?;
        }
        let taps = links_with_prefix(REC_PREFIX)?;
        ensure!(taps.is_empty(), "taps after terminating both: {taps:?}");
        let table = sh(&["nft", "list", "table", "inet", REC_TABLE])?;
        ensure!(
            !table.contains("chain out_") && !table.contains("set dom_") && !table.contains(REC_PREFIX),
            "rules left after terminating both:\n{table}"
        );
        for id in [&a, &b] {
            let left = pids_with(&format!("guest={}", id.as_str()));
            ensure!(left.is_empty(), "QEMU left after terminate: {left:?}");
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- capacity (own backends)

/// A backend without a network layer on `state`, with `capacity`.
async fn cap_backend(state: &Path, capacity: Capacity) -> Result<B, String> {
    let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    MicroVmBackend::builder(vmm)
        .state_dir(state)
        .capacity(capacity)
        .no_network()
        .build()
        .await
        .map_err(|e| format!("build: {e}"))
}

fn small_spec() -> CapsuleSpec {
    let mut s = spec();
    s.disk_gib = 1;
    s
}

/// Terminates every capsule of `be` and kills any QEMU of `state` left over.
async fn terminate_all(be: &B, state: &Path) {
    if let Ok(list) = be.list().await {
        for c in list {
            if let Err(e) = be.terminate(&c.id).await {
                eprintln!("cleanup: terminate {}: {e}", c.id.as_str());
            }
        }
    }
    kill_all_with(&state.to_string_lossy());
}

fn expect_unavailable(r: capsules_core::Result<()>, what: &str, says: &str) -> R {
    match r {
        Ok(()) => Err(format!("{what}: succeeded past the capacity")),
        Err(e) => {
            ensure!(
                e.kind() == ErrorKind::Unavailable && e.is_retryable() && e.message().contains(says),
                "{what}: want a retryable Unavailable saying {says:?}, got {:?}: {e}",
                e.kind()
            );
            eprintln!("  {what}: {e}");
            Ok(())
        }
    }
}

fn capacity_two_then_unavailable() -> R {
    let dir = tempfile::Builder::new()
        .prefix("capsules-vm-qemu-cap-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let state = dir.path().to_owned();
    let rt = runtime()?;
    rt.block_on(async {
        // Room for exactly two 1x1gb capsules.
        let be = cap_backend(&state, Capacity::exactly(2, 2048)).await?;
        let r = capacity_body(&be).await;
        terminate_all(&be, &state).await;
        r
    })
}

async fn capacity_body(be: &B) -> R {
    let d = Duration::from_secs(60 * u64::from(time_scale(be)));
    let (s1, s2, s3) = (small_spec(), small_spec(), small_spec());
    for s in [&s1, &s2] {
        within(d, "create", be.create(s))
            .await?
            .map_err(|e| format!("create: {e}"))?;
    }
    let r = within(d, "third create", be.create(&s3)).await?;
    expect_unavailable(r, "a third create", "no room")?;
    ensure!(
        !be.capsule_dir(&s3.id).exists() && matches!(be.state(&s3.id).await, Ok(BackendState::Gone)),
        "the refused create left its capsule behind"
    );
    within(d, "sleep", be.sleep(&s1.id))
        .await?
        .map_err(|e| format!("sleep: {e}"))?;
    let t = Instant::now();
    within(d, "third create after a sleep", be.create(&s3))
        .await?
        .map_err(|e| format!("the third create after one slept: {e}"))?;
    eprintln!("  the third create succeeded after a sleep in {:?}", t.elapsed());
    let o = within(d, "exec", be.exec_collect(&s3.id, ExecRequest::new(["echo", "third"])))
        .await?
        .map_err(|e| format!("exec: {e}"))?;
    ensure!(o.stdout_lossy().trim() == "third", "exec in the third: {o:?}");
    // A wake past the capacity is refused the same way, and the sleeper stays asleep.
    let r = within(d, "wake", be.wake(&s1.id)).await?;
    expect_unavailable(r, "a wake past the capacity", "no room")?;
    ensure!(
        matches!(be.state(&s1.id).await, Ok(BackendState::Sleeping)),
        "after the refused wake: {:?}",
        be.state(&s1.id).await
    );
    Ok(())
}

/// A tmpfs mounted for the test; unmounted (after killing any QEMU using it) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("capsules-vm-qemu-tmpfs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let p = dir.path().to_string_lossy().into_owned();
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0711"),
            "tmpfs",
            &p,
        ])?;
        Ok(Tmpfs { dir })
    }

    fn resize(&self, size: &str) -> R {
        let p = self.dir.path().to_string_lossy().into_owned();
        sh(&["mount", "-o", &format!("remount,size={size}"), &p]).map(|_| ())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = self.dir.path().to_string_lossy().into_owned();
        kill_all_with(&p);
        if let Err(e) = sh(&["umount", &p]) {
            eprintln!("cleanup: {e}; detaching it");
            let _ = sh(&["umount", "-l", &p]);
        }
    }
}

fn snapshot_disk_too_small() -> R {
    // A state directory whose disk cannot hold a 1 GiB memory snapshot.
    let fs = Tmpfs::mount("512m")?;
    let state = fs.dir.path().join("state");
    let rt = runtime()?;
    rt.block_on(async {
        let be = cap_backend(&state, Capacity::exactly(4, 8192)).await?;
        let r = snapshot_disk_body(&be, &fs).await;
        terminate_all(&be, &state).await;
        r
    })
}

async fn snapshot_disk_body(be: &B, fs: &Tmpfs) -> R {
    let d = Duration::from_secs(60 * u64::from(time_scale(be)));
    let s = small_spec();
    let r = within(d, "create", be.create(&s)).await?;
    expect_unavailable(r, "a create on a 512 MiB disk", "memory snapshot")?;
    ensure!(
        !be.capsule_dir(&s.id).exists(),
        "the refused create left its capsule directory"
    );
    // Retryable indeed: with room for the snapshot the same create goes through.
    fs.resize("1600m")?;
    within(d, "create", be.create(&s))
        .await?
        .map_err(|e| format!("create once the disk has room: {e}"))?;
    let o = within(d, "exec", be.exec_collect(&s.id, ExecRequest::new(["echo", "room"])))
        .await?
        .map_err(|e| format!("exec: {e}"))?;
    ensure!(o.stdout_lossy().trim() == "room", "exec: {o:?}");
    Ok(())
}

// ---------------------------------------------------------------- main

const CASES: [(&str, CaseFn, u64); 6] = [
    ("clock_after_wake", |c| Box::pin(clock_after_wake(c)), 120),
    ("storage_limit_enospc", |c| Box::pin(storage_limit_enospc(c)), 400),
    (
        "files_survive_five_sleeps",
        |c| Box::pin(files_survive_five_sleeps(c)),
        400,
    ),
    ("terminate_cleans_up", |c| Box::pin(terminate_cleans_up(c)), 200),
    (
        "stale_snapshot_never_restored",
        |c| Box::pin(stale_snapshot_never_restored(c)),
        250,
    ),
    (
        "apply_network_cuts_egress",
        |c| Box::pin(apply_network_cuts_egress(c)),
        200,
    ),
];
/// Cases with backends of their own (own state directory, capacity or network), each with the
/// hard timeout of the whole target (`scripts/test.sh`) and its own drop guards.
type OwnCase = (&'static str, fn() -> R);
const OWN: [OwnCase; 3] = [
    ("capacity_two_then_unavailable", capacity_two_then_unavailable),
    ("snapshot_disk_too_small_is_unavailable", snapshot_disk_too_small),
    ("recovery_after_kill_9_of_the_host_process", recovery_after_host_kill),
];

fn main() {
    if let Some(state) = std::env::var_os(HOST_ENV) {
        host_process(&state.to_string_lossy());
    }
    let mut args = Arguments::from_args();
    // A TCG guest takes a core: never run two cases at once.
    args.test_threads = Some(1);
    let names = || CASES.iter().map(|c| c.0).chain(OWN.iter().map(|c| c.0));
    let ignore_all = |why: String| -> Vec<Trial> {
        names()
            .map(|n| Trial::test(n, || Ok(())).with_ignored_flag(true).with_kind(why.clone()))
            .collect()
    };
    if let Err(why) = capsules_microvm::testing::check_prerequisites(capsules_microvm::testing::QEMU_TOOLS) {
        libtest_mimic::run(&args, ignore_all(why)).exit();
    }
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let _ = sh(&["ip", "link", "set", "lo", "up"]);

    let rt = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    // The forwarders' upstream is a stub in this namespace, never the machine's resolver.
    let stub = dns_stub().expect("the DNS stub");
    let state = tempfile::Builder::new()
        .prefix("capsules-vm-qemu-")
        .tempdir()
        .expect("a temp state dir");
    let setup = rt.block_on(async {
        capsules_microvm::testing::ensure_assets(&[BaseImage::Small]).await?;
        let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let net = Arc::new(
            Network::new(
                NetConfig::from_env()
                    .map_err(|e| e.to_string())?
                    .with_table(TABLE)
                    .with_tap_prefix(TAP_PREFIX)
                    .with_dns_upstreams(vec![stub.addr]),
            )
            .await
            .map_err(|e| e.to_string())?,
        );
        let backend = MicroVmBackend::builder(vmm)
            .state_dir(state.path())
            .network(net.clone())
            .build()
            .await
            .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
        Ok::<_, String>(Ctx {
            backend,
            net,
            made: Mutex::new(Vec::new()),
        })
    });
    let ctx = match setup {
        Ok(c) => Arc::new(c),
        Err(why) => libtest_mimic::run(&args, ignore_all(why)).exit(),
    };
    eprintln!("backend: {:?}", ctx.backend.info());

    let mut trials: Vec<Trial> = CASES
        .iter()
        .map(|&(name, body, limit)| {
            let (c, rt) = (ctx.clone(), rt.clone());
            Trial::test(name, move || {
                let limit =
                    Duration::from_secs(limit * u64::from(c.scale()).max(1) / 5).max(Duration::from_secs(limit));
                let t0 = Instant::now();
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    rt.block_on(async {
                        tokio::time::timeout(limit, body(c.clone()))
                            .await
                            .unwrap_or_else(|_| Err(format!("the case took longer than {limit:?}")))
                    })
                }));
                rt.block_on(c.cleanup());
                eprintln!("  {name}: {:?}", t0.elapsed());
                match r {
                    Ok(r) => r.map_err(Failed::from),
                    Err(_) => Err(Failed::from("panicked")),
                }
            })
        })
        .collect();
    for (name, body) in OWN {
        trials.push(Trial::test(name, move || {
            let t0 = Instant::now();
            let r = std::panic::catch_unwind(body);
            eprintln!("  {name}: {:?}", t0.elapsed());
            match r {
                Ok(r) => r.map_err(Failed::from),
                Err(_) => Err(Failed::from("panicked")),
            }
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    rt.block_on(ctx.cleanup());
    if let Ok(rd) = std::fs::read_dir(state.path().join("capsules")) {
        let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        if !left.is_empty() {
            eprintln!("left in the state dir: {left:?}");
        }
    }
    // `exit` skips destructors: remove the state dir first.
    drop(ctx);
    drop(stub);
    if let Err(e) = state.close() {
        eprintln!("cleanup: the state dir: {e}");
    }
    conclusion.exit();
}
