//! Sleep and wake, in exactly the order of the [`super`] module docs: quiesce → pause → snapshot
//! into `snapshot.tmp/` → fsync → rename + completion marker → record `sleeping` → stop; and
//! capacity → restore (paused) → mark consumed → resume → new session → clock.

use std::sync::Arc;

use capsules_core::types::CapsuleId;
use capsules_core::{Error, ErrorKind, Result};

use super::record::{self, CapsulePaths, RecordState};
use super::session::CutReason;
use super::{Capsule, Inner, Phase, io_err, lifecycle::now_ms, vmm_err};
use crate::vmm::{VmHandle, VmRunState, Vmm};

impl<V: Vmm> Inner<V> {
    // ---------------------------------------------------------------- sleep

    pub(crate) async fn sleep(self: &Arc<Self>, id: &CapsuleId) -> Result<()> {
        let cap = self
            .capsule(id)
            .ok_or_else(|| Error::not_found(format!("capsule {id} does not exist on this backend")))?;
        let _op = cap.op.lock().await;
        let (vm, session) = {
            let mut live = cap.live();
            match &live.phase {
                Phase::Sleeping => return Ok(()),
                Phase::Running => {}
                Phase::Failed(why) => {
                    return Err(Error::conflict(format!(
                        "the capsule has failed ({why}); restart it instead of sleeping"
                    )));
                }
                Phase::Terminating => return Err(Error::conflict("the capsule was terminated")),
                other => return Err(Error::unavailable(format!("the capsule is busy ({other:?}); retry"))),
            }
            self.check_snapshot_disk(live.record.size.memory_mib())?;
            let Some(vm) = live.vm.clone() else {
                return Err(Error::internal("the capsule runs without a VM handle"));
            };
            live.phase = Phase::Suspending;
            (vm, live.session.take())
        };

        // 1. quiesce, then cut the session: calls in flight end with "went to sleep".
        if let Some(s) = &session {
            if let Err(e) = s.call("quiesce", s.agent().quiesce()).await {
                tracing::warn!(capsule = %id, error = %e, "quiesce failed; snapshotting anyway");
            }
            s.cut(CutReason::Sleep);
        }

        match self.snapshot_steps(&cap, &vm).await {
            Ok(()) => {}
            Err(e) => return Err(self.after_failed_snapshot(&cap, &vm, e).await),
        }

        // 5. record sleeping (durably), unless the VMM died meanwhile.
        let recorded: std::result::Result<(), Option<Error>> = {
            let mut live = cap.live();
            if let Phase::Failed(why) = &live.phase {
                Err(Some(Error::conflict(format!(
                    "the VMM stopped while the capsule went to sleep ({why}); the capsule is failed"
                ))))
            } else if live.phase == Phase::Terminating {
                Err(None)
            } else {
                if let Some(t) = live.supervisor.take() {
                    t.cancel();
                }
                match self.save(&cap, &mut live, |r| r.state = RecordState::Sleeping) {
                    Ok(()) => {
                        live.phase = Phase::Sleeping;
                        live.vm = None;
                        self.release_live(&mut live);
                        Ok(())
                    }
                    Err(e) => {
                        // Keep watching the VM while we try to get it running again.
                        live.supervisor = Some(self.supervise(&cap, &vm));
                        Err(Some(e))
                    }
                }
            }
        };
        match recorded {
            Ok(()) => {}
            Err(None) => return Err(Error::conflict("the capsule was terminated")),
            Err(Some(e)) if e.kind() == ErrorKind::Conflict => {
                self.discard_snapshot(&cap.paths);
                return Err(e);
            }
            Err(Some(e)) => return Err(self.after_failed_snapshot(&cap, &vm, e).await),
        }

        // 6. stop the VMM process: guest RAM is released.
        if let Err(e) = self.stop_vm(&vm).await {
            tracing::warn!(capsule = %id, error = %e, "stopping the VMM after its snapshot failed");
        }
        Ok(())
    }

