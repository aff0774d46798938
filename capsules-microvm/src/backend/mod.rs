//! The generic capsules [`Backend`] over any [`Vmm`]: a capsule is a real microVM.
//!
//! [`MicroVmBackend<V>`] owns everything around the VMM process: the per-capsule state directory
//! and its durable record, the data disk, the network attachment, the guest-agent session, the
//! capacity accounting, supervision, and — above all — the order of sleep and wake, which is what
//! keeps a capsule's memory and disk consistent.
//!
//! ```no_run
//! # async fn demo<V: capsules_microvm::vmm::Vmm>(vmm: V) -> capsules_core::Result<()> {
//! use capsules_microvm::backend::MicroVmBackend;
//!
//! // State in CAPSULES_STATE_DIR (default /var/lib/capsules), assets from CAPSULES_ASSET_DIR.
//! let backend = MicroVmBackend::builder(vmm).from_env().build().await?;
//! # drop(backend); Ok(()) }
//! ```
//!
//! # State directory
//!
//! ```text
//! <state>/capsules/<id>/
//!     capsule.json         durable record: spec, pinned assets, network, state, session epoch
//!     data.ext4            sparse ext4 data disk (/dev/vdb), sized to the storage limit
//!     vm/                  the VMM's own directory (owned by the VMM user): sockets, pid file,
//!       serial.log         the serial console (boot log, `logs`)
//!     snapshot/            the memory snapshot of a sleeping capsule
//!     snapshot.complete    completion marker: the snapshot is whole and fsynced
//!     snapshot.tmp/        a snapshot being written (never restored)
//!     snapshot.consumed/   a restored snapshot being deleted (never restored again)
//! ```
//!
//! # Sleep, in this order
//!
//! 1. agent `quiesce` (the agent finishes the frame it is writing and writes nothing more); the
//!    session is cut: calls in flight end with `Unavailable` ("the capsule went to sleep");
//! 2. `pause` the VM;
//! 3. `snapshot` into `snapshot.tmp/`, fsync every file and the directory;
//! 4. rename `snapshot.tmp/` → `snapshot/`, then write the completion marker (fsynced);
//! 5. record `sleeping` durably;
//! 6. `stop` the VMM process (guest RAM released; the capacity is freed).
//!
//! A failure before step 5 leaves the capsule running (the VM is resumed and a new session
//! opened) or, if the VMM died, `failed` — never asleep on a partial snapshot.
//!
//! # Wake, in this order
//!
//! 1. capacity check;
//! 2. a new VMM process restores the snapshot (left paused);
//! 3. the snapshot is marked consumed durably (marker deleted, record `running`, directory
//!    renamed to `snapshot.consumed/`);
//! 4. `resume`;
//! 5. a new agent session (epoch + 1) and `set_clock(host now)`.
//!
//! A snapshot is valid only with its marker while the record is `sleeping`, so it is never
//! restored over a disk that has run on since: a VMM that dies after step 3 leaves the capsule
//! `failed` (disk kept; `restart` boots it cold).
//!
//! # Recovery at start
//!
//! The state directory is the source of truth. For each capsule directory: a live VMM
//! ([`Vmm::adopt`]) gets a new agent session and the capsule is `running`; else a valid snapshot
//! with a `sleeping` record makes it `sleeping`; else it is `failed` with its disk kept. A
//! `terminating` record is finished (deleted). Then the network layer sweeps everything of its
//! prefix that no running or sleeping capsule owns. Nothing is silently lost: an unreadable record
//! is reported as a failed capsule.
//!
//! # Errors
//!
//! Every message is one sentence naming what failed; the source chain keeps the detail (the
//! VMM's messages, the serial log tail of a failed boot, the agent's own error).
//!
//! | Situation | Kind |
//! |---|---|
//! | host full (vCPUs, memory × overcommit, no disk for a snapshot) | `Unavailable` |
//! | a call cut by sleep or restart; the agent did not answer in time | `Unavailable` |
//! | a call on a sleeping, failed or terminated capsule; a stream cut by terminate or a lost VM | `Conflict` |
//! | unknown capsule id | `NotFound` |
//! | the guest says a path or handle does not exist / the request is invalid / not permitted | `NotFound` / `InvalidInput` / `PermissionDenied` |
//! | the VMM cannot run on this host (no KVM, PVM kernel, missing binary) | `Unsupported` |
//! | network policy without a network layer | `Unsupported` |
//! | VMM control failures, I/O on the state directory, protocol violations | `Internal` |

