//! The backend part of the contract suite: plain async checks over `&dyn Backend`.
//!
//! Every backend runs it: the mock always, QEMU and Cloud Hypervisor where they can boot a guest.
//! Real VMs are slow, so the checks use only commands of a Debian minbase image (`sh`, `printf`,
//! `cat`, `sleep`, `stty`, `sha256sum`), need nothing beyond a `1x1gb`/[`Image::Small`] capsule,
//! and most of them share one capsule ([`CapsuleUse::Shared`]); only the cases that destroy their
//! capsule get their own. Deadlines are liveness bounds, multiplied by [`time_scale`] (5 under TCG).
//!
//! Two ways to run it:
//!
//! - one case at a time, each reported separately (a `libtest-mimic` runner): [`cases`] lists
//!   them; a [`Runner`] runs one, skips what the backend's [`Capabilities`] lack
//!   ([`Runner::skip_reason`], report it as ignored), and cleans up with terminate even when a
//!   check fails or panics;
//! - in groups on a capsule the caller made: [`exec_suite`], [`background_suite`], [`pty_suite`],
//!   [`files_suite`], [`connect_suite`], [`lifecycle_suite`], or one case's own `pub async fn`.
//!
//! ```no_run
//! # async fn demo(backend: std::sync::Arc<dyn capsules_core::Backend>) {
//! use capsules_core::testkit::backend::{Runner, SpawnEchoServer, cases};
//! // "Start a TCP echo server on port P inside the capsule": for a VM, a command run in the guest.
//! let echo = SpawnEchoServer::new(["capsules-agent", "echo-server", "{port}"]);
//! let runner = Runner::new(backend, std::sync::Arc::new(echo)).share_capsule(true);
//! for case in cases() {
//!     match runner.skip_reason(&case) {
//!         Some(why) => println!("{}: ignored, {why}", case.name),
//!         None => println!("{}: {:?}", case.name, runner.run(&case).await),
//!     }
//! }
//! runner.finish().await.unwrap();
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::{
    Backend, BackendExt, BackendState, ByteStream, Capabilities, CapsuleSpec, ExecEvent, ExecOutput, ExecRequest,
    FileKind, PtyEvent, PtyInput, PtyRequest,
};
use crate::error::{Error, ErrorKind};
use crate::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};

// ---------------------------------------------------------------- results

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(format!("unexpected error ({}): {}", e.kind(), e.message()))
    }
}

/// What every check returns.
pub type CaseResult = std::result::Result<(), Failure>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failure(format!($($fmt)+)));
        }
    };
}

fn fail<T>(msg: impl Into<String>) -> std::result::Result<T, Failure> {
    Err(Failure(msg.into()))
}

// ---------------------------------------------------------------- setup

/// A fresh spec for one test capsule: new ids, `1x1gb`, `small`, 10 GiB, `internet`.
pub fn spec() -> CapsuleSpec {
    let n: u32 = rand::rng().random_range(0..1_000_000);
    CapsuleSpec {
        id: CapsuleId::generate(),
        // "contract-<digits>" always follows the name rule.
        name: CapsuleName::new(format!("contract-{n}")).expect("a valid capsule name"),
        team: TeamId::generate(),
        size: Size::S1x1gb,
        image: Image::Small,
        disk_gib: 10,
        network: NetworkPolicy::Internet,
    }
}

/// The factor every deadline is multiplied by: `CAPSULES_TEST_TIME_SCALE` if set, else 5 when
/// the backend reports the `tcg` accelerator (software emulation), else 1.
pub fn time_scale(b: &dyn Backend) -> u32 {
    if let Some(n) = std::env::var("CAPSULES_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    if b.info().accelerator == "tcg" { 5 } else { 1 }
}

fn secs(b: &dyn Backend, s: u64) -> Duration {
    Duration::from_secs(s * u64::from(time_scale(b)))
}

async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> std::result::Result<T, Failure> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| Failure(format!("{what}: no answer within {d:?}")))
}

/// "Start a TCP echo server on `port` inside capsule `id`" — each backend says how.
///
/// The server must send back every byte it receives on each connection, and may start
/// asynchronously (the suite retries `connect` for a while).
#[async_trait]
pub trait EchoServer: Send + Sync {
    async fn start(&self, b: &dyn Backend, id: &CapsuleId, port: u16) -> crate::Result<()>;
}

/// An [`EchoServer`] that runs a command in the capsule as a background process; every `{port}`
/// in the argv is replaced by the port (e.g. `["socat", "TCP-LISTEN:{port},fork", "EXEC:cat"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnEchoServer {
    pub argv: Vec<String>,
}

impl SpawnEchoServer {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SpawnEchoServer {
            argv: argv.into_iter().map(Into::into).collect(),
        }
    }
}

#[async_trait]
impl EchoServer for SpawnEchoServer {
    async fn start(&self, b: &dyn Backend, id: &CapsuleId, port: u16) -> crate::Result<()> {
        let argv: Vec<String> = self
            .argv
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        b.spawn(id, ExecRequest::new(argv)).await.map(|_| ())
    }
}

// ---------------------------------------------------------------- cases

/// Whether a case can share its capsule with other cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapsuleUse {
    /// Runs on a capsule other cases also use (one after another); leaves it running.
    Shared,
    /// Destroys its capsule: it gets one of its own.
    Own,
}

/// The capability a case needs; without it the case is skipped (reported as ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    MemorySleep,
    Pty,
    Connect,
    Restart,
}

impl Needs {
    fn missing(self, caps: &Capabilities) -> Option<&'static str> {
        match self {
            Needs::Nothing => None,
            Needs::MemorySleep if !caps.memory_sleep => Some("the backend does not declare memory_sleep"),
            Needs::Pty if !caps.pty => Some("the backend does not declare pty"),
            Needs::Connect if !caps.connect => Some("the backend does not declare connect"),
            Needs::Restart if !caps.restart => Some("the backend does not declare restart"),
            _ => None,
        }
    }
}

/// What a case is run against.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub backend: &'a dyn Backend,
    pub echo: &'a dyn EchoServer,
}

impl fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

