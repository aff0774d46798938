//! Configuration of a [`MicroVmBackend`](super::MicroVmBackend): state directory, VMM user,
//! capacity, timeouts and the agent channel.

use std::path::PathBuf;
use std::time::Duration;

use capsules_core::{Error, Result};

/// Default state directory (override with `CAPSULES_STATE_DIR` or the builder).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/capsules";

/// Default name of the unprivileged system user VMM processes run as (when the host process is root).
pub const DEFAULT_VMM_USER: &str = "capsules-vmm";

/// Which unprivileged user VMM processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmUser {
    /// The host process's own user (tests; or an already unprivileged host process).
    Current,
    /// These numeric ids.
    Ids {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
    /// A system user by name, created (`useradd --system`) when missing and the host process is root.
    System(String),
}

impl Default for VmmUser {
    /// `System("capsules-vmm")` when the host process is root, else `Current` (it is already
    /// unprivileged, and only root can switch users).
    fn default() -> Self {
        if nix::unistd::geteuid().is_root() {
            VmmUser::System(DEFAULT_VMM_USER.to_owned())
        } else {
            VmmUser::Current
        }
    }
}

impl VmmUser {
    /// Resolves to `(uid, gid)` (`None` for `Current`), creating a missing system user.
    pub(crate) fn resolve(&self) -> Result<Option<(u32, u32)>> {
        match self {
            VmmUser::Current => Ok(None),
            VmmUser::Ids { uid, gid } => Ok(Some((*uid, *gid))),
            VmmUser::System(name) => {
                let lookup = |name: &str| {
                    nix::unistd::User::from_name(name)
                        .map_err(|e| Error::internal(format!("could not look up the VMM user {name:?}")).with_source(e))
                };
                if let Some(u) = lookup(name)? {
                    return Ok(Some((u.uid.as_raw(), u.gid.as_raw())));
                }
                if !nix::unistd::geteuid().is_root() {
                    return Err(Error::invalid_input(format!(
                        "the VMM user {name:?} does not exist and only root can create it; create it or configure VmmUser::Current"
                    )));
                }
                let out = std::process::Command::new("useradd")
                    .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
                    .args(["--shell", "/usr/sbin/nologin", name])
                    .output()
                    .map_err(|e| {
                        Error::internal(format!("could not run useradd to create the VMM user {name:?}")).with_source(e)
                    })?;
                if !out.status.success() {
                    return Err(
                        Error::internal(format!("useradd could not create the VMM user {name:?}")).with_source(
                            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
                        ),
                    );
                }
                match lookup(name)? {
                    Some(u) => Ok(Some((u.uid.as_raw(), u.gid.as_raw()))),
                    None => Err(Error::internal(format!(
                        "the VMM user {name:?} is missing right after useradd created it"
                    ))),
                }
            }
        }
    }
}

/// What the host can give to running capsules. Sleeping capsules hold no guest RAM.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Host vCPUs available to guests.
    pub vcpus: u32,
    /// Host memory available to guests, MiB.
    pub memory_mib: u64,
    /// Running guests may add up to `factor × vcpus` vCPUs and `factor × memory_mib` memory.
    pub overcommit: f64,
    /// Refuse a create, wake or sleep when the state directory's filesystem cannot hold a memory
    /// snapshot of the guest (plus [`Capacity::disk_reserve_mib`]).
    pub check_snapshot_disk: bool,
    /// Free disk kept beyond one snapshot, MiB.
    pub disk_reserve_mib: u64,
}

impl Capacity {
    /// The host's online CPUs and total memory, overcommit 1.0, snapshot disk checked.
    pub fn from_host() -> Self {
        let vcpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(1024);
        Capacity {
            vcpus,
            memory_mib,
            overcommit: 1.0,
            check_snapshot_disk: true,
            disk_reserve_mib: 256,
        }
    }

    /// [`Capacity::from_host`], overridden by `CAPSULES_CAPACITY_VCPUS` (vCPUs for guests),
    /// `CAPSULES_CAPACITY_MEMORY_MIB` (guest memory, MiB), `CAPSULES_CAPACITY_OVERCOMMIT` (factor,
    /// e.g. `1.5`) and `CAPSULES_CAPACITY_DISK_RESERVE_MIB` (free disk kept beyond one snapshot).
    /// An unparsable or out-of-range value is `InvalidInput` naming the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Capacity::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        fn parse<T: std::str::FromStr>(k: &str, v: &str, what: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::invalid_input(format!("{k}={v:?} is not {what}")))
        }
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let mut c = Capacity::from_host();
        if let Some(v) = get("CAPSULES_CAPACITY_VCPUS") {
            c.vcpus = parse("CAPSULES_CAPACITY_VCPUS", &v, "a whole number of vCPUs (at least 1)")?;
            if c.vcpus == 0 {
                return Err(Error::invalid_input("CAPSULES_CAPACITY_VCPUS must be at least 1"));
            }
        }
        if let Some(v) = get("CAPSULES_CAPACITY_MEMORY_MIB") {
            c.memory_mib = parse(
                "CAPSULES_CAPACITY_MEMORY_MIB",
                &v,
                "a whole number of MiB (at least 1024)",
            )?;
            if c.memory_mib < 1024 {
                return Err(Error::invalid_input(
                    "CAPSULES_CAPACITY_MEMORY_MIB must be at least 1024 (the smallest size, 1x1gb)",
                ));
            }
        }
        if let Some(v) = get("CAPSULES_CAPACITY_OVERCOMMIT") {
            let f: f64 = parse("CAPSULES_CAPACITY_OVERCOMMIT", &v, "a factor such as 1.5")?;
            if !(1.0..=16.0).contains(&f) {
                return Err(Error::invalid_input(format!(
                    "CAPSULES_CAPACITY_OVERCOMMIT={v:?} must be between 1 and 16"
                )));
            }
            c.overcommit = f;
        }
        if let Some(v) = get("CAPSULES_CAPACITY_DISK_RESERVE_MIB") {
            c.disk_reserve_mib = parse("CAPSULES_CAPACITY_DISK_RESERVE_MIB", &v, "a whole number of MiB")?;
        }
        Ok(c)
    }

    /// Exactly this much, no overcommit (tests).
    pub fn exactly(vcpus: u32, memory_mib: u64) -> Self {
        Capacity {
            vcpus,
            memory_mib,
            overcommit: 1.0,
            check_snapshot_disk: true,
            disk_reserve_mib: 0,
        }
    }

    pub(crate) fn max_vcpus(&self) -> u64 {
        (f64::from(self.vcpus) * self.overcommit).floor() as u64
    }
    pub(crate) fn max_memory_mib(&self) -> u64 {
        (self.memory_mib as f64 * self.overcommit).floor() as u64
    }
}

