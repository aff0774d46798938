//! The agent side: sessions over any byte stream, and dispatch of requests to handlers.

pub mod connect;
pub mod exec;
pub mod files;
pub mod guest;
pub mod process;
pub mod pty;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::frame::{self, Frame, FrameKind, FrameReader};
use crate::mux::{Channel, Incoming, Mux};
use crate::proto::{AgentInfo, ErrorKind, PROTOCOL_VERSION, Reply, Request, SESSION_CHANNEL};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Default working directory and base of relative paths.
    pub workspace: PathBuf,
    /// Running as the guest's PID 1 (root, real clock, power off on shutdown).
    pub guest: bool,
    /// Actually set the clock on `SetClock` (always in guest mode; in test mode only with this
    /// flag and as root).
    pub set_clock: bool,
    /// PATH given to processes.
    pub path: String,
}

impl Config {
    /// Test-mode configuration rooted at `workspace`.
    pub fn test(workspace: PathBuf) -> Self {
        Config {
            workspace,
            guest: false,
            set_clock: false,
            path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        }
    }
}

#[derive(Default)]
struct Sessions {
    max_epoch: u64,
    live: Vec<(u64, CancellationToken)>,
}

/// State shared by every session of one agent process.
pub struct Agent {
    /// Configuration.
    pub cfg: Config,
    /// Child registry and reaper.
    pub reaper: Arc<process::Reaper>,
    /// Background processes.
    pub background: exec::Background,
    boot_id: String,
    started: Instant,
    sessions: Mutex<Sessions>,
    /// Cancelled when a `Shutdown` request arrives.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("cfg", &self.cfg)
            .field("boot_id", &self.boot_id)
            .finish()
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One live session, as handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The multiplexer of this session's stream.
    pub mux: Mux,
    /// Epoch the host opened it with.
    pub epoch: u64,
}

