//! The builder of [`MicroVmBackend`]: defaults, setters, and `build()` (host check, VMM user,
//! recovery of the state directory).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use capsules_core::{Error, Result};

use super::{
    AgentChannel, AgentConnector, AssetSource, Capacity, DEFAULT_STATE_DIR, Inner, MicroVmBackend, NetworkProvider,
    ProtocolAgent, Timeouts, Usage, VmmUser, io_err, state_dir_from_env, vmm_err,
};
use crate::vmm::Vmm;

/// Builds a [`MicroVmBackend`]: `MicroVmBackend::builder(vmm)`, `with_*`/setters, then `build().await`
/// (which runs recovery on the state directory).
pub struct MicroVmBackendBuilder<V: Vmm> {
    pub(crate) vmm: V,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) assets: Option<Arc<dyn AssetSource>>,
    pub(crate) net: Option<Arc<dyn NetworkProvider>>,
    pub(crate) agent: Option<Arc<dyn AgentConnector>>,
    pub(crate) vmm_user: Option<VmmUser>,
    pub(crate) capacity: Option<Capacity>,
    pub(crate) timeouts: Timeouts,
    pub(crate) channel: Option<Option<AgentChannel>>,
}

impl<V: Vmm> std::fmt::Debug for MicroVmBackendBuilder<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmBackendBuilder")
            .field("vmm", &self.vmm)
            .field("state_dir", &self.state_dir)
            .field("vmm_user", &self.vmm_user)
            .field("capacity", &self.capacity)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl<V: Vmm> MicroVmBackendBuilder<V> {
    /// State directory (default [`DEFAULT_STATE_DIR`]).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Reads `CAPSULES_STATE_DIR` (state directory) and the asset settings of
    /// [`AssetBuilder::from_env`](crate::assets::AssetBuilder::from_env).
    pub fn from_env(mut self) -> Self {
        self.state_dir = Some(state_dir_from_env());
        self
    }

    /// Where guest assets come from (default: [`crate::assets::Assets`] from the environment).
    pub fn assets(mut self, assets: Arc<dyn AssetSource>) -> Self {
        self.assets = Some(assets);
        self
    }

    /// The host network layer (taps, nftables, DNS forwarder). Without one, capsules have no
    /// network device at all and `apply_network` is `Unsupported`.
    pub fn network(mut self, net: Arc<dyn NetworkProvider>) -> Self {
        self.net = Some(net);
        self
    }

    /// No network layer (tests; hosts without CAP_NET_ADMIN). This is the default.
    pub fn no_network(mut self) -> Self {
        self.net = None;
        self
    }

    /// How agent sessions are opened (default: [`ProtocolAgent`]).
    pub fn agent_connector(mut self, agent: Arc<dyn AgentConnector>) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The user VMM processes run as (default: [`VmmUser::default`]).
    pub fn vmm_user(mut self, user: VmmUser) -> Self {
        self.vmm_user = Some(user);
        self
    }

    /// Host capacity (default: [`Capacity::from_host`]).
    pub fn capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Deadlines (default: [`Timeouts::default`], scaled under TCG).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The `capsules.channel=` the guest is told (default: [`AgentChannel::for_vmm`]; `None`
    /// leaves it to the driver's own command-line fragment).
    pub fn agent_channel(mut self, channel: Option<AgentChannel>) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Checks the host, resolves the VMM user, and recovers every capsule under the state
    /// directory (adopt live VMMs, report sleeping and failed ones, sweep network leftovers).
    pub async fn build(self) -> Result<MicroVmBackend<V>> {
        let host = self
            .vmm
            .host_check()
            .map_err(|e| vmm_err("checking the host for the VMM", e))?;
        let tcg = host.accelerator.to_ascii_lowercase().contains("tcg");
        let timeouts = self.timeouts.scaled(tcg);
        let state_dir = self.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let root = state_dir.join("capsules");
        std::fs::create_dir_all(&root)
            .map_err(|e| io_err(format!("could not create the state directory {}", root.display()), e))?;
        let run_as = self.vmm_user.unwrap_or_default().resolve()?;
        if let Some((uid, _)) = run_as
            && uid != 0
        {
            ensure_traversable(&[state_dir.as_path(), root.as_path()])?;
        }
        let assets = match self.assets {
            Some(a) => a,
            None => Arc::new(
                crate::assets::AssetBuilder::from_env()
                    .build()
                    .map_err(|e| Error::internal("could not set up the guest asset cache").with_source(e))?,
            ),
        };
        let agent = self
            .agent
            .unwrap_or_else(|| Arc::new(ProtocolAgent::new(timeouts.call)));
        let channel = self.channel.unwrap_or_else(|| AgentChannel::for_vmm(self.vmm.name()));
        let inner = Arc::new(Inner {
            vmm: self.vmm,
            state_dir,
            root,
            assets,
            asset_cache: Mutex::new(HashMap::new()),
            net: self.net,
            agent,
            run_as,
            capacity: self.capacity.unwrap_or_else(Capacity::from_host),
            timeouts,
            channel,
            host,
            capsules: Mutex::new(HashMap::new()),
            broken: Mutex::new(HashMap::new()),
            usage: Mutex::new(Usage::default()),
        });
        inner.recover().await?;
        Ok(MicroVmBackend { inner })
    }
}

/// The VMM runs as an unprivileged user that must reach its capsule's directory: give the state
/// directory and its `capsules/` subdirectory search permission for others (`o+x`, no read), and
/// check that every ancestor already allows it.
fn ensure_traversable(dirs: &[&std::path::Path]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in dirs {
        let meta = std::fs::metadata(dir)
            .map_err(|e| io_err(format!("could not read the permissions of {}", dir.display()), e))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode((mode & 0o7777) | 0o011))
                .map_err(|e| io_err(format!("could not let the VMM user traverse {}", dir.display()), e))?;
        }
    }
    if let Some(first) = dirs.first() {
        let mut cur = first.parent();
        while let Some(d) = cur {
            if let Ok(meta) = std::fs::metadata(d)
                && meta.permissions().mode() & 0o001 == 0
            {
                return Err(Error::invalid_input(format!(
                    "the state directory {} is inside {}, which the unprivileged VMM user cannot traverse; \
                     choose a state directory whose parents allow search (chmod o+x {})",
                    first.display(),
                    d.display(),
                    d.display()
                )));
            }
            cur = d.parent();
        }
    }
    Ok(())
}
