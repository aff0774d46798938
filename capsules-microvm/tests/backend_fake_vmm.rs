//! `MicroVmBackend<FakeVmm>`: the generic microVM backend driven against the real guest agent
//! running on the host (no VM needed, so it runs everywhere CI does).
//!
//! - `contract::*`: the backend part of `capsules_core::testkit` (needs root for the agent's
//!   chroot with `/workspace`; ignored with the reason otherwise);
//! - `ordering::*`: sleep/wake order, in-flight calls cut by sleep, VMM deaths during a snapshot
//!   and after a wake, restart on the kept disk;
//! - `recovery::*`: a new backend on the same state directory after the host process "died";
//! - `capacity::*`, `create::*`: accounting and teardown on failure.
//!
//! The agent binary comes from `CAPSULES_AGENT_BIN`, or is built with `cargo build -p capsules-agent`.

mod backend_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backend_support::fake_vmm::{FakeVmm, isolated, kill_all_spawned};
use bytes::Bytes;
use capsules_core::backend::{
    Backend, BackendExt, BackendState, CapsuleSpec, ExecEvent, ExecOutput, ExecRequest, PtyRequest,
};
use capsules_core::testkit::backend::{Runner, SpawnEchoServer, cases};
use capsules_core::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};
use capsules_core::{ErrorKind, Result as CoreResult};
use capsules_microvm::backend::{Capacity, MicroVmBackend, StaticAssets, Timeouts, VmmUser};
use futures::StreamExt;
use libtest_mimic::{Arguments, Failed, Trial};

type TestResult = std::result::Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Turns a core result into a test failure naming the step.
trait Step<T> {
    fn step(self, what: &str) -> std::result::Result<T, String>;
}
impl<T> Step<T> for CoreResult<T> {
    fn step(self, what: &str) -> std::result::Result<T, String> {
        self.map_err(|e| {
            let mut chain = String::new();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!("\n  caused by: {s}"));
                src = s.source();
            }
            format!("{what}: {} ({}){chain}", e.message(), e.kind())
        })
    }
}

// ---------------------------------------------------------------- setup

fn agent_bin() -> std::result::Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CAPSULES_AGENT_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/deps/<this test> → target/<profile>/capsules-agent
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let bin = profile_dir.join("capsules-agent");
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "capsules-agent", "--bin", "capsules-agent"])
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .map_err(|e| format!("could not run cargo to build the agent: {e}"))?;
    if !st.success() || !bin.is_file() {
        return Err(format!(
            "cargo build -p capsules-agent failed ({st}); set CAPSULES_AGENT_BIN"
        ));
    }
    Ok(bin)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs an async test body with a hard timeout.
fn run_async<F>(secs: u64, f: F) -> TestResult
where
    F: Future<Output = TestResult>,
{
    let rt = runtime();
    rt.block_on(async move {
        match tokio::time::timeout(Duration::from_secs(secs), f).await {
            Ok(r) => r,
            Err(_) => Err(format!("the test did not finish within its hard timeout of {secs} s")),
        }
    })
}

fn plenty() -> Capacity {
    Capacity::exactly(64, 64 * 1024)
}

fn timeouts() -> Timeouts {
    Timeouts {
        boot: Duration::from_secs(20),
        call: Duration::from_secs(15),
        snapshot: Duration::from_secs(20),
        stop_grace: Duration::from_secs(2),
        tcg_factor: 1,
    }
}

async fn backend(
    fake: &FakeVmm,
    dir: &Path,
    capacity: Capacity,
) -> std::result::Result<MicroVmBackend<FakeVmm>, String> {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).map_err(|e| e.to_string())?;
    for f in ["bzImage", "initramfs.cpio", "small.ext4"] {
        std::fs::write(assets.join(f), b"fake").map_err(|e| e.to_string())?;
    }
    MicroVmBackend::builder(fake.clone())
        .state_dir(dir.join("state"))
        .assets(Arc::new(StaticAssets {
            kernel: assets.join("bzImage"),
            initramfs: assets.join("initramfs.cpio"),
            base_image: assets.join("small.ext4"),
        }))
        .no_network()
        .vmm_user(VmmUser::Current)
        .capacity(capacity)
        .timeouts(timeouts())
        .build()
        .await
        .step("building the backend")
}

