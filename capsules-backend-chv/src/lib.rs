//! The Cloud Hypervisor driver for capsules: a [`Vmm`](capsules_microvm::vmm::Vmm) that runs one
//! `cloud-hypervisor` process per capsule and controls it through its REST API socket.
//!
//! ```no_run
//! use capsules_backend_chv::ChvBuilder;
//! use capsules_microvm::vmm::Vmm;
//!
//! # async fn run(config: capsules_microvm::vmm::VmConfig) -> Result<(), capsules_microvm::vmm::VmmError> {
//! let vmm = ChvBuilder::from_env().build()?; // CAPSULES_CH_BIN or cloud-hypervisor on PATH
//! vmm.host_check()?; // fails fast (no KVM, no permission, PVM with a non-PVM kernel)
//! let vm = vmm.start(&config).await?; // spawn, wait for the API, vm.create, vm.boot
//! vm.pause().await?;
//! vm.snapshot(&config.state_dir.join("snapshot")).await?;
//! vm.stop(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # What one VM is
//! - `cloud-hypervisor --api-socket path=<state_dir>/ch.sock --seccomp true`, run as
//!   [`VmConfig::run_as`](capsules_microvm::vmm::VmConfig::run_as), in its own process group,
//!   stdout and stderr appended to `<state_dir>/ch.log`, pid in `<state_dir>/ch.pid`.
//! - `vm.create` with cpus, memory, payload (ELF vmlinux, initramfs, cmdline plus
//!   `capsules.channel=vsock:1024`), disks, one tap by name, hybrid vsock on
//!   `<state_dir>/vsock.sock`, serial to the serial log, console off; then `vm.boot`.
//! - The agent stream is the hybrid vsock handshake: `CONNECT 1024\n`, then `OK <port>\n`.
//! - Snapshots: `vm.snapshot` to `file://<dir>`, then every file fsynced; restore is a new process
//!   and `vm.restore` with `memory_restore_mode` (`OnDemand` by default) and `resume: false`.
//!
//! # The REST client
//! A thin client of our own (hyper 1's `client::conn::http1::handshake` over a tokio
//! `UnixStream`, one connection per call) rather than the generated `cloud-hypervisor-client`
//! crate: we use eleven endpoints with small bodies, the generated crate brings about a hundred
//! transitive crates, misnames `vm.nmi`, lags CH's newer models, and its types would tempt their
//! way into our API. The request bodies here are checked against CH's OpenAPI description by the
//! fake-CH tests. CH's error replies (a JSON list of messages, top error first) become a chain of
//! [`ChMessage`] sources under the driver's own error, each displaying only its own message.
//!
//! # Host check
//! [`Vmm::host_check`](capsules_microvm::vmm::Vmm::host_check) (also the first step of `start`
//! and `restore`) fails at once with `HostUnsupported` when `/dev/kvm` is missing or cannot be
//! opened, or when KVM is PVM (`/sys/module/kvm_pvm`) and the guest kernel is not declared
//! PVM-enabled; the message names the QEMU backend as the way to run on such a host.

mod api;
mod config;
mod driver;
mod host;
mod process;
mod vm;

pub use api::ChMessage;
pub use config::{ChvBuilder, GuestKernel, MemoryRestore};
pub use driver::ChvVmm;
