//! A handle to one capsule over HTTP: commands, files, URL, lifecycle, usage.

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use capsules_core::backend::{ByteStream, ExecEvent, ExecOutput, ExecStream, FileStat, ProcessInfo};
use capsules_core::events::Event;
use capsules_core::records::CapsuleRecord;
use capsules_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, Response};
use tokio::io::AsyncRead;

use crate::http::{self, Http, seg};
use crate::wire::{
    CapsuleUpdate, CapsuleUsage, ErrorDetail, Events, ExecLine, ExecSpec, ExposeRequest, ExposedUrl, FileList,
    PreviewTokenRequest, SignalRequest, TokenCreated, Written,
};

/// One capsule, as seen by one token.
#[derive(Clone)]
pub struct CapsuleHandle {
    http: Http,
    secret: String,
    target: String,
    record: Option<CapsuleRecord>,
}

impl std::fmt::Debug for CapsuleHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleHandle")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin + 'static>;

impl CapsuleHandle {
    pub(crate) fn new(http: Http, secret: &str, target: &str) -> Self {
        CapsuleHandle {
            http,
            secret: secret.to_owned(),
            target: target.to_owned(),
            record: None,
        }
    }

    /// After create: the handle names the capsule by id, like the library's.
    pub(crate) fn with_record(http: Http, secret: &str, rec: CapsuleRecord) -> Self {
        CapsuleHandle {
            http,
            secret: secret.to_owned(),
            target: rec.id.as_str().to_owned(),
            record: Some(rec),
        }
    }

    /// How this handle names the capsule (an id after create).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The record the create answered with (None for handles made by name).
    pub fn created(&self) -> Option<&CapsuleRecord> {
        self.record.as_ref()
    }

    fn path(&self, tail: &str) -> String {
        format!("/v1/capsules/{}{}", seg(&self.target), tail)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, tail: &str) -> Result<T> {
        self.http
            .json(Method::GET, &self.path(tail), &self.secret, None::<&()>)
            .await
    }

    async fn post<T: serde::de::DeserializeOwned>(&self, tail: &str) -> Result<T> {
        self.http
            .json(Method::POST, &self.path(tail), &self.secret, None::<&()>)
            .await
    }

    // ---- status ----

    pub async fn status(&self) -> Result<CapsuleRecord> {
        self.get("").await
    }

    /// Usage, ledger entries and events of this capsule.
    pub async fn usage(&self) -> Result<CapsuleUsage> {
        self.get("/usage").await
    }

    pub async fn events(&self) -> Result<Vec<Event>> {
        Ok(self.get::<Events>("/events").await?.events)
    }

    /// The boot/serial log.
    pub async fn logs(&self) -> Result<Bytes> {
        let req = self.http.request(Method::GET, &self.path("/logs"), &self.secret);
        let resp = self.http.send(req).await?;
        resp.bytes().await.map_err(|e| self.http.transport(e))
    }

    // ---- commands ----

