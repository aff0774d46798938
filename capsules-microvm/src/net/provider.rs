//! [`Network`] as the generic backend's [`NetworkProvider`]: the allocation travels in
//! [`NetAttachment::detail`] (the backend persists it in the capsule's record), so no `net.json` is
//! written on this path.

use async_trait::async_trait;
use capsules_core::Result;
use capsules_core::types::{CapsuleId, NetworkPolicy};

use super::{CapsuleNet, HostLink, Network};
use crate::backend::{NetAttachment, NetworkProvider};

/// The attachment the backend records for a capsule's network.
pub fn attachment(net: &CapsuleNet) -> NetAttachment {
    NetAttachment {
        tap: net.tap_name.clone(),
        mac: net.mac.clone(),
        cmdline: net.kernel_cmdline(),
        detail: serde_json::to_value(net).unwrap_or_default(),
    }
}

fn net_of(id: &CapsuleId, a: &NetAttachment) -> Result<CapsuleNet> {
    let net: CapsuleNet = serde_json::from_value(a.detail.clone()).map_err(|e| {
        capsules_core::Error::internal(format!(
            "the network attachment recorded for capsule {} is unreadable ({e}); terminate and recreate the capsule",
            id.as_str()
        ))
    })?;
    if net.capsule_id != id.as_str() {
        return Err(capsules_core::Error::internal(format!(
            "the network attachment recorded for capsule {} belongs to {}",
            id.as_str(),
            net.capsule_id
        )));
    }
    Ok(net)
}

#[async_trait]
impl NetworkProvider for Network {
    async fn setup(&self, id: &CapsuleId, policy: &NetworkPolicy, owner: Option<(u32, u32)>) -> Result<NetAttachment> {
        let net = self
            .setup_capsule_with(id.as_str(), None, policy, HostLink::Tap, owner)
            .await?;
        Ok(attachment(&net))
    }

    async fn apply(&self, id: &CapsuleId, attachment: &NetAttachment, policy: &NetworkPolicy) -> Result<()> {
        if self.get(id.as_str()).await.is_none() {
            // Not adopted yet (e.g. a sleeping capsule after a restart): bring it back first.
            self.adopt_net(net_of(id, attachment)?, policy).await?;
        }
        Ok(Network::apply(self, id.as_str(), policy).await?)
    }

    async fn teardown(&self, id: &CapsuleId, _attachment: &NetAttachment) -> Result<()> {
        Ok(Network::teardown(self, id.as_str()).await?)
    }

    async fn adopt(&self, id: &CapsuleId, attachment: &NetAttachment, policy: &NetworkPolicy) -> Result<()> {
        self.adopt_net(net_of(id, attachment)?, policy).await?;
        Ok(())
    }

    async fn sweep(&self, keep: &[CapsuleId]) -> Result<()> {
        let keep: Vec<&str> = keep.iter().map(|k| k.as_str()).collect();
        Network::sweep(self, &keep).await?;
        Ok(())
    }
}
