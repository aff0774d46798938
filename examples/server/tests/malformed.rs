//! Malformed input on every route of `route_table()`: malformed JSON, a body over the limit,
//! unknown fields, the wrong JSON type, the wrong content type, bad names in the path. Each gets a
//! 4xx with the JSON error body naming what was wrong; none gets a 5xx or drops the connection (a
//! panicking handler would).

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore};
use capsules_server::extract::JSON_LIMIT;
use capsules_server::{OPENAPI, app, route_table};
use serde_json::Value;

struct Server {
    url: String,
    owner: String,
    operator: String,
}

async fn server() -> Server {
    let capsules = Capsules::builder()
        .backend(MockBackend::new())
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(capsules)).await.unwrap() });
    let s = Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        operator: boot.operator.secret.expose().to_owned(),
    };
    capsules_client::Capsules::new(&s.url)
        .unwrap()
        .connect(&s.owner)
        .unwrap()
        .create("ok-1")
        .await
        .unwrap();
    s
}

/// Whether openapi.json gives (method, path) a JSON request body.
fn takes_json(method: &str, path: &str) -> bool {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    doc["paths"][path][method.to_lowercase()]["requestBody"]["content"]["application/json"].is_object()
}

/// Whether openapi.json marks that JSON body optional (`required: false`): an empty body is valid.
fn body_optional(method: &str, path: &str) -> bool {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    doc["paths"][path][method.to_lowercase()]["requestBody"]["required"] == Value::Bool(false)
}

/// The path with its parameters filled in; `capsule` for `{capsule}`.
fn fill(path: &str, capsule: &str) -> String {
    path.replace("{capsule}", capsule)
        .replace("{team}", "acme")
        .replace("{id}", "tok_0000000000000000")
        .replace("{handle}", "p-1")
}

/// A body the route accepts (so that only the name in the path is wrong).
fn valid_body(path: &str) -> &'static [u8] {
    if path.ends_with("/exec") || path.ends_with("/processes") {
        br#"{"argv": ["true"]}"#
    } else if path.ends_with("/url") {
        br#"{"port": 8080}"#
    } else if path.ends_with("/signal") {
        br#"{"signal": 15}"#
    } else {
        b"{}"
    }
}

struct Answer {
    status: u16,
    body: Value,
    text: String,
}

async fn send(s: &Server, method: &str, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Answer {
    let token = if path.starts_with("/v1/teams") {
        &s.operator
    } else {
        &s.owner
    };
    let mut r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{}{path}", s.url))
        .bearer_auth(token)
        .body(body);
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    // An error here (connection closed mid-request) is what a panicking handler looks like.
    let resp = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
    }
}

/// A 4xx whose JSON error message contains every one of `words` (case-insensitive).
fn refused(a: &Answer, what: &str, status: &[u16], words: &[&str]) {
    assert!(
        status.contains(&a.status),
        "{what}: status {} (want {status:?}): {}",
        a.status,
        a.text
    );
    let kind = a.body["error"]["kind"].as_str();
    assert!(kind.is_some_and(|k| !k.is_empty()), "{what}: no error kind: {}", a.text);
    let msg = a.body["error"]["message"].as_str().unwrap_or_default().to_lowercase();
    for w in words {
        assert!(
            msg.contains(&w.to_lowercase()),
            "{what}: the message does not say {w:?}: {msg}"
        );
    }
}

/// Not a 5xx; any 4xx carries the JSON error body.
fn no_5xx(a: &Answer, what: &str) {
    assert!(a.status < 500, "{what}: {} {}", a.status, a.text);
    if a.status >= 400 {
        refused(a, what, &[a.status], &[]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_refuses_malformed_input_with_a_4xx() {
    let s = server().await;
    let oversized = {
        let mut v = b"{\"name\": \"".to_vec();
        v.resize(JSON_LIMIT + 10, b'a');
        v.extend_from_slice(b"\"}");
        v
    };
    let limit = JSON_LIMIT.to_string();
    let mut json_routes = 0;
    for (method, path) in route_table() {
        let m = method.as_str();
        let url = fill(path, "ok-1");
        let what = |case: &str| format!("{m} {path} ({case})");
        if takes_json(m, path) {
            json_routes += 1;
            let j = Some("application/json");
            let a = send(&s, m, &url, j, b"{\"name\": ".to_vec()).await;
            refused(&a, &what("malformed JSON"), &[400], &["json"]);
            let a = send(&s, m, &url, j, b"{\"zzz_unknown\": 1}".to_vec()).await;
            refused(&a, &what("unknown field"), &[400], &["zzz_unknown"]);
            let a = send(&s, m, &url, j, b"[1, 2]".to_vec()).await;
            refused(&a, &what("an array"), &[400], &["json"]);
            if !body_optional(m, path) {
                let a = send(&s, m, &url, j, Vec::new()).await;
                refused(&a, &what("empty body"), &[400], &["json"]);
            }
            let a = send(&s, m, &url, j, oversized.clone()).await;
            refused(&a, &what("oversized"), &[413], &[&limit]);
            for ct in [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
            ] {
                let a = send(&s, m, &url, Some(ct), b"{}".to_vec()).await;
                refused(&a, &what(ct), &[415], &["application/json"]);
            }
        } else {
            // Bodies a route does not read change nothing; still never a 5xx.
            for body in [
                b"{\"name\": ".to_vec(),
                b"{\"zzz_unknown\": 1}".to_vec(),
                oversized.clone(),
            ] {
                let a = send(&s, m, &url, Some("application/json"), body).await;
                no_5xx(&a, &what("stray body"));
            }
        }
        if path.contains("{capsule}") {
            let long = "a".repeat(300);
            for bad in ["Bad_Name", long.as_str(), "..%2Fx", "%00", "a%20b"] {
                let url = fill(path, bad);
                let body = if takes_json(m, path) {
                    valid_body(path).to_vec()
                } else {
                    Vec::new()
                };
                let a = send(&s, m, &url, Some("application/json"), body).await;
                refused(&a, &what(&format!("capsule {bad:.20}")), &[400, 404], &[]);
                if a.status == 400 {
                    refused(&a, &what(&format!("capsule {bad:.20}")), &[400], &["name"]);
                }
            }
        }
    }
    assert!(
        json_routes >= 10,
        "only {json_routes} routes take JSON per openapi.json"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_in_bodies_say_what_a_name_may_be() {
    let s = server().await;
    let long = "a".repeat(300);
    for bad in ["Bad_Name", long.as_str(), "../x", "", "-lead"] {
        let body = serde_json::to_vec(&serde_json::json!({ "name": bad })).unwrap();
        let a = send(&s, "POST", "/v1/capsules", Some("application/json"), body.clone()).await;
        refused(&a, &format!("capsule name {bad:.20}"), &[400], &["name"]);
        let a = send(&s, "POST", "/v1/teams", Some("application/json"), body).await;
        refused(&a, &format!("team name {bad:.20}"), &[400], &["name"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_methods_get_405_with_a_kind_naming_path_and_method() {
    let s = server().await;
    for (path, method) in [
        ("/v1/tokens", "PUT"),
        ("/v1/capsules/ok-1/sleep", "GET"),
        ("/v1/team/usage", "POST"),
    ] {
        let a = send(&s, method, path, None, Vec::new()).await;
        refused(&a, &format!("{method} {path}"), &[405], &[path, method]);
        assert_eq!(a.body["error"]["kind"], "invalid_input", "{}", a.text);
    }
}