fn spec_named(prefix: &str) -> CapsuleSpec {
    let n: u32 = rand_u32() % 1_000_000;
    CapsuleSpec {
        id: CapsuleId::generate(),
        name: CapsuleName::new(format!("{prefix}-{n}")).expect("a valid name"),
        team: TeamId::generate(),
        size: Size::S1x1gb,
        image: Image::Small,
        disk_gib: 1,
        network: NetworkPolicy::None,
    }
}

fn rand_u32() -> u32 {
    let id = CapsuleId::generate();
    id.as_str()
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)))
}

async fn sh(b: &dyn Backend, id: &CapsuleId, script: &str) -> std::result::Result<ExecOutput, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        b.exec_collect(id, ExecRequest::new(["sh", "-c", script])),
    )
    .await
    .map_err(|_| format!("exec {script:?} did not finish within 30 s"))?
    .step(&format!("exec {script:?}"))?;
    Ok(out)
}

async fn state(b: &dyn Backend, id: &CapsuleId) -> std::result::Result<BackendState, String> {
    b.state(id).await.step("state")
}

async fn wait_state(
    b: &dyn Backend,
    id: &CapsuleId,
    want: fn(&BackendState) -> bool,
    secs: u64,
) -> std::result::Result<BackendState, String> {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let st = state(b, id).await?;
        if want(&st) {
            return Ok(st);
        }
        if std::time::Instant::now() > until {
            return Err(format!("state stayed {st:?} for {secs} s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_dir(b: &MicroVmBackend<FakeVmm>, id: &CapsuleId) -> PathBuf {
    b.capsule_dir(id).join("vm")
}

fn record_json(b: &MicroVmBackend<FakeVmm>, id: &CapsuleId) -> serde_json::Value {
    let raw = std::fs::read(b.capsule_dir(id).join("capsule.json")).unwrap_or_default();
    serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null)
}

fn kill_vmm(b: &MicroVmBackend<FakeVmm>, id: &CapsuleId) -> TestResult {
    let pid = FakeVmm::pid_in(&vm_dir(b, id)).ok_or("no live fake VMM to kill")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill: {e}"))
}

// ---------------------------------------------------------------- contract suite

fn contract_trials(agent: &Option<PathBuf>) -> Vec<Trial> {
    // One backend and one shared capsule for the whole suite, as on a real VM.
    struct Suite {
        rt: tokio::runtime::Runtime,
        runner: Runner,
        _dir: tempfile::TempDir,
    }
    let suite: Arc<std::sync::OnceLock<std::result::Result<Suite, String>>> = Arc::new(std::sync::OnceLock::new());
    let agent = agent.clone();
    let all = cases();
    let count = all.len();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    all.into_iter()
        .map(|case| {
            let name = format!("contract::{}", case.name);
            let reason = match (&agent, isolated()) {
                (None, _) => Some("the agent binary is not available".to_owned()),
                (_, false) => Some("needs root (the fake VMM chroots the agent so /workspace is the capsule's)".to_owned()),
                _ => None,
            };
            let (suite, agent, done) = (suite.clone(), agent.clone(), done.clone());
            let trial = Trial::test(name, move || {
                let s = suite.get_or_init(|| {
                    let rt = runtime();
                    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                    let fake = FakeVmm::new(agent.clone().ok_or("no agent")?);
                    let b = rt.block_on(backend(&fake, dir.path(), plenty()))?;
                    let echo = SpawnEchoServer::new([
                        "python3",
                        "-c",
                        "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',int(sys.argv[1])));s.listen(8)\nwhile True:\n c,_=s.accept()\n while True:\n  d=c.recv(65536)\n  if not d: break\n  c.sendall(d)\n c.close()",
                        "{port}",
                    ]);
                    let runner = Runner::new(Arc::new(b), Arc::new(echo)).share_capsule(true);
                    Ok(Suite { rt, runner, _dir: dir })
                });
                let s = s.as_ref().map_err(|e| Failed::from(e.clone()))?;
                if let Some(why) = s.runner.skip_reason(&case) {
                    return Err(format!("skipped unexpectedly: {why}").into());
                }
                let r = s.rt.block_on(s.runner.run(&case));
                if done.fetch_add(1, Ordering::SeqCst) + 1 == count {
                    let _ = s.rt.block_on(s.runner.finish());
                }
                r.map_err(|f| Failed::from(f.0))
            });
            match reason {
                Some(why) => trial.with_ignored_flag(true).with_kind(why),
                None => trial,
            }
        })
        .collect()
}

// ---------------------------------------------------------------- ordering

/// Five sleep/wake cycles: files and a background process intact, the snapshot marker only while
/// asleep, guest RAM released while asleep, a new epoch per session.
async fn sleep_wake_cycles(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let b = backend(&fake, dir.path(), plenty()).await?;
    let spec = spec_named("cycles");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write_bytes(id, "keep/data.bin", Bytes::from(data.clone()))
        .await
        .step("write")?;
    let bg = b.spawn(id, ExecRequest::new(["sleep", "600"])).await.step("spawn")?;
    let mut epochs = vec![record_json(&b, id)["epoch"].as_u64().unwrap_or(0)];
    for cycle in 1..=5 {
        b.sleep(id).await.step(&format!("cycle {cycle}: sleep"))?;
        ensure!(
            state(&b, id).await? == BackendState::Sleeping,
            "cycle {cycle}: not sleeping"
        );
        let cdir = b.capsule_dir(id);
        ensure!(
            cdir.join("snapshot.complete").is_file(),
            "cycle {cycle}: no completion marker while asleep"
        );
        ensure!(
            cdir.join("snapshot").is_dir() && !cdir.join("snapshot.tmp").exists(),
            "cycle {cycle}: snapshot dirs wrong"
        );
        ensure!(
            record_json(&b, id)["state"] == "sleeping",
            "cycle {cycle}: record not sleeping"
        );
        ensure!(
            b.usage() == (0, 0),
            "cycle {cycle}: a sleeping capsule holds capacity {:?}",
            b.usage()
        );
        ensure!(
            FakeVmm::pid_in(&vm_dir(&b, id)).is_none(),
            "cycle {cycle}: the VMM process is still live while asleep"
        );
        let e = b.exec_collect(id, ExecRequest::new(["true"])).await;
        ensure!(
            matches!(&e, Err(e) if e.kind() == ErrorKind::Conflict),
            "cycle {cycle}: exec while asleep: {e:?}"
        );
        b.sleep(id).await.step("sleep again (idempotent)")?;
        b.wake(id).await.step(&format!("cycle {cycle}: wake"))?;
        b.wake(id).await.step("wake again (idempotent)")?;
        ensure!(
            state(&b, id).await? == BackendState::Running,
            "cycle {cycle}: not running"
        );
        ensure!(
            !b.capsule_dir(id).join("snapshot.complete").exists(),
            "cycle {cycle}: the marker outlived the wake"
        );
        ensure!(
            record_json(&b, id)["state"] == "running",
            "cycle {cycle}: record not running"
        );
        ensure!(
            b.usage() == (1, 1024),
            "cycle {cycle}: usage {:?} after wake",
            b.usage()
        );
        let back = b.read_to_vec(id, "keep/data.bin").await.step("read")?;
        ensure!(back == data, "cycle {cycle}: the file changed");
        let procs = b.processes(id).await.step("processes")?;
        ensure!(
            procs.iter().any(|p| p.handle == bg.handle && p.running),
            "cycle {cycle}: the background process did not survive: {procs:?}"
        );
        epochs.push(record_json(&b, id)["epoch"].as_u64().unwrap_or(0));
    }
    ensure!(
        epochs.windows(2).all(|w| w[1] > w[0]),
        "epochs did not increase per session: {epochs:?}"
    );
    b.terminate(id).await.step("terminate")?;
    ensure!(!b.capsule_dir(id).exists(), "terminate left the capsule directory");
    Ok(())
}

/// Calls in flight when the capsule goes to sleep end with Unavailable (retryable) saying so,
/// quickly, instead of hanging.
async fn in_flight_cut_by_sleep(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let b = backend(&FakeVmm::new(agent), dir.path(), plenty()).await?;
    let spec = spec_named("inflight");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    let mut s = b
        .exec(id, ExecRequest::new(["sh", "-c", "printf x; sleep 300"]))
        .await
        .step("exec")?;
    match tokio::time::timeout(Duration::from_secs(10), s.events.next()).await {
        Ok(Some(Ok(ExecEvent::Stdout(d)))) if d.as_ref() == b"x" => {}
        other => return Err(format!("the first event was {other:?}")),
    }
    let mut pty = b
        .pty(
            id,
            PtyRequest {
                argv: Some(vec!["sh".into()]),
                cols: 80,
                rows: 24,
                env: Default::default(),
                cwd: None,
            },
        )
        .await
        .step("pty")?;
    let sleeper = b.clone();
    let sid = id.clone();
    let sleeping = tokio::spawn(async move { sleeper.sleep(&sid).await });
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.events.next().await {
                Some(Ok(ExecEvent::Exit(st))) => return Err(format!("the exec exited {st:?} instead of being cut")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(e),
                None => return Err("the exec stream ended without an error".to_owned()),
            }
        }
    })
    .await
    .map_err(|_| "the in-flight exec hung past 5 s after sleep began".to_owned())??;
    ensure!(
        end.kind() == ErrorKind::Unavailable && end.is_retryable() && end.message().contains("sleep"),
        "the cut exec ended with {} ({}), want unavailable saying sleep",
        end.kind(),
        end.message()
    );
    let pty_end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match pty.output.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .map_err(|_| "the in-flight terminal hung past 5 s after sleep began".to_owned())?;
    ensure!(
        pty_end.as_ref().is_some_and(|e| e.kind() == ErrorKind::Unavailable),
        "the terminal ended with {pty_end:?}"
    );
    sleeping.await.map_err(|e| e.to_string())?.step("sleep")?;
    b.wake(id).await.step("wake")?;
    let o = sh(&b, id, "printf awake").await?;
    ensure!(o.stdout == b"awake", "exec after wake printed {:?}", o.stdout_lossy());
    b.terminate(id).await.step("terminate")?;
    Ok(())
}

