//! `capsule-mcp` driven by a real MCP client (the official `mcp` Python SDK, `tests/client.py`)
//! against the HTTP API on the mock backend: in-process, and as the `capsules-server` process that
//! is killed (kill -9) in the middle of a call and started again. Without `python3 -c "import mcp"`
//! (or without the server binary, for the second) a test is reported ignored, with the reason.

mod common;

use std::time::Duration;

use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};
use libtest_mimic::{Arguments, Failed, Trial};

const NAME: &str = "mcp_client_end_to_end";
const KILLED: &str = "mcp_server_process_killed_mid_call";
const HTTP: &str = "mcp_streamable_http";

fn ignored(name: &str, why: String) -> Trial {
    eprintln!("{name}: ignored: {why}");
    Trial::test(name, || Ok(())).with_ignored_flag(true).with_kind(why)
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    if common::have_python_mcp() {
        trials.push(Trial::test(NAME, end_to_end));
        trials.push(Trial::test(HTTP, over_http));
        trials.push(match common::server_binary() {
            Ok(bin) => Trial::test(KILLED, move || killed_mid_call(&bin)),
            Err(why) => ignored(KILLED, why),
        });
    } else {
        let why = "python3 cannot `import mcp` (pip install \"mcp>=1,<2\"; scripts/setup.sh installs it)";
        trials.push(ignored(NAME, why.to_owned()));
        trials.push(ignored(KILLED, why.to_owned()));
        trials.push(ignored(HTTP, why.to_owned()));
    }
    libtest_mimic::run(&args, trials).exit();
}

/// `capsule-mcp --http 127.0.0.1:PORT` serves the same tools over streamable HTTP at `/mcp`.
fn over_http() -> Result<(), Failed> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let capsules = Capsules::builder()
            .backend(MockBackend::new())
            .store(MemoryStore::new())
            .build()
            .await?;
        let owner = capsules.bootstrap("acme").await?.owner.secret.expose().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = serve(capsules.clone(), listener).await;
        let agent = capsules_client::Capsules::new(&url)?
            .tokens(&owner)
            .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
            .await?
            .secret;
        let port = common::free_port()?;
        let mut mcp = tokio::process::Command::new(env!("CARGO_BIN_EXE_capsule-mcp"))
            .args(["--http", &format!("127.0.0.1:{port}")])
            .env("CAPSULE_API", &url)
            .env("CAPSULE_TOKEN", &agent)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(st) = mcp.try_wait()? {
                return Err(format!("capsule-mcp --http exited: {st}").into());
            }
            if std::time::Instant::now() > deadline {
                return Err("capsule-mcp --http did not listen within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = tokio::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client.py"))
            .arg(env!("CARGO_BIN_EXE_capsule-mcp"))
            .arg("http")
            .env("CAPSULE_MCP_URL", format!("http://127.0.0.1:{port}/mcp"))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .map_err(|_| "client.py http took longer than 60 s")??;
        let _ = mcp.kill().await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.lines().any(|l| l.trim() == "OK") {
            server.stop().await;
            return Err(format!("client.py http failed ({}): {stdout}", out.status).into());
        }
        // Through the API: the capsule was made (and terminated), the refused one was not.
        let all = capsules_client::Capsules::new(&url)?
            .connect(&owner)?
            .list_with(capsules_client::ListOptions {
                include_terminated: true,
            })
            .await?;
        server.stop().await;
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        if !names.contains(&"agent-http-1") || names.contains(&"other-http") {
            return Err(format!("capsules after the HTTP session: {names:?}").into());
        }
        Ok(())
    })
}

