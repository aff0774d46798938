//! The preview proxy in-process on the mock backend: the app on a loopback port, requests to
//! 127.0.0.1 with `Host: <label>.localhost:<port>` (this machine does not resolve *.localhost).
//! The capsule's port is served by a small HTTP + WebSocket server over the mock's `connect`
//! stream, which reports what reached it (so the tests see what the guest would).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capsules_backend_mock::MockBackend;
use capsules_core::types::TeamCaps;
use capsules_core::{CapsuleId, Capsules, ManualClock, MemoryStore, Scope, TokenSpec};
use capsules_server::{ServerConfig, app_with};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

const PORT: u16 = 8080;
const MIB: usize = 1 << 20;

struct Server {
    addr: std::net::SocketAddr,
    port: u16,
    owner: String,
    operator: String,
    mock: MockBackend,
    clock: Arc<ManualClock>,
    capsules: Capsules,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn server_with(cfg: impl FnOnce(ServerConfig) -> ServerConfig) -> Server {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let mock = MockBackend::with_clock(clock.clone());
    let capsules = Capsules::builder()
        .backend(mock.clone())
        .store(MemoryStore::new())
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = cfg(ServerConfig::default()
        .with_public_port(addr.port())
        .with_traffic_flush(Duration::from_millis(50))
        .unwrap());
    let app = app_with(capsules.clone(), config);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        addr,
        port: addr.port(),
        owner: boot.owner.secret.expose().to_owned(),
        operator: boot.operator.secret.expose().to_owned(),
        mock,
        clock,
        capsules,
    }
}

async fn server() -> Server {
    server_with(|c| c).await
}

fn api(s: &Server) -> capsules_client::Capsules {
    capsules_client::Capsules::new(format!("http://{}", s.addr)).unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A request to the proxy for `label` (path and query in `path`).
fn get(s: &Server, label: &str, path: &str) -> reqwest::RequestBuilder {
    http()
        .get(format!("http://{}{path}", s.addr))
        .header("host", format!("{label}.localhost:{}", s.port))
}

/// What the capsule's server saw of one request (its answer to `/seen`-style paths).
async fn seen(resp: reqwest::Response) -> serde_json::Value {
    assert_eq!(resp.status(), 200, "{resp:?}");
    resp.json().await.unwrap()
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// The capsule's web server: `GET /big?n=N` answers N bytes, `POST /echo` streams the body
/// back, an `Upgrade: websocket` request becomes a WebSocket echo, anything else answers JSON
/// describing the request it got.
async fn web(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let h = |n: &str| {
        req.headers()
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    if req.headers().contains_key("upgrade") {
        let key = req.headers().get("sec-websocket-key").unwrap().as_bytes().to_vec();
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let up = on.await.unwrap();
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() || m.is_binary() {
                    ws.send(m).await.unwrap();
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(&key))
            .body(full(""))
            .unwrap());
    }
    match req.uri().path() {
        "/big" => {
            let n: usize = req.uri().query().unwrap().strip_prefix("n=").unwrap().parse().unwrap();
            Ok(Response::new(full(vec![b'x'; n])))
        }
        "/echo" => {
            let body = req.into_body();
            let s = http_body_util::BodyStream::new(body)
                .map(|f| Ok::<_, Infallible>(Frame::data(f.unwrap().into_data().unwrap_or_default())));
            Ok(Response::new(BodyExt::boxed(StreamBody::new(s))))
        }
        _ => {
            let v = serde_json::json!({
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "query": req.uri().query(),
                "host": h("host"),
                "authorization": h("authorization"),
                "cookie": h("cookie"),
                "connection": h("connection"),
                "x_forwarded_proto": h("x-forwarded-proto"),
            });
            Ok(Response::builder()
                .header("content-type", "application/json")
                .header("x-from", "capsule")
                .body(full(v.to_string()))
                .unwrap())
        }
    }
}

fn serve_web(s: &Server, id: &CapsuleId, port: u16) {
    s.mock
        .serve_port(id, port, |stream| async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(web))
                .with_upgrades()
                .await;
        })
        .unwrap();
}