/// Deadlines on every wait of the backend. Under TCG they are multiplied by `tcg_factor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// From `Vmm::start`/`restore` until the agent answers.
    pub boot: Duration,
    /// One unary agent call (stat, mkdir, spawn, quiesce, set_clock, ...) or opening a stream.
    pub call: Duration,
    /// Writing a memory snapshot.
    pub snapshot: Duration,
    /// Graceful VMM shutdown before it is killed.
    pub stop_grace: Duration,
    /// Multiplier applied when the VMM reports a TCG (software-emulated) accelerator.
    pub tcg_factor: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            boot: Duration::from_secs(60),
            call: Duration::from_secs(30),
            snapshot: Duration::from_secs(300),
            stop_grace: Duration::from_secs(5),
            tcg_factor: 3,
        }
    }
}

impl Timeouts {
    pub(crate) fn scaled(&self, tcg: bool) -> Timeouts {
        if !tcg {
            return self.clone();
        }
        let f = self.tcg_factor.max(1);
        Timeouts {
            boot: self.boot * f,
            call: self.call * f,
            snapshot: self.snapshot * f,
            stop_grace: self.stop_grace,
            tcg_factor: self.tcg_factor,
        }
    }
}

/// How the guest agent is reached, told to the guest as `capsules.channel=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChannel {
    /// A virtio-serial port (QEMU: survives migration).
    VirtioSerial,
    /// vsock on this port (Cloud Hypervisor's hybrid vsock).
    Vsock(u32),
}

impl AgentChannel {
    /// The command-line value.
    pub fn cmdline_value(self) -> String {
        match self {
            AgentChannel::VirtioSerial => "virtio-serial".to_owned(),
            AgentChannel::Vsock(port) => format!("vsock:{port}"),
        }
    }

    /// The channel a VMM of this name uses: `qemu` → virtio-serial, `cloud-hypervisor` → vsock:1024.
    pub fn for_vmm(name: &str) -> Option<AgentChannel> {
        match name {
            "qemu" => Some(AgentChannel::VirtioSerial),
            "cloud-hypervisor" | "chv" => Some(AgentChannel::Vsock(1024)),
            _ => None,
        }
    }
}

/// The state directory from `CAPSULES_STATE_DIR`, else [`DEFAULT_STATE_DIR`].
pub fn state_dir_from_env() -> PathBuf {
    std::env::var_os("CAPSULES_STATE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_timeouts() {
        let c = Capacity {
            overcommit: 1.5,
            ..Capacity::exactly(4, 4096)
        };
        assert_eq!((c.max_vcpus(), c.max_memory_mib()), (6, 6144));
        let t = Timeouts::default().scaled(true);
        assert_eq!(t.boot, Duration::from_secs(180));
        assert_eq!(AgentChannel::Vsock(1024).cmdline_value(), "vsock:1024");
        assert!(Capacity::from_host().vcpus >= 1);
    }

    #[test]
    fn capacity_from_vars() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let c = Capacity::from_vars(vars(&[
            ("CAPSULES_CAPACITY_VCPUS", "2"),
            ("CAPSULES_CAPACITY_MEMORY_MIB", "2048"),
            ("CAPSULES_CAPACITY_OVERCOMMIT", "1.5"),
            ("CAPSULES_CAPACITY_DISK_RESERVE_MIB", "0"),
        ]))
        .unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.disk_reserve_mib), (2, 2048, 0));
        assert_eq!((c.max_vcpus(), c.max_memory_mib()), (3, 3072));
        assert_eq!(Capacity::from_vars(|_| None).unwrap(), Capacity::from_host());
        for bad in [
            &[("CAPSULES_CAPACITY_VCPUS", "0")][..],
            &[("CAPSULES_CAPACITY_VCPUS", "two")],
            &[("CAPSULES_CAPACITY_MEMORY_MIB", "512")],
            &[("CAPSULES_CAPACITY_OVERCOMMIT", "0.5")],
            &[("CAPSULES_CAPACITY_OVERCOMMIT", "NaN")],
        ] {
            let e = Capacity::from_vars(vars(bad)).unwrap_err();
            assert_eq!(e.kind(), capsules_core::ErrorKind::InvalidInput);
            assert!(e.message().contains(bad[0].0), "{e}");
        }
    }
}
