//! Exec: foreground processes (tied to a session) and background processes (tied to the agent,
//! re-attachable by handle across sessions).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::process::{self, Prepared, SpawnError, WaitStatus};
use super::{Agent, no_handle, reply};
use crate::mux::{Channel, ChannelSender, Incoming};
use crate::proto::{BackgroundInfo, ErrorKind, ExecRequest, ExitInfo, ProcessInfo, Reply, Request, User};

/// How long output pipes may stay open after the process exited (a grandchild holding them).
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// Default cap of a background process's log (head + tail).
const BACKGROUND_LOG_CAP: u64 = 4 * 1024 * 1024;
/// Finished background entries kept for `list`/`wait`.
const KEEP_FINISHED: usize = 256;

pub(crate) fn spawn_reply(e: SpawnError) -> Reply {
    let kind = match &e {
        SpawnError::Invalid(_) => ErrorKind::InvalidInput,
        SpawnError::NotFound(_) => ErrorKind::NotFound,
        SpawnError::Child(_, io) if io.kind() == std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        SpawnError::Child(_, io) if io.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    };
    Reply::error(kind, e.to_string())
}

/// Resolve user, cwd and environment shared by exec and PTY.
pub(crate) fn prepare(
    agent: &Agent,
    argv: &[String],
    extra_env: &std::collections::BTreeMap<String, String>,
    cwd: Option<&str>,
    user: Option<&User>,
    defaults: &[(&str, &str)],
) -> Result<Prepared, SpawnError> {
    let cwd = agent.path(cwd.unwrap_or(""));
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SpawnError::Invalid(format!(
                "working directory {} is not a directory",
                cwd.display()
            )));
        }
        Err(_) => {
            return Err(SpawnError::NotFound(format!(
                "working directory {} does not exist",
                cwd.display()
            )));
        }
    }
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    let (account, switch) = match user {
        Some(u) => {
            let a = process::lookup_user(u)?;
            let switch = a.uid != euid;
            (a, switch)
        }
        None if agent.cfg.guest => (process::lookup_user(&User::Uid(0))?, false),
        None => {
            let mut a = process::lookup_user(&User::Uid(euid))?;
            if let Ok(h) = std::env::var("HOME") {
                a.home = h;
            }
            (a, false)
        }
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), agent.cfg.path.clone()),
        ("HOME".into(), account.home.clone()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
    ];
    for (k, v) in defaults {
        env.push(((*k).into(), (*v).into()));
    }
    if defaults.iter().any(|(k, _)| *k == "SHELL") {
        env.retain(|(k, _)| k != "SHELL");
        env.push(("SHELL".into(), account.shell.clone()));
    }
    for (k, v) in extra_env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let cwd_s = cwd
        .to_str()
        .ok_or_else(|| SpawnError::Invalid("cwd is not UTF-8".into()))?;
    Prepared::new(argv, &env, cwd_s, switch.then_some(&account))
}

