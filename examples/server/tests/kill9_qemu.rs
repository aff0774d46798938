//! Kill -9 of `capsules-server` on the QEMU backend, with durable (SQLite) state: after a restart
//! on the same state directory every capsule is accounted for, the ledger keeps every entry from
//! before the kill exactly once, and the minutes a running capsule ran while no server metered it
//! are charged at once (DESIGN.md §3).
//!
//! A real-VM target (`test = false`; scripts/test.sh runs it explicitly). The whole process first
//! moves into a network namespace of its own, so the server's capsule taps and nftables rules and
//! every connection the test makes (127.0.0.1 there) stay inside it. It drives the real
//! `capsules-server` and `capsule` binaries. A missing prerequisite (root, QEMU, nftables) reports
//! the case as ignored with the reason.
//!
//! 1. Create `agent-run` and `agent-sleep` (1x1gb) with an agent token, sleep `agent-sleep`, let
//!    `agent-run` be metered for two minutes and more, fetch the ledger, kill -9 the server, wait
//!    65 s, restart it with a metering tick of an hour (so only the restart's reconcile can charge
//!    the downtime): `capsule list` shows one running and one sleeping, the ledger holds every
//!    earlier entry exactly once, `agent-run`'s compute minutes are the whole minutes it has run
//!    (the minutes down included), `agent-sleep` was charged nothing more, both exec.
//! 2. Kill -9 again while a create (`agent-mid`) and a sleep (`agent-run`) are in flight: after the
//!    restart `agent-mid` is running or was not started and charged nothing net, `agent-run` is
//!    running or sleeping and execs (after a wake), and the ledger again keeps its entries.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

type R<T = ()> = Result<T, String>;

const CASE: &str = "kill9_server_on_qemu";
const MINUTE_MS: i64 = 60_000;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_capsules-server"))
        .parent()
        .expect("the server binary has a directory")
        .to_path_buf()
}

/// The `capsule` binary beside the server's; built with the cargo that runs this test if missing.
fn cli_binary() -> R<PathBuf> {
    let cli = bin_dir().join("capsule");
    if !cli.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "capsules-cli"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("could not run cargo build -p capsules-cli: {e}"))?;
        ensure!(st.success(), "cargo build -p capsules-cli failed: {st}");
    }
    ensure!(cli.is_file(), "no capsule binary at {}", cli.display());
    Ok(cli)
}

struct Env {
    work: PathBuf,
    state: PathBuf,
    port: u16,
    api: String,
    cli: PathBuf,
    http: reqwest::Client,
    server: Option<Child>,
    starts: u32,
}

