//! Configuration of the Cloud Hypervisor driver: a builder with `new()`, `from_env()`, `with_*`
//! setters and a fallible `build()`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsules_microvm::assets::DEFAULT_ASSET_DIR;
use capsules_microvm::vmm::VmmError;

use crate::ChvVmm;

/// Which guest kernel the capsules run, as far as the host check is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestKernel {
    /// The Debian ELF `vmlinux` from the asset cache in this directory (not PVM-enabled).
    AssetCache(PathBuf),
    /// A user-supplied ELF `vmlinux` with a PVH note. `pvm` declares that it was built with
    /// `CONFIG_PVM_GUEST` (it cannot be read from the file), which a PVM host requires.
    File { path: PathBuf, pvm: bool },
}

impl GuestKernel {
    /// Whether the kernel is declared PVM-enabled.
    pub fn is_pvm(&self) -> bool {
        matches!(self, GuestKernel::File { pvm: true, .. })
    }

    /// The user-supplied kernel file, if any (the asset cache's kernel comes with the assets).
    pub fn file(&self) -> Option<&Path> {
        match self {
            GuestKernel::File { path, .. } => Some(path),
            GuestKernel::AssetCache(_) => None,
        }
    }
}

/// How `vm.restore` brings the guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MemoryRestore {
    /// Pages are faulted in from the snapshot as the guest touches them (userfaultfd): fast wake.
    #[default]
    OnDemand,
    /// The whole snapshot is copied into guest memory before restore returns.
    Copy,
}

impl MemoryRestore {
    /// The API's spelling (`memory_restore_mode`).
    pub(crate) fn api_name(self) -> &'static str {
        match self {
            MemoryRestore::OnDemand => "OnDemand",
            MemoryRestore::Copy => "Copy",
        }
    }
}

/// Builds a [`ChvVmm`].
///
/// ```no_run
/// use capsules_backend_chv::ChvBuilder;
/// use capsules_microvm::vmm::Vmm;
///
/// let vmm = ChvBuilder::from_env()
///     .with_guest_kernel("/opt/kernels/vmlinux-pvm", true)
///     .build()?;
/// println!("{}", vmm.host_check()?.detail);
/// # Ok::<(), capsules_microvm::vmm::VmmError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ChvBuilder {
    binary: Option<PathBuf>,
    kernel: Option<GuestKernel>,
    asset_dir: Option<PathBuf>,
    api_timeout: Option<Duration>,
    start_timeout: Option<Duration>,
    snapshot_timeout: Option<Duration>,
    agent_timeout: Option<Duration>,
    memory_restore: MemoryRestore,
    kvm_device: Option<PathBuf>,
    sys_module_dir: Option<PathBuf>,
    verbose: bool,
}

/// The settled configuration (see [`ChvBuilder`] for what each field means).
#[derive(Debug, Clone)]
pub(crate) struct ChvConfig {
    pub binary: PathBuf,
    pub kernel: GuestKernel,
    pub api_timeout: Duration,
    pub start_timeout: Duration,
    pub snapshot_timeout: Duration,
    pub agent_timeout: Duration,
    pub memory_restore: MemoryRestore,
    pub kvm_device: PathBuf,
    pub sys_module_dir: PathBuf,
    pub verbose: bool,
}

impl ChvBuilder {
    /// Defaults: `cloud-hypervisor` from `PATH`, the Debian kernel from the asset cache in
    /// [`DEFAULT_ASSET_DIR`], 10 s API calls and VMM start, 10 min snapshot/restore,
    /// on-demand memory restore.
    pub fn new() -> Self {
        Self::default()
    }

