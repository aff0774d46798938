//! [`QemuConfig`]: which binary, accelerator, machine and deadlines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsules_microvm::vmm::VmmError;

use crate::host::Accel;

/// The package that provides the binary, for error messages.
pub(crate) const INSTALL_HINT: &str = "apt-get install qemu-system-x86";

/// Default binary name looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// Configures [`QemuVmm`](crate::QemuVmm): `new()` for defaults, `from_env()` to read the
/// environment, `with_*` to override.
///
/// ```
/// use capsules_backend_qemu::{Accel, QemuConfig};
///
/// let config = QemuConfig::new().with_accel(Some(Accel::Tcg)).with_machine("q35");
/// assert_eq!(config.accel(), Some(Accel::Tcg));
/// ```
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub(crate) binary: Option<PathBuf>,
    pub(crate) accel: Option<Accel>,
    pub(crate) machine: String,
    pub(crate) guest_kernel_pvm: bool,
    pub(crate) extra_args: Vec<String>,
    pub(crate) firmware_boot: bool,
    pub(crate) start_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) snapshot_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: None,
            accel: None,
            machine: "q35".into(),
            guest_kernel_pvm: false,
            extra_args: Vec::new(),
            firmware_boot: false,
            start_timeout: Duration::from_secs(15),
            command_timeout: Duration::from_secs(15),
            snapshot_timeout: Duration::from_secs(300),
        }
    }
}

impl QemuConfig {
    /// Defaults: `qemu-system-x86_64` from `PATH`, accelerator chosen automatically, machine `q35`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Defaults, overridden by `CAPSULES_QEMU_BIN` (the binary), `CAPSULES_QEMU_ACCEL` (`kvm` or
    /// `tcg`; unset or `auto` = automatic) and `CAPSULES_GUEST_KERNEL_PVM` (`1`/`true`: the guest
    /// kernel is built with `CONFIG_PVM_GUEST`). Fails on a value it cannot parse.
    pub fn from_env() -> Result<Self, VmmError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut c = Self::new();
        if let Some(bin) = std::env::var_os("CAPSULES_QEMU_BIN").filter(|v| !v.is_empty()) {
            c.binary = Some(bin.into());
        }
        if let Some(a) = var("CAPSULES_QEMU_ACCEL")
            && !a.trim().eq_ignore_ascii_case("auto")
        {
            c.accel = Some(Accel::parse(&a).ok_or_else(|| {
                VmmError::HostUnsupported(format!(
                    "CAPSULES_QEMU_ACCEL={a:?} is not an accelerator; use kvm, tcg or auto"
                ))
            })?);
        }
        if let Some(p) = var("CAPSULES_GUEST_KERNEL_PVM") {
            c.guest_kernel_pvm = match p.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(VmmError::HostUnsupported(format!(
                        "CAPSULES_GUEST_KERNEL_PVM={p:?} is not a boolean; use 1 or 0"
                    )));
                }
            };
        }
        Ok(c)
    }

    /// The QEMU binary (default: `qemu-system-x86_64` on `PATH`).
    pub fn with_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Forces an accelerator (`None` = choose automatically).
    pub fn with_accel(mut self, accel: Option<Accel>) -> Self {
        self.accel = accel;
        self
    }

    /// The machine type (default `q35`: the Debian cloud kernel has VIRTIO_PCI built in).
    pub fn with_machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = machine.into();
        self
    }

    /// Declares the guest kernel PVM-enabled (`CONFIG_PVM_GUEST`), so KVM is used on a PVM host.
    /// This cannot be read from the kernel file.
    pub fn with_guest_kernel_pvm(mut self, pvm: bool) -> Self {
        self.guest_kernel_pvm = pvm;
        self
    }

    /// Extra arguments appended to every QEMU command line (default none).
    pub fn with_extra_args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.extra_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Boots the firmware only and ignores the kernel, initramfs and command line of every
    /// `VmConfig`: for testing the control plane (QMP, pause, snapshot, restore) on a host without
    /// guest assets. Off by default.
    pub fn with_firmware_boot(mut self, firmware_only: bool) -> Self {
        self.firmware_boot = firmware_only;
        self
    }

    /// How long `start`/`restore` wait for QMP to answer (default 15 s).
    pub fn with_start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// Deadline of one QMP command and of connecting the agent socket (default 15 s).
    pub fn with_command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// Deadline of writing or loading a memory snapshot (default 300 s).
    pub fn with_snapshot_timeout(mut self, d: Duration) -> Self {
        self.snapshot_timeout = d;
        self
    }

    /// The forced accelerator, if any.
    pub fn accel(&self) -> Option<Accel> {
        self.accel
    }

    /// The configured binary, if one was set.
    pub fn binary(&self) -> Option<&Path> {
        self.binary.as_deref()
    }
}

/// Finds the binary: the configured path, or `qemu-system-x86_64` on `PATH`.
pub(crate) fn resolve_binary(configured: Option<&Path>) -> Result<PathBuf, VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    match configured {
        Some(p) if p.components().count() > 1 => {
            if is_exec(p) {
                Ok(p.to_path_buf())
            } else {
                Err(VmmError::HostUnsupported(format!(
                    "the QEMU binary {} (CAPSULES_QEMU_BIN) does not exist or is not executable; \
                     fix the path or install QEMU with `{INSTALL_HINT}`",
                    p.display()
                )))
            }
        }
        other => {
            let name = other.map(Path::as_os_str).unwrap_or(DEFAULT_BINARY.as_ref());
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| is_exec(p))
                .ok_or_else(|| {
                    VmmError::HostUnsupported(format!(
                        "QEMU ({}) was not found on PATH; install it with `{INSTALL_HINT}` \
                         or set CAPSULES_QEMU_BIN",
                        Path::new(name).display()
                    ))
                })
        }
    }
}
