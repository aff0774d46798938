//! The driver against a fake Cloud Hypervisor (tests/support/fake_ch.rs): lifecycle, request
//! shapes checked against CH's OpenAPI description, CH error chains, a VMM dying mid-call,
//! sleep/wake ordering, start failures, adoption. The test binary is its own fake VMM: the driver
//! spawns it with `--api-socket`, and `main` then serves the fake API instead of running tests.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsules_backend_chv::{ChvBuilder, ChvVmm};
use capsules_microvm::vmm::{DiskConfig, TapConfig, VmConfig, VmHandle, VmRunState, Vmm, VmmError};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use support::openapi::{Spec, SpecSource};
use support::{Reaper, alive, chain, ensure, http, skipped, trial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

struct Env {
    // Dropped first: kills whatever the test left before the directory goes.
    _reaper: Reaper,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    vmm: ChvVmm,
}

impl Env {
    fn new() -> Env {
        Env::with(|b| b)
    }

    fn with(f: impl FnOnce(ChvBuilder) -> ChvBuilder) -> Env {
        Env::with_binary(std::env::current_exe().unwrap(), f)
    }

    fn with_binary(bin: PathBuf, f: impl FnOnce(ChvBuilder) -> ChvBuilder) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        // A stand-in KVM device and an empty module dir, so the host check passes anywhere.
        std::fs::write(root.join("kvm"), b"").unwrap();
        std::fs::create_dir(root.join("modules")).unwrap();
        std::fs::write(root.join("vmlinux"), b"\x7fELF fake").unwrap();
        std::fs::write(root.join("initramfs"), b"fake").unwrap();
        std::fs::write(root.join("base.img"), b"").unwrap();
        std::fs::write(root.join("data.img"), b"").unwrap();
        let b = ChvBuilder::new()
            .with_binary(bin)
            .with_guest_kernel(root.join("vmlinux"), true)
            .with_kvm_device(root.join("kvm"))
            .with_sys_module_dir(root.join("modules"))
            .with_start_timeout(Duration::from_secs(5))
            .with_api_timeout(Duration::from_secs(5));
        let vmm = f(b).build().unwrap();
        Env {
            _reaper: Reaper(root.clone()),
            _tmp: tmp,
            root,
            vmm,
        }
    }

    fn config(&self, name: &str) -> VmConfig {
        let state_dir = self.root.join(name);
        VmConfig {
            id: name.into(),
            vcpus: 2,
            memory_mib: 1024,
            kernel: self.root.join("unused-vmlinux"),
            initramfs: self.root.join("initramfs"),
            cmdline: "console=ttyS0 quiet".into(),
            disks: vec![
                DiskConfig {
                    path: self.root.join("base.img"),
                    read_only: true,
                },
                DiskConfig {
                    path: self.root.join("data.img"),
                    read_only: false,
                },
            ],
            tap: Some(TapConfig {
                name: "cap0".into(),
                mac: "52:54:00:12:34:56".into(),
            }),
            serial_log: state_dir.join("serial.log"),
            state_dir,
            run_as: None,
        }
    }
}

fn api_sock(c: &VmConfig) -> PathBuf {
    c.state_dir.join("ch.sock")
}

async fn fake(c: &VmConfig, method: &str, ctl: &str, body: Option<Value>) -> Result<Option<Value>, Failed> {
    let (status, v) = http(&api_sock(c), method, &format!("/fake/{ctl}"), body).await?;
    ensure(status < 300, format!("fake control {ctl} answered {status}"))?;
    Ok(v)
}

async fn requests(c: &VmConfig) -> Result<Vec<String>, Failed> {
    Ok(serde_json::from_value(
        fake(c, "GET", "requests", None).await?.unwrap_or_default(),
    )?)
}

/// Fails if the fake saw any request (or gave any reply) outside CH's OpenAPI shapes.
async fn no_violations(c: &VmConfig) -> Result<(), Failed> {
    let v: Vec<String> = serde_json::from_value(fake(c, "GET", "violations", None).await?.unwrap_or_default())?;
    ensure(
        v.is_empty(),
        format!("requests outside CH's OpenAPI description: {v:#?}"),
    )
}

