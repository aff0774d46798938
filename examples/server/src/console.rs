//! The console: single-use tickets and the WebSocket that carries a capsule's terminal.
//!
//! The protocol (also in the crate docs and `openapi.json`):
//! - `POST /v1/capsules/{capsule}/console/ticket` (bearer) → 201
//!   `{"ticket":"ct_<64 hex>","expires_in_secs":30}`; the same checks as opening a console.
//! - `GET /v1/capsules/{capsule}/console?cols=N&rows=N[&ticket=ct_...]`, a WebSocket upgrade
//!   authorized by `Authorization: Bearer` or by a ticket (not both).
//! - Client → server: binary = bytes for the terminal; text = `{"type":"resize","cols":N,"rows":N}`.
//! - Server → client: binary = terminal output; text `{"type":"exit","code":N}` or
//!   `{"type":"error",["kind":...,]"message":...}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use capsules_client::wire::{ConsoleControl, ConsoleNotice, ConsoleTicket};
use capsules_core::backend::{PtyEvent, PtyInput, PtyRequest};
use capsules_core::records::CapsuleRecord;
use capsules_core::types::CapsuleId;
use capsules_core::{Console, Error};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, Bearer};

/// How long a ticket is valid.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Most tickets outstanding at once (unused and unexpired), server-wide.
pub const MAX_TICKETS: usize = 10_000;
/// Most tickets outstanding at once for one token.
pub const MAX_TICKETS_PER_TOKEN: usize = 64;
/// Largest terminal side, in columns or rows.
pub const MAX_SIDE: u16 = 1000;
/// Default terminal size.
pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;
/// Largest client message (a binary input frame).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest control (text) message.
pub const MAX_CONTROL: usize = 4096;
/// The server pings this often; a client silent for [`MAX_SILENCE`] (no pong either) is gone.
pub const PING_EVERY: Duration = Duration::from_secs(20);
pub const MAX_SILENCE: Duration = Duration::from_secs(60);

const TICKET_PREFIX: &str = "ct_";

/// A ticket's binding: the token that asked for it (kept to re-authenticate it on use; server
/// memory only, for at most the TTL) and the capsule.
struct Entry {
    secret: String,
    token_hash: [u8; 32],
    capsule: CapsuleId,
    name: String,
    expires_ms: i64,
}

/// Outstanding console tickets, keyed by the SHA-256 of the ticket (the ticket itself is not kept).
#[derive(Default)]
pub(crate) struct Tickets {
    map: Mutex<HashMap<[u8; 32], Entry>>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Tickets({n} outstanding)")
    }
}

fn hash(s: &str) -> [u8; 32] {
    capsules_core::tokens::hash_secret(s)
}

impl Tickets {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>>, Error> {
        self.map
            .lock()
            .map_err(|_| Error::internal("the console ticket table is poisoned"))
    }

    /// A new ticket for (`secret`, `rec`), valid for [`TICKET_TTL`] from `now_ms`.
    fn issue(&self, secret: &str, rec: &CapsuleRecord, now_ms: i64) -> Result<String, Error> {
        use rand::TryRngCore;
        let mut raw = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut raw)
            .map_err(|e| Error::internal("the OS random number generator failed").with_source(e))?;
        let ticket = format!("{TICKET_PREFIX}{}", hex::encode(raw));
        let token_hash = hash(secret);
        let mut m = self.lock()?;
        m.retain(|_, e| e.expires_ms > now_ms);
        if m.len() >= MAX_TICKETS {
            return Err(Error::unavailable(
                "too many console tickets are outstanding; retry in a few seconds",
            ));
        }
        if m.values().filter(|e| e.token_hash == token_hash).count() >= MAX_TICKETS_PER_TOKEN {
            return Err(Error::limit_exceeded(format!(
                "this token has {MAX_TICKETS_PER_TOKEN} unused console tickets; use them or wait {} s for them to expire",
                TICKET_TTL.as_secs()
            )));
        }
        m.insert(
            hash(&ticket),
            Entry {
                secret: secret.to_owned(),
                token_hash,
                capsule: rec.id.clone(),
                name: rec.name.as_str().to_owned(),
                expires_ms: now_ms + TICKET_TTL.as_millis() as i64,
            },
        );
        Ok(ticket)
    }

    /// Takes the ticket out (whatever happens next, it cannot be used again).
    fn redeem(&self, ticket: &str, now_ms: i64) -> Result<Entry, Error> {
        let hex_part = ticket.strip_prefix(TICKET_PREFIX).unwrap_or("");
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::unauthenticated(
                "the console ticket is malformed; tickets look like ct_<64 hex characters>",
            ));
        }
        let e = self.lock()?.remove(&hash(ticket));
        match e {
            Some(e) if e.expires_ms > now_ms => Ok(e),
            _ => Err(Error::unauthenticated(
                "the console ticket is unknown, used or expired (tickets are single-use and last 30 s); \
                 get a new one with POST /v1/capsules/{capsule}/console/ticket",
            )),
        }
    }
}

