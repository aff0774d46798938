//! The `Backend` contract: what a VMM driver (or the mock) does to one capsule.
//!
//! Backends trust core for policy and money (a backend never sees a request that policy has not
//! allowed); core trusts backends for isolation. Every method is idempotent where a retry can happen
//! (terminate twice = ok; sleep of a sleeping capsule = ok). A backend declares its
//! [`Capabilities`]; core refuses what a backend cannot do with `Unsupported` rather than faking it.
//!
//! Contract for every implementation (the backend part of `testkit` checks it):
//! - **Exec**: argv (no shell unless the argv runs one), env, cwd (default `/workspace`; a missing
//!   cwd is an error), stdin (absent = immediate EOF), a timeout that kills the whole process group
//!   and reports `timed_out` with the output collected so far, stdout/stderr as raw bytes streamed in
//!   order, exit code or signal, an output cap per stream that keeps head and tail and reports the
//!   bytes dropped.
//! - **Background processes**: started with [`Backend::spawn`], listed by [`Backend::processes`],
//!   re-attachable from any byte offset, signalled, and they survive sleep/wake.
//! - **PTY**: initial size, resize (SIGWINCH), input bytes, Ctrl-C reaches the foreground group, exit.
//! - **Files**: byte-exact, streaming, any valid file name; writes are atomic (temp + rename) and
//!   reported only after fsync; a directory moves as one tar stream.
//! - **connect(port)**: a byte stream to 127.0.0.1:port inside the capsule, under every network
//!   policy, without the caller knowing any guest address.
//! - Streams cut by terminate end with a `Conflict` error whose message says the capsule was
//!   terminated; calls cut by sleep end with `Unavailable` (retryable).
//! - No call hangs: every wait on a guest has a deadline.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};

/// A stream of byte chunks (file contents, tar archives, stdin).
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// A bidirectional byte stream into a capsule (from [`Backend::connect`]).
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// What a backend can do. Core refuses the rest with `Unsupported`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Sleep keeps memory (snapshot) and wake restores it; processes survive.
    pub memory_sleep: bool,
    /// [`Backend::apply_network`] and network policies at create are enforced.
    pub network_policy: bool,
    /// [`Backend::connect`] works (needed for public URLs / preview).
    pub connect: bool,
    /// [`Backend::pty`] works (console).
    pub pty: bool,
    /// [`Backend::restart`] boots cold on the kept disk.
    pub restart: bool,
}

impl Capabilities {
    /// Everything.
    pub const ALL: Capabilities = Capabilities {
        memory_sleep: true,
        network_policy: true,
        connect: true,
        pty: true,
        restart: true,
    };
}

/// Facts about a backend, for logs and the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// "mock", "qemu", "chv".
    pub name: String,
    /// e.g. "tcg", "kvm", "none".
    pub accelerator: String,
}

/// What core asks a backend to create. Policy has been checked; ids are fixed by core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleSpec {
    pub id: CapsuleId,
    pub name: CapsuleName,
    pub team: TeamId,
    pub size: Size,
    pub image: Image,
    pub disk_gib: u32,
    pub network: NetworkPolicy,
}

/// The state of a capsule as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    Running,
    Sleeping,
    /// The VM is gone without a valid snapshot; the disk is kept (`restart` boots it cold).
    Failed {
        reason: String,
    },
    /// The backend knows nothing of this capsule (never created, or terminated).
    Gone,
}

/// One capsule the backend holds, as reported for reconciliation after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCapsule {
    pub id: CapsuleId,
    pub state: BackendState,
}

/// A command to run in a capsule.
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` = `/workspace`.
    pub cwd: Option<String>,
    /// User name or numeric uid; `None` = root.
    pub user: Option<String>,
    /// Standard input; `None` = immediate EOF.
    pub stdin: Option<ByteStream>,
    /// Kill the whole process group after this long and report `timed_out`.
    pub timeout: Option<Duration>,
    /// Bytes kept per output stream (head and tail); `None` = the backend's default (16 MiB).
    pub output_cap: Option<u64>,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            stdin: None,
            timeout: None,
            output_cap: None,
        }
    }
}

impl Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("stdin", &self.stdin.is_some())
            .field("timeout", &self.timeout)
            .field("output_cap", &self.output_cap)
            .finish()
    }
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the process exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// The timeout fired and the process group was killed.
    pub timed_out: bool,
    /// Bytes of stdout dropped by the output cap (from the middle).
    pub stdout_dropped: u64,
    /// Bytes of stderr dropped by the output cap (from the middle).
    pub stderr_dropped: u64,
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// One event of a running command, in order. `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// The output of a command as it runs.
pub struct ExecStream {
    pub events: BoxStream<'static, Result<ExecEvent>>,
}

impl Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecStream")
    }
}

/// A background process started through the API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// Handle for attach/signal; `None` for a foreground exec.
    pub handle: Option<String>,
    pub pid: u32,
    pub argv: Vec<String>,
    /// Still running.
    pub running: bool,
    /// Exit status once it ended.
    pub exit: Option<ExitStatus>,
}