mod adapters;
mod agent_client;
mod assets_source;
mod builder;
mod config;
mod disk;
mod lifecycle;
mod record;
mod recovery;
mod session;
mod sleep_wake;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use capsules_core::backend::{
    Backend, BackendCapsule, BackendInfo, BackendState, ByteStream, Capabilities, CapsuleSpec, Connection, ExecRequest,
    ExecStream, FileStat, ProcessInfo, PtyRequest, PtySession,
};
use capsules_core::types::{CapsuleId, Image, NetworkPolicy};
use capsules_core::{Error, Result};
use tokio_util::sync::CancellationToken;

pub use adapters::{AgentConnector, AgentSession, AssetSource, BootAssets, NetAttachment, NetworkProvider};
pub use agent_client::ProtocolAgent;
pub use assets_source::StaticAssets;
pub use builder::MicroVmBackendBuilder;
pub use config::{AgentChannel, Capacity, DEFAULT_STATE_DIR, DEFAULT_VMM_USER, Timeouts, VmmUser, state_dir_from_env};
pub use record::{CapsuleRecord, RECORD_VERSION, RecordState};

use crate::vmm::{DiskConfig, HostReport, VmConfig, VmHandle, Vmm, VmmError};
use record::CapsulePaths;
use session::LiveSession;

/// Bytes of the serial log that `logs` returns (the tail).
pub const LOG_TAIL_BYTES: u64 = 256 * 1024;
/// Bytes of the serial log put into a boot error's source chain.
const ERROR_LOG_TAIL: u64 = 4 * 1024;

