//! Recovery at backend start: the state directory is the source of truth.

use std::sync::{Arc, Mutex};

use capsules_core::types::CapsuleId;
use capsules_core::{Error, Result};

use super::record::{self, CapsulePaths, RecordState};
use super::{Capsule, Inner, Live, Phase, io_err};
use crate::vmm::{VmHandle, VmRunState, Vmm};

/// What recovery decided for one capsule.
enum Outcome {
    Running(Arc<dyn VmHandle>, Arc<super::session::LiveSession>),
    Sleeping,
    Failed(String),
}

impl<V: Vmm> Inner<V> {
    /// Rebuilds the capsule table from `<state>/capsules/*`: adopt live VMMs (→ running, with a
    /// new agent session), keep valid snapshots of sleeping records (→ sleeping), everything else
    /// failed with its disk kept; finish interrupted terminations; then sweep the network.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<()> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| io_err(format!("could not read the state directory {}", self.root.display()), e))?;
        let mut dirs: Vec<(CapsuleId, CapsulePaths)> = Vec::new();
        for entry in entries.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = CapsuleId::parse(&name) else {
                tracing::warn!(dir = %entry.path().display(), "ignoring a directory that is not a capsule id");
                continue;
            };
            dirs.push((id.clone(), CapsulePaths::new(&self.root, &id)));
        }
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, paths) in dirs {
            self.recover_one(id, paths).await;
        }
        if let Some(net) = &self.net {
            let keep: Vec<CapsuleId> = {
                let caps: Vec<_> = self
                    .capsules
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                caps.iter()
                    .filter(|c| matches!(c.live().phase, Phase::Running | Phase::Sleeping))
                    .map(|c| c.id.clone())
                    .collect()
            };
            net.sweep(&keep)
                .await
                .map_err(|e| Error::new(e.kind(), "could not sweep leftover network objects").with_source(e))?;
        }
        Ok(())
    }

    async fn recover_one(self: &Arc<Self>, id: CapsuleId, paths: CapsulePaths) {
        let rec = match record::read_record(&paths.record()) {
            Ok(r) if r.id == id => r,
            Ok(_) => {
                self.broken_capsule(&id, "its record names another capsule id");
                return;
            }
            Err(e) => {
                self.broken_capsule(&id, &format!("its record could not be read: {e}"));
                return;
            }
        };
        let config = self.vm_config(&paths, &rec);
        let adopted = match self
            .vm_op("adopting the VMM", self.timeouts.call, self.vmm.adopt(&config))
            .await
        {
            Ok(vm) => vm.map(Arc::<dyn VmHandle>::from),
            Err(e) => {
                tracing::warn!(capsule = %id, error = %e, "could not adopt the VMM; treating it as gone");
                None
            }
        };
        let cap = Arc::new(Capsule {
            id: id.clone(),
            paths: paths.clone(),
            op: tokio::sync::Mutex::new(()),
            live: Mutex::new(Live {
                record: rec.clone(),
                phase: Phase::Creating,
                vm: None,
                session: None,
                supervisor: None,
                holds_capacity: false,
            }),
        });

        if rec.state == RecordState::Terminating {
            self.capsules
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), cap.clone());
            if let Some(vm) = adopted {
                let _ = self.stop_vm(&vm).await;
            }
            self.destroy(&cap).await;
            return;
        }

        let valid_snapshot = paths.has_valid_snapshot();
        let outcome = match (rec.state.clone(), adopted) {
            // Asleep with a whole snapshot: a VMM still alive is the one that wrote it (the host
            // process died before stopping it); stop it.
            (RecordState::Sleeping, Some(vm)) if valid_snapshot => {
                let _ = self.stop_vm(&vm).await;
                Outcome::Sleeping
            }
            (RecordState::Sleeping, None) if valid_snapshot => Outcome::Sleeping,
            (RecordState::Sleeping, None) => Outcome::Failed("its memory snapshot is missing or incomplete".into()),
            (RecordState::Failed, vm) => {
                if let Some(vm) = vm {
                    let _ = self.stop_vm(&vm).await;
                }
                Outcome::Failed(rec.failed_reason.clone().unwrap_or_else(|| "the VM was lost".into()))
            }
            // A live VMM whose snapshot is not (or no longer) valid runs the current disk: adopt it.
            (_, Some(vm)) => self.adopt_running(&cap, vm).await,
            (_, None) => Outcome::Failed("the VM stopped while the host process was not running".into()),
        };

        {
            let mut live = cap.live();
            match outcome {
                Outcome::Running(vm, session) => {
                    if let Err(e) = self.save(&cap, &mut live, |r| r.state = RecordState::Running) {
                        tracing::error!(capsule = %id, error = %e, "could not record the adopted capsule");
                    }
                    // Adopted VMs already run: count them even past capacity.
                    let _ = self.reserve(rec.size.vcpus(), rec.size.memory_mib(), true);
                    live.holds_capacity = true;
                    live.supervisor = Some(self.supervise(&cap, &vm));
                    live.vm = Some(vm);
                    live.session = Some(session);
                    live.phase = Phase::Running;
                }
                Outcome::Sleeping => live.phase = Phase::Sleeping,
                Outcome::Failed(why) => {
                    // A snapshot is never valid for a failed capsule.
                    let _ = record::remove_durable(&paths.marker());
                    let w = why.clone();
                    if let Err(e) = self.save(&cap, &mut live, |r| {
                        r.state = RecordState::Failed;
                        r.failed_reason = Some(w);
                    }) {
                        tracing::error!(capsule = %id, error = %e, "could not record the failure");
                    }
                    live.phase = Phase::Failed(why);
                }
            }
        }
        // A failed capsule's network is removed (the sweep would); restart sets it up again.
        let failed_att = {
            let live = cap.live();
            match live.phase {
                Phase::Failed(_) => live.record.net.clone(),
                _ => None,
            }
        };
        if let (Some(net), Some(att)) = (&self.net, failed_att) {
            if let Err(e) = net.teardown(&id, &att).await {
                tracing::warn!(capsule = %id, error = %e, "could not tear down a failed capsule's network");
            }
            let mut live = cap.live();
            let _ = self.save(&cap, &mut live, |r| r.net = None);
        } else if let Some(net) = &self.net {
            let (att, policy) = {
                let live = cap.live();
                (live.record.net.clone(), live.record.network.clone())
            };
            if let Some(att) = att
                && let Err(e) = net.adopt(&id, &att, &policy).await
            {
                tracing::warn!(capsule = %id, error = %e, "could not re-activate the capsule's network");
            }
        }
        self.capsules.lock().unwrap_or_else(|e| e.into_inner()).insert(id, cap);
    }

    /// A live VMM of a running (or interrupted) capsule: resume it if a snapshot left it paused,
    /// drop any snapshot files, open a new agent session.
    async fn adopt_running(self: &Arc<Self>, cap: &Arc<Capsule>, vm: Arc<dyn VmHandle>) -> Outcome {
        // Whatever snapshot is on disk, the VM now runs on: it is not restorable any more.
        let _ = record::remove_durable(&cap.paths.marker());
        for p in [
            cap.paths.snapshot_tmp(),
            cap.paths.snapshot(),
            cap.paths.snapshot_consumed(),
        ] {
            let _ = record::remove_tree(&p);
        }
        if let Ok(info) = self
            .vm_op("asking the VMM for its state", self.timeouts.call, vm.info())
            .await
            && info.state == VmRunState::Paused
            && let Err(e) = self.vm_op("resuming the VM", self.timeouts.call, vm.resume()).await
        {
            let _ = self.stop_vm(&vm).await;
            return Outcome::Failed(format!("the adopted VM could not be resumed: {e}"));
        }
        let epoch = {
            let mut live = cap.live();
            let epoch = live.record.epoch + 1;
            if let Err(e) = self.save(cap, &mut live, |r| r.epoch = epoch) {
                tracing::error!(capsule = %cap.id, error = %e, "could not record the session epoch");
            }
            epoch
        };
        match self.open_session(cap, &vm, epoch, self.timeouts.boot).await {
            Ok(s) => Outcome::Running(vm, s),
            Err(e) => {
                let _ = self.stop_vm(&vm).await;
                Outcome::Failed(format!("the adopted VM's agent did not answer: {}", e.message()))
            }
        }
    }

    fn broken_capsule(&self, id: &CapsuleId, why: &str) {
        tracing::error!(capsule = %id, reason = %why, "capsule directory kept as failed");
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), why.to_owned());
    }
}
