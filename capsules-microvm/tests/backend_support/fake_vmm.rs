//! `FakeVmm`: a [`Vmm`] whose "VM" is the real guest agent running on the host in test mode
//! (`capsules-agent serve --unix <vm dir>/agent.sock --root <vm dir>/root`).
//!
//! - `pause`/`resume` are SIGSTOP/SIGCONT of the agent process.
//! - `snapshot` writes `memory` (the pid) into the snapshot directory; the agent process is the
//!   "memory": after a snapshot, `stop` hides the (stopped) process instead of killing it, and
//!   `restore` continues it. Anything running in the "guest" survives sleep/wake, as in a VM.
//! - `adopt` finds a live agent through the pid file (and checks its command line).
//! - Faults: die during the next snapshot; die right after the next resume.
//! - The "disk" is `<vm dir>/root`, which survives a cold restart like a data disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capsules_microvm::vmm::{
    HostReport, KernelFormat, Stream, VmConfig, VmExit, VmHandle, VmInfo, VmRunState, Vmm, VmmError,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

const PID_FILE: &str = "fake-vmm.pid";

/// Runs the agent chrooted into `<vm dir>/chroot` inside a private mount namespace: the host's
/// system directories bound read-only-ish (bind), a private `/tmp`, and the capsule's "disk"
/// (`<vm dir>/root`) on `/workspace` — so `/workspace` means what it means in a guest. It refuses
/// to mount anything unless it really runs in a new mount namespace.
const ISOLATE: &str = r#"
set -eu
R="$1"; ROOT="$2"; AGENT="$3"
[ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || { echo "fake-vmm: not in a private mount namespace" >&2; exit 1; }
mount --make-rprivate /
mkdir -p "$R/run" "$R/tmp" "$R/proc" "$R/dev" "$R/workspace"
for d in bin sbin lib lib32 lib64 libx32 usr etc; do
  if [ -L "/$d" ]; then [ -e "$R/$d" ] || [ -L "$R/$d" ] || ln -s "$(readlink "/$d")" "$R/$d";
  elif [ -d "/$d" ]; then mkdir -p "$R/$d"; mount --rbind "/$d" "$R/$d"; fi
done
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount --bind "$ROOT" "$R/workspace"
: > "$R/agent"; mount --bind "$AGENT" "$R/agent"
exec chroot "$R" /agent serve --unix /run/agent.sock --root /workspace
"#;

/// Fault switches (each fires once).
#[derive(Debug, Default)]
pub struct Faults {
    /// Kill the agent process in the middle of the next snapshot.
    pub die_during_snapshot: AtomicBool,
    /// Kill the agent process right after the next resume following a restore.
    pub die_after_wake: AtomicBool,
    /// Fail the next snapshot without harming the VM.
    pub fail_snapshot: AtomicBool,
    /// Start the next VM with a broken agent command line (it exits at once, printing usage).
    pub break_boot: AtomicBool,
}

/// Every agent process any FakeVmm started (killed at the end of the test run).
static SPAWNED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every agent process started by any FakeVmm in this test process.
pub fn kill_all_spawned() {
    for pid in SPAWNED.lock().unwrap().drain(..) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
    }
}

#[derive(Debug, Clone)]
pub struct FakeVmm {
    agent_bin: PathBuf,
    pub faults: Arc<Faults>,
}

impl FakeVmm {
    pub fn new(agent_bin: PathBuf) -> Self {
        FakeVmm {
            agent_bin,
            faults: Arc::new(Faults::default()),
        }
    }

    /// The pid of the live fake VMM in a capsule's VM directory, if any.
    pub fn pid_in(vm_dir: &Path) -> Option<u32> {
        let s = std::fs::read_to_string(vm_dir.join(PID_FILE)).ok()?;
        let pid: u32 = s.trim().parse().ok()?;
        is_our_agent(pid, vm_dir).then_some(pid)
    }
}

/// Whether the agent runs chrooted with `/workspace` (root and `unshare` available).
pub fn isolated() -> bool {
    nix::unistd::geteuid().is_root() && Path::new("/usr/bin/unshare").exists() && Path::new("/usr/sbin/chroot").exists()
}

fn sock_path(vm_dir: &Path) -> PathBuf {
    if isolated() {
        vm_dir.join("chroot/run/agent.sock")
    } else {
        vm_dir.join("agent.sock")
    }
}

fn is_our_agent(pid: u32, vm_dir: &Path) -> bool {
    if matches!(proc_state(pid), None | Some('Z') | Some('X')) {
        return false;
    }
    if isolated() {
        std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r == vm_dir.join("chroot"))
    } else {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let sock = sock_path(vm_dir);
        let needle = sock.as_os_str().as_encoded_bytes();
        cmd.windows(needle.len()).any(|w| w == needle)
    }
}

