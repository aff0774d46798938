//! Initramfs init: load modules, mount disks, assemble the overlay, switch root, exec the agent in
//! `guest` mode. Owned by the guest-image work.
//!
//! Runs as PID 1 from the initramfs built by `capsules_microvm::assets`. The initramfs holds:
//! `/init` (this binary), `/dev/console`, `/dev/null`, and the kernel modules in
//! `/lib/modules/capsules/` with a file `order` listing them, dependencies first.
//!
//! Kernel command line (shared with the guest mode and the VMM backends):
//! `capsules.base=/dev/vda capsules.data=/dev/vdb capsules.hostname=NAME ...`; this stage reads only
//! `capsules.base` and `capsules.data` (defaults `/dev/vda`, `/dev/vdb`).
//!
//! Layout handed to the guest mode after the switch:
//! - `/` is an overlay: lower = the read-only base ext4, upper/work = `upper/` and `work/` on the
//!   data disk.
//! - `/run` is a tmpfs; `/run/capsules/agent` is a copy of this binary (exec'd as `capsules-agent guest`).
//! - `/run/capsules/base` is the base fs (read-only), `/run/capsules/data` the data fs (read-write),
//!   kept reachable so the agent can `syncfs` / remount it read-only at shutdown.
//! - `/dev` (devtmpfs), `/proc`, `/sys` are already mounted.
//!
//! Every failure prints `capsules-init: <what failed>: <error>` on the console and powers the VM
//! off, so a broken image ends the VM instead of looping or hanging.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

/// Where the modules and their load order live inside the initramfs.
const MODULE_DIR: &str = "/lib/modules/capsules";
/// How long to wait for the base and data block devices to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// Where the agent binary is copied in the new root (on a tmpfs).
const AGENT_IN_NEWROOT: &str = "/newroot/run/capsules/agent";
/// The agent path after the switch.
const AGENT_PATH: &str = "/run/capsules/agent";

/// A failed step: what failed, and why.
struct Failure {
    what: String,
    err: io::Error,
}

type Step<T = ()> = Result<T, Failure>;

