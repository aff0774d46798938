//! Background processes, the session rule, and hostile input, over the real binary.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use capsules_agent::AgentError;
use capsules_agent::client::{AgentClient, ClientOptions, ExecEvent};
use capsules_agent::frame::{self, Frame, FrameKind, FrameReader, MAX_FRAME};
use capsules_agent::proto::{ErrorKind, ExecRequest, Reply, Request};
use common::{TestAgent, cmd, sh};
use tokio::io::AsyncWriteExt;

async fn collect_attach(c: &AgentClient, handle: &str, from: u64) -> (Vec<u8>, capsules_agent::proto::ExitInfo) {
    let mut call = c.attach(handle, from).await.unwrap();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), call.next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => out.extend_from_slice(&b),
            Some(ExecEvent::Exit(e)) => return (out, e),
            None => panic!("attach ended without exit"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn background_handle_list_attach_signal_wait() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let h = c
        .spawn_background(sh("echo one; sleep 0.1; echo two >&2; exec sleep 30"))
        .await
        .unwrap();
    assert!(h.pid > 0);
    let list = c.list_background().await.unwrap();
    let me = list.iter().find(|b| b.handle == h.handle).expect("listed");
    assert_eq!(me.pid, h.pid);
    assert!(me.exit.is_none());
    let info = c.info().await.unwrap();
    assert!(
        info.processes
            .iter()
            .any(|p| p.pid == h.pid && p.background.as_deref() == Some(&h.handle)),
        "{info:?}"
    );
    // Wait until it produced its output, then attach from 0 and from an offset.
    let t = Instant::now();
    while c
        .list_background()
        .await
        .unwrap()
        .iter()
        .find(|b| b.handle == h.handle)
        .unwrap()
        .output_bytes
        < 8
    {
        assert!(t.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiter = {
        let c = c.clone();
        let h = h.handle.clone();
        tokio::spawn(async move { c.wait(&h).await })
    };
    let attached = {
        let c = c.clone();
        let h = h.handle.clone();
        tokio::spawn(async move { collect_attach(&c, &h, 0).await })
    };
    let late = {
        let c = c.clone();
        let h = h.handle.clone();
        tokio::spawn(async move { collect_attach(&c, &h, 4).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.signal(&h.handle, libc::SIGTERM).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit.signal, Some(libc::SIGTERM));
    let (out, e) = attached.await.unwrap();
    assert_eq!(out, b"one\ntwo\n");
    assert_eq!(e.signal, Some(libc::SIGTERM));
    assert_eq!(late.await.unwrap().0, b"two\n");
    let e = c.attach("bg-999", 0).await.unwrap().next().await.unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound));
    assert!(c.signal("bg-999", 9).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn session_rule_quiesce_reconnect() {
    let a = TestAgent::start();
    let opts = ClientOptions {
        call_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let c1 = a.client_with(1, opts.clone()).await;
    let bg = c1.spawn_background(sh("echo bg-started; exec sleep 32")).await.unwrap();
    let mut fg = c1.exec(sh("echo fg; exec sleep 31")).await.unwrap();
    assert!(matches!(fg.next().await.unwrap(), Some(ExecEvent::Stdout(_))));
    let pending_fg = tokio::spawn(async move {
        loop {
            match fg.next().await {
                Ok(Some(ExecEvent::Exit(e))) => return Ok(e),
                Ok(Some(_)) => {}
                Ok(None) => unreachable!(),
                Err(e) => return Err(e),
            }
        }
    });
    let pending_wait = {
        let c = c1.clone();
        let h = bg.handle.clone();
        tokio::spawn(async move { c.wait(&h).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    c1.quiesce().await.unwrap();
    // After Quiesced the agent writes nothing more on that stream.
    assert!(matches!(c1.ping().await, Err(AgentError::Timeout(_))));
    let t = Instant::now();
    c1.close(); // the stream is cut (snapshot)
    let e = tokio::time::timeout(Duration::from_secs(2), pending_fg)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, AgentError::SessionEnded), "{e}");
    assert!(e.is_retryable());
    let e = tokio::time::timeout(Duration::from_secs(2), pending_wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, AgentError::SessionEnded), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(c1.ping().await, Err(AgentError::SessionEnded)));

    let c2 = a.client(2).await;
    c2.set_clock(1_800_000_000_000_000_000).await.unwrap();
    let list = c2.list_background().await.unwrap();
    assert!(
        list.iter().any(|b| b.handle == bg.handle && b.exit.is_none()),
        "{list:?}"
    );
    assert!(
        a.eventually(Duration::from_secs(2), |a| !a
            .descendants()
            .iter()
            .any(|d| d.2.contains("sleep 31"))),
        "foreground exec of the old session survived"
    );
    assert!(
        a.descendants().iter().any(|d| d.2.contains("sleep 32")),
        "background process was killed"
    );
    let mut call = c2.attach(&bg.handle, 0).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), call.next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(ExecEvent::Stdout(b)) => assert_eq!(&b[..], b"bg-started\n"),
        other => panic!("{other:?}"),
    }
    // A stale epoch is refused; a newer one supersedes c2 without c2 closing its stream.
    let s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let e = AgentClient::handshake(s, 1, ClientOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::StaleEpoch), "{e}");
    let pending = tokio::spawn(async move { call.next().await });
    let c3 = a.client(3).await;
    let r = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(AgentError::SessionEnded)), "{r:?}");
    c3.signal(&bg.handle, libc::SIGKILL).await.unwrap();
    assert_eq!(c3.wait(&bg.handle).await.unwrap().signal, Some(libc::SIGKILL));
}

