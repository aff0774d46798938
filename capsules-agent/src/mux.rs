//! Channel multiplexer shared by the agent and the client.
//!
//! One reader task decodes frames and routes them to channels; one writer task encodes queued
//! frames. Every frame on a channel (control, data, EOF) costs `len + 16` bytes of the
//! receiver's window ([`WINDOW`] per direction per channel, granted back with `Credit` frames
//! as the receiver consumes), so a peer can never make the other side buffer more than one
//! window per channel, and a slow consumer never blocks other channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::frame::{self, Frame, FrameKind, FrameReader, MAX_PAYLOAD};

/// Receive window per channel and direction, in cost units (bytes + 16 per frame).
pub const WINDOW: u32 = 2 * 1024 * 1024;
/// Largest data chunk a sender puts in one frame.
pub const CHUNK: usize = 64 * 1024;
const OVERHEAD: u32 = 16;
/// A receiver grants credit back once it has consumed this much.
const GRANT_AT: u32 = WINDOW / 4;

fn cost(len: usize) -> u32 {
    len as u32 + OVERHEAD
}

/// The session has ended (stream closed, superseded, sealed or cancelled channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended;

/// What arrives on a channel.
#[derive(Debug)]
pub enum Incoming {
    /// JSON control message.
    Control(Bytes),
    /// Main data stream bytes.
    Data(Bytes),
    /// Stderr bytes.
    Stderr(Bytes),
    /// End of the peer's data stream.
    Eof,
}

impl Incoming {
    fn cost(&self) -> u32 {
        match self {
            Incoming::Control(b) | Incoming::Data(b) | Incoming::Stderr(b) => cost(b.len()),
            Incoming::Eof => OVERHEAD,
        }
    }
}

struct Entry {
    tx: mpsc::UnboundedSender<Incoming>,
    /// How many more cost units the peer may send before it must wait for credit.
    budget: u64,
    credit: Arc<Semaphore>,
    closed: CancellationToken,
}

impl Entry {
    fn close(&self) {
        self.credit.close();
        self.closed.cancel();
    }
}

struct Shared {
    out: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    chans: Mutex<HashMap<u32, Entry>>,
    ended: CancellationToken,
    reason: Mutex<Option<String>>,
    /// A control frame on channel 0 that ended the session (a new hello on the same stream).
    rehello: Mutex<Option<Frame>>,
}

impl Shared {
    /// Queue a frame; `false` if the stream is sealed or ended.
    fn push(&self, frame: Frame) -> bool {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        match out.as_ref() {
            Some(tx) => tx.send(frame).is_ok(),
            None => false,
        }
    }

    fn end(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason.into());
        }
        drop(r);
        self.ended.cancel();
    }

    fn new_entry(&self, id: u32) -> (Channel, Entry) {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(WINDOW as usize));
        let closed = CancellationToken::new();
        let entry = Entry {
            tx,
            budget: WINDOW as u64,
            credit: credit.clone(),
            closed: closed.clone(),
        };
        (
            Channel {
                id,
                rx,
                consumed: 0,
                sender: ChannelSender {
                    id,
                    shared: None,
                    credit,
                    closed,
                },
            },
            entry,
        )
    }
}

/// Handle on a running multiplexer.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("ended", &self.shared.ended.is_cancelled())
            .finish()
    }
}