/// After a stop or a failed start: no process, no sockets, no pid file; the logs stay.
fn no_leaks(c: &VmConfig, pid: Option<u32>) -> Result<(), Failed> {
    if let Some(pid) = pid {
        ensure(!alive(pid), format!("the VMM {pid} is still alive"))?;
    }
    for f in ["ch.sock", "ch.sock.lock", "vsock.sock", "ch.pid"] {
        let p = c.state_dir.join(f);
        ensure(!p.exists(), format!("{} was left behind", p.display()))?;
    }
    ensure(c.state_dir.join("ch.log").exists(), "the VMM log was removed")
}

async fn state(vm: &dyn VmHandle) -> Result<VmRunState, Failed> {
    Ok(vm.info().await?.state)
}

// ---- tests ----

async fn lifecycle_shapes() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    let pid = vm.pid();
    ensure(alive(pid), "the VMM is not running")?;
    ensure(state(&*vm).await? == VmRunState::Running, "not running after start")?;

    // What vm.create carried.
    let body = fake(&c, "GET", "body/vm.create", None)
        .await?
        .ok_or("no vm.create body")?;
    let want = json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 1024u64 << 20},
        "payload": {
            "kernel": env.root.join("vmlinux").to_str().unwrap(),
            "initramfs": env.root.join("initramfs").to_str().unwrap(),
            "cmdline": "console=ttyS0 quiet capsules.channel=vsock:1024",
        },
        "disks": [
            {"path": env.root.join("base.img").to_str().unwrap(), "readonly": true},
            {"path": env.root.join("data.img").to_str().unwrap(), "readonly": false},
        ],
        "net": [{"tap": "cap0", "mac": "52:54:00:12:34:56"}],
        "vsock": {"cid": 3, "socket": c.state_dir.join("vsock.sock").to_str().unwrap()},
        "serial": {"mode": "File", "file": c.serial_log.to_str().unwrap()},
        "console": {"mode": "Off"},
    });
    ensure(body == want, format!("vm.create body:\n{body:#}\nwanted:\n{want:#}"))?;

    // The agent stream: hybrid vsock handshake, then bytes flow.
    let mut s = vm.agent_stream().await?;
    s.write_all(b"hello agent").await?;
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await?;
    ensure(&buf == b"hello agent", "the agent stream did not carry bytes")?;

    vm.pause().await?;
    ensure(state(&*vm).await? == VmRunState::Paused, "not paused")?;
    vm.resume().await?;
    ensure(state(&*vm).await? == VmRunState::Running, "not running after resume")?;
    no_violations(&c).await?;
    vm.stop(Duration::from_secs(5)).await?;
    no_leaks(&c, Some(pid))?;
    vm.stop(Duration::from_secs(5)).await?; // idempotent
    let exit = vm.exited().await;
    ensure(
        exit.code == Some(0),
        format!("the VMM exited with {exit:?} after vmm.shutdown"),
    )
}

