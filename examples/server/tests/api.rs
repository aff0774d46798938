//! The API in-process (the app on a loopback port) on the mock backend, through
//! `capsules-client` and raw HTTP.

use std::collections::BTreeSet;

use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::{Capsules, ErrorKind, MemoryStore, Scope, TokenSpec};
use capsules_server::{app, route_table, status_for};

struct Server {
    url: String,
    owner: String,
    operator: String,
    mock: MockBackend,
}

async fn server() -> Server {
    let mock = MockBackend::new();
    let capsules = Capsules::builder()
        .backend(mock.clone())
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(capsules)).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        operator: boot.operator.secret.expose().to_owned(),
        mock,
    }
}

fn api(s: &Server) -> capsules_client::Capsules {
    capsules_client::Capsules::new(&s.url).unwrap()
}

async fn agent(s: &Server) -> String {
    api(s)
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap()
        .secret
}

/// (status, parsed JSON body) of a raw request.
async fn raw(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, serde_json::Value) {
    let mut r = reqwest::Client::new().request(method, format!("{}{path}", s.url));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.header("content-type", "application/json").body(b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn assert_error_body(v: &serde_json::Value, kind: &str) {
    assert_eq!(v["error"]["kind"], kind, "body: {v}");
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {v}"
    );
}

#[tokio::test]
async fn quickstart_through_the_client() {
    let s = server().await;
    s.mock.on_exec(
        ExecMatcher::exact(["npm", "test"]),
        ExecReply::new().stdout("1 passing\n").exit_code(0),
    );
    let capsules = api(&s);
    let agent = capsules
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap();
    assert!(agent.secret.starts_with("cap_"));
    let client = capsules.connect(&agent.secret).unwrap();
    let cap = client
        .create("agent-pr-482")
        .size("2x2gb")
        .credit_limit("2.00")
        .await
        .unwrap();
    let project = concat!(env!("CARGO_MANIFEST_DIR"), "/../quickstart/project");
    cap.upload_dir(project, "/workspace").await.unwrap();
    let files = cap.list_dir("/workspace").await.unwrap();
    assert!(files.iter().any(|f| f.name == "package.json"), "{files:?}");
    let out = cap.exec(["npm", "test"]).await.unwrap();
    assert_eq!(out.exit_code(), 0);
    assert_eq!(out.stdout_lossy(), "1 passing\n");
    cap.terminate().await.unwrap();

    // The name still resolves for usage after terminate.
    let u = client.capsule("agent-pr-482").unwrap().usage().await.unwrap();
    assert_eq!(u.capsule.state.as_str(), "terminated");
    assert!(u.usage.compute_minutes >= 1, "{:?}", u.usage);
    let kinds: Vec<&str> = u.events.iter().map(|e| e.kind().name()).collect();
    assert!(kinds.contains(&"created"), "{kinds:?}");
    assert!(kinds.contains(&"exec"), "{kinds:?}");
    assert!(
        u.events.iter().any(|e| matches!(
            e.kind(),
            capsules_core::events::EventKind::StateChanged { to, .. } if to.as_str() == "terminated"
        )),
        "{kinds:?}"
    );

    // A clear prefix error for a name outside the token's prefix.
    let e = client.create("other-1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.message().contains("agent-"), "{e}");
}

#[tokio::test]
async fn prefix_bounds_what_a_token_sees_and_does() {
    let s = server().await;
    let owner = api(&s).connect(&s.owner).unwrap();
    owner.create("other-1").await.unwrap();
    let agent = api(&s).connect(agent(&s).await).unwrap();
    assert!(agent.list().await.unwrap().is_empty());
    let other = agent.capsule("other-1").unwrap();
    for e in [
        other.status().await.unwrap_err(),
        other.exec(["ls"]).await.unwrap_err(),
        other.terminate().await.unwrap_err(),
    ] {
        assert!(
            matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::NotFound),
            "{e:?}"
        );
    }
    // Still running for its owner.
    let st = owner.capsule("other-1").unwrap().status().await.unwrap();
    assert_eq!(st.state.as_str(), "running");
}

#[tokio::test]
async fn revoked_token_gets_401_at_once() {
    let s = server().await;
    let capsules = api(&s);
    let t = capsules
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap();
    let c = capsules.connect(&t.secret).unwrap();
    c.list().await.unwrap();
    capsules.tokens(&s.owner).revoke(t.id.as_str()).await.unwrap();
    let e = c.list().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated);
    let (status, body) = raw(&s, reqwest::Method::GET, "/v1/capsules", Some(&t.secret), None).await;
    assert_eq!(status, 401);
    assert_error_body(&body, "unauthenticated");
    let (status, body) = raw(&s, reqwest::Method::GET, "/v1/capsules", None, None).await;
    assert_eq!(status, 401);
    assert_error_body(&body, "unauthenticated");
}

