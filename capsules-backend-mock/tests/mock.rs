//! The mock's own features: scripting, faults, lifecycle edges, the interpreter, inspection.
//! All under paused tokio time, so delays and timeouts are exact and instant.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capsules_backend_mock::{ExecMatcher, ExecReply, FakeClock, MemoryStore, MockBackend, Op, test_spec};
use capsules_core::backend::{
    Backend, BackendExt, BackendState, CapsuleSpec, ExecEvent, ExecOutput, ExecRequest, PtyEvent, PtyInput, PtyRequest,
};
use capsules_core::testkit::backend as suite;
use capsules_core::types::{CapsuleId, NetworkPolicy};
use capsules_core::{Clock, ErrorKind};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

async fn setup() -> (MockBackend, CapsuleSpec) {
    let mock = MockBackend::new();
    let spec = test_spec();
    mock.create(&spec).await.unwrap();
    (mock, spec)
}

async fn sh(mock: &MockBackend, id: &CapsuleId, script: &str) -> ExecOutput {
    mock.exec_collect(id, ExecRequest::new(["sh", "-c", script]))
        .await
        .unwrap()
}

// ---------------------------------------------------------------- scripting

#[tokio::test(start_paused = true)]
async fn scripted_replies_match_exact_prefix_and_predicate() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.on_exec(
        ExecMatcher::exact(["npm", "test"]),
        ExecReply::new().stdout("ok\n").stderr("warn\n").exit_code(0),
    );
    mock.on_exec(
        ExecMatcher::prefix(["git"]),
        ExecReply::new().stdout("git!").exit_code(5),
    );
    mock.on_exec(
        ExecMatcher::predicate(|a| a.len() == 3 && a[0] == "make"),
        ExecReply::new().killed_by(9),
    );

    let o = mock.exec_collect(id, ExecRequest::new(["npm", "test"])).await.unwrap();
    assert_eq!(
        (o.stdout.as_slice(), o.stderr.as_slice(), o.exit_code()),
        (&b"ok\n"[..], &b"warn\n"[..], 0)
    );
    let o = mock
        .exec_collect(id, ExecRequest::new(["git", "status", "-s"]))
        .await
        .unwrap();
    assert_eq!((o.stdout.as_slice(), o.exit_code()), (&b"git!"[..], 5));
    let o = mock
        .exec_collect(id, ExecRequest::new(["make", "-j", "4"]))
        .await
        .unwrap();
    assert_eq!((o.status.signal, o.exit_code()), (Some(9), 137));
    // An exact matcher does not match a longer argv; unscripted unknown commands are 127.
    let o = mock
        .exec_collect(id, ExecRequest::new(["npm", "test", "--", "x"]))
        .await
        .unwrap();
    assert_eq!(o.exit_code(), 127);
    assert!(o.stderr_lossy().contains("command not found"), "{}", o.stderr_lossy());
    // Scripts answer commands inside `sh -c` too.
    let o = sh(&mock, id, "npm test && echo after").await;
    assert_eq!(o.stdout, b"ok\nafter\n");
}

#[tokio::test(start_paused = true)]
async fn newest_script_wins_and_limited_scripts_run_out() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.on_exec(ExecMatcher::prefix(["tool"]), ExecReply::new().stdout("old"));
    mock.on_exec_times(ExecMatcher::prefix(["tool"]), ExecReply::new().stdout("new"), 2);
    for want in ["new", "new", "old"] {
        let o = mock.exec_collect(id, ExecRequest::new(["tool"])).await.unwrap();
        assert_eq!(o.stdout_lossy(), want);
    }
    // Per-capsule scripts leave other capsules alone; scripts can override built-ins.
    let other = test_spec();
    mock.create(&other).await.unwrap();
    mock.on_exec_in(&other.id, ExecMatcher::exact(["true"]), ExecReply::new().exit_code(7));
    assert_eq!(
        mock.exec_collect(id, ExecRequest::new(["true"]))
            .await
            .unwrap()
            .exit_code(),
        0
    );
    assert_eq!(
        mock.exec_collect(&other.id, ExecRequest::new(["true"]))
            .await
            .unwrap()
            .exit_code(),
        7
    );
    mock.clear_scripts();
    assert_eq!(
        mock.exec_collect(id, ExecRequest::new(["tool"]))
            .await
            .unwrap()
            .exit_code(),
        127
    );
}

