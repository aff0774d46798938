//! Simulated processes: where their output goes, how the capsule's lifecycle reaches them, and
//! the driver that ends them (exit, timeout, signal, terminate, sleep, restart).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capsules_core::backend::{ExecEvent, ExitStatus, PtyEvent};
use capsules_core::types::CapsuleId;
use capsules_core::{Error, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The capsule's lifecycle as running processes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Sleeping,
    /// The VM is gone (failed); processes die, the disk is kept.
    Failed,
    Terminated,
}

/// `boot` changes on every restart: processes of an older generation are dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Life {
    pub boot: u64,
    pub phase: Phase,
}

/// Waits `d` of the capsule's awake time: the timer stops while the capsule sleeps (its memory is
/// frozen), and never returns once the capsule is gone (the driver ends the process).
pub(crate) async fn sleep_awake(life: &mut watch::Receiver<Life>, d: Duration) {
    let mut remaining = d;
    loop {
        let phase = life.borrow_and_update().phase;
        match phase {
            Phase::Running => {}
            Phase::Sleeping => {
                if life.changed().await.is_err() {
                    return std::future::pending().await;
                }
                continue;
            }
            Phase::Failed | Phase::Terminated => return std::future::pending().await,
        }
        let start = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(remaining) => return,
            r = life.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                remaining = remaining.saturating_sub(start.elapsed());
            }
        }
    }
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Where a process's output goes.
pub(crate) trait Sink: Send + Sync {
    fn write(&self, stream: Stream, data: Bytes);
}

/// A foreground exec's output: streamed as produced, keeping the head of each stream and a ring
/// of its tail; the tail is sent at exit and the middle is counted as dropped.
pub(crate) struct CappedSink {
    tx: mpsc::UnboundedSender<Result<ExecEvent>>,
    caps: Mutex<[Capped; 2]>,
}

struct Capped {
    head_left: u64,
    tail_cap: usize,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl CappedSink {
    pub(crate) fn new(tx: mpsc::UnboundedSender<Result<ExecEvent>>, cap: u64) -> Self {
        let tail_cap = (cap / 2) as usize;
        let head = cap - cap / 2;
        let c = || Capped {
            head_left: head,
            tail_cap,
            tail: Default::default(),
            dropped: 0,
        };
        CappedSink {
            tx,
            caps: Mutex::new([c(), c()]),
        }
    }

    /// Sends the kept tails; returns the bytes dropped from (stdout, stderr).
    pub(crate) fn finish(&self) -> (u64, u64) {
        let mut caps = self.caps.lock().unwrap();
        for (i, c) in caps.iter_mut().enumerate() {
            if !c.tail.is_empty() {
                let b = Bytes::from(c.tail.drain(..).collect::<Vec<u8>>());
                let _ = self.tx.send(Ok(if i == 0 {
                    ExecEvent::Stdout(b)
                } else {
                    ExecEvent::Stderr(b)
                }));
            }
        }
        (caps[0].dropped, caps[1].dropped)
    }

    pub(crate) fn send(&self, ev: Result<ExecEvent>) {
        let _ = self.tx.send(ev);
    }
}

impl Sink for CappedSink {
    fn write(&self, stream: Stream, data: Bytes) {
        let mut caps = self.caps.lock().unwrap();
        let c = &mut caps[if stream == Stream::Stdout { 0 } else { 1 }];
        let n = (data.len() as u64).min(c.head_left) as usize;
        if n > 0 {
            c.head_left -= n as u64;
            let head = data.slice(..n);
            let _ = self.tx.send(Ok(match stream {
                Stream::Stdout => ExecEvent::Stdout(head),
                Stream::Stderr => ExecEvent::Stderr(head),
            }));
        }
        let rest = &data[n..];
        if rest.is_empty() {
            return;
        }
        c.tail.extend(rest);
        if c.tail.len() > c.tail_cap {
            let excess = c.tail.len() - c.tail_cap;
            c.tail.drain(..excess);
            c.dropped += excess as u64;
        }
    }
}

/// A background process's output: kept whole (combined stdout and stderr) for attach.
pub(crate) struct BackgroundSink(pub Arc<Proc>);

impl Sink for BackgroundSink {
    fn write(&self, _stream: Stream, data: Bytes) {
        self.0.st.lock().unwrap().output.extend_from_slice(&data);
        self.0.changed.send_modify(|v| *v += 1);
    }
}

/// A terminal's output: `\n` becomes `\r\n` (the line discipline's `onlcr`).
pub(crate) struct PtySink(pub mpsc::UnboundedSender<Result<PtyEvent>>);

pub(crate) fn onlcr(data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(data.len() + 8);
    for &b in data {
        if b == b'\n' {
            v.push(b'\r');
        }
        v.push(b);
    }
    Bytes::from(v)
}

impl Sink for PtySink {
    fn write(&self, _stream: Stream, data: Bytes) {
        let _ = self.0.send(Ok(PtyEvent::Output(onlcr(&data))));
    }
}

/// What the process table keeps of one process.
#[derive(Debug, Default)]
pub(crate) struct ProcState {
    pub output: Vec<u8>,
    pub exit: Option<ExitStatus>,
}

/// A process started through the API.
#[derive(Debug)]
pub(crate) struct Proc {
    pub pid: u32,
    pub handle: Option<String>,
    pub argv: Vec<String>,
    pub st: Mutex<ProcState>,
    /// Bumped on every output and at exit (attach waits on it).
    pub changed: watch::Sender<u64>,
    pub signals: mpsc::UnboundedSender<i32>,
}

impl Proc {
    pub(crate) fn info(&self) -> capsules_core::backend::ProcessInfo {
        let st = self.st.lock().unwrap();
        capsules_core::backend::ProcessInfo {
            handle: self.handle.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            running: st.exit.is_none(),
            exit: st.exit.clone(),
        }
    }
}

/// Signals whose default action is not to end the process.
pub(crate) fn is_harmless(sig: i32) -> bool {
    matches!(sig, 0 | 17 | 18 | 23 | 28)
}

/// How a process ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    /// The call was cut (terminate, sleep of a foreground call, restart); the error says which.
    Cut(Error),
}

