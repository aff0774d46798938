//! Exec round trip and stdout throughput over a unix socket, against a raw socket copy.

use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use capsules_agent::client::{AgentClient, ClientOptions, ExecEvent};
use capsules_agent::proto::ExecRequest;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::AsyncReadExt;

const BYTES: u64 = 200 * 1024 * 1024;

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsules-agent"))
        .args(["serve", "--unix"])
        .arg(&sock)
        .arg("--root")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        AgentClient::handshake(s, 1, ClientOptions::default()).await.unwrap()
    });

    c.bench_function("exec_true_round_trip", |b| {
        b.to_async(&rt)
            .iter(|| async { client.run(req(&["true"])).await.unwrap() })
    });

    let mut g = c.benchmark_group("stdout_200MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BYTES));
    g.bench_function("agent_exec", |b| {
        b.to_async(&rt).iter(|| async {
            let mut call = client
                .exec(req(&["head", "-c", &BYTES.to_string(), "/dev/zero"]))
                .await
                .unwrap();
            let mut n = 0u64;
            while let Some(ev) = call.next().await.unwrap() {
                match ev {
                    ExecEvent::Stdout(b) => n += b.len() as u64,
                    ExecEvent::Exit(_) => break,
                    ExecEvent::Stderr(_) => {}
                }
            }
            assert_eq!(n, BYTES);
        })
    });
    g.bench_function("raw_unix_socket", |b| {
        b.to_async(&rt).iter(|| async {
            let (a, bside) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut p = Command::new("head")
                .args(["-c", &BYTES.to_string(), "/dev/zero"])
                .stdout(Stdio::from(OwnedFd::from(a)))
                .spawn()
                .unwrap();
            bside.set_nonblocking(true).unwrap();
            let mut r = tokio::net::UnixStream::from_std(bside).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            p.wait().unwrap();
            assert_eq!(n, BYTES);
        })
    });
    g.finish();
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(10));
}

criterion_group!(benches, bench);
criterion_main!(benches);
