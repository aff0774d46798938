//! A thin HTTP/1.1 client for Cloud Hypervisor's REST API on its unix socket.
//!
//! One connection per call: CH serves calls one at a time anyway, and a fresh connection never
//! inherits a half-read reply from a call that timed out. Only the endpoints the driver uses are
//! here, with request bodies as small private structs (no CH type leaves this crate).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// The longest reply body read from CH (a `vm.info` is a few KiB).
const MAX_REPLY: usize = 4 << 20;

/// One message of CH's error reply. CH answers a failed call with a JSON list of messages, from
/// the top error down to the root cause; each becomes one link of a source chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChMessage {
    message: String,
    cause: Option<Box<ChMessage>>,
}

impl ChMessage {
    /// Builds the chain from CH's list (top first). `None` for an empty list.
    pub(crate) fn chain(messages: &[String]) -> Option<ChMessage> {
        messages.iter().rev().fold(None, |cause, m| {
            Some(ChMessage {
                message: m.clone(),
                cause: cause.map(Box::new),
            })
        })
    }

    /// This link's own message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ChMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ChMessage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as _)
    }
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("could not connect to the Cloud Hypervisor API socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP exchange with Cloud Hypervisor failed on {endpoint}")]
    Http {
        endpoint: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("Cloud Hypervisor answered {endpoint} with HTTP {status}")]
    Status {
        endpoint: &'static str,
        status: u16,
        #[source]
        source: Option<ChMessage>,
    },
    #[error("Cloud Hypervisor did not answer {endpoint} within {timeout:?}")]
    Timeout { endpoint: &'static str, timeout: Duration },
    #[error("Cloud Hypervisor's reply to {endpoint} is not the expected JSON")]
    Decode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cloud Hypervisor's reply to {endpoint} is larger than {MAX_REPLY} bytes")]
    TooLarge { endpoint: &'static str },
}

impl ApiError {
    /// CH's own messages, top first (empty unless CH answered with an error list).
    #[cfg(test)]
    pub(crate) fn ch_messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let ApiError::Status { source: Some(m), .. } = self {
            let mut cur = Some(m);
            while let Some(c) = cur {
                out.push(c.message.clone());
                cur = c.cause.as_deref();
            }
        }
        out
    }
}

// ---- request and reply bodies (the subset of CH's OpenAPI schemas the driver sends) ----

#[derive(Debug, Serialize)]
pub(crate) struct VmConfigBody {
    pub cpus: CpusBody,
    pub memory: MemoryBody,
    pub payload: PayloadBody,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskBody>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetBody>,
    pub vsock: VsockBody,
    pub serial: ConsoleBody,
    pub console: ConsoleBody,
}

#[derive(Debug, Serialize)]
pub(crate) struct CpusBody {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Serialize)]
pub(crate) struct MemoryBody {
    /// Bytes.
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct PayloadBody {
    pub kernel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    pub cmdline: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct DiskBody {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct NetBody {
    pub tap: String,
    pub mac: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct VsockBody {
    pub cid: u64,
    pub socket: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct ConsoleBody {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(Debug, Serialize)]
struct SnapshotBody<'a> {
    destination_url: &'a str,
}

#[derive(Debug, Serialize)]
struct RestoreBody<'a> {
    source_url: &'a str,
    memory_restore_mode: &'static str,
    resume: bool,
}

/// The part of `vmm.ping`'s reply the driver reads.
#[derive(Debug, Deserialize)]
pub(crate) struct PingReply {
    pub version: String,
    #[serde(default)]
    pub pid: Option<i64>,
}

/// The part of `vm.info`'s reply the driver reads.
#[derive(Debug, Deserialize)]
pub(crate) struct InfoReply {
    pub state: String,
}

/// The API client for one VMM's socket.
#[derive(Debug, Clone)]
pub(crate) struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub(crate) fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) async fn ping(&self) -> Result<PingReply, ApiError> {
        self.get_json("vmm.ping").await
    }

    pub(crate) async fn info(&self) -> Result<InfoReply, ApiError> {
        self.get_json("vm.info").await
    }

    pub(crate) async fn create(&self, config: &VmConfigBody) -> Result<(), ApiError> {
        self.put("vm.create", Some(json(config)), self.timeout).await
    }

    pub(crate) async fn boot(&self) -> Result<(), ApiError> {
        self.put("vm.boot", None, self.timeout).await
    }

    pub(crate) async fn pause(&self) -> Result<(), ApiError> {
        self.put("vm.pause", None, self.timeout).await
    }

    pub(crate) async fn resume(&self) -> Result<(), ApiError> {
        self.put("vm.resume", None, self.timeout).await
    }

    pub(crate) async fn snapshot(&self, destination_url: &str, timeout: Duration) -> Result<(), ApiError> {
        self.put("vm.snapshot", Some(json(&SnapshotBody { destination_url })), timeout)
            .await
    }

    /// Restores without resuming; `memory_restore_mode` is the API's spelling (`Copy`, `OnDemand`).
    pub(crate) async fn restore(
        &self,
        source_url: &str,
        memory_restore_mode: &'static str,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let body = RestoreBody {
            source_url,
            memory_restore_mode,
            resume: false,
        };
        self.put("vm.restore", Some(json(&body)), timeout).await
    }