/// A snapshot that fails while the VMM survives leaves the capsule running (new session).
async fn failed_snapshot_keeps_running(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let b = backend(&fake, dir.path(), plenty()).await?;
    let spec = spec_named("snapfail");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    b.write_bytes(id, "f.txt", Bytes::from_static(b"one"))
        .await
        .step("write")?;
    fake.faults.fail_snapshot.store(true, Ordering::SeqCst);
    let e = b.sleep(id).await;
    ensure!(e.is_err(), "sleep succeeded although the snapshot failed");
    ensure!(
        state(&b, id).await? == BackendState::Running,
        "state after a failed snapshot: {:?}",
        state(&b, id).await?
    );
    let cdir = b.capsule_dir(id);
    ensure!(
        !cdir.join("snapshot.complete").exists()
            && !cdir.join("snapshot").exists()
            && !cdir.join("snapshot.tmp").exists(),
        "snapshot leftovers after a failed snapshot"
    );
    ensure!(record_json(&b, id)["state"] == "running", "record not running");
    ensure!(b.read_to_vec(id, "f.txt").await.step("read")? == b"one", "file changed");
    b.sleep(id).await.step("sleep after the fault")?;
    b.wake(id).await.step("wake")?;
    b.terminate(id).await.step("terminate")?;
    Ok(())
}

