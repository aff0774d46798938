//! Control messages (JSON in [`FrameKind::Control`](crate::frame::FrameKind::Control) frames).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the wire protocol; `Hello` with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Channel id of session-level messages (`Hello`, `HelloOk`, session errors).
pub const SESSION_CHANNEL: u32 = 0;

/// Who to run a process as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum User {
    /// Numeric uid (looked up in `/etc/passwd` for gid and home if present).
    Uid(u32),
    /// A user name from `/etc/passwd`.
    Name(String),
}

/// A process to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; no shell is involved unless argv names one.
    pub argv: Vec<String>,
    /// Extra environment (on top of PATH, HOME, USER, LOGNAME).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory, absolute or relative to the workspace; must exist. Default: workspace.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as; default root (in test mode: the agent's own user).
    #[serde(default)]
    pub user: Option<User>,
    /// Whether the caller will stream stdin; if false stdin is `/dev/null` (immediate EOF).
    #[serde(default)]
    pub stdin: bool,
    /// Kill the whole process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Per-stream output cap in bytes: the first half is kept (streamed live), then the last
    /// half; the middle is dropped and counted. For background processes it bounds the log.
    #[serde(default)]
    pub output_cap: Option<u64>,
}

/// A PTY session to open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// Program and arguments; empty = `$SHELL` or `/bin/sh`.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Extra environment (TERM defaults to `xterm-256color`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (as for exec).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as.
    #[serde(default)]
    pub user: Option<User>,
    /// Terminal width.
    pub cols: u16,
    /// Terminal height.
    pub rows: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code if it exited.
    pub code: Option<i32>,
    /// Signal number if it was killed by a signal.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Bytes of stdout dropped by the output cap.
    pub stdout_dropped: u64,
    /// Bytes of stderr dropped by the output cap.
    pub stderr_dropped: u64,
}

/// A background process known to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackgroundInfo {
    /// Handle to attach, signal or wait.
    pub handle: String,
    /// Process id in the guest.
    pub pid: i32,
    /// Its argv.
    pub argv: Vec<String>,
    /// Set once it has ended.
    pub exit: Option<ExitInfo>,
    /// Bytes of output (stdout + stderr, interleaved) produced so far; attach offsets count these.
    pub output_bytes: u64,
}

/// A process started through the agent and still running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: i32,
    /// Its argv.
    pub argv: Vec<String>,
    /// Background handle, if started in background mode.
    pub background: Option<String>,
    /// Whether it is a PTY session.
    pub pty: bool,
}

/// Answer to `Info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Protocol version.
    pub version: u32,
    /// Random id of this boot (unchanged across snapshot/restore).
    pub boot_id: String,
    /// Seconds since the agent started.
    pub uptime_secs: f64,
    /// Current session epoch.
    pub epoch: u64,
    /// Running processes started through the agent.
    pub processes: Vec<ProcessInfo>,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (not followed).
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// File name (last component).
    pub name: String,
    /// Kind.
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// Host → agent messages. The first frame of a stream is `Hello` on channel 0; every other
/// request opens a new channel id chosen by the host. `Signal`, `Resize` are sent on an open
/// channel (an exec or PTY).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Open a session.
    Hello { version: u32, epoch: u64 },
    /// Health check.
    Ping,
    /// Stop writing on this stream after the reply (before a snapshot).
    Quiesce,
    /// Run a process in the foreground of this session.
    Exec(ExecRequest),
    /// Run a process in the background; returns a handle.
    SpawnBackground(ExecRequest),
    /// List background processes.
    ListBackground,
    /// Stream a background process's output from a byte offset, then its exit.
    Attach { handle: String, from_offset: u64 },
    /// Send a signal to a background process's group.
    SignalBackground { handle: String, signal: i32 },
    /// Wait for a background process to exit.
    Wait { handle: String },
    /// Open a PTY.
    Pty(PtyRequest),
    /// On an exec/PTY channel: send a signal (PTY: to the foreground group).
    Signal { signal: i32 },
    /// On a PTY channel: change the window size.
    Resize { cols: u16, rows: u16 },
    /// Open a TCP stream to 127.0.0.1:port in the guest.
    Connect { port: u16 },
    /// Stream a file's bytes.
    ReadFile { path: String },
    /// Write a file atomically from the data frames that follow (until EOF).
    WriteFile {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// List a directory.
    ListDir { path: String },
    /// Stat a path (symlinks not followed).
    Stat { path: String },
    /// `mkdir -p`.
    Mkdir { path: String },
    /// Remove a file or (with `recursive`) a directory tree.
    Remove { path: String, recursive: bool },
    /// Rename a path.
    Rename { from: String, to: String },
    /// Unpack the tar stream that follows into `dest` (created if missing).
    UploadTar { dest: String },
    /// Pack a directory into a tar stream.
    DownloadTar { path: String },
    /// Set the wall clock.
    SetClock { unix_nanos: i64 },
    /// Uptime, boot id, processes.
    Info,
    /// Kill processes, sync, power off.
    Shutdown,
}

/// Kind of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or names something invalid.
    InvalidInput,
    /// A path, handle or user does not exist.
    NotFound,
    /// The guest refused (permissions).
    PermissionDenied,
    /// The protocol version differs.
    VersionMismatch,
    /// The session epoch is older than one already seen.
    StaleEpoch,
    /// The peer broke the protocol (frames, flow control).
    Protocol,
    /// Anything else inside the guest.
    Internal,
}

/// Agent → host messages. Every channel ends with exactly one terminal reply (everything except
/// `Started`, `Opened`, `Connected`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Session accepted.
    HelloOk { version: u32, boot_id: String, epoch: u64 },
    /// Health.
    Pong,
    /// Nothing more will be written on this stream.
    Quiesced,
    /// Success without a value.
    Ok,
    /// Non-terminal: the exec/PTY/connect has started.
    Started { pid: i32 },
    /// Non-terminal: a file is open for reading.
    Opened { size: u64 },
    /// Non-terminal: the TCP connection is established.
    Connected,
    /// A process ended.
    Exit(ExitInfo),
    /// A background process started.
    Spawned { handle: String, pid: i32 },
    /// Background processes.
    Background { processes: Vec<BackgroundInfo> },
    /// Directory listing.
    Entries { entries: Vec<FileStat> },
    /// Stat result.
    Stat(FileStat),
    /// File written and fsynced, or stream finished (bytes moved).
    Done { bytes: u64 },
    /// Info.
    Info(AgentInfo),
    /// The request failed.
    Error { kind: ErrorKind, message: String },
}

impl Reply {
    /// Whether this reply ends its channel.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Reply::Started { .. } | Reply::Opened { .. } | Reply::Connected)
    }

    /// An error reply.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply::Error {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r = Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"exec","argv":["true"]"#), "{s}");
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        let u: User = serde_json::from_str("0").unwrap();
        assert_eq!(u, User::Uid(0));
        let u: User = serde_json::from_str("\"root\"").unwrap();
        assert_eq!(u, User::Name("root".into()));
    }
}