#[tokio::test(start_paused = true)]
async fn scripted_delays_stream_in_order_and_honour_the_timeout() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.on_exec(
        ExecMatcher::exact(["build"]),
        ExecReply::new()
            .stdout("a")
            .delay(Duration::from_secs(2))
            .stderr("b")
            .delay(Duration::from_secs(2))
            .stdout("c"),
    );
    let start = Instant::now();
    let mut s = mock.exec(id, ExecRequest::new(["build"])).await.unwrap();
    let mut events = Vec::new();
    while let Some(ev) = s.events.next().await {
        events.push((ev.unwrap(), start.elapsed().as_secs()));
    }
    let exit0 = capsules_core::backend::ExitStatus {
        code: Some(0),
        ..Default::default()
    };
    assert_eq!(
        events,
        vec![
            (ExecEvent::Stdout(Bytes::from_static(b"a")), 0),
            (ExecEvent::Stderr(Bytes::from_static(b"b")), 2),
            (ExecEvent::Stdout(Bytes::from_static(b"c")), 4),
            (ExecEvent::Exit(exit0), 4),
        ]
    );

    let mut r = ExecRequest::new(["build"]);
    r.timeout = Some(Duration::from_secs(3));
    let start = Instant::now();
    let o = mock.exec_collect(id, r).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(o.status.timed_out && !o.status.success());
    assert_eq!((o.stdout.as_slice(), o.stderr.as_slice()), (&b"a"[..], &b"b"[..]));
}

// ---------------------------------------------------------------- faults

#[tokio::test(start_paused = true)]
async fn fail_next_fails_exactly_n_calls_and_calls_are_recorded() {
    let mock = MockBackend::new();
    let spec = test_spec();
    mock.fail_next(Op::Create, 2, ErrorKind::Unavailable);
    for _ in 0..2 {
        let e = mock.create(&spec).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
    }
    mock.create(&spec).await.unwrap();
    assert_eq!(mock.calls_of(Op::Create).len(), 3);
    mock.fail_next_with(Op::ReadFile, 1, ErrorKind::Internal, "disk on fire");
    let e = mock.read_to_vec(&spec.id, "/etc/os-release").await.unwrap_err();
    assert_eq!((e.kind(), e.message()), (ErrorKind::Internal, "disk on fire"));
    assert!(mock.read_to_vec(&spec.id, "/etc/os-release").await.is_ok());
    mock.exec_collect(&spec.id, ExecRequest::new(["echo", "hi"]))
        .await
        .unwrap();
    let execs = mock.calls_of(Op::Exec);
    assert_eq!(execs.len(), 1);
    assert_eq!(
        (execs[0].detail.as_str(), execs[0].capsule.as_ref()),
        ("echo hi", Some(&spec.id))
    );
    mock.fail_next(Op::Wake, 3, ErrorKind::Unavailable);
    mock.clear_faults();
    mock.wake(&spec.id).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn hang_next_hangs_until_the_deadline_or_release() {
    let (mock, spec) = setup().await;
    mock.hang_next(Op::Wake, 2);
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), mock.wake(&spec.id)).await;
    assert!(r.is_err(), "a hung call returned");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    // The second hung call goes on once released.
    let m2 = mock.clone();
    let id = spec.id.clone();
    let call = tokio::spawn(async move { m2.wake(&id).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!call.is_finished());
    mock.release_hung();
    call.await.unwrap().unwrap();

    mock.delay_next(Op::State, 1, Duration::from_secs(7));
    let start = Instant::now();
    assert_eq!(mock.state(&spec.id).await.unwrap(), BackendState::Running);
    assert_eq!(start.elapsed(), Duration::from_secs(7));
}

// ---------------------------------------------------------------- lifecycle