/// A started process with its pipes.
pub(crate) struct Spawned {
    pub pid: i32,
    pub status: watch::Receiver<Option<WaitStatus>>,
    pub stdin: Option<pipe::Sender>,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

async fn spawn(
    agent: &Arc<Agent>,
    req: &ExecRequest,
    background: Option<String>,
    stdin: bool,
) -> Result<Spawned, SpawnError> {
    let mut spec = prepare(agent, &req.argv, &req.env, req.cwd.as_deref(), req.user.as_ref(), &[])?;
    let (in_r, in_w): (OwnedFd, Option<OwnedFd>) = if stdin {
        let (r, w) = process::pipe()?;
        (r, Some(w))
    } else {
        (
            process::dev_null().map_err(|e| SpawnError::Os("open /dev/null", e))?,
            None,
        )
    };
    let (out_r, out_w) = process::pipe()?;
    let (err_r, err_w) = process::pipe()?;
    spec.stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let info = ProcessInfo {
        pid: 0,
        argv: req.argv.clone(),
        background,
        pty: false,
    };
    let reaper = agent.reaper.clone();
    let (pid, status) = tokio::task::spawn_blocking(move || {
        let r = reaper.spawn(&spec, info);
        drop((in_r, out_w, err_w));
        r
    })
    .await
    .map_err(|e| SpawnError::Os("spawn task", std::io::Error::other(e)))??;
    let wrap = |e| SpawnError::Os("register pipe", e);
    Ok(Spawned {
        pid,
        status,
        stdin: in_w.map(pipe::Sender::from_owned_fd).transpose().map_err(wrap)?,
        stdout: pipe::Receiver::from_owned_fd(out_r).map_err(wrap)?,
        stderr: pipe::Receiver::from_owned_fd(err_r).map_err(wrap)?,
    })
}

async fn wait_status(rx: &mut watch::Receiver<Option<WaitStatus>>) -> WaitStatus {
    loop {
        if let Some(s) = *rx.borrow_and_update() {
            return s;
        }
        if rx.changed().await.is_err() {
            // The reaper dropped the sender without a status: cannot happen while it runs.
            return 0;
        }
    }
}

/// Head + tail cap for one foreground stream.
struct Cap {
    head_left: u64,
    tail_cap: u64,
    tail: VecDeque<Bytes>,
    tail_len: u64,
    dropped: u64,
}

impl Cap {
    fn new(cap: u64) -> Self {
        Cap {
            head_left: cap - cap / 2,
            tail_cap: cap / 2,
            tail: VecDeque::new(),
            tail_len: 0,
            dropped: 0,
        }
    }

    /// Returns the part to send now; keeps the rest in the tail.
    fn push(&mut self, mut b: Bytes) -> Bytes {
        let n = (self.head_left).min(b.len() as u64) as usize;
        let now = b.split_to(n);
        self.head_left -= n as u64;
        if !b.is_empty() {
            self.tail_len += b.len() as u64;
            self.tail.push_back(b);
            while self.tail_len > self.tail_cap {
                let over = self.tail_len - self.tail_cap;
                let front = self.tail.front_mut().expect("tail_len > 0 implies a chunk");
                if front.len() as u64 <= over {
                    let f = self.tail.pop_front().expect("checked");
                    self.tail_len -= f.len() as u64;
                    self.dropped += f.len() as u64;
                } else {
                    let _ = front.split_to(over as usize);
                    self.tail_len -= over;
                    self.dropped += over;
                }
            }
        }
        now
    }
}

async fn pump(
    mut rx: pipe::Receiver,
    tx: ChannelSender,
    is_err: bool,
    cap: Option<u64>,
    stop: CancellationToken,
) -> u64 {
    let mut cap = cap.map(Cap::new);
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { if is_err { tx.stderr(b).await } else { tx.data(b).await } }
    };
    loop {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let n = tokio::select! {
            biased;
            r = rx.read_buf(&mut buf) => r.unwrap_or(0),
            _ = stop.cancelled() => 0,
        };
        if n == 0 {
            break;
        }
        let b = buf.freeze();
        let now = match cap.as_mut() {
            Some(c) => c.push(b),
            None => b,
        };
        if !now.is_empty() && send(now).await.is_err() {
            return 0;
        }
    }
    match cap {
        Some(c) => {
            for b in c.tail {
                if send(b).await.is_err() {
                    break;
                }
            }
            c.dropped
        }
        None => 0,
    }
}

