//! # capsules-server
//!
//! The Capsules example server: the `/v1` HTTP API over [`capsules_core::Capsules`], JSON in and
//! out, bearer tokens (`Authorization: Bearer cap_...`). [`app`] builds the whole app, so tests
//! drive it in-process; the `capsules-server` binary adds flags, bootstrap and the lifecycle jobs.
//!
//! ```no_run
//! # async fn run() -> capsules_core::Result<()> {
//! use capsules_backend_mock::MockBackend;
//! use capsules_core::{Capsules, MemoryStore};
//!
//! let capsules = Capsules::builder().backend(MockBackend::new()).store(MemoryStore::new()).build().await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await.unwrap();
//! axum::serve(listener, capsules_server::app(capsules)).await.unwrap();
//! # Ok(())
//! # }
//! ```
//!
//! Every route is in [`route_table`] and in the OpenAPI document served at `/v1/openapi.json`.
//! In front of the API, on the same port, sits the **preview proxy**: a request whose `Host` is
//! `<host label>.<preview domain>[:port]` (default domain `localhost`, see [`ServerConfig`]) goes
//! to the port the capsule exposes (through the backend's `connect`, waking it if it sleeps);
//! every other host is the API's. [`app_with`] takes the configuration.
//!
//! Beside the API, under `/console/`, the server serves the web console's built assets
//! ([`webconsole`]; the directory is [`ServerConfig::with_console_dir`]).
//!
//! ## The console
//!
//! - `POST /v1/capsules/{capsule}/console/ticket` with the bearer token → 201
//!   `{"ticket":"ct_<64 hex>","expires_in_secs":30}`. The same checks as opening a console
//!   (`capsules:write` on a capsule in reach that is not terminated or failed). A ticket is
//!   single-use, lasts 30 s, is bound to the token and the capsule, and is not a token: on use the
//!   token behind it is authenticated again (one revoked since is refused with 401). The server
//!   keeps only its SHA-256, in memory (at most [`console::MAX_TICKETS`] outstanding,
//!   [`console::MAX_TICKETS_PER_TOKEN`] per token).
//! - `GET /v1/capsules/{capsule}/console?cols=N&rows=N[&ticket=ct_...]`: a WebSocket upgrade onto
//!   the login shell in `/workspace` (a sleeping capsule is woken first). Auth is
//!   `Authorization: Bearer <token>` (the CLI) or `ticket` (browsers cannot set headers on a
//!   WebSocket), not both. `cols` and `rows` are 1-1000 (default 80x24). Errors before the upgrade
//!   are the API's JSON errors: 400 (bad size, query or name), 401, 403, 404, 409, 426 (not a
//!   WebSocket upgrade), 503.
//! - After the upgrade, client → server: binary frames are bytes for the terminal (Ctrl-C is
//!   `0x03`); text frames are JSON control messages, `{"type":"resize","cols":N,"rows":N}`. A bad
//!   one is answered with the text frame `{"type":"error","message":"..."}` (no `kind`) and the
//!   session goes on.
//! - Server → client: binary frames are terminal output. When the program exits:
//!   `{"type":"exit","code":N}` (128 + signal for a signal), then a close (1000). When the session
//!   ends otherwise (the capsule was terminated: `conflict`; it went to sleep: `unavailable`):
//!   `{"type":"error","kind":"...","message":"..."}`, then a close (1000).
//! - The server pings every 20 s and drops a client silent for 60 s. Closing the WebSocket
//!   detaches: core records `console_attached` / `console_detached`, and an attached console
//!   counts as activity.

mod config;
pub mod console;
pub mod error;
pub mod extract;
mod handlers;
mod ndjson;
mod proxy;
pub mod tls;
mod view;
pub mod webconsole;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use capsules_core::Capsules;
use capsules_core::records::CapsuleRecord;

pub use config::{DEFAULT_PREVIEW_HOLD, DEFAULT_TRAFFIC_FLUSH, ServerConfig};
pub use error::{ApiError, status_for};

/// The OpenAPI document of the `/v1` API (hand-written).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Idempotent creates: (hash of the caller's secret, key) → the capsule the first call made.
type IdemMap = HashMap<(String, String), Arc<tokio::sync::OnceCell<CapsuleRecord>>>;

#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) capsules: Capsules,
    pub(crate) idempotency: Arc<Mutex<IdemMap>>,
    pub(crate) tickets: Arc<console::Tickets>,
    pub(crate) config: Arc<ServerConfig>,
}

/// Builds the app with the default [`ServerConfig`]: every `/v1` route over `capsules`, the
/// preview proxy under `*.localhost`, and the web console from [`webconsole::default_dir`].
pub fn app(capsules: Capsules) -> Router {
    app_with(capsules, ServerConfig::default())
}

/// Builds the app: the preview proxy for hosts under the preview domain, every `/v1` route and
/// the web console (`/console/`) for the rest.
pub fn app_with(capsules: Capsules, config: ServerConfig) -> Router {
    let console = webconsole::router(config.console_dir().to_path_buf());
    let config = Arc::new(config);
    let proxy = proxy::Proxy::new(capsules.preview(), config.clone());
    let state = AppState {
        capsules,
        idempotency: Arc::default(),
        tickets: Arc::default(),
        config,
    };
    let api = routes()
        .0
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .merge(console)
        .layer(axum::middleware::from_fn(log_request));
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(proxy, proxy::dispatch))
}

