//! The console WebSocket on a real QEMU capsule, through the server (in-process, on a loopback
//! port) and `capsules-client`'s console.
//!
//! A real-VM target (`test = false`; `scripts/test.sh` runs it explicitly). The process first
//! moves into a network namespace of its own (the server listens on that namespace's loopback;
//! the capsule has no network device). One `1x1gb` capsule of the `small` image, one hard
//! timeout, terminated afterwards even when a step fails. A missing prerequisite (root, QEMU, the
//! guest assets) reports the case as ignored with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_client::{ConsoleEvent, ConsoleReceiver};
use capsules_core::{Backend, Capsules, MemoryStore};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::MicroVmBackend;
use libtest_mimic::{Arguments, Failed, Trial};
use nix::sched::{CloneFlags, unshare};

const CASE: &str = "console_over_the_websocket_on_qemu";

type R = Result<(), String>;

/// Reads output until it contains `needle`, within `d`; returns what it saw.
async fn until(rx: &mut ConsoleReceiver, needle: &str, d: Duration) -> Result<String, String> {
    let mut seen = String::new();
    let r = tokio::time::timeout(d, async {
        loop {
            match rx.next().await {
                Some(Ok(ConsoleEvent::Output(b))) => {
                    seen.push_str(&String::from_utf8_lossy(&b));
                    if seen.contains(needle) {
                        return Ok(());
                    }
                }
                other => return Err(format!("{other:?}")),
            }
        }
    })
    .await;
    match r {
        Ok(Ok(())) => Ok(seen),
        Ok(Err(other)) => Err(format!("expected output with {needle:?}, got {other}; saw {seen:?}")),
        Err(_) => Err(format!("no {needle:?} within {d:?}; saw {seen:?}")),
    }
}

async fn case(url: &str, owner: &str, scale: u32) -> R {
    let s = |n: u64| Duration::from_secs(n * u64::from(scale));
    let c = capsules_client::Capsules::new(url)
        .and_then(|a| a.connect(owner))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let cap = c
        .create("vm-console-1")
        .image("small")
        .await
        .map_err(|e| format!("create: {}", e.chain()))?;
    eprintln!("  created in {:?}", t0.elapsed());
    let r = steps(&cap, &s).await;
    let _ = cap.terminate().await;
    r
}

async fn steps(cap: &capsules_client::CapsuleHandle, s: &dyn Fn(u64) -> Duration) -> R {
    let (tx, mut rx) = cap
        .console(80, 24)
        .await
        .map_err(|e| format!("console: {}", e.chain()))?
        .split();
    let w = |b: &'static [u8]| {
        let tx = tx.clone();
        async move { tx.write(b).await.map_err(|e| e.to_string()) }
    };
    // The shell is up once it runs a command (the echoed line has `$((...))`, the output the sum).
    w(b"echo ready-$((1+1))\r").await?;
    until(&mut rx, "ready-2", s(30)).await?;

    w(b"echo hello-$((6*7))\r").await?;
    until(&mut rx, "hello-42", s(10)).await?;

    tx.resize(120, 50).await.map_err(|e| e.to_string())?;
    w(b"stty size\r").await?;
    until(&mut rx, "50 120", s(10)).await?;

    // Ctrl-C reaches the foreground `sleep`: the shell answers again within a few seconds.
    w(b"sleep 100\r").await?;
    tokio::time::sleep(s(1)).await;
    let t = Instant::now();
    w(b"\x03").await?;
    w(b"echo back-$((2+3))\r").await?;
    until(&mut rx, "back-5", s(5)).await?;
    eprintln!("  prompt back {:?} after Ctrl-C", t.elapsed());

    w(b"exit 3\r").await?;
    let end = tokio::time::timeout(s(10), async {
        loop {
            match rx.next().await {
                Some(Ok(ConsoleEvent::Output(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| "no exit frame within the deadline".to_owned())?;
    match end {
        Some(Ok(ConsoleEvent::Exit(3))) => {}
        other => return Err(format!("expected the exit frame with code 3, got {other:?}")),
    }

    // Audited: attached, then detached once the session is gone.
    let deadline = Instant::now() + s(5);
    loop {
        let kinds: Vec<String> = cap
            .events()
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|e| e.kind().name().to_owned())
            .collect();
        if kinds.iter().any(|k| k == "console_attached") && kinds.iter().any(|k| k == "console_detached") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no console_attached/console_detached events: {kinds:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let ignored = |why: String| vec![Trial::test(CASE, || Ok(())).with_ignored_flag(true).with_kind(why)];
    if let Err(why) = capsules_microvm::testing::check_prerequisites(&capsules_microvm::testing::QEMU_TOOLS[..1]) {
        libtest_mimic::run(&args, ignored(why)).exit();
    }
    // Everything below (the server's socket included) lives in a namespace this test made.
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();

    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let state = tempfile::Builder::new()
        .prefix("capsules-vm-console-")
        .tempdir()
        .expect("a temp state dir");
    let setup = rt.block_on(async {
        capsules_microvm::testing::ensure_assets(&[BaseImage::Small]).await?;
        let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let backend = MicroVmBackend::builder(vmm)
            .state_dir(state.path())
            .build()
            .await
            .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
        Ok::<_, String>(backend)
    });
    let backend = match setup {
        Ok(b) => Arc::new(b),
        Err(why) => libtest_mimic::run(&args, ignored(why)).exit(),
    };
    eprintln!("backend: {:?}", backend.info());
    let scale = capsules_core::testkit::backend::time_scale(backend.as_ref());

    let trial = Trial::test(CASE, move || {
        rt.block_on(async move {
            let capsules = Capsules::builder()
                .backend(backend.clone())
                .store(MemoryStore::new())
                .build()
                .await
                .map_err(|e| Failed::from(e.to_string()))?;
            let boot = capsules
                .bootstrap("acme")
                .await
                .map_err(|e| Failed::from(e.to_string()))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| Failed::from(e.to_string()))?;
            let url = format!(
                "http://{}",
                listener.local_addr().map_err(|e| Failed::from(e.to_string()))?
            );
            let server = tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await });
            let limit = Duration::from_secs(300) * scale.max(1);
            let r = tokio::time::timeout(limit, case(&url, boot.owner.secret.expose(), scale))
                .await
                .unwrap_or_else(|_| Err(format!("the case took longer than {limit:?}")));
            server.abort();
            // Whatever happened above, no VM outlives the case.
            for c in backend.list().await.unwrap_or_default() {
                if let Err(e) = backend.terminate(&c.id).await {
                    eprintln!("  cleanup: could not terminate {}: {e}", c.id);
                }
            }
            r.map_err(Failed::from)
        })
    });
    let conclusion = libtest_mimic::run(&args, vec![trial]);
    drop(state);
    conclusion.exit();
}
