//! The production [`AgentConnector`]: `capsules_agent::client::AgentClient` over the VMM's agent
//! stream, with its types and errors mapped to `capsules_core`'s.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use capsules_agent::AgentError;
use capsules_agent::client::{self, AgentClient, ClientOptions};
use capsules_agent::proto::{self, ErrorKind as AgentKind};
use capsules_core::backend::{
    ByteStream, Connection, ExecEvent, ExecRequest, ExecStream, ExitStatus, FileKind, FileStat, ProcessInfo, PtyEvent,
    PtyInput, PtyRequest, PtySession,
};
use capsules_core::{Error, Result};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::adapters::{AgentConnector, AgentSession};
use crate::vmm::Stream;

/// Default per-stream output cap of an exec (the contract's 16 MiB).
const DEFAULT_OUTPUT_CAP: u64 = 16 * 1024 * 1024;
/// Longest piece of guest-supplied text put into an error message.
const MAX_GUEST_TEXT: usize = 300;

/// Opens sessions with [`AgentClient::handshake`].
#[derive(Debug, Clone)]
pub struct ProtocolAgent {
    opts: ClientOptions,
}

impl ProtocolAgent {
    /// A connector whose sessions use `call_timeout` for simple calls and each file chunk.
    pub fn new(call_timeout: Duration) -> Self {
        ProtocolAgent {
            opts: ClientOptions {
                call_timeout,
                ..ClientOptions::default()
            },
        }
    }

    /// A connector with these client options (the handshake deadline is set per call).
    pub fn with_options(opts: ClientOptions) -> Self {
        ProtocolAgent { opts }
    }
}

#[async_trait]
impl AgentConnector for ProtocolAgent {
    async fn handshake(
        &self,
        stream: Box<dyn Stream>,
        epoch: u64,
        deadline: Duration,
    ) -> Result<Box<dyn AgentSession>> {
        let opts = ClientOptions {
            handshake_timeout: deadline,
            ..self.opts.clone()
        };
        let client = AgentClient::handshake(stream, epoch, opts)
            .await
            .map_err(|e| map_err("the agent handshake", e))?;
        Ok(Box::new(ClientSession { client }))
    }
}

/// One session over [`AgentClient`].
#[derive(Debug)]
struct ClientSession {
    client: AgentClient,
}

/// Guest text made safe for an error message: bounded, no control characters.
fn guest_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_GUEST_TEXT)
        .collect();
    if s.chars().count() > MAX_GUEST_TEXT {
        out.push('…');
    }
    out
}

/// Maps a client error to a core error kind with a one-sentence message naming `what`.
pub(crate) fn map_err(what: &str, e: AgentError) -> Error {
    match e {
        AgentError::SessionEnded => Error::unavailable(format!("the agent session ended during {what}")).with_source(e),
        AgentError::Timeout(_) => {
            Error::unavailable(format!("the guest agent did not answer {what} in time; retry")).with_source(e)
        }
        AgentError::Remote { kind, ref message } => {
            let msg = guest_text(message);
            match kind {
                AgentKind::InvalidInput => Error::invalid_input(msg),
                AgentKind::NotFound => Error::not_found(msg),
                AgentKind::PermissionDenied => Error::permission_denied(msg),
                AgentKind::StaleEpoch => {
                    Error::unavailable(format!("the guest agent refused a stale session during {what}")).with_source(e)
                }
                AgentKind::VersionMismatch => Error::internal(
                    "the guest agent speaks another protocol version; rebuild the guest assets with this version",
                )
                .with_source(e),
                AgentKind::Protocol | AgentKind::Internal => {
                    Error::internal(format!("the guest agent failed {what}")).with_source(e)
                }
            }
        }
        AgentError::Protocol(_) => {
            Error::internal(format!("the guest agent broke the protocol during {what}")).with_source(e)
        }
        AgentError::Io(_) => Error::unavailable(format!("the agent stream failed during {what}")).with_source(e),
        _ => Error::internal(format!("the agent call {what} failed")).with_source(e),
    }
}

fn user_of(user: Option<String>) -> Option<proto::User> {
    user.map(|u| match u.parse::<u32>() {
        Ok(uid) => proto::User::Uid(uid),
        Err(_) => proto::User::Name(u),
    })
}

fn exit_of(e: proto::ExitInfo) -> ExitStatus {
    ExitStatus {
        code: e.code,
        signal: e.signal,
        timed_out: e.timed_out,
        stdout_dropped: e.stdout_dropped,
        stderr_dropped: e.stderr_dropped,
    }
}