async fn sleep_wake_ordering() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    let snap = c.state_dir.join("snapshot");
    std::fs::create_dir_all(&snap)?;
    // A running VM is not snapshotted (CH refuses): the caller pauses first.
    let e = vm
        .snapshot(&snap)
        .await
        .expect_err("snapshot of a running VM succeeded");
    ensure(
        chain(&e).iter().any(|m| m == "VM is not paused"),
        format!("{:?}", chain(&e)),
    )?;
    vm.pause().await?;
    vm.snapshot(&snap).await?;
    for f in ["config.json", "state.json", "memory-ranges"] {
        ensure(snap.join(f).is_file(), format!("snapshot file {f} missing"))?;
    }
    let seen = requests(&c).await?;
    no_violations(&c).await?;
    vm.stop(Duration::from_secs(5)).await?;
    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|r| !r.ends_with("vm.info") && !r.ends_with("vmm.ping"))
        .collect();
    ensure(
        order
            == [
                "PUT vm.create",
                "PUT vm.boot",
                "PUT vm.snapshot",
                "PUT vm.pause",
                "PUT vm.snapshot",
            ],
        format!("calls: {order:?}"),
    )?;

    // The whole sleep as the VMM saw it, stop included (from its log, as it has exited).
    let log = std::fs::read_to_string(c.state_dir.join("ch.log"))?;
    let calls: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("fake-ch: request "))
        .filter(|r| !r.ends_with("vm.info") && !r.ends_with("vmm.ping"))
        .collect();
    ensure(
        calls.ends_with(&[
            "PUT vm.pause",
            "PUT vm.snapshot",
            "PUT vm.shutdown",
            "PUT vm.delete",
            "PUT vmm.shutdown",
        ]),
        format!("sleep calls: {calls:?}"),
    )?;

    // Wake: a new process restores, and leaves the VM paused until resumed.
    let c2 = VmConfig {
        id: "vm1-woken".into(),
        ..c.clone()
    };
    let vm2 = env.vmm.restore(&c2, &snap).await?;
    ensure(vm2.pid() != vm.pid(), "restore reused the old process")?;
    ensure(
        state(&*vm2).await? == VmRunState::Paused,
        "restore did not leave the VM paused",
    )?;
    let body = fake(&c2, "GET", "body/vm.restore", None)
        .await?
        .ok_or("no vm.restore body")?;
    let want =
        json!({"source_url": format!("file://{}", snap.display()), "memory_restore_mode": "OnDemand", "resume": false});
    ensure(body == want, format!("vm.restore body {body}"))?;
    vm2.resume().await?;
    ensure(state(&*vm2).await? == VmRunState::Running, "not running after resume")?;
    let mut s = vm2.agent_stream().await?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    let seen = requests(&c2).await?;
    no_violations(&c2).await?;
    vm2.stop(Duration::from_secs(5)).await?;
    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|r| !r.ends_with("vm.info") && !r.ends_with("vmm.ping"))
        .collect();
    ensure(
        order == ["PUT vm.restore", "PUT vm.resume"],
        format!("calls after wake: {order:?}"),
    )?;
    no_leaks(&c2, Some(vm2.pid()))
}

async fn ch_error_chain() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    let msgs = [
        "Error from API",
        "The VM could not be paused",
        "Failed to pause vCPUs",
        "Invalid argument (os error 22)",
    ];
    fake(
        &c,
        "PUT",
        "fail",
        Some(json!({"endpoint": "vm.pause", "messages": msgs})),
    )
    .await?;
    let e = vm.pause().await.expect_err("an injected error did not surface");
    ensure(matches!(e, VmmError::Control { .. }), format!("wrong kind: {e:?}"))?;
    let ch = chain(&e);
    ensure(ch.len() == 2 + msgs.len(), format!("chain {ch:?}"))?;
    ensure(
        ch[0] == "Cloud Hypervisor could not pause the VM for capsule vm1",
        format!("top: {}", ch[0]),
    )?;
    ensure(
        ch[1] == "Cloud Hypervisor answered vm.pause with HTTP 500",
        format!("second: {}", ch[1]),
    )?;
    ensure(ch[2..] == msgs, format!("CH's messages: {:?}", &ch[2..]))?;
    // Display of each level is its own message only.
    ensure(
        !ch[0].contains(msgs[1]) && !ch[1].contains(msgs[1]),
        "a source is repeated in Display",
    )?;
    // The VM is still usable after a failed call.
    vm.pause().await?;
    no_violations(&c).await?;
    vm.stop(Duration::from_secs(5)).await?;
    no_leaks(&c, Some(vm.pid()))
}

async fn bad_config_starts_nothing() -> Result<(), Failed> {
    // A missing kernel is caught before any process starts.
    let env = Env::with(|b| b.with_guest_kernel("/nonexistent/vmlinux", true));
    let c = env.config("vm1");
    let e = env
        .vmm
        .start(&c)
        .await
        .err()
        .ok_or("start with a missing kernel succeeded")?;
    ensure(e.to_string().contains("/nonexistent/vmlinux"), e.to_string())?;
    ensure(
        !c.state_dir.join("ch.log").exists(),
        "a VMM was started for a bad config",
    )
}

async fn boot_error_cleans_up() -> Result<(), Failed> {
    // A wrapper tells the fake (through its environment) to fail vm.boot, so the failure happens
    // inside `start`, after vm.create.
    let tmp = tempfile::tempdir()?;
    let wrapper = tmp.path().join("cloud-hypervisor");
    let pid_file = tmp.path().join("pid");
    let exe = std::env::current_exe()?;
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ > {}\nCAPSULES_FAKE_FAIL=vm.boot exec {} \"$@\"\n",
            pid_file.display(),
            exe.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let env = Env::with_binary(wrapper, |b| b);
    let c = env.config("vm1");
    let e = env
        .vmm
        .start(&c)
        .await
        .err()
        .ok_or("start succeeded though vm.boot failed")?;
    let ch = chain(&e);
    ensure(ch[0].contains("boot the VM"), format!("{ch:?}"))?;
    ensure(
        ch.last().is_some_and(|m| m == "injected boot failure"),
        format!("{ch:?}"),
    )?;
    let pid: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    no_leaks(&c, Some(pid))
}

