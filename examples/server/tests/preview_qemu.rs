//! The preview proxy on a real QEMU capsule (a real-VM target: `test = false`, run by
//! `scripts/test.sh`; a missing prerequisite reports the case as ignored with its reason).
//!
//! The whole process first moves into a network namespace of its own, where the server listens
//! on 127.0.0.1; requests carry `Host: <label>.localhost:<port>`. The capsule (`1x1gb`, the `full`
//! image, for python3) starts a background process right before it is put to sleep: it sleeps
//! 8 s and then serves HTTP and a WebSocket echo on port 8080. The guest's clocks stand still
//! while it sleeps (its wall clock is reset at wake, its monotonic clock is not), so that server
//! starts listening seconds after the wake. A preview request to the sleeping capsule wakes it
//! and is held until the port accepts: a 200, not a 502. A WebSocket upgrade through the same URL
//! follows the same token rules. The capsule is terminated afterwards, whatever happened.

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsules_backend_qemu::{QemuConfig, QemuVmm};
use capsules_core::backend::ExecRequest;
use capsules_core::{Backend, Capsules, MemoryStore};
use capsules_microvm::assets::BaseImage;
use capsules_microvm::backend::MicroVmBackend;
use capsules_server::{ServerConfig, app_with};
use futures::{SinkExt, StreamExt};
use libtest_mimic::{Arguments, Failed, Trial};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

const CASE: &str = "preview_wakes_a_sleeping_capsule_and_holds_until_its_server_listens";
const PORT: u16 = 8080;

/// An HTTP server with a WebSocket echo in python3's standard library: `GET` answers 200 with
/// the request line; `Upgrade: websocket` completes the handshake and echoes text and binary
/// messages.
const SERVER_PY: &str = r#"
import base64, hashlib, socket, struct, sys, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def exact(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b
def frame(op, data):
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack(">Q", n)
    return head + data
def websocket(c):
    while True:
        h = exact(c, 2)
        op, n = h[0] & 15, h[1] & 127
        if n == 126:
            n = struct.unpack(">H", exact(c, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", exact(c, 8))[0]
        mask = exact(c, 4) if h[1] & 128 else b"\0\0\0\0"
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(exact(c, n)))
        if op == 8:
            c.sendall(frame(8, b""))
            return
        if op in (1, 2):
            c.sendall(frame(op, data))
        elif op == 9:
            c.sendall(frame(10, data))
def serve(c):
    try:
        req = b""
        while b"\r\n\r\n" not in req:
            x = c.recv(65536)
            if not x:
                return
            req += x
        lines = req.split(b"\r\n\r\n")[0].decode().split("\r\n")
        h = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
        if h.get("upgrade", "").lower() == "websocket":
            acc = base64.b64encode(hashlib.sha1((h["sec-websocket-key"] + GUID).encode()).digest()).decode()
            c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       "Sec-WebSocket-Accept: " + acc + "\r\n\r\n").encode())
            websocket(c)
        else:
            body = ("hello from the capsule: " + lines[0] + "\n").encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    except Exception:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

type R = Result<(), String>;

fn sh(args: &[&str]) -> R {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

struct Ctx {
    capsules: Capsules,
    owner: String,
    addr: std::net::SocketAddr,
    scale: u32,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(600))
        .build()
        .expect("an HTTP client")
}

