//! Commands and the console: the exec builder (collected or streamed, audited when it ends) and
//! an attached console (activity while attached, audited on detach).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::Inner;
use super::activity::ActivityGuard;
use super::capsule::CapsuleHandle;
use super::traced;
use crate::backend::{ByteStream, ExecEvent, ExecOutput, ExecRequest, ExecStream, PtySession};
use crate::error::{Error, Result};
use crate::events::{EventKind, NewEvent};
use crate::policy::Action;
use crate::records::CapsuleRecord;
use crate::state::Operation;

pub(super) fn hold(s: ExecStream, g: ActivityGuard) -> ExecStream {
    let events = s.events.map(move |ev| {
        let _keep = &g;
        ev
    });
    ExecStream {
        events: Box::pin(events),
    }
}

pub(super) fn hold_bytes(s: ByteStream, g: ActivityGuard) -> ByteStream {
    Box::pin(s.map(move |c| {
        let _keep = &g;
        c
    }))
}

/// An open console. Dropping it detaches (recorded in the audit trail).
pub struct Console {
    pub(super) session: Option<PtySession>,
    pub(super) guard: Option<ActivityGuard>,
    pub(super) detach: Option<(Arc<Inner>, CapsuleRecord, crate::types::TokenId, i64)>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console(..)")
    }
}

impl Console {
    /// The terminal: `input` to send, `output` to read.
    pub fn session(&mut self) -> &mut PtySession {
        self.session.as_mut().expect("present until drop")
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.session.take();
        self.guard.take();
        if let Some((inner, rec, token, since)) = self.detach.take() {
            let ev = NewEvent::new(
                inner.now(),
                EventKind::ConsoleDetached {
                    duration_ms: inner.now() - since,
                },
            )
            .team(&rec.team)
            .capsule(&rec.id)
            .token(Some(&token));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = inner.store.append_event(ev).await;
                });
            }
        }
    }
}

/// An exec in preparation.
#[must_use = "an exec does nothing until awaited"]
pub struct ExecBuilder {
    pub(super) handle: CapsuleHandle,
    pub(super) req: ExecRequest,
}

impl std::fmt::Debug for ExecBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecBuilder").field("req", &self.req).finish()
    }
}

impl ExecBuilder {
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.req.env.insert(key.into(), value.into());
        self
    }
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.req.cwd = Some(cwd.into());
        self
    }
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.req.user = Some(user.into());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.req.timeout = Some(t);
        self
    }
    pub fn stdin(mut self, data: impl Into<Bytes>) -> Self {
        let d = data.into();
        self.req.stdin = Some(Box::pin(futures::stream::once(async move { Ok(d) })));
        self
    }
    pub fn output_cap(mut self, bytes: u64) -> Self {
        self.req.output_cap = Some(bytes);
        self
    }

    /// Streams the output as it comes. The exec is recorded (argv, exit, duration) when it ends.
    pub async fn stream(self) -> Result<ExecStream> {
        let h = self.handle;
        let req = self.req;
        traced("exec", async move {
            if req.argv.is_empty() {
                return Err(Error::invalid_input("a command needs at least a program name"));
            }
            let (p, rec) = h.prep(Action::Write, Operation::Use).await?;
            let guard = ActivityGuard::new(&h.inner, &rec.id);
            let argv = req.argv.clone();
            let started = h.inner.now();
            let mut s = match h.inner.backend.exec(&rec.id, req).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = h
                        .event(
                            &p,
                            &rec,
                            EventKind::Exec {
                                argv,
                                exit_code: None,
                                duration_ms: 0,
                                error: Some(e.to_string()),
                            },
                        )
                        .await;
                    return Err(e);
                }
            };
            let (tx, rx) = futures::channel::mpsc::channel::<Result<ExecEvent>>(16);
            let inner = h.inner.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let mut tx = tx;
                let mut exit = None;
                let mut error = None;
                use futures::SinkExt;
                while let Some(ev) = s.events.next().await {
                    match &ev {
                        Ok(ExecEvent::Exit(st)) => exit = Some(st.shell_code()),
                        Err(e) => error = Some(e.to_string()),
                        _ => {}
                    }
                    let last = matches!(ev, Ok(ExecEvent::Exit(_)) | Err(_));
                    if tx.send(ev).await.is_err() {
                        error.get_or_insert_with(|| "the caller stopped reading".into());
                        break;
                    }
                    if last {
                        break;
                    }
                }
                let ev = NewEvent::new(
                    inner.now(),
                    EventKind::Exec {
                        argv,
                        exit_code: exit,
                        duration_ms: inner.now() - started,
                        error,
                    },
                )
                .team(&rec.team)
                .capsule(&rec.id)
                .token(Some(&p.token));
                let _ = inner.store.append_event(ev).await;
            });
            Ok(ExecStream { events: Box::pin(rx) })
        })
        .await
    }

    async fn collect(self) -> Result<ExecOutput> {
        let mut s = self.stream().await?;
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
        Err(Error::internal("the command's output ended without an exit status"))
    }
}

impl IntoFuture for ExecBuilder {
    type Output = Result<ExecOutput>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<ExecOutput>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.collect())
    }
}