impl Agent {
    /// Create the agent and start its reaper (needs a tokio runtime).
    pub fn new(cfg: Config) -> std::io::Result<Arc<Agent>> {
        let boot_id = if cfg.guest {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| random_hex(16))
        } else {
            random_hex(16)
        };
        let reaper = Arc::new(process::Reaper::default());
        reaper.start()?;
        Ok(Arc::new(Agent {
            cfg,
            reaper,
            background: exec::Background::default(),
            boot_id,
            started: Instant::now(),
            sessions: Mutex::new(Sessions::default()),
            shutdown: CancellationToken::new(),
        }))
    }

    /// Resolve a request path: absolute, or relative to the workspace.
    pub fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() {
            self.cfg.workspace.clone()
        } else if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            self.cfg.workspace.join(p)
        }
    }

    fn info(&self) -> AgentInfo {
        AgentInfo {
            version: PROTOCOL_VERSION,
            boot_id: self.boot_id.clone(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            epoch: self.sessions.lock().unwrap_or_else(|e| e.into_inner()).max_epoch,
            processes: self.reaper.list(),
        }
    }

    /// Serve one session on `stream` until it ends (EOF, protocol error, superseded).
    pub async fn serve_stream<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_session(stream, None).await;
    }

    /// Serve one session on `stream`, optionally starting from an already read first frame.
    /// Returns the frame that ended the session if it was a new session's first frame on the
    /// same stream (serve it next, with a fresh reader: partial input of the old one is gone).
    pub async fn serve_session<S>(self: &Arc<Self>, stream: S, first: Option<Frame>) -> Option<Frame>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd);
        let refuse = |kind, msg: String| {
            let json = serde_json::to_vec(&Reply::error(kind, msg)).unwrap_or_default();
            Frame::new(FrameKind::Control, SESSION_CHANNEL, json)
        };
        let first = match first {
            Some(f) => Ok(Some(f)),
            None => reader.read().await,
        };
        let hello = match first {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                let f = refuse(ErrorKind::Protocol, format!("{e}: {}", source_text(&e)));
                let _ = write_frame(&mut wr, &f).await;
                return None;
            }
        };
        let req = (hello.kind == FrameKind::Control && hello.channel == SESSION_CHANNEL)
            .then(|| serde_json::from_slice::<Request>(&hello.payload).ok())
            .flatten();
        let Some(Request::Hello { version, epoch }) = req else {
            let f = refuse(ErrorKind::Protocol, "the first frame must be hello on channel 0".into());
            let _ = write_frame(&mut wr, &f).await;
            return None;
        };
        if version != PROTOCOL_VERSION {
            let msg = format!("protocol version {version} is not supported (agent speaks {PROTOCOL_VERSION})");
            let _ = write_frame(&mut wr, &refuse(ErrorKind::VersionMismatch, msg)).await;
            return None;
        }
        let token = CancellationToken::new();
        let stale = {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if epoch < s.max_epoch {
                Some(format!("epoch {epoch} is older than the current epoch {}", s.max_epoch))
            } else {
                if epoch > s.max_epoch {
                    // A newer session supersedes every older one: their foreground work ends.
                    for (_, t) in s.live.drain(..) {
                        t.cancel();
                    }
                    s.max_epoch = epoch;
                }
                s.live.push((epoch, token.clone()));
                None
            }
        };
        if let Some(msg) = stale {
            let _ = write_frame(&mut wr, &refuse(ErrorKind::StaleEpoch, msg)).await;
            return None;
        }
        let ok = Reply::HelloOk {
            version: PROTOCOL_VERSION,
            boot_id: self.boot_id.clone(),
            epoch,
        };
        let ok = Frame::new(
            FrameKind::Control,
            SESSION_CHANNEL,
            serde_json::to_vec(&ok).unwrap_or_default(),
        );
        if write_frame(&mut wr, &ok).await.is_err() {
            token.cancel();
        }
        let (acc_tx, mut acc_rx) = mpsc::unbounded_channel();
        let mux = Mux::start(reader, wr, Some(acc_tx), token.clone());
        let sess = Session {
            mux: mux.clone(),
            epoch,
        };
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                ch = acc_rx.recv() => match ch {
                    Some(ch) => {
                        let me = self.clone();
                        let sess = sess.clone();
                        tokio::spawn(async move { me.handle(sess, ch).await });
                    }
                    None => break,
                },
            }
        }
        // Protocol violations are worth a line on the console; ordinary disconnects are not.
        if let Some(reason) = mux.end_reason()
            && (reason.contains("malformed") || reason.contains("window") || reason.contains("ended inside"))
        {
            eprintln!("capsules-agent: session {epoch} ended: {reason}");
        }
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .retain(|(_, t)| !t.is_cancelled());
        mux.take_rehello()
    }

    async fn handle(self: Arc<Self>, sess: Session, mut ch: Channel) {
        let Some(Incoming::Control(first)) = ch.recv().await else {
            return;
        };
        let req: Request = match serde_json::from_slice(&first) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply(
                    &ch,
                    Reply::error(ErrorKind::InvalidInput, format!("malformed request: {e}")),
                )
                .await;
                return;
            }
        };
        match req {
            Request::Ping => {
                let _ = reply(&ch, Reply::Pong).await;
            }
            Request::Quiesce => {
                let json = serde_json::to_vec(&Reply::Quiesced).unwrap_or_default();
                sess.mux.seal(Frame::new(FrameKind::Control, ch.id, json));
            }
            Request::Exec(r) => exec::foreground(&self, ch, r).await,
            Request::SpawnBackground(r) => exec::spawn_background(&self, ch, r).await,
            Request::ListBackground => {
                let processes = self.background.list();
                let _ = reply(&ch, Reply::Background { processes }).await;
            }
            Request::Attach { handle, from_offset } => exec::attach(&self, ch, &handle, from_offset).await,
            Request::SignalBackground { handle, signal } => {
                let r = match self.background.get(&handle) {
                    Some(p) => {
                        process::kill_group(p.pid, signal);
                        Reply::Ok
                    }
                    None => no_handle(&handle),
                };
                let _ = reply(&ch, r).await;
            }
            Request::Wait { handle } => exec::wait(&self, ch, &handle).await,
            Request::Pty(r) => pty::run(&self, ch, r).await,
            Request::Connect { port } => connect::run(ch, port).await,
            Request::ReadFile { path } => files::read(&self, ch, &path).await,
            Request::WriteFile { path, mode } => files::write(&self, ch, &path, mode).await,
            Request::ListDir { path } => files::list(&self, ch, &path).await,
            Request::Stat { path } => files::stat(&self, ch, &path).await,
            Request::Mkdir { path } => files::mkdir(&self, ch, &path).await,
            Request::Remove { path, recursive } => files::remove(&self, ch, &path, recursive).await,
            Request::Rename { from, to } => files::rename(&self, ch, &from, &to).await,
            Request::UploadTar { dest } => files::upload_tar(&self, ch, &dest).await,
            Request::DownloadTar { path } => files::download_tar(&self, ch, &path).await,
            Request::SetClock { unix_nanos } => {
                let _ = reply(&ch, self.set_clock(unix_nanos)).await;
            }
            Request::Info => {
                let _ = reply(&ch, Reply::Info(self.info())).await;
            }
            Request::Shutdown => {
                let _ = reply(&ch, Reply::Ok).await;
                // Let the reply reach the host before the agent tears things down.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                self.shutdown.cancel();
            }
            Request::Hello { .. } => {
                let _ = reply(
                    &ch,
                    Reply::error(
                        ErrorKind::InvalidInput,
                        "hello is only valid as the first frame, on channel 0",
                    ),
                )
                .await;
            }
            Request::Signal { .. } | Request::Resize { .. } => {
                let _ = reply(
                    &ch,
                    Reply::error(
                        ErrorKind::InvalidInput,
                        "signal and resize are only valid on an open exec or PTY channel",
                    ),
                )
                .await;
            }
        }
    }

    fn set_clock(&self, unix_nanos: i64) -> Reply {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !(self.cfg.guest || (self.cfg.set_clock && root)) {
            return Reply::Ok;
        }
        let ts = libc::timespec {
            tv_sec: unix_nanos.div_euclid(1_000_000_000),
            tv_nsec: unix_nanos.rem_euclid(1_000_000_000),
        };
        // SAFETY: valid timespec pointer.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
            let e = std::io::Error::last_os_error();
            return Reply::error(ErrorKind::PermissionDenied, format!("clock_settime failed: {e}"));
        }
        Reply::Ok
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    let mut buf = bytes::BytesMut::new();
    frame::encode(f, &mut buf).map_err(std::io::Error::other)?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// Send a control reply on a channel.
pub(crate) async fn reply(ch: &Channel, r: Reply) -> Result<(), crate::mux::Ended> {
    ch.sender().control(&r).await
}

pub(crate) fn no_handle(handle: &str) -> Reply {
    Reply::error(
        ErrorKind::NotFound,
        format!("no background process with handle {handle:?}"),
    )
}

pub(crate) fn io_reply(what: &str, path: &Path, e: &std::io::Error) -> Reply {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::AlreadyExists => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    };
    Reply::error(kind, format!("{what} {}: {e}", path.display()))
}

/// Serve sessions on a unix socket forever (test mode).
pub async fn serve_unix(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let a = agent.clone();
                tokio::spawn(async move { a.serve_stream(stream).await });
            }
            Err(e) => {
                eprintln!("capsules-agent: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
