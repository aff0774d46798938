//! The async host-side client. Every byte from the guest is treated as hostile: frames are
//! bounded, each call buffers at most one flow-control window, and every wait either has a
//! deadline or ends when the stream ends (with [`AgentError::SessionEnded`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::{AgentError, Result};
use crate::frame::{self, Frame, FrameKind, FrameReader};
use crate::mux::{CHUNK, Channel, ChannelSender, Incoming, Mux};
use crate::proto::{
    AgentInfo, BackgroundInfo, ExecRequest, ExitInfo, FileStat, PROTOCOL_VERSION, PtyRequest, Reply, Request,
    SESSION_CHANNEL,
};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of the handshake.
    pub handshake_timeout: Duration,
    /// Deadline of simple calls, and of each chunk of a file transfer.
    pub call_timeout: Duration,
    /// Extra time past an exec's own timeout before the client gives up on it.
    pub exec_grace: Duration,
    /// Per-stream cap of [`ExecCall::collect`] (head and tail kept, middle counted as dropped).
    pub collect_cap: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            handshake_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
            exec_grace: Duration::from_secs(10),
            collect_cap: 16 * 1024 * 1024,
        }
    }
}

struct Inner {
    mux: Mux,
    next: AtomicU32,
    opts: ClientOptions,
    boot_id: String,
    epoch: u64,
}

/// A session with one agent over one stream. Cheap to clone; all clones share the session.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("epoch", &self.inner.epoch)
            .field("boot_id", &self.inner.boot_id)
            .finish()
    }
}

fn parse_reply(b: &[u8]) -> Result<Reply> {
    serde_json::from_slice(b).map_err(|e| AgentError::Protocol(format!("undecodable reply: {e}")))
}

fn remote(r: Reply) -> AgentError {
    match r {
        Reply::Error { kind, message } => AgentError::Remote { kind, message },
        other => AgentError::Protocol(format!("unexpected reply {other:?}")),
    }
}

async fn with_deadline<T>(d: Option<Instant>, what: &'static str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match d {
        Some(d) => tokio::time::timeout_at(d.into(), f)
            .await
            .map_err(|_| AgentError::Timeout(what))?,
        None => f.await,
    }
}

