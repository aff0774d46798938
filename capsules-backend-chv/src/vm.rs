//! One running Cloud Hypervisor process and its VM: the [`VmHandle`] implementation.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capsules_microvm::vmm::{Stream, VmExit, VmHandle, VmInfo, VmRunState, VmmError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::api::{ApiClient, ApiError};
use crate::process::{StatePaths, Supervisor, exited_error};

/// The vsock port the guest agent listens on (`capsules.channel=vsock:1024`).
pub(crate) const AGENT_VSOCK_PORT: u32 = 1024;

/// How long a failed call waits for the process's exit to be reported, so that a VMM that died
/// mid-call is reported as such rather than as a broken connection.
const EXIT_SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(crate) struct ChvVm {
    pub id: String,
    pub client: ApiClient,
    pub sup: Supervisor,
    pub paths: StatePaths,
    pub snapshot_timeout: Duration,
    pub agent_timeout: Duration,
}

impl ChvVm {
    /// Runs one API call, racing it against the process's exit.
    pub(crate) async fn guarded<T>(
        &self,
        op: &str,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, VmmError> {
        if let Some(exit) = self.sup.exit_now() {
            return Err(exited_error(&format!("before it was asked to {op}"), &exit));
        }
        let result = tokio::select! {
            r = call => r,
            exit = self.sup.exited() => return Err(exited_error(&format!("while trying to {op}"), &exit)),
        };
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                let transport = !matches!(e, ApiError::Status { .. });
                if transport && let Ok(exit) = tokio::time::timeout(EXIT_SETTLE, self.sup.exited()).await {
                    return Err(exited_error(&format!("while trying to {op}"), &exit));
                }
                Err(VmmError::Control {
                    message: format!("Cloud Hypervisor could not {op} for capsule {}", self.id),
                    source: Some(Box::new(e)),
                })
            }
        }
    }

    /// Kills the process and removes its sockets (after a failed create or restore).
    pub(crate) async fn kill_and_clean(&self) {
        self.sup.kill();
        self.sup.exited().await;
        self.paths.remove_runtime_files();
    }
}

fn run_state(s: &str) -> Option<VmRunState> {
    Some(match s {
        "Created" => VmRunState::Created,
        "Running" => VmRunState::Running,
        // A guest stopped at a debugger breakpoint is not running either.
        "Paused" | "BreakPoint" => VmRunState::Paused,
        "Shutdown" => VmRunState::Shutdown,
        _ => return None,
    })
}

#[async_trait]
impl VmHandle for ChvVm {
    fn pid(&self) -> u32 {
        self.sup.pid()
    }

    async fn info(&self) -> Result<VmInfo, VmmError> {
        let info = self.guarded("read the VM info", self.client.info()).await?;
        let state = run_state(&info.state).ok_or_else(|| VmmError::Control {
            message: format!("Cloud Hypervisor reported an unknown VM state {:?}", info.state),
            source: None,
        })?;
        Ok(VmInfo {
            pid: self.sup.pid(),
            state,
        })
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.guarded("pause the VM", self.client.pause()).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.guarded("resume the VM", self.client.resume()).await
    }

    async fn snapshot(&self, dir: &Path) -> Result<(), VmmError> {
        if !dir.is_absolute() {
            return Err(VmmError::Control {
                message: format!("the snapshot directory {} must be an absolute path", dir.display()),
                source: None,
            });
        }
        let url = format!("file://{}", dir.display());
        self.guarded("snapshot the VM", self.client.snapshot(&url, self.snapshot_timeout))
            .await?;
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || fsync_tree(&dir))
            .await
            .map_err(|e| VmmError::io("fsync the snapshot", std::io::Error::other(e)))?
    }

    async fn agent_stream(&self) -> Result<Box<dyn Stream>, VmmError> {
        let path = &self.paths.vsock_socket;
        let connect = async {
            let mut s = UnixStream::connect(path)
                .await
                .map_err(|e| VmmError::io(format!("connect to the agent's vsock socket {}", path.display()), e))?;
            s.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
                .await
                .map_err(|e| VmmError::io("send CONNECT on the vsock socket", e))?;
            // Read the reply a byte at a time: what follows the newline belongs to the agent.
            let mut line = Vec::with_capacity(16);
            loop {
                let b = s
                    .read_u8()
                    .await
                    .map_err(|e| VmmError::io("read the vsock CONNECT reply (is the guest agent listening?)", e))?;
                if b == b'\n' {
                    break;
                }
                line.push(b);
                if line.len() > 64 {
                    break;
                }
            }
            if !line.starts_with(b"OK ") {
                return Err(VmmError::Control {
                    message: format!(
                        "the vsock proxy refused CONNECT {AGENT_VSOCK_PORT}: {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                    source: None,
                });
            }
            Ok(Box::new(s) as Box<dyn Stream>)
        };
        match tokio::time::timeout(self.agent_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(VmmError::Timeout(
                "connecting to the guest agent over vsock",
                self.agent_timeout,
            )),
        }
    }

    async fn stop(&self, grace: Duration) -> Result<(), VmmError> {
        if self.sup.exit_now().is_none() {
            let start = Instant::now();
            let left = || grace.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
            let graceful = async {
                // Each step may fail (a VM that was never booted cannot be shut down); the
                // process exit is what counts.
                let _ = self.client.shutdown(left()).await;
                let _ = self.client.delete(left()).await;
                let _ = self.client.vmm_shutdown(left()).await;
                self.sup.exited().await
            };
            if tokio::time::timeout(grace, graceful).await.is_err() {
                tracing::debug!(capsule = %self.id, "cloud-hypervisor did not exit within {grace:?}; killing it");
                self.sup.kill();
            }
            if tokio::time::timeout(Duration::from_secs(10), self.sup.exited())
                .await
                .is_err()
            {
                return Err(VmmError::Timeout(
                    "waiting for a killed cloud-hypervisor to exit",
                    Duration::from_secs(10),
                ));
            }
        }
        self.paths.remove_runtime_files();
        Ok(())
    }

    async fn exited(&self) -> VmExit {
        self.sup.exited().await
    }
}

/// fsyncs every file under `dir`, then `dir` itself.
fn fsync_tree(dir: &Path) -> Result<(), VmmError> {
    let io = |what: &str, p: &Path, e| VmmError::io(format!("{what} {}", p.display()), e);
    for entry in std::fs::read_dir(dir).map_err(|e| io("read the snapshot directory", dir, e))? {
        let entry = entry.map_err(|e| io("read the snapshot directory", dir, e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| io("stat", &p, e))?;
        if ft.is_dir() {
            fsync_tree(&p)?;
        } else if ft.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync", &p, e))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map() {
        assert_eq!(run_state("Running"), Some(VmRunState::Running));
        assert_eq!(run_state("BreakPoint"), Some(VmRunState::Paused));
        assert_eq!(run_state("nonsense"), None);
    }
}