/// A terminal to open in a capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// Program to run; `None` = the capsule user's login shell.
    pub argv: Option<Vec<String>>,
    pub cols: u16,
    pub rows: u16,
    pub env: BTreeMap<String, String>,
    /// `None` = `/workspace`.
    pub cwd: Option<String>,
}

/// Input to a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyInput {
    Data(Bytes),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A signal for the foreground process group (e.g. 2 = SIGINT).
    Signal(i32),
}

/// Output of a terminal. `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    Output(Bytes),
    Exit(ExitStatus),
}

/// An open terminal. Dropping `input` closes the terminal's input side.
pub struct PtySession {
    pub input: mpsc::Sender<PtyInput>,
    pub output: BoxStream<'static, Result<PtyEvent>>,
}

impl Debug for PtySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PtySession")
    }
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// What `stat` and `list_dir` report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStat {
    /// File name (last path component).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// A VMM driver or the mock. Held as `Arc<dyn Backend>`.
#[async_trait]
pub trait Backend: Send + Sync + Debug + 'static {
    fn info(&self) -> BackendInfo;
    fn capabilities(&self) -> Capabilities;

    // ---- lifecycle ----

    /// Creates and boots a capsule; returns once it runs and its agent answers.
    async fn create(&self, spec: &CapsuleSpec) -> Result<()>;
    /// Puts a running capsule to sleep (memory snapshot where `memory_sleep`). Ok if already asleep.
    async fn sleep(&self, id: &CapsuleId) -> Result<()>;
    /// Wakes a sleeping capsule; returns once its agent answers. Ok if already running.
    async fn wake(&self, id: &CapsuleId) -> Result<()>;
    /// Boots a capsule cold from its kept disk (from running, sleeping or failed).
    async fn restart(&self, id: &CapsuleId) -> Result<()>;
    /// Stops the VM and deletes everything of the capsule. Ok if already gone.
    async fn terminate(&self, id: &CapsuleId) -> Result<()>;
    /// Current state as the backend sees it.
    async fn state(&self, id: &CapsuleId) -> Result<BackendState>;
    /// Every capsule the backend holds (for reconciliation at start).
    async fn list(&self) -> Result<Vec<BackendCapsule>>;

    // ---- commands ----

    /// Runs a command and streams its output.
    async fn exec(&self, id: &CapsuleId, req: ExecRequest) -> Result<ExecStream>;
    /// Starts a background process; returns its handle.
    async fn spawn(&self, id: &CapsuleId, req: ExecRequest) -> Result<ProcessInfo>;
    /// Processes started through the API (foreground and background) and what they are doing.
    async fn processes(&self, id: &CapsuleId) -> Result<Vec<ProcessInfo>>;
    /// Output of a background process from byte `offset` of its combined output, then its exit.
    async fn attach(&self, id: &CapsuleId, handle: &str, offset: u64) -> Result<ExecStream>;
    /// Sends a signal to a background process's group.
    async fn signal(&self, id: &CapsuleId, handle: &str, signal: i32) -> Result<()>;
    /// Opens a terminal.
    async fn pty(&self, id: &CapsuleId, req: PtyRequest) -> Result<PtySession>;

    // ---- files ----

    async fn read_file(&self, id: &CapsuleId, path: &str) -> Result<ByteStream>;
    /// Writes atomically; returns the bytes written, after fsync. Parent directories are created.
    async fn write_file(&self, id: &CapsuleId, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64>;
    async fn stat(&self, id: &CapsuleId, path: &str) -> Result<FileStat>;
    async fn list_dir(&self, id: &CapsuleId, path: &str) -> Result<Vec<FileStat>>;
    /// `mkdir -p`.
    async fn mkdir(&self, id: &CapsuleId, path: &str) -> Result<()>;
    async fn remove(&self, id: &CapsuleId, path: &str, recursive: bool) -> Result<()>;
    async fn rename(&self, id: &CapsuleId, from: &str, to: &str) -> Result<()>;
    /// Unpacks a tar stream into directory `dest` (created if missing).
    async fn upload_tar(&self, id: &CapsuleId, dest: &str, tar: ByteStream) -> Result<()>;
    /// Packs directory `path` into a tar stream (entries relative to it).
    async fn download_tar(&self, id: &CapsuleId, path: &str) -> Result<ByteStream>;

    // ---- network and logs ----

    /// A byte stream to 127.0.0.1:`port` inside the capsule.
    async fn connect(&self, id: &CapsuleId, port: u16) -> Result<Box<dyn Connection>>;
    /// Changes a running (or sleeping) capsule's network policy in place.
    async fn apply_network(&self, id: &CapsuleId, policy: &NetworkPolicy) -> Result<()>;
    /// The boot/serial log (bounded tail).
    async fn logs(&self, id: &CapsuleId) -> Result<Bytes>;
}

