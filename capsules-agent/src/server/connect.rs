//! Port streams: a TCP byte stream to 127.0.0.1:port inside the guest, with half-close.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::reply;
use crate::mux::{Channel, Incoming};
use crate::proto::{ErrorKind, Reply};

/// Relay between `ch` and a new TCP connection until both directions are closed.
pub async fn run(mut ch: Channel, port: u16) {
    let conn = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(("127.0.0.1", port))).await;
    let stream = match conn {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let _ = reply(
                &ch,
                Reply::error(ErrorKind::NotFound, format!("connect to 127.0.0.1:{port} failed: {e}")),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = reply(
                &ch,
                Reply::error(ErrorKind::Internal, format!("connect to 127.0.0.1:{port} timed out")),
            )
            .await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if reply(&ch, Reply::Connected).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.into_split();
    let tx = ch.sender().clone();
    let mut up = tokio::spawn(async move {
        let mut total = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    if tx.data(buf.freeze()).await.is_err() {
                        return None;
                    }
                }
            }
        }
        tx.eof().await.ok().map(|_| total)
    });
    let (mut up_done, mut down_done) = (false, false);
    let mut total = 0u64;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r { Ok(Some(n)) => total += n, _ => return }
            }
            m = ch.recv(), if !down_done => match m {
                None => { up.abort(); return }
                Some(Incoming::Data(b)) => {
                    total += b.len() as u64;
                    if wr.write_all(&b).await.is_err() { down_done = true; }
                }
                Some(Incoming::Eof) => { let _ = wr.shutdown().await; down_done = true; }
                Some(_) => {}
            },
        }
    }
    let _ = reply(&ch, Reply::Done { bytes: total }).await;
}
