//! Shared by the MCP test targets: the `capsules-server` binary as a child process (started,
//! killed by PID, started again on the same port and state), an `agent:write` token for `agent-`,
//! and the Python MCP client script.

#![allow(dead_code, reason = "each test target uses a part")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use capsules_core::{Scope, TokenSpec};

/// Whether the official MCP SDK is importable.
pub fn have_python_mcp() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import mcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `capsules-server` binary beside this test's directory (`target/<profile>/`), which
/// `cargo test --workspace` and `cargo build -p capsules-server` build. `CAPSULES_SERVER_BIN`
/// overrides.
pub fn server_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CAPSULES_SERVER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test> -> target/<profile>/capsules-server
    let dir = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let bin = dir.join("capsules-server");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing; build it first: cargo build -p capsules-server",
            bin.display()
        ))
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `capsules-server` process; killed (SIGKILL) on drop.
pub struct Server {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts `capsules-server --backend BACKEND` on `addr` with `state` and waits until it
    /// answers (and `bootstrap.json` is written).
    pub async fn start(
        bin: &Path,
        backend: &str,
        addr: SocketAddr,
        state: &Path,
        wait: Duration,
    ) -> Result<Self, String> {
        let log = state.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new(bin)
            .args(["--backend", backend, "--listen", &addr.to_string(), "--state-dir"])
            .arg(state)
            .env_remove("CAPSULES_BACKEND")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
        let mut s = Server {
            child,
            addr,
            state: state.to_owned(),
            log,
        };
        let deadline = Instant::now() + wait;
        loop {
            if state.join("bootstrap.json").is_file() && tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(s);
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!("the server exited ({st}): {}", s.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("the server did not answer within {wait:?}: {}", s.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// kill -9 by PID, then reaps it.
    pub async fn kill9(mut self) -> Result<(), String> {
        let pid = self.pid().ok_or("the server already exited")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill -9 {pid}: {e}"))?;
        self.child.wait().await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Stops it with SIGTERM (the way an operator would), SIGKILL after 20 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The owner token from `bootstrap.json`.
    pub fn owner_token(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(self.state.join("bootstrap.json")).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        v["owner_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "bootstrap.json has no owner_token".to_owned())
    }

    /// Mints an `agent:write` token limited to names starting with `agent-`.
    pub async fn agent_token(&self) -> Result<String, String> {
        let owner = self.owner_token()?;
        let api = capsules_client::Capsules::new(self.url()).map_err(|e| e.to_string())?;
        Ok(api
            .tokens(&owner)
            .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
            .await
            .map_err(|e| e.to_string())?
            .secret)
    }
}

/// `python3 tests/client.py <capsule-mcp> <mode>` with the API and token in its environment.
pub fn client_script(mode: &str, url: &str, token: &str) -> std::io::Result<tokio::process::Child> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client.py");
    tokio::process::Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_capsule-mcp"))
        .arg(mode)
        .env("CAPSULE_API", url)
        .env("CAPSULE_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
}
