//! The preview proxy: `Host: <label>.<preview domain>` → the port the capsule exposes.
//!
//! Every request on a preview host is the capsule's (the API is not reachable there). The proxy
//! resolves the label, checks access (`public`: anyone; `token`: a bearer token that can read
//! the capsule or a `preview` token for it, sent as `Authorization: Bearer` or the
//! `capsule_token` cookie), opens a byte stream to the port through core (which wakes a sleeping
//! capsule; the request is held, bounded, until the port accepts), and speaks HTTP/1.1 over it:
//! any method, bodies streamed both ways, `Upgrade` (WebSocket) spliced after the 101. Bytes in
//! both directions are metered into the ledger (and count as activity) at the end of each
//! exchange and every few seconds of a long one. The caller's credentials never reach the guest.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use capsules_core::backend::Connection;
use capsules_core::types::UrlAccess;
use capsules_core::{Error, ErrorKind, Preview, PreviewTarget};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::error::{RETRY_AFTER_SECS, status_for};

/// The cookie (and query parameter) that carries a preview token.
pub const COOKIE: &str = "capsule_token";

#[derive(Clone, Debug)]
pub(crate) struct Proxy {
    preview: Preview,
    config: Arc<ServerConfig>,
}

impl Proxy {
    pub(crate) fn new(preview: Preview, config: Arc<ServerConfig>) -> Self {
        Proxy { preview, config }
    }
}

/// In front of the API: preview hosts go to the proxy, the rest to the API.
pub(crate) async fn dispatch(State(px): State<Proxy>, req: Request, next: Next) -> Response {
    let host = request_host(&req);
    match host.as_deref().and_then(|h| px.config.host_label(h)) {
        Some(label) => {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let started = Instant::now();
            let resp = px.serve(&label, req).await;
            tracing::info!(%method, %path, host_label = %label, status = resp.status().as_u16(),
                ms = started.elapsed().as_millis() as u64, "preview request");
            resp
        }
        None => {
            let port = host.as_deref().and_then(crate::config::host_port);
            crate::REQUEST_PORT.scope(port, next.run(req)).await
        }
    }
}

/// `Host`, or the authority of an absolute-form or HTTP/2 request.
fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

/// A refusal of the proxy itself: plain text (JSON `{"error": …}` when the caller accepts JSON).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    kind: &'static str,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refusal {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Core's answer, with the API's status and message.
    fn from_error(e: &Error) -> Self {
        let mut r = Refusal::new(status_for(e.kind()), e.kind().as_str(), e.message());
        if e.kind() == ErrorKind::Unavailable {
            r.headers
                .push((header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS)));
        }
        r
    }

    fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    fn into_response(self, json: bool) -> Response {
        let mut resp = if json {
            let body = serde_json::json!({"error": {"kind": self.kind, "message": self.message}});
            (
                self.status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        } else {
            (
                self.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{}\n", self.message),
            )
                .into_response()
        };
        for (k, v) in self.headers {
            resp.headers_mut().append(k, v);
        }
        resp
    }
}

type Res<T> = std::result::Result<T, Refusal>;

impl Proxy {
    async fn serve(&self, label: &str, req: Request) -> Response {
        let json = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json"));
        match self.forward(label, req).await {
            Ok(r) => r,
            Err(r) => r.into_response(json),
        }
    }