#[tokio::test(start_paused = true)]
async fn lifecycle_is_idempotent_and_refuses_wrong_states() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.create(&spec).await.unwrap(); // a retry with the same spec
    let mut other = spec.clone();
    other.disk_gib = 20;
    assert_eq!(mock.create(&other).await.unwrap_err().kind(), ErrorKind::AlreadyExists);

    mock.sleep(id).await.unwrap();
    mock.sleep(id).await.unwrap();
    let e = mock.exec(id, ExecRequest::new(["true"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.message().contains("sleeping"), "{e}");
    mock.wake(id).await.unwrap();
    mock.wake(id).await.unwrap();

    mock.fail_capsule(id, "vmm crashed").unwrap();
    assert_eq!(
        mock.state(id).await.unwrap(),
        BackendState::Failed {
            reason: "vmm crashed".into()
        }
    );
    assert_eq!(mock.wake(id).await.unwrap_err().kind(), ErrorKind::Conflict);
    mock.restart(id).await.unwrap();
    assert_eq!(mock.state(id).await.unwrap(), BackendState::Running);
    assert!(String::from_utf8_lossy(&mock.logs(id).await.unwrap()).contains("capsules-agent: ready"));

    mock.terminate(id).await.unwrap();
    mock.terminate(id).await.unwrap();
    assert_eq!(mock.state(id).await.unwrap(), BackendState::Gone);
    assert_eq!(
        mock.exec(id, ExecRequest::new(["true"])).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(mock.sleep(id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(mock.list().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn sleep_cuts_calls_with_unavailable_but_background_processes_freeze() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let mut fg = mock.exec(id, ExecRequest::new(["sleep", "100"])).await.unwrap();
    let bg = mock
        .spawn(id, ExecRequest::new(["sh", "-c", "sleep 10; printf done"]))
        .await
        .unwrap();
    let handle = bg.handle.unwrap();
    let mut attached = mock.attach(id, &handle, 0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    mock.sleep(id).await.unwrap();
    let e = fg.events.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.is_retryable());
    assert_eq!(
        attached.events.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    // Asleep for an hour: the background `sleep 10` has 6 s left when it wakes.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let procs = mock.processes(id).await.unwrap();
    assert_eq!(procs.len(), 1, "the cut foreground exec is gone: {procs:?}");
    assert!(procs[0].running);
    mock.wake(id).await.unwrap();
    let start = Instant::now();
    let mut s = mock.attach(id, &handle, 0).await.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = s.events.next().await {
        match ev.unwrap() {
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Exit(st) => assert_eq!(st.code, Some(0)),
            ExecEvent::Stderr(_) => {}
        }
    }
    assert_eq!(out, b"done");
    assert_eq!(start.elapsed(), Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn signals_and_attach_offsets() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let p = mock
        .spawn(id, ExecRequest::new(["sh", "-c", "printf 0123456789; sleep 50"]))
        .await
        .unwrap();
    let h = p.handle.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut s = mock.attach(id, &h, 7).await.unwrap();
    assert_eq!(
        s.events.next().await.unwrap().unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"789"))
    );
    mock.signal(id, &h, 28).await.unwrap(); // SIGWINCH does not end it
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(mock.processes(id).await.unwrap()[0].running);
    mock.signal(id, &h, 2).await.unwrap();
    match s.events.next().await.unwrap().unwrap() {
        ExecEvent::Exit(st) => assert_eq!((st.signal, st.code), (Some(2), None)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        mock.attach(id, "proc-nope", 0).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        mock.signal(id, &h, 99).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

// ---------------------------------------------------------------- the interpreter

#[tokio::test(start_paused = true)]
async fn the_shell_subset() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let o = sh(&mock, id, "false || echo a && echo b; false; echo \"status $?\"").await;
    assert_eq!(o.stdout_lossy(), "a\nb\nstatus 1\n");
    let o = sh(&mock, id, "cd /tmp && pwd; X='p  q'; printf '[%s]' $X \"$X\"; exit 4").await;
    assert_eq!((o.stdout_lossy().as_str(), o.exit_code()), ("/tmp\n[p][q][p  q]", 4));
    let o = sh(
        &mock,
        id,
        "printf hello > f.txt; printf ' world' >> f.txt; cat f.txt; sha256sum f.txt",
    )
    .await;
    assert_eq!(mock.file(id, "f.txt").unwrap(), Bytes::from_static(b"hello world"));
    assert!(o.stdout_lossy().starts_with("hello world"));
    assert!(
        o.stdout_lossy()
            .contains("b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9  f.txt")
    );
    let o = sh(&mock, id, "echo err >&2; cat < f.txt; echo gone 2>/dev/null >&2").await;
    assert_eq!(
        (o.stdout_lossy().as_str(), o.stderr_lossy().as_str()),
        ("hello world", "err\n")
    );
    let o = sh(&mock, id, "echo a | cat").await;
    assert_eq!(o.exit_code(), 2);
    assert!(o.stderr_lossy().contains("not supported"), "{}", o.stderr_lossy());
    let o = sh(&mock, id, "if true; then echo x; fi").await;
    assert_eq!(o.exit_code(), 2);
    let o = mock.exec_collect(id, ExecRequest::new(["stty", "size"])).await.unwrap();
    assert_eq!(o.exit_code(), 1, "no terminal, no size");
    let o = mock
        .exec_collect(
            id,
            ExecRequest::new(["sh", "-c", "printf '%s,' \"$0\" \"$1\" $#", "me", "one"]),
        )
        .await
        .unwrap();
    assert_eq!(o.stdout_lossy(), "me,one,1,");
    let o = mock
        .exec_collect(id, ExecRequest::new(["head", "-c", "5", "/workspace/f.txt"]))
        .await
        .unwrap();
    assert_eq!(o.stdout, b"hello");
    let o = mock.exec_collect(id, ExecRequest::new(["cat", "/nope"])).await.unwrap();
    assert_eq!(o.exit_code(), 1);
    assert!(o.stderr_lossy().contains("No such file"));
}

#[tokio::test(start_paused = true)]
async fn output_cap_and_missing_cwd() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let mut r = ExecRequest::new(["printf", "0123456789abcdefghij"]);
    r.output_cap = Some(8);
    let o = mock.exec_collect(id, r).await.unwrap();
    assert_eq!((o.stdout.as_slice(), o.status.stdout_dropped), (&b"0123ghij"[..], 12));
    let mut r = ExecRequest::new(["pwd"]);
    r.cwd = Some("missing".into());
    let e = mock.exec(id, r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("/workspace/missing"), "{e}");
    assert_eq!(
        mock.exec(id, ExecRequest::new(Vec::<String>::new()))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
}

// ---------------------------------------------------------------- pty

#[tokio::test(start_paused = true)]
async fn pty_program_mode_and_hangup() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let req = |argv: Option<Vec<String>>| PtyRequest {
        argv,
        cols: 80,
        rows: 24,
        env: Default::default(),
        cwd: None,
    };
    let pty = mock
        .pty(id, req(Some(vec!["sleep".into(), "100".into()])))
        .await
        .unwrap();
    pty.input
        .send(PtyInput::Data(Bytes::from_static(b"\x03")))
        .await
        .unwrap();
    let mut out = pty.output;
    let mut last = None;
    while let Some(ev) = out.next().await {
        last = Some(ev.unwrap());
    }
    match last {
        Some(PtyEvent::Exit(st)) => assert_eq!(st.signal, Some(2)),
        other => panic!("{other:?}"),
    }
    let pty = mock.pty(id, req(None)).await.unwrap();
    drop(pty.input);
    let mut out = pty.output;
    let mut last = None;
    while let Some(ev) = out.next().await {
        last = Some(ev.unwrap());
    }
    assert!(
        matches!(last, Some(PtyEvent::Exit(st)) if st.signal == Some(1)),
        "hangup"
    );
}

// ---------------------------------------------------------------- files, network, clock

#[tokio::test(start_paused = true)]
async fn writes_past_the_disk_fail_with_the_storage_limit() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.set_disk_limit(id, 1000).unwrap();
    let used = mock.disk_used(id);
    mock.write_bytes(id, "a.bin", Bytes::from(vec![1; 900 - used as usize]))
        .await
        .unwrap();
    let e = mock
        .write_bytes(id, "b.bin", Bytes::from(vec![2; 200]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
    assert!(
        e.message().contains("storage limit") && e.message().contains("no space left"),
        "{e}"
    );
    assert!(mock.file(id, "b.bin").is_none(), "a failed write left a file");
    let o = sh(&mock, id, "printf 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789x > c.bin").await;
    assert_ne!(o.exit_code(), 0, "the shell's redirection also hits the limit");
}

#[tokio::test(start_paused = true)]
async fn connect_serves_registered_handlers_and_refuses_others() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let e = mock.connect(id, 8080).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.message().contains("connection refused"), "{e}");
    mock.serve_port(id, 8080, |mut s| async move {
        let mut buf = [0; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
    })
    .unwrap();
    let mut c = mock.connect(id, 8080).await.unwrap();
    c.write_all(b"GET ").await.unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).await.unwrap();
    assert!(resp.ends_with("\r\n\r\nhi"), "{resp}");
    mock.stop_serving(id, 8080);
    assert!(mock.connect(id, 8080).await.is_err());

    mock.apply_network(id, &NetworkPolicy::None).await.unwrap();
    assert_eq!(mock.policies(id), vec![NetworkPolicy::Internet, NetworkPolicy::None]);
    assert_eq!(mock.network(id), Some(NetworkPolicy::None));
}

#[tokio::test(start_paused = true)]
async fn the_fake_clock_sets_mtimes_and_the_store_is_reexported() {
    let clock = Arc::new(FakeClock::new(1_700_000_000_000));
    let mock = MockBackend::with_clock(clock.clone());
    let spec = test_spec();
    mock.create(&spec).await.unwrap();
    clock.advance(Duration::from_secs(60));
    mock.write_bytes(&spec.id, "t.txt", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(mock.stat(&spec.id, "t.txt").await.unwrap().mtime, 1_700_000_060);
    assert_eq!(clock.now_ms(), 1_700_000_060_000);
    let _store = MemoryStore::new();
    assert_eq!(
        mock.files(&spec.id).get("/workspace/t.txt"),
        Some(&Bytes::from_static(b"x"))
    );
}

// ---------------------------------------------------------------- the suite can fail

#[tokio::test(start_paused = true)]
async fn the_suite_catches_a_misbehaving_backend() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    // A backend whose pwd lies fails the cwd case...
    mock.on_exec_times(ExecMatcher::exact(["pwd"]), ExecReply::new().stdout("/elsewhere\n"), 1);
    let f = suite::exec_cwd(&mock, id).await.unwrap_err();
    assert!(f.0.contains("default cwd"), "{f}");
    // ...one whose output does not reach stderr fails the bytes case...
    mock.on_exec_times(ExecMatcher::exact(["sh", "-c", "cat >&2"]), ExecReply::new(), 1);
    assert!(suite::exec_bytes_exact(&mock, id).await.is_err());
    // ...and one whose sleep fails fails the sleep/wake case.
    mock.fail_next(Op::Sleep, 1, ErrorKind::Unavailable);
    assert!(suite::lifecycle_sleep_wake_cycles(&mock, id).await.is_err());
    // A timeout that is not reported as such is caught too.
    mock.on_exec_times(ExecMatcher::prefix(["sh", "-c"]), ExecReply::new().stdout("started"), 1);
    let f = suite::exec_timeout_kills_group(&mock, id).await.unwrap_err();
    assert!(f.0.contains("timed out"), "{f}");
    // And with nothing wrong, the same cases pass on the same capsule.
    suite::exec_suite(&mock, id).await.unwrap();
    suite::lifecycle_suite(&mock, id).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn terminate_cuts_a_terminal_and_a_dropped_exec_stream_kills_its_process() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    let s = mock.exec(id, ExecRequest::new(["sleep", "100"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.processes(id).await.unwrap().len(), 1);
    drop(s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        mock.processes(id).await.unwrap().is_empty(),
        "a dropped exec left its process"
    );

    let pty = mock
        .pty(
            id,
            PtyRequest {
                argv: None,
                cols: 80,
                rows: 24,
                env: Default::default(),
                cwd: None,
            },
        )
        .await
        .unwrap();
    let mut out = pty.output;
    assert_eq!(
        out.next().await.unwrap().unwrap(),
        PtyEvent::Output(Bytes::from_static(b"$ "))
    );
    mock.terminate(id).await.unwrap();
    let e = out.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.message().contains("terminated"), "{e}");
    assert!(out.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failed_capsule_refuses_guest_calls_and_restart_forgets_processes() {
    let (mock, spec) = setup().await;
    let id = &spec.id;
    mock.write_bytes(id, "keep.txt", Bytes::from_static(b"kept"))
        .await
        .unwrap();
    let p = mock.spawn(id, ExecRequest::new(["sleep", "100"])).await.unwrap();
    mock.fail_capsule(id, "host lost the VMM").unwrap();
    let e = mock.read_to_vec(id, "keep.txt").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.message().contains("restart"), "{e}");
    mock.restart(id).await.unwrap();
    assert_eq!(mock.read_to_vec(id, "keep.txt").await.unwrap(), b"kept");
    assert!(mock.processes(id).await.unwrap().is_empty());
    assert_eq!(
        mock.attach(id, p.handle.as_deref().unwrap(), 0)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn cases_without_a_capability_are_skipped_with_a_reason() {
    let mut caps = MockBackend::new().capabilities();
    caps.pty = false;
    caps.memory_sleep = false;
    let skipped: Vec<(&str, String)> = suite::cases()
        .into_iter()
        .filter_map(|c| c.skip_reason(&caps).map(|r| (c.name, r)))
        .collect();
    let names: Vec<&str> = skipped.iter().map(|s| s.0).collect();
    assert_eq!(names, ["background::survives_sleep", "pty::size_resize_ctrl_c_exit"]);
    assert!(skipped[1].1.contains("pty"), "{}", skipped[1].1);
    let all = suite::cases();
    let unique: std::collections::BTreeSet<&str> = all.iter().map(|c| c.name).collect();
    assert_eq!(unique.len(), all.len(), "case names are unique");
}
