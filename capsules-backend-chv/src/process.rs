//! The VMM process: spawning it, waiting for its API, and supervising its exit.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsules_microvm::vmm::{VmExit, VmmError};
use tokio::sync::{Notify, watch};

use crate::api::ApiClient;

/// Files the driver keeps in a VM's state directory.
#[derive(Debug, Clone)]
pub(crate) struct StatePaths {
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// CH's lock beside its API socket (`<socket>.lock`), left behind when it exits.
    pub api_lock: PathBuf,
}

impl StatePaths {
    pub(crate) fn new(state_dir: &Path) -> Self {
        StatePaths {
            api_socket: state_dir.join("ch.sock"),
            vsock_socket: state_dir.join("vsock.sock"),
            log: state_dir.join("ch.log"),
            pid_file: state_dir.join("ch.pid"),
            api_lock: state_dir.join("ch.sock.lock"),
        }
    }

    /// Removes the sockets and the pid file (after the process is gone, or before a new one).
    pub(crate) fn remove_runtime_files(&self) {
        for p in [&self.api_socket, &self.api_lock, &self.vsock_socket, &self.pid_file] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How the driver watches the process: its own child, or one adopted from an earlier host process.
#[derive(Debug)]
pub(crate) struct Supervisor {
    pid: u32,
    exit: watch::Receiver<Option<VmExit>>,
    kill: Arc<Notify>,
    adopted: bool,
}

impl Supervisor {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, if it has happened.
    pub(crate) fn exit_now(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Resolves when the process has exited.
    pub(crate) async fn exited(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().expect("waited for Some"),
            // The watcher task is gone without reporting (runtime shutting down).
            Err(_) => VmExit {
                code: None,
                signal: None,
                log_tail: "the supervising task ended".into(),
            },
        }
    }

    /// Kills the process (SIGKILL). For our own child this goes through the task that owns it,
    /// so a pid that was already reaped and reused is never signalled.
    pub(crate) fn kill(&self) {
        if self.exit_now().is_some() {
            return;
        }
        if self.adopted {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        } else {
            self.kill.notify_one();
        }
    }
}

/// The command line for one VMM (no VM config: that goes through `vm.create`).
pub(crate) struct Spawn<'a> {
    pub binary: &'a Path,
    pub paths: &'a StatePaths,
    pub run_as: Option<(u32, u32)>,
    pub verbose: bool,
    pub id: &'a str,
}

/// Starts the VMM and returns once its API answers `vmm.ping`, or fails with the log tail if it
/// exits or the deadline passes first (then it is killed and its files removed).
pub(crate) async fn spawn(s: Spawn<'_>, client: &ApiClient, deadline: Duration) -> Result<Supervisor, VmmError> {
    let paths = s.paths;
    // Stale sockets from a dead VMM would make CH's bind fail.
    paths.remove_runtime_files();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|e| VmmError::io(format!("open the VMM log {}", paths.log.display()), e))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log
        .try_clone()
        .map_err(|e| VmmError::io(format!("open the VMM log {}", paths.log.display()), e))?;
    let mut cmd = tokio::process::Command::new(s.binary);
    cmd.arg("--api-socket")
        .arg(format!("path={}", paths.api_socket.display()))
        .arg("--seccomp")
        .arg("true");
    if s.verbose {
        cmd.arg("-v");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // Its own process group: a terminal's Ctrl-C to the host process does not kill VMs,
        // which the next host process adopts.
        .process_group(0);
    if let Some((uid, gid)) = s.run_as {
        cmd.uid(uid).gid(gid);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| VmmError::Process {
        message: format!("could not start {} for capsule {}", s.binary.display(), s.id),
        source: Some(Box::new(e)),
    })?;
    let pid = child.id().expect("a child that was just spawned has a pid");
    let _ = std::fs::write(&paths.pid_file, format!("{pid}\n"));

    let (tx, rx) = watch::channel(None);
    let kill = Arc::new(Notify::new());
    let log_path = paths.log.clone();
    let kill_rx = kill.clone();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx.notified() => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let (code, signal) = match status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                (st.code(), st.signal())
            }
            Err(_) => (None, None),
        };
        let log_tail = log_tail_since(&log_path, log_start);
        let _ = tx.send(Some(VmExit { code, signal, log_tail }));
    });
    let sup = Supervisor {
        pid,
        exit: rx,
        kill,
        adopted: false,
    };

    match wait_for_api(&sup, client, started, deadline).await {
        Ok(()) => {
            tracing::debug!(capsule = s.id, pid, elapsed = ?started.elapsed(), "cloud-hypervisor API ready");
            Ok(sup)
        }
        Err(e) => {
            sup.kill();
            sup.exited().await;
            paths.remove_runtime_files();
            Err(e)
        }
    }
}