impl AgentClient {
    /// Open a session on `stream` with `epoch` (must be ≥ every epoch the agent has seen; a
    /// higher one supersedes older sessions).
    pub async fn handshake<S>(stream: S, epoch: u64, opts: ClientOptions) -> Result<AgentClient>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd);
        let hello = serde_json::to_vec(&Request::Hello {
            version: PROTOCOL_VERSION,
            epoch,
        })
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let mut buf = BytesMut::new();
        frame::encode(&Frame::new(FrameKind::Control, SESSION_CHANNEL, hello), &mut buf)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let exchange = async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            match reader.read().await {
                Ok(Some(f)) if f.kind == FrameKind::Control && f.channel == SESSION_CHANNEL => parse_reply(&f.payload),
                Ok(Some(_)) => Err(AgentError::Protocol("first frame is not a session reply".into())),
                Ok(None) => Err(AgentError::SessionEnded),
                Err(e) => Err(AgentError::Protocol(format!(
                    "{e}: {}",
                    std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
                ))),
            }
        };
        let reply = tokio::time::timeout(opts.handshake_timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout("hello"))??;
        let boot_id = match reply {
            Reply::HelloOk {
                version,
                boot_id,
                epoch: e,
            } if version == PROTOCOL_VERSION && e == epoch => boot_id,
            Reply::HelloOk { version, .. } => {
                return Err(AgentError::Protocol(format!(
                    "agent answered with protocol version {version}"
                )));
            }
            other => return Err(remote(other)),
        };
        let mux = Mux::start(reader, wr, None, CancellationToken::new());
        Ok(AgentClient {
            inner: Arc::new(Inner {
                mux,
                next: AtomicU32::new(1),
                opts,
                boot_id,
                epoch,
            }),
        })
    }

    /// The agent's boot id.
    pub fn boot_id(&self) -> &str {
        &self.inner.boot_id
    }

    /// Epoch of this session.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.mux.ended().is_cancelled()
    }

    /// Why the session ended (if it has).
    pub fn end_reason(&self) -> Option<String> {
        self.inner.mux.end_reason()
    }

    /// Wait until the session ends.
    pub async fn closed(&self) {
        self.inner.mux.ended().cancelled().await
    }

    /// End the session from this side (pending calls end with `SessionEnded`).
    pub fn close(&self) {
        self.inner.mux.close("closed by the client");
    }

    async fn open(&self, req: &Request) -> Result<Channel> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if id == SESSION_CHANNEL {
            return Err(AgentError::Protocol("channel ids exhausted".into()));
        }
        let ch = self.inner.mux.open(id).map_err(|_| AgentError::SessionEnded)?;
        ch.sender().control(req).await.map_err(|_| AgentError::SessionEnded)?;
        Ok(ch)
    }

    fn call_deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.inner.opts.call_timeout)
    }

    async fn simple(&self, req: Request, what: &'static str) -> Result<Reply> {
        let d = self.call_deadline();
        with_deadline(d, what, async {
            let mut ch = self.open(&req).await?;
            let r = next_control(&mut ch, &self.inner.mux).await?;
            match r {
                Reply::Error { .. } => Err(remote(r)),
                r => Ok(r),
            }
        })
        .await
    }

    /// Health check; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        match self.simple(Request::Ping, "ping").await? {
            Reply::Pong => Ok(t.elapsed()),
            r => Err(remote(r)),
        }
    }

    /// Start a foreground exec.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecCall> {
        let deadline = req
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms) + self.inner.opts.exec_grace);
        let d = self.call_deadline();
        let (ch, pid) = with_deadline(d, "exec start", async {
            let mut ch = self.open(&Request::Exec(req)).await?;
            match next_control(&mut ch, &self.inner.mux).await? {
                Reply::Started { pid } => Ok((ch, pid)),
                r => Err(remote(r)),
            }
        })
        .await?;
        Ok(ExecCall {
            ch,
            pid,
            deadline,
            done: false,
            mux: self.inner.mux.clone(),
            cap: self.inner.opts.collect_cap,
        })
    }

    /// Run to completion and collect output (capped by `collect_cap`).
    pub async fn run(&self, req: ExecRequest) -> Result<ExecOutput> {
        self.exec(req).await?.collect().await
    }

    /// Start a background process.
    pub async fn spawn_background(&self, req: ExecRequest) -> Result<BackgroundHandle> {
        match self.simple(Request::SpawnBackground(req), "spawn").await? {
            Reply::Spawned { handle, pid } => Ok(BackgroundHandle { handle, pid }),
            r => Err(remote(r)),
        }
    }

    /// Background processes known to the agent.
    pub async fn list_background(&self) -> Result<Vec<BackgroundInfo>> {
        match self.simple(Request::ListBackground, "list").await? {
            Reply::Background { processes } => Ok(processes),
            r => Err(remote(r)),
        }
    }

    /// Stream a background process's output from `from_offset`, live, until it exits.
    pub async fn attach(&self, handle: &str, from_offset: u64) -> Result<ExecCall> {
        let ch = self
            .open(&Request::Attach {
                handle: handle.into(),
                from_offset,
            })
            .await?;
        Ok(ExecCall {
            ch,
            pid: 0,
            deadline: None,
            done: false,
            mux: self.inner.mux.clone(),
            cap: self.inner.opts.collect_cap,
        })
    }

    /// Signal a background process's group.
    pub async fn signal(&self, handle: &str, signal: i32) -> Result<()> {
        match self
            .simple(
                Request::SignalBackground {
                    handle: handle.into(),
                    signal,
                },
                "signal",
            )
            .await?
        {
            Reply::Ok => Ok(()),
            r => Err(remote(r)),
        }
    }

    /// Wait for a background process to exit (ends with `SessionEnded` if the stream does).
    pub async fn wait(&self, handle: &str) -> Result<ExitInfo> {
        let mut ch = self.open(&Request::Wait { handle: handle.into() }).await?;
        match next_control(&mut ch, &self.inner.mux).await? {
            Reply::Exit(e) => Ok(e),
            r => Err(remote(r)),
        }
    }

    /// Open a PTY.
    pub async fn pty(&self, req: PtyRequest) -> Result<PtyCall> {
        let d = self.call_deadline();
        let (ch, pid) = with_deadline(d, "pty start", async {
            let mut ch = self.open(&Request::Pty(req)).await?;
            match next_control(&mut ch, &self.inner.mux).await? {
                Reply::Started { pid } => Ok((ch, pid)),
                r => Err(remote(r)),
            }
        })
        .await?;
        Ok(PtyCall {
            ch,
            pid,
            done: false,
            mux: self.inner.mux.clone(),
        })
    }

    /// A byte stream to 127.0.0.1:`port` in the guest. Shutting down the write side sends a
    /// half-close; EOF on the read side means the guest side closed.
    pub async fn connect(&self, port: u16) -> Result<tokio::io::DuplexStream> {
        let d = self.call_deadline();
        let mut ch = with_deadline(d, "connect", async {
            let mut ch = self.open(&Request::Connect { port }).await?;
            match next_control(&mut ch, &self.inner.mux).await? {
                Reply::Connected => Ok(ch),
                r => Err(remote(r)),
            }
        })
        .await?;
        let (user, mine) = tokio::io::duplex(256 * 1024);
        let (mut mr, mut mw) = tokio::io::split(mine);
        let tx = ch.sender().clone();
        let up = tokio::spawn(async move {
            loop {
                let mut buf = BytesMut::with_capacity(CHUNK);
                match mr.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.eof().await;
                        return;
                    }
                    Ok(_) => {
                        if tx.data(buf.freeze()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Some(m) = ch.recv().await {
                match m {
                    Incoming::Data(b) => {
                        if mw.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Incoming::Eof => {
                        let _ = mw.shutdown().await;
                    }
                    Incoming::Control(_) => break, // Done or Error: the connection is over
                    Incoming::Stderr(_) => {}
                }
            }
            let _ = mw.shutdown().await;
            up.abort();
        });
        Ok(user)
    }

    async fn open_stream(&self, req: Request, what: &'static str) -> Result<FileReader> {
        let d = self.call_deadline();
        let (ch, size) = with_deadline(d, what, async {
            let mut ch = self.open(&req).await?;
            match next_control(&mut ch, &self.inner.mux).await? {
                Reply::Opened { size } => Ok((ch, size)),
                r => Err(remote(r)),
            }
        })
        .await?;
        Ok(FileReader {
            ch,
            size,
            done: false,
            mux: self.inner.mux.clone(),
            idle: self.inner.opts.call_timeout,
        })
    }

    /// Stream a file's bytes.
    pub async fn read_file(&self, path: &str) -> Result<FileReader> {
        self.open_stream(Request::ReadFile { path: path.into() }, "read file")
            .await
    }

    /// Read a whole file, failing if it is larger than `max` bytes.
    pub async fn read_file_to_vec(&self, path: &str, max: usize) -> Result<Vec<u8>> {
        self.read_file(path).await?.read_to_end(max).await
    }

    async fn send_stream<S>(&self, req: Request, mut chunks: S, what: &'static str) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let mut ch = self.open(&req).await?;
        let tx = ch.sender().clone();
        let mut local_err = None;
        while let Some(c) = chunks.next().await {
            match c {
                Ok(b) => {
                    if tx.data(b).await.is_err() {
                        break; // the agent gave up: its reply says why
                    }
                }
                Err(e) => {
                    local_err = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = local_err {
            return Err(AgentError::Io(e)); // dropping the channel cancels it on the agent
        }
        let _ = tx.eof().await;
        let d = self.call_deadline();
        with_deadline(d, what, async {
            match next_control(&mut ch, &self.inner.mux).await? {
                Reply::Done { bytes } => Ok(bytes),
                r => Err(remote(r)),
            }
        })
        .await
    }

    /// Write a file atomically from a stream of chunks; returns the bytes written once the
    /// agent has fsynced and renamed it into place.
    pub async fn write_file<S>(&self, path: &str, mode: Option<u32>, chunks: S) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        self.send_stream(
            Request::WriteFile {
                path: path.into(),
                mode,
            },
            chunks,
            "write file",
        )
        .await
    }

    /// Write a file from one buffer.
    pub async fn write_file_bytes(&self, path: &str, data: Bytes) -> Result<u64> {
        let chunks = futures::stream::iter(Some(Ok(data)));
        self.write_file(path, None, chunks).await
    }

    /// Unpack a tar stream into `dest` (created if missing).
    pub async fn upload_tar<R: AsyncRead + Unpin>(&self, dest: &str, tar: R) -> Result<u64> {
        let chunks = futures::stream::unfold(tar, |mut r| async move {
            let mut buf = BytesMut::with_capacity(CHUNK);
            match r.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(buf.freeze()), r)),
                Err(e) => Some((Err(e), r)),
            }
        });
        self.send_stream(Request::UploadTar { dest: dest.into() }, Box::pin(chunks), "upload tar")
            .await
    }

    /// Pack a directory into a tar stream.
    pub async fn download_tar(&self, path: &str) -> Result<FileReader> {
        self.open_stream(Request::DownloadTar { path: path.into() }, "download tar")
            .await
    }

    /// List a directory.
    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileStat>> {
        match self.simple(Request::ListDir { path: path.into() }, "list dir").await? {
            Reply::Entries { entries } => Ok(entries),
            r => Err(remote(r)),
        }
    }

    /// Stat a path (symlinks not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        match self.simple(Request::Stat { path: path.into() }, "stat").await? {
            Reply::Stat(s) => Ok(s),
            r => Err(remote(r)),
        }
    }

    async fn ok(&self, req: Request, what: &'static str) -> Result<()> {
        match self.simple(req, what).await? {
            Reply::Ok => Ok(()),
            r => Err(remote(r)),
        }
    }

    /// `mkdir -p`.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.ok(Request::Mkdir { path: path.into() }, "mkdir").await
    }

    /// Remove a path (`recursive` for a directory tree).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.ok(
            Request::Remove {
                path: path.into(),
                recursive,
            },
            "remove",
        )
        .await
    }

    /// Rename a path.
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.ok(
            Request::Rename {
                from: from.into(),
                to: to.into(),
            },
            "rename",
        )
        .await
    }

    /// Set the guest's wall clock.
    pub async fn set_clock(&self, unix_nanos: i64) -> Result<()> {
        self.ok(Request::SetClock { unix_nanos }, "set clock").await
    }

    /// Uptime, boot id and running processes.
    pub async fn info(&self) -> Result<AgentInfo> {
        match self.simple(Request::Info, "info").await? {
            Reply::Info(i) => Ok(i),
            r => Err(remote(r)),
        }
    }

    /// Ask the agent to stop writing on this stream (before a snapshot).
    pub async fn quiesce(&self) -> Result<()> {
        match self.simple(Request::Quiesce, "quiesce").await? {
            Reply::Quiesced => Ok(()),
            r => Err(remote(r)),
        }
    }

    /// Power the guest off (test mode: the agent exits).
    pub async fn shutdown(&self) -> Result<()> {
        match self.ok(Request::Shutdown, "shutdown").await {
            Err(AgentError::SessionEnded) => Ok(()),
            r => r,
        }
    }
}

