//! A fake Cloud Hypervisor: serves CH's REST API on `--api-socket`, keeps VM state, checks every
//! request against CH's OpenAPI description, and takes orders on `/fake/*` (fail a call with a
//! CH-style error list, die in the middle of a call, report what it saw).
//!
//! The test binary runs this when it is started with `--api-socket` (the driver spawns it as its
//! "cloud-hypervisor"), so the driver's real spawn and supervision code runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::openapi::{Spec, SpecSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Shutdown => "Shutdown",
        }
    }
}

#[derive(Default)]
struct Fake {
    vm: Option<(State, Value)>,
    requests: Vec<String>,
    bodies: HashMap<String, Value>,
    violations: Vec<String>,
    fail: HashMap<String, Vec<String>>,
    die: Option<String>,
    hang: Option<String>,
    vsock_task: Option<tokio::task::JoinHandle<()>>,
}

type Shared = Arc<Mutex<Fake>>;

/// Entry point in the child process: `--api-socket path=P` (or `--api-socket P`).
pub fn main_if_fake() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == "--api-socket") else {
        return false;
    };
    let raw = args.get(i + 1).cloned().unwrap_or_default();
    let socket = PathBuf::from(raw.strip_prefix("path=").unwrap_or(&raw));
    let spec = match Spec::from_env() {
        SpecSource::Loaded(s) => Some(s),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve(socket, spec));
    true
}

async fn serve(socket: PathBuf, spec: Option<Spec>) {
    eprintln!("fake-ch: serving on {}", socket.display());
    let listener = UnixListener::bind(&socket).expect("fake-ch: bind the API socket");
    let shared: Shared = Arc::default();
    if let Ok(endpoint) = std::env::var("CAPSULES_FAKE_FAIL") {
        let msgs = ["Error from API", "The VM could not boot", "injected boot failure"];
        shared
            .lock()
            .unwrap()
            .fail
            .insert(endpoint, msgs.map(String::from).to_vec());
    }
    let spec = Arc::new(spec);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let spec = spec.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone(), spec.clone(), socket.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: u16, body: Option<Value>) -> Response<Full<Bytes>> {
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(b)))
        .unwrap()
}

fn ch_error(status: u16, messages: &[&str]) -> Response<Full<Bytes>> {
    reply(status, Some(json!(messages)))
}

async fn handle(
    req: Request<Incoming>,
    shared: Shared,
    spec: Arc<Option<Spec>>,
    api_socket: PathBuf,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => return Ok(ch_error(400, &["Error from API", &format!("invalid JSON body: {e}")])),
        }
    };

    if let Some(ctl) = path.strip_prefix("/fake/") {
        return Ok(control(ctl, body, &shared));
    }

    let endpoint = path.strip_prefix("/api/v1/").unwrap_or(&path).to_owned();
    let hang;
    {
        let mut f = shared.lock().unwrap();
        f.requests.push(format!("{method} {endpoint}"));
        // Also in the VMM log, so a test can read the calls made after the fake has exited.
        eprintln!("fake-ch: request {method} {endpoint}");
        if let Some(b) = &body {
            f.bodies.insert(endpoint.clone(), b.clone());
        }
        if let Some(spec) = spec.as_ref() {
            let errs = spec.check_request(&method, &path, body.as_ref());
            f.violations.extend(errs);
        }
        if f.die.as_deref() == Some(endpoint.as_str()) {
            eprintln!("fake-ch: told to die during {endpoint}");
            let _ = std::fs::remove_file(&api_socket);
            std::process::exit(1);
        }
        hang = f.hang.as_deref() == Some(endpoint.as_str());
        if let Some(msgs) = f.fail.remove(&endpoint) {
            let m: Vec<&str> = msgs.iter().map(String::as_str).collect();
            return Ok(ch_error(500, &m));
        }
    }
    if hang {
        eprintln!("fake-ch: told to hang in {endpoint}");
        std::future::pending::<()>().await;
    }
    let (status, reply_body) = api(&method, &endpoint, body, &shared, &api_socket);
    if let Some(spec) = spec.as_ref() {
        let errs = spec.check_response(&method, &format!("/{endpoint}"), status, reply_body.as_ref());
        shared
            .lock()
            .unwrap()
            .violations
            .extend(errs.into_iter().map(|e| format!("fake reply: {e}")));
    }
    Ok(reply(status, reply_body))
}

type Out = (u16, Option<Value>);

fn out(status: u16, body: Option<Value>) -> Out {
    (status, body)
}

fn err(status: u16, messages: &[&str]) -> Out {
    (status, Some(json!(messages)))
}

fn control(ctl: &str, body: Option<Value>, shared: &Shared) -> Response<Full<Bytes>> {
    let mut f = shared.lock().unwrap();
    let field = |k: &str| body.as_ref().and_then(|b| b.get(k)).cloned();
    match ctl {
        "fail" => {
            let endpoint = field("endpoint")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let msgs = field("messages")
                .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
                .unwrap_or_default();
            f.fail.insert(endpoint, msgs);
            reply(204, None)
        }
        "die" => {
            f.die = field("endpoint").and_then(|v| v.as_str().map(str::to_owned));
            reply(204, None)
        }
        "hang" => {
            f.hang = field("endpoint").and_then(|v| v.as_str().map(str::to_owned));
            reply(204, None)
        }
        "requests" => reply(200, Some(json!(f.requests))),
        "violations" => reply(200, Some(json!(f.violations))),
        other => match other.strip_prefix("body/") {
            Some(ep) => reply(200, f.bodies.get(ep).cloned()),
            None => reply(404, None),
        },
    }
}

