//! The web console's static assets under `/console/` (built by `npm run build` in
//! `examples/server/console`), with the security headers every page of it carries.
//!
//! The console is a single page (routing by URL hash), so the server only serves files: it adds
//! no route and no privilege of its own; every call the page makes is a `/v1` call with the
//! token pasted at sign-in. When the assets are not built, `/console/` answers with a page that
//! says how to build them, and the API keeps working.

use std::path::{Component, Path, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The command that builds the assets (printed where they are missing).
pub const BUILD_COMMAND: &str = "cd examples/server/console && npm ci && npm run build";

/// The policy on every console response: scripts and connections only from this origin (CSP 3's
/// `'self'` also matches `ws:` to the same host, so the terminal's WebSocket needs no more), no
/// plugins, no `<base>`, no forms posting elsewhere, no framing. Inline styles are allowed because
/// xterm.js's DOM renderer sets its theme through `<style>` elements; inline script is not.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// Where the built assets are looked for when no directory is given: `CAPSULES_CONSOLE_DIR`, else
/// `console/dist` next to this crate's sources.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("CAPSULES_CONSOLE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("console").join("dist"),
    }
}

/// Whether `dir` holds a built console (its `index.html`).
pub fn is_built(dir: &Path) -> bool {
    dir.join("index.html").is_file()
}

/// `/` (redirect), `/console` (redirect) and `/console/...` (files) over `dir`.
pub fn router(dir: PathBuf) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(index))
        .route("/console/{*path}", get(file))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(dir)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    resp
}

async fn index(State(dir): State<PathBuf>) -> Response {
    let path = dir.join("index.html");
    match tokio::fs::read(&path).await {
        Ok(bytes) => respond(bytes, "text/html; charset=utf-8", "no-cache"),
        Err(_) => not_built(&dir),
    }
}

async fn file(State(dir): State<PathBuf>, axum::extract::Path(rel): axum::extract::Path<String>) -> Response {
    let Some(path) = safe_join(&dir, &rel) else {
        return plain(StatusCode::NOT_FOUND, "no such console file\n");
    };
    let Some(ctype) = content_type(&path) else {
        return plain(StatusCode::NOT_FOUND, "no such console file\n");
    };
    match tokio::fs::read(&path).await {
        // Bundles carry a content hash in their names (see console/build.mjs): cache them for good.
        Ok(bytes) if rel.starts_with("assets/") => respond(bytes, ctype, "public, max-age=31536000, immutable"),
        Ok(bytes) => respond(bytes, ctype, "no-cache"),
        Err(_) if !is_built(&dir) => not_built(&dir),
        Err(_) => plain(StatusCode::NOT_FOUND, "no such console file\n"),
    }
}

/// `dir/rel` when `rel` is plain relative components (no `..`, no root, no hidden files).
fn safe_join(dir: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    let mut out = dir.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(s) if !s.to_string_lossy().starts_with('.') => out.push(s),
            _ => return None,
        }
    }
    Some(out)
}

fn content_type(path: &Path) -> Option<&'static str> {
    Some(match path.extension()?.to_str()? {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "map" | "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

fn respond(bytes: Vec<u8>, ctype: &'static str, cache: &'static str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    (StatusCode::OK, headers, Body::from(bytes)).into_response()
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// The page shown when the assets are missing: what to run, and that the API works meanwhile.
fn not_built(dir: &Path) -> Response {
    let dir = dir.display().to_string();
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Capsules console: not built</title></head>\
<body><h1>The web console is not built</h1>\
<p>Its assets were not found in <code>{}</code>. Build them (needs Node.js and npm) and reload:</p>\
<pre>{}</pre>\
<p>Or point the server at a built copy with <code>--console-dir</code> (or <code>CAPSULES_CONSOLE_DIR</code>). \
The HTTP API (<a href=\"/v1/openapi.json\">/v1/openapi.json</a>) and the <code>capsule</code> CLI work without it.</p>\
</body></html>\n",
        esc(&dir),
        esc(BUILD_COMMAND)
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_join_refuses_escapes_and_hidden_files() {
        let d = Path::new("/srv/console");
        assert_eq!(safe_join(d, "assets/app.js"), Some(d.join("assets/app.js")));
        assert_eq!(safe_join(d, "../secret"), None);
        assert_eq!(safe_join(d, "assets/../../x"), None);
        assert_eq!(safe_join(d, "/etc/passwd"), None);
        assert_eq!(safe_join(d, ".env"), None);
    }

    #[test]
    fn unknown_extensions_are_not_served() {
        assert_eq!(content_type(Path::new("a.js")), Some("text/javascript; charset=utf-8"));
        assert_eq!(content_type(Path::new("a.sh")), None);
        assert_eq!(content_type(Path::new("Makefile")), None);
    }
}
