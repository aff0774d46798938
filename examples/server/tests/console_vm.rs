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
use serde_json::{Value, json};

type R = Result<(), String>;

const CASE: &str = "terminal_echo_resize_and_ctrl_c";
const TABLE: &str = "capsules_console_vm";
const TAP_PREFIX: &str = "cpc";

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

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
    browser::prerequisites(&capsules_server::console::default_dir()).err()
}

/// The terminal's visible text (xterm's DOM renderer: one element per row).
async fn screen(b: &browser::Session) -> Result<String, String> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#terminal .xterm-rows > div')].map(r => r.textContent.replace(/\\u00a0/g, ' ')).join('\\n')",
            json!([]),
        )
        .await?;
    Ok(v.as_str().unwrap_or("").to_owned())
}

async fn wait_screen(b: &browser::Session, what: &str, secs: u64, f: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = screen(b).await?;
        if f(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {secs} s waiting for {what}; the terminal shows:\n{s}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn type_line(b: &browser::Session, line: &str) -> R {
    b.type_into("#terminal textarea.xterm-helper-textarea", &format!("{line}\u{E007}"))
        .await
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
    let r = async {
        b.sign_in(url, owner).await?;
        b.goto(&format!("{url}/console/#/capsules/term-1/terminal")).await?;
        b.wait_text("#term-status", "connected", 120).await?;
        // The shell's prompt.
        wait_screen(&b, "a prompt", 120, |s| s.contains('$') || s.contains('#')).await?;

        type_line(&b, "echo hello-$((6*7))").await?;
        wait_screen(&b, "hello-42", 60, |s| s.lines().any(|l| l.trim() == "hello-42")).await?;

        // Resize the window: the fit addon resizes the terminal; the PTY follows.
        let before: Value = b
            .js(
                "const t = document.querySelector('#terminal'); return [t.dataset.cols, t.dataset.rows]",
                json!([]),
            )
            .await?;
        b.set_window(900, 560).await?;
        let after = b
            .wait_for("the terminal to take the new size", 10, || async {
                let v = b
                    .js(
                        "const t = document.querySelector('#terminal'); return [t.dataset.cols, t.dataset.rows]",
                        json!([]),
                    )
                    .await?;
                Ok((v != before).then_some(v))
            })
            .await?;
        let (cols, rows) = (after[0].as_str().unwrap_or(""), after[1].as_str().unwrap_or(""));
        let want = format!("{rows} {cols}");
        // Clear first so an older `stty size` line cannot match.
        type_line(&b, "clear; stty size").await?;
        wait_screen(&b, &format!("stty size = {want}"), 60, |s| {
            s.lines().any(|l| l.trim() == want)
        })
        .await?;

        // Ctrl-C reaches the foreground program: sleep ends, the prompt takes commands again.
        type_line(&b, "sleep 100").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        b.keys(vec![
            json!({"type": "keyDown", "value": "\u{E009}"}),
            json!({"type": "keyDown", "value": "c"}),
            json!({"type": "keyUp", "value": "c"}),
            json!({"type": "keyUp", "value": "\u{E009}"}),
        ])
        .await?;
        type_line(&b, "echo back-$((1+1))").await?;
        wait_screen(&b, "back-2 after Ctrl-C", 60, |s| {
            s.lines().any(|l| l.trim() == "back-2")
        })
        .await?;
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "the prompt came back only after {:?}",
            t.elapsed()
        );
        let s = screen(&b).await?;
        ensure!(s.contains("^C"), "no ^C echoed:\n{s}");
        Ok(())
    }
    .await;
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