/// A detail in an error's source chain (log tails, tool output).
#[derive(Debug)]
pub(crate) struct Detail {
    text: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Detail {
    pub(crate) fn msg(text: impl Into<String>) -> Self {
        Detail {
            text: text.into(),
            source: None,
        }
    }
    pub(crate) fn with(text: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Detail {
            text: text.into(),
            source: Some(source.into()),
        }
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Detail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Maps a VMM error to a core error whose message says what failed (`what`, e.g. "starting the VM").
pub(crate) fn vmm_err(what: &str, e: VmmError) -> Error {
    match e {
        // The driver's message is the whole story; a source would only repeat it.
        VmmError::HostUnsupported(msg) => Error::unsupported(msg),
        VmmError::Timeout(..) => Error::unavailable(format!("{what} timed out")).with_source(e),
        _ => Error::internal(format!("{what} failed")).with_source(e),
    }
}

fn io_err(what: impl Into<String>, e: std::io::Error) -> Error {
    Error::internal(what).with_source(e)
}

/// What the backend is doing with a capsule right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    Creating,
    Running,
    Suspending,
    Sleeping,
    Waking,
    Restarting,
    Failed(String),
    Terminating,
}

/// One capsule's live state (behind a short std mutex; never held across an await).
pub(crate) struct Live {
    pub(crate) record: CapsuleRecord,
    pub(crate) phase: Phase,
    pub(crate) vm: Option<Arc<dyn VmHandle>>,
    pub(crate) session: Option<Arc<LiveSession>>,
    /// Cancelled to stop watching the VMM (before an intentional stop).
    pub(crate) supervisor: Option<CancellationToken>,
    /// Whether this capsule's vCPUs and memory are counted against capacity.
    pub(crate) holds_capacity: bool,
}

/// One capsule: its paths, a lifecycle lock (create/sleep/wake/restart/terminate are serialized
/// per capsule) and its live state.
pub(crate) struct Capsule {
    pub(crate) id: CapsuleId,
    pub(crate) paths: CapsulePaths,
    pub(crate) op: tokio::sync::Mutex<()>,
    pub(crate) live: Mutex<Live>,
}

impl Capsule {
    pub(crate) fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
pub(crate) struct Usage {
    vcpus: u64,
    memory_mib: u64,
}

/// Shared state of a backend (supervisor tasks hold it too).
pub(crate) struct Inner<V: Vmm> {
    pub(crate) vmm: V,
    pub(crate) state_dir: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) assets: Arc<dyn AssetSource>,
    pub(crate) asset_cache: Mutex<HashMap<Image, BootAssets>>,
    pub(crate) net: Option<Arc<dyn NetworkProvider>>,
    pub(crate) agent: Arc<dyn AgentConnector>,
    pub(crate) run_as: Option<(u32, u32)>,
    pub(crate) capacity: Capacity,
    pub(crate) timeouts: Timeouts,
    pub(crate) channel: Option<AgentChannel>,
    pub(crate) host: HostReport,
    pub(crate) capsules: Mutex<HashMap<CapsuleId, Arc<Capsule>>>,
    /// Capsule directories whose record could not be read: reported as failed, never dropped.
    pub(crate) broken: Mutex<HashMap<CapsuleId, String>>,
    pub(crate) usage: Mutex<Usage>,
}

impl<V: Vmm> Inner<V> {
    pub(crate) fn capsule(&self, id: &CapsuleId) -> Option<Arc<Capsule>> {
        self.capsules.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn require(&self, id: &CapsuleId) -> Result<Arc<Capsule>> {
        self.capsule(id)
            .ok_or_else(|| Error::not_found(format!("capsule {id} does not exist on this backend")))
    }

    /// Reserves `size`'s vCPUs and memory, or says why the host is full (`Unavailable`).
    pub(crate) fn reserve(&self, vcpus: u32, memory_mib: u64, force: bool) -> Result<()> {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let (max_v, max_m) = (self.capacity.max_vcpus(), self.capacity.max_memory_mib());
        if !force && u.vcpus + u64::from(vcpus) > max_v {
            return Err(Error::unavailable(format!(
                "the host has no room for {vcpus} more vCPUs ({} of {max_v} in use); retry later or put a capsule to sleep",
                u.vcpus
            )));
        }
        if !force && u.memory_mib + memory_mib > max_m {
            return Err(Error::unavailable(format!(
                "the host has no room for {memory_mib} MiB more guest memory ({} of {max_m} MiB in use); retry later or put a capsule to sleep",
                u.memory_mib
            )));
        }
        u.vcpus += u64::from(vcpus);
        u.memory_mib += memory_mib;
        Ok(())
    }

    pub(crate) fn release(&self, vcpus: u32, memory_mib: u64) {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        u.vcpus = u.vcpus.saturating_sub(u64::from(vcpus));
        u.memory_mib = u.memory_mib.saturating_sub(memory_mib);
    }

    /// Releases the capsule's capacity if it holds any.
    pub(crate) fn release_live(&self, live: &mut Live) {
        if std::mem::take(&mut live.holds_capacity) {
            self.release(live.record.size.vcpus(), live.record.size.memory_mib());
        }
    }

    /// Refuses when the state directory cannot hold a memory snapshot of `memory_mib`.
    pub(crate) fn check_snapshot_disk(&self, memory_mib: u64) -> Result<()> {
        if !self.capacity.check_snapshot_disk {
            return Ok(());
        }
        let free = disk::free_bytes(&self.state_dir).map_err(|e| {
            io_err(
                format!("could not read the free disk space under {}", self.state_dir.display()),
                e,
            )
        })?;
        let need = (memory_mib + self.capacity.disk_reserve_mib) << 20;
        if free < need {
            return Err(Error::unavailable(format!(
                "the disk under {} has {} MiB free, too little for a {memory_mib} MiB memory snapshot; free some space or retry later",
                self.state_dir.display(),
                free >> 20
            )));
        }
        Ok(())
    }

    /// The kernel command line the guest's init and agent read.
    pub(crate) fn cmdline(&self, record: &CapsuleRecord) -> String {
        kernel_cmdline(record, self.channel)
    }

    /// The VMM configuration of a capsule, from its record (disk order: base read-only, then data).
    pub(crate) fn vm_config(&self, paths: &CapsulePaths, record: &CapsuleRecord) -> VmConfig {
        VmConfig {
            id: record.id.to_string(),
            vcpus: record.size.vcpus(),
            memory_mib: record.size.memory_mib(),
            kernel: record.assets.kernel.clone(),
            initramfs: record.assets.initramfs.clone(),
            cmdline: self.cmdline(record),
            disks: vec![
                DiskConfig {
                    path: record.assets.base_image.clone(),
                    read_only: true,
                },
                DiskConfig {
                    path: paths.data_disk(),
                    read_only: false,
                },
            ],
            tap: record.net.as_ref().map(NetAttachment::tap_config),
            state_dir: paths.vm_dir(),
            serial_log: paths.serial_log(),
            run_as: self.run_as,
        }
    }

    /// Writes the capsule's record durably (after `f` changed it).
    pub(crate) fn save(&self, cap: &Capsule, live: &mut Live, f: impl FnOnce(&mut CapsuleRecord)) -> Result<()> {
        f(&mut live.record);
        record::write_record(&cap.paths, &live.record)
            .map_err(|e| io_err(format!("could not write the record of capsule {}", cap.id), e))
    }

    /// The current session for a guest call, or why there is none.
    fn session(&self, id: &CapsuleId) -> Result<Arc<LiveSession>> {
        let cap = self.require(id)?;
        let live = cap.live();
        match &live.phase {
            Phase::Running => live
                .session
                .clone()
                .filter(|s| !s.is_cut())
                .ok_or_else(|| Error::unavailable("the capsule's agent session is being reopened; retry")),
            Phase::Sleeping => Err(Error::conflict("the capsule is asleep; wake it first")),
            Phase::Suspending => Err(Error::unavailable(
                "the capsule is going to sleep; retry once it is awake",
            )),
            Phase::Creating => Err(Error::unavailable("the capsule is still being created; retry")),
            Phase::Waking => Err(Error::unavailable("the capsule is waking up; retry")),
            Phase::Restarting => Err(Error::unavailable("the capsule is restarting; retry")),
            Phase::Failed(why) => Err(Error::conflict(format!(
                "the capsule has failed ({why}); restart boots it from its disk"
            ))),
            Phase::Terminating => Err(Error::conflict("the capsule was terminated")),
        }
    }

    /// A VMM call with a deadline (drivers have their own; this one makes sure no wait is unbounded).
    pub(crate) async fn vm_op<T>(
        &self,
        what: &'static str,
        limit: std::time::Duration,
        fut: impl Future<Output = std::result::Result<T, VmmError>>,
    ) -> std::result::Result<T, VmmError> {
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or(Err(VmmError::Timeout(what, limit)))
    }

    /// Stops a VMM: graceful for `stop_grace`, then killed by the driver; bounded here as well.
    pub(crate) async fn stop_vm(&self, vm: &Arc<dyn VmHandle>) -> std::result::Result<(), VmmError> {
        let limit = self.timeouts.stop_grace + self.timeouts.call;
        self.vm_op("stopping the VMM", limit, vm.stop(self.timeouts.stop_grace))
            .await
    }

    /// Stops a VMM whose guest no longer matters (terminate: its disk is deleted next) without a
    /// graceful shutdown, which a guest whose init ignores the power button would only make wait
    /// out the whole grace.
    pub(crate) async fn stop_vm_now(&self, vm: &Arc<dyn VmHandle>) -> std::result::Result<(), VmmError> {
        self.vm_op(
            "stopping the VMM",
            self.timeouts.call,
            vm.stop(std::time::Duration::ZERO),
        )
        .await
    }

    /// The tail of the serial log, for error messages.
    pub(crate) fn log_tail(&self, paths: &CapsulePaths) -> String {
        let t = record::tail(&paths.serial_log(), ERROR_LOG_TAIL).unwrap_or_default();
        String::from_utf8_lossy(&t).into_owned()
    }
}

/// The generic microVM backend. Cheap to clone (shared state).
pub struct MicroVmBackend<V: Vmm> {
    inner: Arc<Inner<V>>,
}

impl<V: Vmm> Clone for MicroVmBackend<V> {
    fn clone(&self) -> Self {
        MicroVmBackend {
            inner: self.inner.clone(),
        }
    }
}

impl<V: Vmm> std::fmt::Debug for MicroVmBackend<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.capsules.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("MicroVmBackend")
            .field("vmm", &self.inner.vmm)
            .field("state_dir", &self.inner.state_dir)
            .field("accelerator", &self.inner.host.accelerator)
            .field("network", &self.inner.net.is_some())
            .field("capsules", &n)
            .finish()
    }
}

impl<V: Vmm> MicroVmBackend<V> {
    /// A builder with every default: state in [`DEFAULT_STATE_DIR`], assets from the environment,
    /// no network layer, the [`ProtocolAgent`], host capacity, default timeouts.
    pub fn builder(vmm: V) -> MicroVmBackendBuilder<V> {
        MicroVmBackendBuilder {
            vmm,
            state_dir: None,
            assets: None,
            net: None,
            agent: None,
            vmm_user: None,
            capacity: None,
            timeouts: Timeouts::default(),
            channel: None,
        }
    }

