//! # capsules-backend-mock
//!
//! An in-memory [`Backend`] for tests: fast, deterministic (tokio time, so `tokio::time::pause()`
//! makes it instant), with scripted exec results, injectable faults and inspection helpers. It
//! declares every capability and simulates each at the level of the contract; it exists for tests,
//! never as a way to run capsules.
//!
//! ```
//! use std::time::Duration;
//! use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend, Op};
//! use capsules_core::backend::{Backend, BackendExt, ExecRequest};
//! use capsules_core::ErrorKind;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> capsules_core::Result<()> {
//! let mock = MockBackend::new();
//! let spec = capsules_backend_mock::test_spec();
//! mock.create(&spec).await?;
//!
//! // Built-in commands need no scripting...
//! let out = mock.exec_collect(&spec.id, ExecRequest::new(["sh", "-c", "echo hi; exit 3"])).await?;
//! assert_eq!((out.stdout_lossy().as_str(), out.exit_code()), ("hi\n", 3));
//!
//! // ...and anything else can be scripted by argv.
//! mock.on_exec(
//!     ExecMatcher::exact(["npm", "test"]),
//!     ExecReply::new().stdout("1 passing\n").delay(Duration::from_millis(10)).exit_code(0),
//! );
//! let out = mock.exec_collect(&spec.id, ExecRequest::new(["npm", "test"])).await?;
//! assert_eq!(out.stdout, b"1 passing\n");
//!
//! // Faults: the next call of an operation fails.
//! mock.fail_next(Op::Exec, 1, ErrorKind::Unavailable);
//! let err = mock.exec(&spec.id, ExecRequest::new(["true"])).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Unavailable);
//!
//! mock.terminate(&spec.id).await?;
//! # Ok(())
//! # }
//! ```
//!
//! What the simulation does, operation by operation, is in [`MockBackend`]'s docs.
//!
//! The built-in interpreter: `true`, `false`, `:`, `echo [-n]`, `printf`, `cat [FILE|-]...`,
//! `head -c N [FILE]`, `sleep N[smhd]`, `pwd`, `env [NAME=V]... [CMD]`, `sha256sum [FILE|-]...`,
//! `stty size` (on a terminal), and `sh`/`bash -c SCRIPT [ARG0 ARGS...]`. The shell knows `'…'`,
//! `"…"` and `\` quoting, `$NAME`, `${NAME}`, `$?`, `$0`–`$9`, `$#`, `$@` (unquoted expansions
//! split on whitespace), `NAME=value`, `;`, newlines, `&&`, `||`, `&` (background jobs of the same
//! process group), redirections `>`, `>>`, `<`, `2>`, `2>>`, `>&2`, `1>&2`, `2>&1`, `/dev/null`,
//! and the builtins `exit`, `cd`, `export`. Pipes, `$(…)`, subshells and `if`/`for`/`while` are
//! refused with exit code 2 saying so; an unknown command is exit code 127 with "command not
//! found" on stderr. No globbing.

mod fault;
mod fs;
mod proc;
mod pty;
mod script;
mod shell;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use capsules_core::backend::{
    Backend, BackendCapsule, BackendInfo, BackendState, ByteStream, Capabilities, CapsuleSpec, Connection, ExecEvent,
    ExecRequest, ExecStream, FileStat, ProcessInfo, PtyRequest, PtySession,
};
use capsules_core::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};
use capsules_core::{Clock, Error, ErrorKind, Result, SystemClock};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, watch};

pub use capsules_core::clock::ManualClock as FakeClock;
/// The in-memory store (tokens, records, ledger, events), so an all-in-memory setup needs only
/// this crate and core.
pub use capsules_core::store::MemoryStore;
pub use fault::{Call, Op};
pub use script::{ExecMatcher, ExecReply};

use fault::{Fault, Faults};
use fs::{Fs, GIB, normalize};
use proc::{AbortOnDrop, BackgroundSink, CappedSink, Drive, Life, Outcome, Phase, Proc, status_of};
use script::Scripts;
use shell::{Cx, Dest, run_argv};