    /// Runs a command; `.await` collects the output, `.stream()` streams it.
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecBuilder {
            handle: self.clone(),
            spec: ExecSpec {
                argv: argv.into_iter().map(Into::into).collect(),
                ..ExecSpec::default()
            },
            stdin: None,
        }
    }

    /// Starts a background process.
    pub async fn spawn(&self, spec: &ExecSpec) -> Result<ProcessInfo> {
        self.http
            .json(Method::POST, &self.path("/processes"), &self.secret, Some(spec))
            .await
    }

    pub async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        self.get("/processes").await
    }

    /// Output of a background process from byte `offset`.
    pub async fn attach(&self, handle: &str, offset: u64) -> Result<ExecStream> {
        let path = self.path(&format!("/processes/{}/output?offset={offset}", seg(handle)));
        let resp = self
            .http
            .send(self.http.request(Method::GET, &path, &self.secret))
            .await?;
        Ok(ndjson(resp, self.http.base()))
    }

    pub async fn signal(&self, handle: &str, signal: i32) -> Result<()> {
        let path = self.path(&format!("/processes/{}/signal", seg(handle)));
        self.http
            .empty(Method::POST, &path, &self.secret, Some(&SignalRequest { signal }))
            .await
    }

    // ---- console ----

    /// Opens a terminal (the login shell, in `/workspace`) of `cols` x `rows` (1-1000 each) over
    /// the console WebSocket. Detach with [`ConsoleSender::close`](crate::ConsoleSender::close).
    pub async fn console(&self, cols: u16, rows: u16) -> Result<crate::ConsoleSession> {
        let url = format!(
            "{}{}",
            crate::console::ws_base(self.http.base())?,
            self.path(&format!("/console?cols={cols}&rows={rows}"))
        );
        crate::console::open(&url, &self.secret, cols, rows).await
    }

    /// A single-use, 30-second ticket that opens this capsule's console WebSocket without an
    /// `Authorization` header (`?ticket=`): what a browser needs.
    pub async fn console_ticket(&self) -> Result<crate::wire::ConsoleTicket> {
        self.post("/console/ticket").await
    }

    // ---- files ----

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut s = self.read_file_stream(path).await?;
        let mut v = Vec::new();
        while let Some(c) = s.next().await {
            v.extend_from_slice(&c?);
        }
        Ok(v)
    }

    pub async fn read_file_stream(&self, path: &str) -> Result<ByteStream> {
        self.download(&format!("/files?path={}", seg(path))).await
    }

    pub async fn write_file(&self, path: &str, data: impl Into<Bytes>) -> Result<u64> {
        let req = self
            .http
            .request(
                Method::PUT,
                &self.path(&format!("/files?path={}", seg(path))),
                &self.secret,
            )
            .body(data.into());
        Ok(http::read_json::<Written>(self.http.send(req).await?).await?.bytes)
    }

    /// Streams `data` into the file at `path`.
    pub async fn write_file_from(&self, path: &str, data: impl AsyncRead + Send + 'static) -> Result<u64> {
        let req = self
            .http
            .request(
                Method::PUT,
                &self.path(&format!("/files?path={}", seg(path))),
                &self.secret,
            )
            .body(reader_body(data));
        Ok(http::read_json::<Written>(self.http.send(req).await?).await?.bytes)
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileStat>> {
        Ok(self
            .get::<FileList>(&format!("/files/list?path={}", seg(path)))
            .await?
            .entries)
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let p = self.path(&format!("/files?path={}&recursive={recursive}", seg(path)));
        self.http.empty(Method::DELETE, &p, &self.secret, None::<&()>).await
    }

    /// Unpacks a tar stream into `dest`.
    pub async fn upload_tar(&self, dest: &str, tar: impl AsyncRead + Send + 'static) -> Result<()> {
        let req = self
            .http
            .request(
                Method::PUT,
                &self.path(&format!("/tar?path={}", seg(dest))),
                &self.secret,
            )
            .header("Content-Type", "application/x-tar")
            .body(reader_body(tar));
        self.http.send(req).await.map(|_| ())
    }

    /// Packs the local directory `local` (its contents, not the directory itself) with `tar` and
    /// unpacks it into `dest` in the capsule.
    pub async fn upload_dir(&self, local: impl AsRef<Path>, dest: &str) -> Result<()> {
        let local = local.as_ref().to_owned();
        let tar = tokio::task::spawn_blocking(move || pack_dir(&local))
            .await
            .map_err(|e| Error::internal("packing the directory panicked").with_source(e))??;
        let req = self
            .http
            .request(
                Method::PUT,
                &self.path(&format!("/tar?path={}", seg(dest))),
                &self.secret,
            )
            .header("Content-Type", "application/x-tar")
            .body(tar);
        self.http.send(req).await.map(|_| ())
    }

    /// Packs `path` in the capsule as a tar stream.
    pub async fn download_tar(&self, path: &str) -> Result<ByteStream> {
        self.download(&format!("/tar?path={}", seg(path))).await
    }

    async fn download(&self, tail: &str) -> Result<ByteStream> {
        let resp = self
            .http
            .send(self.http.request(Method::GET, &self.path(tail), &self.secret))
            .await?;
        let h = self.http.clone();
        Ok(Box::pin(resp.bytes_stream().map_err(move |e| h.transport(e))))
    }

    // ---- URL ----

    /// Sets or replaces the one public URL (`access`: `token` or `public`); the answer carries
    /// its absolute address in `href`.
    pub async fn expose(&self, port: u16, access: &str) -> Result<ExposedUrl> {
        let body = ExposeRequest {
            port,
            access: Some(access.to_owned()),
        };
        self.http
            .json(Method::PUT, &self.path("/url"), &self.secret, Some(&body))
            .await
    }

    /// The public URL with its address, or `None` when the capsule has none.
    pub async fn url(&self) -> Result<Option<ExposedUrl>> {
        #[derive(serde::Deserialize)]
        struct WithUrl {
            url: Option<ExposedUrl>,
        }
        Ok(self.get::<WithUrl>("").await?.url)
    }

    /// Mints a `preview` token that opens this capsule's URL and nothing else, valid for `ttl`
    /// (1 s to 7 days, whole seconds). The secret is shown this once.
    pub async fn preview_token(&self, ttl: Duration) -> Result<TokenCreated> {
        let secs = ttl.as_secs();
        if secs == 0 || secs > 7 * 24 * 3600 || ttl.subsec_nanos() != 0 {
            return Err(Error::invalid_input(format!(
                "a preview token lives 1 s to 7 days in whole seconds, not {ttl:?}"
            )));
        }
        let body = PreviewTokenRequest { ttl_secs: Some(secs) };
        self.http
            .json(Method::POST, &self.path("/preview-token"), &self.secret, Some(&body))
            .await
    }

    pub async fn unexpose(&self) -> Result<()> {
        self.http
            .empty(Method::DELETE, &self.path("/url"), &self.secret, None::<&()>)
            .await
    }

    // ---- lifecycle ----

    pub async fn sleep(&self) -> Result<CapsuleRecord> {
        self.post("/sleep").await
    }
    pub async fn wake(&self) -> Result<CapsuleRecord> {
        self.post("/wake").await
    }
    pub async fn restart(&self) -> Result<CapsuleRecord> {
        self.post("/restart").await
    }
    /// Terminates (idempotent).
    pub async fn terminate(&self) -> Result<CapsuleRecord> {
        self.http
            .json(Method::DELETE, &self.path(""), &self.secret, None::<&()>)
            .await
    }

    /// Changes limits; `.await` applies them.
    pub fn update(&self) -> UpdateBuilder {
        UpdateBuilder {
            handle: self.clone(),
            body: CapsuleUpdate::default(),
        }
    }
}

