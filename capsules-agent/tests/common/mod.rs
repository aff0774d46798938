//! Runs the real `capsules-agent serve --unix` binary for tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsules_agent::client::{AgentClient, ClientOptions};
use capsules_agent::proto::ExecRequest;

pub struct TestAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub root: PathBuf,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let root = dir.path().join("ws");
        std::fs::create_dir_all(&root).unwrap();
        let bin = std::env::var("CAPSULES_AGENT_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_capsules-agent").to_string());
        let mut child = Command::new(bin)
            .args(["serve", "--unix"])
            .arg(&sock)
            .arg("--root")
            .arg(&root)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim_end(),
            format!("capsules-agent: ready v{}", capsules_agent::PROTOCOL_VERSION)
        );
        TestAgent { child, dir, sock, root }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub async fn client(&self, epoch: u64) -> AgentClient {
        self.client_with(epoch, ClientOptions::default()).await
    }

    pub async fn client_with(&self, epoch: u64, opts: ClientOptions) -> AgentClient {
        let s = tokio::net::UnixStream::connect(&self.sock).await.unwrap();
        AgentClient::handshake(s, epoch, opts).await.unwrap()
    }

    /// (pid, state, cmdline) of every descendant of the agent.
    pub fn descendants(&self) -> Vec<(i32, char, String)> {
        let mut parent = HashMap::new();
        let mut info = HashMap::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else { continue };
            let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
            let state = rest[0].chars().next().unwrap_or('?');
            let ppid: i32 = rest[1].parse().unwrap_or(0);
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            parent.insert(pid, ppid);
            info.insert(pid, (state, cmd));
        }
        let me = self.pid();
        let mut out = Vec::new();
        for (&pid, (state, cmd)) in &info {
            let mut p = pid;
            let mut depth = 0;
            while let Some(&pp) = parent.get(&p) {
                if pp == me {
                    out.push((pid, *state, cmd.clone()));
                    break;
                }
                p = pp;
                depth += 1;
                if depth > 64 || pp <= 1 {
                    break;
                }
            }
        }
        out
    }

    /// Poll until `f` holds or `within` passes.
    pub fn eventually(&self, within: Duration, mut f: impl FnMut(&TestAgent) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if f(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f(self)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}
