//! Tool call round trip of `exec true` through `capsule-mcp` (one MCP session over stdio, JSON-RPC
//! `tools/call`) beside the same call through the `capsule` CLI (`capsule exec NAME -- true`, one
//! process per call, as an agent shelling out would run it) and, as the floor, through the client
//! library in-process. The HTTP API runs in this process on the mock backend.
//!
//! The CLI binary is taken from beside this bench's directory (`cargo build --release -p
//! capsules-cli`, or `CAPSULE_CLI_BIN`); without it that bench is skipped with a message.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};
use criterion::Criterion;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NAME: &str = "agent-bench";

fn cli_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAPSULE_CLI_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("capsule");
    bin.is_file().then_some(bin)
}

/// A `capsule-mcp` child and its stdio, past `initialize`.
struct Mcp {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl Mcp {
    async fn start(url: &str, token: &str) -> Mcp {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capsule-mcp"))
            .env("CAPSULE_API", url)
            .env("CAPSULE_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start capsule-mcp");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut m = Mcp {
            _child: child,
            stdin,
            lines,
            next_id: 1,
        };
        let init = m
            .call(
                "initialize",
                json!({
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "round-trip-bench", "version": "0"},
                }),
            )
            .await;
        assert!(init.get("result").is_some(), "initialize: {init}");
        m.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        m
    }

    async fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.stdin.write_all(&line).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = self.lines.next_line().await.unwrap().expect("capsule-mcp ended");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }

    async fn exec_true(&mut self) {
        let r = self
            .call(
                "tools/call",
                json!({"name": "exec", "arguments": {"name": NAME, "argv": ["true"]}}),
            )
            .await;
        let result = &r["result"];
        assert_eq!(result["isError"], json!(false), "exec true: {r}");
    }
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, token) = rt.block_on(async {
        let capsules = Capsules::builder()
            .backend(MockBackend::new())
            .store(MemoryStore::new())
            .build()
            .await
            .unwrap();
        let boot = capsules.bootstrap("acme").await.unwrap();
        let owner = boot.owner.secret.expose().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // As the capsules-server binary does: streamed exec output is not held back by Nagle.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await });
        let api = capsules_client::Capsules::new(&url).unwrap();
        let token = api
            .tokens(&owner)
            .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
            .await
            .unwrap()
            .secret;
        api.connect(&token).unwrap().create(NAME).await.unwrap();
        (url, token)
    });
    let client = capsules_client::Capsules::new(&url).unwrap().connect(&token).unwrap();
    let mut mcp = rt.block_on(Mcp::start(&url, &token));
    let cli = cli_binary();

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group("exec_true_round_trip");
    let mut medians = Vec::new();
    let mut time = |label: &'static str, d: Vec<Duration>| {
        let mut d = d;
        d.sort();
        medians.push((label, d[d.len() / 2]));
    };

    let mut lib = Vec::new();
    g.bench_function("client_library", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    let o = client.capsule(NAME).unwrap().exec(["true"]).await.unwrap();
                    assert_eq!(o.exit_code(), 0);
                    lib.push(t.elapsed());
                }
                t0.elapsed()
            })
        })
    });
    time("client library (in-process HTTP)", lib);

    let mut via_mcp = Vec::new();
    g.bench_function("mcp_tools_call", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    mcp.exec_true().await;
                    via_mcp.push(t.elapsed());
                }
                t0.elapsed()
            })
        })
    });
    time("MCP tools/call exec (capsule-mcp, stdio)", via_mcp);

    match &cli {
        Some(bin) => {
            let mut via_cli = Vec::new();
            g.bench_function("cli_process", |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let t0 = Instant::now();
                        for _ in 0..iters {
                            let t = Instant::now();
                            let st = tokio::process::Command::new(bin)
                                .args(["exec", NAME, "--", "true"])
                                .env("CAPSULE_API", &url)
                                .env("CAPSULE_TOKEN", &token)
                                .stdin(Stdio::null())
                                .stdout(Stdio::null())
                                .status()
                                .await
                                .unwrap();
                            assert!(st.success(), "capsule exec: {st}");
                            via_cli.push(t.elapsed());
                        }
                        t0.elapsed()
                    })
                })
            });
            time("CLI process (capsule exec -- true)", via_cli);
        }
        None => eprintln!(
            "cli_process skipped: no `capsule` binary beside this bench (cargo build --release -p capsules-cli, or set CAPSULE_CLI_BIN)"
        ),
    }
    g.finish();
    c.final_summary();

    println!("\nexec `true` round trip, medians of every measured call (mock backend):");
    for (label, d) in &medians {
        println!("  {label:<44} {:>8.3} ms", d.as_secs_f64() * 1e3);
    }
    let get = |prefix: &str| medians.iter().find(|(l, _)| l.starts_with(prefix)).map(|(_, d)| *d);
    if let (Some(m), Some(c)) = (get("MCP"), get("CLI")) {
        println!("  MCP / CLI = {:.2}", m.as_secs_f64() / c.as_secs_f64());
    }
    if let (Some(m), Some(l)) = (get("MCP"), get("client")) {
        println!("  MCP / client library = {:.2}", m.as_secs_f64() / l.as_secs_f64());
    }
}
