//! The three seams of the backend: the guest-agent session, the guest assets and the host network.
//!
//! Each is a small trait so the backend can be driven by the real implementations in this
//! workspace (`capsules_agent::client`, [`crate::assets`], the tap/nftables layer) or by test
//! doubles. Every method returns `capsules_core::Error` with a one-sentence message of its own
//! level; detail goes into the source chain.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use capsules_core::Result;
use capsules_core::backend::{
    ByteStream, Connection, ExecRequest, ExecStream, FileStat, ProcessInfo, PtyRequest, PtySession,
};
use capsules_core::types::{CapsuleId, Image, NetworkPolicy};
use serde::{Deserialize, Serialize};

use crate::vmm::{KernelFormat, Stream, TapConfig};

/// Opens agent sessions on byte streams the VMM hands out.
#[async_trait]
pub trait AgentConnector: Send + Sync + Debug + 'static {
    /// Performs the session handshake (`hello` with `epoch`) on `stream` within `deadline`.
    ///
    /// Contract: an error means no session exists on this stream; the caller may retry on a
    /// fresh stream (the guest may still be booting).
    async fn handshake(&self, stream: Box<dyn Stream>, epoch: u64, deadline: Duration)
    -> Result<Box<dyn AgentSession>>;
}

/// One agent session: every guest-side operation the backend maps its calls to.
///
/// Contract: when the underlying stream is cut, every call in flight and every stream handed out
/// ends with an error (it never hangs); the backend replaces that error with one that says *why*
/// the session ended (sleep, terminate, VM lost).
#[async_trait]
pub trait AgentSession: Send + Sync + Debug + 'static {
    /// Asks the agent to finish the frame it is writing and write nothing more (before a snapshot).
    async fn quiesce(&self) -> Result<()>;
    /// Sets the guest's wall clock.
    async fn set_clock(&self, unix_nanos: i64) -> Result<()>;
    /// A cheap health check.
    async fn ping(&self) -> Result<()>;
    /// Runs a command in the foreground and streams its output.
    async fn exec(&self, req: ExecRequest) -> Result<ExecStream>;
    /// Starts a background process.
    async fn spawn(&self, req: ExecRequest) -> Result<ProcessInfo>;
    /// Processes started through the agent.
    async fn processes(&self) -> Result<Vec<ProcessInfo>>;
    /// Streams a background process's output from `offset`, then its exit.
    async fn attach(&self, handle: &str, offset: u64) -> Result<ExecStream>;
    /// Signals a background process's group.
    async fn signal(&self, handle: &str, signal: i32) -> Result<()>;
    /// Opens a terminal.
    async fn pty(&self, req: PtyRequest) -> Result<PtySession>;
    /// Streams a file.
    async fn read_file(&self, path: &str) -> Result<ByteStream>;
    /// Writes a file atomically; returns bytes written after fsync.
    async fn write_file(&self, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64>;
    /// Stats a path.
    async fn stat(&self, path: &str) -> Result<FileStat>;
    /// Lists a directory.
    async fn list_dir(&self, path: &str) -> Result<Vec<FileStat>>;
    /// `mkdir -p`.
    async fn mkdir(&self, path: &str) -> Result<()>;
    /// Removes a path.
    async fn remove(&self, path: &str, recursive: bool) -> Result<()>;
    /// Renames a path.
    async fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Unpacks a tar stream into `dest`.
    async fn upload_tar(&self, dest: &str, tar: ByteStream) -> Result<()>;
    /// Packs a directory into a tar stream.
    async fn download_tar(&self, path: &str) -> Result<ByteStream>;
    /// A byte stream to 127.0.0.1:`port` in the guest, through the agent.
    async fn connect(&self, port: u16) -> Result<Box<dyn Connection>>;
    /// Ends the session locally (the stream is closed; calls in flight end).
    fn close(&self);
}

/// What a capsule boots from, pinned in its record at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootAssets {
    /// Content hash of the asset manifest these came from.
    pub manifest_key: String,
    /// Content hash of the base image.
    pub image_key: String,
    /// Kernel in the VMM's format.
    pub kernel: PathBuf,
    /// The initramfs (agent + modules).
    pub initramfs: PathBuf,
    /// The read-only base root filesystem (`/dev/vda`).
    pub base_image: PathBuf,
}

/// Provides the guest assets for a create.
#[async_trait]
pub trait AssetSource: Send + Sync + Debug + 'static {
    /// Makes sure the kernel (in `format`), initramfs and `image` exist (building them lazily,
    /// which may take minutes on a cold cache) and returns where they are.
    async fn ensure(&self, image: Image, format: KernelFormat) -> Result<BootAssets>;
}

/// The host side of one capsule's network, as recorded in its `capsule.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAttachment {
    /// Tap device name (created by the network layer, owned by the VMM user).
    pub tap: String,
    /// Guest MAC address.
    pub mac: String,
    /// Kernel command-line fragment: `capsules.ip=… capsules.gw=… capsules.dns=…`.
    pub cmdline: String,
    /// Whatever else the network layer needs to find its objects again (addresses, set names).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl NetAttachment {
    /// The tap as the VMM sees it.
    pub fn tap_config(&self) -> TapConfig {
        TapConfig {
            name: self.tap.clone(),
            mac: self.mac.clone(),
        }
    }
}

/// The host network layer: taps, nftables, DNS forwarder.
#[async_trait]
pub trait NetworkProvider: Send + Sync + Debug + 'static {
    /// Creates the capsule's tap (owned by `owner` when given), addresses, rules and forwarder.
    async fn setup(&self, id: &CapsuleId, policy: &NetworkPolicy, owner: Option<(u32, u32)>) -> Result<NetAttachment>;
    /// Changes the policy of an existing attachment in place.
    async fn apply(&self, id: &CapsuleId, attachment: &NetAttachment, policy: &NetworkPolicy) -> Result<()>;
    /// Removes everything `setup` created. Idempotent.
    async fn teardown(&self, id: &CapsuleId, attachment: &NetAttachment) -> Result<()>;
    /// Re-activates an attachment after the host process restarted (forwarder, sets).
    async fn adopt(&self, id: &CapsuleId, attachment: &NetAttachment, policy: &NetworkPolicy) -> Result<()>;
    /// Removes leftovers of this backend's prefix that belong to none of `keep`.
    async fn sweep(&self, keep: &[CapsuleId]) -> Result<()>;
}