/// `POST /v1/capsules/{capsule}/console/ticket`.
pub(crate) async fn issue_ticket(
    State(st): State<AppState>,
    bearer: Bearer,
    ApiPath(c): ApiPath<String>,
) -> Result<Response, ApiError> {
    let rec = st.capsules.connect(&bearer.0)?.capsule(&c)?.authorize_console().await?;
    let ticket = st.tickets.issue(&bearer.0, &rec, st.capsules.now_ms())?;
    let body = ConsoleTicket {
        ticket,
        expires_in_secs: TICKET_TTL.as_secs(),
    };
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsoleQuery {
    cols: Option<String>,
    rows: Option<String>,
    ticket: Option<String>,
}

fn side(what: &str, v: Option<&str>, default: u16) -> Result<u16, ApiError> {
    let Some(v) = v else { return Ok(default) };
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_SIDE).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(format!(
            "{what} must be a whole number from 1 to {MAX_SIDE}, not {v:?}"
        ))),
    }
}

/// `GET /v1/capsules/{capsule}/console`: checks everything, opens the terminal, then upgrades.
pub(crate) async fn console(
    State(st): State<AppState>,
    ApiPath(c): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // What the request names comes first: a bad capsule name is a 400 naming it, WebSocket or not.
    c.parse::<capsules_core::types::CapsuleRef>()?;
    let cols = side("cols", q.cols.as_deref(), DEFAULT_COLS)?;
    let rows = side("rows", q.rows.as_deref(), DEFAULT_ROWS)?;
    let ws = ws.map_err(|r| {
        ApiError::invalid(format!(
            "this is the console WebSocket: connect with a WebSocket client ({})",
            r.body_text()
        ))
        .with_status(StatusCode::UPGRADE_REQUIRED)
    })?;
    let has_header = headers.contains_key(header::AUTHORIZATION);
    let (secret, target) = match (q.ticket, has_header) {
        (Some(_), true) => {
            return Err(ApiError::invalid(
                "send either Authorization: Bearer or ?ticket=, not both",
            ));
        }
        (Some(t), false) => {
            let e = st.tickets.redeem(&t, st.capsules.now_ms())?;
            if c != e.name && c != e.capsule.as_str() {
                return Err(Error::permission_denied(format!(
                    "this console ticket is for capsule {}, not {c}",
                    e.name
                ))
                .into());
            }
            // By id: a name reused since the ticket was issued is another capsule.
            (e.secret, e.capsule.as_str().to_owned())
        }
        (None, true) => (Bearer::from_headers(&headers)?.0, c),
        (None, false) => {
            return Err(Error::unauthenticated(
                "the console needs a token (Authorization: Bearer cap_...) or a ticket \
                 (?ticket=ct_..., from POST /v1/capsules/{capsule}/console/ticket)",
            )
            .into());
        }
    };
    // Core re-authenticates the token here (a token revoked since the ticket was issued is
    // refused) and checks policy and state, waking a sleeping capsule.
    let console = st
        .capsules
        .connect(&secret)?
        .capsule(&target)?
        .console(PtyRequest {
            argv: None,
            cols,
            rows,
            env: Default::default(),
            cwd: None,
        })
        .await?;
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, console)))
}

fn notice(n: &ConsoleNotice) -> Message {
    Message::Text(Utf8Bytes::from(serde_json::to_string(n).unwrap_or_default()))
}

fn close(reason: &str) -> Message {
    // A close reason is at most 123 bytes.
    let mut r = reason.to_owned();
    while r.len() > 123 {
        r.pop();
    }
    Message::Close(Some(CloseFrame {
        code: close_code::NORMAL,
        reason: Utf8Bytes::from(r),
    }))
}

