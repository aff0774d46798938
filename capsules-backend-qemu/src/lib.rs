//! The Capsules [`Vmm`] for QEMU (`qemu-system-x86_64`, Debian's `qemu-system-x86`): one QEMU
//! process per capsule, controlled over QMP.
//!
//! ```no_run
//! use capsules_backend_qemu::{QemuConfig, QemuVmm};
//! use capsules_microvm::vmm::Vmm;
//!
//! let vmm = QemuVmm::new(QemuConfig::from_env()?)?;
//! let report = vmm.host_check()?;
//! println!("QEMU will use {}: {}", report.accelerator, report.detail);
//! # Ok::<(), capsules_microvm::vmm::VmmError>(())
//! ```
//!
//! # How the accelerator is chosen
//! KVM when `/dev/kvm` opens read-write **and** KVM here can run the guest kernel: on a PVM host
//! (`/sys/module/kvm_pvm` exists) only kernels built with `CONFIG_PVM_GUEST` run, so KVM is used
//! there only when the configuration declares the kernel PVM-enabled
//! ([`QemuConfig::with_guest_kernel_pvm`], `CAPSULES_GUEST_KERNEL_PVM=1`); otherwise TCG (software
//! emulation). `CAPSULES_QEMU_ACCEL=kvm|tcg` or [`QemuConfig::with_accel`] force a choice; forcing
//! KVM where it cannot run the guest fails at once with [`VmmError::HostUnsupported`] instead of a
//! guest that crashes a minute into boot. [`Vmm::host_check`] reports the choice and why. Under TCG
//! the guest runs with `-cpu max` and `tsc_early_khz=<host TSC kHz>` appended to its command line
//! (clock calibration sometimes hangs without it); under KVM with `-cpu host,-arch-capabilities`.
//!
//! # Devices
//! `-M q35` with virtio-pci devices (the Debian cloud kernel has VIRTIO_PCI built in): disks as
//! `virtio-blk-pci` in order (`/dev/vda`, `/dev/vdb`, …; read-only ones with `readonly=on`), the
//! tap as `virtio-net-pci`, the serial console (ttyS0) appended to the serial log, and the agent
//! channel. The agent channel is a virtio-serial port named [`AGENT_PORT_NAME`] whose host end is
//! the unix socket `<state_dir>/agent.sock`. virtio-serial rather than vhost-user-vsock because
//! QEMU marks vhost-user-vsock unmigratable, and snapshots are migrations. QEMU serves one client
//! on that socket at a time (a second one would sit unaccepted in the backlog), so
//! [`VmHandle::agent_stream`] first waits (QMP `query-chardev`) until the previous stream is closed
//! — failing with a clear error after the command timeout — and returns only once QEMU has
//! accepted the new one.
//!
//! Disks are opened by the host and passed as fdsets (`-add-fd`; writable disks with an `O_RDWR`
//! and an `O_RDONLY` descriptor, since QEMU opens images both ways) with `file.locking=off`:
//! QEMU's image locks conflict between those two descriptors when it re-activates a disk after a
//! snapshot. Instead `start` refuses to run a second QEMU for a state directory whose pid file names
//! a live one.
//!
//! # Snapshots
//! [`VmHandle::snapshot`] pauses the VM if needed, raises the migration `max-bandwidth`, creates
//! `<dir>/memory.qemu` on the host, hands the open descriptor to QEMU with QMP `getfd`
//! (`SCM_RIGHTS`), runs `migrate fd:…`, polls `query-migrate` until `completed` (or fails with
//! QEMU's `error-desc` in the source chain; a QEMU that dies fails it at once), then fsyncs the file,
//! writes `qemu-snapshot.json` and fsyncs the directory. [`Vmm::restore`] opens the file on the host,
//! lets the new QEMU inherit it and starts it with the same devices plus `-S -incoming fd:N`, and
//! returns when `query-status` says `paused`: the VM stays paused until the caller resumes it.
//! (`exec:` migration is killed by the sandbox's `spawn=deny`, and QEMU 7.2 has no `file:` URI.)
//!
//! # Privileges
//! QEMU is started directly as `VmConfig::run_as` (`setgroups`/`setgid`/`setuid` before exec; QEMU's
//! own `-runas` is killed by its sandbox), in its own process group, with
//! `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny` (seccomp).
//! The host opens every file QEMU writes or reads from the state directory — disks, the serial log,
//! snapshots — and passes descriptors (`-add-fd`, `getfd`, inherited fds), so the VMM user needs no
//! access to them; it needs write access only to the state directory (for its sockets and pid file;
//! `start` makes the directory its own) and read access to the kernel and initramfs.