/// The server process (mock backend, SQLite store) is killed with SIGKILL while `exec sleep 5`
/// is in flight: the tool call returns an error that says the API is unreachable, the MCP server
/// keeps serving, and once the server is started again on the same port and state directory the
/// next calls work.
fn killed_mid_call(bin: &std::path::Path) -> Result<(), Failed> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("state");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port()?).parse()?;
        let wait = Duration::from_secs(60);
        let mut server = Some(common::Server::start(bin, "mock", addr, &state, wait).await?);
        let token = server.as_ref().ok_or("no server")?.agent_token().await?;
        let url = format!("http://{addr}");
        let mut child = common::client_script("killed", &url, &token)?;
        let mut to_script = child.stdin.take().ok_or("no stdin")?;
        let from_script = child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(from_script));
        let (mut killed, mut saw_error, mut saw_ok) = (false, false, false);
        let session = async {
            while let Some(line) = lines.next_line().await? {
                eprintln!("client.py: {line}");
                match line.trim() {
                    "SLOW" => {
                        // Let the exec reach the server, then kill it by PID.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        if let Some(s) = server.take() {
                            s.kill9().await?;
                            killed = true;
                        }
                    }
                    "DOWN" => {
                        let s = common::Server::start(bin, "mock", addr, &state, wait).await?;
                        server = Some(s);
                        tokio::io::AsyncWriteExt::write_all(&mut to_script, b"STARTED\n").await?;
                    }
                    "OK" => saw_ok = true,
                    l if l.starts_with("ERROR ") => saw_error = true,
                    _ => {}
                }
            }
            Ok::<_, Failed>(())
        };
        tokio::time::timeout(Duration::from_secs(120), session)
            .await
            .map_err(|_| "client.py took longer than 120 s")??;
        let status = child.wait().await?;
        if let Some(s) = server.take() {
            s.stop().await;
        }
        if !status.success() {
            return Err(format!("client.py failed: {status}").into());
        }
        if !(killed && saw_error && saw_ok) {
            return Err(format!("killed {killed}, error seen {saw_error}, OK {saw_ok}").into());
        }
        Ok(())
    })
}

/// The HTTP server on `addr`, stoppable: graceful shutdown closes idle keep-alive connections.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn serve(capsules: Capsules, listener: tokio::net::TcpListener) -> Running {
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        axum::serve(listener, capsules_server::app(capsules))
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running { stop, done }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap();
    }
}

fn end_to_end() -> Result<(), Failed> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Failed> {
    let mock = MockBackend::new();
    let mut big = b"HEAD-MARK".to_vec();
    big.extend(std::iter::repeat_n(b'x', 5_000_000));
    big.extend_from_slice(b"TAIL-MARK");
    mock.on_exec(
        ExecMatcher::exact(["big-output"]),
        ExecReply::new().stdout(big).exit_code(0),
    );
    let capsules = Capsules::builder()
        .backend(mock.clone())
        .store(MemoryStore::new())
        .build()
        .await?;
    let boot = capsules.bootstrap("acme").await?;
    let owner = boot.owner.secret.expose().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let mut server = Some(serve(capsules.clone(), listener).await);
    let api = capsules_client::Capsules::new(&url)?;
    let agent = api
        .tokens(&owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await?
        .secret;

    let mut child = common::client_script("mock", &url, &agent)?;
    let mut to_script = child.stdin.take().ok_or("no stdin")?;
    let from_script = child.stdout.take().ok_or("no stdout")?;
    // The script asks for the server to stop and start again with lines on its stdout.
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(from_script));
    let mut saw_ok = false;
    let session = async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("client.py: {line}");
            match line.trim() {
                "STOP" => {
                    if let Some(s) = server.take() {
                        s.stop().await;
                    }
                    tokio::io::AsyncWriteExt::write_all(&mut to_script, b"STOPPED\n").await?;
                }
                "START" => {
                    let l = tokio::net::TcpListener::bind(addr).await?;
                    server = Some(serve(capsules.clone(), l).await);
                    tokio::io::AsyncWriteExt::write_all(&mut to_script, b"STARTED\n").await?;
                }
                "OK" => saw_ok = true,
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), session)
        .await
        .map_err(|_| "client.py took longer than 120 s")??;
    let status = child.wait().await?;
    if !status.success() {
        return Err(format!("client.py failed: {status}").into());
    }
    if !saw_ok {
        return Err("client.py ended without OK".into());
    }

    // Checked through the API, not the MCP server: the refused create made no capsule.
    let owner_client = api.connect(&owner)?;
    let all = owner_client
        .list_with(capsules_client::ListOptions {
            include_terminated: true,
        })
        .await?;
    let names: Vec<String> = all.iter().map(|r| r.name.as_str().to_owned()).collect();
    if names.iter().any(|n| n == "other-1") {
        return Err(format!("other-1 exists: {names:?}").into());
    }
    if !names.iter().any(|n| n == "agent-mcp-1") {
        return Err(format!("agent-mcp-1 is missing: {names:?}").into());
    }
    Ok(())
}
