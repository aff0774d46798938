//! [`ChvVmm`]: the [`Vmm`] for Cloud Hypervisor.

use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use capsules_microvm::vmm::{HostReport, KernelFormat, VmConfig, VmHandle, Vmm, VmmError};

use crate::api::{self, ApiClient};
use crate::config::{ChvConfig, GuestKernel};
use crate::process::{self, Spawn, StatePaths};
use crate::vm::{AGENT_VSOCK_PORT, ChvVm};

/// The guest CID of every VM: each VM has its own hybrid-vsock socket, so CIDs need not differ.
const GUEST_CID: u64 = 3;

/// The Cloud Hypervisor driver: one `cloud-hypervisor` process per capsule, controlled over its
/// REST API socket. Build it with [`ChvBuilder`](crate::ChvBuilder).
#[derive(Debug, Clone)]
pub struct ChvVmm {
    config: ChvConfig,
}

impl ChvVmm {
    pub(crate) fn from_config(config: ChvConfig) -> Self {
        ChvVmm { config }
    }

    /// The `cloud-hypervisor` binary this driver starts.
    pub fn binary(&self) -> &Path {
        &self.config.binary
    }

    /// The configured guest kernel. A user-supplied kernel file replaces [`VmConfig::kernel`]
    /// in [`Vmm::start`], so what boots is what the host check judged.
    pub fn guest_kernel(&self) -> &GuestKernel {
        &self.config.kernel
    }

    fn client(&self, paths: &StatePaths) -> ApiClient {
        ApiClient::new(&paths.api_socket, self.config.api_timeout)
    }

    /// Prepares the state directory and starts the process with its API answering.
    async fn launch(&self, config: &VmConfig) -> Result<ChvVm, VmmError> {
        let dir = &config.state_dir;
        if !dir.is_absolute() {
            return Err(VmmError::Control {
                message: format!("the VM state directory {} must be an absolute path", dir.display()),
                source: None,
            });
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| VmmError::io(format!("create the VM state directory {}", dir.display()), e))?;
        let paths = StatePaths::new(dir);
        keep_serial_log(&config.serial_log)?;
        if let Some((uid, gid)) = config.run_as {
            // The VMM binds its sockets here and opens the serial log as that user.
            chown(dir, uid, gid)?;
            touch(&config.serial_log)?;
            chown(&config.serial_log, uid, gid)?;
        }
        let client = self.client(&paths);
        let t0 = Instant::now();
        let sup = process::spawn(
            Spawn {
                binary: &self.config.binary,
                paths: &paths,
                run_as: config.run_as,
                verbose: self.config.verbose,
                id: &config.id,
            },
            &client,
            self.config.start_timeout,
        )
        .await?;
        tracing::debug!(capsule = %config.id, elapsed = ?t0.elapsed(), "cloud-hypervisor started");
        Ok(ChvVm {
            id: config.id.clone(),
            client,
            sup,
            paths,
            snapshot_timeout: self.config.snapshot_timeout,
            agent_timeout: self.config.agent_timeout,
        })
    }

    fn vm_body(&self, config: &VmConfig, paths: &StatePaths) -> Result<api::VmConfigBody, VmmError> {
        let kernel = self.config.kernel.file().unwrap_or(&config.kernel);
        // An empty initramfs path means none (a test guest needs none).
        let initramfs = (!config.initramfs.as_os_str().is_empty()).then_some(config.initramfs.as_path());
        for (what, p) in std::iter::once(("guest kernel", kernel)).chain(initramfs.map(|i| ("initramfs", i))) {
            if !p.is_file() {
                return Err(VmmError::Control {
                    message: format!("the {what} {} does not exist (run the asset setup first)", p.display()),
                    source: None,
                });
            }
        }
        let mut cmdline = config.cmdline.trim().to_owned();
        if !cmdline.contains("capsules.channel=") {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("capsules.channel=vsock:{AGENT_VSOCK_PORT}"));
        }
        Ok(api::VmConfigBody {
            cpus: api::CpusBody {
                boot_vcpus: config.vcpus,
                max_vcpus: config.vcpus,
            },
            memory: api::MemoryBody {
                size: config.memory_mib * 1024 * 1024,
            },
            payload: api::PayloadBody {
                kernel: path_str(kernel)?,
                initramfs: initramfs.map(path_str).transpose()?,
                cmdline,
            },
            disks: config
                .disks
                .iter()
                .map(|d| {
                    Ok(api::DiskBody {
                        path: path_str(&d.path)?,
                        readonly: d.read_only,
                    })
                })
                .collect::<Result<_, VmmError>>()?,
            net: config
                .tap
                .iter()
                .map(|t| api::NetBody {
                    tap: t.name.clone(),
                    mac: t.mac.clone(),
                })
                .collect(),
            vsock: api::VsockBody {
                cid: GUEST_CID,
                socket: path_str(&paths.vsock_socket)?,
            },
            serial: api::ConsoleBody {
                mode: "File",
                file: Some(path_str(&config.serial_log)?),
            },
            console: api::ConsoleBody {
                mode: "Off",
                file: None,
            },
        })
    }
}

