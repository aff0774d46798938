//! Shared test support: the fake CH server, the OpenAPI validator, a raw HTTP helper and the
//! libtest-mimic plumbing (skips are reported as ignored with their reason).
#![allow(dead_code)]

pub mod fake_ch;
pub mod openapi;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use libtest_mimic::{Completion, Failed, Trial};
use serde_json::Value;

/// A raw HTTP call on a unix socket (to the fake's `/fake/*` control paths or CH's API).
pub async fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Option<Value>), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .body(Full::new(Bytes::from(bytes)))
        .unwrap();
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    conn.abort();
    let v = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    Ok((status, v))
}

/// A trial that runs `f` on a fresh current-thread runtime under a hard timeout.
pub fn trial<F, Fut>(name: &str, limit: Duration, f: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Failed>>,
{
    Trial::test(name, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            match tokio::time::timeout(limit, f()).await {
                Ok(r) => r,
                Err(_) => Err(format!("hard timeout after {limit:?}").into()),
            }
        })
    })
}

/// A trial reported as ignored at run time, with its reason (never as passed).
pub fn skipped(name: &str, reason: impl Into<String>) -> Trial {
    let reason = reason.into();
    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
}

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(msg.into().into()) }
}

/// Every message in an error's source chain, top first.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    out
}

/// Whether a pid is alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 2..].chars().next())
            .is_some_and(|c| c != 'Z'),
        Err(_) => false,
    }
}

/// Live processes whose command line names `dir` (a VMM's API socket is inside its state dir).
pub fn vmms_for(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Kills, on drop, every process a test left under its own directory (also when it failed).
pub struct Reaper(pub std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in vmms_for(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
