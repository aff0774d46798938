//! Host facts: which accelerator can run the guest, the TSC frequency, `/dev/kvm` access.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware (or PVM) virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: works on every host, several times slower.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm` / `tcg` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the host offers, read once by [`probe`]. Kept as data so the choice is unit-testable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostFacts {
    /// `/dev/kvm` exists and opens read-write for this process.
    pub kvm_usable: bool,
    /// Why not, when it is not.
    pub kvm_problem: Option<String>,
    /// `/sys/module/kvm_pvm` exists: KVM here is PVM and runs only PVM-enabled guest kernels.
    pub pvm: bool,
}

pub(crate) fn probe() -> HostFacts {
    let (kvm_usable, kvm_problem) = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => (true, None),
        Err(e) => (false, Some(format!("/dev/kvm cannot be opened ({e})"))),
    };
    HostFacts {
        kvm_usable,
        kvm_problem,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// The decision: which accelerator, and a sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub accel: Accel,
    pub detail: String,
}

/// Chooses the accelerator. `forced` comes from `CAPSULES_QEMU_ACCEL` or the builder; `guest_pvm`
/// says the configured guest kernel is built with `CONFIG_PVM_GUEST`.
pub(crate) fn choose(facts: &HostFacts, forced: Option<Accel>, guest_pvm: bool) -> Result<Choice, String> {
    let kvm_runs_guest = facts.kvm_usable && (!facts.pvm || guest_pvm);
    match forced {
        Some(Accel::Tcg) => Ok(Choice {
            accel: Accel::Tcg,
            detail: "TCG software emulation, as configured".into(),
        }),
        Some(Accel::Kvm) if kvm_runs_guest => Ok(Choice {
            accel: Accel::Kvm,
            detail: if facts.pvm {
                "KVM (PVM) as configured; the guest kernel is declared PVM-enabled".into()
            } else {
                "KVM as configured".into()
            },
        }),
        Some(Accel::Kvm) if !facts.kvm_usable => Err(format!(
            "QEMU was configured to use KVM, but {}; use CAPSULES_QEMU_ACCEL=tcg (software emulation) \
             or give this user access to /dev/kvm",
            facts.kvm_problem.as_deref().unwrap_or("/dev/kvm is not usable")
        )),
        Some(Accel::Kvm) => Err("QEMU was configured to use KVM, but /dev/kvm on this host is PVM \
             (kvm_pvm is loaded), which runs only guest kernels built with CONFIG_PVM_GUEST, and the guest kernel \
             is not declared PVM-enabled (Debian kernels crash under it after about a minute); use \
             CAPSULES_QEMU_ACCEL=tcg, or declare a PVM-enabled kernel with guest_kernel_pvm"
            .into()),
        None if kvm_runs_guest => Ok(Choice {
            accel: Accel::Kvm,
            detail: if facts.pvm {
                "KVM (PVM): /dev/kvm is usable and the guest kernel is declared PVM-enabled".into()
            } else {
                "KVM: /dev/kvm is usable".into()
            },
        }),
        None if facts.kvm_usable => Ok(Choice {
            accel: Accel::Tcg,
            detail: "TCG software emulation: /dev/kvm here is PVM (kvm_pvm is loaded), which runs only guest \
                     kernels built with CONFIG_PVM_GUEST, and the guest kernel is not declared PVM-enabled"
                .into(),
        }),
        None => Ok(Choice {
            accel: Accel::Tcg,
            detail: format!(
                "TCG software emulation: {}",
                facts.kvm_problem.as_deref().unwrap_or("/dev/kvm is not usable")
            ),
        }),
    }
}

/// Default when the host TSC frequency cannot be read.
pub(crate) const DEFAULT_TSC_KHZ: u64 = 2_000_000;

/// The host TSC frequency in kHz: `tsc_freq_khz` in sysfs where the kernel exposes it, else the first
/// `cpu MHz` of `/proc/cpuinfo`, else [`DEFAULT_TSC_KHZ`].
pub(crate) fn tsc_khz() -> u64 {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        && let Ok(k) = s.trim().parse::<u64>()
        && k > 0
    {
        return k;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| tsc_khz_from_cpuinfo(&s))
        .unwrap_or(DEFAULT_TSC_KHZ)
}

pub(crate) fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz = line.split(':').nth(1)?.trim();
    let (int, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    let int: u64 = int.parse().ok()?;
    // kHz = MHz * 1000, from the decimal digits without going through floats.
    let mut frac3: String = frac.chars().take(3).collect();
    while frac3.len() < 3 {
        frac3.push('0');
    }
    let frac: u64 = frac3.parse().ok()?;
    let khz = int * 1000 + frac;
    (khz > 0).then_some(khz)
}

/// Whether `uid`/`gid` may open `/dev/kvm` read-write (mode bits; ACLs are not considered).
pub(crate) fn kvm_accessible_by(uid: u32, gid: u32) -> bool {
    let Ok(m) = std::fs::metadata("/dev/kvm") else {
        return false;
    };
    let mode = m.mode();
    uid == 0
        || (m.uid() == uid && mode & 0o600 == 0o600)
        || (m.gid() == gid && mode & 0o060 == 0o060)
        || mode & 0o006 == 0o006
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm: bool, pvm: bool) -> HostFacts {
        HostFacts {
            kvm_usable: kvm,
            kvm_problem: (!kvm).then(|| "/dev/kvm cannot be opened (No such file or directory)".into()),
            pvm,
        }
    }

    #[test]
    fn automatic_choice() {
        assert_eq!(choose(&facts(true, false), None, false).unwrap().accel, Accel::Kvm);
        let c = choose(&facts(true, true), None, false).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.detail.contains("PVM"), "{}", c.detail);
        assert_eq!(choose(&facts(true, true), None, true).unwrap().accel, Accel::Kvm);
        let c = choose(&facts(false, false), None, false).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.detail.contains("/dev/kvm"), "{}", c.detail);
    }

    #[test]
    fn forced_choice() {
        assert_eq!(
            choose(&facts(true, false), Some(Accel::Tcg), false).unwrap().accel,
            Accel::Tcg
        );
        let e = choose(&facts(true, true), Some(Accel::Kvm), false).unwrap_err();
        assert!(e.contains("PVM") && e.contains("CAPSULES_QEMU_ACCEL=tcg"), "{e}");
        let e = choose(&facts(false, false), Some(Accel::Kvm), false).unwrap_err();
        assert!(e.contains("/dev/kvm"), "{e}");
        assert_eq!(
            choose(&facts(true, true), Some(Accel::Kvm), true).unwrap().accel,
            Accel::Kvm
        );
    }

    #[test]
    fn cpuinfo_mhz() {
        assert_eq!(
            tsc_khz_from_cpuinfo("processor\t: 0\ncpu MHz\t\t: 2596.142\n"),
            Some(2_596_142)
        );
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 2.5\n"), Some(2_500));
        assert_eq!(tsc_khz_from_cpuinfo("nothing"), None);
        assert_eq!(Accel::parse(" TCG "), Some(Accel::Tcg));
        assert_eq!(Accel::parse("hvf"), None);
    }
}