    /// Defaults, overridden from the environment where set: `CAPSULES_CH_BIN` (the
    /// `cloud-hypervisor` binary), `CAPSULES_ASSET_DIR` (asset cache), `CAPSULES_CH_KERNEL` (a
    /// user-supplied ELF vmlinux) with `CAPSULES_CH_KERNEL_PVM=1` (it is PVM-enabled).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let mut b = Self::new();
        b.binary = var("CAPSULES_CH_BIN").map(PathBuf::from);
        b.asset_dir = var("CAPSULES_ASSET_DIR").map(PathBuf::from);
        if let Some(path) = var("CAPSULES_CH_KERNEL") {
            let pvm = var("CAPSULES_CH_KERNEL_PVM").is_some_and(|v| v == "1" || v == "true");
            b.kernel = Some(GuestKernel::File { path: path.into(), pvm });
        }
        b
    }

    /// The `cloud-hypervisor` binary (default: found on `PATH`).
    pub fn with_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// A user-supplied guest kernel (ELF vmlinux with a PVH note); `pvm` declares it PVM-enabled.
    pub fn with_guest_kernel(mut self, path: impl Into<PathBuf>, pvm: bool) -> Self {
        self.kernel = Some(GuestKernel::File { path: path.into(), pvm });
        self
    }

    /// The asset cache whose Debian kernel is used when no kernel is supplied.
    pub fn with_asset_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.asset_dir = Some(dir.into());
        self
    }

    /// Deadline of each ordinary API call.
    pub fn with_api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = Some(timeout);
        self
    }

    /// Deadline from spawning the VMM to its API answering.
    pub fn with_start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// Deadline of `vm.snapshot` and `vm.restore` (they write or read the guest's memory).
    pub fn with_snapshot_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_timeout = Some(timeout);
        self
    }

    /// Deadline of the hybrid-vsock handshake in `agent_stream` (CH holds the connection until
    /// the guest's vsock driver answers; default 10 s).
    pub fn with_agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = Some(timeout);
        self
    }

    /// How restore brings memory back (default [`MemoryRestore::OnDemand`]).
    pub fn with_memory_restore(mut self, mode: MemoryRestore) -> Self {
        self.memory_restore = mode;
        self
    }

    /// The KVM device the host check inspects (default `/dev/kvm`; for tests).
    pub fn with_kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = Some(path.into());
        self
    }

    /// Where the host check looks for loaded kernel modules (default `/sys/module`; for tests).
    pub fn with_sys_module_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.sys_module_dir = Some(path.into());
        self
    }

    /// Pass `-v` to Cloud Hypervisor (info-level lines in `ch.log`).
    pub fn with_verbose_log(mut self, verbose: bool) -> Self {
        self.verbose = verbose;
        self
    }

    /// Checks the settings. Does not touch KVM or start anything (see
    /// [`Vmm::host_check`](capsules_microvm::vmm::Vmm::host_check)).
    pub fn build(self) -> Result<ChvVmm, VmmError> {
        let binary = match self.binary {
            Some(p) => p,
            None => find_on_path("cloud-hypervisor").ok_or_else(|| {
                VmmError::HostUnsupported(
                    "cloud-hypervisor was not found: set CAPSULES_CH_BIN to its binary or put it on PATH \
                     (or run capsules with the QEMU backend: --backend qemu)"
                        .into(),
                )
            })?,
        };
        if !binary.is_file() {
            return Err(VmmError::HostUnsupported(format!(
                "the Cloud Hypervisor binary {} does not exist: point CAPSULES_CH_BIN at cloud-hypervisor",
                binary.display()
            )));
        }
        let kernel = self
            .kernel
            .unwrap_or_else(|| GuestKernel::AssetCache(self.asset_dir.unwrap_or_else(|| DEFAULT_ASSET_DIR.into())));
        Ok(ChvVmm::from_config(ChvConfig {
            binary,
            kernel,
            api_timeout: self.api_timeout.unwrap_or(Duration::from_secs(10)),
            start_timeout: self.start_timeout.unwrap_or(Duration::from_secs(10)),
            snapshot_timeout: self.snapshot_timeout.unwrap_or(Duration::from_secs(600)),
            agent_timeout: self.agent_timeout.unwrap_or(Duration::from_secs(10)),
            memory_restore: self.memory_restore,
            kvm_device: self.kvm_device.unwrap_or_else(|| "/dev/kvm".into()),
            sys_module_dir: self.sys_module_dir.unwrap_or_else(|| "/sys/module".into()),
            verbose: self.verbose,
        }))
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}