/// A VMM killed during the snapshot leaves the capsule failed (never asleep on a partial
/// snapshot); restart boots it cold with its files.
async fn vmm_killed_during_snapshot(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let b = backend(&fake, dir.path(), plenty()).await?;
    let spec = spec_named("snapdie");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    b.write_bytes(id, "f.txt", Bytes::from_static(b"kept"))
        .await
        .step("write")?;
    fake.faults.die_during_snapshot.store(true, Ordering::SeqCst);
    let e = b.sleep(id).await;
    ensure!(e.is_err(), "sleep succeeded although the VMM died during the snapshot");
    let st = state(&b, id).await?;
    ensure!(
        matches!(st, BackendState::Failed { .. } | BackendState::Running),
        "state {st:?}"
    );
    ensure!(st != BackendState::Sleeping, "asleep on a partial snapshot");
    ensure!(
        matches!(st, BackendState::Failed { .. }),
        "the VMM is dead but the state is {st:?}"
    );
    ensure!(
        record_json(&b, id)["state"] == "failed",
        "record {:?}",
        record_json(&b, id)["state"]
    );
    let cdir = b.capsule_dir(id);
    ensure!(
        !cdir.join("snapshot.complete").exists(),
        "a completion marker exists for a partial snapshot"
    );
    ensure!(cdir.join("data.ext4").is_file(), "the disk was not kept");
    ensure!(b.usage() == (0, 0), "a failed capsule holds capacity {:?}", b.usage());
    let w = b.wake(id).await;
    ensure!(
        matches!(&w, Err(e) if e.kind() == ErrorKind::Conflict),
        "wake of a failed capsule: {w:?}"
    );
    b.restart(id).await.step("restart")?;
    ensure!(
        state(&b, id).await? == BackendState::Running,
        "not running after restart"
    );
    ensure!(
        b.read_to_vec(id, "f.txt").await.step("read")? == b"kept",
        "file lost across restart"
    );
    b.terminate(id).await.step("terminate")?;
    Ok(())
}

