//! Fault injection and the call log.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use capsules_core::types::CapsuleId;
use capsules_core::{Error, ErrorKind, Result};
use tokio::sync::watch;

/// One operation of the [`Backend`](capsules_core::Backend) trait, for faults and the call log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Op {
    Create,
    Sleep,
    Wake,
    Restart,
    Terminate,
    State,
    List,
    Exec,
    Spawn,
    Processes,
    Attach,
    Signal,
    Pty,
    ReadFile,
    WriteFile,
    Stat,
    ListDir,
    Mkdir,
    Remove,
    Rename,
    UploadTar,
    DownloadTar,
    Connect,
    ApplyNetwork,
    Logs,
}

/// A call the mock received (recorded before faults apply, so failed calls are listed too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub capsule: Option<CapsuleId>,
    /// What the call was about: the argv joined by spaces, a path, a port, a policy.
    pub detail: String,
}

#[derive(Debug, Clone)]
pub(crate) enum Fault {
    Fail(ErrorKind, String),
    Hang,
    Delay(Duration),
}

#[derive(Debug)]
pub(crate) struct Faults {
    queue: Mutex<HashMap<Op, VecDeque<(Fault, usize)>>>,
    calls: Mutex<Vec<Call>>,
    release: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            queue: Mutex::default(),
            calls: Mutex::default(),
            release: watch::channel(0).0,
        }
    }
}

impl Faults {
    pub(crate) fn push(&self, op: Op, n: usize, f: Fault) {
        if n > 0 {
            self.queue.lock().unwrap().entry(op).or_default().push_back((f, n));
        }
    }

    pub(crate) fn clear(&self) {
        self.queue.lock().unwrap().clear();
    }

    pub(crate) fn release(&self) {
        self.release.send_modify(|v| *v += 1);
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Records the call, then applies the next fault queued for `op`, if any.
    pub(crate) async fn enter(&self, op: Op, capsule: Option<&CapsuleId>, detail: String) -> Result<()> {
        self.calls.lock().unwrap().push(Call {
            op,
            capsule: capsule.cloned(),
            detail,
        });
        let fault = {
            let mut q = self.queue.lock().unwrap();
            let Some(list) = q.get_mut(&op) else { return Ok(()) };
            let Some((f, left)) = list.front_mut() else {
                return Ok(());
            };
            let f = f.clone();
            *left -= 1;
            if *left == 0 {
                list.pop_front();
            }
            f
        };
        match fault {
            Fault::Fail(kind, msg) => Err(Error::new(kind, msg)),
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Fault::Hang => {
                let mut rx = self.release.subscribe();
                rx.borrow_and_update();
                // Never returns unless released: the caller's deadline must end the call.
                let _ = rx.changed().await;
                Ok(())
            }
        }
    }
}
