//! A live agent session as the backend holds it: the session itself, its epoch, and a cut switch.
//!
//! When the backend ends a session on purpose (sleep, terminate, restart) or the VM dies, it
//! *cuts* it with a reason. Every call in flight and every stream handed out through the session
//! is guarded by the cut: it ends at once with an error that says why (`Unavailable` for sleep and
//! restart, `Conflict` for terminate and a lost VM) instead of waiting on a stream that will never
//! answer.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use capsules_core::backend::{Connection, ExecStream, PtySession};
use capsules_core::{Error, Result};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::adapters::AgentSession;

/// Why a session was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CutReason {
    /// The capsule went to sleep (or is going to).
    Sleep,
    /// The capsule was terminated.
    Terminated,
    /// The capsule is being restarted (cold boot).
    Restart,
    /// The VM stopped on its own; the text says how.
    Failed(String),
}

impl CutReason {
    pub(crate) fn error(&self) -> Error {
        match self {
            CutReason::Sleep => Error::unavailable("the capsule went to sleep during the call; retry once it is awake"),
            CutReason::Terminated => Error::conflict("the capsule was terminated"),
            CutReason::Restart => Error::unavailable("the capsule is restarting; retry once it runs again"),
            CutReason::Failed(why) => Error::conflict(format!(
                "the capsule's VM stopped ({why}); the capsule is failed and restart boots it from its disk"
            )),
        }
    }
}

/// One agent session of a capsule.
#[derive(Debug)]
pub(crate) struct LiveSession {
    agent: Box<dyn AgentSession>,
    /// The session's epoch (shown in `Debug`).
    #[allow(dead_code)]
    epoch: u64,
    cut: CancellationToken,
    reason: Mutex<Option<CutReason>>,
    call_timeout: Duration,
}

impl LiveSession {
    pub(crate) fn new(agent: Box<dyn AgentSession>, epoch: u64, call_timeout: Duration) -> Arc<Self> {
        Arc::new(LiveSession {
            agent,
            epoch,
            cut: CancellationToken::new(),
            reason: Mutex::new(None),
            call_timeout,
        })
    }

    pub(crate) fn agent(&self) -> &dyn AgentSession {
        &*self.agent
    }

    /// Ends the session: every guarded call and stream ends with `reason`'s error.
    pub(crate) fn cut(&self, reason: CutReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.cut.cancel();
        self.agent.close();
    }

    pub(crate) fn is_cut(&self) -> bool {
        self.cut.is_cancelled()
    }

    fn cut_error(&self) -> Error {
        match &*self.reason.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(r) => r.error(),
            None => Error::unavailable("the agent session ended"),
        }
    }

    /// An error from the agent, replaced by the cut's reason when the session was cut.
    fn map_err(&self, e: Error) -> Error {
        if self.is_cut() {
            self.cut_error().with_source(e)
        } else {
            e
        }
    }

    /// Runs a unary call with the call deadline; ends at once when the session is cut.
    pub(crate) async fn call<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.call_within(what, Some(self.call_timeout), fut).await
    }

    /// Like [`call`](Self::call) with an explicit deadline (`None`: only the cut ends it early).
    pub(crate) async fn call_within<T, F>(&self, what: &str, deadline: Option<Duration>, fut: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = fut => r.map_err(|e| self.map_err(e)),
            _ = self.cut.cancelled() => Err(self.cut_error()),
            _ = deadline => Err(Error::unavailable(format!(
                "the guest agent did not answer {what} in time; the guest may be overloaded, retry"
            ))),
        }
    }

    /// Guards a stream: it ends with the cut's error as soon as the session is cut.
    pub(crate) fn guard<T: Send + 'static>(
        self: &Arc<Self>,
        inner: BoxStream<'static, Result<T>>,
    ) -> BoxStream<'static, Result<T>> {
        let sess = self.clone();
        Box::pin(futures::stream::unfold(Some((inner, sess)), |state| async move {
            let (mut inner, sess) = state?;
            let cut = sess.cut.clone();
            tokio::select! {
                biased;
                item = inner.next() => match item {
                    Some(Ok(v)) => Some((Ok(v), Some((inner, sess)))),
                    Some(Err(e)) => {
                        let e = sess.map_err(e);
                        Some((Err(e), None))
                    }
                    None => None,
                },
                _ = cut.cancelled() => Some((Err(sess.cut_error()), None)),
            }
        }))
    }

    pub(crate) fn guard_exec(self: &Arc<Self>, s: ExecStream) -> ExecStream {
        ExecStream {
            events: self.guard(s.events),
        }
    }

    pub(crate) fn guard_pty(self: &Arc<Self>, s: PtySession) -> PtySession {
        PtySession {
            input: s.input,
            output: self.guard(s.output),
        }
    }

    pub(crate) fn guard_conn(self: &Arc<Self>, inner: Box<dyn Connection>) -> Box<dyn Connection> {
        Box::new(GuardedConn {
            inner,
            cut: Box::pin(self.cut.clone().cancelled_owned()),
            sess: self.clone(),
        })
    }
}

/// A port stream that fails (instead of hanging) once its session is cut.
struct GuardedConn {
    inner: Box<dyn Connection>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    sess: Arc<LiveSession>,
}

impl GuardedConn {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::other(self.sess.cut_error()));
        }
        Ok(())
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}