/// wake → write a file → the VMM dies → failed (never asleep on old memory); in-flight calls end;
/// restart boots cold and the file written after the wake is there.
async fn vmm_dies_after_wake(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let b = backend(&FakeVmm::new(agent), dir.path(), plenty()).await?;
    let spec = spec_named("wakedie");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    b.sleep(id).await.step("sleep")?;
    b.wake(id).await.step("wake")?;
    b.write_bytes(id, "after-wake.txt", Bytes::from_static(b"new"))
        .await
        .step("write after wake")?;
    let mut s = b
        .exec(id, ExecRequest::new(["sh", "-c", "printf x; sleep 300"]))
        .await
        .step("exec")?;
    let _ = tokio::time::timeout(Duration::from_secs(10), s.events.next()).await;
    kill_vmm(&b, id)?;
    let st = wait_state(&b, id, |s| matches!(s, BackendState::Failed { .. }), 5).await?;
    ensure!(matches!(st, BackendState::Failed { .. }), "state {st:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.events.next().await {
                Some(Ok(ExecEvent::Exit(_))) | None => return None,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
            }
        }
    })
    .await
    .map_err(|_| "the in-flight exec hung after the VMM died".to_owned())?;
    ensure!(
        end.is_some(),
        "the in-flight exec ended without an error after the VMM died"
    );
    ensure!(record_json(&b, id)["state"] == "failed", "record not failed");
    ensure!(
        !b.capsule_dir(id).join("snapshot.complete").exists(),
        "a marker exists after the wake"
    );
    let w = b.wake(id).await;
    ensure!(
        matches!(&w, Err(e) if e.kind() == ErrorKind::Conflict),
        "wake of a failed capsule: {w:?}"
    );
    let e = b.exec_collect(id, ExecRequest::new(["true"])).await;
    ensure!(
        matches!(&e, Err(e) if e.kind() == ErrorKind::Conflict),
        "exec on a failed capsule: {e:?}"
    );
    b.restart(id).await.step("restart")?;
    ensure!(
        b.read_to_vec(id, "after-wake.txt").await.step("read")? == b"new",
        "the file written after the wake is gone"
    );
    b.terminate(id).await.step("terminate")?;
    Ok(())
}

/// The VMM dies right as it resumes after a restore: wake fails and the capsule is failed.
async fn die_at_resume(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let b = backend(&fake, dir.path(), plenty()).await?;
    let spec = spec_named("resumedie");
    let id = &spec.id;
    b.create(&spec).await.step("create")?;
    b.write_bytes(id, "f.txt", Bytes::from_static(b"x"))
        .await
        .step("write")?;
    b.sleep(id).await.step("sleep")?;
    fake.faults.die_after_wake.store(true, Ordering::SeqCst);
    let w = b.wake(id).await;
    ensure!(w.is_err(), "wake succeeded although the VMM died at resume");
    let st = wait_state(&b, id, |s| matches!(s, BackendState::Failed { .. }), 5).await?;
    ensure!(matches!(st, BackendState::Failed { .. }), "state {st:?}");
    ensure!(
        !b.capsule_dir(id).join("snapshot.complete").exists(),
        "the consumed snapshot is still marked valid"
    );
    b.restart(id).await.step("restart")?;
    ensure!(b.read_to_vec(id, "f.txt").await.step("read")? == b"x", "file lost");
    b.terminate(id).await.step("terminate")?;
    Ok(())
}

// ---------------------------------------------------------------- recovery

