//! The small trait a VMM driver implements (Cloud Hypervisor, QEMU).
//!
//! Everything above it — disks, taps, nftables, the agent protocol, sleep/wake ordering, recovery —
//! is shared in this crate; a driver only starts, controls and supervises one VMM process per
//! capsule.
//!
//! Contract for every implementation:
//! - `start` and `restore` return once the VMM process runs and its control channel (REST API socket,
//!   QMP) answers; they never sleep-and-hope, they wait on the socket with a deadline.
//! - The VMM process is supervised: [`VmHandle::exited`] reports its exit (status and the tail of its
//!   log) as soon as it happens.
//! - `snapshot` writes a memory snapshot of a paused VM into the given directory and returns only after
//!   the files are complete and fsynced; it never writes the completion marker (the generic backend
//!   does, after `snapshot` returns).
//! - A VM is given a tap *name* (created by this crate), never asked to create network devices itself.
//! - No VMM-specific type appears in this trait.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream (agent channel, port stream).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Errors of a VMM driver. Drivers keep their own detail in the source chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The host cannot run this VMM or this guest kernel (missing binary, no /dev/kvm, PVM, ...).
    /// The message says what is missing and what to do instead.
    #[error("{0}")]
    HostUnsupported(String),
    /// The VMM process failed to start or exited; the message carries the log tail.
    #[error("{message}")]
    Process {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The VMM rejected or failed a control call (API/QMP). The source chain keeps the VMM's own messages.
    #[error("{message}")]
    Control {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A wait ran past its deadline.
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A disk attached to the VM, in order (the first is `/dev/vda` in the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A tap device created by `capsules-microvm`, handed to the VMM by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    pub name: String,
    /// MAC address of the guest side, `52:54:00:xx:xx:xx`.
    pub mac: String,
}

/// Which kernel image format a VMM wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux` with a PVH note (Cloud Hypervisor).
    ElfVmlinux,
    /// Compressed `bzImage`/`vmlinuz` (QEMU).
    BzImage,
}

/// Everything a VMM needs to start one capsule's VM. All paths are inside the capsule's state
/// directory or the asset cache; the driver creates nothing outside `state_dir`.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Capsule id (used for process names and log lines).
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Kernel image in the format the driver asked for ([`Vmm::kernel_format`]).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub tap: Option<TapConfig>,
    /// Directory owned by this VM: sockets (API/QMP, agent channel), logs, pid file.
    pub state_dir: PathBuf,
    /// Serial console log (the boot log `capsule logs` shows).
    pub serial_log: PathBuf,
    /// Run the VMM process as this uid/gid (None = the current user).
    pub run_as: Option<(u32, u32)>,
}

/// What a driver reports about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub pid: u32,
    pub state: VmRunState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    Created,
    Running,
    Paused,
    Shutdown,
}

/// How the VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Last lines of the VMM's own log (stderr), for error messages.
    pub log_tail: String,
}

/// Host facts a driver found (reported by backends and the CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// e.g. "kvm", "tcg", "kvm (pvm)".
    pub accelerator: String,
    pub detail: String,
}

/// A VMM driver: one value per backend, creating one process per capsule.
#[async_trait]
pub trait Vmm: Send + Sync + Debug + 'static {
    /// Short name: "qemu", "cloud-hypervisor".
    fn name(&self) -> &'static str;

    /// Checks, before any VM is started, that this host can run the configured guest with this VMM.
    /// Fails fast with [`VmmError::HostUnsupported`] naming what is wrong and the alternative.
    fn host_check(&self) -> Result<HostReport, VmmError>;

    /// The kernel format this driver boots.
    fn kernel_format(&self) -> KernelFormat;

    /// Starts a new VMM process and boots the VM (cold boot).
    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>, VmmError>;

    /// Starts a new VMM process and restores the VM from a snapshot directory written by
    /// [`VmHandle::snapshot`]. The restored VM is left **paused**; the caller resumes it after it has
    /// durably marked the snapshot consumed.
    async fn restore(&self, config: &VmConfig, snapshot_dir: &Path) -> Result<Box<dyn VmHandle>, VmmError>;

    /// Re-attaches to a VMM process left running by an earlier host process (recovery after the
    /// host process restarted). Returns `None` when no live VMM for this config exists (the driver
    /// checks the pid file and that the pid really is its VMM for this state dir).
    async fn adopt(&self, config: &VmConfig) -> Result<Option<Box<dyn VmHandle>>, VmmError>;
}

/// One running VMM process.
#[async_trait]
pub trait VmHandle: Send + Sync + Debug {
    fn pid(&self) -> u32;

    async fn info(&self) -> Result<VmInfo, VmmError>;
    async fn pause(&self) -> Result<(), VmmError>;
    async fn resume(&self) -> Result<(), VmmError>;

    /// Writes a memory snapshot of the paused VM into `dir` (created by the caller, empty); returns
    /// once everything is written and fsynced.
    async fn snapshot(&self, dir: &Path) -> Result<(), VmmError>;

    /// Opens a new byte stream to the guest agent (CH: hybrid vsock `CONNECT <port>`; QEMU: the
    /// virtio-serial port's unix socket). Each call gives a fresh stream; the agent session on it is
    /// opened by the caller.
    async fn agent_stream(&self) -> Result<Box<dyn Stream>, VmmError>;

    /// Stops the VM and its process: graceful shutdown for at most `grace`, then kill. Idempotent.
    async fn stop(&self, grace: Duration) -> Result<(), VmmError>;

    /// Resolves when the VMM process has exited (supervision). Safe to call many times.
    async fn exited(&self) -> VmExit;
}