fn api(method: &str, endpoint: &str, body: Option<Value>, shared: &Shared, api_socket: &Path) -> Out {
    let mut f = shared.lock().unwrap();
    let state = f.vm.as_ref().map(|(s, _)| *s);
    match (method, endpoint) {
        ("GET", "vmm.ping") => out(
            200,
            Some(
                json!({"version": "0.0.0-fake", "build_version": "fake", "pid": std::process::id(), "features": ["kvm"]}),
            ),
        ),
        ("PUT", "vmm.shutdown") => {
            let sock = api_socket.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let _ = std::fs::remove_file(sock);
                std::process::exit(0);
            });
            out(204, None)
        }
        ("PUT", "vm.create") => {
            if state.is_some() {
                return err(
                    400,
                    &["Error from API", "The VM could not be created", "VM is already created"],
                );
            }
            let config = body.unwrap_or(Value::Null);
            start_vsock(&mut f, &config);
            f.vm = Some((State::Created, config));
            out(204, None)
        }
        ("GET", "vm.info") => match &f.vm {
            None => err(
                404,
                &["Error from API", "The VM info is not available", "VM is not created"],
            ),
            Some((s, config)) => out(
                200,
                Some(
                    json!({"config": config, "state": s.name(), "memory_actual_size": config.pointer("/memory/size").cloned().unwrap_or(json!(0))}),
                ),
            ),
        },
        ("PUT", "vm.boot") => transition(
            &mut f,
            &[State::Created],
            State::Running,
            "booted",
            "VM is not in the created state",
        ),
        ("PUT", "vm.pause") => transition(&mut f, &[State::Running], State::Paused, "paused", "VM is not running"),
        ("PUT", "vm.resume") => transition(&mut f, &[State::Paused], State::Running, "resumed", "VM is not paused"),
        ("PUT", "vm.shutdown") => transition(
            &mut f,
            &[State::Running, State::Paused],
            State::Shutdown,
            "shut down",
            "VM is not running",
        ),
        ("PUT", "vm.delete") => {
            if let Some(t) = f.vm_task_take() {
                t.abort();
            }
            f.vm = None;
            out(204, None)
        }
        ("PUT", "vm.snapshot") => {
            if state != Some(State::Paused) {
                return err(
                    405,
                    &["Error from API", "The VM could not be snapshotted", "VM is not paused"],
                );
            }
            let url = body
                .as_ref()
                .and_then(|b| b["destination_url"].as_str())
                .unwrap_or_default();
            let Some(dir) = url.strip_prefix("file://") else {
                return err(
                    400,
                    &["Error from API", "The VM could not be snapshotted", "Invalid URL"],
                );
            };
            let config = f.vm.as_ref().unwrap().1.clone();
            let dir = Path::new(dir);
            let wrote = std::fs::write(dir.join("config.json"), config.to_string())
                .and_then(|_| std::fs::write(dir.join("state.json"), b"{\"fake\":true}"))
                .and_then(|_| std::fs::write(dir.join("memory-ranges"), vec![0u8; 4096]));
            match wrote {
                Ok(()) => out(204, None),
                Err(e) => err(
                    500,
                    &["Error from API", "The VM could not be snapshotted", &e.to_string()],
                ),
            }
        }
        ("PUT", "vm.restore") => {
            if state.is_some() {
                return err(
                    404,
                    &[
                        "Error from API",
                        "The VM could not be restored",
                        "VM is already created",
                    ],
                );
            }
            let url = body.as_ref().and_then(|b| b["source_url"].as_str()).unwrap_or_default();
            let dir = Path::new(url.strip_prefix("file://").unwrap_or(url));
            let config = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let ok = dir.join("state.json").is_file() && dir.join("memory-ranges").is_file();
            match config {
                Some(config) if ok => {
                    start_vsock(&mut f, &config);
                    let resume = body.as_ref().and_then(|b| b["resume"].as_bool()).unwrap_or(false);
                    f.vm = Some((if resume { State::Running } else { State::Paused }, config));
                    out(204, None)
                }
                _ => err(
                    500,
                    &[
                        "Error from API",
                        "The VM could not be restored",
                        "Snapshot files are missing",
                    ],
                ),
            }
        }
        _ => err(404, &["Error from API", "Unknown endpoint"]),
    }
}

impl Fake {
    fn vm_task_take(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.vsock_task.take()
    }
}

fn transition(f: &mut Fake, from: &[State], to: State, done: &str, wrong: &str) -> Out {
    match &mut f.vm {
        None => err(
            404,
            &[
                "Error from API",
                &format!("The VM could not be {done}"),
                "VM is not created",
            ],
        ),
        Some((s, _)) if from.contains(s) => {
            *s = to;
            out(204, None)
        }
        Some(_) => err(405, &["Error from API", &format!("The VM could not be {done}"), wrong]),
    }
}

/// Hybrid vsock: `CONNECT <port>\n` → `OK <host port>\n`, then an echo service.
fn start_vsock(f: &mut Fake, config: &Value) {
    let Some(path) = config.pointer("/vsock/socket").and_then(Value::as_str) else {
        return;
    };
    let path = PathBuf::from(path);
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = UnixListener::bind(&path) else {
        return;
    };
    f.vsock_task = Some(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(vsock_conn(s));
        }
    }));
}

async fn vsock_conn(mut s: UnixStream) {
    let mut line = Vec::new();
    loop {
        let Ok(b) = s.read_u8().await else { return };
        if b == b'\n' {
            break;
        }
        line.push(b);
    }
    if line != b"CONNECT 1024" {
        let _ = s.write_all(b"ERR no listener\n").await;
        return;
    }
    if s.write_all(b"OK 1073741824\n").await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