/// Drop the backend as if the host process was killed (its runtime and tasks vanish, the VMMs
/// live on); a new backend on the same state directory reports running (adopted), sleeping and
/// failed correctly, and each works.
fn recovery(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let (run, asleep, dead, torn) = (
        spec_named("adopt"),
        spec_named("asleep"),
        spec_named("dead"),
        spec_named("torn"),
    );
    {
        let rt = runtime();
        rt.block_on(async {
            let b = backend(&fake, dir.path(), plenty()).await?;
            for s in [&run, &asleep, &dead, &torn] {
                b.create(s).await.step("create")?;
                b.write_bytes(&s.id, "mine.txt", Bytes::from(s.id.to_string()))
                    .await
                    .step("write")?;
            }
            b.spawn(&run.id, ExecRequest::new(["sleep", "600"]))
                .await
                .step("spawn")?;
            b.sleep(&asleep.id).await.step("sleep")?;
            Ok::<_, String>(())
        })?;
        // The host process "dies": every task of this runtime is gone, the agent processes stay.
        drop(rt);
    }
    let b0 = {
        let rt = runtime();
        let b = rt.block_on(backend(&fake, dir.path(), plenty()))?;
        let paths = (b.capsule_dir(&dead.id), b.capsule_dir(&torn.id));
        drop(b);
        drop(rt);
        paths
    };
    let _ = b0;
    // While "down": one VMM dies; another capsule crashed mid-sleep (marker written, record still running).
    {
        let pid = FakeVmm::pid_in(&dir.path().join("state/capsules").join(dead.id.as_str()).join("vm"))
            .ok_or("no VMM for the capsule to kill")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(200));
        let tdir = dir.path().join("state/capsules").join(torn.id.as_str());
        std::fs::create_dir_all(tdir.join("snapshot")).map_err(|e| e.to_string())?;
        std::fs::write(tdir.join("snapshot/memory"), b"0\n").map_err(|e| e.to_string())?;
        std::fs::write(tdir.join("snapshot.complete"), b"complete\n").map_err(|e| e.to_string())?;
    }
    run_async(90, async {
        let b = backend(&fake, dir.path(), plenty()).await?;
        let list = b.list().await.step("list")?;
        let of = |id: &CapsuleId| list.iter().find(|c| &c.id == id).map(|c| c.state.clone());
        ensure!(
            of(&run.id) == Some(BackendState::Running),
            "adopted capsule: {:?}",
            of(&run.id)
        );
        ensure!(
            of(&asleep.id) == Some(BackendState::Sleeping),
            "sleeping capsule: {:?}",
            of(&asleep.id)
        );
        ensure!(
            matches!(of(&dead.id), Some(BackendState::Failed { .. })),
            "dead capsule: {:?}",
            of(&dead.id)
        );
        ensure!(
            of(&torn.id) == Some(BackendState::Running),
            "capsule with a marker but a running record: {:?}",
            of(&torn.id)
        );
        ensure!(
            !b.capsule_dir(&torn.id).join("snapshot.complete").exists(),
            "the stray marker was kept"
        );
        ensure!(b.usage() == (2, 2048), "usage after recovery {:?}", b.usage());
        // Adopted: a new session works, the background process survived.
        ensure!(
            b.read_to_vec(&run.id, "mine.txt").await.step("read adopted")? == run.id.as_str().as_bytes(),
            "adopted file"
        );
        let procs = b.processes(&run.id).await.step("processes")?;
        ensure!(
            procs.iter().any(|p| p.running && p.argv == ["sleep", "600"]),
            "adopted capsule lost its process: {procs:?}"
        );
        // Sleeping: wakes on its snapshot.
        b.wake(&asleep.id).await.step("wake recovered")?;
        ensure!(
            b.read_to_vec(&asleep.id, "mine.txt").await.step("read woken")? == asleep.id.as_str().as_bytes(),
            "woken file"
        );
        // Failed: restart boots cold on the kept disk.
        b.restart(&dead.id).await.step("restart recovered")?;
        ensure!(
            b.read_to_vec(&dead.id, "mine.txt").await.step("read restarted")? == dead.id.as_str().as_bytes(),
            "restarted file"
        );
        // And the adopted one is supervised: killing it now makes it failed.
        kill_vmm(&b, &run.id)?;
        wait_state(&b, &run.id, |s| matches!(s, BackendState::Failed { .. }), 5).await?;
        for s in [&run, &asleep, &dead, &torn] {
            b.terminate(&s.id).await.step("terminate")?;
        }
        ensure!(b.list().await.step("list")?.is_empty(), "capsules left after terminate");
        Ok(())
    })
}

