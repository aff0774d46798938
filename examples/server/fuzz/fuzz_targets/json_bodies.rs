//! Arbitrary bytes as the JSON body of the routes that parse one (create, update, tokens, exec,
//! spawn, signal, url, teams, grants, caps), through the whole in-process app on the mock
//! backend: every answer is an HTTP status below 500 (a panic or a 5xx is a finding), and every
//! refusal carries the JSON error body with a kind and a message.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, header};
use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct World {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    owner: String,
    operator: String,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (app, owner, operator) = rt.block_on(async {
            let capsules = Capsules::builder()
                .backend(MockBackend::new())
                .store(MemoryStore::new())
                .build()
                .await
                .unwrap();
            let boot = capsules.bootstrap("acme").await.unwrap();
            let c = capsules.connect(boot.owner.secret.expose()).unwrap();
            c.create("fz-1").await.unwrap();
            (
                capsules_server::app(capsules),
                boot.owner.secret.expose().to_owned(),
                boot.operator.secret.expose().to_owned(),
            )
        });
        World { rt, app, owner, operator }
    })
}

/// (method, path, operator?) of the routes with JSON bodies.
const ROUTES: &[(&str, &str, bool)] = &[
    ("POST", "/v1/capsules", false),
    ("PATCH", "/v1/capsules/fz-1", false),
    ("POST", "/v1/tokens", false),
    ("POST", "/v1/capsules/fz-1/exec", false),
    ("POST", "/v1/capsules/fz-1/processes", false),
    ("POST", "/v1/capsules/fz-1/processes/p-1/signal", false),
    ("PUT", "/v1/capsules/fz-1/url", false),
    ("POST", "/v1/teams", true),
    ("POST", "/v1/teams/acme/grants", true),
    ("PUT", "/v1/teams/acme/caps", true),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let w = world();
    let (method, path, op) = ROUTES[pick as usize % ROUTES.len()];
    let token = if op { &w.operator } else { &w.owner };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let resp = w.rt.block_on(w.app.clone().oneshot(req)).unwrap();
    let status = resp.status();
    assert!(status.as_u16() < 500, "{method} {path}: {status} for {body:?}");
    if status.is_client_error() {
        let bytes = w.rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 20)).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\"kind\"") && text.contains("\"message\""), "{status}: {text}");
    }
});