/// Attaches a description of the step to an error.
trait Context<T> {
    fn what(self, what: impl FnOnce() -> String) -> Step<T>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn what(self, what: impl FnOnce() -> String) -> Step<T> {
        self.map_err(|e| Failure {
            what: what(),
            err: e.into(),
        })
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Entry point of `capsules-agent init` (and of the binary run as `/init`). Never returns.
pub fn run() -> ! {
    if std::process::id() != 1 {
        // Never mount or switch root on a host by accident.
        eprintln!("capsules-init: refusing to run: not PID 1 (this mode is the initramfs /init)");
        std::process::exit(2);
    }
    // A panic (already printed by the default hook) must not kill PID 1: that panics the kernel.
    match std::panic::catch_unwind(stage) {
        Ok(Ok(never)) => match never {},
        Ok(Err(f)) => eprintln!("capsules-init: {}: {}", f.what, f.err),
        Err(_) => eprintln!("capsules-init: internal error: the init panicked"),
    }
    power_off()
}

fn power_off() -> ! {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on error; PID 1 must not exit (that would panic the kernel).
    eprintln!("capsules-init: power off failed; halting");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

enum Never {}

fn stage() -> Step<Never> {
    let t0 = Instant::now();
    mount_early()?;
    let cmdline = fs::read_to_string("/proc/cmdline").what(|| "read /proc/cmdline".into())?;
    let base = cmdline_value(&cmdline, "capsules.base")
        .unwrap_or("/dev/vda")
        .to_owned();
    let data = cmdline_value(&cmdline, "capsules.data")
        .unwrap_or("/dev/vdb")
        .to_owned();

    load_modules(&cmdline)?;
    wait_for_device(&base)?;
    wait_for_device(&data)?;

    mkdir_p("/mnt/base")?;
    mkdir_p("/mnt/data")?;
    mkdir_p("/newroot")?;
    mount_fs(
        &base,
        "/mnt/base",
        "ext4",
        MsFlags::MS_RDONLY | MsFlags::MS_NOATIME,
        None,
    )?;
    mount_fs(&data, "/mnt/data", "ext4", MsFlags::MS_NOATIME, None)?;
    mkdir_p("/mnt/data/upper")?;
    mkdir_p("/mnt/data/work")?;
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/mnt/base,upperdir=/mnt/data/upper,workdir=/mnt/data/work"),
    )?;

    // /run: a fresh tmpfs holding the agent and the two disk mounts.
    mkdir_p("/newroot/run")?;
    mount_fs(
        "tmpfs",
        "/newroot/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mkdir_p("/newroot/run/capsules/base")?;
    mkdir_p("/newroot/run/capsules/data")?;
    copy_agent()?;
    move_mount("/mnt/base", "/newroot/run/capsules/base")?;
    move_mount("/mnt/data", "/newroot/run/capsules/data")?;
    for dir in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{dir}");
        mkdir_p(&target)?;
        move_mount(&format!("/{dir}"), &target)?;
    }

    // Free the initramfs RAM (the kernel never releases rootfs itself), then switch root.
    let root_dev = fs::symlink_metadata("/").what(|| "stat /".into())?.dev();
    delete_tree(Path::new("/"), root_dev);
    switch_root()?;

    eprintln!(
        "capsules-init: switching root ({} ms in init)",
        t0.elapsed().as_millis()
    );
    exec_agent()
}

fn mount_early() -> Step {
    for (src, target, fstype, flags) in [
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
    ] {
        mkdir_p(target)?;
        match mount(Some(src), target, Some(fstype), flags, None::<&str>) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => {
                return Err(Failure {
                    what: format!("mount {fstype} on {target}"),
                    err: errno(e),
                });
            }
        }
    }
    Ok(())
}

/// The value of `key=value` on the kernel command line (last one wins, like the kernel).
fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// Module file names from the `order` file, in load order.
fn module_order(order: &str) -> Vec<&str> {
    order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Parameters for module `module` from `module.param=value` words on the kernel command line (what
/// modprobe would pass; the kernel itself does not for modules loaded later), e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`. `-` and `_` are the same in module names.
fn module_params(cmdline: &str, module: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let module = norm(module);
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| {
            let (m, param) = w.split_once('.')?;
            (norm(m) == module && !param.is_empty()).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_modules(cmdline: &str) -> Step {
    let order_path = format!("{MODULE_DIR}/order");
    let order = fs::read_to_string(&order_path).what(|| format!("read {order_path}"))?;
    for name in module_order(&order) {
        let path = format!("{MODULE_DIR}/{name}");
        let file = fs::File::open(&path).what(|| format!("open module {path}"))?;
        let module = name.split('.').next().unwrap_or(name);
        let params = CString::new(module_params(cmdline, module)).unwrap_or_default();
        let params: &CStr = &params;
        // SAFETY: finit_module(2) with a valid open fd, a NUL-terminated parameter string and no
        // flags; it reads the module from the fd and does not retain our pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(Failure {
                    what: format!("load module {name}"),
                    err,
                });
            }
        }
    }
    Ok(())
}

fn wait_for_device(dev: &str) -> Step {
    let start = Instant::now();
    loop {
        match fs::metadata(dev) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() >= DEVICE_WAIT => {
                return Err(Failure {
                    what: format!("block device {dev} did not appear within {} s", DEVICE_WAIT.as_secs()),
                    err: e,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn mkdir_p(path: &str) -> Step {
    fs::create_dir_all(path).what(|| format!("mkdir {path}"))
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Step {
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(errno)
        .what(|| format!("mount {src} ({fstype}) on {target}"))
}

fn move_mount(from: &str, to: &str) -> Step {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(errno)
        .what(|| format!("move mount {from} to {to}"))
}

fn copy_agent() -> Step {
    // /proc/self/exe is the binary we run from, whatever the initramfs called it.
    fs::copy("/proc/self/exe", AGENT_IN_NEWROOT).what(|| format!("copy the agent to {AGENT_IN_NEWROOT}"))?;
    fs::set_permissions(AGENT_IN_NEWROOT, fs::Permissions::from_mode(0o755))
        .what(|| format!("chmod {AGENT_IN_NEWROOT}"))
}

/// Removes everything on the initramfs (device `root_dev`) except mount points of other
/// filesystems (`/newroot`). Best effort: a leftover only costs RAM.
fn delete_tree(dir: &Path, root_dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != root_dev {
            continue;
        }
        if meta.is_dir() {
            if path.as_os_str().as_bytes() == b"/newroot" {
                continue;
            }
            delete_tree(&path, root_dev);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The classic switch_root: make /newroot the root of the mount tree and of this process.
fn switch_root() -> Step {
    std::env::set_current_dir("/newroot").what(|| "chdir /newroot".into())?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(errno)
        .what(|| "move /newroot to /".into())?;
    nix::unistd::chroot(".")
        .map_err(errno)
        .what(|| "chroot to the new root".into())?;
    std::env::set_current_dir("/").what(|| "chdir / in the new root".into())
}

fn exec_agent() -> Step<Never> {
    let path = CString::new(AGENT_PATH).expect("no NUL in a constant");
    let args = [c"capsules-agent".to_owned(), c"guest".to_owned()];
    let err = nix::unistd::execv(&path, &args).unwrap_err();
    Err(Failure {
        what: format!("exec {AGENT_PATH} guest"),
        err: errno(err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "console=ttyS0 capsules.base=/dev/vda capsules.data=/dev/vdc capsules.data=/dev/vdb x\n";
        assert_eq!(cmdline_value(c, "capsules.base"), Some("/dev/vda"));
        assert_eq!(cmdline_value(c, "capsules.data"), Some("/dev/vdb"));
        assert_eq!(cmdline_value(c, "capsules.hostname"), None);
        assert_eq!(cmdline_value(c, "console"), Some("ttyS0"));
    }

    #[test]
    fn module_params_from_cmdline() {
        let c = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 \
                 overlay.metacopy=N capsules.base=/dev/vda";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(c, "overlay"), "metacopy=N");
        assert_eq!(module_params(c, "virtio_blk"), "");
    }

    #[test]
    fn order_skips_blank_and_comments() {
        assert_eq!(
            module_order("# deps first\nfailover.ko\n\n net_failover.ko \n"),
            vec!["failover.ko", "net_failover.ko"]
        );
    }
}
