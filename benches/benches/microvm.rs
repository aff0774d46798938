//! Real-microVM benches on QEMU, each beside its raw-QEMU (or raw-agent) baseline in the same run:
//!
//! | capsule                              | baseline                                                     |
//! |--------------------------------------|--------------------------------------------------------------|
//! | cold create → first exec output      | raw QEMU, same kernel + initramfs + disks → `capsules-agent: ready v1` on the serial console |
//! | wake → first exec output             | raw QEMU `-incoming` from a copy of the capsule's snapshot → first output of `echo hi` over the agent socket |
//! | exec `true` round trip               | the agent's round trip over a plain unix socket (`capsules-agent serve --unix` on the host) |
//!
//! plus sleep time, the host RSS of a running idle capsule and of a sleeping one, and (to tell
//! host-side overhead from the guest's own cost under TCG) the exec round trip straight over the
//! raw QEMU guest's agent socket, without the backend. A summary with medians and the ratios
//! against the targets (create ≤ 1.10 × raw boot, wake ≤ 1.2 × raw restore, exec ≤ 2 × unix
//! socket) is printed at the end.
//!
//! The raw QEMU command line is the backend's own (`QemuVmm::command_line`) for the same
//! `VmConfig` (the kernel command line copied from the live capsule's QEMU), with the same
//! descriptors handed over as the backend does. The capsules here have no network (no tap), like the
//! raw VMs.
//!
//! Needs root and QEMU (and builds the `small` guest image if missing); without them it prints why
//! and benches nothing. The process first moves into a network namespace of its own. Samples are
//! few (`sample_size(10)`, flat sampling, `iter_custom`): a cold boot under TCG takes seconds.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capsules_agent::client::{AgentClient, ClientOptions};
use capsules_backend_qemu::{QemuConfig, QemuVmm, SNAPSHOT_FILE};
use capsules_core::backend::{CapsuleSpec, ExecEvent, ExecRequest};
use capsules_core::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};
use capsules_core::{Backend, BackendExt};
use capsules_microvm::assets::{AssetBuilder, AssetManifest, BaseImage, Progress};
use capsules_microvm::backend::MicroVmBackend;
use capsules_microvm::vmm::{DiskConfig, KernelFormat, VmConfig};
use criterion::{Criterion, SamplingMode};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

type B = MicroVmBackend<QemuVmm>;

static N: AtomicU32 = AtomicU32::new(0);
/// Agent session epochs of the raw-QEMU baselines (above any the backend used).
static EPOCH: AtomicU64 = AtomicU64::new(1 << 40);

const READY: &[u8] = b"capsules-agent: ready v1";
const SIZE: Size = Size::S1x1gb;

fn spec() -> CapsuleSpec {
    let n = N.fetch_add(1, Ordering::SeqCst);
    CapsuleSpec {
        id: CapsuleId::generate(),
        name: CapsuleName::new(format!("bench-{}-{n}", std::process::id())).expect("a valid name"),
        team: TeamId::generate(),
        size: SIZE,
        image: Image::Small,
        disk_gib: 2,
        network: NetworkPolicy::None,
    }
}

/// Every measured iteration, by bench name, for the summary.
static FIGURES: Mutex<BTreeMap<&'static str, Vec<Duration>>> = Mutex::new(BTreeMap::new());

fn record(name: &'static str, d: Duration) {
    FIGURES.lock().unwrap().entry(name).or_default().push(d);
}

fn median(name: &str) -> Option<Duration> {
    let mut v = FIGURES.lock().unwrap().get(name)?.clone();
    v.sort();
    Some(v[v.len() / 2])
}

/// Runs `echo hi` and returns once its first output arrived (then drains it).
async fn first_output(b: &B, id: &CapsuleId) {
    let mut s = b.exec(id, ExecRequest::new(["echo", "hi"])).await.expect("exec");
    loop {
        match s.events.next().await {
            Some(Ok(ExecEvent::Stdout(_))) => break,
            Some(Ok(_)) => continue,
            other => panic!("no output: {other:?}"),
        }
    }
    while s.events.next().await.is_some() {}
}