impl Env {
    /// Starts the server on the state dir (same port every time).
    async fn start(&mut self, tick_secs: u64) -> R {
        self.starts += 1;
        let log = std::fs::File::create(self.work.join(format!("server-{}.log", self.starts)))
            .map_err(|e| format!("server log: {e}"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_capsules-server"))
            .args(["--backend", "qemu", "--store", "sqlite", "--tick-secs"])
            .arg(tick_secs.to_string())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state-dir")
            .arg(&self.state)
            .env_remove("CAPSULES_BACKEND")
            .env_remove("CAPSULES_NETWORK")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("could not start capsules-server: {e}"))?;
        self.server = Some(child);
        // Ready once the API answers (it serves after bootstrap or reconcile).
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(c) = self.server.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.server = None;
                return Err(format!("the server exited ({st}):\n{}", self.log_tail()));
            }
            let url = format!("{}/v1/openapi.json", self.api);
            if let Ok(r) = self.http.get(&url).timeout(Duration::from_secs(30)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the server did not answer in 300 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.work.join(format!("server-{}.log", self.starts))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL to the server we started (by its PID), then reaps it.
    fn kill9(&mut self) -> R {
        let mut c = self.server.take().ok_or("no server to kill")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill -9 {}: {e}", c.id()))?;
        let st = c.wait().map_err(|e| e.to_string())?;
        use std::os::unix::process::ExitStatusExt;
        ensure!(
            st.signal() == Some(9),
            "the server ended otherwise than by SIGKILL: {st}"
        );
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, token: &str) -> Command {
        let mut c = Command::new(&self.cli);
        c.env("CAPSULE_API", &self.api)
            .env("CAPSULE_TOKEN", token)
            .stdin(Stdio::null());
        c
    }

    /// Runs the CLI to completion; Ok(stdout) when it exits 0.
    async fn run_cli(&self, token: &str, args: &[&str]) -> R<String> {
        let mut c = self.cli(token);
        c.args(args);
        let what = format!("capsule {}", args.join(" "));
        let out = tokio::task::spawn_blocking(move || c.output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{what}: {e}"))?;
        ensure!(
            out.status.success(),
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn get(&self, token: &str, path: &str) -> R<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .bearer_auth(token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| format!("GET {path}: {e}"))?;
        ensure!(status.is_success(), "GET {path}: {status} {v}");
        Ok(v)
    }

    async fn ledger(&self, owner: &str) -> R<Vec<Value>> {
        let v = self.get(owner, "/v1/team/ledger").await?;
        v["entries"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no entries in {v}"))
    }

    /// `capsule list --all --json`, name → record.
    async fn list(&self, token: &str) -> R<BTreeMap<String, Value>> {
        let out = self.run_cli(token, &["--json", "list", "--all"]).await?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("capsule list --json: {e}: {out}"))?;
        let mut m = BTreeMap::new();
        for r in v
            .as_array()
            .ok_or_else(|| format!("capsule list --json is not an array: {out}"))?
        {
            // The live capsule wins over terminated ones of the same name.
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            if r["state"] != "terminated" || !m.contains_key(&name) {
                m.insert(name, r.clone());
            }
        }
        Ok(m)
    }

    async fn exec_echo(&self, token: &str, name: &str, word: &str) -> R {
        let out = self.run_cli(token, &["exec", name, "--", "echo", word]).await?;
        ensure!(out.trim() == word, "exec in {name} printed {out:?}, not {word:?}");
        Ok(())
    }

    /// PIDs in the `qemu.pid` files under the state dir (the VMs our servers started).
    fn qemu_pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut stack = vec![self.state.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|n| n == "qemu.pid")
                    && let Ok(t) = std::fs::read_to_string(&p)
                    && let Ok(pid) = t.trim().parse::<i32>()
                    && Path::new(&format!("/proc/{pid}")).exists()
                {
                    out.push(pid);
                }
            }
        }
        out
    }
}

fn id_of(rec: &Value) -> String {
    rec["id"].as_str().unwrap_or_default().to_owned()
}

/// Every entry of `before` is in `after` exactly once and unchanged; no seq appears twice.
fn check_kept(before: &[Value], after: &[Value]) -> R {
    let mut seen = HashSet::new();
    for e in after {
        ensure!(seen.insert(e["seq"].clone()), "ledger seq {} appears twice", e["seq"]);
    }
    for b in before {
        let same: Vec<_> = after.iter().filter(|a| a["seq"] == b["seq"]).collect();
        ensure!(
            same.len() == 1,
            "entry {b} is in the ledger {} times after the restart",
            same.len()
        );
        ensure!(
            same[0] == b,
            "entry {} changed across the restart: {b} -> {}",
            b["seq"],
            same[0]
        );
    }
    // Nothing doubled under a new seq either: one compute entry per capsule and minute start.
    let mut minutes = HashSet::new();
    for e in after.iter().filter(|e| e["kind"] == "compute") {
        ensure!(
            minutes.insert((e["capsule"].clone(), e["at_ms"].clone())),
            "a compute minute was charged twice: {e}"
        );
    }
    Ok(())
}

/// Compute minutes charged to `capsule`, and the net of everything charged or refunded to it.
fn charged(entries: &[Value], capsule: &str) -> (u64, i64) {
    let mine = entries.iter().filter(|e| e["capsule"] == capsule);
    let minutes = mine
        .clone()
        .filter(|e| e["kind"] == "compute")
        .map(|e| e["quantity"].as_u64().unwrap_or(0))
        .sum();
    let net = mine.map(|e| e["amount"].as_i64().unwrap_or(0)).sum();
    (minutes, net)
}

/// Minutes the metering rule charges for a run started at `start` by `at` (minute k is charged
/// when it starts, at start + 60 k s).
fn minutes_by(start: i64, at: i64) -> u64 {
    ((at - start).max(0) / MINUTE_MS + 1) as u64
}

async fn body(env: &mut Env) -> R {
    env.start(5).await?;
    let boot: Value = serde_json::from_str(
        &std::fs::read_to_string(env.state.join("bootstrap.json")).map_err(|e| format!("bootstrap.json: {e}"))?,
    )
    .map_err(|e| e.to_string())?;
    let owner = boot["owner_token"].as_str().ok_or("no owner token")?.to_owned();
    let minted = env
        .run_cli(
            &owner,
            &["tokens", "create", "--scope", "agent:write", "--prefix", "agent-"],
        )
        .await?;
    let agent = minted
        .lines()
        .find_map(|l| l.strip_prefix("export CAPSULE_TOKEN="))
        .ok_or_else(|| format!("no token in {minted:?}"))?
        .trim()
        .to_owned();

    // ---- phase 1: one sleeping, one running for minutes, kill -9, 65 s down, restart
    for name in ["agent-run", "agent-sleep"] {
        let t = Instant::now();
        env.run_cli(&agent, &["create", name, "--size", "1x1gb", "--credit-limit", "2.00"])
            .await?;
        eprintln!("  created {name} in {:?}", t.elapsed());
    }
    env.exec_echo(&agent, "agent-sleep", "before-sleep").await?;
    env.run_cli(&agent, &["sleep", "agent-sleep"]).await?;
    let l = env.list(&agent).await?;
    let run_rec = l.get("agent-run").ok_or("agent-run is not listed")?.clone();
    let sleep_id = id_of(&l["agent-sleep"]);
    let run_id = id_of(&run_rec);
    let run_start = run_rec["meter"]["run_started_ms"]
        .as_i64()
        .ok_or_else(|| format!("agent-run has no run start: {run_rec}"))?;
    ensure!(
        l["agent-sleep"]["state"] == "sleeping",
        "agent-sleep: {}",
        l["agent-sleep"]
    );

    // Metered by the running server for a bit over two minutes.
    let metered_until = run_start + 2 * MINUTE_MS + 20_000;
    while now_ms() < metered_until {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    env.exec_echo(&agent, "agent-run", "before-kill").await?;
    let before = env.ledger(&owner).await?;
    let (run_minutes_before, _) = charged(&before, &run_id);
    let (sleep_minutes_before, sleep_net_before) = charged(&before, &sleep_id);
    ensure!(
        run_minutes_before >= 3,
        "agent-run was charged {run_minutes_before} minutes in more than two minutes of running"
    );
    let vms_before = env.qemu_pids();
    env.kill9()?;
    let killed_at = now_ms();
    eprintln!(
        "  killed the server at +{} s of agent-run",
        (killed_at - run_start) / 1000
    );
    // The VM outlives the server (its own process group), to be adopted.
    let vms_after = env.qemu_pids();
    ensure!(
        !vms_before.is_empty() && vms_after == vms_before,
        "the QEMU processes did not survive the server: before {vms_before:?}, after {vms_after:?}"
    );
    tokio::time::sleep(Duration::from_secs(65)).await;

    // An hour's tick: only the restart's reconcile can charge the minutes down.
    let restart_at = now_ms();
    env.start(3600).await?;
    let ready_at = now_ms();
    let l = env.list(&agent).await?;
    ensure!(
        l["agent-run"]["state"] == "running",
        "after the restart agent-run is {}",
        l["agent-run"]
    );
    ensure!(
        l["agent-sleep"]["state"] == "sleeping",
        "after the restart agent-sleep is {}",
        l["agent-sleep"]
    );
    let after = env.ledger(&owner).await?;
    check_kept(&before, &after)?;
    let (run_minutes, _) = charged(&after, &run_id);
    let (lo, hi) = (minutes_by(run_start, restart_at), minutes_by(run_start, ready_at));
    ensure!(
        (lo..=hi).contains(&run_minutes),
        "agent-run ran from {run_start} to at least {restart_at} ({lo}-{hi} whole minutes started), \
         but was charged {run_minutes} compute minutes ({run_minutes_before} before the kill)"
    );
    ensure!(
        run_minutes > run_minutes_before,
        "the minutes agent-run ran while the server was down were not charged at the restart"
    );
    let (sleep_minutes, sleep_net) = charged(&after, &sleep_id);
    ensure!(
        sleep_minutes == sleep_minutes_before,
        "agent-sleep was charged compute while asleep: {sleep_minutes_before} -> {sleep_minutes}"
    );
    ensure!(
        sleep_net <= sleep_net_before,
        "agent-sleep was refunded across the restart: {sleep_net_before} -> {sleep_net}"
    );
    env.exec_echo(&agent, "agent-run", "adopted").await?;
    env.run_cli(&agent, &["wake", "agent-sleep"]).await?;
    env.exec_echo(&agent, "agent-sleep", "woken").await?;
    eprintln!("  phase 1 ok: {run_minutes_before} -> {run_minutes} minutes for agent-run");

    // ---- phase 2: kill -9 mid-create and mid-sleep
    // The host has room for two 1-vCPU capsules: agent-sleep goes back to sleep first.
    env.run_cli(&agent, &["sleep", "agent-sleep"]).await?;
    let before = env.ledger(&owner).await?;
    let mut create = env.cli(&agent);
    create
        .args(["create", "agent-mid", "--size", "1x1gb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut create = create.spawn().map_err(|e| e.to_string())?;
    // Until the record exists (the create is in the backend call, booting the VM), then a bit.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = env.get(&agent, "/v1/capsules?include_terminated=true").await?;
        let creating = v["capsules"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["name"] == "agent-mid" && r["state"] == "creating"));
        if creating {
            break;
        }
        ensure!(Instant::now() < deadline, "agent-mid never showed as creating: {v}");
        ensure!(
            create.try_wait().map_err(|e| e.to_string())?.is_none(),
            "the create of agent-mid ended before it was seen creating"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A sleep takes about half a second here (snapshot of 1 GiB): kill while it writes.
    let mut sleep = env.cli(&agent);
    sleep
        .args(["sleep", "agent-run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut sleep = sleep.spawn().map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let create_in_flight = create.try_wait().map_err(|e| e.to_string())?.is_none();
    let sleep_in_flight = sleep.try_wait().map_err(|e| e.to_string())?.is_none();
    env.kill9()?;
    let _ = create.wait();
    let _ = sleep.wait();
    eprintln!("  killed again (create in flight: {create_in_flight}, sleep in flight: {sleep_in_flight})");
    ensure!(
        create_in_flight,
        "the create of agent-mid finished before the kill: not a mid-create kill"
    );
    env.start(5).await?;
    let l = env.list(&agent).await?;
    let after = env.ledger(&owner).await?;
    check_kept(&before, &after)?;
    match l.get("agent-mid") {
        None => {
            // Never recorded: then nothing may have been charged for it either.
            let known: HashSet<String> = l.values().map(id_of).collect();
            let stray: Vec<_> = after[before.len().min(after.len())..]
                .iter()
                .filter(|e| e["capsule"].as_str().is_some_and(|c| !known.contains(c)))
                .collect();
            ensure!(stray.is_empty(), "charges for a capsule no list shows: {stray:?}");
        }
        Some(mid) => {
            let state = mid["state"].as_str().unwrap_or_default();
            eprintln!(
                "  after a kill mid-create agent-mid is {state} ({})",
                mid["state_reason"]
            );
            match state {
                "running" => env.exec_echo(&agent, "agent-mid", "mid").await?,
                "failed" | "terminated" => {
                    let (_, net) = charged(&after, &id_of(mid));
                    ensure!(net == 0, "agent-mid never ran but its charges net to {net} µcr");
                }
                other => return Err(format!("after the restart agent-mid is {other}: {mid}")),
            }
        }
    }
    let run = &l["agent-run"];
    eprintln!(
        "  after a kill mid-sleep agent-run is {} ({})",
        run["state"], run["state_reason"]
    );
    match run["state"].as_str().unwrap_or_default() {
        "running" => {}
        "sleeping" => {
            env.run_cli(&agent, &["wake", "agent-run"]).await?;
        }
        other => return Err(format!("after a kill mid-sleep agent-run is {other}: {run}")),
    }
    env.exec_echo(&agent, "agent-run", "after-mid-sleep").await?;
    Ok(())
}

/// Terminates what is left through a server (starting one if none runs), then stops the server and
/// kills any QEMU still named by a pidfile under our state dir.
async fn cleanup(env: &mut Env) {
    if env.server.is_none()
        && let Err(e) = env.start(5).await
    {
        eprintln!("cleanup: could not restart the server: {e}");
    }
    if let Ok(text) = std::fs::read_to_string(env.state.join("bootstrap.json"))
        && let Ok(boot) = serde_json::from_str::<Value>(&text)
        && let Some(owner) = boot["owner_token"].as_str()
        && let Ok(l) = env.list(owner).await
    {
        for (name, r) in l {
            if r["state"] != "terminated"
                && let Err(e) = env.run_cli(owner, &["terminate", &name]).await
            {
                eprintln!("cleanup: {e}");
            }
        }
    }
    env.stop();
    for pid in env.qemu_pids() {
        eprintln!("cleanup: killing QEMU {pid} left by the test");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

fn run_case() -> R {
    let cli = cli_binary()?;
    let work = tempfile::Builder::new()
        .prefix("capsules-kill9-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    // The VMM runs as an unprivileged user that must reach the state directory inside.
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let mut env = Env {
        work: work.path().to_path_buf(),
        state: work.path().join("state"),
        port,
        api: format!("http://127.0.0.1:{port}"),
        cli,
        http: reqwest::Client::new(),
        server: None,
        starts: 0,
    };
    let r = rt.block_on(async {
        let r = tokio::time::timeout(Duration::from_secs(1500), body(&mut env))
            .await
            .unwrap_or_else(|_| Err("the case took longer than 1500 s".into()));
        if r.is_err() {
            eprintln!("server log (start {}):\n{}", env.starts, env.log_tail());
        }
        cleanup(&mut env).await;
        r
    });
    drop(env);
    let _ = work.close();
    r
}

fn main() {
    let args = Arguments::from_args();
    if let Err(why) = capsules_microvm::testing::check_prerequisites(capsules_microvm::testing::QEMU_TOOLS) {
        let t = Trial::test(CASE, || Ok(())).with_ignored_flag(true).with_kind(why);
        libtest_mimic::run(&args, vec![t]).exit();
    }
    // Built (if needed) before leaving the host's network: cargo may need it.
    if let Err(e) = cli_binary() {
        let t = Trial::test(CASE, move || Err(Failed::from(e.clone())));
        libtest_mimic::run(&args, vec![t]).exit();
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    let trial = Trial::test(CASE, || {
        let t0 = Instant::now();
        let r = run_case();
        eprintln!("  {CASE}: {:?}", t0.elapsed());
        r.map_err(Failed::from)
    });
    libtest_mimic::run(&args, vec![trial]).exit();
}