#[async_trait]
impl Vmm for ChvVmm {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn host_check(&self) -> Result<HostReport, VmmError> {
        crate::host::check(
            &self.config.kvm_device,
            &self.config.sys_module_dir,
            &self.config.kernel,
        )
    }

    fn kernel_format(&self) -> KernelFormat {
        KernelFormat::ElfVmlinux
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>, VmmError> {
        self.host_check()?;
        let paths = StatePaths::new(&config.state_dir);
        // Checked before spawning so a bad config leaves no process behind.
        let body = self.vm_body(config, &paths)?;
        let vm = self.launch(config).await?;
        let booted = async {
            vm.guarded("create the VM", vm.client.create(&body)).await?;
            vm.guarded("boot the VM", vm.client.boot()).await
        }
        .await;
        if let Err(e) = booted {
            vm.kill_and_clean().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn restore(&self, config: &VmConfig, snapshot_dir: &Path) -> Result<Box<dyn VmHandle>, VmmError> {
        self.host_check()?;
        if !snapshot_dir.is_absolute() || !snapshot_dir.is_dir() {
            return Err(VmmError::Control {
                message: format!("the snapshot directory {} does not exist", snapshot_dir.display()),
                source: None,
            });
        }
        let vm = self.launch(config).await?;
        let url = format!("file://{}", snapshot_dir.display());
        let mode = self.config.memory_restore.api_name();
        let restored = vm
            .guarded(
                "restore the VM",
                vm.client.restore(&url, mode, self.config.snapshot_timeout),
            )
            .await;
        if let Err(e) = restored {
            vm.kill_and_clean().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn adopt(&self, config: &VmConfig) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        let paths = StatePaths::new(&config.state_dir);
        let Some(sup) = process::adopt(&self.config.binary, &paths) else {
            return Ok(None);
        };
        let client = self.client(&paths);
        let vm = ChvVm {
            id: config.id.clone(),
            client,
            sup,
            paths,
            snapshot_timeout: self.config.snapshot_timeout,
            agent_timeout: self.config.agent_timeout,
        };
        // A live process whose API does not answer is not adoptable: leave it to the caller's
        // cleanup (it is still reported by pid through `exited`).
        let deadline = Duration::from_secs(2);
        match tokio::time::timeout(deadline, vm.client.ping()).await {
            Ok(Ok(_)) => Ok(Some(Box::new(vm))),
            Ok(Err(e)) => Err(VmmError::Control {
                message: format!(
                    "the live cloud-hypervisor {} of capsule {} does not answer its API",
                    vm.sup.pid(),
                    vm.id
                ),
                source: Some(Box::new(e)),
            }),
            Err(_) => Err(VmmError::Timeout("pinging an adopted cloud-hypervisor", deadline)),
        }
    }
}

/// CH truncates the serial file when it opens it (boot and restore alike), so what an earlier VMM
/// of this capsule wrote is first appended to `<serial_log>.old`.
fn keep_serial_log(serial: &Path) -> Result<(), VmmError> {
    let Ok(old) = std::fs::read(serial) else {
        return Ok(());
    };
    if old.is_empty() {
        return Ok(());
    }
    let mut keep = serial.as_os_str().to_owned();
    keep.push(".old");
    let keep = std::path::PathBuf::from(keep);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&keep)
        .map_err(|e| VmmError::io(format!("open {}", keep.display()), e))?;
    std::io::Write::write_all(&mut f, &old).map_err(|e| VmmError::io(format!("append to {}", keep.display()), e))?;
    std::fs::write(serial, b"").map_err(|e| VmmError::io(format!("truncate {}", serial.display()), e))
}

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str().map(str::to_owned).ok_or_else(|| VmmError::Control {
        message: format!(
            "the path {} is not UTF-8, which the Cloud Hypervisor API needs",
            p.display()
        ),
        source: None,
    })
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .map_err(|e| VmmError::io(format!("give {} to uid {uid}", p.display()), e))
}

fn touch(p: &Path) -> Result<(), VmmError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map(drop)
        .map_err(|e| VmmError::io(format!("create {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_log_is_kept_across_vmms() {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        keep_serial_log(&serial).unwrap(); // none yet
        std::fs::write(&serial, b"first boot\n").unwrap();
        keep_serial_log(&serial).unwrap();
        std::fs::write(&serial, b"second boot\n").unwrap();
        keep_serial_log(&serial).unwrap();
        let old = std::fs::read_to_string(dir.path().join("serial.log.old")).unwrap();
        assert_eq!(old, "first boot\nsecond boot\n");
        assert_eq!(std::fs::read(&serial).unwrap(), b"");
    }
}
