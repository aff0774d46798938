//! The QEMU command line for one capsule VM (pure: unit-tested without QEMU).

use std::os::fd::RawFd;
use std::path::Path;

use capsules_microvm::vmm::VmConfig;

use crate::host::Accel;

/// The sandbox every QEMU runs under (seccomp; `spawn=deny` is why `-runas` and `exec:` migration
/// cannot be used).
pub(crate) const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The virtio-serial port name the guest agent opens (`/dev/virtio-ports/org.capsules.agent`).
pub const AGENT_PORT_NAME: &str = "org.capsules.agent";

/// File names inside the VM's state directory.
pub(crate) const QMP_SOCK: &str = "qmp.sock";
pub(crate) const AGENT_SOCK: &str = "agent.sock";
pub(crate) const PIDFILE: &str = "qemu.pid";
pub(crate) const QEMU_LOG: &str = "qemu.log";
/// The memory snapshot inside a snapshot directory.
pub const SNAPSHOT_FILE: &str = "memory.qemu";
/// Facts about the snapshot (QEMU version, machine, size) inside a snapshot directory.
pub const SNAPSHOT_META: &str = "qemu-snapshot.json";

/// fdset ids: disks use 1.., the serial console uses this one.
const SERIAL_FDSET: usize = 100;

/// Descriptors the host opened for QEMU (inherited by the child under these numbers).
#[derive(Debug, Clone, Default)]
pub(crate) struct Fds {
    /// Per disk, in order: the descriptors of its fdset (read-only disks one `O_RDONLY`, writable
    /// disks an `O_RDWR` and an `O_RDONLY` one, since QEMU opens images both ways).
    pub disks: Vec<Vec<RawFd>>,
    /// The serial log, opened `O_WRONLY|O_APPEND`.
    pub serial: RawFd,
    /// The snapshot to restore from (`-incoming fd:N`).
    pub incoming: Option<RawFd>,
    /// The capsule's tap, attached by the host (`TUNSETIFF`), so QEMU needs no access to
    /// `/dev/net/tun`. `None` (command-line previews) names the tap instead.
    pub tap: Option<RawFd>,
}

/// Resolved settings that shape the command line.
#[derive(Debug, Clone)]
pub(crate) struct Settings<'a> {
    pub accel: Accel,
    pub machine: &'a str,
    pub tsc_khz: u64,
    pub firmware_boot: bool,
    pub extra_args: &'a [String],
}

/// QEMU option values escape `,` by doubling it.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn p(path: &Path) -> String {
    esc(&path.to_string_lossy())
}

/// The kernel command line: the given one, plus `tsc_early_khz=` under TCG (without it clock
/// calibration sometimes hangs there) unless it is already set.
pub(crate) fn kernel_cmdline(cmdline: &str, accel: Accel, tsc_khz: u64) -> String {
    if accel == Accel::Tcg && !cmdline.split_whitespace().any(|w| w.starts_with("tsc_early_khz=")) {
        let sep = if cmdline.trim().is_empty() { "" } else { " " };
        format!("{}{sep}tsc_early_khz={tsc_khz}", cmdline.trim_end())
    } else {
        cmdline.to_owned()
    }
}