fn proc_state(pid: u32) -> Option<char> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
}

fn perr(msg: impl Into<String>) -> VmmError {
    VmmError::Process {
        message: msg.into(),
        source: None,
    }
}

#[derive(Debug)]
struct Handle {
    pid: u32,
    vm_dir: PathBuf,
    exit: watch::Receiver<Option<VmExit>>,
    exit_tx: Arc<watch::Sender<Option<VmExit>>>,
    /// A snapshot was taken and the VM not resumed since: `stop` hides the process.
    snapshotted: AtomicBool,
    /// Restored from a snapshot; the die-after-wake fault applies to its first resume.
    restored: bool,
    faults: Arc<Faults>,
}

impl Handle {
    fn new(pid: u32, vm_dir: &Path, faults: Arc<Faults>, restored: bool, child: Option<tokio::process::Child>) -> Self {
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        let t = tx.clone();
        let dir = vm_dir.to_path_buf();
        match child {
            Some(mut child) => {
                tokio::spawn(async move {
                    let st = child.wait().await.ok();
                    use std::os::unix::process::ExitStatusExt;
                    let _ = t.send(Some(VmExit {
                        code: st.and_then(|s| s.code()),
                        signal: st.and_then(|s| s.signal()),
                        log_tail: tail_of(&dir.join("serial.log")),
                    }));
                });
            }
            None => {
                tokio::spawn(async move {
                    loop {
                        if t.borrow().is_some() {
                            return;
                        }
                        if !is_our_agent(pid, &dir) {
                            let _ = t.send(Some(VmExit {
                                code: None,
                                signal: None,
                                log_tail: tail_of(&dir.join("serial.log")),
                            }));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        }
        Handle {
            pid,
            vm_dir: vm_dir.to_path_buf(),
            exit: rx,
            exit_tx: tx,
            snapshotted: AtomicBool::new(false),
            restored,
            faults,
        }
    }

    fn gone(&self) -> bool {
        self.exit.borrow().is_some()
    }

    fn signal(&self, s: Signal) -> Result<(), VmmError> {
        if self.gone() {
            return Err(perr("the fake VMM process has exited"));
        }
        kill(Pid::from_raw(self.pid as i32), s).map_err(|e| perr(format!("kill({s}) failed: {e}")))
    }

    async fn kill_hard(&self) {
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let mut rx = self.exit.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|e| e.is_some())).await;
    }
}

fn tail_of(p: &Path) -> String {
    let b = std::fs::read(p).unwrap_or_default();
    let start = b.len().saturating_sub(2048);
    String::from_utf8_lossy(&b[start..]).into_owned()
}

#[async_trait]
impl VmHandle for Handle {
    fn pid(&self) -> u32 {
        self.pid
    }
    async fn info(&self) -> Result<VmInfo, VmmError> {
        if self.gone() {
            return Ok(VmInfo {
                pid: self.pid,
                state: VmRunState::Shutdown,
            });
        }
        let state = match proc_state(self.pid) {
            Some('T') | Some('t') => VmRunState::Paused,
            Some(_) => VmRunState::Running,
            None => VmRunState::Shutdown,
        };
        Ok(VmInfo { pid: self.pid, state })
    }
    async fn pause(&self) -> Result<(), VmmError> {
        self.signal(Signal::SIGSTOP)
    }
    async fn resume(&self) -> Result<(), VmmError> {
        self.signal(Signal::SIGCONT)?;
        self.snapshotted.store(false, Ordering::SeqCst);
        if self.restored && self.faults.die_after_wake.swap(false, Ordering::SeqCst) {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        Ok(())
    }
    async fn snapshot(&self, dir: &Path) -> Result<(), VmmError> {
        if self.gone() {
            return Err(perr("the fake VMM process has exited"));
        }
        if self.faults.fail_snapshot.swap(false, Ordering::SeqCst) {
            return Err(VmmError::Control {
                message: "the fake VMM refused the snapshot".into(),
                source: None,
            });
        }
        if self.faults.die_during_snapshot.swap(false, Ordering::SeqCst) {
            std::fs::write(dir.join("memory.partial"), b"half").map_err(|e| VmmError::io("write", e))?;
            self.kill_hard().await;
            return Err(perr("the fake VMM died while writing the snapshot"));
        }
        std::fs::write(dir.join("memory"), format!("{}\n", self.pid)).map_err(|e| VmmError::io("write snapshot", e))?;
        self.snapshotted.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn agent_stream(&self) -> Result<Box<dyn Stream>, VmmError> {
        if self.gone() {
            return Err(perr("the fake VMM process has exited"));
        }
        let s = tokio::net::UnixStream::connect(sock_path(&self.vm_dir))
            .await
            .map_err(|e| VmmError::io("connect to the agent socket", e))?;
        Ok(Box::new(s))
    }
    async fn stop(&self, grace: Duration) -> Result<(), VmmError> {
        if self.gone() {
            return Ok(());
        }
        if self.snapshotted.load(Ordering::SeqCst) {
            // "Guest RAM released": the process stays, stopped and hidden, as the snapshot's memory.
            let _ = std::fs::remove_file(self.vm_dir.join(PID_FILE));
            let _ = self.exit_tx.send(Some(VmExit {
                code: Some(0),
                signal: None,
                log_tail: String::new(),
            }));
            return Ok(());
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let mut rx = self.exit.clone();
        if tokio::time::timeout(grace.min(Duration::from_secs(2)), rx.wait_for(|e| e.is_some()))
            .await
            .is_err()
        {
            self.kill_hard().await;
        }
        let _ = std::fs::remove_file(self.vm_dir.join(PID_FILE));
        Ok(())
    }
    async fn exited(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(v) => v.clone().unwrap_or(VmExit {
                code: None,
                signal: None,
                log_tail: String::new(),
            }),
            Err(_) => VmExit {
                code: None,
                signal: None,
                log_tail: String::new(),
            },
        }
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn host_check(&self) -> Result<HostReport, VmmError> {
        if !self.agent_bin.is_file() {
            return Err(VmmError::HostUnsupported(format!(
                "the agent binary {} is missing; build it with cargo build -p capsules-agent",
                self.agent_bin.display()
            )));
        }
        Ok(HostReport {
            accelerator: "none".into(),
            detail: "fake VMM: the agent runs on the host".into(),
        })
    }
    fn kernel_format(&self) -> KernelFormat {
        KernelFormat::BzImage
    }
    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>, VmmError> {
        let dir = &config.state_dir;
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| VmmError::io("create the root", e))?;
        let sock = sock_path(dir);
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.serial_log)
            .map_err(|e| VmmError::io("open the serial log", e))?;
        use std::io::Write;
        let _ = writeln!(&log, "fake-vmm: boot {} cmdline: {}", config.id, config.cmdline);
        let mut cmd = if self.faults.break_boot.swap(false, Ordering::SeqCst) {
            let mut c = tokio::process::Command::new(&self.agent_bin);
            c.arg("serve").arg("--no-such-flag");
            c
        } else if isolated() {
            let chroot = dir.join("chroot");
            std::fs::create_dir_all(&chroot).map_err(|e| VmmError::io("create the chroot", e))?;
            let mut c = tokio::process::Command::new("/usr/bin/unshare");
            c.args([
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                ISOLATE,
                "fake-vmm",
            ])
            .arg(&chroot)
            .arg(&root)
            .arg(&self.agent_bin);
            c
        } else {
            let mut c = tokio::process::Command::new(&self.agent_bin);
            c.arg("serve").arg("--unix").arg(&sock).arg("--root").arg(&root);
            c
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| VmmError::io("dup log", e))?)
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| VmmError::io("spawn the agent", e))?;
        let pid = child.id().ok_or_else(|| perr("the agent exited at once"))?;
        SPAWNED.lock().unwrap().push(pid);
        std::fs::write(dir.join(PID_FILE), format!("{pid}\n")).map_err(|e| VmmError::io("write the pid file", e))?;
        let h = Handle::new(pid, dir, self.faults.clone(), false, Some(child));
        let until = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if h.gone() {
                return Err(perr(format!(
                    "the agent exited during start: {}",
                    tail_of(&config.serial_log)
                )));
            }
            if Instant::now() > until {
                h.kill_hard().await;
                return Err(VmmError::Timeout(
                    "waiting for the agent socket",
                    Duration::from_secs(10),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Box::new(h))
    }
    async fn restore(&self, config: &VmConfig, snapshot_dir: &Path) -> Result<Box<dyn VmHandle>, VmmError> {
        let mem =
            std::fs::read_to_string(snapshot_dir.join("memory")).map_err(|e| VmmError::io("read the snapshot", e))?;
        let pid: u32 = mem.trim().parse().map_err(|_| perr("the snapshot is corrupt"))?;
        if !is_our_agent(pid, &config.state_dir) {
            return Err(perr("the snapshot's memory (the stopped agent process) is gone"));
        }
        std::fs::write(config.state_dir.join(PID_FILE), format!("{pid}\n"))
            .map_err(|e| VmmError::io("write the pid file", e))?;
        Ok(Box::new(Handle::new(
            pid,
            &config.state_dir,
            self.faults.clone(),
            true,
            None,
        )))
    }
    async fn adopt(&self, config: &VmConfig) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        Ok(FakeVmm::pid_in(&config.state_dir).map(|pid| {
            Box::new(Handle::new(pid, &config.state_dir, self.faults.clone(), false, None)) as Box<dyn VmHandle>
        }))
    }
}