async fn dies_during_snapshot() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    vm.pause().await?;
    fake(&c, "PUT", "die", Some(json!({"endpoint": "vm.snapshot"}))).await?;
    no_violations(&c).await?;
    let snap = c.state_dir.join("snapshot");
    std::fs::create_dir_all(&snap)?;
    let t0 = Instant::now();
    let e = vm
        .snapshot(&snap)
        .await
        .expect_err("snapshot succeeded though the VMM died");
    let took = t0.elapsed();
    ensure(took < Duration::from_secs(2), format!("the failure took {took:?}"))?;
    ensure(matches!(e, VmmError::Process { .. }), format!("wrong kind: {e:?}"))?;
    let m = e.to_string();
    ensure(
        m.contains("exited with code 1 while trying to snapshot the VM"),
        m.clone(),
    )?;
    ensure(
        m.contains("told to die during vm.snapshot"),
        format!("no log tail: {m}"),
    )?;
    let exit = tokio::time::timeout(Duration::from_secs(1), vm.exited()).await?;
    ensure(exit.code == Some(1), format!("{exit:?}"))?;
    // Every later call fails at once, and stop still cleans up.
    ensure(vm.info().await.is_err(), "info on a dead VMM succeeded")?;
    vm.stop(Duration::from_secs(1)).await?;
    no_leaks(&c, Some(vm.pid()))
}

async fn api_never_answers() -> Result<(), Failed> {
    let tmp = tempfile::tempdir()?;
    let hang = tmp.path().join("cloud-hypervisor");
    let pid_file = tmp.path().join("pid");
    std::fs::write(
        &hang,
        format!(
            "#!/bin/sh\necho $$ > {}\necho 'stuck before the API' >&2\nexec sleep 600\n",
            pid_file.display()
        ),
    )?;
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let env = Env::with_binary(hang, |b| b.with_start_timeout(Duration::from_millis(700)));
    let c = env.config("vm1");
    let t0 = Instant::now();
    let e = env.vmm.start(&c).await.err().ok_or("start succeeded without an API")?;
    ensure(matches!(e, VmmError::Timeout(..)), format!("{e:?}"))?;
    ensure(
        t0.elapsed() < Duration::from_secs(3),
        format!("took {:?}", t0.elapsed()),
    )?;
    let pid: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    no_leaks(&c, Some(pid))
}

async fn exits_at_start() -> Result<(), Failed> {
    let tmp = tempfile::tempdir()?;
    let bad = tmp.path().join("cloud-hypervisor");
    std::fs::write(&bad, "#!/bin/sh\necho 'Error: cannot open /dev/kvm' >&2\nexit 3\n")?;
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let env = Env::with_binary(bad, |b| b);
    let c = env.config("vm1");
    let t0 = Instant::now();
    let e = env.vmm.start(&c).await.err().ok_or("start succeeded")?;
    ensure(
        t0.elapsed() < Duration::from_secs(2),
        format!("took {:?}", t0.elapsed()),
    )?;
    let m = e.to_string();
    ensure(matches!(e, VmmError::Process { .. }), format!("{e:?}"))?;
    ensure(
        m.contains("exited with code 3 before its API answered") && m.contains("cannot open /dev/kvm"),
        m,
    )?;
    no_leaks(&c, None)
}