/// The default output cap per stream (head and tail kept).
const DEFAULT_OUTPUT_CAP: u64 = 16 << 20;
/// How much of the fake boot log `logs` returns.
const LOG_TAIL: usize = 64 << 10;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type Handler = Arc<dyn Fn(DuplexStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// A spec for tests: a fresh id, name `test`, `1x1gb`, `small`, 10 GiB, `internet`.
pub fn test_spec() -> CapsuleSpec {
    CapsuleSpec {
        id: CapsuleId::generate(),
        name: CapsuleName::new("test").expect("a valid name"),
        team: TeamId::generate(),
        size: Size::S1x1gb,
        image: Image::Small,
        disk_gib: 10,
        network: NetworkPolicy::Internet,
    }
}

/// The in-memory backend. Cheap to clone: clones share the same capsules, scripts and faults.
///
/// - **Lifecycle**: `create` (a retry with the same spec is ok; another spec under a live id is
///   `AlreadyExists`), `sleep`/`wake` (idempotent; background processes freeze and go on after
///   wake, calls in flight end with `Unavailable`), `restart` (kills processes with SIGKILL, keeps
///   files), `terminate` (idempotent; streams in flight end with `Conflict` "… was terminated").
///   [`MockBackend::fail_capsule`] simulates a lost VMM. Guest operations on a capsule that is not
///   running are `Conflict`; on an unknown one `NotFound`.
/// - **Exec**: scripted replies first ([`MockBackend::on_exec`]), else the built-in commands
///   (`true`, `false`, `echo`, `printf`, `cat`, `head -c`, `sleep`, `pwd`, `env`, `sha256sum`,
///   `stty size`, `sh -c` with a tiny subset); unknown commands exit 127 with "command not found".
///   Default cwd `/workspace`; a missing cwd is `NotFound`; no stdin is immediate EOF; the timeout
///   kills the whole group and reports `timed_out` (and SIGKILL); the output cap keeps head and
///   tail per stream and reports the bytes dropped.
/// - **Background**: `spawn` returns handle `proc-<pid>`; output (stdout and stderr combined) is
///   kept whole for `attach` from any offset; `signal` ends it with that signal (0, SIGCHLD,
///   SIGCONT, SIGURG and SIGWINCH are ignored).
/// - **PTY**: an interactive mock shell (prompt `$ `) that echoes input, runs lines with the same
///   interpreter, knows `stty size`, resize, Ctrl-C (and `PtyInput::Signal`) for the running
///   command, Ctrl-D on an empty line and `exit N`. Commands on the terminal get no stdin.
/// - **Files**: in memory, byte-exact, any name; writes past the disk (`disk_gib`, or
///   [`MockBackend::set_disk_limit`]) fail with `LimitExceeded` ("no space left on device … storage
///   limit").
/// - **connect**: served by handlers the test registers ([`MockBackend::serve_port`]); an
///   unregistered port is `Unavailable` ("connection refused").
/// - **apply_network** records the policy ([`MockBackend::policies`]); **logs** is a fake boot log.
#[derive(Clone)]
pub struct MockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    capsules: Mutex<HashMap<CapsuleId, Capsule>>,
    scripts: Arc<Scripts>,
    faults: Faults,
    clock: Arc<dyn Clock>,
    next_pid: AtomicU32,
}

struct Capsule {
    spec: CapsuleSpec,
    life: watch::Sender<Life>,
    failed: Option<String>,
    fs: Arc<Mutex<Fs>>,
    procs: BTreeMap<u32, Arc<Proc>>,
    ports: HashMap<u16, Handler>,
    conns: Vec<AbortOnDrop>,
    policies: Vec<NetworkPolicy>,
    log: Vec<u8>,
}

impl Capsule {
    fn phase(&self) -> Phase {
        self.life.borrow().phase
    }
    /// A cold boot forgets every process: the running ones are dead (SIGKILL) at once.
    fn kill_all(&mut self) {
        for p in std::mem::take(&mut self.procs).into_values() {
            let mut st = p.st.lock().unwrap();
            if st.exit.is_none() {
                st.exit = Some(capsules_core::backend::ExitStatus {
                    signal: Some(9),
                    ..Default::default()
                });
                drop(st);
                p.changed.send_modify(|v| *v += 1);
            }
        }
    }

    fn log_line(&mut self, now_ms: i64, line: &str) {
        let s = format!("[{:>8}.{:03}] {line}\n", now_ms / 1000 % 100_000_000, now_ms % 1000);
        self.log.extend_from_slice(s.as_bytes());
        if self.log.len() > 4 * LOG_TAIL {
            let cut = self.log.len() - LOG_TAIL;
            self.log.drain(..cut);
        }
    }
}