/// Next control reply on a channel, skipping data.
async fn next_control(ch: &mut Channel, mux: &Mux) -> Result<Reply> {
    loop {
        match ch.recv().await {
            Some(Incoming::Control(b)) => return parse_reply(&b),
            Some(_) => {}
            None => return Err(ended(mux)),
        }
    }
}

fn ended(mux: &Mux) -> AgentError {
    if mux.ended().is_cancelled() {
        AgentError::SessionEnded
    } else {
        AgentError::Protocol("agent closed the channel without a reply".into())
    }
}

/// A background process handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundHandle {
    /// Handle to attach/signal/wait.
    pub handle: String,
    /// Guest pid.
    pub pid: i32,
}

/// An event of a running exec.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// Stdout bytes, in order.
    Stdout(Bytes),
    /// Stderr bytes, in order.
    Stderr(Bytes),
    /// The process ended (last event).
    Exit(ExitInfo),
}

/// Sends stdin to an exec (cloneable, usable while another task reads output).
#[derive(Debug, Clone)]
pub struct StdinHandle {
    tx: ChannelSender,
}

impl StdinHandle {
    /// Send stdin bytes (the exec must have been started with `stdin: true`).
    pub async fn send(&self, b: Bytes) -> Result<()> {
        self.tx.data(b).await.map_err(|_| AgentError::SessionEnded)
    }