async fn adopt_live_vmm() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    // A second driver value (a restarted host process) finds it by its pid file.
    let env2_vmm = ChvBuilder::new()
        .with_binary(std::env::current_exe()?)
        .with_guest_kernel(env.root.join("vmlinux"), true)
        .with_kvm_device(env.root.join("kvm"))
        .with_sys_module_dir(env.root.join("modules"))
        .build()?;
    let adopted = env2_vmm.adopt(&c).await?.ok_or("the live VMM was not adopted")?;
    ensure(adopted.pid() == vm.pid(), "adopted another pid")?;
    ensure(state(&*adopted).await? == VmRunState::Running, "adopted VM not running")?;
    adopted.stop(Duration::from_secs(5)).await?;
    let exit = tokio::time::timeout(Duration::from_secs(2), adopted.exited()).await?;
    let _ = exit;
    no_leaks(&c, Some(vm.pid()))?;
    // Nothing left to adopt.
    ensure(env2_vmm.adopt(&c).await?.is_none(), "adopted a dead VMM")?;
    let other = env.config("never-started");
    ensure(
        env2_vmm.adopt(&other).await?.is_none(),
        "adopted from an empty state dir",
    )
}

async fn runs_as_configured_user() -> Result<(), Failed> {
    let env = Env::new();
    // The unprivileged VMM must reach its state dir: open the test's root for traversal.
    std::fs::set_permissions(&env.root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut c = env.config("vm1");
    c.run_as = Some((65534, 65534));
    let vm = env.vmm.start(&c).await?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid()))?;
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_owned();
    let gid = status
        .lines()
        .find(|l| l.starts_with("Gid:"))
        .unwrap_or_default()
        .to_owned();
    let groups = status
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .unwrap_or_default()
        .to_owned();
    ensure(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        format!("VMM {uid}"),
    )?;
    ensure(
        gid.split_whitespace().skip(1).all(|g| g == "65534"),
        format!("VMM {gid}"),
    )?;
    ensure(
        groups.split_whitespace().count() <= 1,
        format!("VMM kept supplementary groups: {groups}"),
    )?;
    let meta = std::fs::metadata(&c.state_dir)?;
    ensure(
        std::os::unix::fs::MetadataExt::uid(&meta) == 65534,
        "the state dir was not given to the VMM user",
    )?;
    vm.stop(Duration::from_secs(5)).await?;
    no_leaks(&c, Some(vm.pid()))
}

async fn stop_kills_after_grace() -> Result<(), Failed> {
    let env = Env::new();
    let c = env.config("vm1");
    let vm = env.vmm.start(&c).await?;
    // A VMM that accepts the shutdown call but never answers or exits.
    fake(&c, "PUT", "hang", Some(json!({"endpoint": "vm.shutdown"}))).await?;
    let t0 = Instant::now();
    vm.stop(Duration::from_millis(300)).await?;
    let took = t0.elapsed();
    ensure(took < Duration::from_secs(2), format!("stop took {took:?}"))?;
    let exit = vm.exited().await;
    ensure(exit.signal == Some(9), format!("not killed: {exit:?}"))?;
    no_leaks(&c, Some(vm.pid()))
}

async fn host_check_runs_first() -> Result<(), Failed> {
    let tmp = tempfile::tempdir()?;
    let vmm = ChvBuilder::new()
        .with_binary(std::env::current_exe()?)
        .with_kvm_device(tmp.path().join("no-kvm"))
        .build()?;
    let env = Env::new();
    let c = env.config("vm1");
    let t0 = Instant::now();
    let e = vmm.start(&c).await.err().ok_or("start without KVM succeeded")?;
    ensure(t0.elapsed() < Duration::from_secs(1), "slow host check")?;
    ensure(matches!(e, VmmError::HostUnsupported(_)), format!("{e:?}"))?;
    ensure(e.to_string().contains("--backend qemu"), e.to_string())?;
    let e = vmm
        .restore(&c, tmp.path())
        .await
        .err()
        .ok_or("restore without KVM succeeded")?;
    ensure(matches!(e, VmmError::HostUnsupported(_)), format!("{e:?}"))?;
    ensure(
        !c.state_dir.join("ch.log").exists(),
        "a VMM was started before the host check",
    )
}