pub(crate) fn build(vm: &VmConfig, s: &Settings<'_>, fds: &Fds) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let state = &vm.state_dir;
    push(&["-name", &format!("guest={},debug-threads=on", esc(&vm.id))]);
    push(&["-sandbox", SANDBOX]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-machine", &format!("{},smm=off,vmport=off", esc(s.machine))]);
    push(&["-accel", s.accel.as_str()]);
    match s.accel {
        // PVM (and some hosts) refuse the arch-capabilities MSR that `host` would pass through.
        Accel::Kvm => push(&["-cpu", "host,-arch-capabilities"]),
        // cx16=off: QEMU 7.2's TCG corrupts memory on `cmpxchg16b` with a %gs prefix (SLUB's
        // per-CPU fast path), which crashed about every second boot of the 6.12 guest with double
        // faults and garbage RFLAGS; without CX16 the kernel takes its lock-based path.
        Accel::Tcg => push(&["-cpu", "max,cx16=off"]),
    }
    push(&["-smp", &vm.vcpus.to_string()]);
    push(&["-m", &format!("{}M", vm.memory_mib)]);
    push(&["-rtc", "base=utc"]);
    if !s.firmware_boot {
        push(&["-kernel", &p(&vm.kernel)]);
        push(&["-initrd", &p(&vm.initramfs)]);
        push(&["-append", &kernel_cmdline(&vm.cmdline, s.accel, s.tsc_khz)]);
    }
    for (i, disk) in vm.disks.iter().enumerate() {
        let set = i + 1;
        for fd in fds.disks.get(i).map(Vec::as_slice).unwrap_or(&[]) {
            push(&["-add-fd", &format!("fd={fd},set={set}")]);
        }
        // file.locking=off: QEMU's image locks conflict between the two descriptors of a
        // writable disk's fdset when it re-activates the image after a snapshot (`cont` then fails
        // with "Failed to get shared write lock"). One QEMU per state directory is enforced here
        // instead (pid file check before every start).
        let mode = if disk.read_only {
            "readonly=on,file.locking=off"
        } else {
            "discard=unmap,file.locking=off"
        };
        push(&[
            "-drive",
            &format!("file=/dev/fdset/{set},format=raw,if=none,id=disk{i},{mode}"),
        ]);
        push(&["-device", &format!("virtio-blk-pci,drive=disk{i},id=vd{i}")]);
    }
    if let Some(tap) = &vm.tap {
        push(&[
            "-netdev",
            &match fds.tap {
                Some(fd) => format!("tap,id=n0,fd={fd},vhost=off"),
                None => format!("tap,id=n0,ifname={},script=no,downscript=no", esc(&tap.name)),
            },
        ]);
        push(&["-device", &format!("virtio-net-pci,netdev=n0,mac={}", esc(&tap.mac))]);
    }
    push(&["-add-fd", &format!("fd={},set={SERIAL_FDSET}", fds.serial)]);
    push(&[
        "-chardev",
        &format!("file,id=console,path=/dev/fdset/{SERIAL_FDSET},append=on"),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-chardev",
        &format!("socket,id=agent,path={},server=on,wait=off", p(&state.join(AGENT_SOCK))),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,name={AGENT_PORT_NAME},chardev=agent"),
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&state.join(QMP_SOCK)))]);
    push(&["-pidfile", &state.join(PIDFILE).to_string_lossy()]);
    if let Some(fd) = fds.incoming {
        // -S: stay paused after the incoming migration; the caller resumes.
        push(&["-S", "-incoming", &format!("fd:{fd}")]);
    }
    a.extend(s.extra_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsules_microvm::vmm::{DiskConfig, TapConfig};

    fn vm() -> VmConfig {
        VmConfig {
            id: "cap_1,x".into(),
            vcpus: 2,
            memory_mib: 2048,
            kernel: "/cache/vmlinuz".into(),
            initramfs: "/cache/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            disks: vec![
                DiskConfig {
                    path: "/cache/base.ext4".into(),
                    read_only: true,
                },
                DiskConfig {
                    path: "/s/data.ext4".into(),
                    read_only: false,
                },
            ],
            tap: Some(TapConfig {
                name: "captap0".into(),
                mac: "52:54:00:12:34:56".into(),
            }),
            state_dir: "/s".into(),
            serial_log: "/s/serial.log".into(),
            run_as: None,
        }
    }

    fn settings(accel: Accel) -> Settings<'static> {
        Settings {
            accel,
            machine: "q35",
            tsc_khz: 2_596_142,
            firmware_boot: false,
            extra_args: &[],
        }
    }

    #[test]
    fn command_line() {
        let fds = Fds {
            disks: vec![vec![10], vec![11, 12]],
            serial: 13,
            incoming: None,
            tap: None,
        };
        let a = build(&vm(), &settings(Accel::Tcg), &fds).join(" ");
        let with_fd = build(
            &vm(),
            &settings(Accel::Tcg),
            &Fds {
                tap: Some(14),
                ..fds.clone()
            },
        )
        .join(" ");
        assert!(with_fd.contains("-netdev tap,id=n0,fd=14,vhost=off"), "{with_fd}");
        for want in [
            "-name guest=cap_1,,x,debug-threads=on",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-accel tcg -cpu max,cx16=off -smp 2 -m 2048M",
            "-append console=ttyS0 quiet tsc_early_khz=2596142",
            "-add-fd fd=10,set=1 -drive file=/dev/fdset/1,format=raw,if=none,id=disk0,readonly=on,file.locking=off",
            "-add-fd fd=11,set=2 -add-fd fd=12,set=2 -drive file=/dev/fdset/2,format=raw,if=none,id=disk1,discard=unmap,file.locking=off",
            "-netdev tap,id=n0,ifname=captap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-chardev socket,id=agent,path=/s/agent.sock,server=on,wait=off",
            "virtserialport,bus=vser0.0,name=org.capsules.agent,chardev=agent",
            "-qmp unix:/s/qmp.sock,server=on,wait=off -pidfile /s/qemu.pid",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(!a.contains("-incoming"));
        let a = build(
            &vm(),
            &settings(Accel::Kvm),
            &Fds {
                incoming: Some(20),
                ..fds
            },
        )
        .join(" ");
        assert!(a.contains("-accel kvm -cpu host,-arch-capabilities"), "{a}");
        assert!(a.contains("-append console=ttyS0 quiet -add-fd"), "{a}");
        assert!(a.ends_with("-S -incoming fd:20"), "{a}");
    }

    #[test]
    fn tsc_is_added_once() {
        assert_eq!(kernel_cmdline("a", Accel::Tcg, 5), "a tsc_early_khz=5");
        assert_eq!(kernel_cmdline("", Accel::Tcg, 5), "tsc_early_khz=5");
        assert_eq!(kernel_cmdline("a tsc_early_khz=7", Accel::Tcg, 5), "a tsc_early_khz=7");
        assert_eq!(kernel_cmdline("a", Accel::Kvm, 5), "a");
    }
}