    pub(crate) async fn shutdown(&self, timeout: Duration) -> Result<(), ApiError> {
        self.put("vm.shutdown", None, timeout).await
    }

    pub(crate) async fn delete(&self, timeout: Duration) -> Result<(), ApiError> {
        self.put("vm.delete", None, timeout).await
    }

    pub(crate) async fn vmm_shutdown(&self, timeout: Duration) -> Result<(), ApiError> {
        self.put("vmm.shutdown", None, timeout).await
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, endpoint: &'static str) -> Result<T, ApiError> {
        let body = self.call(Method::GET, endpoint, None, self.timeout).await?;
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode { endpoint, source })
    }

    async fn put(&self, endpoint: &'static str, body: Option<Vec<u8>>, timeout: Duration) -> Result<(), ApiError> {
        self.call(Method::PUT, endpoint, body, timeout).await.map(drop)
    }

    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, ApiError> {
        match tokio::time::timeout(timeout, self.exchange(method, endpoint, body)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout { endpoint, timeout }),
        }
    }

    async fn exchange(&self, method: Method, endpoint: &'static str, body: Option<Vec<u8>>) -> Result<Bytes, ApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let http = |source| ApiError::Http { endpoint, source };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let has_body = body.is_some();
        let body = body.unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/api/v1/{endpoint}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if has_body {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .body(Full::new(Bytes::from(body)))
            .expect("a request built from valid parts");
        let reply = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_REPLY);
            let bytes = match limited.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => match e.downcast::<hyper::Error>() {
                    Ok(source) => return Err(http(*source)),
                    Err(_) => return Err(ApiError::TooLarge { endpoint }),
                },
            };
            Ok((status, bytes))
        }
        .await;
        conn.abort();
        let (status, bytes) = reply?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ApiError::Status {
            endpoint,
            status: status.as_u16(),
            source: error_chain(status, &bytes),
        })
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("request bodies serialize")
}

/// CH's error body: a JSON list of messages; anything else is kept as one message.
fn error_chain(status: StatusCode, body: &[u8]) -> Option<ChMessage> {
    if let Ok(list) = serde_json::from_slice::<Vec<String>>(body) {
        return ChMessage::chain(&list);
    }
    let text = String::from_utf8_lossy(body).trim().to_owned();
    if text.is_empty() {
        return status
            .canonical_reason()
            .and_then(|r| ChMessage::chain(&[r.to_owned()]));
    }
    ChMessage::chain(&[text])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_keeps_ch_order_and_displays_one_level() {
        let c = ChMessage::chain(&["top".into(), "middle".into(), "root".into()]).unwrap();
        assert_eq!(c.to_string(), "top");
        let e = ApiError::Status {
            endpoint: "vm.boot",
            status: 500,
            source: Some(c),
        };
        assert_eq!(e.ch_messages(), ["top", "middle", "root"]);
        assert_eq!(e.to_string(), "Cloud Hypervisor answered vm.boot with HTTP 500");
        let mut chain = Vec::new();
        let mut cur: Option<&dyn std::error::Error> = Some(&e);
        while let Some(c) = cur {
            chain.push(c.to_string());
            cur = c.source();
        }
        assert_eq!(chain.len(), 4);
        assert!(ChMessage::chain(&[]).is_none());
    }

    #[test]
    fn non_list_error_bodies_are_kept() {
        let c = error_chain(StatusCode::BAD_REQUEST, b"not json").unwrap();
        assert_eq!(c.message(), "not json");
        let c = error_chain(StatusCode::NOT_FOUND, b"").unwrap();
        assert_eq!(c.message(), "Not Found");
    }
}
