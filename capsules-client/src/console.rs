//! The console over the server's WebSocket: a sender (terminal input, resize) and a receiver
//! (terminal output, then the exit code or the error that ended it), like core's `PtySession`.

use bytes::Bytes;
use capsules_core::{Error, ErrorKind, Result};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::wire::{ConsoleControl, ConsoleNotice, ErrorBody};

/// Largest terminal side (columns or rows) the server accepts.
pub const MAX_CONSOLE_SIDE: u16 = 1000;

/// What the terminal sends back, in order. `Exit` is last (or an `Err` that ended the session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Bytes the terminal wrote.
    Output(Bytes),
    /// The server refused a control message (e.g. a bad resize); the session goes on.
    Refused(String),
    /// The program ended: its exit code, or 128 + signal.
    Exit(i32),
}

/// An open console: split it into its two halves, or use both through this value.
#[derive(Debug)]
pub struct ConsoleSession {
    pub sender: ConsoleSender,
    pub receiver: ConsoleReceiver,
}

impl ConsoleSession {
    pub fn split(self) -> (ConsoleSender, ConsoleReceiver) {
        (self.sender, self.receiver)
    }
}

/// Input to the terminal. Cheap to clone; dropping every sender only stops input (the session
/// goes on until the program exits); [`close`](Self::close) detaches.
#[derive(Debug, Clone)]
pub struct ConsoleSender {
    tx: mpsc::Sender<Message>,
}

fn gone() -> Error {
    Error::unavailable("the console session has ended")
}

fn check_side(what: &str, n: u16) -> Result<()> {
    if (1..=MAX_CONSOLE_SIDE).contains(&n) {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "{what} must be from 1 to {MAX_CONSOLE_SIDE}, not {n}"
        )))
    }
}

impl ConsoleSender {
    /// Bytes for the terminal (keystrokes; Ctrl-C is `0x03`).
    pub async fn write(&self, bytes: impl Into<Bytes>) -> Result<()> {
        let b = bytes.into();
        if b.is_empty() {
            return Ok(());
        }
        self.tx.send(Message::Binary(b)).await.map_err(|_| gone())
    }

    /// Changes the terminal's size (1-1000 each way).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        check_side("cols", cols)?;
        check_side("rows", rows)?;
        self.control(&ConsoleControl::Resize { cols, rows }).await
    }

    /// Sends a control message as it is (no client-side checks).
    pub async fn control(&self, c: &ConsoleControl) -> Result<()> {
        let text = serde_json::to_string(c)
            .map_err(|e| Error::internal("could not encode the control message").with_source(e))?;
        self.send_text(text).await
    }

    /// Sends a raw text frame (what a control message travels in).
    pub async fn send_text(&self, text: impl Into<String>) -> Result<()> {
        self.tx
            .send(Message::Text(text.into().into()))
            .await
            .map_err(|_| gone())
    }

    /// Detaches: closes the WebSocket (the program in the capsule gets a hangup).
    pub async fn close(&self) -> Result<()> {
        self.tx.send(Message::Close(None)).await.map_err(|_| gone())
    }
}

/// Output of the terminal. Ends after [`ConsoleEvent::Exit`] or an error.
#[derive(Debug)]
pub struct ConsoleReceiver {
    rx: mpsc::Receiver<Result<ConsoleEvent>>,
}

impl ConsoleReceiver {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<ConsoleEvent>> {
        self.rx.recv().await
    }
}

impl futures::Stream for ConsoleReceiver {
    type Item = Result<ConsoleEvent>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The `ws://` address of an `http://` base.
pub(crate) fn ws_base(base: &str) -> Result<String> {
    base.strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
        .ok_or_else(|| Error::invalid_input(format!("the Capsules API address {base:?} must start with http://")))
}

/// Connects to `url` (a `ws://` URL) with `secret` as the bearer token and runs the session.
pub(crate) async fn open(url: &str, secret: &str, cols: u16, rows: u16) -> Result<ConsoleSession> {
    check_side("cols", cols)?;
    check_side("rows", rows)?;
    let mut req = url
        .into_client_request()
        .map_err(|e| Error::invalid_input("the console address is not a valid WebSocket URL").with_source(e))?;
    let auth = format!("Bearer {secret}")
        .parse()
        .map_err(|_| Error::invalid_input("the token cannot be sent in a header"))?;
    req.headers_mut().insert("authorization", auth);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(handshake_error)?;
    let (mut sink, mut stream) = ws.split();
    let (in_tx, mut in_rx) = mpsc::channel::<Message>(64);
    let (out_tx, out_rx) = mpsc::channel::<Result<ConsoleEvent>>(64);
    tokio::spawn(async move {
        let mut input_open = true;
        loop {
            tokio::select! {
                m = in_rx.recv(), if input_open => match m {
                    Some(m) => {
                        let last = matches!(m, Message::Close(_));
                        if sink.send(m).await.is_err() {
                            let _ = out_tx.send(Err(Error::unavailable("the console connection broke off"))).await;
                            return;
                        }
                        if last {
                            return;
                        }
                    }
                    None => input_open = false,
                },
                m = stream.next() => {
                    let ev = match m {
                        Some(Ok(Message::Binary(b))) => Ok(ConsoleEvent::Output(b)),
                        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ConsoleNotice>(t.as_str()) {
                            Ok(ConsoleNotice::Exit { code }) => Ok(ConsoleEvent::Exit(code)),
                            Ok(ConsoleNotice::Error { kind: None, message }) => Ok(ConsoleEvent::Refused(message)),
                            Ok(ConsoleNotice::Error { kind: Some(k), message }) => {
                                Err(Error::new(crate::wire::kind_from_str(&k), message))
                            }
                            Err(e) => Err(Error::internal("the server sent a console message this client does not understand").with_source(e)),
                        },
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => {
                            Err(Error::unavailable("the console closed without an exit status"))
                        }
                        Some(Err(e)) => Err(Error::unavailable("the console connection broke off").with_source(e)),
                    };
                    let last = matches!(ev, Ok(ConsoleEvent::Exit(_)) | Err(_));
                    if out_tx.send(ev).await.is_err() {
                        // Nobody reads any more: detach.
                        let _ = sink.send(Message::Close(None)).await;
                        return;
                    }
                    if last {
                        let _ = sink.close().await;
                        return;
                    }
                }
            }
        }
    });
    Ok(ConsoleSession {
        sender: ConsoleSender { tx: in_tx },
        receiver: ConsoleReceiver { rx: out_rx },
    })
}

/// A refused upgrade carries the API's JSON error body.
fn handshake_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            match resp.body().as_deref().map(serde_json::from_slice::<ErrorBody>) {
                Some(Ok(b)) => b.into_error(),
                _ => Error::new(
                    if status.is_server_error() {
                        ErrorKind::Unavailable
                    } else {
                        ErrorKind::Internal
                    },
                    format!("the Capsules API answered {status} to the console upgrade without an error body"),
                ),
            }
        }
        tungstenite::Error::Io(io) => Error::unavailable("the Capsules API is unreachable").with_source(io),
        other => Error::unavailable("the console WebSocket handshake failed").with_source(other),
    }
}