async fn setup(state: &Path) -> Result<(B, QemuVmm, AssetManifest, PathBuf), String> {
    let assets = AssetBuilder::from_env()
        .build()
        .map_err(|e| format!("guest assets: {e}"))?;
    let agent_bin = assets
        .asset_dir()
        .join("agent-target/x86_64-unknown-linux-gnu/release/capsules-agent");
    let manifest = tokio::task::spawn_blocking(move || assets.ensure(&[BaseImage::Small], Progress::Stderr))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("could not build the guest assets: {e}"))?;
    let agent_bin = std::env::var_os("CAPSULES_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or(agent_bin);
    if !agent_bin.is_file() {
        return Err(format!(
            "no agent binary at {} (set CAPSULES_AGENT_BIN)",
            agent_bin.display()
        ));
    }
    let config = || QemuConfig::from_env().map_err(|e| e.to_string());
    let vmm = QemuVmm::new(config()?).map_err(|e| e.to_string())?;
    let raw = QemuVmm::new(config()?).map_err(|e| e.to_string())?;
    let b = MicroVmBackend::builder(vmm)
        .state_dir(state)
        .build()
        .await
        .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
    Ok((b, raw, manifest, agent_bin))
}

/// Files named `name` under `dir`, recursively.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find(&p, name, out);
        } else if e.file_name() == name {
            out.push(p);
        }
    }
}

fn find_one(dir: &Path, name: &str) -> PathBuf {
    let mut v = Vec::new();
    find(dir, name, &mut v);
    assert_eq!(v.len(), 1, "expected one {name} under {}: {v:?}", dir.display());
    v.remove(0)
}