/// Run a foreground exec on `ch` until it ends; the session ending or the host cancelling the
/// channel kills the process group.
pub async fn foreground(agent: &Arc<Agent>, mut ch: Channel, req: ExecRequest) {
    let sp = match spawn(agent, &req, None, req.stdin).await {
        Ok(s) => s,
        Err(e) => {
            let _ = reply(&ch, spawn_reply(e)).await;
            return;
        }
    };
    let Spawned {
        pid,
        mut status,
        stdin,
        stdout,
        stderr,
    } = sp;
    let deadline = req
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    if reply(&ch, Reply::Started { pid }).await.is_err() {
        process::kill_group(pid, libc::SIGKILL);
        return;
    }
    let stop = CancellationToken::new();
    let tx = ch.sender().clone();
    let out = tokio::spawn(pump(stdout, tx.clone(), false, req.output_cap, stop.clone()));
    let err = tokio::spawn(pump(stderr, tx.clone(), true, req.output_cap, stop.clone()));
    let mut stdin = stdin;
    type Write = std::pin::Pin<Box<dyn std::future::Future<Output = (pipe::Sender, std::io::Result<()>)> + Send>>;
    let mut writing: Option<Write> = None;
    let mut eof_after_write = false;
    let mut timed_out = false;
    let mut abandoned = false;
    let st = loop {
        tokio::select! {
            s = wait_status(&mut status) => break s,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() && !timed_out => {
                timed_out = true;
                process::kill_group(pid, libc::SIGKILL);
            }
            (s, r) = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                if r.is_ok() && !eof_after_write { stdin = Some(s) }
            }
            // Noticed even while a stdin write is blocked on a process that does not read.
            _ = tx.closed(), if !abandoned => {
                abandoned = true;
                process::kill_group(pid, libc::SIGKILL);
            }
            m = ch.recv(), if writing.is_none() && !abandoned => match m {
                None => {
                    abandoned = true;
                    process::kill_group(pid, libc::SIGKILL);
                }
                Some(Incoming::Data(b)) => {
                    if let Some(mut s) = stdin.take() {
                        writing = Some(Box::pin(async move { let r = s.write_all(&b).await; (s, r) }));
                    }
                }
                Some(Incoming::Eof) => {
                    stdin = None;
                    eof_after_write = true;
                }
                Some(Incoming::Control(c)) => {
                    if let Ok(Request::Signal { signal }) = serde_json::from_slice(&c) {
                        process::kill_group(pid, signal);
                    }
                }
                Some(Incoming::Stderr(_)) => {}
            },
        }
    };
    drop(stdin);
    drop(writing);
    let drained = async {
        let o = out.await.unwrap_or(0);
        let e = err.await.unwrap_or(0);
        (o, e)
    };
    tokio::pin!(drained);
    let (o, e) = tokio::select! {
        r = &mut drained => r,
        _ = tokio::time::sleep(DRAIN_GRACE) => { stop.cancel(); drained.await }
    };
    if abandoned {
        return;
    }
    let mut info = process::exit_info(st);
    info.timed_out = timed_out;
    info.stdout_dropped = o;
    info.stderr_dropped = e;
    let _ = reply(&ch, Reply::Exit(info)).await;
}

// ---------------------------------------------------------------------------------------------
// Background processes

#[derive(Debug)]
struct Log {
    head: Vec<(bool, Bytes)>,
    head_len: u64,
    head_cap: u64,
    /// (offset, is_stderr, bytes)
    tail: VecDeque<(u64, bool, Bytes)>,
    tail_len: u64,
    tail_cap: u64,
    total: u64,
    dropped: [u64; 2],
    exit: Option<ExitInfo>,
}

impl Log {
    fn new(cap: u64) -> Self {
        Log {
            head: Vec::new(),
            head_len: 0,
            head_cap: cap - cap / 2,
            tail: VecDeque::new(),
            tail_len: 0,
            tail_cap: cap / 2,
            total: 0,
            dropped: [0; 2],
            exit: None,
        }
    }

    fn push(&mut self, is_err: bool, mut b: Bytes) {
        let n = (self.head_cap - self.head_len).min(b.len() as u64) as usize;
        if n > 0 {
            self.head.push((is_err, b.split_to(n)));
            self.head_len += n as u64;
            self.total += n as u64;
        }
        if b.is_empty() {
            return;
        }
        let len = b.len() as u64;
        self.tail.push_back((self.total, is_err, b));
        self.total += len;
        self.tail_len += len;
        while self.tail_len > self.tail_cap {
            let over = self.tail_len - self.tail_cap;
            let (off, e, front) = self.tail.front_mut().expect("tail_len > 0 implies a chunk");
            let idx = *e as usize;
            if front.len() as u64 <= over {
                let l = front.len() as u64;
                self.tail.pop_front();
                self.tail_len -= l;
                self.dropped[idx] += l;
            } else {
                let _ = front.split_to(over as usize);
                *off += over;
                self.tail_len -= over;
                self.dropped[idx] += over;
            }
        }
    }