mod args;
mod backend;
mod config;
mod error;
mod handle;
mod host;
mod process;
mod qmp;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capsules_microvm::vmm::{HostReport, KernelFormat, VmConfig, VmHandle, Vmm, VmmError};
use serde_json::json;

pub use args::{AGENT_PORT_NAME, SNAPSHOT_FILE, SNAPSHOT_META};
pub use backend::{QemuBackend, backend_from_env};
pub use config::{DEFAULT_BINARY, QemuConfig};
pub use handle::QemuHandle;
pub use host::Accel;

use args::{AGENT_SOCK, Fds, PIDFILE, QEMU_LOG, QMP_SOCK, Settings};
use error::process;
use handle::exited_error;

/// The QEMU driver: one value per backend, one QEMU process per capsule.
#[derive(Debug)]
pub struct QemuVmm {
    config: QemuConfig,
    binary: PathBuf,
    version: String,
    accel: Accel,
    tsc_khz: u64,
}

impl QemuVmm {
    /// Finds the binary and chooses the accelerator. Fails with [`VmmError::HostUnsupported`] when
    /// QEMU is missing (saying `apt-get install qemu-system-x86`) or when a forced accelerator
    /// cannot run the guest here.
    pub fn new(config: QemuConfig) -> Result<Self, VmmError> {
        let binary = config::resolve_binary(config.binary.as_deref())?;
        let out = std::process::Command::new(&binary)
            .arg("--version")
            .output()
            .map_err(|e| VmmError::io(format!("run {} --version", binary.display()), e))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        if !out.status.success() || !version.starts_with("QEMU emulator version") {
            return Err(VmmError::HostUnsupported(format!(
                "{} --version did not report a QEMU version ({:?}); install QEMU with `{}`",
                binary.display(),
                version,
                config::INSTALL_HINT
            )));
        }
        let choice =
            host::choose(&host::probe(), config.accel, config.guest_kernel_pvm).map_err(VmmError::HostUnsupported)?;
        Ok(Self {
            binary,
            version,
            accel: choice.accel,
            tsc_khz: host::tsc_khz(),
            config,
        })
    }