impl Mux {
    /// Start reader and writer tasks. If `accept` is given, a control frame on an unknown
    /// channel opens it (agent side); otherwise such frames are ignored (client side).
    /// Cancelling `ended` (or the stream ending) stops both tasks and ends every channel.
    pub fn start<R, W>(
        reader: FrameReader<R>,
        writer: W,
        accept: Option<mpsc::UnboundedSender<Channel>>,
        ended: CancellationToken,
    ) -> Mux
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            out: Mutex::new(Some(tx)),
            chans: Mutex::new(HashMap::new()),
            ended,
            reason: Mutex::new(None),
            rehello: Mutex::new(None),
        });
        tokio::spawn(write_loop(shared.clone(), rx, writer));
        tokio::spawn(read_loop(shared.clone(), reader, accept));
        let s = shared.clone();
        tokio::spawn(async move {
            s.ended.cancelled().await;
            *s.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let chans = std::mem::take(&mut *s.chans.lock().unwrap_or_else(|e| e.into_inner()));
            for (_, e) in chans {
                e.close();
            }
        });
        Mux { shared }
    }

    /// Open a channel with a locally chosen id (client side).
    pub fn open(&self, id: u32) -> Result<Channel, Ended> {
        if self.shared.ended.is_cancelled() {
            return Err(Ended);
        }
        let (mut ch, entry) = self.shared.new_entry(id);
        ch.sender.shared = Some(self.shared.clone());
        self.shared
            .chans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, entry);
        if self.shared.ended.is_cancelled() {
            return Err(Ended);
        }
        Ok(ch)
    }

    /// Token cancelled when the session ends.
    pub fn ended(&self) -> &CancellationToken {
        &self.shared.ended
    }

    /// Why the session ended, if it has and a reason is known.
    pub fn end_reason(&self) -> Option<String> {
        self.shared.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The channel-0 control frame that ended this session, if one did (agent side).
    pub fn take_rehello(&self) -> Option<Frame> {
        self.shared.rehello.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// End the session.
    pub fn close(&self, reason: &str) {
        self.shared.end(reason);
    }

    /// Queue `last` as the final frame written on this stream; afterwards every send waits
    /// until the session ends (output stays buffered in the processes' pipes).
    pub fn seal(&self, last: Frame) {
        let mut out = self.shared.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = out.take() {
            let _ = tx.send(last);
        }
    }

    /// Send a session-level frame (channel 0) without flow control.
    pub fn send_raw(&self, frame: Frame) -> bool {
        self.shared.push(frame)
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Frame>, mut writer: W) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        let first = tokio::select! {
            _ = shared.ended.cancelled() => break,
            f = rx.recv() => f,
        };
        let Some(first) = first else {
            // Sealed: everything queued has been written; write nothing more, but keep the
            // stream open until the session ends.
            let _ = writer.flush().await;
            shared.ended.cancelled().await;
            break;
        };
        let mut next = Some(first);
        while let Some(f) = next {
            if frame::encode(&f, &mut buf).is_err() {
                shared.end("internal: oversized frame queued");
                return;
            }
            next = if buf.len() < 256 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let res = tokio::select! {
            _ = shared.ended.cancelled() => break,
            r = writer.write_all(&buf) => r,
        };
        buf.clear();
        if let Err(e) = res {
            shared.end(format!("stream write failed: {e}"));
            break;
        }
        if rx.is_empty()
            && let Err(e) = writer.flush().await
        {
            shared.end(format!("stream flush failed: {e}"));
            break;
        }
    }
    let _ = writer.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: FrameReader<R>,
    accept: Option<mpsc::UnboundedSender<Channel>>,
) {
    loop {
        let r = tokio::select! {
            _ = shared.ended.cancelled() => return,
            r = reader.read() => r,
        };
        match r {
            Ok(Some(f)) => {
                if let Err(msg) = dispatch(&shared, f, accept.as_ref()) {
                    shared.end(msg);
                    return;
                }
            }
            Ok(None) => {
                shared.end("stream closed by peer");
                return;
            }
            Err(e) => {
                let mut msg = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    msg = format!("{msg}: {src}");
                }
                shared.end(msg);
                return;
            }
        }
    }
}

fn dispatch(shared: &Arc<Shared>, f: Frame, accept: Option<&mpsc::UnboundedSender<Channel>>) -> Result<(), String> {
    if accept.is_some() && f.kind == FrameKind::Control && f.channel == crate::proto::SESSION_CHANNEL {
        // The host opened a new session on the same stream (virtio-serial after a restore when
        // the disconnect went unnoticed): end this one and hand the frame to the next.
        *shared.rehello.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        return Err("new session frame on channel 0".into());
    }
    let item = match f.kind {
        FrameKind::Control => Incoming::Control(f.payload),
        FrameKind::Data => Incoming::Data(f.payload),
        FrameKind::Stderr => Incoming::Stderr(f.payload),
        FrameKind::Eof => Incoming::Eof,
        FrameKind::Credit => {
            let n = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
            let chans = shared.chans.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = chans.get(&f.channel) {
                if e.credit.available_permits() as u64 + n as u64 > 4 * WINDOW as u64 {
                    return Err(format!("channel {}: credit beyond the window", f.channel));
                }
                e.credit.add_permits(n as usize);
            }
            return Ok(());
        }
        FrameKind::Cancel => {
            let removed = shared
                .chans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&f.channel);
            if let Some(e) = removed {
                e.close();
            }
            return Ok(());
        }
    };
    let c = item.cost() as u64;
    let mut chans = shared.chans.lock().unwrap_or_else(|e| e.into_inner());
    match chans.get_mut(&f.channel) {
        Some(e) => {
            if e.budget < c {
                return Err(format!(
                    "channel {}: peer sent beyond its flow-control window",
                    f.channel
                ));
            }
            e.budget -= c;
            let _ = e.tx.send(item);
        }
        None => {
            if let (Some(acc), Incoming::Control(_)) = (accept, &item) {
                let (mut ch, mut entry) = shared.new_entry(f.channel);
                ch.sender.shared = Some(shared.clone());
                entry.budget -= c;
                let _ = entry.tx.send(item);
                chans.insert(f.channel, entry);
                drop(chans);
                let _ = acc.send(ch);
            }
            // Otherwise: late frames for a finished channel; ignore.
        }
    }
    Ok(())
}

