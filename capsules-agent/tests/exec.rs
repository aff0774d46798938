//! Exec contract over the real binary in `serve --unix` mode.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use capsules_agent::client::ExecEvent;
use capsules_agent::proto::{ErrorKind, ExecRequest};
use common::{TestAgent, cmd, sh};

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_whole_group() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let t = Instant::now();
    let out = c
        .run(ExecRequest {
            timeout_ms: Some(1000),
            ..cmd(&["sleep", "30"])
        })
        .await
        .unwrap();
    assert!(out.exit.timed_out, "{:?}", out.exit);
    assert_eq!(out.exit.signal, Some(libc::SIGKILL));
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert!(a.eventually(Duration::from_secs(1), |a| {
        !a.descendants().iter().any(|d| d.2.contains("sleep 30"))
    }));

    let out = c
        .run(ExecRequest {
            timeout_ms: Some(500),
            ..sh("sleep 300 & sleep 300 & wait")
        })
        .await
        .unwrap();
    assert!(out.exit.timed_out);
    let gone = a.eventually(Duration::from_secs(2), |a| {
        !a.descendants().iter().any(|d| d.2.contains("sleep 300"))
    });
    assert!(gone, "left: {:?}", a.descendants());
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_absent_is_eof_and_present_is_streamed() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let t = Instant::now();
    let out = c.run(cmd(&["cat"])).await.unwrap();
    assert_eq!(out.exit.code, Some(0));
    assert!(out.stdout.is_empty());
    assert!(t.elapsed() < Duration::from_secs(1));

    let t = Instant::now();
    let out = c
        .run(ExecRequest {
            stdin: true,
            timeout_ms: Some(800),
            ..cmd(&["cat"])
        })
        .await
        .unwrap();
    assert!(out.exit.timed_out);
    assert!(
        t.elapsed() >= Duration::from_millis(700) && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );

    let call = c
        .exec(ExecRequest {
            stdin: true,
            ..cmd(&["tr", "a-z", "A-Z"])
        })
        .await
        .unwrap();
    call.send_stdin(Bytes::from_static(b"hello ")).await.unwrap();
    call.send_stdin(Bytes::from_static(b"world")).await.unwrap();
    call.close_stdin().await.unwrap();
    let out = call.collect().await.unwrap();
    assert_eq!(&out.stdout[..], b"HELLO WORLD");
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_bytes_and_lossy_view() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let out = c.run(cmd(&["printf", "ok\\377\\376end\\n"])).await.unwrap();
    assert_eq!(out.exit.code, Some(0));
    assert_eq!(&out.stdout[..], b"ok\xff\xfeend\n");
    assert!(out.stdout_lossy().starts_with("ok\u{fffd}"));
    let out = c.run(sh("echo err >&2; echo out")).await.unwrap();
    assert_eq!(&out.stdout[..], b"out\n");
    assert_eq!(&out.stderr[..], b"err\n");
    let out = c.run(sh("exit 7")).await.unwrap();
    assert_eq!(out.exit.code, Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn output_cap_keeps_head_and_tail() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let cap = 1_000_000u64;
    let out = c
        .run(ExecRequest {
            output_cap: Some(cap),
            ..sh("printf HEAD; head -c 20000000 /dev/zero; echo TAIL")
        })
        .await
        .unwrap();
    assert_eq!(out.exit.code, Some(0));
    assert!(out.truncated());
    assert_eq!(out.stdout.len() as u64, cap);
    assert_eq!(out.exit.stdout_dropped, 20_000_000 + 4 + 5 - cap);
    assert!(out.stdout.starts_with(b"HEAD\0"));
    assert!(out.stdout.ends_with(b"\0TAIL\n"));

    let out = c
        .run(ExecRequest {
            timeout_ms: Some(2000),
            ..sh("echo before; sleep 60")
        })
        .await
        .unwrap();
    assert!(out.exit.timed_out);
    assert_eq!(&out.stdout[..], b"before\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn env_cwd_and_errors() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let mut req = sh("sh -c 'printf %s \"$GREETING\"'");
    req.env.insert("GREETING".into(), "hello  big world".into());
    let out = c.run(req).await.unwrap();
    assert_eq!(&out.stdout[..], b"hello  big world");

    let out = c.run(cmd(&["pwd"])).await.unwrap();
    assert_eq!(
        out.stdout_lossy().trim(),
        a.root.canonicalize().unwrap().to_str().unwrap()
    );
    std::fs::create_dir_all(a.root.join("sub dir")).unwrap();
    let out = c
        .run(ExecRequest {
            cwd: Some("sub dir".into()),
            ..cmd(&["pwd"])
        })
        .await
        .unwrap();
    assert!(out.stdout_lossy().trim().ends_with("/sub dir"));

    let e = c
        .run(ExecRequest {
            cwd: Some("/nope".into()),
            ..cmd(&["true"])
        })
        .await
        .unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("/nope"), "{e}");
    let e = c.run(cmd(&["definitely-not-a-program"])).await.unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound), "{e}");
    let e = c.run(cmd(&[])).await.unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::InvalidInput), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_reaped() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let out = c
        .run(sh("for i in $(seq 200); do (sleep 0.1 &); done; exit"))
        .await
        .unwrap();
    assert_eq!(out.exit.code, Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let clean = a.eventually(Duration::from_secs(2), |a| {
        let d = a.descendants();
        d.iter().all(|p| p.1 != 'Z') && !d.iter().any(|p| p.2.contains("sleep 0.1"))
    });
    let zombies: Vec<_> = a.descendants().into_iter().filter(|p| p.1 == 'Z').collect();
    assert!(clean, "zombies: {}", zombies.len());

    // The orphans really were ours to reap: an orphan is reparented to the agent (subreaper),
    // not to the system's init, and is gone (not a zombie) after it exits.
    let out = c.run(sh("(exec sleep 0.8 >/dev/null 2>&1 &); exit")).await.unwrap();
    assert_eq!(out.exit.code, Some(0));
    let orphan = a
        .descendants()
        .into_iter()
        .find(|p| p.2.contains("sleep 0.8"))
        .expect("orphan not reparented to the agent");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", orphan.0)).unwrap();
    let ppid: i32 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, a.pid());
    let reaped = a.eventually(Duration::from_secs(3), |_| {
        !std::path::Path::new(&format!("/proc/{}", orphan.0)).exists()
    });
    assert!(
        reaped,
        "orphan {} left as {:?}",
        orphan.0,
        std::fs::read_to_string(format!("/proc/{}/stat", orphan.0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_execs() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let req = cmd(&[
                "sh",
                "-c",
                "sleep 0.2; printf 'out-%s' \"$1\"; printf 'err-%s' \"$1\" >&2; exit $(($1 % 7))",
                "sh",
                &i.to_string(),
            ]);
            (i, c.run(req).await.unwrap())
        }));
    }
    for t in tasks {
        let (i, out) = t.await.unwrap();
        assert_eq!(out.stdout_lossy(), format!("out-{i}"));
        assert_eq!(out.stderr_lossy(), format!("err-{i}"));
        assert_eq!(out.exit.code, Some(i % 7));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_events_and_signal() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let mut call = c.exec(sh("echo first; exec sleep 30")).await.unwrap();
    assert!(call.pid() > 0);
    match call.next().await.unwrap() {
        Some(ExecEvent::Stdout(b)) => assert_eq!(&b[..], b"first\n"),
        other => panic!("{other:?}"),
    }
    call.signal(libc::SIGTERM).await.unwrap();
    let t = Instant::now();
    loop {
        match call.next().await.unwrap() {
            Some(ExecEvent::Exit(e)) => {
                assert_eq!(e.signal, Some(libc::SIGTERM));
                assert!(!e.timed_out);
                break;
            }
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(call.next().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_call_kills_it() {
    let a = TestAgent::start();
    let c = a.client(1).await;
    let call = c.exec(cmd(&["sleep", "41"])).await.unwrap();
    assert!(a.eventually(Duration::from_secs(1), |a| {
        a.descendants().iter().any(|d| d.2.contains("sleep 41"))
    }));
    drop(call);
    assert!(a.eventually(Duration::from_secs(2), |a| {
        !a.descendants().iter().any(|d| d.2.contains("sleep 41"))
    }));
    c.ping().await.unwrap();
    assert_eq!(c.run(cmd(&["false"])).await.unwrap().exit.code, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn user_by_name_or_uid() {
    use capsules_agent::proto::User;
    let a = TestAgent::start();
    let c = a.client(1).await;
    let e = c
        .run(ExecRequest {
            user: Some(User::Name("no-such-user".into())),
            ..cmd(&["true"])
        })
        .await
        .unwrap_err();
    assert_eq!(e.remote_kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("no-such-user"), "{e}");
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // switching users needs root
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let Some(nobody) = passwd.lines().find(|l| l.starts_with("nobody:")) else {
        return;
    };
    let uid = nobody.split(':').nth(2).unwrap().to_string();
    for d in [a.dir.path(), &a.root] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let out = c
        .run(ExecRequest {
            user: Some(User::Name("nobody".into())),
            ..cmd(&["id", "-u"])
        })
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy().trim(), uid, "{}", out.stderr_lossy());
    let out = c
        .run(ExecRequest {
            user: Some(User::Uid(uid.parse().unwrap())),
            ..sh("id -u; echo $HOME $USER")
        })
        .await
        .unwrap();
    assert!(
        out.stdout_lossy().starts_with(&format!("{uid}\n")),
        "{}",
        out.stdout_lossy()
    );
    assert!(out.stdout_lossy().contains("nobody"));
}