    /// Close stdin.
    pub async fn close(&self) -> Result<()> {
        self.tx.eof().await.map_err(|_| AgentError::SessionEnded)
    }

    /// Signal the exec's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.tx
            .control(&Request::Signal { signal })
            .await
            .map_err(|_| AgentError::SessionEnded)
    }
}

/// A running exec (or an attachment to a background process). Dropping it kills a foreground
/// process.
#[derive(Debug)]
pub struct ExecCall {
    ch: Channel,
    pid: i32,
    deadline: Option<Instant>,
    done: bool,
    mux: Mux,
    cap: usize,
}

impl ExecCall {
    /// Guest pid (0 for an attachment).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Handle to send stdin or signals.
    pub fn stdin(&self) -> StdinHandle {
        StdinHandle {
            tx: self.ch.sender().clone(),
        }
    }

    /// Send stdin bytes.
    pub async fn send_stdin(&self, b: Bytes) -> Result<()> {
        self.stdin().send(b).await
    }

    /// Close stdin.
    pub async fn close_stdin(&self) -> Result<()> {
        self.stdin().close().await
    }

    /// Signal the process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.stdin().signal(signal).await
    }

    /// Next event; `Ok(None)` after `Exit`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>> {
        if self.done {
            return Ok(None);
        }
        let mux = self.mux.clone();
        let ch = &mut self.ch;
        let r = with_deadline(self.deadline, "exec", async {
            loop {
                match ch.recv().await {
                    Some(Incoming::Data(b)) => return Ok(ExecEvent::Stdout(b)),
                    Some(Incoming::Stderr(b)) => return Ok(ExecEvent::Stderr(b)),
                    Some(Incoming::Eof) => {}
                    Some(Incoming::Control(c)) => match parse_reply(&c)? {
                        Reply::Exit(e) => return Ok(ExecEvent::Exit(e)),
                        Reply::Started { .. } => {}
                        r => return Err(remote(r)),
                    },
                    None => return Err(ended(&mux)),
                }
            }
        })
        .await;
        if !matches!(r, Ok(ExecEvent::Stdout(_)) | Ok(ExecEvent::Stderr(_))) {
            self.done = true;
        }
        r.map(Some)
    }

    /// Read everything until exit (each stream capped at `collect_cap`, head and tail kept).
    pub async fn collect(mut self) -> Result<ExecOutput> {
        let (mut out, mut err) = (HeadTail::new(self.cap), HeadTail::new(self.cap));
        loop {
            match self.next().await? {
                Some(ExecEvent::Stdout(b)) => out.push(b),
                Some(ExecEvent::Stderr(b)) => err.push(b),
                Some(ExecEvent::Exit(mut exit)) => {
                    exit.stdout_dropped += out.dropped;
                    exit.stderr_dropped += err.dropped;
                    return Ok(ExecOutput {
                        stdout: out.finish(),
                        stderr: err.finish(),
                        exit,
                    });
                }
                None => return Err(AgentError::Protocol("exec ended without an exit".into())),
            }
        }
    }
}