    /// Steps 2–4: pause, snapshot into `snapshot.tmp/`, fsync, rename, completion marker.
    async fn snapshot_steps(&self, cap: &Capsule, vm: &Arc<dyn VmHandle>) -> Result<()> {
        let paths = &cap.paths;
        self.vm_op("pausing the VM", self.timeouts.call, vm.pause())
            .await
            .map_err(|e| vmm_err("pausing the VM", e))?;
        let tmp = paths.snapshot_tmp();
        record::remove_tree(&tmp).map_err(|e| io_err("could not clear an old partial snapshot", e))?;
        record::remove_tree(&paths.snapshot_consumed())
            .map_err(|e| io_err("could not remove a consumed snapshot", e))?;
        std::fs::create_dir(&tmp).map_err(|e| io_err("could not create the snapshot directory", e))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .map_err(|e| io_err("could not give the snapshot directory to the VMM user", e))?;
        }
        match tokio::time::timeout(self.timeouts.snapshot, vm.snapshot(&tmp)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(vmm_err("writing the memory snapshot", e)),
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "writing the memory snapshot took longer than {} s",
                    self.timeouts.snapshot.as_secs()
                )));
            }
        }
        let (tmp2, snap, marker, dir) = (tmp.clone(), paths.snapshot(), paths.marker(), paths.dir.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            record::fsync_tree(&tmp2)?;
            record::remove_tree(&snap)?;
            std::fs::rename(&tmp2, &snap)?;
            record::fsync_dir(&dir)?;
            record::write_durable(&marker, format!("complete {}\n", now_ms()).as_bytes())
        })
        .await
        .map_err(|e| Error::internal("the snapshot fsync task failed").with_source(e))?
        .map_err(|e| io_err("could not make the memory snapshot durable", e))
    }

    /// After a failed snapshot: the capsule keeps running if its VMM survived (resumed, new
    /// session), else it is failed. It is never left asleep on a partial snapshot.
    async fn after_failed_snapshot(self: &Arc<Self>, cap: &Arc<Capsule>, vm: &Arc<dyn VmHandle>, e: Error) -> Error {
        self.discard_snapshot(&cap.paths);
        if let Phase::Failed(why) = &cap.live().phase {
            return Error::conflict(format!(
                "the VMM stopped while writing the memory snapshot ({why}); the capsule is failed and restart boots it from its disk"
            ))
            .with_source(e);
        }
        let alive = matches!(self.vm_op("asking the VMM for its state", self.timeouts.call, vm.info()).await, Ok(i) if i.state != VmRunState::Shutdown);
        let resumed = alive
            && self
                .vm_op("resuming the VM", self.timeouts.call, vm.resume())
                .await
                .is_ok();
        if resumed {
            let epoch = {
                let mut live = cap.live();
                let epoch = live.record.epoch + 1;
                if let Err(se) = self.save(cap, &mut live, |r| r.epoch = epoch) {
                    tracing::error!(capsule = %cap.id, error = %se, "could not record the session epoch");
                }
                epoch
            };
            match self.open_session(cap, vm, epoch, self.timeouts.boot).await {
                Ok(s) => {
                    let mut live = cap.live();
                    if live.phase == Phase::Suspending {
                        live.session = Some(s);
                        live.phase = Phase::Running;
                        return Error::internal("the memory snapshot failed; the capsule keeps running").with_source(e);
                    }
                    s.cut(CutReason::Terminated);
                }
                Err(se) => tracing::warn!(capsule = %cap.id, error = %se, "no agent session after a failed snapshot"),
            }
        }
        let _ = self.stop_vm(vm).await;
        let why = "the memory snapshot failed and the VM could not continue";
        self.mark_failed(cap, None, why);
        Error::internal(format!(
            "{why}; the capsule is failed and restart boots it from its disk"
        ))
        .with_source(e)
    }

    /// Removes every snapshot file and the marker (marker first, durably).
    pub(crate) fn discard_snapshot(&self, paths: &CapsulePaths) {
        if let Err(e) = record::remove_durable(&paths.marker()) {
            tracing::error!(dir = %paths.dir.display(), error = %e, "could not remove a snapshot marker");
        }
        for p in [paths.snapshot_tmp(), paths.snapshot(), paths.snapshot_consumed()] {
            let _ = record::remove_tree(&p);
        }
    }

    // ---------------------------------------------------------------- wake

    pub(crate) async fn wake(self: &Arc<Self>, id: &CapsuleId) -> Result<()> {
        let cap = self
            .capsule(id)
            .ok_or_else(|| Error::not_found(format!("capsule {id} does not exist on this backend")))?;
        let _op = cap.op.lock().await;
        let config = {
            let mut live = cap.live();
            match &live.phase {
                Phase::Running => return Ok(()),
                Phase::Sleeping => {}
                Phase::Failed(why) => {
                    return Err(Error::conflict(format!(
                        "the capsule has failed ({why}); restart boots it from its disk"
                    )));
                }
                Phase::Terminating => return Err(Error::conflict("the capsule was terminated")),
                other => return Err(Error::unavailable(format!("the capsule is busy ({other:?}); retry"))),
            }
            if live.record.state != RecordState::Sleeping || !cap.paths.has_valid_snapshot() {
                drop(live);
                let why = "its memory snapshot is missing or incomplete";
                self.mark_failed_from_sleep(&cap, why);
                return Err(Error::conflict(format!(
                    "the capsule cannot wake: {why}; restart boots it from its disk"
                )));
            }
            // 1. capacity.
            let (v, m) = (live.record.size.vcpus(), live.record.size.memory_mib());
            self.check_snapshot_disk(m)?;
            self.reserve(v, m, false)?;
            live.holds_capacity = true;
            live.phase = Phase::Waking;
            self.vm_config(&cap.paths, &live.record)
        };

        // 2. a new VMM process restores the snapshot, paused.
        let vm: Arc<dyn VmHandle> = match self
            .vm_op(
                "restoring the VM",
                self.timeouts.snapshot,
                self.vmm.restore(&config, &cap.paths.snapshot()),
            )
            .await
        {
            Ok(vm) => vm.into(),
            Err(e) => {
                let mut live = cap.live();
                self.release_live(&mut live);
                if live.phase == Phase::Waking {
                    live.phase = Phase::Sleeping;
                }
                drop(live);
                let e = vmm_err("restoring the memory snapshot", e);
                return Err(self.boot_error(&cap, "waking (the snapshot is kept; retry, or restart to boot cold)", e));
            }
        };

        // 3. mark the snapshot consumed, durably, before the guest runs again.
        let epoch = {
            let mut live = cap.live();
            let consumed = record::remove_durable(&cap.paths.marker())
                .map_err(|e| io_err("could not mark the snapshot consumed", e))
                .and_then(|()| {
                    let epoch = live.record.epoch + 1;
                    self.save(&cap, &mut live, |r| {
                        r.state = RecordState::Running;
                        r.epoch = epoch;
                    })
                    .map(|()| epoch)
                });
            match consumed {
                Ok(epoch) => {
                    if let Some(t) = live.supervisor.take() {
                        t.cancel();
                    }
                    live.supervisor = Some(self.supervise(&cap, &vm));
                    live.vm = Some(vm.clone());
                    Ok(epoch)
                }
                Err(e) => Err(e),
            }
        };
        let epoch = match epoch {
            Ok(epoch) => epoch,
            Err(e) => {
                let _ = self.stop_vm(&vm).await;
                self.mark_failed_from_sleep(&cap, "its snapshot could not be marked consumed");
                return Err(e);
            }
        };
        {
            let (snap, consumed) = (cap.paths.snapshot(), cap.paths.snapshot_consumed());
            let dir = cap.paths.dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if std::fs::rename(&snap, &consumed).is_ok() {
                    let _ = record::fsync_dir(&dir);
                    // The VMM may still map the files (on-demand restore); unlinking is safe.
                    let _ = record::remove_tree(&consumed);
                }
            })
            .await;
        }

        // 4. resume; 5. a new session (epoch + 1) and the host's wall clock.
        let woke = async {
            self.vm_op("resuming the VM", self.timeouts.call, vm.resume())
                .await
                .map_err(|e| vmm_err("resuming the VM", e))?;
            self.open_session(&cap, &vm, epoch, self.timeouts.boot).await
        }
        .await;
        match woke {
            Ok(session) => {
                let mut live = cap.live();
                if live.phase != Phase::Waking {
                    // Failed (VMM died) or terminated meanwhile.
                    let reason = match &live.phase {
                        Phase::Failed(why) => CutReason::Failed(why.clone()),
                        _ => CutReason::Terminated,
                    };
                    let err = reason.error();
                    drop(live);
                    session.cut(reason);
                    return Err(err);
                }
                live.session = Some(session);
                live.phase = Phase::Running;
                Ok(())
            }
            Err(e) => {
                let _ = self.stop_vm(&vm).await;
                self.mark_failed(&cap, None, "the VM did not come back after waking");
                Err(Error::new(
                    e.kind(),
                    "the capsule did not come back after waking; it is failed and restart boots it from its disk",
                )
                .with_source(e))
            }
        }
    }

    fn mark_failed_from_sleep(&self, cap: &Capsule, why: &str) {
        let mut live = cap.live();
        if live.phase == Phase::Terminating {
            return;
        }
        live.phase = Phase::Failed(why.to_owned());
        self.release_live(&mut live);
        let why = why.to_owned();
        if let Err(e) = self.save(cap, &mut live, |r| {
            r.state = RecordState::Failed;
            r.failed_reason = Some(why);
        }) {
            tracing::error!(capsule = %cap.id, error = %e, "could not record the failure");
        }
    }
}
