//! The host check: can this host's KVM run the configured guest kernel under Cloud Hypervisor?

use std::path::Path;

use capsules_microvm::vmm::{HostReport, VmmError};

use crate::config::GuestKernel;

const USE_QEMU: &str = "run capsules with the QEMU backend instead (--backend qemu, crate capsules-backend-qemu), \
                        which falls back to TCG";

/// Checks `/dev/kvm` (present, openable read-write) and the PVM case: under PVM (`kvm_pvm`
/// loaded) only a kernel built with `CONFIG_PVM_GUEST` boots, and that must be declared.
/// Reads no kernel file and starts nothing, so it answers in well under a second.
pub(crate) fn check(kvm: &Path, sys_module: &Path, kernel: &GuestKernel) -> Result<HostReport, VmmError> {
    if !kvm.exists() {
        return Err(VmmError::HostUnsupported(format!(
            "{} does not exist: this host has no KVM, which Cloud Hypervisor needs; {USE_QEMU}",
            kvm.display()
        )));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        let why = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "permission denied (add the user to the kvm group or run as root)".to_owned()
        } else {
            e.to_string()
        };
        return Err(VmmError::HostUnsupported(format!(
            "cannot open {}: {why}; Cloud Hypervisor needs KVM; or {USE_QEMU}",
            kvm.display()
        )));
    }
    let pvm = sys_module.join("kvm_pvm").exists();
    if pvm && !kernel.is_pvm() {
        let which = match kernel {
            GuestKernel::AssetCache(_) => "the Debian guest kernel from the asset cache".to_owned(),
            GuestKernel::File { path, .. } => format!("the guest kernel {}", path.display()),
        };
        return Err(VmmError::HostUnsupported(format!(
            "this host's KVM is PVM (kvm_pvm is loaded), which runs only guest kernels built with \
             CONFIG_PVM_GUEST, and {which} is not declared PVM-enabled (with_guest_kernel(path, true) or \
             CAPSULES_CH_KERNEL_PVM=1); {USE_QEMU}"
        )));
    }
    Ok(HostReport {
        accelerator: if pvm { "kvm (pvm)".into() } else { "kvm".into() },
        detail: if pvm {
            "Cloud Hypervisor on PVM KVM with a PVM-enabled guest kernel (snapshots are not supported on PVM)".into()
        } else {
            format!("Cloud Hypervisor on KVM ({})", kvm.display())
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_names_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let k = GuestKernel::AssetCache(dir.path().into());
        let e = check(&dir.path().join("kvm"), dir.path(), &k).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, VmmError::HostUnsupported(_)));
        assert!(m.contains("does not exist") && m.contains("--backend qemu"), "{m}");
    }

    #[test]
    fn pvm_needs_declared_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        let debian = GuestKernel::AssetCache(dir.path().into());
        let m = check(&kvm, dir.path(), &debian).unwrap_err().to_string();
        assert!(m.contains("PVM") && m.contains("capsules-backend-qemu"), "{m}");
        let user = GuestKernel::File {
            path: "/k".into(),
            pvm: false,
        };
        assert!(check(&kvm, dir.path(), &user).unwrap_err().to_string().contains("/k"));
        let pvm = GuestKernel::File {
            path: "/k".into(),
            pvm: true,
        };
        assert_eq!(check(&kvm, dir.path(), &pvm).unwrap().accelerator, "kvm (pvm)");
        std::fs::remove_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(check(&kvm, dir.path(), &debian).unwrap().accelerator, "kvm");
    }
}