tokio::task_local! {
    /// The port the API request being answered came to (from its `Host`), for URLs in answers.
    static REQUEST_PORT: Option<u16>;
}

/// The port of the API request being answered, if its `Host` named one.
pub(crate) fn request_port() -> Option<u16> {
    REQUEST_PORT.try_with(|p| *p).ok().flatten()
}

/// Every (method, path) the router serves, in the router's own path syntax.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().1
}

struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add(mut self, method: Method, path: &'static str, route: MethodRouter<AppState>) -> Self {
        self.table.push((method, path));
        self.router = self.router.route(path, route);
        self
    }
}

fn routes() -> (Router<AppState>, Vec<(Method, &'static str)>) {
    use handlers as h;
    // Routes sharing a path are added one method at a time; axum merges them.
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    let r = r
        .add(Method::GET, "/v1/openapi.json", get(openapi))
        .add(Method::GET, "/v1/sizes", get(h::sizes))
        // tokens
        .add(Method::POST, "/v1/tokens", post(h::create_token))
        .add(Method::GET, "/v1/tokens", get(h::list_tokens))
        .add(Method::DELETE, "/v1/tokens/{id}", delete(h::revoke_token))
        // capsules
        .add(Method::POST, "/v1/capsules", post(h::create_capsule))
        .add(Method::GET, "/v1/capsules", get(h::list_capsules))
        .add(Method::GET, "/v1/capsules/{capsule}", get(h::get_capsule))
        .add(Method::PATCH, "/v1/capsules/{capsule}", patch(h::update_capsule))
        .add(Method::DELETE, "/v1/capsules/{capsule}", delete(h::terminate_capsule))
        .add(Method::POST, "/v1/capsules/{capsule}/sleep", post(h::sleep_capsule))
        .add(Method::POST, "/v1/capsules/{capsule}/wake", post(h::wake_capsule))
        .add(Method::POST, "/v1/capsules/{capsule}/restart", post(h::restart_capsule))
        // commands
        .add(Method::POST, "/v1/capsules/{capsule}/exec", post(h::exec))
        .add(Method::POST, "/v1/capsules/{capsule}/processes", post(h::spawn))
        .add(Method::GET, "/v1/capsules/{capsule}/processes", get(h::processes))
        .add(
            Method::GET,
            "/v1/capsules/{capsule}/processes/{handle}/output",
            get(h::process_output),
        )
        .add(
            Method::POST,
            "/v1/capsules/{capsule}/processes/{handle}/signal",
            post(h::signal),
        )
        // console
        .add(
            Method::POST,
            "/v1/capsules/{capsule}/console/ticket",
            post(console::issue_ticket),
        )
        .add(Method::GET, "/v1/capsules/{capsule}/console", get(console::console))
        // files
        .add(Method::PUT, "/v1/capsules/{capsule}/files", put(h::write_file))
        .add(Method::GET, "/v1/capsules/{capsule}/files", get(h::read_file))
        .add(Method::DELETE, "/v1/capsules/{capsule}/files", delete(h::remove_file))
        .add(Method::GET, "/v1/capsules/{capsule}/files/list", get(h::list_files))
        .add(Method::PUT, "/v1/capsules/{capsule}/tar", put(h::upload_tar))
        .add(Method::GET, "/v1/capsules/{capsule}/tar", get(h::download_tar))
        // usage, audit, logs
        .add(Method::GET, "/v1/capsules/{capsule}/usage", get(h::capsule_usage))
        .add(Method::GET, "/v1/capsules/{capsule}/events", get(h::capsule_events))
        .add(Method::GET, "/v1/capsules/{capsule}/logs", get(h::capsule_logs))
        // URL
        .add(Method::PUT, "/v1/capsules/{capsule}/url", put(h::expose))
        .add(Method::DELETE, "/v1/capsules/{capsule}/url", delete(h::unexpose))
        .add(
            Method::POST,
            "/v1/capsules/{capsule}/preview-token",
            post(h::preview_token),
        )
        // team
        .add(Method::GET, "/v1/team/usage", get(h::team_usage))
        .add(Method::GET, "/v1/team/ledger", get(h::team_ledger))
        .add(Method::GET, "/v1/team/events", get(h::team_events))
        // operator
        .add(Method::POST, "/v1/teams", post(h::create_team))
        .add(Method::POST, "/v1/teams/{team}/grants", post(h::grant))
        .add(Method::PUT, "/v1/teams/{team}/caps", put(h::set_caps));
    (r.router, r.table)
}

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    capsules_core::Error::not_found(format!(
        "there is no route {method} {}; see /v1/openapi.json",
        uri.path()
    ))
    .into()
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::invalid(format!("{} does not take {method}; see /v1/openapi.json", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::info!(%method, %path, status = resp.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    resp
}