    /// The VMM driver.
    pub fn vmm(&self) -> &V {
        &self.inner.vmm
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// A capsule's directory (`<state>/capsules/<id>`), whether or not it exists.
    pub fn capsule_dir(&self, id: &CapsuleId) -> PathBuf {
        self.inner.root.join(id.as_str())
    }

    /// What the VMM's host check found (accelerator, detail).
    pub fn host_report(&self) -> &HostReport {
        &self.inner.host
    }

    /// Content hashes of the base images that capsules on this backend are pinned to (an asset
    /// cache cleanup must keep them).
    pub fn pinned_images(&self) -> Vec<String> {
        let caps: Vec<_> = self
            .inner
            .capsules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut keys: Vec<String> = caps.iter().map(|c| c.live().record.assets.image_key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// vCPUs and MiB of guest memory that running capsules hold now.
    pub fn usage(&self) -> (u64, u64) {
        let u = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        (u.vcpus, u.memory_mib)
    }
}

#[async_trait]
impl<V: Vmm> Backend for MicroVmBackend<V> {
    fn info(&self) -> BackendInfo {
        let name = match self.inner.vmm.name() {
            "cloud-hypervisor" => "chv",
            other => other,
        };
        BackendInfo {
            name: name.to_owned(),
            accelerator: self.inner.host.accelerator.clone(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::ALL;
        caps.network_policy = self.inner.net.is_some();
        caps
    }

    async fn create(&self, spec: &CapsuleSpec) -> Result<()> {
        self.inner.create(spec).await
    }
    async fn sleep(&self, id: &CapsuleId) -> Result<()> {
        self.inner.sleep(id).await
    }
    async fn wake(&self, id: &CapsuleId) -> Result<()> {
        self.inner.wake(id).await
    }
    async fn restart(&self, id: &CapsuleId) -> Result<()> {
        self.inner.restart(id).await
    }
    async fn terminate(&self, id: &CapsuleId) -> Result<()> {
        self.inner.terminate(id).await
    }

    async fn state(&self, id: &CapsuleId) -> Result<BackendState> {
        if let Some(reason) = self.inner.broken.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(BackendState::Failed { reason: reason.clone() });
        }
        Ok(match self.inner.capsule(id) {
            None => BackendState::Gone,
            Some(cap) => backend_state(&cap.live().phase),
        })
    }

    async fn list(&self) -> Result<Vec<BackendCapsule>> {
        let caps: Vec<_> = self
            .inner
            .capsules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<BackendCapsule> = caps
            .iter()
            .map(|c| BackendCapsule {
                id: c.id.clone(),
                state: backend_state(&c.live().phase),
            })
            .filter(|c| c.state != BackendState::Gone)
            .collect();
        for (id, reason) in self.inner.broken.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push(BackendCapsule {
                id: id.clone(),
                state: BackendState::Failed { reason: reason.clone() },
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn exec(&self, id: &CapsuleId, req: ExecRequest) -> Result<ExecStream> {
        let s = self.inner.session(id)?;
        let stream = s.call("starting the command", s.agent().exec(req)).await?;
        Ok(s.guard_exec(stream))
    }
    async fn spawn(&self, id: &CapsuleId, req: ExecRequest) -> Result<ProcessInfo> {
        let s = self.inner.session(id)?;
        s.call("starting the background process", s.agent().spawn(req)).await
    }
    async fn processes(&self, id: &CapsuleId) -> Result<Vec<ProcessInfo>> {
        let s = self.inner.session(id)?;
        s.call("listing processes", s.agent().processes()).await
    }
    async fn attach(&self, id: &CapsuleId, handle: &str, offset: u64) -> Result<ExecStream> {
        let s = self.inner.session(id)?;
        let stream = s
            .call("attaching to the process", s.agent().attach(handle, offset))
            .await?;
        Ok(s.guard_exec(stream))
    }
    async fn signal(&self, id: &CapsuleId, handle: &str, signal: i32) -> Result<()> {
        let s = self.inner.session(id)?;
        s.call("signalling the process", s.agent().signal(handle, signal)).await
    }
    async fn pty(&self, id: &CapsuleId, req: PtyRequest) -> Result<PtySession> {
        let s = self.inner.session(id)?;
        let pty = s.call("opening the terminal", s.agent().pty(req)).await?;
        Ok(s.guard_pty(pty))
    }

    async fn read_file(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        let s = self.inner.session(id)?;
        let stream = s.call("opening the file", s.agent().read_file(path)).await?;
        Ok(s.guard(stream))
    }
    async fn write_file(&self, id: &CapsuleId, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64> {
        let s = self.inner.session(id)?;
        // The contract creates parent directories; the agent writes only into existing ones.
        if let Some((parent, _)) = path.trim_end_matches('/').rsplit_once('/')
            && !parent.is_empty()
        {
            s.call("creating the parent directory", s.agent().mkdir(parent)).await?;
        }
        // Bounded by the caller's stream (the client puts a deadline on the final answer); a cut
        // session ends it at once.
        s.call_within("writing the file", None, s.agent().write_file(path, data, mode))
            .await
    }
    async fn stat(&self, id: &CapsuleId, path: &str) -> Result<FileStat> {
        let s = self.inner.session(id)?;
        s.call("stat", s.agent().stat(path)).await
    }
    async fn list_dir(&self, id: &CapsuleId, path: &str) -> Result<Vec<FileStat>> {
        let s = self.inner.session(id)?;
        s.call("listing the directory", s.agent().list_dir(path)).await
    }
    async fn mkdir(&self, id: &CapsuleId, path: &str) -> Result<()> {
        let s = self.inner.session(id)?;
        s.call("creating the directory", s.agent().mkdir(path)).await
    }
    async fn remove(&self, id: &CapsuleId, path: &str, recursive: bool) -> Result<()> {
        let s = self.inner.session(id)?;
        s.call("removing the path", s.agent().remove(path, recursive)).await
    }
    async fn rename(&self, id: &CapsuleId, from: &str, to: &str) -> Result<()> {
        let s = self.inner.session(id)?;
        s.call("renaming the path", s.agent().rename(from, to)).await
    }
    async fn upload_tar(&self, id: &CapsuleId, dest: &str, tar: ByteStream) -> Result<()> {
        let s = self.inner.session(id)?;
        s.call_within("unpacking the tar stream", None, s.agent().upload_tar(dest, tar))
            .await
    }
    async fn download_tar(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        let s = self.inner.session(id)?;
        let stream = s.call("packing the directory", s.agent().download_tar(path)).await?;
        Ok(s.guard(stream))
    }

    async fn connect(&self, id: &CapsuleId, port: u16) -> Result<Box<dyn Connection>> {
        let s = self.inner.session(id)?;
        let conn = s.call("connecting to the port", s.agent().connect(port)).await?;
        Ok(s.guard_conn(conn))
    }

    async fn apply_network(&self, id: &CapsuleId, policy: &NetworkPolicy) -> Result<()> {
        self.inner.apply_network(id, policy).await
    }

    async fn logs(&self, id: &CapsuleId) -> Result<Bytes> {
        let dir = self.capsule_dir(id);
        if self.inner.capsule(id).is_none() && !dir.is_dir() {
            return Err(Error::not_found(format!("capsule {id} does not exist on this backend")));
        }
        let paths = CapsulePaths { dir };
        let t = record::tail(&paths.serial_log(), LOG_TAIL_BYTES)
            .map_err(|e| io_err(format!("could not read the serial log of capsule {id}"), e))?;
        Ok(Bytes::from(t))
    }
}

/// The kernel command line of a capsule (the contract with the guest's init and agent):
/// `console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname=<name>`, then the
/// network fragment (`capsules.ip=… capsules.gw=… capsules.dns=…`) and `capsules.channel=…`.
/// Drivers may append their own (QEMU's `tsc_early_khz=`).
pub fn kernel_cmdline(record: &CapsuleRecord, channel: Option<AgentChannel>) -> String {
    let mut c = format!(
        "console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname={}",
        record.name
    );
    if let Some(net) = &record.net
        && !net.cmdline.is_empty()
    {
        c.push(' ');
        c.push_str(&net.cmdline);
    }
    if let Some(ch) = channel {
        c.push_str(" capsules.channel=");
        c.push_str(&ch.cmdline_value());
    }
    c
}

fn backend_state(phase: &Phase) -> BackendState {
    match phase {
        Phase::Creating | Phase::Running | Phase::Suspending | Phase::Restarting => BackendState::Running,
        Phase::Sleeping | Phase::Waking => BackendState::Sleeping,
        Phase::Failed(reason) => BackendState::Failed { reason: reason.clone() },
        Phase::Terminating => BackendState::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsules_core::types::{CapsuleName, Size, TeamId};

    fn record() -> CapsuleRecord {
        let spec = CapsuleSpec {
            id: CapsuleId::generate(),
            name: CapsuleName::new("agent-pr-482").unwrap(),
            team: TeamId::generate(),
            size: Size::S2x2gb,
            image: Image::Small,
            disk_gib: 3,
            network: NetworkPolicy::None,
        };
        let assets = BootAssets {
            manifest_key: "m".into(),
            image_key: "i".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            base_image: "/b.ext4".into(),
        };
        CapsuleRecord::new(&spec, assets, 0)
    }

    #[test]
    fn cmdline_is_the_guest_contract() {
        let mut r = record();
        assert_eq!(
            kernel_cmdline(&r, None),
            "console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname=agent-pr-482"
        );
        r.net = Some(NetAttachment {
            tap: "cap0".into(),
            mac: "52:54:00:00:00:01".into(),
            cmdline: "capsules.ip=10.0.0.2/30 capsules.gw=10.0.0.1 capsules.dns=10.0.0.1".into(),
            detail: serde_json::Value::Null,
        });
        assert_eq!(
            kernel_cmdline(&r, Some(AgentChannel::VirtioSerial)),
            "console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname=agent-pr-482 \
             capsules.ip=10.0.0.2/30 capsules.gw=10.0.0.1 capsules.dns=10.0.0.1 capsules.channel=virtio-serial"
        );
        assert!(kernel_cmdline(&r, Some(AgentChannel::Vsock(1024))).ends_with(" capsules.channel=vsock:1024"));
    }

    #[test]
    fn record_round_trips_and_states_map() {
        let r = record();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"state\":\"creating\""), "{json}");
        let back: CapsuleRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(backend_state(&Phase::Suspending), BackendState::Running);
        assert_eq!(backend_state(&Phase::Waking), BackendState::Sleeping);
        assert_eq!(backend_state(&Phase::Terminating), BackendState::Gone);
        let e = vmm_err(
            "starting the VM",
            VmmError::HostUnsupported("no KVM here; use QEMU".into()),
        );
        assert_eq!(
            (e.kind(), e.message()),
            (capsules_core::ErrorKind::Unsupported, "no KVM here; use QEMU")
        );
        let e = vmm_err(
            "pausing the VM",
            VmmError::Timeout("pause", std::time::Duration::from_secs(1)),
        );
        assert!(e.is_retryable() && e.message() == "pausing the VM timed out");
    }
}