/// Bounded head + tail buffer.
struct HeadTail {
    head: BytesMut,
    head_cap: usize,
    tail: VecDeque<Bytes>,
    tail_len: usize,
    tail_cap: usize,
    dropped: u64,
}

impl HeadTail {
    fn new(cap: usize) -> Self {
        HeadTail {
            head: BytesMut::new(),
            head_cap: cap - cap / 2,
            tail: VecDeque::new(),
            tail_len: 0,
            tail_cap: cap / 2,
            dropped: 0,
        }
    }

    fn push(&mut self, mut b: Bytes) {
        let n = (self.head_cap - self.head.len()).min(b.len());
        self.head.extend_from_slice(&b.split_to(n));
        if b.is_empty() {
            return;
        }
        self.tail_len += b.len();
        self.tail.push_back(b);
        while self.tail_len > self.tail_cap {
            let over = self.tail_len - self.tail_cap;
            let Some(front) = self.tail.front_mut() else { break };
            let k = over.min(front.len());
            let _ = front.split_to(k);
            if front.is_empty() {
                self.tail.pop_front();
            }
            self.tail_len -= k;
            self.dropped += k as u64;
        }
    }

    fn finish(mut self) -> Bytes {
        for t in self.tail {
            self.head.extend_from_slice(&t);
        }
        self.head.freeze()
    }
}