/// A capsule of the owner's with the web server on PORT, exposed with `access`; its host label.
async fn exposed(s: &Server, name: &str, access: &str) -> (capsules_client::CapsuleHandle, String) {
    let c = api(s).connect(&s.owner).unwrap();
    let cap = c.create(name).await.unwrap();
    let id = cap.created().unwrap().id.clone();
    serve_web(s, &id, PORT);
    let url = cap.expose(PORT, access).await.unwrap();
    assert_eq!(url.href, format!("http://{}.localhost:{}/", url.host_label, s.port));
    (cap, url.host_label)
}

async fn traffic_bytes(cap: &capsules_client::CapsuleHandle) -> u64 {
    cap.usage().await.unwrap().usage.preview_bytes
}

#[tokio::test]
async fn token_urls_need_a_token_that_can_read_the_capsule() {
    let s = server().await;
    let (cap, label) = exposed(&s, "web-1", "token").await;
    let (_other, other_label) = exposed(&s, "web-2", "token").await;

    // No token: 401 saying how to get one.
    let r = get(&s, &label, "/").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    let text = r.text().await.unwrap();
    assert!(text.contains("capsule url web-1 --preview-token"), "{text}");

    // The owner's API token as a bearer: through, and the guest never sees it.
    let v = seen(get(&s, &label, "/a/b?x=1").bearer_auth(&s.owner).send().await.unwrap()).await;
    assert_eq!(v["path"], "/a/b");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["authorization"], serde_json::json!([]), "{v}");
    assert_eq!(v["host"], serde_json::json!([format!("{label}.localhost:{}", s.port)]));
    assert_eq!(v["x_forwarded_proto"], serde_json::json!(["http"]));

    // A preview token for this capsule opens it; for another capsule it does not.
    let pt = cap.preview_token(Duration::from_secs(600)).await.unwrap();
    assert!(pt.token.scopes.contains(&Scope::Preview));
    seen(get(&s, &label, "/").bearer_auth(&pt.secret).send().await.unwrap()).await;
    let r = get(&s, &other_label, "/").bearer_auth(&pt.secret).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("preview token"));

    // A token whose prefix does not reach the capsule: 403; a made-up one: 401.
    let agent = api(&s)
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap();
    let r = get(&s, &label, "/").bearer_auth(&agent.secret).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let bogus = format!("{}x", &pt.secret[..pt.secret.len() - 1]);
    let r = get(&s, &label, "/").bearer_auth(&bogus).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("--preview-token"));

    // A revoked preview token is refused at once.
    api(&s).tokens(&s.owner).revoke(pt.id.as_str()).await.unwrap();
    let r = get(&s, &label, "/").bearer_auth(&pt.secret).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The preview token opens nothing in the API.
    let pt = cap.preview_token(Duration::from_secs(600)).await.unwrap();
    let e = api(&s).connect(&pt.secret).unwrap().list().await.unwrap_err();
    assert_eq!(e.kind(), capsules_core::ErrorKind::PermissionDenied, "{e}");

    // Someone else's Authorization (the guest app's own) passes through untouched.
    let v = seen(
        get(&s, &label, "/")
            .bearer_auth(&s.owner)
            .header("cookie", "app=1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["cookie"], serde_json::json!(["app=1"]));
}

#[tokio::test]
async fn public_urls_open_for_anyone_and_never_see_our_tokens() {
    let s = server().await;
    let (_cap, label) = exposed(&s, "pub-1", "public").await;
    let r = get(&s, &label, "/hi").send().await.unwrap();
    assert_eq!(r.headers()["x-from"], "capsule");
    // Even here a query token must be a token: it would become a cookie.
    let bad = get(&s, &label, "/?capsule_token=x%3B%20Domain%3Dlocalhost")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get("set-cookie").is_none());
    let v = seen(r).await;
    assert_eq!(v["method"], "GET");
    let v = seen(
        get(&s, &label, "/")
            .bearer_auth(&s.owner)
            .header("cookie", "capsule_token=cap_x_y; theme=dark")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["authorization"], serde_json::json!([]));
    assert_eq!(v["cookie"], serde_json::json!(["theme=dark"]));
    // Any method, bodies streamed both ways.
    let body = vec![7u8; 300_000];
    let r = http()
        .post(format!("http://{}/echo", s.addr))
        .header("host", format!("{label}.localhost:{}", s.port))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    let r = http()
        .delete(format!("http://{}/thing", s.addr))
        .header("host", format!("{label}.localhost:{}", s.port))
        .send()
        .await
        .unwrap();
    assert_eq!(seen(r).await["method"], "DELETE");
}

