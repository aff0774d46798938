//! A handle to one capsule (by name or id): commands, console, files, URL, lifecycle, usage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::activity::ActivityGuard;
use super::args::Arg;
use super::exec::{Console, ExecBuilder, hold, hold_bytes};
use super::update::UpdateBuilder;
use super::{Inner, traced};
use crate::backend::{ByteStream, Connection, ExecRequest, ExecStream, FileStat, ProcessInfo, PtyRequest};
use crate::error::{Error, Result};
use crate::events::{Event, EventKind, NewEvent};
use crate::ledger::{LedgerEntry, Usage};
use crate::policy::Action;
use crate::records::CapsuleRecord;
use crate::state::{CapsuleState, Operation};
use crate::store::StartKind;
use crate::tokens::{MintedToken, Principal, Scope, TokenSpec};
use crate::types::{CapsuleRef, PublicUrl, UrlAccess, new_host_label};

/// One capsule, as seen by one token. Made by `Client::create` (then it holds the capsule's id) or
/// `Client::capsule(name or id)`.
#[derive(Clone)]
pub struct CapsuleHandle {
    pub(super) inner: Arc<Inner>,
    secret: String,
    target: CapsuleRef,
}

impl std::fmt::Debug for CapsuleHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleHandle")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A capsule's usage trail and limits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CapsuleUsage {
    pub capsule: CapsuleRecord,
    pub usage: Usage,
    pub entries: Vec<LedgerEntry>,
}

impl CapsuleHandle {
    pub(super) fn new(inner: Arc<Inner>, secret: &str, target: CapsuleRef) -> Self {
        CapsuleHandle {
            inner,
            secret: secret.to_owned(),
            target,
        }
    }

    /// How this handle names the capsule (an id after create).
    pub fn target(&self) -> &CapsuleRef {
        &self.target
    }

    pub(super) async fn prep(&self, action: Action<'_>, op: Operation) -> Result<(Principal, CapsuleRecord)> {
        self.inner.prepare(&self.secret, &self.target, action, op).await
    }

    pub(super) async fn event(&self, p: &Principal, rec: &CapsuleRecord, kind: EventKind) -> Result<()> {
        self.inner
            .store
            .append_event(
                NewEvent::new(self.inner.now(), kind)
                    .team(&rec.team)
                    .capsule(&rec.id)
                    .token(Some(&p.token)),
            )
            .await
            .map(|_| ())
    }

    // ---- status ----

    /// The capsule's record (state, limits, URL, metering). Not activity.
    pub async fn status(&self) -> Result<CapsuleRecord> {
        traced("status", async {
            Ok(self.prep(Action::Read, Operation::Read).await?.1)
        })
        .await
    }

    /// Usage trail of this capsule only (by id: a reused name never mixes two capsules).
    pub async fn usage(&self) -> Result<CapsuleUsage> {
        traced("usage", async {
            let (_, rec) = self.prep(Action::Read, Operation::Read).await?;
            let entries = self.inner.store.capsule_entries(&rec.id).await?;
            let mut usage = Usage::from_entries(&entries)?;
            usage.preview_bytes = rec.meter.traffic_bytes;
            Ok(CapsuleUsage {
                capsule: rec,
                usage,
                entries,
            })
        })
        .await
    }

    /// The capsule's audit trail.
    pub async fn events(&self) -> Result<Vec<Event>> {
        traced("events", async {
            let (_, rec) = self.prep(Action::Read, Operation::Read).await?;
            self.inner.store.capsule_events(&rec.id).await
        })
        .await
    }

    /// The boot/serial log.
    pub async fn logs(&self) -> Result<Bytes> {
        traced("logs", async {
            let (_, rec) = self.prep(Action::Read, Operation::Read).await?;
            if rec.state == CapsuleState::Terminated {
                return Err(Error::conflict(format!(
                    "capsule {} is terminated; its logs are gone",
                    rec.name
                )));
            }
            self.inner.backend.logs(&rec.id).await
        })
        .await
    }

    // ---- commands ----