/// The pid of the one running capsule's QEMU (from the pid files of live processes).
fn capsule_qemu_pid(state: &Path) -> u32 {
    let mut files = Vec::new();
    find(state, "qemu.pid", &mut files);
    let live: Vec<u32> = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
        .filter(|&p| alive(p))
        .collect();
    assert_eq!(
        live.len(),
        1,
        "expected one running capsule QEMU: {files:?} -> {live:?}"
    );
    live[0]
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `VmRSS` of a process, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The value after `-append` in a process's command line.
fn append_of(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args.iter().position(|a| a == "-append").expect("-append");
    args[i + 1].clone()
}

/// A raw QEMU VM (no backend): its directory, config and files.
struct Raw {
    dir: PathBuf,
    vm: VmConfig,
}

impl Raw {
    fn new(dir: PathBuf, manifest: &AssetManifest, cmdline: &str, data: PathBuf) -> Raw {
        std::fs::create_dir_all(&dir).unwrap();
        let image = manifest.image(BaseImage::Small).expect("the small image").path.clone();
        let vm = VmConfig {
            id: "raw".into(),
            vcpus: SIZE.vcpus(),
            memory_mib: SIZE.memory_mib(),
            kernel: manifest.kernel_path(KernelFormat::BzImage).to_owned(),
            initramfs: manifest.initramfs.path.clone(),
            cmdline: cmdline.to_owned(),
            disks: vec![
                DiskConfig {
                    path: image,
                    read_only: true,
                },
                DiskConfig {
                    path: data,
                    read_only: false,
                },
            ],
            tap: None,
            state_dir: dir.clone(),
            serial_log: dir.join("serial.log"),
            run_as: None,
        };
        Raw { dir, vm }
    }

    /// Spawns QEMU with the backend's command line for this VM, the descriptors at the numbers
    /// `QemuVmm::command_line` shows (serial 9, disks 10.., incoming 8), as the backend passes
    /// them. Returns the child (killed on drop by the caller).
    fn spawn(&self, vmm: &QemuVmm, incoming: Option<&Path>) -> std::process::Child {
        for f in ["qmp.sock", "agent.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let _ = std::fs::remove_file(&self.vm.serial_log);
        let open = |p: &Path, write: bool| -> OwnedFd {
            let f = std::fs::OpenOptions::new().read(true).write(write).open(p).unwrap();
            f.into()
        };
        let serial: OwnedFd = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.vm.serial_log)
            .unwrap()
            .into();
        // (target number, descriptor) pairs, as QemuVmm::command_line numbers them.
        let mut fds: Vec<(RawFd, OwnedFd)> = vec![(9, serial)];
        for (i, d) in self.vm.disks.iter().enumerate() {
            let base = 10 + 2 * i as RawFd;
            if d.read_only {
                fds.push((base, open(&d.path, false)));
            } else {
                fds.push((base, open(&d.path, true)));
                fds.push((base + 1, open(&d.path, false)));
            }
        }
        if let Some(p) = incoming {
            fds.push((8, open(p, false)));
        }
        // Move every source above the target range first, so no dup2 clobbers a source.
        let moved: Vec<(RawFd, OwnedFd)> = fds
            .into_iter()
            .map(|(t, fd)| {
                let high = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200)).unwrap();
                // SAFETY: fcntl just returned this new descriptor; nothing else owns it.
                (t, unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) })
            })
            .collect();
        let pairs: Vec<(RawFd, RawFd)> = moved.iter().map(|(t, fd)| (*t, fd.as_raw_fd())).collect();
        let mut cmd = std::process::Command::new(vmm.binary());
        cmd.args(vmm.command_line(&self.vm, incoming.is_some()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("qemu.log")).unwrap());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &(t, src) in &pairs {
                    if libc::dup2(src, t) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn raw QEMU");
        drop(moved);
        child
    }

    /// Polls the serial log until `needle` appears (2 ms steps).
    async fn wait_serial(&self, child: &mut std::process::Child, needle: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(b) = std::fs::read(&self.vm.serial_log)
                && b.windows(needle.len()).any(|w| w == needle)
            {
                return;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("raw QEMU exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "no ready line within 300 s: {}", self.log());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }

    /// Connects to a unix socket QEMU creates, retrying while it does not exist yet (1 ms steps).
    async fn connect(&self, name: &str, child: &mut std::process::Child) -> tokio::net::UnixStream {
        let p = self.dir.join(name);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(s) = tokio::net::UnixStream::connect(&p).await {
                return s;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("raw QEMU exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "no {name} within 120 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// QMP, as the backend restores: capabilities, `query-status` until the snapshot is loaded
    /// (`paused`), then `cont`.
    async fn qmp_cont(&self, child: &mut std::process::Child) {
        let s = self.connect("qmp.sock", child).await;
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        lines.next_line().await.unwrap().expect("QMP greeting");
        let mut exec = async |cmd: &str| -> String {
            w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
                .await
                .unwrap();
            loop {
                let l = lines.next_line().await.unwrap().expect("a QMP answer");
                if l.contains("\"return\"") {
                    return l;
                }
                assert!(!l.contains("\"error\""), "QMP {cmd}: {l}");
            }
        };
        exec("qmp_capabilities").await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = exec("query-status").await;
            if st.contains("\"paused\"") || st.contains("\"postmigrate\"") {
                break;
            }
            assert!(st.contains("\"inmigrate\""), "unexpected state while restoring: {st}");
            assert!(
                Instant::now() < deadline,
                "the snapshot did not load within 120 s: {st}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        exec("cont").await;
    }

    /// A fresh agent session over the raw VM's agent socket (a new connection per attempt, as
    /// the backend does).
    async fn agent(&self, child: &mut std::process::Child) -> AgentClient {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.connect("agent.sock", child).await;
            let epoch = EPOCH.fetch_add(1, Ordering::SeqCst);
            let opts = ClientOptions {
                handshake_timeout: Duration::from_secs(5),
                ..ClientOptions::default()
            };
            match AgentClient::handshake(s, epoch, opts).await {
                Ok(a) => return a,
                Err(e) => assert!(Instant::now() < deadline, "agent handshake: {e:?}"),
            }
        }
    }
}

/// Terminates the long-lived capsule when dropped, also when a bench panics.
struct Cleanup<'a> {
    rt: &'a tokio::runtime::Runtime,
    b: &'a B,
    id: CapsuleId,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.rt.block_on(self.b.terminate(&self.id)) {
            eprintln!("cleanup: terminate: {e}");
        }
    }
}

/// A raw QEMU process, killed (SIGKILL) and reaped on drop, also when the bench panics.
struct RawChild(std::process::Child);

impl Drop for RawChild {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

/// A fresh data disk as the backend makes one (sparse file, `mkfs.ext4` with lazy init).
fn fresh_data_disk(path: &Path, gib: u64) {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(gib << 30).unwrap();
    drop(f);
    let st = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "capsule-data",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 {}", path.display());
}

fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn agent_req(argv: &[&str]) -> capsules_agent::proto::ExecRequest {
    capsules_agent::proto::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(60_000),
        ..Default::default()
    }
}

/// Runs `echo hi` over an agent session; returns once its first stdout arrived.
async fn agent_first_output(a: &AgentClient) {
    let out = a.run(agent_req(&["echo", "hi"])).await.expect("echo over the agent");
    assert_eq!(&out.stdout[..], b"hi\n");
}

/// A sparse copy of `from` (cp --sparse=always).
fn sparse_copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

fn main() {
    if let Err(why) = capsules_microvm::testing::check_prerequisites(&[("qemu-system-x86_64", "qemu-system-x86")]) {
        eprintln!("microvm benches skipped: {why}");
        return;
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("microvm benches skipped: cannot create a network namespace: {e}");
        return;
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let state = tempfile::Builder::new()
        .prefix("capsules-bench-microvm-")
        .tempdir()
        .expect("a temp dir");
    // The VMM runs as an unprivileged user that must reach the state directory inside.
    std::fs::set_permissions(state.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let cap_state = state.path().join("backend");
    let (b, raw_vmm, manifest, agent_bin) = match rt.block_on(setup(&cap_state)) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("microvm benches skipped: {why}");
            return;
        }
    };
    eprintln!("backend: {:?}", b.info());

    // The long-lived capsule: its kernel command line and data disk shape the raw VMs.
    let s = spec();
    rt.block_on(b.create(&s)).expect("create");
    let cleanup = Cleanup {
        rt: &rt,
        b: &b,
        id: s.id.clone(),
    };
    rt.block_on(first_output(&b, &s.id));
    let pid = capsule_qemu_pid(&cap_state);
    let cmdline = append_of(pid);
    let raw_dir = state.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let data_disk = find_one(&cap_state, "data.ext4");

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("microvm");
    g.sampling_mode(SamplingMode::Flat);

    // --- cold boot: raw QEMU to the ready line, then the capsule to its first exec output.
    rt.block_on(b.sleep(&s.id)).expect("sleep");
    let boot_data = raw_dir.join("boot-data.ext4");
    // The snapshot the raw restores load, and the disk it goes with (copied while asleep).
    let snap = raw_dir.join("memory.qemu");
    std::fs::copy(find_one(&cap_state, SNAPSHOT_FILE), &snap).unwrap();
    let restore_data_master = raw_dir.join("restore-data.master.ext4");
    sparse_copy(&data_disk, &restore_data_master);
    let snapshot_bytes = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
    let sleeping_alive = alive(pid);
    rt.block_on(b.wake(&s.id)).expect("wake");

    let boot = Raw::new(raw_dir.join("boot"), &manifest, &cmdline, boot_data);
    g.bench_function("raw_qemu_boot_to_ready", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh disk like every capsule's (made outside the timing).
                    fresh_data_disk(&boot.vm.disks[1].path, 2);
                    let t = Instant::now();
                    let mut child = RawChild(boot.spawn(&raw_vmm, None));
                    boot.wait_serial(&mut child.0, READY).await;
                    let d = t.elapsed();
                    drop(child);
                    record("raw_qemu_boot_to_ready", d);
                    total += d;
                }
                total
            })
        })
    });
    g.bench_function("cold_create_to_first_output", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let s = spec();
                    let t = Instant::now();
                    b.create(&s).await.expect("create");
                    first_output(&b, &s.id).await;
                    let d = t.elapsed();
                    record("cold_create_to_first_output", d);
                    total += d;
                    b.terminate(&s.id).await.expect("terminate");
                }
                total
            })
        })
    });

    // --- restore: raw QEMU -incoming from the copied snapshot, then the capsule's wake.
    let restore_data = raw_dir.join("restore-data.ext4");
    let restore = Raw::new(raw_dir.join("restore"), &manifest, &cmdline, restore_data.clone());
    g.bench_function("raw_qemu_restore_to_first_output", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    sparse_copy(&restore_data_master, &restore_data);
                    let t = Instant::now();
                    let mut child = RawChild(restore.spawn(&raw_vmm, Some(&snap)));
                    restore.qmp_cont(&mut child.0).await;
                    let a = restore.agent(&mut child.0).await;
                    agent_first_output(&a).await;
                    let d = t.elapsed();
                    a.close();
                    drop(child);
                    record("raw_qemu_restore_to_first_output", d);
                    total += d;
                }
                total
            })
        })
    });
    g.bench_function("wake_to_first_output", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.sleep(&s.id).await.expect("sleep");
                    let t = Instant::now();
                    b.wake(&s.id).await.expect("wake");
                    first_output(&b, &s.id).await;
                    let d = t.elapsed();
                    record("wake_to_first_output", d);
                    total += d;
                }
                total
            })
        })
    });
    g.bench_function("sleep", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.wake(&s.id).await.expect("wake");
                    let t = Instant::now();
                    b.sleep(&s.id).await.expect("sleep");
                    let d = t.elapsed();
                    record("sleep", d);
                    total += d;
                }
                b.wake(&s.id).await.expect("wake");
                total
            })
        })
    });

    // --- exec round trip: the capsule, the agent on the host over a unix socket, and (for the
    // breakdown) the guest agent of a raw QEMU VM straight over its socket.
    g.bench_function("exec_true_round_trip", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    let o = b.exec_collect(&s.id, ExecRequest::new(["true"])).await.expect("exec");
                    assert!(o.status.success());
                    record("exec_true_round_trip", t.elapsed());
                }
                t.elapsed()
            })
        })
    });
    let sock_dir = raw_dir.join("unix-agent");
    std::fs::create_dir_all(sock_dir.join("root")).unwrap();
    let sock = sock_dir.join("agent.sock");
    let mut host_agent = std::process::Command::new(&agent_bin)
        .arg("serve")
        .arg("--unix")
        .arg(&sock)
        .arg("--root")
        .arg(sock_dir.join("root"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start capsules-agent serve --unix");
    let host_client = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(st) = tokio::net::UnixStream::connect(&sock).await {
                break AgentClient::handshake(st, 1, ClientOptions::default())
                    .await
                    .expect("handshake");
            }
            assert!(Instant::now() < deadline, "the host agent did not listen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    g.bench_function("agent_unix_socket_exec_true_round_trip", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    let o = host_client.run(agent_req(&["true"])).await.expect("exec");
                    assert_eq!(o.exit.code, Some(0));
                    record("agent_unix_socket_exec_true_round_trip", t.elapsed());
                }
                t.elapsed()
            })
        })
    });
    host_client.close();
    kill(&mut host_agent);

    // The raw restored guest's agent, no backend in between.
    sparse_copy(&restore_data_master, &restore_data);
    let mut child = RawChild(restore.spawn(&raw_vmm, Some(&snap)));
    let guest_client = rt.block_on(async {
        restore.qmp_cont(&mut child.0).await;
        restore.agent(&mut child.0).await
    });
    g.bench_function("raw_qemu_agent_exec_true_round_trip", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    let o = guest_client.run(agent_req(&["true"])).await.expect("exec");
                    assert_eq!(o.exit.code, Some(0));
                    record("raw_qemu_agent_exec_true_round_trip", t.elapsed());
                }
                t.elapsed()
            })
        })
    });
    guest_client.close();
    drop(child);
    g.finish();

    // --- host memory: the running capsule after 5 s idle, then asleep.
    std::thread::sleep(Duration::from_secs(5));
    let pid = capsule_qemu_pid(&cap_state);
    let idle_rss = rss(pid);
    rt.block_on(b.sleep(&s.id)).expect("sleep");
    let asleep_rss = if alive(pid) { rss(pid) } else { None };
    drop(cleanup);
    c.final_summary();

    let accel = raw_vmm.accel().as_str();
    summary(accel, idle_rss, asleep_rss, sleeping_alive, snapshot_bytes);
}

