//! [`QemuBackend`]: the capsules `Backend` for QEMU — the generic microVM backend of
//! `capsules-microvm` (disks, taps and nftables, the agent, sleep/wake, recovery) over [`QemuVmm`].

use std::sync::Arc;

use capsules_core::{Error, Result};
use capsules_microvm::backend::{Capacity, MicroVmBackend};
use capsules_microvm::net::{NetConfig, Network};
use capsules_microvm::vmm::VmmError;

use crate::{QemuConfig, QemuVmm};

/// The QEMU backend: `MicroVmBackend<QemuVmm>`.
pub type QemuBackend = MicroVmBackend<QemuVmm>;

/// Maps a driver error met while setting the backend up.
fn setup_error(e: VmmError) -> Error {
    match e {
        VmmError::HostUnsupported(m) => Error::unsupported(m),
        other => Error::internal("could not set up the QEMU driver").with_source(other),
    }
}

/// Builds the QEMU backend from the environment: the driver from `CAPSULES_QEMU_*`
/// ([`QemuConfig::from_env`]), capsule networking from `CAPSULES_NET_*` (taps, nftables and the DNS
/// forwarder: needs root or CAP_NET_ADMIN), the host capacity from `CAPSULES_CAPACITY_*`
/// ([`Capacity::from_env`]), the state directory from `CAPSULES_STATE_DIR`
/// (default `/var/lib/capsules`) and the guest assets from `CAPSULES_ASSET_DIR` (default
/// `/var/cache/capsules`, built on first use). Capsules left by an earlier process on the same
/// state directory are recovered (adopted, asleep or failed).
pub async fn backend_from_env() -> Result<QemuBackend> {
    let vmm = QemuVmm::new(QemuConfig::from_env().map_err(setup_error)?).map_err(setup_error)?;
    let net = Network::new(NetConfig::from_env()?).await?;
    MicroVmBackend::builder(vmm)
        .from_env()
        .capacity(Capacity::from_env()?)
        .network(Arc::new(net))
        .build()
        .await
}