pub(crate) fn terminated(id: &CapsuleId) -> Error {
    Error::conflict(format!("capsule {id} was terminated"))
}

pub(crate) fn slept(id: &CapsuleId) -> Error {
    Error::unavailable(format!(
        "capsule {id} went to sleep during the call; retry once it is awake"
    ))
}

pub(crate) fn restarted(id: &CapsuleId) -> Error {
    Error::unavailable(format!("capsule {id} was restarted or lost during the call; retry"))
}

/// What cuts a call in flight, given the life it started in; `None` if it goes on.
pub(crate) fn cut(id: &CapsuleId, now: Life, boot: u64, cut_by_sleep: bool) -> Option<Error> {
    match now.phase {
        Phase::Terminated => Some(terminated(id)),
        Phase::Failed => Some(restarted(id)),
        _ if now.boot != boot => Some(restarted(id)),
        Phase::Sleeping if cut_by_sleep => Some(slept(id)),
        _ => None,
    }
}

/// Aborts a task when dropped (a process group dies with its leader's frame).
pub(crate) struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `program` until it exits, times out, is signalled, or the capsule's lifecycle cuts it.
/// A foreground process is cut by sleep (the call fails with `Unavailable`); a background one is
/// frozen instead (its timers stop) and killed (SIGKILL) by restart.
pub(crate) struct Drive {
    pub id: CapsuleId,
    pub life: watch::Receiver<Life>,
    pub boot: u64,
    pub foreground: bool,
    pub timeout: Option<Duration>,
    pub signals: mpsc::UnboundedReceiver<i32>,
}

impl Drive {
    pub(crate) async fn run(
        mut self,
        program: futures::future::BoxFuture<'static, i32>,
        closed: Option<&mpsc::UnboundedSender<Result<ExecEvent>>>,
    ) -> Outcome {
        let mut task = tokio::spawn(program);
        let _guard = AbortOnDrop(task.abort_handle());
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let closed = async {
            match closed {
                Some(tx) => tx.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(closed);
        loop {
            tokio::select! {
                r = &mut task => return Outcome::Exited(r.unwrap_or(134)),
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return Outcome::TimedOut;
                }
                Some(sig) = self.signals.recv() => {
                    if !is_harmless(sig) {
                        return Outcome::Signaled(sig);
                    }
                }
                r = self.life.changed() => {
                    let now = if r.is_err() {
                        Life { boot: self.boot, phase: Phase::Terminated }
                    } else {
                        *self.life.borrow_and_update()
                    };
                    if let Some(e) = cut(&self.id, now, self.boot, self.foreground) {
                        if !self.foreground && now.phase != Phase::Terminated {
                            return Outcome::Signaled(9);
                        }
                        return Outcome::Cut(e);
                    }
                }
                _ = &mut closed => return Outcome::Signaled(9),
            }
        }
    }
}

/// The exit status for an outcome, if it has one.
pub(crate) fn status_of(o: &Outcome) -> Option<ExitStatus> {
    match o {
        // Programs report a signal death as a negative code.
        Outcome::Exited(c) if *c < 0 => Some(ExitStatus {
            signal: Some(-*c),
            ..Default::default()
        }),
        Outcome::Exited(c) => Some(ExitStatus {
            code: Some(*c),
            ..Default::default()
        }),
        Outcome::Signaled(s) => Some(ExitStatus {
            signal: Some(*s),
            ..Default::default()
        }),
        Outcome::TimedOut => Some(ExitStatus {
            signal: Some(9),
            timed_out: true,
            ..Default::default()
        }),
        Outcome::Cut(_) => None,
    }
}