/// An unreadable record is reported as a failed capsule, never dropped; terminate removes it.
async fn unreadable_record(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let id = CapsuleId::generate();
    let cdir = dir.path().join("state/capsules").join(id.as_str());
    std::fs::create_dir_all(&cdir).map_err(|e| e.to_string())?;
    std::fs::write(cdir.join("capsule.json"), b"{ not json").map_err(|e| e.to_string())?;
    let b = backend(&FakeVmm::new(agent), dir.path(), plenty()).await?;
    let st = state(&b, &id).await?;
    ensure!(matches!(st, BackendState::Failed { .. }), "state {st:?}");
    ensure!(b.list().await.step("list")?.iter().any(|c| c.id == id), "list lacks it");
    b.terminate(&id).await.step("terminate")?;
    ensure!(!cdir.exists(), "terminate kept the directory");
    ensure!(state(&b, &id).await? == BackendState::Gone, "not gone");
    Ok(())
}

// ---------------------------------------------------------------- capacity and create

/// Room for two 1x1gb capsules: the third create is Unavailable (retryable) and succeeds after
/// one sleeps; a wake past capacity is refused the same way.
async fn capacity(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let b = backend(&FakeVmm::new(agent), dir.path(), Capacity::exactly(2, 2048)).await?;
    let (a, c, d) = (spec_named("cap-a"), spec_named("cap-b"), spec_named("cap-c"));
    b.create(&a).await.step("create a")?;
    b.create(&c).await.step("create b")?;
    let e = b.create(&d).await;
    match &e {
        Err(e) if e.kind() == ErrorKind::Unavailable && e.is_retryable() => {}
        other => return Err(format!("third create: {other:?}, want Unavailable")),
    }
    ensure!(
        state(&b, &d.id).await? == BackendState::Gone,
        "a refused create left state"
    );
    ensure!(!b.capsule_dir(&d.id).exists(), "a refused create left a directory");
    b.sleep(&a.id).await.step("sleep a")?;
    b.create(&d).await.step("create c after a slept")?;
    let w = b.wake(&a.id).await;
    ensure!(
        matches!(&w, Err(e) if e.kind() == ErrorKind::Unavailable),
        "wake past capacity: {w:?}"
    );
    ensure!(
        state(&b, &a.id).await? == BackendState::Sleeping,
        "a refused wake changed the state"
    );
    b.terminate(&d.id).await.step("terminate c")?;
    b.wake(&a.id).await.step("wake a after c is gone")?;
    ensure!(b.usage() == (2, 2048), "usage {:?}", b.usage());
    for s in [&a, &c] {
        b.terminate(&s.id).await.step("terminate")?;
    }
    ensure!(b.usage() == (0, 0), "usage after terminating all {:?}", b.usage());
    Ok(())
}