#[tokio::test]
async fn a_browser_trades_the_query_token_for_a_host_only_cookie() {
    let s = server().await;
    let (cap, label) = exposed(&s, "web-c", "token").await;
    let pt = cap.preview_token(Duration::from_secs(600)).await.unwrap();
    let url = cap.url().await.unwrap().unwrap();
    assert!(
        url.browser_url(&pt.secret)
            .ends_with(&format!("/?capsule_token={}", pt.secret))
    );

    let r = get(&s, &label, &format!("/page?a=1&capsule_token={}&b=2", pt.secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/page?a=1&b=2");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with(&format!("capsule_token={};", pt.secret)), "{cookie}");
    for attr in ["HttpOnly", "Path=/", "SameSite=Lax"] {
        assert!(cookie.split("; ").any(|a| a == attr), "{attr} missing: {cookie}");
    }
    assert!(!cookie.to_ascii_lowercase().contains("domain"), "host-only: {cookie}");
    assert!(!cookie.contains("Secure"), "not over TLS: {cookie}");

    // The browser follows with the cookie: through, with the query as it was minus the token,
    // and the cookie kept from the guest.
    let v = seen(
        get(&s, &label, "/page?a=1&b=2")
            .header("cookie", format!("capsule_token={}", pt.secret))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["query"], "a=1&b=2");
    assert_eq!(v["cookie"], serde_json::json!([]));

    // Without the query, the path alone.
    let r = get(&s, &label, &format!("/?capsule_token={}", pt.secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/");

    // A bad query token: 401, no cookie; a stale cookie: 401 and the cookie is cleared.
    let r = get(&s, &label, "/?capsule_token=cap_nope_nope").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    api(&s).tokens(&s.owner).revoke(pt.id.as_str()).await.unwrap();
    let r = get(&s, &label, "/")
        .header("cookie", format!("capsule_token={}", pt.secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
}

#[tokio::test]
async fn tls_cookies_are_secure() {
    let s = server_with(|c| c.with_tls(true)).await;
    let (cap, label) = exposed_tls(&s).await;
    let pt = cap.preview_token(Duration::from_secs(60)).await.unwrap();
    let r = get(&s, &label, &format!("/?capsule_token={}", pt.secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().ends_with("; Secure"));
}

async fn exposed_tls(s: &Server) -> (capsules_client::CapsuleHandle, String) {
    let c = api(s).connect(&s.owner).unwrap();
    let cap = c.create("tls-1").await.unwrap();
    let url = cap.expose(PORT, "token").await.unwrap();
    assert_eq!(url.href, format!("https://{}.localhost:{}/", url.host_label, s.port));
    (cap, url.host_label)
}

#[tokio::test]
async fn unknown_labels_are_404_and_the_api_keeps_its_hosts() {
    let s = server().await;
    let (cap, label) = exposed(&s, "web-u", "public").await;
    let r = get(&s, "nope-aaaaaaaa", "/").send().await.unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("no capsule is exposed at nope-aaaaaaaa.localhost"),
        "{text}"
    );
    // A client that asks for JSON gets the API's error shape.
    let r = get(&s, "nope-aaaaaaaa", "/")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["kind"], "not_found");

    // The API answers on the bare host, by address or by name, with url.href in capsule JSON.
    for host in [format!("127.0.0.1:{}", s.port), format!("localhost:{}", s.port)] {
        let r = http()
            .get(format!("http://{}/v1/capsules", s.addr))
            .header("host", host)
            .bearer_auth(&s.owner)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v["capsules"][0]["url"]["href"],
            format!("http://{label}.localhost:{}/", s.port)
        );
    }
    let r = http()
        .get(format!("http://{}/v1/capsules/web-u", s.addr))
        .bearer_auth(&s.owner)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["url"]["href"], format!("http://{label}.localhost:{}/", s.port));
    assert_eq!(v["url"]["port"], PORT);
    // On the preview host, /v1 is the capsule's path, not the API.
    let v = seen(get(&s, &label, "/v1/capsules").send().await.unwrap()).await;
    assert_eq!(v["path"], "/v1/capsules");

    // A removed URL is unknown at once.
    cap.unexpose().await.unwrap();
    assert_eq!(get(&s, &label, "/").send().await.unwrap().status(), 404);
    assert!(cap.url().await.unwrap().is_none());
}

#[tokio::test]
async fn preview_token_endpoint_validates_and_answers_like_tokens_create() {
    let s = server().await;
    let (cap, _label) = exposed(&s, "web-t", "token").await;
    let url = |p: &str| format!("http://{}/v1/capsules/web-t{p}", s.addr);
    let r = http()
        .post(url("/preview-token"))
        .bearer_auth(&s.owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["secret"].as_str().unwrap().starts_with("cap_"));
    assert_eq!(v["id"], v["token"]["id"]);
    assert_eq!(v["token"]["scopes"], serde_json::json!(["preview"]));
    assert_eq!(v["token"]["capsule"], cap.status().await.unwrap().id.as_str());
    let ttl_ms = v["token"]["expires_at_ms"].as_i64().unwrap() - v["token"]["created_at_ms"].as_i64().unwrap();
    assert_eq!(ttl_ms, 3600 * 1000);
    for (body, status) in [
        (r#"{"ttl_secs": 0}"#, 400),
        (r#"{"ttl_secs": 604801}"#, 400),
        (r#"{"ttl": 5}"#, 400),
        (r#"{"ttl_secs": "#, 400),
        (r#"{"ttl_secs": 120}"#, 201),
    ] {
        let r = http()
            .post(url("/preview-token"))
            .bearer_auth(&s.owner)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
    let e = cap.preview_token(Duration::from_secs(8 * 24 * 3600)).await.unwrap_err();
    assert_eq!(e.kind(), capsules_core::ErrorKind::InvalidInput);
    // No token, no mint.
    let r = http().post(url("/preview-token")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn websockets_upgrade_through_the_proxy() {
    let s = server().await;
    let (cap, label) = exposed(&s, "web-ws", "token").await;
    let ws_req = |token: Option<&str>| {
        let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert(
            "host",
            HeaderValue::from_str(&format!("{label}.localhost:{}", s.port)).unwrap(),
        );
        if let Some(t) = token {
            h.insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
        }
        req
    };
    // Same token rules as HTTP.
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let e = tokio_tungstenite::client_async(ws_req(None), tcp).await.unwrap_err();
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 401),
        e => panic!("expected a 401, got {e}"),
    }
    let pt = cap.preview_token(Duration::from_secs(600)).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(ws_req(Some(&pt.secret)), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    let blob = vec![3u8; 200_000];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));

    // A long stream reports its traffic while it is open (every flush interval), not only at
    // its end.
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = loop {
        let n = traffic_bytes(&cap).await;
        if n >= 400_000 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the open stream's bytes are not metered: {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ws.send(Message::binary(vec![1u8; 100_000])).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while traffic_bytes(&cap).await < before + 200_000 {
        assert!(
            Instant::now() < deadline,
            "no traffic recorded while the stream is open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn traffic_is_metered_both_ways_and_counts_as_activity() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("web-m").idle_timeout(Duration::from_secs(120)).await.unwrap();
    serve_web(&s, &cap.created().unwrap().id, PORT);
    let label = cap.expose(PORT, "public").await.unwrap().host_label;

    // 1.5 MiB up, 1.5 MiB back: three whole MiB charged as traffic.
    let body = vec![9u8; 3 * MIB / 2];
    let r = http()
        .post(format!("http://{}/echo", s.addr))
        .header("host", format!("{label}.localhost:{}", s.port))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 3 * MIB / 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    let u = loop {
        let u = cap.usage().await.unwrap();
        if u.usage.traffic_mib >= 3 {
            break u;
        }
        assert!(Instant::now() < deadline, "traffic not charged: {:?}", u.usage);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(u.usage.preview_bytes >= 3 * MIB as u64, "{:?}", u.usage);
    assert!(
        u.usage.preview_bytes < 3 * MIB as u64 + 10_000,
        "headers only on top: {:?}",
        u.usage
    );
    assert_eq!(u.usage.traffic_mib, 3);
    assert_eq!(
        u.usage.traffic_cost.micros(),
        3 * s.capsules.rates().traffic_mib.micros()
    );
    let ledger = c.ledger().await.unwrap();
    assert!(ledger.entries.iter().any(|e| e.entry.kind.as_str() == "traffic"));

    // Activity: traffic 100 s into an idle timeout of 120 s keeps it awake at 200 s...
    s.clock.advance(Duration::from_secs(100));
    seen(get(&s, &label, "/").send().await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.clock.advance(Duration::from_secs(100));
    s.capsules.tick().await;
    assert_eq!(cap.status().await.unwrap().state.as_str(), "running");
    // ...and without more traffic it sleeps once the timeout has passed.
    s.clock.advance(Duration::from_secs(30));
    s.capsules.tick().await;
    assert_eq!(cap.status().await.unwrap().state.as_str(), "sleeping");
}

#[tokio::test]
async fn a_request_wakes_a_sleeping_capsule_and_is_held_until_the_port_accepts() {
    let s = server().await;
    let (cap, label) = exposed(&s, "web-s", "token").await;
    let id = cap.status().await.unwrap().id;
    assert_eq!(cap.sleep().await.unwrap().state.as_str(), "sleeping");
    let v = seen(get(&s, &label, "/woke").bearer_auth(&s.owner).send().await.unwrap()).await;
    assert_eq!(v["path"], "/woke");
    assert_eq!(cap.status().await.unwrap().state.as_str(), "running");

    // Asleep, and nothing listens yet: the request waits for the server that starts a second
    // after the wake instead of failing fast.
    cap.sleep().await.unwrap();
    s.mock.stop_serving(&id, PORT);
    let (mock, id2) = (s.mock.clone(), id.clone());
    let started = Instant::now();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s2 = mock.clone();
        s2.serve_port(&id2, PORT, |stream| async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(web))
                .with_upgrades()
                .await;
        })
        .unwrap();
    });
    let v = seen(get(&s, &label, "/held").bearer_auth(&s.owner).send().await.unwrap()).await;
    assert_eq!(v["path"], "/held");
    assert!(started.elapsed() >= Duration::from_secs(1));
    late.await.unwrap();
}

#[tokio::test]
async fn the_hold_is_bounded_and_limits_answer_at_once() {
    let s = server_with(|c| c.with_preview_hold(Duration::from_secs(1)).unwrap()).await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("web-h").await.unwrap();
    let label = cap.expose(3000, "public").await.unwrap().host_label;
    let started = Instant::now();
    let r = get(&s, &label, "/").send().await.unwrap();
    assert_eq!(r.status(), 504);
    let text = r.text().await.unwrap();
    assert!(text.contains("port 3000 of capsule web-h"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A team cap that forbids the wake: the API's status and message, without waiting.
    cap.sleep().await.unwrap();
    c.create("web-h2").await.unwrap();
    let team = c.usage().await.unwrap();
    assert_eq!(team.running, 1);
    let op = api(&s).operator(&s.operator);
    op.set_caps(
        "acme",
        TeamCaps {
            max_running: 1,
            ..TeamCaps::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let r = get(&s, &label, "/").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(text.contains("running"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(cap.status().await.unwrap().state.as_str(), "sleeping");
}