async fn validator_catches_bad_shapes(spec: Spec) -> Result<(), Failed> {
    // The validator must be able to fail: wrong types, unknown and missing properties, bad enums.
    let cases = [
        (
            "PUT",
            "/api/v1/vm.create",
            Some(json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1}})),
            "missing required property payload",
        ),
        (
            "PUT",
            "/api/v1/vm.create",
            Some(json!({"payload": {"kernel": 5}})),
            "expected a string",
        ),
        (
            "PUT",
            "/api/v1/vm.create",
            Some(json!({"payload": {}, "vsock": {"cid": 2, "socket": "/s"}})),
            "below the minimum 3",
        ),
        (
            "PUT",
            "/api/v1/vm.create",
            Some(json!({"payload": {}, "serial": {"mode": "file"}})),
            "is not one of",
        ),
        (
            "PUT",
            "/api/v1/vm.create",
            Some(json!({"payload": {}, "bogus": true})),
            "unknown property bogus",
        ),
        (
            "PUT",
            "/api/v1/vm.restore",
            Some(json!({"source_url": "file:///x", "memory_restore_mode": "ondemand"})),
            "is not one of",
        ),
        ("PUT", "/api/v1/vm.restore", None, "request body is required"),
        ("PUT", "/api/v1/vm.boot", Some(json!({})), "takes no request body"),
        ("GET", "/api/v1/vm.boot", None, "no such operation"),
        ("PUT", "/api/v1/vmm.nmi", None, "no such operation"),
        ("PUT", "/vm.boot", None, "not under the API base"),
    ];
    for (m, p, b, want) in cases {
        let errs = spec.check_request(m, p, b.as_ref());
        ensure(
            errs.iter().any(|e| e.contains(want)),
            format!("{m} {p} {b:?}: wanted {want:?}, got {errs:?}"),
        )?;
    }
    let ok = spec.check_request(
        "PUT",
        "/api/v1/vm.restore",
        Some(&json!({"source_url": "file:///x", "memory_restore_mode": "OnDemand", "resume": false})),
    );
    ensure(ok.is_empty(), format!("{ok:?}"))?;
    let reply = spec.check_response("GET", "/vm.info", 200, Some(&json!({"state": "Running"})));
    ensure(
        reply.iter().any(|e| e.contains("missing required property config")),
        format!("{reply:?}"),
    )
}

fn main() {
    if support::fake_ch::main_if_fake() {
        return;
    }
    let args = Arguments::from_args();
    let spec = Spec::from_env();
    let mut tests: Vec<Trial> = Vec::new();

    // The tests whose point is CH's OpenAPI shapes need the file; the others validate every
    // request too when it is there.
    match &spec {
        SpecSource::Loaded(s) => {
            let s = s.clone();
            tests.push(trial("openapi_validator_rejects_bad_shapes", LIMIT, move || {
                validator_catches_bad_shapes(s)
            }));
            tests.push(trial("lifecycle_requests_match_openapi", LIMIT, lifecycle_shapes));
        }
        SpecSource::Missing(why) => {
            tests.push(skipped("openapi_validator_rejects_bad_shapes", why.clone()));
            tests.push(skipped("lifecycle_requests_match_openapi", why.clone()));
        }
        SpecSource::Broken(why) => {
            let why = why.clone();
            tests.push(Trial::test("openapi_description_available", move || Err(why.into())));
        }
    }
    tests.push(trial(
        "sleep_wake_ordering_and_restore_paused",
        LIMIT,
        sleep_wake_ordering,
    ));
    tests.push(trial("ch_error_keeps_message_chain", LIMIT, ch_error_chain));
    tests.push(trial("vmm_dies_during_snapshot", LIMIT, dies_during_snapshot));
    tests.push(trial("adopt_live_vmm", LIMIT, adopt_live_vmm));
    tests.push(trial("bad_config_starts_nothing", LIMIT, bad_config_starts_nothing));
    tests.push(trial("boot_error_kills_vmm_and_cleans_up", LIMIT, boot_error_cleans_up));
    tests.push(trial("api_never_answers_times_out", LIMIT, api_never_answers));
    tests.push(trial("vmm_exits_at_start_with_log_tail", LIMIT, exits_at_start));
    tests.push(trial(
        "host_check_runs_before_any_process",
        LIMIT,
        host_check_runs_first,
    ));
    tests.push(trial("stop_kills_after_grace", LIMIT, stop_kills_after_grace));
    if nix::unistd::geteuid().is_root() {
        tests.push(trial("vmm_runs_as_configured_user", LIMIT, runs_as_configured_user));
    } else {
        tests.push(skipped(
            "vmm_runs_as_configured_user",
            "needs root to start a process as another user",
        ));
    }
    // VM tests are serialized (DESIGN §7).
    let args = Arguments {
        test_threads: Some(args.test_threads.unwrap_or(1)),
        ..args
    };
    libtest_mimic::run(&args, tests).exit();
}