/// A boot that fails tears everything down and says what failed, with the serial log in the
/// source chain; the record, disk and cmdline of a good create are as specified.
async fn create_failure_and_layout(agent: PathBuf) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fake = FakeVmm::new(agent);
    let b = backend(&fake, dir.path(), plenty()).await?;
    let bad = spec_named("badboot");
    fake.faults.break_boot.store(true, Ordering::SeqCst);
    let e = match b.create(&bad).await {
        Ok(()) => return Err("create succeeded with a broken agent".into()),
        Err(e) => e,
    };
    ensure!(
        e.message().contains(bad.id.as_str())
            && (e.message().contains("boot") || e.message().contains("starting the VM")),
        "message does not say what failed: {}",
        e.message()
    );
    let mut chain = String::new();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        chain.push_str(&s.to_string());
        src = s.source();
    }
    ensure!(
        chain.contains("serial log"),
        "no serial log in the source chain: {chain}"
    );
    ensure!(
        chain.contains("usage") || chain.contains("unknown argument"),
        "the agent's own output is not in the chain: {chain}"
    );
    ensure!(!b.capsule_dir(&bad.id).exists(), "the failed create left its directory");
    ensure!(
        state(&b, &bad.id).await? == BackendState::Gone,
        "the failed create left state"
    );
    ensure!(b.usage() == (0, 0), "the failed create holds capacity");

    let good = spec_named("layout");
    b.create(&good).await.step("create")?;
    let r = record_json(&b, &good.id);
    ensure!(
        r["state"] == "running" && r["image"] == "small" && r["assets"]["image_key"] == "static-small",
        "record {r}"
    );
    let disk = std::fs::metadata(b.capsule_dir(&good.id).join("data.ext4")).map_err(|e| e.to_string())?;
    use std::os::unix::fs::MetadataExt;
    ensure!(disk.len() == 1 << 30, "disk size {}", disk.len());
    ensure!(
        disk.blocks() * 512 < disk.len() / 4,
        "the disk is not sparse ({} bytes allocated)",
        disk.blocks() * 512
    );
    let logs = b.logs(&good.id).await.step("logs")?;
    let logs = String::from_utf8_lossy(&logs);
    let want = format!(
        "console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname={}",
        good.name
    );
    ensure!(logs.contains(&want), "the kernel cmdline is not {want:?}: {logs}");
    let e = b.create(&good).await;
    ensure!(
        e.is_ok(),
        "a repeated create of the same running capsule is not ok: {e:?}"
    );
    let mut other = spec_named("layout");
    other.id = good.id.clone();
    other.size = Size::S2x2gb;
    let e = b.create(&other).await;
    ensure!(
        matches!(&e, Err(e) if e.kind() == ErrorKind::AlreadyExists),
        "create of a taken id: {e:?}"
    );
    let e = b.apply_network(&good.id, &NetworkPolicy::Internet).await;
    ensure!(
        matches!(&e, Err(e) if e.kind() == ErrorKind::Unsupported),
        "apply_network without a network layer: {e:?}"
    );
    ensure!(
        !b.capabilities().network_policy,
        "network_policy declared without a network layer"
    );
    // Terminate cuts a stream with Conflict, and is idempotent.
    let mut s = b
        .exec(&good.id, ExecRequest::new(["sh", "-c", "printf x; sleep 300"]))
        .await
        .step("exec")?;
    let _ = tokio::time::timeout(Duration::from_secs(10), s.events.next()).await;
    b.terminate(&good.id).await.step("terminate")?;
    let end = tokio::time::timeout(Duration::from_secs(5), s.events.next())
        .await
        .map_err(|_| "hung after terminate")?;
    ensure!(
        matches!(&end, Some(Err(e)) if e.kind() == ErrorKind::Conflict && e.message().contains("terminated")),
        "stream after terminate: {end:?}"
    );
    b.terminate(&good.id).await.step("terminate again")?;
    let e = b.exec_collect(&good.id, ExecRequest::new(["true"])).await;
    ensure!(
        matches!(&e, Err(e) if e.kind() == ErrorKind::NotFound),
        "exec after terminate: {e:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------- main

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1); // agents and their processes are real; keep the host calm
    }
    let agent = match agent_bin() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("backend_fake_vmm: {e}");
            None
        }
    };
    let mut trials = contract_trials(&agent);
    type AsyncCase = fn(PathBuf) -> std::pin::Pin<Box<dyn Future<Output = TestResult> + Send>>;
    let async_cases: Vec<(&str, AsyncCase)> = vec![
        ("ordering::sleep_wake_5x_files_intact", |a| {
            Box::pin(sleep_wake_cycles(a))
        }),
        ("ordering::in_flight_call_cut_by_sleep_is_unavailable", |a| {
            Box::pin(in_flight_cut_by_sleep(a))
        }),
        ("ordering::failed_snapshot_keeps_running", |a| {
            Box::pin(failed_snapshot_keeps_running(a))
        }),
        ("ordering::vmm_killed_during_snapshot_is_failed_not_sleeping", |a| {
            Box::pin(vmm_killed_during_snapshot(a))
        }),
        ("ordering::vmm_dies_after_wake_is_failed_restart_keeps_file", |a| {
            Box::pin(vmm_dies_after_wake(a))
        }),
        ("ordering::vmm_dies_at_resume_is_failed", |a| Box::pin(die_at_resume(a))),
        ("recovery::unreadable_record_is_failed", |a| {
            Box::pin(unreadable_record(a))
        }),
        ("capacity::third_create_unavailable_until_one_sleeps", |a| {
            Box::pin(capacity(a))
        }),
        ("create::failure_tears_down_and_layout", |a| {
            Box::pin(create_failure_and_layout(a))
        }),
    ];
    let missing = agent.is_none();
    for (name, f) in async_cases {
        let agent = agent.clone();
        let t = Trial::test(name, move || {
            let a = agent.ok_or("the agent binary is not available")?;
            run_async(120, f(a)).map_err(Failed::from)
        });
        trials.push(if missing { t.with_ignored_flag(true) } else { t });
    }
    {
        let agent = agent.clone();
        trials.push(Trial::test(
            "recovery::adopt_running_keep_sleeping_fail_dead",
            move || {
                let a = agent.ok_or("the agent binary is not available")?;
                recovery(a).map_err(Failed::from)
            },
        ));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    kill_all_spawned();
    conclusion.exit();
}
