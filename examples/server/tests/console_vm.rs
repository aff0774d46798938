//! The web console's terminal on a REAL capsule (QEMU): xterm.js in headless Chromium, through
//! the console WebSocket, to the capsule's PTY.
//!
//! A real-VM target (`test = false`; `scripts/test.sh` runs it explicitly, as root). The process
//! first moves into a network namespace of its own, so the server, the browser and the capsule's
//! tap live there and nothing reaches the host's network. Reported ignored (with the reason) when
//! root, QEMU, nftables, Chromium, chromedriver, the built assets, or the server's console
//! WebSocket route are missing.

mod browser;

use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

type R = Result<(), String>;

const CASE: &str = "terminal_echo_resize_and_ctrl_c";
const TABLE: &str = "capsules_console_vm";
const TAP_PREFIX: &str = "cpc";

fn missing() -> Option<String> {
    if !cfg!(feature = "qemu") {
        return Some("built without the qemu feature".into());
    }
    let has_console = capsules_server::route_table()
        .iter()
        .any(|(m, p)| m == axum::http::Method::POST && *p == "/v1/capsules/{capsule}/console/ticket");
    if !has_console {
        return Some("the server has no console WebSocket yet (POST /v1/capsules/{capsule}/console/ticket)".into());
    }
    #[cfg(feature = "qemu")]
    if let Err(why) = capsules_microvm::testing::check_prerequisites(capsules_microvm::testing::QEMU_TOOLS) {
        return Some(why);
    }
    browser::prerequisites(&capsules_server::webconsole::default_dir()).err()
}

#[cfg(feature = "qemu")]
async fn real_server(state: &std::path::Path) -> Result<(String, String, capsules_core::Capsules), String> {
    use capsules_backend_qemu::{QemuConfig, QemuVmm};
    use capsules_microvm::backend::MicroVmBackend;
    use capsules_microvm::net::{NetConfig, Network};
    let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let net = Network::new(
        NetConfig::from_env()
            .map_err(|e| e.to_string())?
            .with_table(TABLE)
            .with_tap_prefix(TAP_PREFIX),
    )
    .await
    .map_err(|e| e.to_string())?;
    let backend = MicroVmBackend::builder(vmm)
        .state_dir(state)
        .network(Arc::new(net))
        .build()
        .await
        .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
    let capsules = capsules_core::Capsules::builder()
        .backend(backend)
        .store(capsules_core::MemoryStore::new())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let boot = capsules.bootstrap("acme").await.map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = capsules_server::app(capsules.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((
        format!("http://{addr}"),
        boot.owner.secret.expose().to_owned(),
        capsules,
    ))
}

#[cfg(not(feature = "qemu"))]
async fn real_server(_: &std::path::Path) -> Result<(String, String, capsules_core::Capsules), String> {
    Err("built without the qemu feature".into())
}

async fn terminal_case() -> R {
    let state = tempfile::Builder::new()
        .prefix("capsules-console-vm-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    // The VMM runs as an unprivileged user that must reach the state directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o711)).map_err(|e| e.to_string())?;
    let (url, owner, capsules) = real_server(state.path()).await?;
    let client = capsules.connect(&owner).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let cap = client
        .create("term-1")
        .image("small")
        .await
        .map_err(|e| format!("create: {e}"))?;
    eprintln!("  capsule running after {:?}", t0.elapsed());
    let result = drive(&url, &owner).await;
    let _ = cap.terminate().await;
    result
}

async fn drive(url: &str, owner: &str) -> R {
    let driver = browser::Driver::start().await?;
    let b = driver.session(1200, 800).await?;
    let r = browser::terminal_checks(&b, url, owner, "term-1", 120, false).await;
    let shot = b.screenshot("terminal_on_a_real_capsule").await;
    b.quit().await;
    r?;
    shot.map(drop)
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    if let Some(why) = missing() {
        eprintln!("console_vm: ignored: {why}");
        let t = Trial::test(CASE, || Ok(())).with_ignored_flag(true).with_kind(why);
        libtest_mimic::run(&args, vec![t]).exit();
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let trial = Trial::test(CASE, || {
        let rt = tokio::runtime::Runtime::new().map_err(|e| Failed::from(e.to_string()))?;
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(900), terminal_case()).await })
            .map_err(|_| Failed::from("timed out after 900 s"))?
            .map_err(Failed::from)
    });
    libtest_mimic::run(&args, vec![trial]).exit();
}