type CaseFn = for<'a> fn(Target<'a>, &'a CapsuleId) -> BoxFuture<'a, CaseResult>;

/// One check of the suite.
#[derive(Clone)]
pub struct Case {
    /// `group::name`, e.g. `exec::timeout_kills_group`.
    pub name: &'static str,
    pub capsule: CapsuleUse,
    pub needs: Needs,
    run: CaseFn,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("capsule", &self.capsule)
            .field("needs", &self.needs)
            .finish()
    }
}

impl Case {
    /// Why this case cannot run on a backend with `caps`, if it cannot.
    pub fn skip_reason(&self, caps: &Capabilities) -> Option<String> {
        self.needs.missing(caps).map(str::to_owned)
    }

    /// Runs the check on capsule `id` (running). Does not clean up: see [`Runner`].
    pub async fn run_on(&self, t: Target<'_>, id: &CapsuleId) -> CaseResult {
        (self.run)(t, id).await
    }
}

macro_rules! cases {
    ($( $name:literal, $use:ident, $needs:ident => $f:ident $( ($extra:ident) )? ;)*) => {
        /// Every case of the backend suite, in a sensible order.
        pub fn cases() -> Vec<Case> {
            vec![$(
                Case {
                    name: $name,
                    capsule: CapsuleUse::$use,
                    needs: Needs::$needs,
                    run: |t, id| Box::pin(async move { $f(t.backend, id $(, t.$extra)?).await }),
                },
            )*]
        }
    };
}

cases! {
    "exec::argv", Shared, Nothing => exec_argv;
    "exec::env_reaches_subshells", Shared, Nothing => exec_env_reaches_subshells;
    "exec::cwd", Shared, Nothing => exec_cwd;
    "exec::exit_codes", Shared, Nothing => exec_exit_codes;
    "exec::stdin_absent_is_eof", Shared, Nothing => exec_stdin_absent_is_eof;
    "exec::stdin_streamed", Shared, Nothing => exec_stdin_streamed;
    "exec::bytes_exact", Shared, Nothing => exec_bytes_exact;
    "exec::timeout_kills_group", Shared, Nothing => exec_timeout_kills_group;
    "exec::output_cap_head_tail", Shared, Nothing => exec_output_cap_head_tail;
    "exec::concurrent_50", Shared, Nothing => exec_concurrent_50;
    "background::spawn_attach_signal", Shared, Nothing => background_spawn_attach_signal;
    "background::survives_sleep", Shared, MemorySleep => background_survives_sleep;
    "pty::size_resize_ctrl_c_exit", Shared, Pty => pty_size_resize_ctrl_c_exit;
    "files::random_1mib_sha256", Shared, Nothing => files_random_1mib_sha256;
    "files::odd_names", Shared, Nothing => files_odd_names;
    "files::tar_round_trip", Shared, Nothing => files_tar_round_trip;
    "files::dir_ops", Shared, Nothing => files_dir_ops;
    "connect::echo", Shared, Connect => connect_echo(echo);
    "connect::refused", Shared, Connect => connect_refused;
    "lifecycle::state_list_logs", Shared, Nothing => lifecycle_state_list_logs;
    "lifecycle::sleep_wake_cycles", Shared, Nothing => lifecycle_sleep_wake_cycles;
    "lifecycle::restart_keeps_files", Shared, Restart => lifecycle_restart_keeps_files;
    "lifecycle::terminate_cuts_stream", Own, Nothing => lifecycle_terminate_cuts_stream;
}

/// Runs every case whose name starts with `prefix` on capsule `id`, in order, skipping what the
/// backend cannot do; stops at the first failure (named).
pub async fn run_group(b: &dyn Backend, echo: &dyn EchoServer, id: &CapsuleId, prefix: &str) -> CaseResult {
    let caps = b.capabilities();
    for case in cases()
        .iter()
        .filter(|c| c.name.starts_with(prefix) && c.capsule == CapsuleUse::Shared)
    {
        if case.skip_reason(&caps).is_some() {
            continue;
        }
        case.run_on(Target { backend: b, echo }, id)
            .await
            .map_err(|f| Failure(format!("{}: {f}", case.name)))?;
    }
    Ok(())
}

/// No echo server: for groups that do not connect.
struct NoEcho;

#[async_trait]
impl EchoServer for NoEcho {
    async fn start(&self, _: &dyn Backend, _: &CapsuleId, _: u16) -> crate::Result<()> {
        Err(Error::unsupported("no echo server hook was given"))
    }
}

/// Every `exec::` case on one capsule.
pub async fn exec_suite(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    run_group(b, &NoEcho, id, "exec::").await
}

/// Every `background::` case on one capsule (sleeps and wakes it where `memory_sleep`).
pub async fn background_suite(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    run_group(b, &NoEcho, id, "background::").await
}

/// Every `pty::` case on one capsule.
pub async fn pty_suite(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    run_group(b, &NoEcho, id, "pty::").await
}

/// Every `files::` case on one capsule.
pub async fn files_suite(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    run_group(b, &NoEcho, id, "files::").await
}

/// Every `connect::` case on one capsule.
pub async fn connect_suite(b: &dyn Backend, id: &CapsuleId, echo: &dyn EchoServer) -> CaseResult {
    run_group(b, echo, id, "connect::").await
}

/// The `lifecycle::` cases that keep the capsule (sleep/wake, restart); leaves it running.
pub async fn lifecycle_suite(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    run_group(b, &NoEcho, id, "lifecycle::").await
}

// ---------------------------------------------------------------- the runner

/// Runs cases one at a time with capsules made and cleaned up for them.
///
/// By default every case gets a fresh capsule (right for fast backends run in parallel). With
/// [`share_capsule(true)`](Self::share_capsule) the [`CapsuleUse::Shared`] cases run on one
/// capsule made at the first case (woken or remade if a case left it asleep or broken) — run them
/// one at a time then, and call [`finish`](Self::finish) at the end.
pub struct Runner {
    backend: Arc<dyn Backend>,
    echo: Arc<dyn EchoServer>,
    share: bool,
    shared: tokio::sync::Mutex<Option<CapsuleId>>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("backend", &self.backend)
            .field("share", &self.share)
            .finish()
    }
}

