//! Create, sleep, wake, restart, terminate, and VMM supervision. The module docs of
//! [`super`] give the order of every step; the code below follows it line by line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsules_core::backend::CapsuleSpec;
use capsules_core::types::{CapsuleId, NetworkPolicy};
use capsules_core::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::record::{self, CapsulePaths, CapsuleRecord, RecordState};
use super::session::{CutReason, LiveSession};
use super::{Capsule, Detail, Inner, Live, Phase, disk, io_err, vmm_err};
use crate::vmm::{VmHandle, Vmm};

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

fn same_vm(a: &Arc<dyn VmHandle>, b: &Arc<dyn VmHandle>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl<V: Vmm> Inner<V> {
    // ---------------------------------------------------------------- create

    pub(crate) async fn create(self: &Arc<Self>, spec: &CapsuleSpec) -> Result<()> {
        if let Some(existing) = self.capsule(&spec.id) {
            let live = existing.live();
            return if live.record.matches(spec) && live.phase == Phase::Running {
                Ok(())
            } else {
                Err(Error::already_exists(format!(
                    "capsule {} already exists on this backend",
                    spec.id
                )))
            };
        }
        if spec.disk_gib == 0 {
            return Err(Error::invalid_input("the data disk must be at least 1 GiB"));
        }
        let (vcpus, mem) = (spec.size.vcpus(), spec.size.memory_mib());
        // Fail fast before a possibly long asset build; checked again atomically below.
        self.reserve(vcpus, mem, false)?;
        self.release(vcpus, mem);
        self.check_snapshot_disk(mem)?;

        let assets = self.boot_assets(spec).await?;

        let paths = CapsulePaths::new(&self.root, &spec.id);
        let cap = {
            let mut map = self.capsules.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&spec.id) || paths.dir.exists() {
                return Err(Error::already_exists(format!(
                    "capsule {} already exists on this backend",
                    spec.id
                )));
            }
            self.reserve(vcpus, mem, false)?;
            let cap = Arc::new(Capsule {
                id: spec.id.clone(),
                paths: paths.clone(),
                op: tokio::sync::Mutex::new(()),
                live: Mutex::new(Live {
                    record: CapsuleRecord::new(spec, assets, now_ms()),
                    phase: Phase::Creating,
                    vm: None,
                    session: None,
                    supervisor: None,
                    holds_capacity: true,
                }),
            });
            map.insert(spec.id.clone(), cap.clone());
            cap
        };
        let _op = cap.op.lock().await;
        match self.create_steps(&cap, spec).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(capsule = %spec.id, error = %e, "create failed; tearing down");
                self.destroy(&cap).await;
                Err(e)
            }
        }
    }

    async fn create_steps(self: &Arc<Self>, cap: &Arc<Capsule>, spec: &CapsuleSpec) -> Result<()> {
        let paths = &cap.paths;
        let mkdir = |p: &std::path::Path| {
            std::fs::create_dir_all(p).map_err(|e| io_err(format!("could not create {}", p.display()), e))
        };
        mkdir(&paths.dir)?;
        mkdir(&paths.vm_dir())?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(paths.vm_dir(), Some(uid), Some(gid))
                .map_err(|e| io_err("could not give the VM directory to the VMM user", e))?;
        }
        {
            let mut live = cap.live();
            self.save(cap, &mut live, |_| {})?;
        }
        disk::create_data_disk(&paths.data_disk(), spec.disk_gib, self.run_as).await?;
        if let Some(net) = &self.net {
            let att = net
                .setup(&spec.id, &spec.network, self.run_as)
                .await
                .map_err(|e| Error::new(e.kind(), "could not set up the capsule's network").with_source(e))?;
            let mut live = cap.live();
            self.save(cap, &mut live, |r| r.net = Some(att))?;
        }
        self.boot_and_run(cap).await
    }

    /// Finds (lazily builds) the assets for a spec; never billed (plain setup).
    async fn boot_assets(&self, spec: &CapsuleSpec) -> Result<super::BootAssets> {
        if let Some(a) = self
            .asset_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&spec.image)
            && a.kernel.is_file()
            && a.initramfs.is_file()
            && a.base_image.exists()
        {
            return Ok(a.clone());
        }
        let a = self.assets.ensure(spec.image, self.vmm.kernel_format()).await?;
        self.asset_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.image, a.clone());
        Ok(a)
    }

    /// Cold boot from the record: start the VMM, open a session, mark running, supervise.
    async fn boot_and_run(self: &Arc<Self>, cap: &Arc<Capsule>) -> Result<()> {
        let (config, epoch) = {
            let mut live = cap.live();
            let assets = &live.record.assets;
            for (what, p) in [
                ("kernel", &assets.kernel),
                ("initramfs", &assets.initramfs),
                ("base image", &assets.base_image),
            ] {
                if !p.exists() {
                    return Err(Error::internal(format!(
                        "the {what} this capsule was created with ({}) is missing; restore the asset cache",
                        p.display()
                    )));
                }
            }
            let epoch = live.record.epoch + 1;
            self.save(cap, &mut live, |r| {
                r.epoch = epoch;
                r.state = RecordState::Running;
                r.failed_reason = None;
            })?;
            (self.vm_config(&cap.paths, &live.record), epoch)
        };
        let vm: Arc<dyn VmHandle> = self
            .vm_op("starting the VMM", self.timeouts.boot, self.vmm.start(&config))
            .await
            .map_err(|e| self.boot_error(cap, "starting the VM", vmm_err("starting the VM", e)))?
            .into();
        let session = match self.open_session(cap, &vm, epoch, self.timeouts.boot).await {
            Ok(s) => s,
            Err(e) => {
                let _ = self.stop_vm(&vm).await;
                return Err(e);
            }
        };
        self.set_running(cap, vm, session).await
    }

    /// Installs a VM and session as the capsule's current ones, unless it was terminated meanwhile.
    async fn set_running(
        self: &Arc<Self>,
        cap: &Arc<Capsule>,
        vm: Arc<dyn VmHandle>,
        session: Arc<LiveSession>,
    ) -> Result<()> {
        let mut live = cap.live();
        if live.phase == Phase::Terminating {
            drop(live);
            session.cut(CutReason::Terminated);
            return Err(Error::conflict("the capsule was terminated while it was starting"));
        }
        if let Some(t) = live.supervisor.take() {
            t.cancel();
        }
        live.supervisor = Some(self.supervise(cap, &vm));
        live.vm = Some(vm);
        live.session = Some(session);
        live.phase = Phase::Running;
        Ok(())
    }

    /// An error of a boot step with the serial log tail in its source chain.
    pub(crate) fn boot_error(&self, cap: &Capsule, what: &str, e: Error) -> Error {
        let tail = self.log_tail(&cap.paths);
        let msg = format!("{what} for capsule {} failed", cap.id);
        let kind = e.kind();
        Error::new(kind, msg).with_source(Detail::with(format!("serial log tail:\n{tail}"), e))
    }

    /// Opens an agent session on `vm` with `epoch`, retrying until `deadline` (the guest may still
    /// be booting), failing fast if the VMM exits; then sets the guest clock.
    pub(crate) async fn open_session(
        &self,
        cap: &Capsule,
        vm: &Arc<dyn VmHandle>,
        epoch: u64,
        deadline: Duration,
    ) -> Result<Arc<LiveSession>> {
        let until = Instant::now() + deadline;
        let mut last: Option<Error> = None;
        let mut backoff = Duration::from_millis(50);
        let agent = loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = Error::unavailable(format!(
                    "the guest agent did not answer within {} s",
                    deadline.as_secs()
                ));
                let e = match last {
                    Some(l) => e.with_source(l),
                    None => e,
                };
                return Err(self.boot_error(cap, "waiting for the guest agent", e));
            }
            let attempt = async {
                let stream = vm
                    .agent_stream()
                    .await
                    .map_err(|e| vmm_err("opening the agent channel", e))?;
                self.agent
                    .handshake(stream, epoch, left.min(Duration::from_secs(10)))
                    .await
            };
            tokio::select! {
                exit = vm.exited() => {
                    let e = Error::internal(format!(
                        "the VMM process exited while the guest was booting (code {:?}, signal {:?})",
                        exit.code, exit.signal
                    ))
                    .with_source(Detail::msg(format!("VMM log tail:\n{}", exit.log_tail)));
                    return Err(self.boot_error(cap, "booting the guest", e));
                }
                r = tokio::time::timeout(left, attempt) => match r {
                    Ok(Ok(a)) => break a,
                    Ok(Err(e)) => {
                        if e.kind() == ErrorKind::Unsupported {
                            return Err(e);
                        }
                        last = Some(e);
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(backoff.min(until.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        let session = LiveSession::new(agent, epoch, self.timeouts.call);
        if let Err(e) = session.call("set clock", session.agent().set_clock(now_nanos())).await {
            session.cut(CutReason::Restart);
            return Err(self.boot_error(cap, "setting the guest clock", e));
        }
        Ok(session)
    }

    // ---------------------------------------------------------------- supervision

    /// Watches `vm`; if it exits while it is still the capsule's VM and nobody stopped it on
    /// purpose, the capsule becomes `failed` (disk kept) and its calls end.
    pub(crate) fn supervise(self: &Arc<Self>, cap: &Arc<Capsule>, vm: &Arc<dyn VmHandle>) -> CancellationToken {
        let token = CancellationToken::new();
        let (t, me, cap, vm) = (token.clone(), self.clone(), cap.clone(), vm.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = t.cancelled() => {}
                exit = vm.exited() => {
                    if t.is_cancelled() {
                        return;
                    }
                    let why = match (exit.code, exit.signal) {
                        (_, Some(s)) => format!("the VMM process was killed by signal {s}"),
                        (Some(c), None) => format!("the VMM process exited with code {c}"),
                        (None, None) => "the VMM process exited".to_owned(),
                    };
                    tracing::warn!(capsule = %cap.id, reason = %why, log = %exit.log_tail, "VMM exited unexpectedly");
                    me.mark_failed(&cap, Some(&vm), &why);
                }
            }
        });
        token
    }

    /// Marks the capsule failed (disk kept): cuts its session, forgets its VM, frees capacity.
    /// With `only_vm`, does nothing unless that VM is still the capsule's current one.
    pub(crate) fn mark_failed(&self, cap: &Capsule, only_vm: Option<&Arc<dyn VmHandle>>, why: &str) {
        let mut live = cap.live();
        if let Some(vm) = only_vm
            && !live.vm.as_ref().is_some_and(|cur| same_vm(cur, vm))
        {
            return;
        }
        if matches!(live.phase, Phase::Terminating | Phase::Failed(_)) {
            return;
        }
        if let Some(s) = live.session.take() {
            s.cut(CutReason::Failed(why.to_owned()));
        }
        if let Some(t) = live.supervisor.take() {
            t.cancel();
        }
        live.vm = None;
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

    // ---------------------------------------------------------------- restart

    pub(crate) async fn restart(self: &Arc<Self>, id: &CapsuleId) -> Result<()> {
        let cap = self
            .capsule(id)
            .ok_or_else(|| Error::not_found(format!("capsule {id} does not exist on this backend")))?;
        let _op = cap.op.lock().await;
        let (vm, session) = {
            let mut live = cap.live();
            match &live.phase {
                Phase::Running | Phase::Sleeping | Phase::Failed(_) => {}
                Phase::Terminating => return Err(Error::conflict("the capsule was terminated")),
                other => return Err(Error::unavailable(format!("the capsule is busy ({other:?}); retry"))),
            }
            if !live.holds_capacity {
                self.reserve(live.record.size.vcpus(), live.record.size.memory_mib(), false)?;
                live.holds_capacity = true;
            }
            if let Some(t) = live.supervisor.take() {
                t.cancel();
            }
            live.phase = Phase::Restarting;
            (live.vm.take(), live.session.take())
        };
        if let Some(s) = session {
            s.cut(CutReason::Restart);
        }
        if let Some(vm) = vm {
            let _ = self.stop_vm(&vm).await;
        }
        // The disk runs on from here: no snapshot may ever be restored over it.
        self.discard_snapshot(&cap.paths);
        let net_ok = self.ensure_network(&cap).await;
        let r = match net_ok {
            Ok(()) => self.boot_and_run(&cap).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            let why = format!("restart failed: {}", e.message());
            self.mark_failed(&cap, None, &why);
            return Err(e);
        }
        Ok(())
    }

    /// Sets the network up again for a capsule whose attachment was removed (recovered failed).
    async fn ensure_network(&self, cap: &Capsule) -> Result<()> {
        let Some(net) = &self.net else { return Ok(()) };
        let (has, policy) = {
            let live = cap.live();
            (live.record.net.is_some(), live.record.network.clone())
        };
        if has {
            return Ok(());
        }
        let att = net
            .setup(&cap.id, &policy, self.run_as)
            .await
            .map_err(|e| Error::new(e.kind(), "could not set up the capsule's network").with_source(e))?;
        let mut live = cap.live();
        self.save(cap, &mut live, |r| r.net = Some(att))
    }

    // ---------------------------------------------------------------- terminate

    pub(crate) async fn terminate(self: &Arc<Self>, id: &CapsuleId) -> Result<()> {
        if let Some(_reason) = self.broken.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            let paths = CapsulePaths::new(&self.root, id);
            return record::remove_tree(&paths.dir)
                .map_err(|e| io_err(format!("could not delete the directory of capsule {id}"), e));
        }
        let Some(cap) = self.capsule(id) else { return Ok(()) };
        // Cut first, so streams end now (even while another lifecycle step holds the lock).
        {
            let mut live = cap.live();
            live.phase = Phase::Terminating;
            if let Some(s) = live.session.take() {
                s.cut(CutReason::Terminated);
            }
        }
        let _op = cap.op.lock().await;
        self.destroy(&cap).await;
        if cap.paths.dir.exists() {
            return Err(Error::internal(format!(
                "could not delete the directory of capsule {id}; terminate again to retry"
            )));
        }
        Ok(())
    }

    /// Stops the VM, tears the network down, deletes the directory, forgets the capsule.
    pub(crate) async fn destroy(&self, cap: &Arc<Capsule>) {
        let (vm, session, att) = {
            let mut live = cap.live();
            live.phase = Phase::Terminating;
            if let Some(t) = live.supervisor.take() {
                t.cancel();
            }
            self.release_live(&mut live);
            if cap.paths.dir.exists()
                && let Err(e) = self.save(cap, &mut live, |r| r.state = RecordState::Terminating)
            {
                tracing::warn!(capsule = %cap.id, error = %e, "could not record terminating");
            }
            (live.vm.take(), live.session.take(), live.record.net.clone())
        };
        if let Some(s) = session {
            s.cut(CutReason::Terminated);
        }
        if let Some(vm) = vm
            && let Err(e) = self.stop_vm_now(&vm).await
        {
            tracing::warn!(capsule = %cap.id, error = %e, "stopping the VMM failed");
        }
        if let (Some(net), Some(att)) = (&self.net, att)
            && let Err(e) = net.teardown(&cap.id, &att).await
        {
            tracing::warn!(capsule = %cap.id, error = %e, "network teardown failed; the next sweep removes it");
        }
        let dir = cap.paths.dir.clone();
        let removed = tokio::task::spawn_blocking(move || record::remove_tree(&dir)).await;
        match removed {
            Ok(Ok(())) => {
                self.capsules.lock().unwrap_or_else(|e| e.into_inner()).remove(&cap.id);
            }
            Ok(Err(e)) => tracing::error!(capsule = %cap.id, error = %e, "could not delete the capsule directory"),
            Err(e) => tracing::error!(capsule = %cap.id, error = %e, "the delete task failed"),
        }
    }

    // ---------------------------------------------------------------- network

    pub(crate) async fn apply_network(&self, id: &CapsuleId, policy: &NetworkPolicy) -> Result<()> {
        let cap = self
            .capsule(id)
            .ok_or_else(|| Error::not_found(format!("capsule {id} does not exist on this backend")))?;
        let Some(net) = &self.net else {
            return Err(Error::unsupported(
                "this backend runs capsules without a network layer, so network policies cannot be applied",
            ));
        };
        let att = {
            let live = cap.live();
            if live.phase == Phase::Terminating {
                return Err(Error::conflict("the capsule was terminated"));
            }
            live.record.net.clone()
        };
        if let Some(att) = &att {
            net.apply(id, att, policy)
                .await
                .map_err(|e| Error::new(e.kind(), "could not apply the network policy").with_source(e))?;
        }
        let mut live = cap.live();
        self.save(&cap, &mut live, |r| r.network = policy.clone())
    }
}