    /// Runs a command (in `/workspace` by default). `.await` collects the output; set options
    /// first (`.env`, `.cwd`, `.timeout`, `.stdin`) or call `.stream()`.
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecBuilder {
            handle: self.clone(),
            req: ExecRequest::new(argv),
        }
    }

    /// Starts a background process (counts as activity while it runs).
    pub async fn spawn(&self, req: ExecRequest) -> Result<ProcessInfo> {
        traced("spawn", async {
            if req.argv.is_empty() {
                return Err(Error::invalid_input("a command needs at least a program name"));
            }
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            let _g = ActivityGuard::new(&self.inner, &rec.id);
            let argv = req.argv.clone();
            let info = self.inner.backend.spawn(&rec.id, req).await?;
            self.event(
                &p,
                &rec,
                EventKind::Spawned {
                    argv,
                    handle: info.handle.clone(),
                },
            )
            .await?;
            Ok(info)
        })
        .await
    }

    /// Processes started through the API.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        traced("processes", async {
            let (_, rec) = self.prep(Action::Read, Operation::Read).await?;
            if rec.state != CapsuleState::Running {
                return Err(Error::conflict(format!(
                    "capsule {} is {}; it has no processes now",
                    rec.name, rec.state
                )));
            }
            self.inner.backend.processes(&rec.id).await
        })
        .await
    }

    /// Output of a background process from byte `offset`.
    pub async fn attach(&self, handle: &str, offset: u64) -> Result<ExecStream> {
        traced("attach", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            let g = ActivityGuard::new(&self.inner, &rec.id);
            let s = self.inner.backend.attach(&rec.id, handle, offset).await?;
            Ok(hold(s, g))
        })
        .await
    }

    /// Signals a background process's group.
    pub async fn signal(&self, handle: &str, signal: i32) -> Result<()> {
        traced("signal", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.signal(&rec.id, handle, signal).await?;
            self.event(
                &p,
                &rec,
                EventKind::Signalled {
                    handle: handle.to_owned(),
                    signal,
                },
            )
            .await
        })
        .await
    }

    /// Opens a terminal (console). Attached consoles count as activity until dropped.
    pub async fn console(&self, req: PtyRequest) -> Result<Console> {
        traced("console", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            if !self.inner.backend.capabilities().pty {
                return Err(Error::unsupported(format!(
                    "the {} backend has no console",
                    self.inner.backend.info().name
                )));
            }
            let session = self.inner.backend.pty(&rec.id, req).await?;
            self.event(&p, &rec, EventKind::ConsoleAttached).await?;
            Ok(Console {
                session: Some(session),
                guard: Some(ActivityGuard::new(&self.inner, &rec.id)),
                detach: Some((self.inner.clone(), rec, p.token.clone(), self.inner.now())),
            })
        })
        .await
    }

    /// Checks that this token may open a console on the capsule now, without opening one or
    /// waking the capsule: the same authentication, policy (`capsules:write` in reach) and
    /// state checks as [`console`](Self::console). Returns the live capsule's record. A server
    /// calls it before handing out a short-lived console ticket.
    pub async fn authorize_console(&self) -> Result<CapsuleRecord> {
        traced("authorize_console", async {
            let p = self.inner.authenticate(&self.secret).await?;
            let rec = self.inner.resolve(&p, &self.target, false).await?;
            self.inner
                .check(
                    &p,
                    &Action::Write,
                    crate::policy::Target::Capsule {
                        team: &rec.team,
                        name: &rec.name,
                        id: Some(&rec.id),
                    },
                )
                .await?;
            crate::state::refusal(rec.state, Operation::Use, rec.name.as_str())?;
            if !self.inner.backend.capabilities().pty {
                return Err(Error::unsupported(format!(
                    "the {} backend has no console",
                    self.inner.backend.info().name
                )));
            }
            Ok(rec)
        })
        .await
    }

    /// A byte stream to `port` inside the capsule.
    pub async fn connect(&self, port: u16) -> Result<Box<dyn Connection>> {
        traced("connect", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            if !self.inner.backend.capabilities().connect {
                return Err(Error::unsupported(format!(
                    "the {} backend cannot connect to ports",
                    self.inner.backend.info().name
                )));
            }
            self.inner.activity.touch(&rec.id, self.inner.now());
            self.inner.backend.connect(&rec.id, port).await
        })
        .await
    }

    // ---- files ----

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        traced("read_file", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            let _g = ActivityGuard::new(&self.inner, &rec.id);
            let mut s = self.inner.backend.read_file(&rec.id, path).await?;
            let mut v = Vec::new();
            while let Some(c) = s.next().await {
                v.extend_from_slice(&c?);
            }
            Ok(v)
        })
        .await
    }

    /// A file as a stream (a transfer: activity while it lasts).
    pub async fn read_file_stream(&self, path: &str) -> Result<ByteStream> {
        traced("read_file", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            let g = ActivityGuard::new(&self.inner, &rec.id);
            let s = self.inner.backend.read_file(&rec.id, path).await?;
            Ok(hold_bytes(s, g))
        })
        .await
    }

    pub async fn write_file(&self, path: &str, data: impl Into<Bytes>) -> Result<u64> {
        let data = data.into();
        let s: ByteStream = Box::pin(futures::stream::once(async move { Ok(data) }));
        self.write_file_stream(path, s, None).await
    }

    pub async fn write_file_stream(&self, path: &str, data: ByteStream, mode: Option<u32>) -> Result<u64> {
        traced("write_file", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            let _g = ActivityGuard::new(&self.inner, &rec.id);
            let n = self.inner.backend.write_file(&rec.id, path, data, mode).await?;
            self.event(
                &p,
                &rec,
                EventKind::FileWritten {
                    path: path.to_owned(),
                    bytes: n,
                },
            )
            .await?;
            Ok(n)
        })
        .await
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        traced("stat", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.stat(&rec.id, path).await
        })
        .await
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileStat>> {
        traced("list_dir", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.list_dir(&rec.id, path).await
        })
        .await
    }

    pub async fn mkdir(&self, path: &str) -> Result<()> {
        traced("mkdir", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.mkdir(&rec.id, path).await?;
            self.event(
                &p,
                &rec,
                EventKind::FileWritten {
                    path: path.to_owned(),
                    bytes: 0,
                },
            )
            .await
        })
        .await
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        traced("remove", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.remove(&rec.id, path, recursive).await?;
            self.event(&p, &rec, EventKind::FileRemoved { path: path.to_owned() })
                .await
        })
        .await
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        traced("rename", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            self.inner.backend.rename(&rec.id, from, to).await?;
            self.event(
                &p,
                &rec,
                EventKind::FileRenamed {
                    from: from.to_owned(),
                    to: to.to_owned(),
                },
            )
            .await
        })
        .await
    }

    /// Unpacks a tar stream into `dest`.
    pub async fn upload_tar(&self, dest: &str, tar: ByteStream) -> Result<()> {
        traced("upload_tar", async {
            let (p, rec) = self.prep(Action::Write, Operation::Use).await?;
            let _g = ActivityGuard::new(&self.inner, &rec.id);
            // The audit event records the bytes that actually went in.
            let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let c = counted.clone();
            let tar: ByteStream = Box::pin(futures::StreamExt::inspect(tar, move |chunk| {
                if let Ok(b) = chunk {
                    c.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }));
            self.inner.backend.upload_tar(&rec.id, dest, tar).await?;
            let bytes = counted.load(std::sync::atomic::Ordering::Relaxed);
            self.event(
                &p,
                &rec,
                EventKind::FilesUploaded {
                    dest: dest.to_owned(),
                    bytes,
                },
            )
            .await
        })
        .await
    }

    /// Packs the local directory `local` as tar (its contents, not the directory itself) and
    /// unpacks it into `dest` in the capsule.
    pub async fn upload_dir(&self, local: impl AsRef<Path>, dest: &str) -> Result<()> {
        let local = local.as_ref().to_owned();
        let tar = tokio::task::spawn_blocking(move || pack_dir(&local))
            .await
            .map_err(|e| Error::internal("packing the directory panicked").with_source(e))??;
        let s: ByteStream = Box::pin(futures::stream::once(async move { Ok(Bytes::from(tar)) }));
        self.upload_tar(dest, s).await
    }

    /// Packs directory `path` in the capsule as a tar stream.
    pub async fn download_tar(&self, path: &str) -> Result<ByteStream> {
        traced("download_tar", async {
            let (_, rec) = self.prep(Action::Write, Operation::Use).await?;
            let g = ActivityGuard::new(&self.inner, &rec.id);
            let s = self.inner.backend.download_tar(&rec.id, path).await?;
            Ok(hold_bytes(s, g))
        })
        .await
    }

    // ---- URL ----

    /// Sets or replaces the one public URL: `port` inside the capsule, `access` public (needs
    /// `urls:public`) or token. The host label is assigned at the first expose and kept.
    pub async fn expose(&self, port: u16, access: impl Arg<UrlAccess>) -> Result<PublicUrl> {
        let access = access.into_arg();
        traced("expose", async {
            let access = access?;
            if port == 0 {
                return Err(Error::invalid_input("port 0 is not a port; expose 1-65535"));
            }
            let (p, rec) = self.prep(Action::Expose { access }, Operation::Update).await?;
            if !self.inner.backend.capabilities().connect {
                return Err(Error::unsupported(format!(
                    "the {} backend cannot serve public URLs (no connect)",
                    self.inner.backend.info().name
                )));
            }
            for _ in 0..8 {
                let label = rec.host_label.clone().unwrap_or_else(|| new_host_label(&rec.name));
                let url = PublicUrl {
                    port,
                    access,
                    host_label: label,
                };
                let ev = NewEvent::new(self.inner.now(), EventKind::UrlChanged { url: Some(url.clone()) })
                    .team(&rec.team)
                    .capsule(&rec.id)
                    .token(Some(&p.token));
                match self.inner.store.set_url(&rec.id, Some(url.clone()), ev).await {
                    Ok(_) => return Ok(url),
                    Err(e) if e.kind() == crate::error::ErrorKind::AlreadyExists && rec.host_label.is_none() => {
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(Error::internal("could not draw a unique host label"))
        })
        .await
    }

    /// Removes the public URL (the label stays reserved for this capsule).
    pub async fn unexpose(&self) -> Result<()> {
        traced("unexpose", async {
            let (p, rec) = self
                .prep(
                    Action::Expose {
                        access: UrlAccess::Token,
                    },
                    Operation::Update,
                )
                .await?;
            let ev = NewEvent::new(self.inner.now(), EventKind::UrlChanged { url: None })
                .team(&rec.team)
                .capsule(&rec.id)
                .token(Some(&p.token));
            self.inner.store.set_url(&rec.id, None, ev).await.map(|_| ())
        })
        .await
    }

    /// Mints a `preview` token that opens this capsule's URL and nothing else.
    pub async fn preview_token(&self, ttl: Duration) -> Result<MintedToken> {
        traced("mint_preview", async {
            let (p, rec) = self.prep(Action::MintPreview, Operation::Read).await?;
            let mut spec = TokenSpec::new([Scope::Preview])
                .ttl(ttl)
                .label(format!("preview {}", rec.name));
            spec.capsule = Some(rec.id.clone());
            // Preview tokens are attenuated like any other, except for the scope itself, which
            // is derived from the caller's read access to this one capsule.
            let mut parent = p.clone();
            parent.effective.insert(Scope::Preview);
            parent.prefix = None;
            parent.sizes = None;
            parent.max_credit_limit = None;
            spec.prefix = None;
            super::admin::mint(&self.inner, &parent, spec).await
        })
        .await
    }

    // ---- lifecycle ----

    pub async fn sleep(&self) -> Result<CapsuleRecord> {
        traced("sleep", async {
            let (p, rec) = self.prep(Action::Write, Operation::Sleep).await?;
            self.inner.sleep(Some(&p), &rec, "requested").await
        })
        .await
    }

    /// Wakes a sleeping capsule (team caps, credit limit and balance apply; the error names the
    /// limit). Waits for a sleep in progress first.
    pub async fn wake(&self) -> Result<CapsuleRecord> {
        traced("wake", async {
            let (p, rec) = self.prep(Action::Write, Operation::Wake).await?;
            self.inner.ensure_running(&p, rec).await
        })
        .await
    }

    /// Boots the capsule cold from its disk (from running, sleeping or failed).
    pub async fn restart(&self) -> Result<CapsuleRecord> {
        traced("restart", async {
            let (p, rec) = self.prep(Action::Write, Operation::Restart).await?;
            self.inner.start(Some(&p), rec, StartKind::Restart).await
        })
        .await
    }

    /// Terminates (idempotent: terminating a terminated capsule is ok).
    pub async fn terminate(&self) -> Result<CapsuleRecord> {
        traced("terminate", async {
            let (p, rec) = self.prep(Action::Write, Operation::Terminate).await?;
            self.inner.terminate(Some(&p), &rec).await
        })
        .await
    }

    /// Changes limits after create; `.await` applies them.
    pub fn update(&self) -> UpdateBuilder {
        UpdateBuilder {
            handle: self.clone(),
            credit_limit: None,
            idle_timeout: None,
            max_runtime: None,
            network: None,
        }
    }
}

/// Packs the contents of `dir` into a tar archive in memory.
fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::invalid_input(format!("{} is not a readable directory", dir.display())).with_source(e))?;
    if !meta.is_dir() {
        return Err(Error::invalid_input(format!("{} is not a directory", dir.display())));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .map_err(|e| Error::internal(format!("could not pack {}", dir.display())).with_source(e))?;
    b.into_inner()
        .map_err(|e| Error::internal("could not finish the tar archive").with_source(e))
}
