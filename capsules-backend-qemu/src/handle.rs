//! [`QemuHandle`]: one running QEMU process, controlled over QMP.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capsules_microvm::vmm::{Stream, VmExit, VmHandle, VmInfo, VmRunState, VmmError};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::{AGENT_SOCK, QEMU_LOG, SNAPSHOT_FILE, SNAPSHOT_META};
use crate::error::{MigrationFailed, QmpError, control, process, qmp};
use crate::process::{log_tail, pidfd_kill};
use crate::qmp::Qmp;

/// Migration bandwidth for snapshots: QEMU's default (128 MiB/s) would make a 1 GiB snapshot take
/// seconds; this is effectively unlimited for a local file.
const SNAPSHOT_BANDWIDTH: u64 = 64 << 30;

/// The fd name under which the snapshot file is passed with `getfd`.
const SNAPSHOT_FD_NAME: &str = "capsules-snapshot";

/// A QEMU process (started, restored or adopted).
#[derive(Debug)]
pub struct QemuHandle {
    pub(crate) id: String,
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) state_dir: PathBuf,
    pub(crate) qmp: Qmp,
    pub(crate) exit: watch::Receiver<Option<VmExit>>,
    pub(crate) supervisor: JoinHandle<()>,
    pub(crate) command_timeout: Duration,
    pub(crate) snapshot_timeout: Duration,
    /// Facts written next to a snapshot.
    pub(crate) meta: Value,
    /// Serializes multi-step operations (snapshot, stop).
    pub(crate) op: tokio::sync::Mutex<()>,
}

impl Drop for QemuHandle {
    fn drop(&mut self) {
        // The process keeps running (it can be adopted); only our supervision ends.
        self.supervisor.abort();
    }
}

/// Maps QEMU's `query-status` status to the contract's run state.
pub(crate) fn run_state(status: &str) -> VmRunState {
    match status {
        "running" => VmRunState::Running,
        "prelaunch" | "inmigrate" => VmRunState::Created,
        "shutdown" | "guest-panicked" | "internal-error" => VmRunState::Shutdown,
        // paused, postmigrate, finish-migrate, suspended, save-vm, restore-vm, debug, io-error,
        // watchdog, colo: the vCPUs do not run.
        _ => VmRunState::Paused,
    }
}

impl QemuHandle {
    pub(crate) fn exited_now(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Waits for the exit for at most `d`.
    async fn wait_exit(&self, d: Duration) -> Option<VmExit> {
        let mut rx = self.exit.clone();
        tokio::time::timeout(d, async {
            match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => None,
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// A failed QMP command: when QEMU died meanwhile, say so with its log, else keep QEMU's error.
    async fn fail(&self, what: &str, cmd: &str, e: QmpError) -> VmmError {
        if matches!(e, QmpError::Closed | QmpError::Io(_))
            && let Some(exit) = self.wait_exit(Duration::from_secs(2)).await
        {
            return exited_error(&format!("QEMU exited during {what}"), &exit);
        }
        qmp(cmd, e)
    }

    async fn cmd(&self, what: &str, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        if let Some(exit) = self.exited_now() {
            return Err(exited_error(&format!("QEMU is not running ({what})"), &exit));
        }
        match self.qmp.execute(cmd, args).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.fail(what, cmd, e).await),
        }
    }

    pub(crate) async fn status(&self, what: &str) -> Result<String, VmmError> {
        let v = self.cmd(what, "query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                control(
                    "QMP `query-status` answered without a status",
                    QmpError::Protocol(v.to_string()),
                )
            })
    }

    /// Polls `query-status` until it leaves `inmigrate` (restore); fails if QEMU exits.
    pub(crate) async fn wait_incoming(&self, deadline: Duration) -> Result<(), VmmError> {
        let started = Instant::now();
        loop {
            let status = self.status("restore").await?;
            match status.as_str() {
                "inmigrate" | "prelaunch" => {}
                "paused" | "postmigrate" => return Ok(()),
                other => {
                    return Err(control(
                        format!("restoring the snapshot left QEMU in state {other}, not paused"),
                        QmpError::Protocol(format!("status {other}")),
                    ));
                }
            }
            if started.elapsed() > deadline {
                return Err(VmmError::Timeout("loading the QEMU snapshot", deadline));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                Some(exit) = self.wait_exit(Duration::from_millis(20)) => {
                    return Err(exited_error("QEMU exited while loading the snapshot", &exit));
                }
            }
        }
    }

