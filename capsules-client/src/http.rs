//! The transport: one reqwest client, bearer auth, and the error body back into `Error`.

use capsules_core::{Error, Result};
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::ErrorBody;

#[derive(Clone, Debug)]
pub(crate) struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub(crate) fn new(base: &str) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(Error::invalid_input(format!(
                "the Capsules API address {base:?} must start with http:// (TLS is not supported yet)"
            )));
        }
        let client = reqwest::Client::builder()
            // A server that is down fails fast; answers themselves may take long (a first boot).
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_keepalive(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Error::internal("could not build the HTTP client").with_source(e))?;
        Ok(Http { client, base })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn request(&self, method: Method, path: &str, secret: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(secret)
    }

    /// Sends; a non-2xx answer becomes the server's error.
    pub(crate) async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(read_error(resp).await)
    }

    pub(crate) fn transport(&self, e: reqwest::Error) -> Error {
        if e.is_connect() {
            Error::unavailable(format!("the Capsules API at {} is unreachable", self.base)).with_source(e)
        } else if e.is_body() || e.is_decode() {
            Error::unavailable(format!("the Capsules API at {} cut the answer short", self.base)).with_source(e)
        } else {
            Error::unavailable(format!("the Capsules API at {} did not answer", self.base)).with_source(e)
        }
    }

    pub(crate) async fn json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        secret: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let mut req = self.request(method, path, secret);
        if let Some(b) = body {
            req = req.json(b);
        }
        read_json(self.send(req).await?).await
    }

    /// For calls answered with no body (204).
    pub(crate) async fn empty<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        secret: &str,
        body: Option<&B>,
    ) -> Result<()> {
        let mut req = self.request(method, path, secret);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await.map(|_| ())
    }
}

pub(crate) async fn read_json<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Error::unavailable("the Capsules API cut the answer short").with_source(e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::internal("the Capsules API answered with JSON this client does not understand").with_source(e)
    })
}

async fn read_error(resp: Response) -> Error {
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => b.into_error(),
        Err(_) => {
            let kind = if status.is_server_error() {
                capsules_core::ErrorKind::Unavailable
            } else {
                capsules_core::ErrorKind::Internal
            };
            Error::new(
                kind,
                format!("the Capsules API answered {status} without an error body"),
            )
        }
    }
}

/// Percent-encodes one path segment or query value.
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