async fn raw_hello(
    a: &TestAgent,
    epoch: u64,
) -> (
    FrameReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut buf = BytesMut::new();
    let hello = serde_json::to_vec(&Request::Hello {
        version: capsules_agent::PROTOCOL_VERSION,
        epoch,
    })
    .unwrap();
    frame::encode(&Frame::new(FrameKind::Control, 0, hello), &mut buf).unwrap();
    w.write_all(&buf).await.unwrap();
    let mut r = FrameReader::new(r);
    let f = r.read().await.unwrap().unwrap();
    assert!(matches!(
        serde_json::from_slice::<Reply>(&f.payload).unwrap(),
        Reply::HelloOk { .. }
    ));
    (r, w)
}

/// Read until the stream closes or an error reply arrives; either is fine, a hang is not.
async fn expect_error_or_close(r: &mut FrameReader<tokio::net::unix::OwnedReadHalf>) {
    let res = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match r.read().await {
                Ok(Some(f)) if f.kind == FrameKind::Control => {
                    if let Ok(Reply::Error { .. }) = serde_json::from_slice(&f.payload) {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(res.is_ok(), "agent neither answered nor closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_frames_never_kill_the_agent() {
    let a = TestAgent::start();
    // Oversized length before hello.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    s.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).await.unwrap();
    let (r, _w) = s.into_split();
    expect_error_or_close(&mut FrameReader::new(r)).await;

    // Oversized, unknown kind, bad credit, truncated after hello.
    let garbage: Vec<Vec<u8>> = vec![
        u32::MAX.to_be_bytes().to_vec(),
        vec![0, 0, 0, 5, 77, 0, 0, 0, 9],
        vec![0, 0, 0, 6, 4, 0, 0, 0, 9, 1],
        vec![0, 0, 0, 2],
    ];
    for g in garbage {
        let (mut r, mut w) = raw_hello(&a, 1).await;
        w.write_all(&g).await.unwrap();
        expect_error_or_close(&mut r).await;
    }
    // Truncated frame then EOF.
    let (mut r, mut w) = raw_hello(&a, 1).await;
    w.write_all(&[0, 0, 1, 0, 0, 0, 0, 0, 3, b'{']).await.unwrap();
    w.shutdown().await.unwrap();
    expect_error_or_close(&mut r).await;

    // Malformed JSON and wrong requests get error replies, and the session goes on.
    let (mut r, mut w) = raw_hello(&a, 1).await;
    for (ch, payload) in [
        (5u32, &b"{not json"[..]),
        (6, br#"{"op":"resize","cols":1,"rows":1}"#),
        (7, br#"{"op":"hello","version":1,"epoch":1}"#),
    ] {
        let mut buf = BytesMut::new();
        frame::encode(&Frame::new(FrameKind::Control, ch, payload.to_vec()), &mut buf).unwrap();
        w.write_all(&buf).await.unwrap();
        let f = loop {
            let f = tokio::time::timeout(Duration::from_secs(2), r.read())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if f.kind == FrameKind::Control {
                break f;
            }
        };
        assert_eq!(f.channel, ch);
        let reply: Reply = serde_json::from_slice(&f.payload).unwrap();
        assert!(
            matches!(
                reply,
                Reply::Error {
                    kind: ErrorKind::InvalidInput,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    // Flow-control violation: data beyond the window on an open channel.
    let mut buf = BytesMut::new();
    frame::encode(
        &Frame::new(
            FrameKind::Control,
            9,
            serde_json::to_vec(&Request::Exec(ExecRequest {
                stdin: true,
                ..cmd(&["sleep", "5"])
            }))
            .unwrap(),
        ),
        &mut buf,
    )
    .unwrap();
    for _ in 0..4 {
        frame::encode(&Frame::new(FrameKind::Data, 9, vec![0u8; frame::MAX_PAYLOAD]), &mut buf).unwrap();
    }
    let _ = w.write_all(&buf).await; // the agent may close mid-write
    expect_error_or_close(&mut r).await;

    // Random bytes, after hello and instead of hello.
    let mut x = 0x2545f4914f6cdd1du64;
    for round in 0..40 {
        let mut data = BytesMut::new();
        let len = 1 + (round * 997) % 5000;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.put_u8(x as u8);
        }
        let s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
        let (r, mut w) = if round % 2 == 0 {
            raw_hello(&a, 1).await
        } else {
            let (r, w) = s.into_split();
            (FrameReader::new(r), w)
        };
        let _ = w.write_all(&data).await;
        drop(w);
        drop(r);
    }
    // The agent is alive and serves new sessions.
    let c = a.client(1).await;
    c.ping().await.unwrap();
    let out = c.run(cmd(&["echo", "alive"])).await.unwrap();
    assert_eq!(&out.stdout[..], b"alive\n");
    assert!(a.eventually(Duration::from_secs(2), |a| {
        a.descendants().iter().all(|d| !d.2.contains("sleep 5"))
    }));

    // Version mismatch is refused with a named error.
    let s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut buf = BytesMut::new();
    frame::encode(
        &Frame::new(
            FrameKind::Control,
            0,
            br#"{"op":"hello","version":999,"epoch":1}"#.to_vec(),
        ),
        &mut buf,
    )
    .unwrap();
    w.write_all(&buf).await.unwrap();
    let f = FrameReader::new(r).read().await.unwrap().unwrap();
    match serde_json::from_slice::<Reply>(&f.payload).unwrap() {
        Reply::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::VersionMismatch);
            assert!(message.contains("999"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_survives_a_hostile_agent() {
    // A fake "agent" that answers hello, then floods data beyond the window on the call.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = FrameReader::new(r);
        let _hello = r.read().await.unwrap().unwrap();
        let ok = serde_json::to_vec(&Reply::HelloOk {
            version: capsules_agent::PROTOCOL_VERSION,
            boot_id: "x".into(),
            epoch: 1,
        })
        .unwrap();
        let mut buf = BytesMut::new();
        frame::encode(&Frame::new(FrameKind::Control, 0, ok), &mut buf).unwrap();
        w.write_all(&buf).await.unwrap();
        let call = r.read().await.unwrap().unwrap();
        let started = serde_json::to_vec(&Reply::Started { pid: 1 }).unwrap();
        let mut buf = BytesMut::new();
        frame::encode(&Frame::new(FrameKind::Control, call.channel, started), &mut buf).unwrap();
        w.write_all(&buf).await.unwrap();
        for _ in 0..64 {
            let mut buf = BytesMut::new();
            frame::encode(
                &Frame::new(FrameKind::Data, call.channel, vec![b'x'; frame::MAX_PAYLOAD]),
                &mut buf,
            )
            .unwrap();
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
        // Then an oversized length prefix.
        let _ = w.write_all(&u32::MAX.to_be_bytes()).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let c = AgentClient::handshake(s, 1, ClientOptions::default()).await.unwrap();
    let call = c.exec(cmd(&["anything"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // do not read: let the flood arrive
    let r = tokio::time::timeout(Duration::from_secs(3), call.collect())
        .await
        .unwrap();
    assert!(matches!(r, Err(AgentError::SessionEnded)), "{r:?}");
    assert!(c.end_reason().unwrap().contains("window"), "{:?}", c.end_reason());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_kills_processes_and_stops_the_agent() {
    let mut a = TestAgent::start();
    let c = a.client(1).await;
    let bg = c.spawn_background(cmd(&["sleep", "33"])).await.unwrap();
    let info = c.info().await.unwrap();
    assert!(info.processes.iter().any(|p| p.pid == bg.pid));
    assert!(info.uptime_secs >= 0.0 && !info.boot_id.is_empty());
    c.shutdown().await.unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "agent still running after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success());
    let gone = a.eventually(Duration::from_secs(2), |_| {
        // Gone, or a zombie waiting for whoever inherited it.
        std::fs::read_to_string(format!("/proc/{}/stat", bg.pid))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(gone, "background process survived shutdown");
    tokio::time::timeout(Duration::from_secs(2), c.closed()).await.unwrap();
    assert!(matches!(c.ping().await, Err(AgentError::SessionEnded)));
}