    /// Whether a client is connected to the agent chardev (`None` when there is no such chardev).
    async fn agent_chardev_connected(&self) -> Result<Option<bool>, VmmError> {
        let v = self.cmd("agent channel", "query-chardev", None).await?;
        let agent = v.as_array().and_then(|a| {
            a.iter()
                .find(|c| c.get("label").and_then(Value::as_str) == Some("agent"))
        });
        Ok(agent.map(|c| {
            !c.get("filename")
                .and_then(Value::as_str)
                .unwrap_or("")
                .starts_with("disconnected:")
        }))
    }

    async fn snapshot_inner(&self, dir: &Path) -> Result<u64, VmmError> {
        if self.status("snapshot").await? == "running" {
            self.cmd("pause before snapshot", "stop", None).await?;
        }
        self.cmd(
            "snapshot",
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": SNAPSHOT_BANDWIDTH })),
        )
        .await?;
        let path = dir.join(SNAPSHOT_FILE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| VmmError::io(format!("create the snapshot file {}", path.display()), e))?;
        if let Err(e) = self.qmp.getfd(SNAPSHOT_FD_NAME, file.as_raw_fd()).await {
            return Err(self.fail("snapshot", "getfd", e).await);
        }
        self.cmd(
            "snapshot",
            "migrate",
            Some(json!({ "uri": format!("fd:{SNAPSHOT_FD_NAME}") })),
        )
        .await?;
        let started = Instant::now();
        loop {
            let v = self.cmd("snapshot", "query-migrate", None).await?;
            let status = v.get("status").and_then(Value::as_str).unwrap_or("");
            match status {
                "completed" => break,
                "failed" | "cancelled" => {
                    let desc = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no error description")
                        .to_owned();
                    return Err(control(
                        "QEMU could not write the memory snapshot",
                        MigrationFailed {
                            status: status.to_owned(),
                            desc,
                        },
                    ));
                }
                _ => {}
            }
            if started.elapsed() > self.snapshot_timeout {
                let _ = self.qmp.execute("migrate_cancel", None).await;
                return Err(VmmError::Timeout(
                    "writing the QEMU memory snapshot",
                    self.snapshot_timeout,
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        file.sync_all()
            .map_err(|e| VmmError::io(format!("fsync {}", path.display()), e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(file);
        let mut meta = self.meta.clone();
        meta["memory_file_bytes"] = json!(size);
        let meta_path = dir.join(SNAPSHOT_META);
        write_synced(
            &meta_path,
            serde_json::to_vec_pretty(&meta).unwrap_or_default().as_slice(),
        )?;
        sync_dir(dir)?;
        Ok(size)
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), VmmError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| VmmError::io(format!("create {}", path.display()), e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| VmmError::io(format!("write {}", path.display()), e))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), VmmError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VmmError::io(format!("fsync the directory {}", dir.display()), e))
}

pub(crate) fn exited_error(message: &str, exit: &VmExit) -> VmmError {
    let how = match (exit.code, exit.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "exit status unknown".into(),
    };
    let log = if exit.log_tail.is_empty() {
        "(QEMU's log is empty)".to_owned()
    } else {
        exit.log_tail.clone()
    };
    VmmError::Process {
        message: format!("{message} ({how}); QEMU's log ends with:\n{log}"),
        source: None,
    }
}

#[async_trait]
impl VmHandle for QemuHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn info(&self) -> Result<VmInfo, VmmError> {
        if self.exited_now().is_some() {
            return Ok(VmInfo {
                pid: self.pid,
                state: VmRunState::Shutdown,
            });
        }
        let status = match self.qmp.execute("query-status", None).await {
            Ok(v) => v.get("status").and_then(Value::as_str).unwrap_or("").to_owned(),
            Err(e) => {
                if self.wait_exit(Duration::from_secs(1)).await.is_some() {
                    return Ok(VmInfo {
                        pid: self.pid,
                        state: VmRunState::Shutdown,
                    });
                }
                return Err(qmp("query-status", e));
            }
        };
        Ok(VmInfo {
            pid: self.pid,
            state: run_state(&status),
        })
    }

    async fn pause(&self) -> Result<(), VmmError> {
        let _op = self.op.lock().await;
        self.cmd("pause", "stop", None).await.map(drop)
    }

    async fn resume(&self) -> Result<(), VmmError> {
        let _op = self.op.lock().await;
        self.cmd("resume", "cont", None).await.map(drop)
    }

    async fn snapshot(&self, dir: &Path) -> Result<(), VmmError> {
        let _op = self.op.lock().await;
        let started = Instant::now();
        let size = self.snapshot_inner(dir).await?;
        tracing::info!(id = %self.id, pid = self.pid, bytes = size, elapsed = ?started.elapsed(), "QEMU snapshot written");
        Ok(())
    }

    async fn agent_stream(&self) -> Result<Box<dyn Stream>, VmmError> {
        let path = self.state_dir.join(AGENT_SOCK);
        let deadline = Instant::now() + self.command_timeout;
        // QEMU serves one client on the agent socket at a time and leaves a second one unaccepted
        // in the listen backlog: wait until the previous stream is gone, so a "fresh stream" never
        // silently goes nowhere.
        loop {
            match self.agent_chardev_connected().await? {
                Some(false) => break,
                Some(true) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Some(true) => {
                    return Err(process(format!(
                        "the previous agent stream to {} is still open after {:?}; QEMU serves one at a time, so close it first",
                        self.id, self.command_timeout
                    )));
                }
                // No such chardev (not our command line): connect without the check.
                None => break,
            }
        }
        let stream = loop {
            if let Some(exit) = self.exited_now() {
                return Err(exited_error("QEMU is not running (agent channel)", &exit));
            }
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(VmmError::io(format!("connect the agent channel {}", path.display()), e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        // And that QEMU accepted this connection (not another client that raced us).
        while self.agent_chardev_connected().await? == Some(false) {
            if Instant::now() >= deadline {
                return Err(process(format!(
                    "QEMU did not accept the agent stream to {} within {:?}",
                    self.id, self.command_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Box::new(stream))
    }

    async fn stop(&self, grace: Duration) -> Result<(), VmmError> {
        let _op = self.op.lock().await;
        if self.exited_now().is_some() {
            return Ok(());
        }
        // 1. ACPI power button: a running guest that handles it shuts down cleanly. A paused one
        //    (e.g. just snapshotted) cannot react, so waiting for it would only waste the grace.
        let running = matches!(
            self.qmp.execute("query-status", None).await,
            Ok(v) if v.get("status").and_then(Value::as_str) == Some("running")
        );
        if running
            && !grace.is_zero()
            && self.qmp.execute("system_powerdown", None).await.is_ok()
            && self.wait_exit(grace).await.is_some()
        {
            return Ok(());
        }
        // 2. `quit`: QEMU flushes its disks and exits.
        if self.qmp.execute("quit", None).await.is_ok() && self.wait_exit(Duration::from_secs(3)).await.is_some() {
            return Ok(());
        }
        // 3. SIGKILL through the pidfd (never a recycled pid).
        match pidfd_kill(&self.pidfd, libc::SIGKILL) {
            Ok(_) => {}
            Err(e) => return Err(VmmError::io(format!("kill QEMU (pid {})", self.pid), e)),
        }
        if self.wait_exit(Duration::from_secs(10)).await.is_some() {
            Ok(())
        } else {
            Err(VmmError::Process {
                message: format!(
                    "QEMU (pid {}) did not exit after SIGKILL; its log ends with:\n{}",
                    self.pid,
                    log_tail(&self.state_dir.join(QEMU_LOG))
                ),
                source: None,
            })
        }
    }

    async fn exited(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("checked by wait_for"),
            // The supervisor is gone without a result (runtime shutting down).
            Err(_) => VmExit {
                code: None,
                signal: None,
                log_tail: log_tail(&self.state_dir.join(QEMU_LOG)),
            },
        }
    }
}