#[async_trait]
impl<T: Backend + ?Sized> Backend for Arc<T> {
    fn info(&self) -> BackendInfo {
        (**self).info()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn create(&self, spec: &CapsuleSpec) -> Result<()> {
        (**self).create(spec).await
    }
    async fn sleep(&self, id: &CapsuleId) -> Result<()> {
        (**self).sleep(id).await
    }
    async fn wake(&self, id: &CapsuleId) -> Result<()> {
        (**self).wake(id).await
    }
    async fn restart(&self, id: &CapsuleId) -> Result<()> {
        (**self).restart(id).await
    }
    async fn terminate(&self, id: &CapsuleId) -> Result<()> {
        (**self).terminate(id).await
    }
    async fn state(&self, id: &CapsuleId) -> Result<BackendState> {
        (**self).state(id).await
    }
    async fn list(&self) -> Result<Vec<BackendCapsule>> {
        (**self).list().await
    }
    async fn exec(&self, id: &CapsuleId, req: ExecRequest) -> Result<ExecStream> {
        (**self).exec(id, req).await
    }
    async fn spawn(&self, id: &CapsuleId, req: ExecRequest) -> Result<ProcessInfo> {
        (**self).spawn(id, req).await
    }
    async fn processes(&self, id: &CapsuleId) -> Result<Vec<ProcessInfo>> {
        (**self).processes(id).await
    }
    async fn attach(&self, id: &CapsuleId, handle: &str, offset: u64) -> Result<ExecStream> {
        (**self).attach(id, handle, offset).await
    }
    async fn signal(&self, id: &CapsuleId, handle: &str, signal: i32) -> Result<()> {
        (**self).signal(id, handle, signal).await
    }
    async fn pty(&self, id: &CapsuleId, req: PtyRequest) -> Result<PtySession> {
        (**self).pty(id, req).await
    }
    async fn read_file(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        (**self).read_file(id, path).await
    }
    async fn write_file(&self, id: &CapsuleId, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64> {
        (**self).write_file(id, path, data, mode).await
    }
    async fn stat(&self, id: &CapsuleId, path: &str) -> Result<FileStat> {
        (**self).stat(id, path).await
    }
    async fn list_dir(&self, id: &CapsuleId, path: &str) -> Result<Vec<FileStat>> {
        (**self).list_dir(id, path).await
    }
    async fn mkdir(&self, id: &CapsuleId, path: &str) -> Result<()> {
        (**self).mkdir(id, path).await
    }
    async fn remove(&self, id: &CapsuleId, path: &str, recursive: bool) -> Result<()> {
        (**self).remove(id, path, recursive).await
    }
    async fn rename(&self, id: &CapsuleId, from: &str, to: &str) -> Result<()> {
        (**self).rename(id, from, to).await
    }
    async fn upload_tar(&self, id: &CapsuleId, dest: &str, tar: ByteStream) -> Result<()> {
        (**self).upload_tar(id, dest, tar).await
    }
    async fn download_tar(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        (**self).download_tar(id, path).await
    }
    async fn connect(&self, id: &CapsuleId, port: u16) -> Result<Box<dyn Connection>> {
        (**self).connect(id, port).await
    }
    async fn apply_network(&self, id: &CapsuleId, policy: &NetworkPolicy) -> Result<()> {
        (**self).apply_network(id, policy).await
    }
    async fn logs(&self, id: &CapsuleId) -> Result<Bytes> {
        (**self).logs(id).await
    }
}

/// Conveniences over any backend, so implementors cannot get them wrong.
#[async_trait]
pub trait BackendExt: Backend {
    /// Runs a command to completion and collects its output.
    async fn exec_collect(&self, id: &CapsuleId, req: ExecRequest) -> Result<ExecOutput> {
        use futures::StreamExt;
        let mut s = self.exec(id, req).await?;
        let mut out = ExecOutput::default();
        while let Some(ev) = s.events.next().await {
            match ev? {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(st) => {
                    out.status = st;
                    return Ok(out);
                }
            }
        }
        Err(crate::error::Error::internal(
            "the command's output ended without an exit status",
        ))
    }

    /// Reads a whole file into memory.
    async fn read_to_vec(&self, id: &CapsuleId, path: &str) -> Result<Vec<u8>> {
        use futures::StreamExt;
        let mut s = self.read_file(id, path).await?;
        let mut v = Vec::new();
        while let Some(chunk) = s.next().await {
            v.extend_from_slice(&chunk?);
        }
        Ok(v)
    }

    /// Writes a whole file from memory.
    async fn write_bytes(&self, id: &CapsuleId, path: &str, data: Bytes) -> Result<u64> {
        let s: ByteStream = Box::pin(futures::stream::once(async move { Ok(data) }));
        self.write_file(id, path, s, None).await
    }
}

impl<T: Backend + ?Sized> BackendExt for T {}

/// A finished command's collected output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl ExecOutput {
    pub fn exit_code(&self) -> i32 {
        self.status.shell_code()
    }
    /// Stdout as text; invalid UTF-8 is replaced (lossy, as the name says).
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The dyn forms compile: a backend is used as Arc<dyn Backend> and Box<dyn Backend>.
    #[allow(dead_code)]
    fn assert_dyn(b: Arc<dyn Backend>, c: Box<dyn Backend>) -> (Arc<dyn Backend>, Box<dyn Backend>) {
        fn is_backend<T: Backend + ?Sized>(_: &T) {}
        is_backend(&b);
        is_backend(&*c);
        (b, c)
    }
}