fn stat_of(s: proto::FileStat) -> FileStat {
    FileStat {
        name: s.name,
        kind: match s.file_type {
            proto::FileType::File => FileKind::File,
            proto::FileType::Dir => FileKind::Dir,
            proto::FileType::Symlink => FileKind::Symlink,
            proto::FileType::Other => FileKind::Other,
        },
        size: s.size,
        mode: s.mode,
        mtime: s.mtime,
    }
}

/// Splits a core exec request into the wire request and the stdin stream.
fn exec_req(req: ExecRequest) -> (proto::ExecRequest, Option<ByteStream>) {
    let wire = proto::ExecRequest {
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        user: user_of(req.user),
        stdin: req.stdin.is_some(),
        timeout_ms: req.timeout.map(|t| t.as_millis().min(u128::from(u64::MAX)) as u64),
        output_cap: Some(req.output_cap.unwrap_or(DEFAULT_OUTPUT_CAP)),
    };
    (wire, req.stdin)
}

fn exec_events(call: client::ExecCall) -> ExecStream {
    let events = futures::stream::unfold(Some(call), |state| async move {
        let mut call = state?;
        match call.next().await {
            Ok(Some(client::ExecEvent::Stdout(b))) => Some((Ok(ExecEvent::Stdout(b)), Some(call))),
            Ok(Some(client::ExecEvent::Stderr(b))) => Some((Ok(ExecEvent::Stderr(b)), Some(call))),
            Ok(Some(client::ExecEvent::Exit(e))) => Some((Ok(ExecEvent::Exit(exit_of(e))), None)),
            Ok(None) => None,
            Err(e) => Some((Err(map_err("the command's output", e)), None)),
        }
    });
    ExecStream {
        events: Box::pin(events),
    }
}

fn file_bytes(reader: client::FileReader, what: &'static str) -> ByteStream {
    Box::pin(futures::stream::unfold(Some(reader), move |state| async move {
        let mut r = state?;
        match r.next().await {
            Ok(Some(b)) => Some((Ok(b), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(map_err(what, e)), None)),
        }
    }))
}

fn io_chunks(data: ByteStream) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Unpin + Send {
    data.map(|r| r.map_err(std::io::Error::other))
}