fn reader_body(r: impl AsyncRead + Send + 'static) -> reqwest::Body {
    reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(r))
}

/// Packs the contents of `dir` into a tar archive in memory.
fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::invalid_input(format!("{} is not a readable directory", dir.display())).with_source(e))?;
    if !meta.is_dir() {
        return Err(Error::invalid_input(format!("{} is not a directory", dir.display())));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .map_err(|e| Error::internal(format!("could not pack {}", dir.display())).with_source(e))?;
    b.into_inner()
        .map_err(|e| Error::internal("could not finish the tar archive").with_source(e))
}

/// Decodes an NDJSON exec stream (`{"stdout": b64}`, `{"stderr": b64}`, `{"exit": ...}`,
/// `{"error": ...}`) into exec events.
/// The exec lines of `resp`; a body that breaks off (the server went away mid-stream) is an
/// `Unavailable` error naming the API at `base`.
fn ndjson(resp: Response, base: &str) -> ExecStream {
    let base = base.to_owned();
    struct St {
        body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        buf: BytesMut,
        done: bool,
    }
    let st = St {
        body: Box::pin(resp.bytes_stream()),
        buf: BytesMut::new(),
        done: false,
    };
    let events = futures::stream::unfold(st, move |mut st| {
        let base = base.clone();
        async move {
            loop {
                if st.done {
                    return None;
                }
                if let Some(i) = st.buf.iter().position(|&b| b == b'\n') {
                    let line = st.buf.split_to(i + 1);
                    let line = &line[..i];
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let ev = decode_line(line);
                    if matches!(ev, Ok(ExecEvent::Exit(_)) | Err(_)) {
                        st.done = true;
                    }
                    return Some((ev, st));
                }
                match st.body.next().await {
                    Some(Ok(b)) => st.buf.extend_from_slice(&b),
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((
                            Err(Error::unavailable(format!(
                                "the Capsules API at {base} broke off the command's output stream"
                            ))
                            .with_source(e)),
                            st,
                        ));
                    }
                    None => {
                        st.done = true;
                        return Some((
                            Err(Error::unavailable(format!(
                                "the Capsules API at {base} ended the command's output without an exit status"
                            ))),
                            st,
                        ));
                    }
                }
            }
        }
    });
    ExecStream {
        events: Box::pin(events),
    }
}