    async fn forward(&self, label: &str, mut req: Request) -> Res<Response> {
        let host = format!("{label}.{}", self.config.preview_domain());
        let unknown = || {
            Refusal::new(
                StatusCode::NOT_FOUND,
                ErrorKind::NotFound.as_str(),
                format!("no capsule is exposed at {host}: the URL is unknown or was removed"),
            )
        };
        let resolve = |e: Error| {
            if e.kind() == ErrorKind::NotFound {
                unknown()
            } else {
                Refusal::from_error(&e)
            }
        };
        let mut target = self.preview.resolve(label).await.map_err(resolve)?;

        // A browser's first visit: `?capsule_token=` becomes a host-only cookie.
        let (query_token, rest) = split_query(req.uri().query());
        let bearer = our_bearer(req.headers());
        if let Some(t) = &query_token {
            target = self.authorize(&target, t, Source::Query).await?;
            if matches!(*req.method(), Method::GET | Method::HEAD) {
                return self.redirect(req.uri().path(), rest.as_deref(), t);
            }
        } else if target.access == UrlAccess::Token {
            let cookie = cookie_token(req.headers());
            target = match (&bearer, &cookie) {
                (Some(b), _) => self.authorize(&target, b, Source::Bearer).await?,
                (None, Some(c)) => self.authorize(&target, c, Source::Cookie).await?,
                (None, None) => {
                    return Err(Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        ErrorKind::Unauthenticated.as_str(),
                        format!(
                            "this URL needs a token: open it once with ?{COOKIE}=<preview token> (mint one with \
                             `capsule url {} --preview-token`), or send Authorization: Bearer <a token that can \
                             read capsule {}>",
                            target.name, target.name
                        ),
                    )
                    .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
                }
            };
        }

        let conn = self.open(label, &host, target.clone()).await?;
        let meter = Meter::start(self.preview.clone(), target.clone(), self.config.traffic_flush());
        let io = TokioIo::new(Metered { inner: conn, meter });
        let gateway = |what: &str, e: hyper::Error| {
            tracing::debug!(error = %e, "preview upstream failed");
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                ErrorKind::Unavailable.as_str(),
                format!("port {} of capsule {} {what}", target.port, target.name),
            )
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| gateway("did not speak HTTP", e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "preview upstream connection ended");
            }
        });

        let upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let path_and_query = match rest {
            Some(q) => format!("{}?{q}", parts.uri.path()),
            None => parts.uri.path().to_owned(),
        };
        parts.uri = Uri::try_from(path_and_query).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "the request target is not valid",
            )
        })?;
        parts.version = Version::HTTP_11;
        let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let (Some(_), Some(u)) = (&upgrade, upgrade_to) {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u);
        }
        strip_credentials(&mut parts.headers, bearer.is_some());
        if !parts.headers.contains_key(header::HOST)
            && let Ok(h) = HeaderValue::from_str(&host)
        {
            parts.headers.insert(header::HOST, h);
        }
        let proto = if self.config.tls() { "https" } else { "http" };
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(proto));
        let out = axum::http::Request::from_parts(parts, body);

        let mut resp = sender
            .send_request(out)
            .await
            .map_err(|e| gateway("closed the connection without an answer", e))?;
        drop(sender);

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client) = upgrade else {
                return Err(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorKind::Unavailable.as_str(),
                    format!(
                        "port {} of capsule {} switched protocols without being asked",
                        target.port, target.name
                    ),
                ));
            };
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (c, u) = match (client.await, upstream.await) {
                    (Ok(c), Ok(u)) => (c, u),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!(error = %e, "preview upgrade failed");
                        return;
                    }
                };
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
            let (mut parts, _) = resp.into_parts();
            let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(u) = upgrade_to {
                parts.headers.insert(header::UPGRADE, u);
            }
            return Ok(Response::from_parts(parts, Body::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    async fn authorize(&self, target: &PreviewTarget, token: &str, source: Source) -> Res<PreviewTarget> {
        // Checked first even where access is public: the query token becomes a cookie, so it must
        // be a well-formed token (no `;` or attributes smuggled into Set-Cookie).
        let checked = match capsules_core::tokens::parse_secret(token) {
            Ok(_) => self.preview.authorize(&target.host_label, Some(token)).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(t) => Ok(t),
            Err(e) => {
                let mut r = Refusal::from_error(&e);
                if e.kind() == ErrorKind::Unauthenticated {
                    r.message = format!(
                        "{}: the {} was refused; mint a preview token with `capsule url {} --preview-token`",
                        e.message(),
                        source.what(),
                        target.name
                    );
                    r = r.with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                if source == Source::Cookie {
                    r = r.with_header(
                        header::SET_COOKIE,
                        HeaderValue::from_static("capsule_token=; Max-Age=0; HttpOnly; Path=/; SameSite=Lax"),
                    );
                }
                Err(r)
            }
        }
    }

    fn redirect(&self, path: &str, rest: Option<&str>, token: &str) -> Res<Response> {
        let location = match rest {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let secure = if self.config.tls() { "; Secure" } else { "" };
        let cookie = HeaderValue::from_str(&format!("{COOKIE}={token}; HttpOnly; Path=/; SameSite=Lax{secure}"))
            .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "invalid_input", "the token is not valid"))?;
        let location = HeaderValue::from_str(&location).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "the request target is not valid",
            )
        })?;
        let mut resp = StatusCode::SEE_OTHER.into_response();
        resp.headers_mut().insert(header::LOCATION, location);
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }

    /// A stream to the exposed port: wakes the capsule (core's `open`) and retries, with backoff,
    /// until the port accepts or the hold runs out. A limit that forbids waking answers at once.
    async fn open(&self, label: &str, host: &str, mut target: PreviewTarget) -> Res<Box<dyn Connection>> {
        let hold = self.config.preview_hold();
        let deadline = Instant::now() + hold;
        let mut delay = Duration::from_millis(50);
        loop {
            let e = match self.preview.open(&target).await {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            // Not listening yet (the guest says NotFound, the mock Unavailable), or waking.
            if !matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::NotFound) {
                return Err(Refusal::from_error(&e));
            }
            // The URL may have been removed or moved to another port meanwhile.
            target = match self.preview.resolve(label).await {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        ErrorKind::NotFound.as_str(),
                        format!("no capsule is exposed at {host}: the URL is unknown or was removed"),
                    ));
                }
                Err(e) => return Err(Refusal::from_error(&e)),
            };
            if Instant::now() + delay >= deadline {
                tracing::info!(error = %e, port = target.port, "preview hold ran out");
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::Unavailable.as_str(),
                    format!(
                        "nothing accepted connections on port {} of capsule {} within {} s ({}); start a server \
                         listening on 127.0.0.1:{} or 0.0.0.0:{} in the capsule",
                        target.port,
                        target.name,
                        hold.as_secs(),
                        e.message(),
                        target.port,
                        target.port
                    ),
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS)));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Query,
    Bearer,
    Cookie,
}