#[tokio::test]
async fn twenty_concurrent_creates_of_one_name() {
    let s = server().await;
    let client = api(&s).connect(&s.owner).unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.create("dup").await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e:?}");
                assert!(e.message().contains("dup"), "{e}");
            }
        }
    }
    assert_eq!(ok, 1);
    let body = br#"{"name":"dup"}"#.to_vec();
    let (status, v) = raw(&s, reqwest::Method::POST, "/v1/capsules", Some(&s.owner), Some(body)).await;
    assert_eq!(status, 409);
    assert_error_body(&v, "already_exists");
}

#[tokio::test]
async fn idempotency_key_answers_with_the_first_capsule() {
    let s = server().await;
    let client = api(&s).connect(&s.owner).unwrap();
    let a = client.create("idem").idempotency_key("k1").await.unwrap();
    let b = client.create("idem").idempotency_key("k1").await.unwrap();
    assert_eq!(a.target(), b.target());
    assert_eq!(client.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_4xx_with_the_json_error_body() {
    let s = server().await;
    let post = reqwest::Method::POST;
    let t = Some(s.owner.as_str());
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed", b"{\"name\": ".to_vec(), 400),
        ("unknown field", br#"{"name":"ok-1","colour":"red"}"#.to_vec(), 400),
        ("bad name", br#"{"name":"Bad_Name!"}"#.to_vec(), 400),
        ("bad size", br#"{"name":"ok-2","size":"64x1tb"}"#.to_vec(), 400),
        ("windows", br#"{"name":"ok-3","image":"windows-11"}"#.to_vec(), 422),
        ("wrong type", br#"{"name": 5}"#.to_vec(), 400),
        ("empty", Vec::new(), 400),
        ("oversized", vec![b' '; 2 << 20], 413),
    ];
    for (what, body, want) in cases {
        let (status, v) = raw(&s, post.clone(), "/v1/capsules", t, Some(body)).await;
        assert_eq!(status, want, "{what}: {v}");
        let kind = if want == 422 { "unsupported" } else { "invalid_input" };
        assert_error_body(&v, kind);
    }
    let (status, v) = raw(&s, reqwest::Method::GET, "/v1/capsules?limit=0", t, None).await;
    assert_eq!(status, 400, "{v}");
    assert_error_body(&v, "invalid_input");
    let (status, v) = raw(&s, reqwest::Method::GET, "/v1/capsules?bogus=1", t, None).await;
    assert_eq!(status, 400, "{v}");
    assert_error_body(&v, "invalid_input");
    let (status, v) = raw(&s, reqwest::Method::GET, "/v1/nope", t, None).await;
    assert_eq!(status, 404, "{v}");
    assert_error_body(&v, "not_found");
    let (status, v) = raw(&s, reqwest::Method::PUT, "/v1/tokens", t, None).await;
    assert_eq!(status, 405, "{v}");
    assert_error_body(&v, "invalid_input");
    let (status, v) = raw(&s, reqwest::Method::GET, "/v1/capsules/no-such", t, None).await;
    assert_eq!(status, 404, "{v}");
    assert_error_body(&v, "not_found");
    // Exec spec in the header with unknown fields.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/capsules/x-1/exec", s.url))
        .bearer_auth(&s.owner)
        .header("Capsule-Exec", r#"{"argv":["ls"],"nope":1}"#)
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[test]
fn status_mapping_covers_every_kind() {
    use ErrorKind::*;
    let want = [
        (InvalidInput, 400),
        (Unauthenticated, 401),
        (PermissionDenied, 403),
        (NotFound, 404),
        (AlreadyExists, 409),
        (Conflict, 409),
        (LimitExceeded, 403),
        (InsufficientCredits, 402),
        (Unsupported, 422),
        (Unavailable, 503),
        (Internal, 500),
    ];
    for (k, s) in want {
        assert_eq!(status_for(k).as_u16(), s, "{k}");
    }
}

#[tokio::test]
async fn unavailable_carries_retry_after() {
    let e = capsules_server::ApiError::from(capsules_core::Error::unavailable("host full"));
    let resp = axum::response::IntoResponse::into_response(e);
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn openapi_lists_every_route_and_nothing_else() {
    let s = server().await;
    let (status, doc) = raw(&s, reqwest::Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = BTreeSet::new();
    for (p, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            documented.insert((m.to_uppercase(), p.clone()));
        }
    }
    let routed: BTreeSet<_> = route_table()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect();
    assert!(routed.len() > 30);
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(missing.is_empty(), "routes missing from openapi.json: {missing:?}");
    assert!(
        extra.is_empty(),
        "openapi.json documents routes the router lacks: {extra:?}"
    );
}

#[tokio::test]
async fn exec_streams_stdin_and_exit_codes() {
    let s = server().await;
    s.mock.on_exec(
        ExecMatcher::exact(["fail"]),
        ExecReply::new().stderr("bad\n").exit_code(3),
    );
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("x-1").await.unwrap();
    let out = cap.exec(["cat"]).stdin("hello from stdin\n").await.unwrap();
    assert_eq!(out.stdout_lossy(), "hello from stdin\n");
    let out = cap.exec(["fail"]).await.unwrap();
    assert_eq!(out.exit_code(), 3);
    assert_eq!(out.stderr_lossy(), "bad\n");
}

#[tokio::test]
async fn files_tar_list_paginate_and_operator() {
    let s = server().await;
    let capsules = api(&s);
    let c = capsules.connect(&s.owner).unwrap();
    let cap = c.create("files-1").await.unwrap();
    assert_eq!(cap.write_file("/workspace/a.txt", "abc").await.unwrap(), 3);
    assert_eq!(cap.read_file("/workspace/a.txt").await.unwrap(), b"abc");
    let mut tar = Vec::new();
    {
        let mut s = cap.download_tar("/workspace").await.unwrap();
        use futures::StreamExt;
        while let Some(c) = s.next().await {
            tar.extend_from_slice(&c.unwrap());
        }
    }
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("a.txt")), "{names:?}");
    cap.remove("/workspace/a.txt", false).await.unwrap();
    assert!(cap.read_file("/workspace/a.txt").await.is_err());

    for i in 0..4 {
        c.create(format!("page-{i}")).await.unwrap();
    }
    let p1 = c.list_page(Default::default(), 2, None).await.unwrap();
    assert_eq!(p1.capsules.len(), 2);
    let cursor = p1.next_cursor.clone().unwrap();
    let p2 = c.list_page(Default::default(), 2, Some(&cursor)).await.unwrap();
    assert_eq!(p2.capsules.len(), 2);
    assert_ne!(p1.capsules[0].id, p2.capsules[0].id);
    assert_eq!(c.list().await.unwrap().len(), 5);

    let op = capsules.operator(&s.operator);
    let t = op.create_team("beta").await.unwrap();
    op.grant("beta", "10.00", "pilot").await.unwrap();
    let beta = capsules.connect(&t.owner.secret).unwrap();
    assert_eq!(beta.usage().await.unwrap().balance.to_string(), "15.00");
    // A team's own token cannot grant.
    let e = capsules
        .operator(&s.owner)
        .grant("acme", "1.00", "me")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn unreachable_server_is_unavailable_with_a_source() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let c = capsules_client::Capsules::new(&url)
        .unwrap()
        .connect(format!("cap_tok_abcdefghijklmnop_{}", "0".repeat(64)))
        .unwrap();
    let e = c.list().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(e.message(), format!("the Capsules API at {url} is unreachable"));
    assert!(std::error::Error::source(&e).is_some());
}

#[tokio::test]
async fn lifecycle_update_url_logs_and_terminated_listing() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("life-1").credit_limit("1.50").await.unwrap();
    assert_eq!(cap.sleep().await.unwrap().state.as_str(), "sleeping");
    assert_eq!(cap.wake().await.unwrap().state.as_str(), "running");
    assert_eq!(cap.restart().await.unwrap().state.as_str(), "running");
    let rec = cap.update().credit_limit("3.00").await.unwrap();
    assert_eq!(rec.limits.credit_limit.to_string(), "3.00");
    let e = cap.update().credit_limit("-1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let url = cap.expose(8080, "token").await.unwrap();
    assert_eq!(url.port, 8080);
    cap.unexpose().await.unwrap();
    assert!(!cap.logs().await.unwrap().is_empty());
    let kinds: Vec<String> = cap
        .events()
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind().name().to_owned())
        .collect();
    assert!(kinds.iter().any(|k| k == "url_changed"), "{kinds:?}");
    cap.terminate().await.unwrap();
    // Terminate is idempotent.
    cap.terminate().await.unwrap();
    assert!(c.list().await.unwrap().is_empty());
    let all = c
        .list_with(capsules_client::ListOptions {
            include_terminated: true,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    // Exec on a terminated capsule is refused with a clear error.
    let e = c.capsule("life-1").unwrap().exec(["ls"]).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Conflict), "{e:?}");
    let ledger = c.ledger().await.unwrap();
    assert!(ledger.entries.len() >= 3);
    assert!(!c.team_events().await.unwrap().is_empty());
    let toks = api(&s).tokens(&s.owner).list().await.unwrap();
    assert!(!toks.is_empty());
}