    /// The accelerator guests run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `QEMU emulator version …` as the binary reports it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The full QEMU command line (without the binary) `start` would run for `vm`, with the
    /// descriptor numbers shown as placeholders — for logs and debugging.
    pub fn command_line(&self, vm: &VmConfig, restore: bool) -> Vec<String> {
        let fds = Fds {
            disks: vm
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let base = 10 + 2 * i as RawFd;
                    if d.read_only { vec![base] } else { vec![base, base + 1] }
                })
                .collect(),
            serial: 9,
            incoming: restore.then_some(8),
            tap: None,
        };
        args::build(vm, &self.settings(), &fds)
    }

    fn settings(&self) -> Settings<'_> {
        Settings {
            accel: self.accel,
            machine: &self.config.machine,
            tsc_khz: self.tsc_khz,
            firmware_boot: self.config.firmware_boot,
            extra_args: &self.config.extra_args,
        }
    }

    /// Spawns QEMU for `vm` (restoring from `incoming` when set) and waits until QMP answers.
    async fn launch(&self, vm: &VmConfig, incoming: Option<&Path>) -> Result<QemuHandle, VmmError> {
        let started = Instant::now();
        if self.accel == Accel::Kvm
            && let Some((uid, gid)) = vm.run_as
            && !host::kvm_accessible_by(uid, gid)
        {
            return Err(VmmError::HostUnsupported(format!(
                "the VMM user {uid}:{gid} cannot open /dev/kvm; add it to the kvm group, or use \
                 CAPSULES_QEMU_ACCEL=tcg"
            )));
        }
        if vm.vcpus == 0 || vm.memory_mib == 0 {
            return Err(process(format!(
                "invalid VM size for {}: {} vCPUs, {} MiB",
                vm.id, vm.vcpus, vm.memory_mib
            )));
        }
        let phase = if incoming.is_some() { "restore" } else { "start" };
        prepare_state_dir(vm)?;
        let state = &vm.state_dir;

        // Every file QEMU touches outside its sockets is opened here and passed by descriptor.
        let mut keep: Vec<File> = Vec::new();
        let mut fds = Fds::default();
        for d in &vm.disks {
            let mut set = Vec::new();
            if !d.read_only {
                let rw = open(&d.path, true, false)?;
                set.push(rw.as_raw_fd());
                keep.push(rw);
            }
            let ro = open(&d.path, false, false)?;
            set.push(ro.as_raw_fd());
            keep.push(ro);
            fds.disks.push(set);
        }
        let serial = open(&vm.serial_log, true, true)?;
        fds.serial = serial.as_raw_fd();
        keep.push(serial);
        if let Some(tap) = &vm.tap {
            let f = open_tap(&tap.name)?;
            fds.tap = Some(f.as_raw_fd());
            keep.push(f);
        }
        if let Some(dir) = incoming {
            let snap = dir.join(SNAPSHOT_FILE);
            let f = File::open(&snap)
                .map_err(|e| VmmError::io(format!("open the snapshot {} to restore it", snap.display()), e))?;
            fds.incoming = Some(f.as_raw_fd());
            keep.push(f);
        }
        let argv = args::build(vm, &self.settings(), &fds);
        let log_path = state.join(QEMU_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| VmmError::io(format!("open the QEMU log {}", log_path.display()), e))?;
        {
            use std::io::Write;
            let _ = writeln!(
                &log,
                "--- capsules: {} QEMU for {} ({}) ---",
                if incoming.is_some() { "restoring" } else { "starting" },
                vm.id,
                self.accel
            );
        }
        tracing::debug!(id = %vm.id, binary = %self.binary.display(), args = ?argv, "spawning QEMU");
        let spawned = process::spawn(
            process::SpawnSpec {
                binary: &self.binary,
                args: &argv,
                inherit: keep.iter().map(AsRawFd::as_raw_fd).collect(),
                run_as: vm.run_as,
                log,
            },
            log_path.clone(),
        )?;
        drop(keep);

        let qmp_path = state.join(QMP_SOCK);
        let deadline = started + self.config.start_timeout;
        let mut exit_rx = spawned.exit.clone();
        let qmp = loop {
            if let Some(exit) = exit_rx.borrow().clone() {
                return Err(exited_error(&format!("QEMU exited during {phase} of {}", vm.id), &exit));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let _ = process::pidfd_kill(&spawned.pidfd, libc::SIGKILL);
                return Err(VmmError::Timeout(
                    "waiting for QEMU's QMP socket",
                    self.config.start_timeout,
                ));
            }
            match qmp::Qmp::connect(&qmp_path, remaining, self.config.command_timeout).await {
                Ok(q) => break q,
                Err(error::QmpError::Io(_)) => {
                    // Not listening yet: wait for the next attempt or for QEMU to exit.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                        _ = exit_rx.changed() => {}
                    }
                }
                Err(e) => {
                    // QEMU closing the monitor during the handshake usually means it is exiting.
                    let exit = tokio::time::timeout(Duration::from_secs(2), exit_rx.wait_for(Option::is_some))
                        .await
                        .ok()
                        .and_then(|r| r.ok().and_then(|v| v.clone()));
                    if let Some(exit) = exit {
                        return Err(exited_error(&format!("QEMU exited during {phase} of {}", vm.id), &exit));
                    }
                    let _ = process::pidfd_kill(&spawned.pidfd, libc::SIGKILL);
                    return Err(error::qmp("qmp_capabilities", e));
                }
            }
        };
        tracing::info!(id = %vm.id, pid = spawned.pid, accel = %self.accel, elapsed = ?started.elapsed(), "QEMU QMP ready");
        Ok(QemuHandle {
            id: vm.id.clone(),
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            state_dir: state.clone(),
            qmp,
            exit: spawned.exit,
            supervisor: spawned.supervisor,
            command_timeout: self.config.command_timeout,
            snapshot_timeout: self.config.snapshot_timeout,
            meta: self.meta(vm),
            op: tokio::sync::Mutex::new(()),
        })
    }

    fn meta(&self, vm: &VmConfig) -> serde_json::Value {
        json!({
            "qemu_version": self.version,
            "machine": self.config.machine,
            "accel": self.accel.as_str(),
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "disks": vm.disks.len(),
            "tap": vm.tap.is_some(),
        })
    }

    /// Refuses a restore whose recorded machine shape differs from `vm`'s (QEMU would fail
    /// with a less clear message, or not at all for a different memory size).
    fn check_snapshot_meta(&self, vm: &VmConfig, dir: &Path) -> Result<(), VmmError> {
        let path = dir.join(SNAPSHOT_META);
        let Ok(raw) = std::fs::read(&path) else {
            return Ok(());
        };
        let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            return Ok(());
        };
        let want = self.meta(vm);
        for key in ["machine", "vcpus", "memory_mib", "disks", "tap"] {
            if meta.get(key).is_some() && meta.get(key) != want.get(key) {
                return Err(process(format!(
                    "the snapshot in {} was taken with {key} = {}, but this VM has {}; restore it with the \
                     configuration it was taken with, or boot the capsule cold",
                    dir.display(),
                    meta[key],
                    want[key]
                )));
            }
        }
        Ok(())
    }
}

