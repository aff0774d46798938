//! The `capsule` binary against an in-test server (mock backend) on a loopback port.

use std::path::PathBuf;
use std::process::Stdio;

use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::{Capsules, MemoryStore};
use tokio::io::AsyncWriteExt;

struct Server {
    url: String,
    owner: String,
    operator: String,
}

async fn server(mock: MockBackend) -> Server {
    let capsules = Capsules::builder()
        .backend(mock)
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("default").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        operator: boot.operator.secret.expose().to_owned(),
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `capsule ARGS` with `token`, feeding `stdin` (none: /dev/null).
async fn capsule(s: &Server, token: &str, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_capsule"));
    cmd.args(args)
        .current_dir(repo_root())
        .env("CAPSULE_API", &s.url)
        .env("CAPSULE_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input.as_bytes()).await.unwrap();
        drop(w);
    }
    let out = child.wait_with_output().await.unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(o: &Out, what: &str) {
    assert_eq!(o.code, 0, "{what} failed:\nstdout: {}\nstderr: {}", o.stdout, o.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quickstart_verbatim() {
    let mock = MockBackend::new();
    mock.on_exec(
        ExecMatcher::exact(["npm", "test"]),
        ExecReply::new().stdout("> quickstart test\n1 passing\n").exit_code(0),
    );
    let s = server(mock).await;

    let o = capsule(
        &s,
        &s.owner,
        &["tokens", "create", "--scope", "agent:write", "--prefix", "agent-"],
        None,
    )
    .await;
    ok(&o, "tokens create");
    let agent = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("export CAPSULE_TOKEN="))
        .expect("an export line")
        .to_owned();
    assert!(agent.starts_with("cap_"));

    let o = capsule(
        &s,
        &agent,
        &["create", "agent-pr-482", "--size", "2x2gb", "--credit-limit", "2.00"],
        None,
    )
    .await;
    ok(&o, "create");
    assert!(o.stdout.contains("agent-pr-482"), "{}", o.stdout);

    let o = capsule(
        &s,
        &agent,
        &["cp", "./examples/quickstart/project", "agent-pr-482:/workspace"],
        None,
    )
    .await;
    ok(&o, "cp");

    let o = capsule(&s, &agent, &["exec", "agent-pr-482", "--", "npm", "test"], None).await;
    ok(&o, "exec");
    assert_eq!(o.stdout, "> quickstart test\n1 passing\n");

    // The uploaded project is there.
    let o = capsule(
        &s,
        &agent,
        &["exec", "agent-pr-482", "--", "cat", "/workspace/package.json"],
        None,
    )
    .await;
    ok(&o, "cat package.json");
    assert!(o.stdout.contains("\"test\""), "{}", o.stdout);

    let o = capsule(&s, &agent, &["create", "other-1"], None).await;
    assert_ne!(o.code, 0);
    let first = o.stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: ") && first.contains("agent-"), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);

    let o = capsule(&s, &agent, &["terminate", "agent-pr-482"], None).await;
    ok(&o, "terminate");

    let o = capsule(&s, &agent, &["usage", "agent-pr-482"], None).await;
    ok(&o, "usage");
    for want in [
        "compute:",
        "minutes",
        "created",
        "exec",
        "npm test",
        "terminated",
        "credit limit 2.00",
    ] {
        assert!(o.stdout.contains(want), "usage lacks {want:?}:\n{}", o.stdout);
    }

    let o = capsule(&s, &agent, &["--json", "usage", "agent-pr-482"], None).await;
    ok(&o, "usage --json");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(v["usage"]["compute_minutes"].as_u64().unwrap() >= 1);
    assert_eq!(v["capsule"]["state"], "terminated");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_forwards_stdin_and_exit_codes() {
    let mock = MockBackend::new();
    mock.on_exec(ExecMatcher::exact(["exit-three"]), ExecReply::new().exit_code(3));
    mock.on_exec(ExecMatcher::exact(["killed"]), ExecReply::new().killed_by(9));
    mock.on_exec(
        ExecMatcher::exact(["slow"]),
        ExecReply::new().delay(std::time::Duration::from_secs(30)).exit_code(0),
    );
    let s = server(mock).await;
    ok(&capsule(&s, &s.owner, &["create", "x"], None).await, "create");

    let o = capsule(&s, &s.owner, &["exec", "x", "--", "cat"], Some("echo from a script\n")).await;
    ok(&o, "cat < script");
    assert_eq!(o.stdout, "echo from a script\n");

    let o = capsule(
        &s,
        &s.owner,
        &["exec", "x", "--", "sh", "-c", "cat; exit 3"],
        Some("piped\n"),
    )
    .await;
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert_eq!(o.stdout, "piped\n");

    assert_eq!(
        capsule(&s, &s.owner, &["exec", "x", "--", "exit-three"], None)
            .await
            .code,
        3
    );
    assert_eq!(
        capsule(&s, &s.owner, &["exec", "x", "--", "killed"], None).await.code,
        128 + 9
    );

    let o = capsule(&s, &s.owner, &["exec", "x", "--timeout", "1s", "--", "slow"], None).await;
    assert_eq!(o.code, 124, "{}", o.stderr);
    assert!(o.stderr.contains("timed out"), "{}", o.stderr);

    // An error before the command ran: 125 and one line.
    let o = capsule(&s, &s.owner, &["exec", "nope", "--", "ls"], None).await;
    assert_eq!(o.code, 125);
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_and_operator_commands_work() {
    let s = server(MockBackend::new()).await;
    let o = capsule(&s, "", &["list"], None).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.starts_with("error: no token"), "{}", o.stderr);

    let o = capsule(&s, &s.owner, &["create", "Bad_Name"], None).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);

    let o = capsule(&s, &s.operator, &["teams", "create", "beta"], None).await;
    ok(&o, "teams create");
    let o = capsule(
        &s,
        &s.operator,
        &["credits", "grant", "beta", "10.00", "--reason", "pilot"],
        None,
    )
    .await;
    ok(&o, "credits grant");
    let o = capsule(&s, &s.owner, &["usage"], None).await;
    ok(&o, "team usage");
    assert!(
        o.stdout.contains("balance:") && o.stdout.contains("5.00"),
        "{}",
        o.stdout
    );

    // Unreachable server: Unavailable with a hint.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = Server {
        url: format!("http://{}", l.local_addr().unwrap()),
        owner: s.owner.clone(),
        operator: String::new(),
    };
    drop(l);
    let o = capsule(&dead, &s.owner, &["list"], None).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("is unreachable"), "{}", o.stderr);

    // cp both ways.
    ok(&capsule(&s, &s.owner, &["create", "cp-1"], None).await, "create");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("hello.txt");
    std::fs::write(&f, "hi there").unwrap();
    let o = capsule(
        &s,
        &s.owner,
        &["cp", f.to_str().unwrap(), "cp-1:/workspace/hello.txt"],
        None,
    )
    .await;
    ok(&o, "cp file up");
    let back = dir.path().join("back.txt");
    let o = capsule(
        &s,
        &s.owner,
        &["cp", "cp-1:/workspace/hello.txt", back.to_str().unwrap()],
        None,
    )
    .await;
    ok(&o, "cp file down");
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hi there");
    let down = dir.path().join("ws");
    let o = capsule(&s, &s.owner, &["cp", "cp-1:/workspace", down.to_str().unwrap()], None).await;
    ok(&o, "cp dir down");
    assert_eq!(std::fs::read_to_string(down.join("hello.txt")).unwrap(), "hi there");
    // A relative path inside the capsule is named as the mistake, with the fix.
    let o = capsule(&s, &s.owner, &["cp", f.to_str().unwrap(), "cp-1:workspace/x"], None).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("must be absolute: cp-1:/workspace/x"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn console_with_piped_stdin_runs_the_script_and_exits_with_its_code() {
    let s = server(MockBackend::new()).await;
    let o = capsule(&s, &s.owner, &["create", "con-1"], None).await;
    ok(&o, "create");

    // stdin is a pipe, not a terminal: its bytes go to the capsule's shell as they are.
    let o = capsule(
        &s,
        &s.owner,
        &["console", "con-1", "--cols", "100", "--rows", "30"],
        Some("echo hello-from-the-console\nstty size\nexit 3\n"),
    )
    .await;
    assert_eq!(o.code, 3, "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert!(o.stdout.contains("hello-from-the-console\r\n"), "{}", o.stdout);
    assert!(o.stdout.contains("30 100"), "{}", o.stdout);

    // A clean exit is 0; the size defaults to 80x24 without a terminal.
    let o = capsule(&s, &s.owner, &["console", "con-1"], Some("stty size\nexit\n")).await;
    assert_eq!(o.code, 0, "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert!(o.stdout.contains("24 80"), "{}", o.stdout);

    // Errors before the session are one line and a non-zero exit.
    let o = capsule(&s, &s.owner, &["console", "con-9"], Some("exit\n")).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
    assert!(o.stderr.contains("con-9"), "{}", o.stderr);
    let o = capsule(&s, &s.owner, &["console", "con-1", "--cols", "0"], None).await;
    assert_ne!(o.code, 0);

    // The exec history and the boot log are in `capsule logs`.
    let o = capsule(&s, &s.owner, &["exec", "con-1", "--", "echo", "hi"], None).await;
    ok(&o, "exec");
    let o = capsule(&s, &s.owner, &["logs", "con-1"], None).await;
    ok(&o, "logs");
    assert!(o.stdout.contains("== exec history =="), "{}", o.stdout);
    assert!(o.stdout.contains("echo hi  (exit 0"), "{}", o.stdout);
    assert!(o.stdout.contains("== boot log =="), "{}", o.stdout);
    let o = capsule(&s, &s.owner, &["--json", "logs", "con-1"], None).await;
    ok(&o, "logs --json");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["execs"][0]["kind"]["argv"], serde_json::json!(["echo", "hi"]), "{v}");
    assert!(v["boot_log"].is_string(), "{v}");
}

/// `GET path` on the server with `Host: host`; the status line and the headers.
async fn raw_get(server: &str, host: &str, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let addr = server.strip_prefix("http://").unwrap();
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn url_exposes_prints_and_mints_a_browser_link() {
    let s = server(MockBackend::new()).await;
    ok(&capsule(&s, &s.owner, &["create", "web-1"], None).await, "create");

    let o = capsule(&s, &s.owner, &["url", "web-1"], None).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.starts_with("error: capsule web-1 has no URL"), "{}", o.stderr);
    assert!(o.stderr.contains("--port"), "{}", o.stderr);

    let o = capsule(&s, &s.owner, &["url", "web-1", "--port", "8080"], None).await;
    ok(&o, "url --port");
    let href = o.stdout.trim().to_owned();
    let port = s.url.rsplit(':').next().unwrap();
    assert!(
        href.starts_with("http://web-1-") && href.ends_with(&format!(".localhost:{port}/")),
        "{href}"
    );
    let host = href.trim_start_matches("http://").trim_end_matches('/').to_owned();
    // The URL needs a token; the browser link trades its token for a cookie.
    assert!(raw_get(&s.url, &host, "/").await.starts_with("HTTP/1.1 401"));
    let o = capsule(&s, &s.owner, &["url", "web-1", "--preview-token"], None).await;
    ok(&o, "url --preview-token");
    let link = o.stdout.trim();
    assert!(link.starts_with(&format!("{href}?capsule_token=cap_")), "{link}");
    let path = &link[href.len() - 1..];
    let resp = raw_get(&s.url, &host, path).await;
    assert!(resp.starts_with("HTTP/1.1 303"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("set-cookie: capsule_token=cap_"),
        "{resp}"
    );

    let o = capsule(&s, &s.owner, &["--json", "url", "web-1", "--public"], None).await;
    ok(&o, "url --public --json");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["url"]["access"], "public");
    assert_eq!(v["url"]["port"], 8080);
    assert_eq!(v["url"]["href"], href.as_str());

    let o = capsule(&s, &s.owner, &["url", "web-1", "--port", "0"], None).await;
    assert_eq!(o.code, 1);
    let o = capsule(&s, &s.owner, &["url", "web-1", "--remove", "--port", "80"], None).await;
    assert_ne!(o.code, 0);
    ok(
        &capsule(&s, &s.owner, &["url", "web-1", "--remove"], None).await,
        "url --remove",
    );
    assert!(raw_get(&s.url, &host, "/").await.starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_errors_are_json_on_stderr() {
    let s = server(MockBackend::new()).await;
    let cases: [(&[&str], &str, i32); 4] = [
        (&["--json", "status", "nope-1"], "not_found", 1),
        (&["--json", "create", "Bad_Name"], "invalid_input", 1),
        (&["--json", "create", "ok-1", "--size", "64x1tb"], "invalid_input", 1),
        (&["--json", "no-such-command"], "invalid_input", 2),
    ];
    for (args, kind, code) in cases {
        let o = capsule(&s, &s.owner, args, None).await;
        assert_eq!(o.code, code, "{args:?}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{args:?} printed on stdout: {}", o.stdout);
        let v: serde_json::Value = serde_json::from_str(o.stderr.trim())
            .unwrap_or_else(|e| panic!("{args:?}: stderr is not JSON ({e}): {}", o.stderr));
        assert_eq!(v["error"]["kind"], kind, "{args:?}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // A refused token: JSON with the hint.
    let o = capsule(&s, "cap_bogus_0000000000000000000000", &["--json", "list"], None).await;
    let v: serde_json::Value = serde_json::from_str(o.stderr.trim()).unwrap_or_else(|_| panic!("{}", o.stderr));
    assert_eq!(v["error"]["kind"], "unauthenticated", "{v}");
    // Without --json the error stays one plain line.
    let o = capsule(&s, &s.owner, &["status", "nope-1"], None).await;
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
}

/// Runs `capsule ARGS` with stderr on a pseudo-terminal (stdout a pipe): (exit, stdout, what the
/// terminal showed).
fn capsule_on_tty(s: &Server, args: &[&str]) -> (i32, String, String) {
    use std::io::Read;
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .env("CAPSULE_API", &s.url)
        .env("CAPSULE_TOKEN", &s.owner)
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last holder of the terminal (the child) is gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        reader.join().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_on_a_terminal_only_and_never_on_stdout() {
    use capsules_backend_mock::Op;
    let mock = MockBackend::new();
    let s = server(mock.clone()).await;
    // A create and a wake that take a while, as on a real backend.
    mock.delay_next(Op::Create, 3, std::time::Duration::from_millis(1500));
    mock.delay_next(Op::Wake, 1, std::time::Duration::from_millis(1500));
    let s2 = Server {
        url: s.url.clone(),
        owner: s.owner.clone(),
        operator: s.operator.clone(),
    };
    let (code, stdout, tty) = tokio::task::spawn_blocking(move || capsule_on_tty(&s2, &["create", "tty-1"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{tty}");
    assert!(
        tty.contains("creating tty-1"),
        "no progress line on the terminal: {tty:?}"
    );
    assert!(tty.ends_with("\r\x1b[2K"), "the progress line was not erased: {tty:?}");
    assert!(stdout.starts_with("created capsule tty-1 "), "{stdout:?}");
    assert!(!stdout.contains("creating"), "progress on stdout: {stdout:?}");

    // --json: no progress even on a terminal; stdout is the JSON record alone.
    let s3 = Server {
        url: s.url.clone(),
        owner: s.owner.clone(),
        operator: s.operator.clone(),
    };
    let (code, stdout, tty) = tokio::task::spawn_blocking(move || capsule_on_tty(&s3, &["--json", "create", "tty-2"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{tty}");
    assert!(tty.is_empty(), "--json drew on the terminal: {tty:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["name"], "tty-2");

    // Not a terminal: nothing on stderr.
    let o = capsule(&s, &s.owner, &["create", "tty-3"], None).await;
    ok(&o, "create tty-3");
    assert!(o.stderr.is_empty(), "stderr is not a terminal, yet: {:?}", o.stderr);

    // Wake shows one too.
    ok(&capsule(&s, &s.owner, &["sleep", "tty-1"], None).await, "sleep");
    let s4 = Server {
        url: s.url.clone(),
        owner: s.owner.clone(),
        operator: s.operator.clone(),
    };
    let (code, stdout, tty) = tokio::task::spawn_blocking(move || capsule_on_tty(&s4, &["wake", "tty-1"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{tty}");
    assert!(tty.contains("waking tty-1"), "{tty:?}");
    assert!(stdout.contains("tty-1"), "{stdout:?}");
}