fn decode_line(line: &[u8]) -> Result<ExecEvent> {
    let parsed: ExecLine = serde_json::from_slice(line)
        .map_err(|e| Error::internal("the server sent an exec line this client does not understand").with_source(e))?;
    let b64 = |s: String| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Bytes::from)
            .map_err(|e| Error::internal("the server sent output that is not base64").with_source(e))
    };
    match parsed {
        ExecLine::Stdout(s) => Ok(ExecEvent::Stdout(b64(s)?)),
        ExecLine::Stderr(s) => Ok(ExecEvent::Stderr(b64(s)?)),
        ExecLine::Exit(st) => Ok(ExecEvent::Exit(st)),
        ExecLine::Error(ErrorDetail { kind, message }) => Err(Error::new(crate::wire::kind_from_str(&kind), message)),
    }
}

/// An exec in preparation.
#[must_use = "an exec does nothing until awaited"]
pub struct ExecBuilder {
    handle: CapsuleHandle,
    spec: ExecSpec,
    stdin: Option<Reader>,
}

impl std::fmt::Debug for ExecBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecBuilder").field("spec", &self.spec).finish()
    }
}

impl ExecBuilder {
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.spec.cwd = Some(cwd.into());
        self
    }
    /// Whole seconds (rounded up).
    pub fn timeout(mut self, t: Duration) -> Self {
        let s = t.as_secs() + u64::from(t.subsec_nanos() > 0);
        self.spec.timeout_secs = Some(s.max(1));
        self
    }
    pub fn output_cap(mut self, bytes: u64) -> Self {
        self.spec.output_cap = Some(bytes);
        self
    }
    pub fn stdin(self, data: impl Into<Bytes>) -> Self {
        let d: Bytes = data.into();
        self.stdin_from(std::io::Cursor::new(d))
    }
    /// Streams stdin from any reader.
    pub fn stdin_from(mut self, r: impl AsyncRead + Send + Unpin + 'static) -> Self {
        self.stdin = Some(Box::new(r));
        self
    }

    /// Streams the output as it comes.
    pub async fn stream(self) -> Result<ExecStream> {
        let h = &self.handle;
        let path = h.path("/exec");
        let mut req = h.http.request(Method::POST, &path, &h.secret);
        req = match self.stdin {
            None => req.json(&self.spec),
            Some(r) => {
                let spec = serde_json::to_string(&self.spec)
                    .map_err(|e| Error::internal("could not encode the exec spec").with_source(e))?;
                req.header("Capsule-Exec", spec)
                    .header("Content-Type", "application/octet-stream")
                    .body(reader_body(r))
            }
        };
        let resp = h.http.send(req).await?;
        Ok(ndjson(resp, h.http.base()))
    }

    async fn collect(self) -> Result<ExecOutput> {
        let mut s = self.stream().await?;
        let mut out = ExecOutput::default();
        while let Some(ev) = s.events.next().await {
            match ev? {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(st) => {
                    out.status = st;
                    return Ok(out);
                }
            }
        }
        Err(Error::internal("the command's output ended without an exit status"))
    }
}

impl IntoFuture for ExecBuilder {
    type Output = Result<ExecOutput>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<ExecOutput>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.collect())
    }
}

/// A change of limits in preparation; `.await` applies it.
#[must_use = "an update does nothing until awaited"]
#[derive(Debug)]
pub struct UpdateBuilder {
    handle: CapsuleHandle,
    body: CapsuleUpdate,
}

impl UpdateBuilder {
    pub fn credit_limit(mut self, c: impl Into<String>) -> Self {
        self.body.credit_limit = Some(c.into());
        self
    }
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.body.idle_timeout_secs = Some(d.as_secs());
        self
    }
    pub fn max_runtime(mut self, d: Duration) -> Self {
        self.body.max_runtime_secs = Some(d.as_secs());
        self
    }
    pub fn network(mut self, n: impl Into<String>) -> Self {
        self.body.network = Some(n.into());
        self
    }

    async fn run(self) -> Result<CapsuleRecord> {
        let h = self.handle;
        h.http
            .json(Method::PATCH, &h.path(""), &h.secret, Some(&self.body))
            .await
    }
}

impl IntoFuture for UpdateBuilder {
    type Output = Result<CapsuleRecord>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<CapsuleRecord>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
