//! Spawning, supervising and signalling the QEMU process.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use capsules_microvm::vmm::{VmExit, VmmError};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::{PIDFILE, QMP_SOCK};
use crate::error::process_src;

/// `pidfd_open(2)`: a descriptor that names this process, never a later one with the same pid.
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`; `Ok(false)` when the process is already gone.
pub(crate) fn pidfd_kill(pidfd: &OwnedFd, signal: i32) -> std::io::Result<bool> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The last lines of QEMU's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What to spawn.
pub(crate) struct SpawnSpec<'a> {
    pub binary: &'a Path,
    pub args: &'a [String],
    /// Descriptors the child inherits under the same numbers.
    pub inherit: Vec<RawFd>,
    pub run_as: Option<(u32, u32)>,
    /// QEMU's stderr (and stdout).
    pub log: File,
}

pub(crate) struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub exit: watch::Receiver<Option<VmExit>>,
    pub supervisor: JoinHandle<()>,
}

/// Spawns QEMU directly as the unprivileged user and starts supervising it.
pub(crate) fn spawn(spec: SpawnSpec<'_>, log_path: PathBuf) -> Result<Spawned, VmmError> {
    let mut cmd = tokio::process::Command::new(spec.binary);
    cmd.args(spec.args)
        .stdin(Stdio::null())
        .stdout(
            spec.log
                .try_clone()
                .map_err(|e| VmmError::io("duplicate the QEMU log descriptor", e))?,
        )
        .stderr(spec.log)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        // Its own process group: a terminal's Ctrl-C to the host process must not kill the VMs,
        // which survive a host restart and are adopted.
        .process_group(0)
        .kill_on_drop(false);
    if let Some((uid, gid)) = spec.run_as {
        // std drops supplementary groups (setgroups(0)) before setuid when it runs as root.
        cmd.uid(uid).gid(gid);
    }
    let inherit = spec.inherit;
    // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| process_src(format!("could not start QEMU ({})", spec.binary.display()), e))?;
    let pid = child.id().expect("a child that was just spawned has a pid");
    // Not reaped yet (only the supervisor below waits), so this names our child.
    let pidfd = pidfd_open(pid).map_err(|e| VmmError::io("pidfd_open on the QEMU process", e))?;
    let (tx, rx) = watch::channel(None);
    let supervisor = tokio::spawn(async move {
        let status = child.wait().await;
        let log_tail = log_tail(&log_path);
        let exit = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                VmExit {
                    code: s.code(),
                    signal: s.signal(),
                    log_tail,
                }
            }
            Err(e) => VmExit {
                code: None,
                signal: None,
                log_tail: format!("{log_tail}\n(waiting for QEMU failed: {e})"),
            },
        };
        tracing::debug!(pid, ?exit.code, ?exit.signal, "QEMU exited");
        let _ = tx.send(Some(exit));
    });
    Ok(Spawned {
        pid,
        pidfd,
        exit: rx,
        supervisor,
    })
}

/// Supervises a QEMU that is not our child (adopted): its pidfd becomes readable when it exits.
/// The exit status of a process that is not our child cannot be read.
pub(crate) fn supervise_foreign(
    pidfd: &OwnedFd,
    log_path: PathBuf,
) -> Result<(watch::Receiver<Option<VmExit>>, JoinHandle<()>), VmmError> {
    let dup = pidfd
        .try_clone()
        .map_err(|e| VmmError::io("duplicate the QEMU pidfd", e))?;
    // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, naming the same pidfd, for
    // as long as the AsyncFd lives.
    let afd = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }
        .map_err(|e| VmmError::io("register the QEMU pidfd", e.into()))?;
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let _ = afd.readable().await;
        let _ = tx.send(Some(VmExit {
            code: None,
            signal: None,
            log_tail: log_tail(&log_path),
        }));
    });
    Ok((rx, task))
}

/// The pid in `<state_dir>/qemu.pid`, if that process is alive and is a QEMU started for this
/// state directory (its command line names our QMP socket).
pub(crate) fn live_qemu(state_dir: &Path) -> Option<(u32, OwnedFd)> {
    let pid: u32 = std::fs::read_to_string(state_dir.join(PIDFILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid == 0 || !is_our_qemu(pid, state_dir) {
        return None;
    }
    let pidfd = pidfd_open(pid).ok()?;
    // Checked again through the pidfd's lifetime: the pid cannot be reused while we hold it.
    if !is_our_qemu(pid, state_dir) {
        return None;
    }
    // A zombie still has a cmdline of zero length, so is_our_qemu already refused it; make sure
    // it has not exited between the checks.
    match pidfd_kill(&pidfd, 0) {
        Ok(true) => Some((pid, pidfd)),
        _ => None,
    }
}

pub(crate) fn is_our_qemu(pid: u32, state_dir: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let Some(argv0) = argv.first() else {
        return false;
    };
    let name = Path::new(std::str::from_utf8(argv0).unwrap_or(""))
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if !name.starts_with("qemu-system") {
        return false;
    }
    let qmp = format!(
        "unix:{},server=on,wait=off",
        state_dir.join(QMP_SOCK).to_string_lossy().replace(',', ",,")
    );
    argv.contains(&qmp.as_bytes())
}