#[async_trait]
impl AgentSession for ClientSession {
    async fn quiesce(&self) -> Result<()> {
        self.client.quiesce().await.map_err(|e| map_err("quiesce", e))
    }
    async fn set_clock(&self, unix_nanos: i64) -> Result<()> {
        self.client
            .set_clock(unix_nanos)
            .await
            .map_err(|e| map_err("set clock", e))
    }
    async fn ping(&self) -> Result<()> {
        self.client.ping().await.map(|_| ()).map_err(|e| map_err("ping", e))
    }
    async fn exec(&self, req: ExecRequest) -> Result<ExecStream> {
        let (wire, stdin) = exec_req(req);
        let call = self
            .client
            .exec(wire)
            .await
            .map_err(|e| map_err("starting the command", e))?;
        if let Some(mut stdin) = stdin {
            let tx = call.stdin();
            tokio::spawn(async move {
                while let Some(chunk) = stdin.next().await {
                    match chunk {
                        Ok(b) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                        // The caller's stdin failed: end it (the command sees EOF).
                        Err(_) => break,
                    }
                }
                let _ = tx.close().await;
            });
        }
        Ok(exec_events(call))
    }
    async fn spawn(&self, req: ExecRequest) -> Result<ProcessInfo> {
        let argv = req.argv.clone();
        let (mut wire, _stdin) = exec_req(req);
        // Background processes have no stdin stream.
        wire.stdin = false;
        let h = self
            .client
            .spawn_background(wire)
            .await
            .map_err(|e| map_err("starting the background process", e))?;
        Ok(ProcessInfo {
            handle: Some(h.handle),
            pid: h.pid.max(0) as u32,
            argv,
            running: true,
            exit: None,
        })
    }
    async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        let bg = self
            .client
            .list_background()
            .await
            .map_err(|e| map_err("listing processes", e))?;
        let info = self.client.info().await.map_err(|e| map_err("listing processes", e))?;
        let mut out: Vec<ProcessInfo> = info
            .processes
            .into_iter()
            .filter(|p| p.background.is_none())
            .map(|p| ProcessInfo {
                handle: None,
                pid: p.pid.max(0) as u32,
                argv: p.argv,
                running: true,
                exit: None,
            })
            .collect();
        out.extend(bg.into_iter().map(|b| ProcessInfo {
            handle: Some(b.handle),
            pid: b.pid.max(0) as u32,
            argv: b.argv,
            running: b.exit.is_none(),
            exit: b.exit.map(exit_of),
        }));
        Ok(out)
    }
    async fn attach(&self, handle: &str, offset: u64) -> Result<ExecStream> {
        let call = self
            .client
            .attach(handle, offset)
            .await
            .map_err(|e| map_err("attaching to the background process", e))?;
        Ok(exec_events(call))
    }
    async fn signal(&self, handle: &str, signal: i32) -> Result<()> {
        self.client
            .signal(handle, signal)
            .await
            .map_err(|e| map_err("signalling the background process", e))
    }
    async fn pty(&self, req: PtyRequest) -> Result<PtySession> {
        let wire = proto::PtyRequest {
            argv: req.argv.unwrap_or_default(),
            env: req.env,
            cwd: req.cwd,
            user: None,
            cols: req.cols,
            rows: req.rows,
        };
        let call = self
            .client
            .pty(wire)
            .await
            .map_err(|e| map_err("opening the terminal", e))?;
        let input = call.input();
        let (tx, mut rx) = mpsc::channel::<PtyInput>(64);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let r = match msg {
                    PtyInput::Data(b) => input.send(b).await,
                    PtyInput::Resize { cols, rows } => input.resize(cols, rows).await,
                    PtyInput::Signal(s) => input.signal(s).await,
                };
                if r.is_err() {
                    return;
                }
            }
        });
        let output = futures::stream::unfold(Some(call), |state| async move {
            let mut call = state?;
            match call.next().await {
                Ok(Some(client::PtyEvent::Output(b))) => Some((Ok(PtyEvent::Output(b)), Some(call))),
                Ok(Some(client::PtyEvent::Exit(e))) => Some((Ok(PtyEvent::Exit(exit_of(e))), None)),
                Ok(None) => None,
                Err(e) => Some((Err(map_err("the terminal", e)), None)),
            }
        });
        Ok(PtySession {
            input: tx,
            output: Box::pin(output),
        })
    }
    async fn read_file(&self, path: &str) -> Result<ByteStream> {
        let r = self
            .client
            .read_file(path)
            .await
            .map_err(|e| map_err("reading the file", e))?;
        Ok(file_bytes(r, "reading the file"))
    }
    async fn write_file(&self, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64> {
        self.client
            .write_file(path, mode, io_chunks(data))
            .await
            .map_err(|e| map_err("writing the file", e))
    }
    async fn stat(&self, path: &str) -> Result<FileStat> {
        self.client
            .stat(path)
            .await
            .map(stat_of)
            .map_err(|e| map_err("stat", e))
    }
    async fn list_dir(&self, path: &str) -> Result<Vec<FileStat>> {
        self.client
            .list_dir(path)
            .await
            .map(|v| v.into_iter().map(stat_of).collect())
            .map_err(|e| map_err("listing the directory", e))
    }
    async fn mkdir(&self, path: &str) -> Result<()> {
        self.client
            .mkdir(path)
            .await
            .map_err(|e| map_err("creating the directory", e))
    }
    async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.client
            .remove(path, recursive)
            .await
            .map_err(|e| map_err("removing the path", e))
    }
    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.client
            .rename(from, to)
            .await
            .map_err(|e| map_err("renaming the path", e))
    }
    async fn upload_tar(&self, dest: &str, tar: ByteStream) -> Result<()> {
        let reader = tokio_util::io::StreamReader::new(io_chunks(tar));
        self.client
            .upload_tar(dest, reader)
            .await
            .map(|_| ())
            .map_err(|e| map_err("unpacking the tar stream", e))
    }
    async fn download_tar(&self, path: &str) -> Result<ByteStream> {
        let r = self
            .client
            .download_tar(path)
            .await
            .map_err(|e| map_err("packing the directory", e))?;
        Ok(file_bytes(r, "packing the directory"))
    }
    async fn connect(&self, port: u16) -> Result<Box<dyn Connection>> {
        let s = self
            .client
            .connect(port)
            .await
            .map_err(|e| map_err(&format!("connecting to port {port} in the capsule"), e))?;
        Ok(Box::new(s))
    }
    fn close(&self) {
        self.client.close();
    }
}