fn summary(accel: &str, idle_rss: Option<u64>, asleep_rss: Option<u64>, sleeping_alive: bool, snapshot_bytes: u64) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("\nmicrovm summary (medians of every measured iteration; accelerator {accel})");
    let figs = FIGURES.lock().unwrap().clone();
    for (name, v) in &figs {
        let mut v = v.clone();
        v.sort();
        println!(
            "  {name:<42} median {:>9.1} ms  (min {:.1}, max {:.1}, n={})",
            ms(v[v.len() / 2]),
            ms(v[0]),
            ms(v[v.len() - 1]),
            v.len()
        );
    }
    let ratio = |a: &str, b: &str, target: f64| {
        if let (Some(x), Some(y)) = (median(a), median(b)) {
            let r = x.as_secs_f64() / y.as_secs_f64();
            let verdict = if r <= target { "meets" } else { "misses" };
            println!("  {a} / {b} = {r:.2} (target <= {target}: {verdict})");
        }
    };
    ratio("cold_create_to_first_output", "raw_qemu_boot_to_ready", 1.10);
    ratio("wake_to_first_output", "raw_qemu_restore_to_first_output", 1.2);
    ratio("exec_true_round_trip", "agent_unix_socket_exec_true_round_trip", 2.0);
    ratio("exec_true_round_trip", "raw_qemu_agent_exec_true_round_trip", 2.0);
    if let (Some(x), Some(y)) = (
        median("exec_true_round_trip"),
        median("raw_qemu_agent_exec_true_round_trip"),
    ) {
        println!(
            "  exec round trip: host-side overhead above the raw guest agent {:.1} ms",
            ms(x.saturating_sub(y))
        );
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    match idle_rss {
        Some(r) => println!("  host RSS of a running idle capsule's QEMU: {:.1} MiB", mib(r)),
        None => println!("  host RSS of a running idle capsule's QEMU: not found"),
    }
    match asleep_rss {
        Some(r) => println!(
            "  host RSS of a sleeping capsule: its QEMU is still running, {:.1} MiB",
            mib(r)
        ),
        None => println!(
            "  host RSS of a sleeping capsule: 0 (no VMM process{}; memory snapshot on disk {:.1} MiB)",
            if sleeping_alive {
                "; but it was alive at the first sleep"
            } else {
                ""
            },
            mib(snapshot_bytes)
        ),
    }
}