async fn case(ctx: &Ctx) -> R {
    let owner = ctx.capsules.connect(&ctx.owner).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let cap = owner
        .create("pv-qemu")
        .size("1x1gb")
        .image("full")
        .await
        .map_err(|e| format!("create: {e}"))?;
    eprintln!("  created in {:?}", t.elapsed());
    let url = cap.expose(PORT, "token").await.map_err(|e| format!("expose: {e}"))?;
    let host = format!("{}.localhost:{}", url.host_label, ctx.addr.port());
    cap.write_file("/workspace/srv.py", SERVER_PY)
        .await
        .map_err(|e| format!("write srv.py: {e}"))?;
    // Started right before the sleep: it waits 8 s of guest time, most of which passes after
    // the wake (the guest stands still while asleep).
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        "sleep 8; exec python3 /workspace/srv.py 8080 >/workspace/srv.log 2>&1",
    ]);
    req.cwd = Some("/workspace".into());
    cap.spawn(req).await.map_err(|e| format!("spawn: {e}"))?;
    let t = Instant::now();
    let rec = cap.sleep().await.map_err(|e| format!("sleep: {e}"))?;
    ensure!(rec.state.as_str() == "sleeping", "after sleep: {}", rec.state);
    eprintln!("  asleep in {:?}", t.elapsed());

    // No token: refused before anything wakes.
    let r = http()
        .get(format!("http://{}/", ctx.addr))
        .header("host", &host)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    ensure!(r.status() == 401, "no token: {}", r.status());
    let state = cap.status().await.map_err(|e| e.to_string())?.state;
    ensure!(state.as_str() == "sleeping", "a refused request woke it: {state}");

    // The held request: wakes it, waits for the server, answers 200.
    let t = Instant::now();
    let r = http()
        .get(format!("http://{}/woken?x=1", ctx.addr))
        .header("host", &host)
        .bearer_auth(&ctx.owner)
        .send()
        .await
        .map_err(|e| format!("the preview request: {e}"))?;
    let status = r.status();
    let body = r.text().await.map_err(|e| e.to_string())?;
    eprintln!(
        "  preview request to the sleeping capsule: {status} after {:?}",
        t.elapsed()
    );
    ensure!(status == 200, "the held request got {status}: {body}");
    ensure!(
        body == "hello from the capsule: GET /woken?x=1 HTTP/1.1\n",
        "body: {body:?}"
    );
    let state = cap.status().await.map_err(|e| e.to_string())?.state;
    ensure!(state.as_str() == "running", "after the request: {state}");

    // A WebSocket through the same URL: no token → 401; a preview token → echo.
    let ws_req = |token: Option<&str>| {
        let mut req = format!("ws://{}/ws", ctx.addr)
            .into_client_request()
            .expect("a ws request");
        req.headers_mut()
            .insert("host", HeaderValue::from_str(&host).expect("a host"));
        if let Some(t) = token {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).expect("a header"),
            );
        }
        req
    };
    let tcp = tokio::net::TcpStream::connect(ctx.addr)
        .await
        .map_err(|e| e.to_string())?;
    match tokio_tungstenite::client_async(ws_req(None), tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            ensure!(r.status() == 401, "ws without a token: {}", r.status())
        }
        Err(e) => return Err(format!("ws without a token: {e}")),
        Ok(_) => return Err("ws without a token was let through".into()),
    }
    let pt = cap
        .preview_token(Duration::from_secs(600))
        .await
        .map_err(|e| format!("preview token: {e}"))?;
    let tcp = tokio::net::TcpStream::connect(ctx.addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut ws, resp) = tokio_tungstenite::client_async(ws_req(Some(pt.secret.expose())), tcp)
        .await
        .map_err(|e| format!("ws with a preview token: {e}"))?;
    ensure!(resp.status() == 101, "ws: {}", resp.status());
    for m in [Message::text("ping"), Message::binary(vec![5u8; 100_000])] {
        ws.send(m.clone()).await.map_err(|e| e.to_string())?;
        let back = tokio::time::timeout(Duration::from_secs(30 * u64::from(ctx.scale)), ws.next())
            .await
            .map_err(|_| "no echo in time".to_owned())?
            .ok_or("the ws ended")?
            .map_err(|e| e.to_string())?;
        ensure!(back == m, "echo: {} bytes back for {}", back.len(), m.len());
    }
    let _ = ws.close(None).await;

    // The traffic was metered (at the end of each exchange).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u = cap.usage().await.map_err(|e| e.to_string())?;
        if u.usage.preview_bytes >= 200_000 {
            eprintln!("  metered {} preview bytes", u.usage.preview_bytes);
            break;
        }
        ensure!(Instant::now() < deadline, "preview bytes not metered: {:?}", u.usage);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn cleanup(ctx: &Ctx) {
    let Ok(c) = ctx.capsules.connect(&ctx.owner) else {
        return;
    };
    for rec in c.list().await.unwrap_or_default() {
        if let Ok(h) = c.capsule(rec.id.as_str())
            && let Err(e) = h.terminate().await
        {
            eprintln!("cleanup: terminate {}: {e}", rec.name);
        }
    }
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let ignore = |why: String| vec![Trial::test(CASE, || Ok(())).with_ignored_flag(true).with_kind(why)];
    let tools = [("qemu-system-x86_64", "qemu-system-x86"), ("ip", "iproute2")];
    if let Err(why) = capsules_microvm::testing::check_prerequisites(&tools) {
        libtest_mimic::run(&args, ignore(why)).exit();
    }
    // Everything from here on (the server's socket included) lives in a namespace of our own.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    sh(&["ip", "link", "set", "lo", "up"]).expect("lo up");

    let rt = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    let state = tempfile::Builder::new()
        .prefix("capsules-preview-qemu-")
        .tempdir()
        .expect("a temp state dir");
    let setup = rt.block_on(async {
        capsules_microvm::testing::ensure_assets(&[BaseImage::Full]).await?;
        let vmm = QemuVmm::new(QemuConfig::from_env().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let backend = MicroVmBackend::builder(vmm)
            .state_dir(state.path())
            .build()
            .await
            .map_err(|e| format!("could not build the QEMU backend: {e}"))?;
        let scale = if backend.info().accelerator == "tcg" { 5 } else { 1 };
        eprintln!("backend: {:?}", backend.info());
        let capsules = Capsules::builder()
            .backend(backend)
            .store(MemoryStore::new())
            .build()
            .await
            .map_err(|e| e.to_string())?;
        let boot = capsules.bootstrap("acme").await.map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let config = ServerConfig::default()
            .with_public_port(addr.port())
            .with_preview_hold(Duration::from_secs(60 * u64::from(scale)))
            .map_err(|e| e.to_string())?;
        let app = app_with(capsules.clone(), config);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok::<_, String>(Ctx {
            capsules,
            owner: boot.owner.secret.expose().to_owned(),
            addr,
            scale,
        })
    });
    let ctx = match setup {
        Ok(c) => Arc::new(c),
        Err(why) => libtest_mimic::run(&args, ignore(why)).exit(),
    };
    let (c, rt2) = (ctx.clone(), rt.clone());
    let trial = Trial::test(CASE, move || {
        let limit = Duration::from_secs(300 * u64::from(c.scale));
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            rt2.block_on(async {
                tokio::time::timeout(limit, case(&c))
                    .await
                    .unwrap_or_else(|_| Err(format!("the case took longer than {limit:?}")))
            })
        }));
        rt2.block_on(cleanup(&c));
        eprintln!("  {CASE}: {:?}", t0.elapsed());
        match r {
            Ok(r) => r.map_err(Failed::from),
            Err(_) => Err(Failed::from("panicked")),
        }
    });
    let conclusion = libtest_mimic::run(&args, vec![trial]);
    rt.block_on(cleanup(&ctx));
    drop(ctx);
    if let Err(e) = state.close() {
        eprintln!("cleanup: the state dir: {e}");
    }
    conclusion.exit();
}