/// Polls `vmm.ping` on the socket until it answers, the process exits, or the deadline passes.
pub(crate) async fn wait_for_api(
    sup: &Supervisor,
    client: &ApiClient,
    started: Instant,
    limit: Duration,
) -> Result<(), VmmError> {
    let deadline = started + limit;
    let mut delay = Duration::from_millis(1);
    loop {
        if let Some(exit) = sup.exit_now() {
            return Err(exited_error("before its API answered", &exit));
        }
        if client.socket().exists()
            && let Ok(ping) = client.ping().await
        {
            tracing::debug!(version = %ping.version, pid = ?ping.pid, "cloud-hypervisor answers");
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(VmmError::Timeout("waiting for the Cloud Hypervisor API socket", limit));
        }
        // Wake early if the process exits.
        tokio::select! {
            _ = tokio::time::sleep(delay.min(deadline - now)) => {}
            _ = sup.exited() => {}
        }
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// The error for a VMM that exited while we waited on it.
pub(crate) fn exited_error(during: &str, exit: &VmExit) -> VmmError {
    let how = match (exit.code, exit.signal) {
        (Some(c), _) => format!("with code {c}"),
        (None, Some(s)) => format!("on signal {s}"),
        (None, None) => "for an unknown reason".into(),
    };
    let tail = if exit.log_tail.trim().is_empty() {
        "its log is empty".to_owned()
    } else {
        format!("its log ends: {}", exit.log_tail.trim())
    };
    VmmError::Process {
        message: format!("cloud-hypervisor exited {how} {during}; {tail}"),
        source: None,
    }
}

/// The last lines the process wrote to its log (since `start`), at most 2 KiB.
pub(crate) fn log_tail_since(path: &Path, start: u64) -> String {
    const MAX: u64 = 2048;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = start.max(len.saturating_sub(MAX));
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Re-attaches to a live VMM by its pid file, if the pid is a `cloud-hypervisor` serving this
/// state dir's API socket. Supervision polls `/proc/<pid>` (it is not our child).
pub(crate) fn adopt(binary: &Path, paths: &StatePaths) -> Option<Supervisor> {
    let pid: u32 = std::fs::read_to_string(&paths.pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let want_sock = format!("path={}", paths.api_socket.display());
    let exe_ok = args
        .first()
        .is_some_and(|a| Path::new(a).file_name() == binary.file_name());
    if !exe_ok || !args.contains(&want_sock) {
        return None;
    }
    let start = std::fs::metadata(&paths.log).map(|m| m.len()).unwrap_or(0);
    let (tx, rx) = watch::channel(None);
    let log_path = paths.log.clone();
    tokio::spawn(async move {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let starttime = proc_starttime(pid);
        while proc_dir.exists() && proc_starttime(pid) == starttime && !is_zombie(pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tx.send(Some(VmExit {
            code: None,
            signal: None,
            log_tail: log_tail_since(&log_path, start),
        }));
    });
    Some(Supervisor {
        pid,
        exit: rx,
        kill: Arc::new(Notify::new()),
        adopted: true,
    })
}

fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn proc_starttime(pid: u32) -> Option<String> {
    // Field 22 of stat; `rest` starts at field 3.
    proc_stat(pid)?.get(19).cloned()
}

fn is_zombie(pid: u32) -> bool {
    proc_stat(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|s| s == "Z")
}