/// The sending half of a channel (cloneable, for output pumps).
#[derive(Clone)]
pub struct ChannelSender {
    id: u32,
    shared: Option<Arc<Shared>>,
    credit: Arc<Semaphore>,
    closed: CancellationToken,
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender").field("id", &self.id).finish()
    }
}

impl ChannelSender {
    fn shared(&self) -> &Arc<Shared> {
        self.shared.as_ref().expect("channel sender is always attached")
    }

    async fn send_frame(&self, kind: FrameKind, payload: Bytes) -> Result<(), Ended> {
        let shared = self.shared();
        let c = cost(payload.len());
        let permit = tokio::select! {
            p = self.credit.acquire_many(c) => p.map_err(|_| Ended)?,
            _ = shared.ended.cancelled() => return Err(Ended),
        };
        permit.forget();
        if shared.push(Frame::new(kind, self.id, payload)) {
            Ok(())
        } else {
            // Sealed (quiesced) or ended: hold the caller until the session is gone.
            shared.ended.cancelled().await;
            Err(Ended)
        }
    }

    /// Send a JSON control message.
    pub async fn control<T: serde::Serialize>(&self, msg: &T) -> Result<(), Ended> {
        let json = match serde_json::to_vec(msg) {
            Ok(j) if j.len() <= MAX_PAYLOAD => j,
            _ => return Err(Ended),
        };
        self.send_frame(FrameKind::Control, json.into()).await
    }

    /// Send main-stream bytes (split into chunks).
    pub async fn data(&self, mut bytes: Bytes) -> Result<(), Ended> {
        while !bytes.is_empty() {
            let chunk = bytes.split_to(bytes.len().min(CHUNK));
            self.send_frame(FrameKind::Data, chunk).await?;
        }
        Ok(())
    }

    /// Send stderr bytes (split into chunks).
    pub async fn stderr(&self, mut bytes: Bytes) -> Result<(), Ended> {
        while !bytes.is_empty() {
            let chunk = bytes.split_to(bytes.len().min(CHUNK));
            self.send_frame(FrameKind::Stderr, chunk).await?;
        }
        Ok(())
    }

    /// Send end-of-stream.
    pub async fn eof(&self) -> Result<(), Ended> {
        self.send_frame(FrameKind::Eof, Bytes::new()).await
    }

    /// Resolves when the session ends.
    pub async fn ended(&self) {
        self.shared().ended.cancelled().await
    }

    /// Resolves when the peer cancelled the channel or the session ended (items already
    /// received may still be waiting in the channel).
    pub async fn closed(&self) {
        tokio::select! {
            _ = self.closed.cancelled() => {}
            _ = self.shared().ended.cancelled() => {}
        }
    }
}

/// One channel: receive side plus a sender. Dropping it abandons the channel (a `Cancel` frame
/// tells the peer).
pub struct Channel {
    /// Channel id.
    pub id: u32,
    rx: mpsc::UnboundedReceiver<Incoming>,
    consumed: u32,
    sender: ChannelSender,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("id", &self.id).finish()
    }
}

impl Channel {
    /// Next item; `None` once the peer cancelled the channel or the session ended.
    pub async fn recv(&mut self) -> Option<Incoming> {
        let item = self.rx.recv().await?;
        self.consumed += item.cost();
        if self.consumed >= GRANT_AT {
            let shared = self.sender.shared();
            let n = std::mem::take(&mut self.consumed);
            if let Some(e) = shared.chans.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.id) {
                e.budget += n as u64;
            }
            shared.push(Frame::new(FrameKind::Credit, self.id, n.to_be_bytes().to_vec()));
        }
        Some(item)
    }

    /// The sending half.
    pub fn sender(&self) -> &ChannelSender {
        &self.sender
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let shared = self.sender.shared();
        let removed = shared.chans.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        if let Some(e) = removed {
            e.close();
            shared.push(Frame::new(FrameKind::Cancel, self.id, Bytes::new()));
        }
    }
}