    /// Chunks from `cursor` on; advances the cursor.
    fn since(&self, cursor: &mut u64) -> Vec<(bool, Bytes)> {
        let mut v = Vec::new();
        let mut off = 0u64;
        for (e, b) in &self.head {
            let end = off + b.len() as u64;
            if end > *cursor {
                let skip = cursor.saturating_sub(off) as usize;
                v.push((*e, b.slice(skip..)));
                *cursor = end;
            }
            off = end;
        }
        for (o, e, b) in &self.tail {
            let end = o + b.len() as u64;
            if end > *cursor {
                let skip = cursor.saturating_sub(*o) as usize;
                v.push((*e, b.slice(skip.min(b.len())..)));
                *cursor = end;
            }
        }
        v
    }
}

/// One background process.
#[derive(Debug)]
pub struct BgProc {
    /// Its handle.
    pub handle: String,
    /// Its pid (also its process group).
    pub pid: i32,
    argv: Vec<String>,
    log: Mutex<Log>,
    changed: watch::Sender<u64>,
}

impl BgProc {
    fn info(&self) -> BackgroundInfo {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        BackgroundInfo {
            handle: self.handle.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            exit: log.exit.clone(),
            output_bytes: log.total,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Registry of background processes (outlives sessions).
#[derive(Default)]
pub struct Background {
    procs: Mutex<HashMap<String, Arc<BgProc>>>,
    order: Mutex<VecDeque<String>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background").finish_non_exhaustive()
    }
}

impl Background {
    /// Look up a handle.
    pub fn get(&self, handle: &str) -> Option<Arc<BgProc>> {
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(handle)
            .cloned()
    }

    /// All known background processes, oldest first.
    pub fn list(&self) -> Vec<BackgroundInfo> {
        let order = self.order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        order.iter().filter_map(|h| self.get(h)).map(|p| p.info()).collect()
    }

    fn insert(&self, p: Arc<BgProc>) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        procs.insert(p.handle.clone(), p.clone());
        order.push_back(p.handle.clone());
        // Forget the oldest finished ones beyond the limit.
        let finished: Vec<String> = order
            .iter()
            .filter(|h| {
                procs
                    .get(*h)
                    .is_some_and(|p| p.log.lock().unwrap_or_else(|e| e.into_inner()).exit.is_some())
            })
            .cloned()
            .collect();
        if finished.len() > KEEP_FINISHED {
            for h in &finished[..finished.len() - KEEP_FINISHED] {
                procs.remove(h);
                order.retain(|x| x != h);
            }
        }
    }
}

async fn log_pump(mut rx: pipe::Receiver, p: Arc<BgProc>, is_err: bool, stop: CancellationToken) {
    loop {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let n = tokio::select! {
            biased;
            r = rx.read_buf(&mut buf) => r.unwrap_or(0),
            _ = stop.cancelled() => 0,
        };
        if n == 0 {
            return;
        }
        p.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(is_err, buf.freeze());
        p.bump();
    }
}

/// Start a background process and reply with its handle.
pub async fn spawn_background(agent: &Arc<Agent>, ch: Channel, req: ExecRequest) {
    let n = agent.background.next.fetch_add(1, Ordering::Relaxed) + 1;
    let handle = format!("bg-{n}");
    let sp = match spawn(agent, &req, Some(handle.clone()), false).await {
        Ok(s) => s,
        Err(e) => {
            let _ = reply(&ch, spawn_reply(e)).await;
            return;
        }
    };
    let Spawned {
        pid,
        mut status,
        stdout,
        stderr,
        ..
    } = sp;
    let p = Arc::new(BgProc {
        handle: handle.clone(),
        pid,
        argv: req.argv.clone(),
        log: Mutex::new(Log::new(req.output_cap.unwrap_or(BACKGROUND_LOG_CAP).max(2))),
        changed: watch::channel(0).0,
    });
    agent.background.insert(p.clone());
    let timeout = req.timeout_ms.map(Duration::from_millis);
    tokio::spawn(async move {
        let stop = CancellationToken::new();
        let o = tokio::spawn(log_pump(stdout, p.clone(), false, stop.clone()));
        let e = tokio::spawn(log_pump(stderr, p.clone(), true, stop.clone()));
        let mut timed_out = false;
        let st = match timeout {
            Some(t) => match tokio::time::timeout(t, wait_status(&mut status)).await {
                Ok(s) => s,
                Err(_) => {
                    timed_out = true;
                    process::kill_group(pid, libc::SIGKILL);
                    wait_status(&mut status).await
                }
            },
            None => wait_status(&mut status).await,
        };
        let drained = async {
            let _ = o.await;
            let _ = e.await;
        };
        tokio::pin!(drained);
        tokio::select! {
            _ = &mut drained => {}
            _ = tokio::time::sleep(DRAIN_GRACE) => { stop.cancel(); drained.await }
        }
        {
            let mut log = p.log.lock().unwrap_or_else(|e| e.into_inner());
            let mut info = process::exit_info(st);
            info.timed_out = timed_out;
            info.stdout_dropped = log.dropped[0];
            info.stderr_dropped = log.dropped[1];
            log.exit = Some(info);
        }
        p.bump();
    });
    let _ = reply(&ch, Reply::Spawned { handle, pid }).await;
}

/// Stream a background process's output from `from` until it exits.
pub async fn attach(agent: &Arc<Agent>, mut ch: Channel, handle: &str, from: u64) {
    let Some(p) = agent.background.get(handle) else {
        let _ = reply(&ch, no_handle(handle)).await;
        return;
    };
    let mut rx = p.changed.subscribe();
    let mut cursor = from;
    let tx = ch.sender().clone();
    loop {
        rx.borrow_and_update();
        let (chunks, exit) = {
            let log = p.log.lock().unwrap_or_else(|e| e.into_inner());
            let chunks = log.since(&mut cursor);
            (chunks, log.exit.clone())
        };
        for (is_err, b) in chunks {
            let r = if is_err { tx.stderr(b).await } else { tx.data(b).await };
            if r.is_err() {
                return;
            }
        }
        if let Some(e) = exit {
            let _ = reply(&ch, Reply::Exit(e)).await;
            return;
        }
        tokio::select! {
            _ = rx.changed() => {}
            m = ch.recv() => if m.is_none() { return },
        }
    }
}

/// Wait for a background process to exit.
pub async fn wait(agent: &Arc<Agent>, mut ch: Channel, handle: &str) {
    let Some(p) = agent.background.get(handle) else {
        let _ = reply(&ch, no_handle(handle)).await;
        return;
    };
    let mut rx = p.changed.subscribe();
    loop {
        rx.borrow_and_update();
        let exit = p.log.lock().unwrap_or_else(|e| e.into_inner()).exit.clone();
        if let Some(e) = exit {
            let _ = reply(&ch, Reply::Exit(e)).await;
            return;
        }
        tokio::select! {
            _ = rx.changed() => {}
            m = ch.recv() => if m.is_none() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_head_and_tail() {
        let mut c = Cap::new(10);
        let mut sent = Vec::new();
        for chunk in [&b"0123"[..], b"4567", b"89ab", b"cdef"] {
            sent.extend_from_slice(&c.push(Bytes::copy_from_slice(chunk)));
        }
        let tail: Vec<u8> = c.tail.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(sent, b"01234");
        assert_eq!(tail, b"bcdef");
        assert_eq!(c.dropped, 6);
    }

    #[test]
    fn log_offsets() {
        let mut l = Log::new(8);
        l.push(false, Bytes::from_static(b"abc"));
        l.push(true, Bytes::from_static(b"defgh"));
        l.push(false, Bytes::from_static(b"ijklmn"));
        assert_eq!(l.total, 14);
        let mut cur = 0;
        let all: Vec<u8> = l.since(&mut cur).into_iter().flat_map(|(_, b)| b.to_vec()).collect();
        assert_eq!(all, b"abcdklmn");
        assert_eq!(cur, 14);
        let mut cur = 12;
        let rest: Vec<u8> = l.since(&mut cur).into_iter().flat_map(|(_, b)| b.to_vec()).collect();
        assert_eq!(rest, b"mn");
    }
}