impl Runner {
    pub fn new(backend: Arc<dyn Backend>, echo: Arc<dyn EchoServer>) -> Self {
        Runner {
            backend,
            echo,
            share: false,
            shared: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs the shared cases on one capsule.
    pub fn share_capsule(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// Why `case` cannot run on this backend, if it cannot (report it as ignored).
    pub fn skip_reason(&self, case: &Case) -> Option<String> {
        case.skip_reason(&self.backend.capabilities())
    }

    async fn create(&self) -> std::result::Result<CapsuleId, Failure> {
        let s = spec();
        let b = &*self.backend;
        within(secs(b, 300), "create", b.create(&s))
            .await?
            .map_err(|e| Failure(format!("could not create the test capsule: {}", e.chain())))?;
        Ok(s.id)
    }

    async fn shared_capsule(&self) -> std::result::Result<CapsuleId, Failure> {
        let b = &*self.backend;
        let mut shared = self.shared.lock().await;
        if let Some(id) = shared.clone() {
            match b.state(&id).await? {
                BackendState::Running => return Ok(id),
                BackendState::Sleeping => {
                    b.wake(&id).await?;
                    return Ok(id);
                }
                _ => {
                    let _ = b.terminate(&id).await;
                }
            }
        }
        let id = self.create().await?;
        *shared = Some(id.clone());
        Ok(id)
    }

    /// Runs one case (not checking its capabilities: see [`skip_reason`](Self::skip_reason)) with
    /// a hard timeout; a capsule made for it alone is terminated whatever happens.
    pub async fn run(&self, case: &Case) -> CaseResult {
        let b = &*self.backend;
        let own = !self.share || case.capsule == CapsuleUse::Own;
        let id = if own {
            self.create().await?
        } else {
            self.shared_capsule().await?
        };
        let t = Target {
            backend: b,
            echo: &*self.echo,
        };
        let fut = AssertUnwindSafe(case.run_on(t, &id)).catch_unwind();
        let r = match tokio::time::timeout(secs(b, 600), fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                fail(format!("the check panicked: {msg}"))
            }
            Err(_) => fail("the case did not finish within its hard timeout"),
        };
        if own {
            let cleanup = within(secs(b, 120), "terminate", b.terminate(&id)).await;
            if r.is_ok() {
                cleanup?.map_err(|e| Failure(format!("terminate after the case failed: {e}")))?;
            }
        }
        r
    }

    /// Terminates the shared capsule, if one was made.
    pub async fn finish(&self) -> crate::Result<()> {
        if let Some(id) = self.shared.lock().await.take() {
            self.backend.terminate(&id).await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- helpers

fn tag() -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut r = rand::rng();
    (0..10).map(|_| A[r.random_range(0..32)] as char).collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    rand::rng().fill_bytes(&mut v);
    v
}

fn req<const N: usize>(argv: [&str; N]) -> ExecRequest {
    ExecRequest::new(argv)
}

fn stdin_of(data: Vec<u8>) -> ByteStream {
    Box::pin(futures::stream::once(async move { Ok(Bytes::from(data)) }))
}

async fn run(b: &dyn Backend, id: &CapsuleId, r: ExecRequest) -> std::result::Result<ExecOutput, Failure> {
    let what = format!("exec {:?}", r.argv);
    match within(secs(b, 60), &what, b.exec_collect(id, r)).await? {
        Ok(o) => Ok(o),
        Err(e) => fail(format!("{what} failed ({}): {}", e.kind(), e.message())),
    }
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 200 {
        format!("{:?}…", &s[..s.floor_char_boundary(200)])
    } else {
        format!("{s:?}")
    }
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `sha256sum PATH` inside the capsule (argv, no shell).
async fn sha_inside(b: &dyn Backend, id: &CapsuleId, path: &str) -> std::result::Result<String, Failure> {
    let o = run(b, id, ExecRequest::new(["sha256sum", "--", path])).await?;
    ensure!(o.status.success(), "sha256sum {path} failed: {}", o.stderr_lossy());
    Ok(o.stdout_lossy()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Reads stdout from an exec stream until it contains `want`; returns what was read.
async fn stdout_until(
    b: &dyn Backend,
    events: &mut BoxStream<'static, crate::Result<ExecEvent>>,
    seen: &mut Vec<u8>,
    want: &[u8],
) -> CaseResult {
    let what = format!("waiting for {}", show(want));
    within(secs(b, 30), &what, async {
        while !seen.windows(want.len().max(1)).any(|w| w == want) {
            match events.next().await {
                Some(Ok(ExecEvent::Stdout(d))) => seen.extend_from_slice(&d),
                Some(Ok(ExecEvent::Stderr(_))) => {}
                Some(Ok(ExecEvent::Exit(st))) => {
                    return fail(format!("the command exited ({st:?}) before printing {}", show(want)));
                }
                Some(Err(e)) => return Err(e.into()),
                None => return fail("the stream ended without an exit status"),
            }
        }
        Ok(())
    })
    .await?
}

fn check_capped(what: &str, got: &[u8], full: &[u8], dropped: u64, cap: usize) -> CaseResult {
    ensure!(got.len() == cap, "{what}: kept {} bytes, want the cap {cap}", got.len());
    ensure!(
        got.len() as u64 + dropped == full.len() as u64,
        "{what}: kept {} + dropped {dropped} != produced {}",
        got.len(),
        full.len()
    );
    let ok = (1..got.len()).any(|h| got[..h] == full[..h] && got[h..] == full[full.len() - (got.len() - h)..]);
    ensure!(ok, "{what}: the kept bytes are not a head and a tail of the output");
    Ok(())
}

// ---------------------------------------------------------------- exec

/// argv reaches the program as given, without a shell.
pub async fn exec_argv(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let o = run(b, id, req(["printf", "[%s]", "a b", "", "c'd\"e", "$HOME", "*"])).await?;
    ensure!(o.status.success(), "printf failed: {:?} {}", o.status, o.stderr_lossy());
    ensure!(o.stdout == b"[a b][][c'd\"e][$HOME][*]", "stdout {}", show(&o.stdout));
    Ok(())
}

/// env values with spaces reach the program and a shell started by it.
pub async fn exec_env_reaches_subshells(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let value = "two  words\tand $HOME * ?";
    let mut r = req(["sh", "-c", "sh -c 'printf \"[%s]\" \"$CAPSULES_T\"'"]);
    r.env.insert("CAPSULES_T".into(), value.into());
    let o = run(b, id, r).await?;
    ensure!(o.status.success(), "sh failed: {:?} {}", o.status, o.stderr_lossy());
    ensure!(
        o.stdout == format!("[{value}]").as_bytes(),
        "stdout {}",
        show(&o.stdout)
    );
    Ok(())
}

/// The default cwd is `/workspace`; a given cwd is used; a missing cwd is an error, not a run.
pub async fn exec_cwd(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let o = run(b, id, req(["pwd"])).await?;
    ensure!(
        o.stdout == b"/workspace\n",
        "default cwd: pwd printed {}",
        show(&o.stdout)
    );
    let mut r = req(["pwd"]);
    r.cwd = Some("/tmp".into());
    let o = run(b, id, r).await?;
    ensure!(o.stdout == b"/tmp\n", "cwd /tmp: pwd printed {}", show(&o.stdout));
    let mut r = req(["pwd"]);
    r.cwd = Some(format!("/workspace/no-such-dir-{}", tag()));
    let outcome = within(secs(b, 30), "exec with a missing cwd", b.exec_collect(id, r)).await?;
    match outcome {
        Err(e) => ensure!(
            matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput),
            "a missing cwd gave {} ({}); want not_found or invalid_input",
            e.kind(),
            e.message()
        ),
        Ok(o) => {
            return fail(format!(
                "a missing cwd ran the command: {:?} {}",
                o.status,
                o.stdout_lossy()
            ));
        }
    }
    Ok(())
}

/// Exit codes come back; an unknown command is 127 with a message on stderr.
pub async fn exec_exit_codes(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let o = run(b, id, req(["true"])).await?;
    ensure!(o.status.success() && o.exit_code() == 0, "true: {:?}", o.status);
    let o = run(b, id, req(["false"])).await?;
    ensure!(o.exit_code() == 1 && !o.status.success(), "false: {:?}", o.status);
    let o = run(b, id, req(["sh", "-c", "printf out; printf err >&2; exit 3"])).await?;
    ensure!(o.exit_code() == 3, "exit 3: {:?}", o.status);
    ensure!(
        o.stdout == b"out" && o.stderr == b"err",
        "stdout {} stderr {}",
        show(&o.stdout),
        show(&o.stderr)
    );
    let o = run(b, id, req(["sh", "-c", "capsules-no-such-command"])).await?;
    ensure!(o.exit_code() == 127, "unknown command: {:?}", o.status);
    ensure!(!o.stderr.is_empty(), "unknown command: nothing on stderr");
    Ok(())
}

/// No stdin means immediate EOF: `cat` ends at once.
pub async fn exec_stdin_absent_is_eof(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let o = within(secs(b, 10), "cat without stdin", b.exec_collect(id, req(["cat"]))).await??;
    ensure!(
        o.status.success() && o.stdout.is_empty(),
        "cat: {:?} {}",
        o.status,
        show(&o.stdout)
    );
    Ok(())
}

/// stdin is streamed: the program sees the first chunk before the second is sent.
pub async fn exec_stdin_streamed(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let (tx, rx) = futures::channel::mpsc::unbounded::<crate::Result<Bytes>>();
    let mut r = req(["cat"]);
    r.stdin = Some(Box::pin(rx));
    let mut s = b.exec(id, r).await?;
    let _ = tx.unbounded_send(Ok(Bytes::from_static(b"first chunk\n")));
    let mut seen = Vec::new();
    stdout_until(b, &mut s.events, &mut seen, b"first chunk\n").await?;
    let _ = tx.unbounded_send(Ok(Bytes::from_static(b"second\n")));
    drop(tx);
    let status = within(secs(b, 30), "cat after stdin closed", async {
        while let Some(ev) = s.events.next().await {
            match ev? {
                ExecEvent::Stdout(d) => seen.extend_from_slice(&d),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exit(st) => return Ok(st),
            }
        }
        fail("the stream ended without an exit status")
    })
    .await??;
    ensure!(status.success(), "cat: {status:?}");
    ensure!(seen == b"first chunk\nsecond\n", "stdout {}", show(&seen));
    Ok(())
}

/// Non-UTF-8 bytes pass byte-exact through stdin, stdout and stderr.
pub async fn exec_bytes_exact(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let mut data: Vec<u8> = (0..=255u8).cycle().take(256 * 4).collect();
    data.extend_from_slice(b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\r\n\0");
    let mut r = req(["cat"]);
    r.stdin = Some(stdin_of(data.clone()));
    let o = run(b, id, r).await?;
    ensure!(
        o.stdout == data,
        "stdout differs ({} bytes, want {})",
        o.stdout.len(),
        data.len()
    );
    let mut r = req(["sh", "-c", "cat >&2"]);
    r.stdin = Some(stdin_of(data.clone()));
    let o = run(b, id, r).await?;
    ensure!(
        o.stderr == data && o.stdout.is_empty(),
        "stderr differs ({} bytes)",
        o.stderr.len()
    );
    let o = run(b, id, req(["printf", "\\377\\376\\000x"])).await?;
    ensure!(o.stdout == b"\xff\xfe\0x", "printf octal: {:?}", o.stdout);
    Ok(())
}

/// The timeout kills the whole process group and reports `timed_out` with the output so far.
pub async fn exec_timeout_kills_group(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let marker = format!("/tmp/capsules-pg-{}", tag());
    let job = 3 * time_scale(b);
    let script = format!("printf started; sleep {job} && printf alive > {marker} & sleep 300");
    let mut r = ExecRequest::new(["sh", "-c", &script]);
    r.timeout = Some(secs(b, 1));
    let o = within(secs(b, 20), "exec with a timeout", b.exec_collect(id, r)).await??;
    ensure!(o.status.timed_out, "not reported as timed out: {:?}", o.status);
    ensure!(!o.status.success(), "a timed-out command reports success");
    ensure!(o.stdout == b"started", "output so far: {}", show(&o.stdout));
    tokio::time::sleep(secs(b, 4)).await;
    match b.stat(id, &marker).await {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
        Ok(_) => fail("a background child of the timed-out command lived on (its marker file appeared)"),
    }
}

/// The output cap keeps `cap` bytes per stream, a head and a tail, and counts the rest.
pub async fn exec_output_cap_head_tail(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let path = format!("/tmp/capsules-cap-{}.bin", tag());
    let full = random_bytes(256 << 10);
    b.write_bytes(id, &path, Bytes::from(full.clone())).await?;
    let cap = 64 << 10;
    let mut r = ExecRequest::new(["cat", &path]);
    r.output_cap = Some(cap as u64);
    let o = run(b, id, r).await?;
    ensure!(o.status.success(), "cat: {:?}", o.status);
    check_capped("stdout", &o.stdout, &full, o.status.stdout_dropped, cap)?;
    ensure!(
        o.status.stderr_dropped == 0,
        "stderr_dropped {} with no stderr",
        o.status.stderr_dropped
    );
    let mut r = ExecRequest::new(["sh", "-c", &format!("cat {path} >&2")]);
    r.output_cap = Some(cap as u64);
    let o = run(b, id, r).await?;
    check_capped("stderr", &o.stderr, &full, o.status.stderr_dropped, cap)?;
    let mut r = req(["printf", "small"]);
    r.output_cap = Some(cap as u64);
    let o = run(b, id, r).await?;
    ensure!(
        o.stdout == b"small" && o.status.stdout_dropped == 0,
        "small output was cut: {:?}",
        o.status
    );
    let _ = b.remove(id, &path, false).await;
    Ok(())
}

/// 50 execs at once all finish with their own output.
pub async fn exec_concurrent_50(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let runs = (0..50).map(|i| {
        let mut r = req(["sh", "-c", "sleep 1; printf '%s' \"$N\""]);
        r.env.insert("N".into(), i.to_string());
        b.exec_collect(id, r)
    });
    let outs = within(secs(b, 60), "50 concurrent execs", futures::future::join_all(runs)).await?;
    for (i, o) in outs.into_iter().enumerate() {
        let o = o?;
        ensure!(
            o.status.success() && o.stdout == i.to_string().as_bytes(),
            "exec {i}: {:?} {}",
            o.status,
            show(&o.stdout)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- background

async fn attach_until(b: &dyn Backend, id: &CapsuleId, handle: &str, offset: u64, want: &[u8]) -> CaseResult {
    let mut s = b.attach(id, handle, offset).await?;
    let mut seen = Vec::new();
    stdout_until(b, &mut s.events, &mut seen, want).await
}

async fn attach_exit(
    b: &dyn Backend,
    id: &CapsuleId,
    handle: &str,
) -> std::result::Result<crate::backend::ExitStatus, Failure> {
    let mut s = b.attach(id, handle, 0).await?;
    within(secs(b, 20), "the background process's exit", async {
        while let Some(ev) = s.events.next().await {
            if let ExecEvent::Exit(st) = ev? {
                return Ok(st);
            }
        }
        fail("the attach stream ended without an exit status")
    })
    .await?
}

/// spawn, processes, attach from 0 and from an offset, signal.
pub async fn background_spawn_attach_signal(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let p = b
        .spawn(id, req(["sh", "-c", "printf one; sleep 1; printf two; sleep 300"]))
        .await?;
    let Some(handle) = p.handle.clone() else {
        return fail("spawn returned no handle");
    };
    ensure!(p.running, "spawned process not running: {p:?}");
    let list = b.processes(id).await?;
    ensure!(
        list.iter().any(|q| q.handle.as_deref() == Some(&handle) && q.running),
        "processes() does not list {handle} as running: {list:?}"
    );
    attach_until(b, id, &handle, 0, b"onetwo").await?;
    let mut s = b.attach(id, &handle, 3).await?;
    let first = within(secs(b, 10), "attach from offset 3", s.events.next()).await?;
    match first {
        Some(Ok(ExecEvent::Stdout(d))) => ensure!(d.starts_with(b"two"), "attach at 3 began with {}", show(&d)),
        other => return fail(format!("attach at 3 gave {other:?}")),
    }
    drop(s);
    b.signal(id, &handle, 15).await?;
    let st = attach_exit(b, id, &handle).await?;
    ensure!(st.signal == Some(15) || st.shell_code() == 143, "after SIGTERM: {st:?}");
    let list = b.processes(id).await?;
    ensure!(
        !list.iter().any(|q| q.handle.as_deref() == Some(&handle) && q.running),
        "{handle} still listed as running after SIGTERM"
    );
    Ok(())
}

/// A background process survives sleep/wake and goes on producing output.
pub async fn background_survives_sleep(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let p = b
        .spawn(id, req(["sh", "-c", "printf before; sleep 2; printf after; sleep 300"]))
        .await?;
    let handle = p.handle.clone().unwrap_or_default();
    attach_until(b, id, &handle, 0, b"before").await?;
    within(secs(b, 120), "sleep", b.sleep(id)).await??;
    within(secs(b, 120), "wake", b.wake(id)).await??;
    attach_until(b, id, &handle, 0, b"beforeafter").await?;
    let list = b.processes(id).await?;
    ensure!(
        list.iter().any(|q| q.handle.as_deref() == Some(&handle) && q.running),
        "{handle} not running after wake: {list:?}"
    );
    b.signal(id, &handle, 9).await?;
    let st = attach_exit(b, id, &handle).await?;
    ensure!(st.signal == Some(9) || st.shell_code() == 137, "after SIGKILL: {st:?}");
    Ok(())
}

// ---------------------------------------------------------------- pty

async fn pty_until(
    out: &mut BoxStream<'static, crate::Result<PtyEvent>>,
    seen: &mut Vec<u8>,
    want: &[u8],
    deadline: Duration,
) -> CaseResult {
    let what = format!("terminal output {}", show(want));
    within(deadline, &what, async {
        loop {
            if seen.windows(want.len()).any(|w| w == want) {
                return Ok(());
            }
            match out.next().await {
                Some(Ok(PtyEvent::Output(d))) => seen.extend_from_slice(&d),
                Some(Ok(PtyEvent::Exit(st))) => {
                    return fail(format!("the terminal exited ({st:?}); saw {}", show(seen)));
                }
                Some(Err(e)) => return Err(e.into()),
                None => return fail("the terminal output ended"),
            }
        }
    })
    .await
    .map_err(|f| Failure(format!("{f}; saw {}", show(seen))))?
}

/// Initial size, resize, Ctrl-C stops a foreground `sleep`, `exit N` ends the terminal.
pub async fn pty_size_resize_ctrl_c_exit(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let pty = b
        .pty(
            id,
            PtyRequest {
                argv: None,
                cols: 120,
                rows: 40,
                env: BTreeMap::new(),
                cwd: None,
            },
        )
        .await?;
    let (input, mut out) = (pty.input, pty.output);
    let send = |d: &'static [u8]| {
        let input = input.clone();
        async move {
            input
                .send(PtyInput::Data(Bytes::from_static(d)))
                .await
                .map_err(|_| Failure("terminal input closed".into()))
        }
    };
    let mut seen = Vec::new();
    send(b"stty size\n").await?;
    pty_until(&mut out, &mut seen, b"40 120", secs(b, 30)).await?;
    input
        .send(PtyInput::Resize { cols: 200, rows: 50 })
        .await
        .map_err(|_| Failure("terminal input closed".into()))?;
    seen.clear();
    send(b"stty size\n").await?;
    pty_until(&mut out, &mut seen, b"50 200", secs(b, 30)).await?;
    seen.clear();
    send(b"sleep 120\n").await?;
    pty_until(&mut out, &mut seen, b"sleep 120", secs(b, 30)).await?;
    tokio::time::sleep(secs(b, 1)).await;
    send(b"\x03").await?;
    seen.clear();
    send(b"printf 'mark%s\\n' 42\n").await?;
    pty_until(&mut out, &mut seen, b"mark42", secs(b, 10))
        .await
        .map_err(|f| Failure(format!("after Ctrl-C: {f}")))?;
    send(b"exit 3\n").await?;
    let st = within(secs(b, 30), "the terminal's exit", async {
        while let Some(ev) = out.next().await {
            if let PtyEvent::Exit(st) = ev? {
                return Ok(st);
            }
        }
        fail("the terminal output ended without an exit status")
    })
    .await??;
    ensure!(st.code == Some(3), "exit 3 ended the terminal with {st:?}");
    Ok(())
}

// ---------------------------------------------------------------- files

/// 1 MiB of random bytes: written, read back and hashed inside are all the same.
pub async fn files_random_1mib_sha256(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let path = format!("/workspace/ctk-{}/random.bin", tag());
    let data = random_bytes(1 << 20);
    let n = within(
        secs(b, 60),
        "write 1 MiB",
        b.write_bytes(id, &path, Bytes::from(data.clone())),
    )
    .await??;
    ensure!(n == 1 << 20, "write_file reported {n} bytes");
    let back = within(secs(b, 60), "read 1 MiB", b.read_to_vec(id, &path)).await??;
    ensure!(back == data, "read back {} bytes, not the same", back.len());
    let inside = sha_inside(b, id, &path).await?;
    ensure!(
        inside == sha_hex(&data),
        "sha256sum inside {inside}, want {}",
        sha_hex(&data)
    );
    let st = b.stat(id, &path).await?;
    ensure!(st.kind == FileKind::File && st.size == 1 << 20, "stat {st:?}");
    b.remove(id, path.rsplit_once('/').map_or("", |p| p.0), true).await?;
    Ok(())
}

/// File names with spaces, non-ASCII, a leading dash and quotes round-trip, also through exec.
pub async fn files_odd_names(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let dir = format!("/workspace/ctk-names-{}", tag());
    let names = ["a b.txt", "ünï 名.txt", "-x.txt", "q'u\"ote.txt"];
    for n in names {
        b.write_bytes(id, &format!("{dir}/{n}"), Bytes::from(format!("content of {n}")))
            .await?;
    }
    for n in names {
        let path = format!("{dir}/{n}");
        let back = b.read_to_vec(id, &path).await?;
        ensure!(
            back == format!("content of {n}").as_bytes(),
            "{n:?} read back {}",
            show(&back)
        );
        let inside = sha_inside(b, id, &path).await?;
        ensure!(inside == sha_hex(&back), "{n:?}: sha256sum inside differs");
        let mut r = ExecRequest::new(["cat", "--", n]);
        r.cwd = Some(dir.clone());
        let o = run(b, id, r).await?;
        ensure!(o.stdout == back, "cat -- {n:?} in its dir printed {}", show(&o.stdout));
    }
    let listed: BTreeSet<String> = b.list_dir(id, &dir).await?.into_iter().map(|s| s.name).collect();
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    ensure!(listed == want, "list_dir {listed:?}, want {want:?}");
    b.remove(id, &dir, true).await?;
    Ok(())
}

fn tar_of(files: &[(&str, &[u8], u32)], dirs: &[&str]) -> std::result::Result<Vec<u8>, Failure> {
    let io = |e: std::io::Error| Failure(format!("building the tar failed: {e}"));
    let mut t = tar::Builder::new(Vec::new());
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        t.append_data(&mut h, d, std::io::empty()).map_err(io)?;
    }
    for (p, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        t.append_data(&mut h, p, *data).map_err(io)?;
    }
    t.into_inner().map_err(io)
}

/// A directory tree goes in as one tar stream and comes back as one.
pub async fn files_tar_round_trip(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let dest = format!("/workspace/ctk-tar-{}/tree", tag());
    let big = random_bytes(200 << 10);
    let files: Vec<(&str, &[u8], u32)> = vec![
        ("README.md", b"# hello\n", 0o644),
        ("src/main.rs", b"fn main() {}\n", 0o644),
        ("bin/run.sh", b"#!/bin/sh\necho run\n", 0o755),
        ("a/b/c/deep.txt", b"deep", 0o600),
        ("with space.txt", b"spaced", 0o644),
        ("empty", b"", 0o644),
        ("data/big.bin", &big, 0o644),
    ];
    let archive = tar_of(&files, &["src", "bin", "a", "a/b", "a/b/c", "data", "empty-dir"])?;
    let stream: ByteStream = Box::pin(futures::stream::iter(
        archive
            .chunks(7000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ));
    within(secs(b, 60), "upload_tar", b.upload_tar(id, &dest, stream)).await??;
    for (p, data, _) in &files {
        let back = b.read_to_vec(id, &format!("{dest}/{p}")).await?;
        ensure!(back == *data, "{p} after upload: {} bytes, not the same", back.len());
    }
    let st = b.stat(id, &format!("{dest}/bin/run.sh")).await?;
    ensure!(
        st.mode & 0o777 == 0o755,
        "bin/run.sh mode {:o}, want 755",
        st.mode & 0o777
    );
    let st = b.stat(id, &format!("{dest}/empty-dir")).await?;
    ensure!(st.kind == FileKind::Dir, "empty-dir is {:?}", st.kind);
    ensure!(
        sha_inside(b, id, &format!("{dest}/data/big.bin")).await? == sha_hex(&big),
        "data/big.bin hashed inside differs"
    );

    let mut s = within(secs(b, 60), "download_tar", b.download_tar(id, &dest)).await??;
    let mut packed = Vec::new();
    while let Some(c) = s.next().await {
        packed.extend_from_slice(&c?);
    }
    let mut got_files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut got_dirs: BTreeSet<String> = BTreeSet::new();
    let bad = |e: std::io::Error| Failure(format!("download_tar gave no valid tar: {e}"));
    let mut ar = tar::Archive::new(std::io::Cursor::new(packed));
    for e in ar.entries().map_err(bad)? {
        let mut e = e.map_err(bad)?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let name = name.trim_start_matches("./").trim_end_matches('/').to_owned();
        ensure!(
            !name.starts_with('/') && !name.split('/').any(|c| c == ".."),
            "entry {name:?} is not relative"
        );
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                got_dirs.insert(name);
            }
            tar::EntryType::Regular => {
                let mut v = Vec::new();
                e.read_to_end(&mut v).map_err(bad)?;
                got_files.insert(name, v);
            }
            _ => {}
        }
    }
    for (p, data, _) in &files {
        ensure!(
            got_files.get(*p).map(Vec::as_slice) == Some(*data),
            "download: {p} missing or different"
        );
    }
    ensure!(
        got_files.len() == files.len(),
        "download has extra files: {:?}",
        got_files.keys().collect::<Vec<_>>()
    );
    for d in ["src", "a/b/c", "empty-dir"] {
        ensure!(got_dirs.contains(d), "download lacks directory {d}: {got_dirs:?}");
    }
    b.remove(id, dest.rsplit_once('/').map_or("", |p| p.0), true).await?;
    Ok(())
}

fn expect_kind<T: fmt::Debug>(what: &str, r: crate::Result<T>, kind: ErrorKind) -> CaseResult {
    match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => fail(format!("{what}: got {} ({}), want {kind}", e.kind(), e.message())),
        Ok(v) => fail(format!("{what}: succeeded ({v:?}), want {kind}")),
    }
}

/// mkdir -p, stat, list, rename (file and directory), remove (plain and recursive).
pub async fn files_dir_ops(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let base = format!("/workspace/ctk-ops-{}", tag());
    b.mkdir(id, &format!("{base}/a/b/c")).await?;
    b.mkdir(id, &format!("{base}/a/b/c")).await?;
    let st = b.stat(id, &format!("{base}/a/b/c")).await?;
    ensure!(st.kind == FileKind::Dir && st.name == "c", "stat of a made dir: {st:?}");
    b.write_bytes(id, &format!("{base}/a/f.txt"), Bytes::from_static(b"hello"))
        .await?;
    let st = b.stat(id, &format!("{base}/a/f.txt")).await?;
    ensure!(
        st.kind == FileKind::File && st.size == 5 && st.name == "f.txt",
        "stat of a file: {st:?}"
    );
    let list: Vec<(String, FileKind)> = b
        .list_dir(id, &format!("{base}/a"))
        .await?
        .into_iter()
        .map(|s| (s.name, s.kind))
        .collect();
    let mut sorted = list.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        sorted == vec![("b".to_owned(), FileKind::Dir), ("f.txt".to_owned(), FileKind::File)],
        "list_dir: {list:?}"
    );
    b.rename(id, &format!("{base}/a/f.txt"), &format!("{base}/a/b/g.txt"))
        .await?;
    expect_kind(
        "stat after rename",
        b.stat(id, &format!("{base}/a/f.txt")).await,
        ErrorKind::NotFound,
    )?;
    ensure!(
        b.read_to_vec(id, &format!("{base}/a/b/g.txt")).await? == b"hello",
        "renamed file differs"
    );
    b.rename(id, &format!("{base}/a/b"), &format!("{base}/moved")).await?;
    ensure!(
        b.read_to_vec(id, &format!("{base}/moved/g.txt")).await? == b"hello",
        "moved directory lost a file"
    );
    ensure!(
        b.stat(id, &format!("{base}/moved/c")).await?.kind == FileKind::Dir,
        "moved directory lost a dir"
    );
    let r = b.remove(id, &format!("{base}/moved"), false).await;
    ensure!(r.is_err(), "removing a full directory without recursive succeeded");
    b.remove(id, &format!("{base}/moved/g.txt"), false).await?;
    expect_kind(
        "read a removed file",
        b.read_to_vec(id, &format!("{base}/moved/g.txt")).await,
        ErrorKind::NotFound,
    )?;
    b.remove(id, &base, true).await?;
    expect_kind(
        "stat after a recursive remove",
        b.stat(id, &base).await,
        ErrorKind::NotFound,
    )?;
    expect_kind(
        "remove of a missing path",
        b.remove(id, &base, true).await,
        ErrorKind::NotFound,
    )?;
    expect_kind(
        "read of a missing file",
        b.read_to_vec(id, &format!("{base}/nope")).await,
        ErrorKind::NotFound,
    )?;
    Ok(())
}

// ---------------------------------------------------------------- connect

/// The port the echo case uses.
pub const ECHO_PORT: u16 = 18080;

/// `connect` reaches a server listening inside the capsule, both ways, byte-exact.
pub async fn connect_echo(b: &dyn Backend, id: &CapsuleId, echo: &dyn EchoServer) -> CaseResult {
    echo.start(b, id, ECHO_PORT).await?;
    let mut conn = within(secs(b, 30), "connect to the echo server", async {
        loop {
            match b.connect(id, ECHO_PORT).await {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await?;
    let payload = random_bytes(100 << 10);
    let io = |e: std::io::Error| Failure(format!("echo connection: {e}"));
    let (mut r, mut w) = tokio::io::split(&mut conn);
    let send = async {
        w.write_all(&payload).await.map_err(io)?;
        w.flush().await.map_err(io)
    };
    let recv = async {
        let mut back = vec![0; payload.len()];
        r.read_exact(&mut back).await.map_err(io)?;
        Ok::<_, Failure>(back)
    };
    let (sent, back) = within(secs(b, 30), "echo round trip", futures::future::join(send, recv)).await?;
    sent?;
    ensure!(back? == payload, "the echo came back different");
    Ok(())
}

/// `connect` to a port nothing listens on fails (connection refused) instead of hanging.
pub async fn connect_refused(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let r = within(secs(b, 30), "connect to a closed port", b.connect(id, 1)).await?;
    ensure!(r.is_err(), "connect to port 1 (nothing listens) succeeded");
    Ok(())
}

// ---------------------------------------------------------------- lifecycle

/// state says running, list has the capsule, logs has the boot log.
pub async fn lifecycle_state_list_logs(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let st = b.state(id).await?;
    ensure!(st == BackendState::Running, "state {st:?}");
    let list = b.list().await?;
    ensure!(
        list.iter().any(|c| &c.id == id && c.state == BackendState::Running),
        "list lacks the running capsule: {list:?}"
    );
    let logs = b.logs(id).await?;
    ensure!(!logs.is_empty(), "the boot log is empty");
    ensure!(
        b.state(&CapsuleId::generate()).await? == BackendState::Gone,
        "an unknown id is not Gone"
    );
    Ok(())
}

/// Files are intact across three sleep/wake cycles; sleep and wake are idempotent.
pub async fn lifecycle_sleep_wake_cycles(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let path = format!("/workspace/ctk-sleep-{}.bin", tag());
    let data = random_bytes(64 << 10);
    b.write_bytes(id, &path, Bytes::from(data.clone())).await?;
    for cycle in 1..=3 {
        within(secs(b, 120), "sleep", b.sleep(id)).await??;
        ensure!(
            b.state(id).await? == BackendState::Sleeping,
            "cycle {cycle}: not sleeping after sleep"
        );
        within(secs(b, 120), "sleep again", b.sleep(id)).await??;
        within(secs(b, 120), "wake", b.wake(id)).await??;
        within(secs(b, 120), "wake again", b.wake(id)).await??;
        ensure!(
            b.state(id).await? == BackendState::Running,
            "cycle {cycle}: not running after wake"
        );
        let back = b.read_to_vec(id, &path).await?;
        ensure!(back == data, "cycle {cycle}: the file changed across sleep/wake");
        let o = run(b, id, req(["printf", "awake"])).await?;
        ensure!(
            o.stdout == b"awake",
            "cycle {cycle}: exec after wake printed {}",
            show(&o.stdout)
        );
    }
    b.remove(id, &path, false).await?;
    Ok(())
}

/// restart boots cold: files are kept, processes are not.
pub async fn lifecycle_restart_keeps_files(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let path = format!("/workspace/ctk-restart-{}.bin", tag());
    let data = random_bytes(64 << 10);
    b.write_bytes(id, &path, Bytes::from(data.clone())).await?;
    let p = b.spawn(id, req(["sleep", "600"])).await?;
    within(secs(b, 300), "restart", b.restart(id)).await??;
    ensure!(b.state(id).await? == BackendState::Running, "not running after restart");
    ensure!(
        b.read_to_vec(id, &path).await? == data,
        "the file changed across restart"
    );
    let list = b.processes(id).await?;
    ensure!(
        !list.iter().any(|q| q.handle == p.handle && q.running),
        "a process survived the restart: {list:?}"
    );
    let o = run(b, id, req(["printf", "rebooted"])).await?;
    ensure!(
        o.stdout == b"rebooted",
        "exec after restart printed {}",
        show(&o.stdout)
    );
    b.remove(id, &path, false).await?;
    Ok(())
}

/// Terminate cuts a streaming exec with `Conflict` saying so, within 5 s; terminate is idempotent
/// and the capsule is gone from `state` and `list`.
pub async fn lifecycle_terminate_cuts_stream(b: &dyn Backend, id: &CapsuleId) -> CaseResult {
    let mut s = b.exec(id, req(["sh", "-c", "printf x; sleep 300"])).await?;
    let mut seen = Vec::new();
    stdout_until(b, &mut s.events, &mut seen, b"x").await?;
    within(secs(b, 120), "terminate", b.terminate(id)).await??;
    let end = within(secs(b, 5), "the cut stream's end", async {
        loop {
            match s.events.next().await {
                Some(Ok(ExecEvent::Exit(st))) => return Ok(Ok(st)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(Err(e)),
                None => return fail("the stream ended without an error"),
            }
        }
    })
    .await??;
    match end {
        Err(e) => ensure!(
            e.kind() == ErrorKind::Conflict && e.message().contains("terminated"),
            "the stream ended with {} ({}); want conflict saying terminated",
            e.kind(),
            e.message()
        ),
        Ok(st) => {
            return fail(format!(
                "the stream ended with an exit status {st:?}, want a Conflict error"
            ));
        }
    }
    within(secs(b, 60), "terminate again", b.terminate(id)).await??;
    ensure!(
        b.state(id).await? == BackendState::Gone,
        "state after terminate is not Gone"
    );
    ensure!(
        !b.list().await?.iter().any(|c| &c.id == id),
        "list still has the terminated capsule"
    );
    Ok(())
}