fn control(text: &str) -> Result<PtyInput, String> {
    const SHAPE: &str = r#"{"type":"resize","cols":N,"rows":N}"#;
    if text.len() > MAX_CONTROL {
        return Err(format!("a control message is at most {MAX_CONTROL} bytes"));
    }
    let c: ConsoleControl = serde_json::from_str(text)
        .map_err(|e| format!("the control message is not valid ({e}); the one control message is {SHAPE}"))?;
    match c {
        ConsoleControl::Resize { cols, rows } => {
            for (what, n) in [("cols", cols), ("rows", rows)] {
                if !(1..=MAX_SIDE).contains(&n) {
                    return Err(format!("{what} must be from 1 to {MAX_SIDE}, not {n}"));
                }
            }
            Ok(PtyInput::Resize { cols, rows })
        }
    }
}

/// Runs one attached console until the program exits, the session breaks, or the client goes.
/// Dropping `console` at the end detaches (core records it).
async fn session(socket: WebSocket, mut console: Console) {
    let (mut sink, mut stream) = socket.split();
    let pty = console.session();
    let input = pty.input.clone();
    let mut output = std::mem::replace(&mut pty.output, Box::pin(futures::stream::empty()));
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);

    // One writer owns the socket's sending half; it ends after a Close or when every sender is gone.
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let last = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || last {
                break;
            }
        }
        let _ = sink.close().await;
    });

    // Terminal output → client; the exit or the error ends the session.
    let pump = {
        let out_tx = out_tx.clone();
        async move {
            let (last, reason) = loop {
                match output.next().await {
                    Some(Ok(PtyEvent::Output(b))) => {
                        if out_tx.send(Message::Binary(b)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(PtyEvent::Exit(st))) => {
                        break (ConsoleNotice::Exit { code: st.shell_code() }, "exited");
                    }
                    Some(Err(e)) => {
                        break (
                            ConsoleNotice::Error {
                                kind: Some(e.kind().as_str().to_owned()),
                                message: e.message().to_owned(),
                            },
                            e.kind().as_str(),
                        );
                    }
                    None => {
                        break (
                            ConsoleNotice::Error {
                                kind: Some("unavailable".into()),
                                message: "the terminal ended without an exit status".into(),
                            },
                            "unavailable",
                        );
                    }
                }
            };
            let reason = reason.to_owned();
            let _ = out_tx.send(notice(&last)).await;
            let _ = out_tx.send(close(&reason)).await;
        }
    };

    // Client → terminal, and the keepalive.
    let reader = {
        let out_tx = out_tx.clone();
        async move {
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            let mut heard = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    m = stream.next() => {
                        heard = tokio::time::Instant::now();
                        match m {
                            // Once the terminal is gone, input is read and dropped (the pump
                            // reports how it ended).
                            Some(Ok(Message::Binary(b))) => {
                                if !b.is_empty() {
                                    let _ = input.send(PtyInput::Data(b)).await;
                                }
                            }
                            Some(Ok(Message::Text(t))) => match control(t.as_str()) {
                                Ok(msg) => {
                                    let _ = input.send(msg).await;
                                }
                                Err(message) => {
                                    let n = ConsoleNotice::Error { kind: None, message };
                                    let _ = out_tx.send(notice(&n)).await;
                                }
                            },
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                            // The client closed or went away: detach.
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                        }
                    }
                    _ = ping.tick() => {
                        if heard.elapsed() > MAX_SILENCE {
                            let _ = out_tx.send(close("no answer to pings")).await;
                            return;
                        }
                        let _ = out_tx.send(Message::Ping(Bytes::from_static(b"capsules"))).await;
                    }
                }
            }
        }
    };

    tokio::pin!(pump, reader);
    let ended = tokio::select! {
        _ = &mut pump => true,
        _ = &mut reader => false,
    };
    if ended {
        // The closing handshake: read on until the client answers our close, so no unread input
        // is left in the socket (closing over unread bytes resets the connection, and the client
        // could lose the exit frame).
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut reader).await;
    }
    drop(out_tx);
    drop(console);
    // Let the last frames (exit, close) go out; a client that stopped reading does not hold us.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), writer).await.is_err() {
        abort.abort();
    }
}
