//! PTY, files, tar, port streams over the real binary.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use capsules_agent::client::{AgentClient, PtyCall, PtyEvent};
use capsules_agent::proto::{ErrorKind, FileType, PtyRequest};
use common::{TestAgent, cmd};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Transcript of a PTY and how far it has been matched.
#[derive(Default)]
struct Transcript {
    bytes: Vec<u8>,
    pos: usize,
}

/// Read PTY output until `needle` appears after the previous match.
async fn expect(p: &mut PtyCall, t: &mut Transcript, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = find(&t.bytes[t.pos..], needle.as_bytes()) {
            t.pos += i + needle.len();
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, p.next()).await {
            Ok(Ok(Some(PtyEvent::Output(b)))) => t.bytes.extend_from_slice(&b),
            other => panic!(
                "waiting for {needle:?}: {other:?}; transcript {:?}",
                String::from_utf8_lossy(&t.bytes)
            ),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_size_resize_and_ctrl_c() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let mut req = PtyRequest {
        argv: vec!["/bin/sh".into()],
        cols: 120,
        rows: 40,
        ..Default::default()
    };
    req.env.insert("PS1".into(), "PROMPT$ ".into());
    let mut p = c.pty(req).await.unwrap();
    let mut t = Transcript::default();
    p.send_input(Bytes::from_static(b"stty size; echo TERM=$TERM\n"))
        .await
        .unwrap();
    expect(&mut p, &mut t, "40 120").await;
    expect(&mut p, &mut t, "TERM=xterm-256color").await;
    p.resize(200, 50).await.unwrap();
    p.send_input(Bytes::from_static(b"stty size\n")).await.unwrap();
    expect(&mut p, &mut t, "50 200").await;
    p.send_input(Bytes::from_static(b"sleep 30\n")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    p.send_input(Bytes::from_static(b"\x03")).await.unwrap();
    p.send_input(Bytes::from_static(b"echo after-$((40+2))\n"))
        .await
        .unwrap();
    expect(&mut p, &mut t, "after-42").await;
    expect(&mut p, &mut t, "PROMPT$ ").await;
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Explicit signal op to the foreground group.
    p.send_input(Bytes::from_static(b"sleep 30\n")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal(libc::SIGINT).await.unwrap();
    p.send_input(Bytes::from_static(b"echo again-$((1+1))\n"))
        .await
        .unwrap();
    expect(&mut p, &mut t, "again-2").await;
    p.send_input(Bytes::from_static(b"exit 3\n")).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), p.next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(PtyEvent::Exit(e)) => {
                assert_eq!(e.code, Some(3));
                break;
            }
            Some(PtyEvent::Output(_)) => {}
            None => panic!("no exit"),
        }
    }
}

async fn sha256_in_guest(c: &AgentClient, path: &str) -> String {
    let out = c.run(cmd(&["sha256sum", "--", path])).await.unwrap();
    assert_eq!(out.exit.code, Some(0), "{}", out.stderr_lossy());
    out.stdout_lossy().split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_byte_exact_with_any_name() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let chunks: Vec<std::io::Result<Bytes>> = data.chunks(100_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let n = c
        .write_file("random.bin", Some(0o600), futures::stream::iter(chunks))
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let want = hex::encode(sha2::Sha256::digest(&data));
    assert_eq!(sha256_in_guest(&c, "random.bin").await, want);
    let back = c.read_file_to_vec("random.bin", 2 << 20).await.unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&back)), want);
    let st = c.stat("random.bin").await.unwrap();
    assert_eq!((st.size, st.mode, st.file_type), (1 << 20, 0o600, FileType::File));

    for name in ["a b.txt", "ünï 名.txt", "-x.txt", "q'u\"ote.txt"] {
        let body = Bytes::from(format!("content of {name}\n"));
        c.write_file_bytes(name, body.clone()).await.unwrap();
        assert_eq!(c.read_file_to_vec(name, 1024).await.unwrap(), body);
        assert_eq!(std::fs::read(a.root.join(name)).unwrap(), body);
        let out = c.run(cmd(&["cat", "--", name])).await.unwrap();
        assert_eq!(out.stdout, body);
    }
    let names: Vec<String> = c.list_dir("").await.unwrap().into_iter().map(|e| e.name).collect();
    assert!(
        names.contains(&"ünï 名.txt".to_string()) && names.contains(&"-x.txt".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("capsules-tmp")),
        "temp files left: {names:?}"
    );

    // mkdir -p, rename, remove.
    c.mkdir("d1/d2/d3").await.unwrap();
    c.write_file_bytes("d1/d2/d3/f", Bytes::from_static(b"x"))
        .await
        .unwrap();
    c.rename("d1", "d9").await.unwrap();
    assert_eq!(c.read_file_to_vec("d9/d2/d3/f", 10).await.unwrap(), b"x");
    let e = c.remove("d9", false).await.unwrap_err();
    assert!(e.to_string().contains("d9"), "{e}");
    c.remove("d9", true).await.unwrap();
    assert_eq!(c.stat("d9").await.unwrap_err().remote_kind(), Some(ErrorKind::NotFound));
    let e = c.read_file("missing.txt").await.unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound));
    let e = c
        .write_file_bytes("no/such/dir/f", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound), "{e}");
}

fn tree(root: &std::path::Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.push((rel + "/", Vec::new(), m.permissions().mode() & 0o777));
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p).unwrap(), m.permissions().mode() & 0o777));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn tar_upload_then_download_is_the_same_tree() {
    use std::os::unix::fs::PermissionsExt;
    let a = TestAgent::start();
    let c = a.client(1).await;
    let src = a.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a b.txt"), b"spaces").unwrap();
    std::fs::write(src.join("sub/ünï 名.txt"), "unicode".as_bytes()).unwrap();
    std::fs::write(src.join("sub/deeper/-x"), vec![0u8, 1, 2, 255]).unwrap();
    std::fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &src).unwrap();
    let archive = b.into_inner().unwrap();
    c.upload_tar("up/target", &archive[..]).await.unwrap();
    assert_eq!(tree(&src), tree(&a.root.join("up/target")));
    let out = c.run(cmd(&["./up/target/run.sh"])).await.unwrap();
    assert_eq!(&out.stdout[..], b"hi\n");

    let bytes = c
        .download_tar("up/target")
        .await
        .unwrap()
        .read_to_end(16 << 20)
        .await
        .unwrap();
    let dst = a.dir.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    tar::Archive::new(&bytes[..]).unpack(&dst).unwrap();
    assert_eq!(tree(&src), tree(&dst));

    let e = c
        .upload_tar("bad", &b"this is not a tar archive at all, definitely not"[..])
        .await;
    assert!(e.is_err());
    let e = c.download_tar("nope-dir").await.unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound));
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_to_a_guest_port() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut handled = 0;
        while handled < 3 {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(b"got:").await.unwrap();
                s.write_all(&buf).await.unwrap();
            });
            handled += 1;
        }
    });
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut s = c.connect(port).await.unwrap();
        conns.push(tokio::spawn(async move {
            let msg = vec![b'a' + i as u8; 300_000];
            s.write_all(&msg).await.unwrap();
            s.shutdown().await.unwrap(); // half-close: the server sees EOF, then answers
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(&back[..4], b"got:");
            assert_eq!(&back[4..], &msg[..]);
        }));
    }
    for t in conns {
        t.await.unwrap();
    }
    server.await.unwrap();
    closed_port_is_an_error(&c).await;
}

async fn closed_port_is_an_error(c: &AgentClient) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let e = c.connect(port).await.unwrap_err();
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}