/// Output of a finished exec.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    /// Raw stdout (head + tail if capped).
    pub stdout: Bytes,
    /// Raw stderr (head + tail if capped).
    pub stderr: Bytes,
    /// Exit status and drop counts.
    pub exit: ExitInfo,
}

impl ExecOutput {
    /// Lossy UTF-8 view of stdout (invalid sequences become U+FFFD).
    pub fn stdout_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// Lossy UTF-8 view of stderr.
    pub fn stderr_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }

    /// Whether any output was dropped by a cap.
    pub fn truncated(&self) -> bool {
        self.exit.stdout_dropped > 0 || self.exit.stderr_dropped > 0
    }
}

/// An event of a PTY session.
#[derive(Debug, Clone, PartialEq)]
pub enum PtyEvent {
    /// Terminal output.
    Output(Bytes),
    /// The program ended (last event).
    Exit(ExitInfo),
}

/// Sends input, resizes and signals to a PTY (cloneable).
#[derive(Debug, Clone)]
pub struct PtyInput {
    tx: ChannelSender,
}

impl PtyInput {
    /// Send input bytes (0x03 is Ctrl-C as usual).
    pub async fn send(&self, b: Bytes) -> Result<()> {
        self.tx.data(b).await.map_err(|_| AgentError::SessionEnded)
    }

    /// Change the window size (the foreground group gets SIGWINCH).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        self.tx
            .control(&Request::Resize { cols, rows })
            .await
            .map_err(|_| AgentError::SessionEnded)
    }

    /// Signal the terminal's foreground process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.tx
            .control(&Request::Signal { signal })
            .await
            .map_err(|_| AgentError::SessionEnded)
    }
}

/// A running PTY session. Dropping it hangs up the terminal.
#[derive(Debug)]
pub struct PtyCall {
    ch: Channel,
    pid: i32,
    done: bool,
    mux: Mux,
}

impl PtyCall {
    /// Guest pid of the program.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Input/resize/signal handle.
    pub fn input(&self) -> PtyInput {
        PtyInput {
            tx: self.ch.sender().clone(),
        }
    }

    /// Send input bytes.
    pub async fn send_input(&self, b: Bytes) -> Result<()> {
        self.input().send(b).await
    }

    /// Resize.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        self.input().resize(cols, rows).await
    }

    /// Signal the foreground group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.input().signal(signal).await
    }

    /// Next event; `Ok(None)` after `Exit`. Ends with `SessionEnded` if the stream does.
    pub async fn next(&mut self) -> Result<Option<PtyEvent>> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.ch.recv().await {
                Some(Incoming::Data(b)) => return Ok(Some(PtyEvent::Output(b))),
                Some(Incoming::Control(c)) => {
                    self.done = true;
                    return match parse_reply(&c)? {
                        Reply::Exit(e) => Ok(Some(PtyEvent::Exit(e))),
                        r => Err(remote(r)),
                    };
                }
                Some(_) => {}
                None => {
                    self.done = true;
                    return Err(ended(&self.mux));
                }
            }
        }
    }
}

/// A stream of bytes from the agent (file read or tar download).
#[derive(Debug)]
pub struct FileReader {
    ch: Channel,
    size: u64,
    done: bool,
    mux: Mux,
    idle: Duration,
}

impl FileReader {
    /// Size announced by the agent (0 for a tar stream).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Next chunk; `Ok(None)` at the end. Each chunk has the call deadline.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        let mux = self.mux.clone();
        let ch = &mut self.ch;
        let r = with_deadline(Some(Instant::now() + self.idle), "file chunk", async {
            loop {
                match ch.recv().await {
                    Some(Incoming::Data(b)) => return Ok(Some(b)),
                    Some(Incoming::Control(c)) => {
                        return match parse_reply(&c)? {
                            Reply::Done { .. } => Ok(None),
                            r => Err(remote(r)),
                        };
                    }
                    Some(_) => {}
                    None => return Err(ended(&mux)),
                }
            }
        })
        .await;
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r
    }

    /// Read to the end, failing beyond `max` bytes.
    pub async fn read_to_end(mut self, max: usize) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        while let Some(b) = self.next().await? {
            if v.len() + b.len() > max {
                return Err(AgentError::Protocol(format!("stream exceeds the {max}-byte limit")));
            }
            v.extend_from_slice(&b);
        }
        Ok(v)
    }
}