fn open(path: &Path, write: bool, append: bool) -> Result<File, VmmError> {
    let mut o = std::fs::OpenOptions::new();
    if append {
        // The serial log: O_WRONLY|O_APPEND, as QEMU's `append=on` file chardev opens it.
        o.append(true).create(true).mode(0o640);
    } else {
        o.read(true).write(write);
    }
    o.open(path).map_err(|e| {
        VmmError::io(
            format!(
                "open {} for QEMU ({})",
                path.display(),
                if write { "read-write" } else { "read-only" }
            ),
            e,
        )
    })
}

/// Creates the state directory, makes it the VMM user's (it creates its sockets and pid file
/// there), and removes stale sockets. Refuses when a live QEMU already runs for it.
fn prepare_state_dir(vm: &VmConfig) -> Result<(), VmmError> {
    let state = &vm.state_dir;
    std::fs::create_dir_all(state)
        .map_err(|e| VmmError::io(format!("create the state directory {}", state.display()), e))?;
    if let Some((pid, _)) = process::live_qemu(state) {
        return Err(process(format!(
            "a QEMU (pid {pid}) already runs for {}; adopt or stop it first",
            state.display()
        )));
    }
    if let Some((uid, gid)) = vm.run_as {
        std::os::unix::fs::chown(state, Some(uid), Some(gid))
            .map_err(|e| VmmError::io(format!("give {} to the VMM user {uid}:{gid}", state.display()), e))?;
    }
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| VmmError::io(format!("set the mode of {}", state.display()), e))?;
    for name in [QMP_SOCK, AGENT_SOCK, PIDFILE] {
        match std::fs::remove_file(state.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(VmmError::io(
                    format!("remove the stale {}", state.join(name).display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn host_check(&self) -> Result<HostReport, VmmError> {
        config::resolve_binary(Some(&self.binary))?;
        let choice = host::choose(&host::probe(), self.config.accel, self.config.guest_kernel_pvm)
            .map_err(VmmError::HostUnsupported)?;
        let mut detail = format!("{}; {}", choice.detail, self.version);
        if choice.accel == Accel::Tcg {
            detail.push_str(&format!("; guest TSC {} kHz", self.tsc_khz));
        }
        Ok(HostReport {
            accelerator: match (choice.accel, host::probe().pvm) {
                (Accel::Kvm, true) => "kvm (pvm)".into(),
                (a, _) => a.as_str().into(),
            },
            detail,
        })
    }

    fn kernel_format(&self) -> KernelFormat {
        KernelFormat::BzImage
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>, VmmError> {
        Ok(Box::new(self.launch(config, None).await?))
    }

    async fn restore(&self, config: &VmConfig, snapshot_dir: &Path) -> Result<Box<dyn VmHandle>, VmmError> {
        self.check_snapshot_meta(config, snapshot_dir)?;
        let started = Instant::now();
        let handle = self.launch(config, Some(snapshot_dir)).await?;
        if let Err(e) = handle.wait_incoming(self.config.snapshot_timeout).await {
            let _ = handle.stop(Duration::ZERO).await;
            return Err(e);
        }
        tracing::info!(id = %config.id, pid = handle.pid, elapsed = ?started.elapsed(), "QEMU snapshot restored (paused)");
        Ok(Box::new(handle))
    }

    async fn adopt(&self, config: &VmConfig) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        let state = &config.state_dir;
        let Some((pid, pidfd)) = process::live_qemu(state) else {
            return Ok(None);
        };
        let log_path = state.join(QEMU_LOG);
        let (exit, supervisor) = process::supervise_foreign(&pidfd, log_path)?;
        let qmp = qmp::Qmp::connect(
            &state.join(QMP_SOCK),
            self.config.start_timeout,
            self.config.command_timeout,
        )
        .await
        .map_err(|e| {
            error::control(
                format!("could not reconnect QMP of the live QEMU (pid {pid}) for {}", config.id),
                e,
            )
        })?;
        tracing::info!(id = %config.id, pid, "adopted QEMU");
        Ok(Some(Box::new(QemuHandle {
            id: config.id.clone(),
            pid,
            pidfd,
            state_dir: state.clone(),
            qmp,
            exit,
            supervisor,
            command_timeout: self.config.command_timeout,
            snapshot_timeout: self.config.snapshot_timeout,
            meta: self.meta(config),
            op: tokio::sync::Mutex::new(()),
        })))
    }
}

/// Opens `/dev/net/tun` and attaches it to the capsule's existing tap (created by
/// `capsules-microvm`), with a virtio-net header, for QEMU to inherit: the unprivileged VMM user
/// then needs no access to `/dev/net/tun`.
fn open_tap(name: &str) -> Result<File, VmmError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(process(format!("tap name {name:?} is not a valid interface name")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| {
            VmmError::io(
                "open /dev/net/tun to attach the capsule's tap (needs root or CAP_NET_ADMIN)",
                e,
            )
        })?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) that `req` provides.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(VmmError::io(
            format!("attach to tap {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_is_send_sync_debug() {
        fn assert<T: Send + Sync + std::fmt::Debug + 'static>() {}
        assert::<QemuVmm>();
        assert::<QemuHandle>();
        let _: Option<Box<dyn Vmm>> = None::<Box<QemuVmm>>.map(|b| b as Box<dyn Vmm>);
    }

    #[test]
    fn missing_binary_says_how_to_install() {
        let e = QemuVmm::new(QemuConfig::new().with_binary("/nonexistent/qemu-system-x86_64")).unwrap_err();
        assert!(matches!(e, VmmError::HostUnsupported(_)));
        assert!(e.to_string().contains("apt-get install qemu-system-x86"), "{e}");
        let e = config::resolve_binary(Some(Path::new("qemu-system-nothing-here"))).unwrap_err();
        assert!(e.to_string().contains("apt-get install qemu-system-x86"), "{e}");
    }

    #[test]
    fn run_states() {
        use capsules_microvm::vmm::VmRunState as S;
        assert_eq!(handle::run_state("running"), S::Running);
        assert_eq!(handle::run_state("paused"), S::Paused);
        assert_eq!(handle::run_state("postmigrate"), S::Paused);
        assert_eq!(handle::run_state("prelaunch"), S::Created);
        assert_eq!(handle::run_state("inmigrate"), S::Created);
        assert_eq!(handle::run_state("shutdown"), S::Shutdown);
        assert_eq!(handle::run_state("guest-panicked"), S::Shutdown);
    }
}