impl Source {
    fn what(self) -> &'static str {
        match self {
            Source::Query => "token in ?capsule_token=",
            Source::Bearer => "bearer token",
            Source::Cookie => "token in the capsule_token cookie",
        }
    }
}

/// `(capsule_token, the query without it)`.
fn split_query(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else {
        return (None, None);
    };
    let mut token = None;
    let mut rest = Vec::new();
    for pair in q.split('&') {
        match pair.split_once('=') {
            Some((k, v)) if k == COOKIE => token = Some(percent_decode(v)),
            _ if pair == COOKIE => token = Some(String::new()),
            _ => rest.push(pair),
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    (token, rest)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            (b'+', ..) => out.push(b' '),
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Capsules token in `Authorization: Bearer cap_…`, if that is what it holds (any other
/// Authorization is the guest's business and passes through).
fn our_bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, t) = v.split_once(' ')?;
    let t = t.trim();
    (scheme.eq_ignore_ascii_case("bearer") && t.starts_with("cap_")).then(|| t.to_owned())
}

fn cookie_token(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

/// Removes the `capsule_token` cookie, and the Authorization header when it held our token.
fn strip_credentials(h: &mut HeaderMap, ours_in_authorization: bool) {
    if ours_in_authorization {
        h.remove(header::AUTHORIZATION);
    }
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').map_or(*c, |(k, _)| k) != COOKIE)
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        h.insert(header::COOKIE, v);
    }
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// RFC 9110 §7.6.1: the connection-specific headers, and those `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

// ---- metering ----

/// Bytes through one upstream connection, reported to the ledger every `every` and at its end.
#[derive(Debug)]
struct Meter {
    bytes: AtomicU64,
    done: Notify,
}

impl Meter {
    fn start(preview: Preview, target: PreviewTarget, every: Duration) -> Arc<Meter> {
        let m = Arc::new(Meter {
            bytes: AtomicU64::new(0),
            done: Notify::new(),
        });
        let me = m.clone();
        tokio::spawn(async move {
            loop {
                let last = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = me.done.notified() => true,
                };
                let n = me.bytes.swap(0, Ordering::AcqRel);
                if n > 0
                    && let Err(e) = preview.record_traffic(&target.capsule, n).await
                {
                    tracing::warn!(capsule = %target.capsule, bytes = n, error = %e, "could not record preview traffic");
                }
                if last {
                    return;
                }
            }
        });
        m
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// The upstream stream, counting every byte each way (upgraded streams included: hyper hands
/// this same stream over after a 101).
struct Metered {
    inner: Box<dyn Connection>,
    meter: Arc<Meter>,
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.meter.done.notify_one();
    }
}

impl AsyncRead for Metered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.meter.add(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Metered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.meter.add(n);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.meter.add(n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_is_taken_out() {
        assert_eq!(split_query(None), (None, None));
        assert_eq!(
            split_query(Some("a=1&capsule_token=cap_x_y&b=2")),
            (Some("cap_x_y".into()), Some("a=1&b=2".into()))
        );
        assert_eq!(split_query(Some("capsule_token=cap%5Fx")), (Some("cap_x".into()), None));
        assert_eq!(split_query(Some("a=1")), (None, Some("a=1".into())));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer cap_a_b".parse().unwrap());
        h.append(header::COOKIE, "x=1; capsule_token=cap_a_b; y=2".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(our_bearer(&h).as_deref(), Some("cap_a_b"));
        assert_eq!(cookie_token(&h).as_deref(), Some("cap_a_b"));
        strip_hop_by_hop(&mut h);
        strip_credentials(&mut h, true);
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h.get(header::COOKIE).unwrap(), "x=1; y=2");
        for n in ["connection", "x-private", "keep-alive", "transfer-encoding"] {
            assert!(h.get(n).is_none(), "{n}");
        }
        assert!(h.get(header::CONTENT_TYPE).is_some());
        // Someone else's Authorization passes.
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic dTpw".parse().unwrap());
        assert_eq!(our_bearer(&h), None);
    }
}
