//! A small QMP client: greeting, `qmp_capabilities`, commands with ids, asynchronous events, and
//! file descriptor passing (`getfd` with `SCM_RIGHTS`).

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::error::QmpError;

/// The longest line we accept from QEMU (QMP answers here are small; this bounds memory).
const MAX_LINE: usize = 1 << 20;

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// An asynchronous QMP event (`{"event": ..., "data": ...}`).
#[derive(Debug, Clone)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Event {
    pub name: String,
    pub data: Value,
}

/// One QMP connection in command mode.
#[derive(Debug)]
pub(crate) struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    reader: JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `path`, reads the greeting and enters command mode, all within `deadline`.
    pub(crate) async fn connect(path: &Path, deadline: Duration, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await.map_err(QmpError::Io)?;
        Self::handshake(stream, deadline, timeout).await
    }

    async fn handshake(stream: UnixStream, deadline: Duration, timeout: Duration) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        let greeting = tokio::time::timeout(deadline, read_line(&mut read))
            .await
            .map_err(|_| QmpError::Timeout(deadline))??
            .ok_or(QmpError::Closed)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(read, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            reader,
            timeout,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to the events that arrive from now on.
    #[allow(dead_code)]
    pub(crate) fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `cmd` with optional `arguments` and returns its `return` value.
    pub(crate) async fn execute(&self, cmd: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.send(cmd, arguments, None).await
    }

    /// `getfd`: passes `fd` to QEMU under `name` (SCM_RIGHTS on the QMP socket).
    pub(crate) async fn getfd(&self, name: &str, fd: RawFd) -> Result<(), QmpError> {
        self.send("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(drop)
    }

    async fn send(&self, cmd: &str, arguments: Option<Value>, fd: Option<RawFd>) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(QmpError::Closed),
        };
        let result = async {
            {
                let mut w = self.writer.lock().await;
                let mut written = 0;
                if let Some(fd) = fd {
                    written = send_with_fd(&w, &line, fd).await?;
                }
                w.write_all(&line[written..]).await.map_err(QmpError::Io)?;
                w.flush().await.map_err(QmpError::Io)?;
            }
            rx.await.map_err(|_| QmpError::Closed)?
        };
        let out = tokio::time::timeout(self.timeout, result)
            .await
            .unwrap_or(Err(QmpError::Timeout(self.timeout)));
        if out.is_err()
            && let Some(map) = self.pending.lock().expect("pending lock").as_mut()
        {
            map.remove(&id);
        }
        out
    }
}

/// Writes (a prefix of) `line` with `fd` attached; returns how many bytes went out.
async fn send_with_fd(w: &OwnedWriteHalf, line: &[u8], fd: RawFd) -> Result<usize, QmpError> {
    let stream: &UnixStream = w.as_ref();
    loop {
        stream.writable().await.map_err(QmpError::Io)?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(line)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(QmpError::Io(e)),
        }
    }
}

async fn read_line(read: &mut BufReader<OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *read)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') && n >= MAX_LINE {
            return Err(QmpError::Protocol(format!("a QMP line longer than {MAX_LINE} bytes")));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&buf)
            .map(Some)
            .map_err(|e| QmpError::Protocol(format!("invalid JSON ({e}): {}", String::from_utf8_lossy(&buf))));
    }
}

async fn read_loop(mut read: BufReader<OwnedReadHalf>, pending: Pending, events: broadcast::Sender<Event>) {
    loop {
        match read_line(&mut read).await {
            Ok(Some(msg)) => dispatch(msg, &pending, &events),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP read failed");
                break;
            }
        }
    }
    // Fail every waiting command, and refuse new ones.
    if let Some(map) = pending.lock().expect("pending lock").take() {
        for (_, tx) in map {
            let _ = tx.send(Err(QmpError::Closed));
        }
    }
}

fn dispatch(msg: Value, pending: &Pending, events: &broadcast::Sender<Event>) {
    if let Some(name) = msg.get("event").and_then(Value::as_str) {
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        tracing::debug!(event = name, %data, "QMP event");
        let _ = events.send(Event {
            name: name.to_owned(),
            data,
        });
        return;
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        tracing::warn!(%msg, "QMP message without id");
        return;
    };
    let result = if let Some(ret) = msg.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = msg.get("error") {
        let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(QmpError::Qemu {
            class: s("class"),
            desc: s("desc"),
        })
    } else {
        Err(QmpError::Protocol(format!(
            "an answer with neither return nor error: {msg}"
        )))
    };
    let tx = pending
        .lock()
        .expect("pending lock")
        .as_mut()
        .and_then(|m| m.remove(&id));
    if let Some(tx) = tx {
        let _ = tx.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QMP server on a socketpair: checks the handshake, ids, errors, events and fd passing.
    #[tokio::test]
    async fn handshake_commands_errors_events() {
        let (client, server) = UnixStream::pair().unwrap();
        let srv = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]).as_bytes())
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "stop");
            // An event first, then the error answer.
            w.write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {}}\n")
                .await
                .unwrap();
            w.write_all(
                format!(
                    "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"nope\"}}, \"id\": {}}}\n",
                    v["id"]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
        });
        let qmp = Qmp::handshake(client, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap();
        let mut ev = qmp.events();
        let err = qmp.execute("stop", None).await.unwrap_err();
        match err {
            QmpError::Qemu { class, desc } => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "nope");
            }
            other => panic!("unexpected {other:?}"),
        }
        let event = ev.recv().await.unwrap();
        assert_eq!(event.name, "STOP");
        assert!(event.data.is_object());
        drop(qmp);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn closed_connection_fails_pending_commands() {
        let (client, server) = UnixStream::pair().unwrap();
        let srv = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]).as_bytes())
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            // Hang up without answering.
        });
        let qmp = Qmp::handshake(client, Duration::from_secs(5), Duration::from_secs(30))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let err = qmp.execute("query-migrate", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        srv.await.unwrap();
        // New commands are refused at once.
        assert!(matches!(qmp.execute("stop", None).await, Err(QmpError::Closed)));
    }
}