/// What a guest operation needs from a running capsule.
struct Running {
    fs: Arc<Mutex<Fs>>,
    life: watch::Receiver<Life>,
    boot: u64,
}

impl fmt::Debug for MockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.capsules.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("MockBackend")
            .field("capsules", &n)
            .finish_non_exhaustive()
    }
}

impl Default for MockBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn not_found(id: &CapsuleId) -> Error {
    Error::not_found(format!("capsule {id} does not exist in the mock backend"))
}

fn not_running(id: &CapsuleId, phase: Phase) -> Error {
    match phase {
        Phase::Sleeping => Error::conflict(format!("capsule {id} is sleeping; wake it first")),
        Phase::Failed => Error::conflict(format!("capsule {id} has failed; restart it first")),
        _ => not_found(id),
    }
}

fn chunks(data: Bytes) -> ByteStream {
    const CHUNK: usize = 64 << 10;
    let parts: Vec<Result<Bytes>> = (0..data.len().div_ceil(CHUNK))
        .map(|i| Ok(data.slice(i * CHUNK..((i + 1) * CHUNK).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(parts))
}

async fn collect(mut s: ByteStream) -> Result<Bytes> {
    let mut v = Vec::new();
    while let Some(chunk) = s.next().await {
        v.extend_from_slice(&chunk?);
    }
    Ok(Bytes::from(v))
}

fn receiver_stream<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> futures::stream::BoxStream<'static, T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }))
}

impl MockBackend {
    /// A mock with no capsules, on the system clock (file mtimes).
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A mock whose file mtimes and log times come from `clock` (e.g. a [`FakeClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MockBackend {
            inner: Arc::new(Inner {
                capsules: Mutex::new(HashMap::new()),
                scripts: Arc::new(Scripts::default()),
                faults: Faults::default(),
                clock,
                next_pid: AtomicU32::new(100),
            }),
        }
    }

    // ---- scripting ----

    /// Answers every command matching `matcher` (in any capsule) with `reply`. The newest
    /// matching script wins, so a test can override an earlier one.
    pub fn on_exec(&self, matcher: ExecMatcher, reply: ExecReply) {
        self.inner.scripts.add(matcher, reply, None, None);
    }

    /// Like [`on_exec`](Self::on_exec), for the next `times` matching commands only.
    pub fn on_exec_times(&self, matcher: ExecMatcher, reply: ExecReply, times: usize) {
        self.inner.scripts.add(matcher, reply, None, Some(times));
    }

    /// Like [`on_exec`](Self::on_exec), in one capsule only.
    pub fn on_exec_in(&self, id: &CapsuleId, matcher: ExecMatcher, reply: ExecReply) {
        self.inner.scripts.add(matcher, reply, Some(id.clone()), None);
    }

    /// Removes every scripted reply.
    pub fn clear_scripts(&self) {
        self.inner.scripts.clear();
    }

    // ---- faults ----

    /// The next `n` calls of `op` fail with `kind` (message "injected fault: …").
    pub fn fail_next(&self, op: Op, n: usize, kind: ErrorKind) {
        self.fail_next_with(op, n, kind, format!("injected fault: {op:?} failed"));
    }

    /// The next `n` calls of `op` fail with `kind` and this message.
    pub fn fail_next_with(&self, op: Op, n: usize, kind: ErrorKind, message: impl Into<String>) {
        self.inner.faults.push(op, n, Fault::Fail(kind, message.into()));
    }

    /// The next `n` calls of `op` hang: they never return until [`release_hung`](Self::release_hung)
    /// (so the caller's deadline must fire). A released call then proceeds normally.
    pub fn hang_next(&self, op: Op, n: usize) {
        self.inner.faults.push(op, n, Fault::Hang);
    }

    /// The next `n` calls of `op` wait `d` (tokio time) before proceeding.
    pub fn delay_next(&self, op: Op, n: usize, d: Duration) {
        self.inner.faults.push(op, n, Fault::Delay(d));
    }

    /// Lets every hung call proceed.
    pub fn release_hung(&self) {
        self.inner.faults.release();
    }

    /// Drops every pending fault (hung calls stay hung until released).
    pub fn clear_faults(&self) {
        self.inner.faults.clear();
    }

    // ---- inspection ----

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.faults.calls()
    }

    /// The calls of one operation, in order.
    pub fn calls_of(&self, op: Op) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.op == op).collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.inner.faults.clear_calls();
    }

    /// The network policies a capsule has had: the one at create, then each applied, in order.
    pub fn policies(&self, id: &CapsuleId) -> Vec<NetworkPolicy> {
        self.inner
            .capsules
            .lock()
            .unwrap()
            .get(id)
            .map(|c| c.policies.clone())
            .unwrap_or_default()
    }

    /// The capsule's current network policy.
    pub fn network(&self, id: &CapsuleId) -> Option<NetworkPolicy> {
        self.policies(id).pop()
    }

    /// Every regular file of a capsule (absolute path → contents).
    pub fn files(&self, id: &CapsuleId) -> BTreeMap<String, Bytes> {
        self.fs(id).map(|fs| fs.lock().unwrap().files()).unwrap_or_default()
    }

    /// One file's contents, if it exists (relative paths are under `/workspace`).
    pub fn file(&self, id: &CapsuleId, path: &str) -> Option<Bytes> {
        let path = normalize("/workspace", path).ok()?;
        self.fs(id)?.lock().unwrap().read(&path).ok()
    }

    /// Bytes the capsule's files take.
    pub fn disk_used(&self, id: &CapsuleId) -> u64 {
        self.fs(id).map(|fs| fs.lock().unwrap().used()).unwrap_or(0)
    }

    /// Overrides the capsule's disk size (bytes), so tests can hit the storage limit cheaply.
    pub fn set_disk_limit(&self, id: &CapsuleId, bytes: u64) -> Result<()> {
        let fs = self.fs(id).ok_or_else(|| not_found(id))?;
        fs.lock().unwrap().limit = bytes;
        Ok(())
    }

    /// The spec a live capsule was created with.
    pub fn spec(&self, id: &CapsuleId) -> Option<CapsuleSpec> {
        self.inner.capsules.lock().unwrap().get(id).map(|c| c.spec.clone())
    }

    /// Ids of the live capsules.
    pub fn capsule_ids(&self) -> Vec<CapsuleId> {
        let mut v: Vec<CapsuleId> = self.inner.capsules.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Simulates a lost VMM: the capsule becomes `Failed { reason }`, its processes die, calls in
    /// flight end with `Unavailable`; the disk is kept and `restart` boots it.
    pub fn fail_capsule(&self, id: &CapsuleId, reason: impl Into<String>) -> Result<()> {
        let now = self.now_ms();
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        let reason = reason.into();
        c.log_line(now, &format!("vmm: lost ({reason})"));
        c.failed = Some(reason);
        c.conns.clear();
        c.kill_all();
        c.life.send_modify(|l| l.phase = Phase::Failed);
        Ok(())
    }

    /// Serves `port` inside the capsule: each `connect` gets a fresh duplex stream whose other end
    /// is handed to `handler` (in its own task, ended by terminate and restart).
    pub fn serve_port<F, Fut>(&self, id: &CapsuleId, port: u16, handler: F) -> Result<()>
    where
        F: Fn(DuplexStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let h: Handler = Arc::new(move |s| Box::pin(handler(s)));
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        c.ports.insert(port, h);
        Ok(())
    }

    /// Serves `port` with an echo server (every byte sent comes back).
    pub fn serve_echo(&self, id: &CapsuleId, port: u16) -> Result<()> {
        self.serve_port(id, port, |s| async move {
            let (mut r, mut w) = tokio::io::split(s);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
    }

    /// Stops serving `port` (later connects are refused; open connections go on).
    pub fn stop_serving(&self, id: &CapsuleId, port: u16) {
        if let Some(c) = self.inner.capsules.lock().unwrap().get_mut(id) {
            c.ports.remove(&port);
        }
    }

    // ---- internals ----

    fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    fn fs(&self, id: &CapsuleId) -> Option<Arc<Mutex<Fs>>> {
        self.inner.capsules.lock().unwrap().get(id).map(|c| c.fs.clone())
    }

    async fn enter(&self, op: Op, id: Option<&CapsuleId>, detail: String) -> Result<()> {
        self.inner.faults.enter(op, id, detail).await
    }

    fn running(&self, id: &CapsuleId) -> Result<Running> {
        let caps = self.inner.capsules.lock().unwrap();
        let c = caps.get(id).ok_or_else(|| not_found(id))?;
        let life = *c.life.borrow();
        if life.phase != Phase::Running {
            return Err(not_running(id, life.phase));
        }
        Ok(Running {
            fs: c.fs.clone(),
            life: c.life.subscribe(),
            boot: life.boot,
        })
    }

    fn path(p: &str) -> Result<String> {
        normalize("/workspace", p)
    }

    /// Registers a process and builds the context it runs in.
    fn start_process(
        &self,
        id: &CapsuleId,
        req: &mut ExecRequest,
        background: bool,
    ) -> Result<(Arc<Proc>, Cx, Running, mpsc::UnboundedReceiver<i32>)> {
        if req.argv.is_empty() {
            return Err(Error::invalid_input(
                "the command is empty; argv needs at least a program name",
            ));
        }
        let rt = self.running(id)?;
        let cwd = Self::path(req.cwd.as_deref().unwrap_or("/workspace"))?;
        if !rt.fs.lock().unwrap().is_dir(&cwd) {
            return Err(Error::not_found(format!("working directory {cwd} does not exist")));
        }
        let pid = self.inner.next_pid.fetch_add(1, Ordering::Relaxed);
        let (sig_tx, sig_rx) = mpsc::unbounded_channel();
        let proc = Arc::new(Proc {
            pid,
            handle: background.then(|| format!("proc-{pid}")),
            argv: req.argv.clone(),
            st: Mutex::new(Default::default()),
            changed: watch::channel(0).0,
            signals: sig_tx,
        });
        let mut env = BTreeMap::from([
            ("HOME".to_owned(), "/root".to_owned()),
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("PWD".to_owned(), cwd.clone()),
        ]);
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let sink: Arc<dyn proc::Sink> = Arc::new(BackgroundSink(proc.clone()));
        let cx = Cx {
            id: id.clone(),
            fs: rt.fs.clone(),
            clock: self.inner.clock.clone(),
            scripts: self.inner.scripts.clone(),
            cwd,
            env,
            stdin: req.stdin.take(),
            sink,
            out: Dest::Stdout,
            err: Dest::Stderr,
            life: rt.life.clone(),
            tty: None,
        };
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        c.procs.insert(pid, proc.clone());
        Ok((proc, cx, rt, sig_rx))
    }

    fn forget_process(inner: &Inner, id: &CapsuleId, pid: u32) {
        if let Some(c) = inner.capsules.lock().unwrap().get_mut(id) {
            c.procs.remove(&pid);
        }
    }

    fn find_process(&self, id: &CapsuleId, handle: &str) -> Result<(Arc<Proc>, watch::Receiver<Life>)> {
        let caps = self.inner.capsules.lock().unwrap();
        let c = caps.get(id).ok_or_else(|| not_found(id))?;
        let p = c
            .procs
            .values()
            .find(|p| p.handle.as_deref() == Some(handle))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no background process {handle:?} in capsule {id}")))?;
        Ok((p, c.life.subscribe()))
    }
}

#[async_trait]
impl Backend for MockBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "mock".to_owned(),
            accelerator: "none".to_owned(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn create(&self, spec: &CapsuleSpec) -> Result<()> {
        self.enter(Op::Create, Some(&spec.id), spec.name.to_string()).await?;
        let now = self.now_ms();
        let mut caps = self.inner.capsules.lock().unwrap();
        if let Some(c) = caps.get(&spec.id) {
            return if c.spec == *spec {
                Ok(())
            } else {
                Err(Error::already_exists(format!(
                    "capsule {} already exists with another spec",
                    spec.id
                )))
            };
        }
        let mut c = Capsule {
            spec: spec.clone(),
            life: watch::channel(Life {
                boot: 0,
                phase: Phase::Running,
            })
            .0,
            failed: None,
            fs: Arc::new(Mutex::new(Fs::new(u64::from(spec.disk_gib) * GIB, now / 1000))),
            procs: BTreeMap::new(),
            ports: HashMap::new(),
            conns: Vec::new(),
            policies: vec![spec.network.clone()],
            log: Vec::new(),
        };
        c.log_line(now, "Linux version 6.1.0-mock (capsules mock backend)");
        c.log_line(
            now,
            &format!(
                "Memory: {} MiB, {} vCPUs, disk {} GiB",
                spec.size.memory_mib(),
                spec.size.vcpus(),
                spec.disk_gib
            ),
        );
        c.log_line(now, &format!("capsules-agent: ready ({})", spec.id));
        caps.insert(spec.id.clone(), c);
        Ok(())
    }

    async fn sleep(&self, id: &CapsuleId) -> Result<()> {
        self.enter(Op::Sleep, Some(id), String::new()).await?;
        let now = self.now_ms();
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        match c.phase() {
            Phase::Sleeping => Ok(()),
            Phase::Running => {
                // Foreground calls are cut (their drivers report it); background ones freeze.
                c.procs.retain(|_, p| p.handle.is_some());
                c.log_line(now, "vmm: paused, memory snapshot written");
                c.life.send_modify(|l| l.phase = Phase::Sleeping);
                Ok(())
            }
            p => Err(not_running(id, p)),
        }
    }

    async fn wake(&self, id: &CapsuleId) -> Result<()> {
        self.enter(Op::Wake, Some(id), String::new()).await?;
        let now = self.now_ms();
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        match c.phase() {
            Phase::Running => Ok(()),
            Phase::Sleeping => {
                c.log_line(now, "vmm: snapshot restored, resumed");
                c.life.send_modify(|l| l.phase = Phase::Running);
                Ok(())
            }
            p => Err(not_running(id, p)),
        }
    }

    async fn restart(&self, id: &CapsuleId) -> Result<()> {
        self.enter(Op::Restart, Some(id), String::new()).await?;
        let now = self.now_ms();
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        c.conns.clear();
        c.failed = None;
        c.kill_all();
        c.log_line(now, "vmm: cold boot from the kept disk");
        c.log_line(now, "capsules-agent: ready");
        c.life.send_modify(|l| {
            l.boot += 1;
            l.phase = Phase::Running;
        });
        Ok(())
    }

    async fn terminate(&self, id: &CapsuleId) -> Result<()> {
        self.enter(Op::Terminate, Some(id), String::new()).await?;
        let removed = self.inner.capsules.lock().unwrap().remove(id);
        if let Some(c) = removed {
            c.life.send_modify(|l| l.phase = Phase::Terminated);
        }
        Ok(())
    }

    async fn state(&self, id: &CapsuleId) -> Result<BackendState> {
        self.enter(Op::State, Some(id), String::new()).await?;
        let caps = self.inner.capsules.lock().unwrap();
        Ok(match caps.get(id) {
            None => BackendState::Gone,
            Some(c) => match c.phase() {
                Phase::Running => BackendState::Running,
                Phase::Sleeping => BackendState::Sleeping,
                Phase::Failed => BackendState::Failed {
                    reason: c.failed.clone().unwrap_or_default(),
                },
                Phase::Terminated => BackendState::Gone,
            },
        })
    }

    async fn list(&self) -> Result<Vec<BackendCapsule>> {
        self.enter(Op::List, None, String::new()).await?;
        let mut out = Vec::new();
        for id in self.capsule_ids() {
            let caps = self.inner.capsules.lock().unwrap();
            if let Some(c) = caps.get(&id) {
                let state = match c.phase() {
                    Phase::Running => BackendState::Running,
                    Phase::Sleeping => BackendState::Sleeping,
                    Phase::Failed => BackendState::Failed {
                        reason: c.failed.clone().unwrap_or_default(),
                    },
                    Phase::Terminated => continue,
                };
                out.push(BackendCapsule { id, state });
            }
        }
        Ok(out)
    }

    async fn exec(&self, id: &CapsuleId, mut req: ExecRequest) -> Result<ExecStream> {
        self.enter(Op::Exec, Some(id), req.argv.join(" ")).await?;
        let (proc, mut cx, rt, sig_rx) = self.start_process(id, &mut req, false)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(CappedSink::new(
            tx.clone(),
            req.output_cap.unwrap_or(DEFAULT_OUTPUT_CAP),
        ));
        cx.sink = sink.clone();
        let drive = Drive {
            id: id.clone(),
            life: rt.life,
            boot: rt.boot,
            foreground: true,
            timeout: req.timeout,
            signals: sig_rx,
        };
        let argv = req.argv;
        let inner = self.inner.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let program: BoxFuture<'static, i32> = Box::pin(async move { run_argv(&mut cx, argv).await });
            let outcome = drive.run(program, Some(&tx)).await;
            let (out_dropped, err_dropped) = sink.finish();
            match status_of(&outcome) {
                Some(mut st) => {
                    st.stdout_dropped = out_dropped;
                    st.stderr_dropped = err_dropped;
                    proc.st.lock().unwrap().exit = Some(st.clone());
                    sink.send(Ok(ExecEvent::Exit(st)));
                }
                None => {
                    if let Outcome::Cut(e) = outcome {
                        sink.send(Err(e));
                    }
                }
            }
            MockBackend::forget_process(&inner, &id, proc.pid);
        });
        Ok(ExecStream {
            events: receiver_stream(rx),
        })
    }

    async fn spawn(&self, id: &CapsuleId, mut req: ExecRequest) -> Result<ProcessInfo> {
        self.enter(Op::Spawn, Some(id), req.argv.join(" ")).await?;
        let (proc, mut cx, rt, sig_rx) = self.start_process(id, &mut req, true)?;
        let drive = Drive {
            id: id.clone(),
            life: rt.life,
            boot: rt.boot,
            foreground: false,
            timeout: req.timeout,
            signals: sig_rx,
        };
        let info = proc.info();
        let argv = req.argv;
        tokio::spawn(async move {
            let program: BoxFuture<'static, i32> = Box::pin(async move { run_argv(&mut cx, argv).await });
            let outcome = drive.run(program, None).await;
            let st = status_of(&outcome).unwrap_or(capsules_core::backend::ExitStatus {
                signal: Some(9),
                ..Default::default()
            });
            // A restart may have recorded the death already; the first word stands.
            proc.st.lock().unwrap().exit.get_or_insert(st);
            proc.changed.send_modify(|v| *v += 1);
        });
        Ok(info)
    }

    async fn processes(&self, id: &CapsuleId) -> Result<Vec<ProcessInfo>> {
        self.enter(Op::Processes, Some(id), String::new()).await?;
        let caps = self.inner.capsules.lock().unwrap();
        let c = caps.get(id).ok_or_else(|| not_found(id))?;
        Ok(c.procs.values().map(|p| p.info()).collect())
    }

    async fn attach(&self, id: &CapsuleId, handle: &str, offset: u64) -> Result<ExecStream> {
        self.enter(Op::Attach, Some(id), format!("{handle} @{offset}")).await?;
        let (proc, mut life) = self.find_process(id, handle)?;
        let boot = life.borrow().boot;
        let mut changed = proc.changed.subscribe();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = id.clone();
        tokio::spawn(async move {
            let mut pos = offset as usize;
            loop {
                let (chunk, exit) = {
                    changed.borrow_and_update();
                    let st = proc.st.lock().unwrap();
                    let chunk = (st.output.len() > pos).then(|| Bytes::copy_from_slice(&st.output[pos..]));
                    (chunk, st.exit.clone())
                };
                if let Some(c) = chunk {
                    pos += c.len();
                    if tx.send(Ok(ExecEvent::Stdout(c))).is_err() {
                        return;
                    }
                }
                if let Some(st) = exit {
                    let _ = tx.send(Ok(ExecEvent::Exit(st)));
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    r = life.changed() => {
                        let now = if r.is_err() { Life { boot, phase: Phase::Terminated } } else { *life.borrow_and_update() };
                        // A restart kills the process: its exit arrives through `changed`.
                        if matches!(now.phase, Phase::Terminated | Phase::Sleeping) {
                            let _ = tx.send(Err(proc::cut(&id, now, boot, true).unwrap_or_else(|| proc::slept(&id))));
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(ExecStream {
            events: receiver_stream(rx),
        })
    }

    async fn signal(&self, id: &CapsuleId, handle: &str, signal: i32) -> Result<()> {
        self.enter(Op::Signal, Some(id), format!("{handle} {signal}")).await?;
        if !(0..=64).contains(&signal) {
            return Err(Error::invalid_input(format!(
                "signal {signal} is not a valid signal number (0-64)"
            )));
        }
        let (proc, _) = self.find_process(id, handle)?;
        let _ = proc.signals.send(signal);
        Ok(())
    }

    async fn pty(&self, id: &CapsuleId, req: PtyRequest) -> Result<PtySession> {
        self.enter(Op::Pty, Some(id), format!("{:?}", req.argv)).await?;
        let rt = self.running(id)?;
        let cwd = Self::path(req.cwd.as_deref().unwrap_or("/workspace"))?;
        if !rt.fs.lock().unwrap().is_dir(&cwd) {
            return Err(Error::not_found(format!("working directory {cwd} does not exist")));
        }
        let mut env = BTreeMap::from([
            ("HOME".to_owned(), "/root".to_owned()),
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("TERM".to_owned(), "xterm-256color".to_owned()),
        ]);
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(pty::open(pty::PtyStart {
            id: id.clone(),
            fs: rt.fs,
            clock: self.inner.clock.clone(),
            scripts: self.inner.scripts.clone(),
            life: rt.life,
            boot: rt.boot,
            cwd,
            env,
            req,
        }))
    }

    async fn read_file(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        self.enter(Op::ReadFile, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        let data = rt.fs.lock().unwrap().read(&p)?;
        Ok(chunks(data))
    }

    async fn write_file(&self, id: &CapsuleId, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64> {
        self.enter(Op::WriteFile, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        let data = collect(data).await?;
        // A write that was cut by terminate or sleep does not land.
        if let Some(e) = proc::cut(id, *rt.life.borrow(), rt.boot, true) {
            return Err(e);
        }
        let now = self.now_ms() / 1000;
        rt.fs.lock().unwrap().write(&p, data, mode, now)
    }

    async fn stat(&self, id: &CapsuleId, path: &str) -> Result<FileStat> {
        self.enter(Op::Stat, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        rt.fs.lock().unwrap().stat(&p)
    }

    async fn list_dir(&self, id: &CapsuleId, path: &str) -> Result<Vec<FileStat>> {
        self.enter(Op::ListDir, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        rt.fs.lock().unwrap().list(&p)
    }

    async fn mkdir(&self, id: &CapsuleId, path: &str) -> Result<()> {
        self.enter(Op::Mkdir, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        let now = self.now_ms() / 1000;
        rt.fs.lock().unwrap().mkdir_p(&p, now)
    }

    async fn remove(&self, id: &CapsuleId, path: &str, recursive: bool) -> Result<()> {
        self.enter(Op::Remove, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        rt.fs.lock().unwrap().remove(&p, recursive)
    }

    async fn rename(&self, id: &CapsuleId, from: &str, to: &str) -> Result<()> {
        self.enter(Op::Rename, Some(id), format!("{from} -> {to}")).await?;
        let rt = self.running(id)?;
        let (f, t) = (Self::path(from)?, Self::path(to)?);
        let now = self.now_ms() / 1000;
        rt.fs.lock().unwrap().rename(&f, &t, now)
    }

    async fn upload_tar(&self, id: &CapsuleId, dest: &str, tar: ByteStream) -> Result<()> {
        self.enter(Op::UploadTar, Some(id), dest.to_owned()).await?;
        let rt = self.running(id)?;
        let d = Self::path(dest)?;
        let data = collect(tar).await?;
        if let Some(e) = proc::cut(id, *rt.life.borrow(), rt.boot, true) {
            return Err(e);
        }
        let now = self.now_ms() / 1000;
        rt.fs.lock().unwrap().unpack(&d, &data, now)
    }

    async fn download_tar(&self, id: &CapsuleId, path: &str) -> Result<ByteStream> {
        self.enter(Op::DownloadTar, Some(id), path.to_owned()).await?;
        let rt = self.running(id)?;
        let p = Self::path(path)?;
        let data = rt.fs.lock().unwrap().pack(&p)?;
        Ok(chunks(Bytes::from(data)))
    }

    async fn connect(&self, id: &CapsuleId, port: u16) -> Result<Box<dyn Connection>> {
        self.enter(Op::Connect, Some(id), port.to_string()).await?;
        self.running(id)?;
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        let handler = c.ports.get(&port).cloned().ok_or_else(|| {
            Error::unavailable(format!(
                "connection refused: nothing listens on port {port} in capsule {id}"
            ))
        })?;
        let (client, server) = tokio::io::duplex(64 << 10);
        let task = tokio::spawn(handler(server));
        c.conns.retain(|h| !h.0.is_finished());
        c.conns.push(AbortOnDrop(task.abort_handle()));
        Ok(Box::new(client))
    }

    async fn apply_network(&self, id: &CapsuleId, policy: &NetworkPolicy) -> Result<()> {
        self.enter(Op::ApplyNetwork, Some(id), format!("{policy:?}")).await?;
        let mut caps = self.inner.capsules.lock().unwrap();
        let c = caps.get_mut(id).ok_or_else(|| not_found(id))?;
        c.policies.push(policy.clone());
        Ok(())
    }

    async fn logs(&self, id: &CapsuleId) -> Result<Bytes> {
        self.enter(Op::Logs, Some(id), String::new()).await?;
        let caps = self.inner.capsules.lock().unwrap();
        let c = caps.get(id).ok_or_else(|| not_found(id))?;
        let start = c.log.len().saturating_sub(LOG_TAIL);
        Ok(Bytes::copy_from_slice(&c.log[start..]))
    }
}
