//! `capsule-mcp` driven by a real MCP client (the official `mcp` Python SDK, `tests/client.py`)
//! against the HTTP API in-process on the mock backend. Without `python3 -c "import mcp"` the test
//! is reported ignored, with the reason.

use std::process::{Command, Stdio};

use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};
use libtest_mimic::{Arguments, Failed, Trial};

const NAME: &str = "mcp_client_end_to_end";

fn main() {
    let args = Arguments::from_args();
    let have_mcp = Command::new("python3")
        .args(["-c", "import mcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let trial = if have_mcp {
        Trial::test(NAME, end_to_end)
    } else {
        Trial::test(NAME, || Ok(()))
            .with_ignored_flag(true)
            .with_kind("needs `python3 -c \"import mcp\"` (scripts/setup.sh installs it)")
    };
    if !have_mcp {
        eprintln!("{NAME}: ignored: python3 cannot `import mcp` (pip install \"mcp>=1,<2\")");
    }
    libtest_mimic::run(&args, vec![trial]).exit();
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

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_capsule-mcp"))
        .env("CAPSULE_API", &url)
        .env("CAPSULE_TOKEN", &agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
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
