//! The console WebSocket and its tickets, in-process on the mock backend (whose terminal has a
//! line discipline and a small shell), through `capsules-client` and a raw WebSocket.

use std::sync::Arc;
use std::time::Duration;

use capsules_backend_mock::{FakeClock, MockBackend};
use capsules_client::{ConsoleEvent, ConsoleReceiver};
use capsules_core::{Capsules, ErrorKind, MemoryStore, Scope, TokenSpec};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Server {
    url: String,
    owner: String,
    clock: Arc<FakeClock>,
}

async fn server() -> Server {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = Arc::new(FakeClock::new(now));
    let capsules = Capsules::builder()
        .backend(MockBackend::with_clock(clock.clone()))
        .store(MemoryStore::new())
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        clock,
    }
}

fn api(s: &Server) -> capsules_client::Capsules {
    capsules_client::Capsules::new(&s.url).unwrap()
}

async fn token(s: &Server, spec: TokenSpec) -> String {
    api(s).tokens(&s.owner).create(spec).await.unwrap().secret
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `GET path_and_query` as a WebSocket; a refused upgrade gives (status, JSON body).
async fn ws(s: &Server, path_and_query: &str, bearer: Option<&str>) -> Result<Ws, (u16, serde_json::Value)> {
    let url = format!("{}{path_and_query}", s.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(serde_json::Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("the WebSocket handshake failed: {e}"),
    }
}

fn refused(r: Result<Ws, (u16, serde_json::Value)>) -> (u16, serde_json::Value) {
    match r {
        Ok(_) => panic!("the upgrade was accepted"),
        Err((status, body)) => {
            assert!(
                body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "no JSON error body: {body}"
            );
            (status, body)
        }
    }
}

async fn post_ticket(s: &Server, capsule: &str, bearer: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/capsules/{capsule}/console/ticket", s.url))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

async fn ticket(s: &Server, capsule: &str, bearer: &str) -> String {
    let (status, body) = post_ticket(s, capsule, bearer).await;
    assert_eq!(status, 201, "{body}");
    body["ticket"].as_str().unwrap().to_owned()
}

/// Reads binary frames until their text contains `needle` (bounded).
async fn ws_until(ws: &mut Ws, needle: &str) -> String {
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = ws.next().await {
            if let Message::Binary(b) = m.unwrap() {
                seen.push_str(&String::from_utf8_lossy(&b));
                if seen.contains(needle) {
                    return;
                }
            }
        }
        panic!("the socket ended before {needle:?}; saw {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within 10 s; saw {seen:?}"));
    seen
}

/// Reads console output until it contains `needle` (bounded).
async fn until(rx: &mut ConsoleReceiver, needle: &str) -> String {
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.next().await {
                Some(Ok(ConsoleEvent::Output(b))) => {
                    seen.push_str(&String::from_utf8_lossy(&b));
                    if seen.contains(needle) {
                        return;
                    }
                }
                other => panic!("expected output with {needle:?}, got {other:?}; saw {seen:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within 10 s; saw {seen:?}"));
    seen
}

/// The next event that is not output.
async fn next_non_output(rx: &mut ConsoleReceiver) -> Option<capsules_core::Result<ConsoleEvent>> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.next().await {
                Some(Ok(ConsoleEvent::Output(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("an event within 10 s")
}

#[tokio::test]
async fn a_ticket_opens_the_console_once_and_expires_after_30_s() {
    let s = server().await;
    api(&s).connect(&s.owner).unwrap().create("c-1").await.unwrap();

    let (status, body) = post_ticket(&s, "c-1", &s.owner).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_in_secs"], 30);
    let t = body["ticket"].as_str().unwrap().to_owned();
    let hex = t.strip_prefix("ct_").expect("ct_ prefix");
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    // Two tickets are never the same.
    assert_ne!(ticket(&s, "c-1", &s.owner).await, t);

    // The ticket alone (no header) opens the console.
    let mut w = ws(
        &s,
        &format!("/v1/capsules/c-1/console?cols=100&rows=30&ticket={t}"),
        None,
    )
    .await
    .unwrap();
    w.send(Message::Binary(b"stty size\r".to_vec().into())).await.unwrap();
    ws_until(&mut w, "30 100").await;
    w.close(None).await.unwrap();

    // Used once: refused after that.
    let (status, body) = refused(ws(&s, &format!("/v1/capsules/c-1/console?ticket={t}"), None).await);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["kind"], "unauthenticated");

    // Unused but 31 s old: refused; 29 s old: fine.
    let old = ticket(&s, "c-1", &s.owner).await;
    let young = ticket(&s, "c-1", &s.owner).await;
    s.clock.advance(Duration::from_secs(29));
    ws(&s, &format!("/v1/capsules/c-1/console?ticket={young}"), None)
        .await
        .unwrap();
    s.clock.advance(Duration::from_secs(2));
    let (status, _) = refused(ws(&s, &format!("/v1/capsules/c-1/console?ticket={old}"), None).await);
    assert_eq!(status, 401);

    // A made-up ticket, or a token passed as a ticket, is refused.
    let fake = format!("ct_{}", "0".repeat(64));
    let (status, _) = refused(ws(&s, &format!("/v1/capsules/c-1/console?ticket={fake}"), None).await);
    assert_eq!(status, 401);
    let (status, _) = refused(ws(&s, &format!("/v1/capsules/c-1/console?ticket={}", s.owner), None).await);
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_ticket_of_a_revoked_token_is_refused() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    c.create("agent-1").await.unwrap();
    let minted = api(&s)
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap();
    let t = ticket(&s, "agent-1", &minted.secret).await;
    api(&s).tokens(&s.owner).revoke(minted.id.as_str()).await.unwrap();
    let (status, body) = refused(ws(&s, &format!("/v1/capsules/agent-1/console?ticket={t}"), None).await);
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn tickets_are_bound_to_their_capsule_and_follow_policy() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    c.create("agent-1").await.unwrap();
    c.create("agent-2").await.unwrap();
    c.create("other-1").await.unwrap();
    let agent = token(&s, TokenSpec::new([Scope::AgentWrite]).prefix("agent-")).await;

    // A ticket for agent-1 does not open agent-2 (and is spent by trying).
    let t = ticket(&s, "agent-1", &agent).await;
    let (status, body) = refused(ws(&s, &format!("/v1/capsules/agent-2/console?ticket={t}"), None).await);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["kind"], "permission_denied");
    let (status, _) = refused(ws(&s, &format!("/v1/capsules/agent-1/console?ticket={t}"), None).await);
    assert_eq!(status, 401);

    // By id works as well as by name.
    let id = c.capsule("agent-1").unwrap().status().await.unwrap().id;
    let t = ticket(&s, "agent-1", &agent).await;
    ws(&s, &format!("/v1/capsules/{id}/console?ticket={t}"), None)
        .await
        .unwrap();

    // The prefix-scoped token gets no ticket, and no console, for other-1.
    let (status, body) = post_ticket(&s, "other-1", &agent).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = refused(ws(&s, "/v1/capsules/other-1/console", Some(&agent)).await);
    assert_eq!(status, 403);

    // A read-only token cannot open a console either way.
    let reader = token(&s, TokenSpec::new([Scope::CapsulesRead])).await;
    let (status, body) = post_ticket(&s, "agent-1", &reader).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = refused(ws(&s, "/v1/capsules/agent-1/console", Some(&reader)).await);
    assert_eq!(status, 403);

    // No such capsule; a terminated one.
    let (status, _) = post_ticket(&s, "agent-9", &agent).await;
    assert_eq!(status, 404);
    c.capsule("agent-2").unwrap().terminate().await.unwrap();
    let (status, _) = post_ticket(&s, "agent-2", &agent).await;
    assert_eq!(status, 404);
    let (status, _) = refused(ws(&s, "/v1/capsules/agent-2/console", Some(&agent)).await);
    assert_eq!(status, 404);
}

#[tokio::test]
async fn errors_before_the_upgrade_are_json() {
    let s = server().await;
    api(&s).connect(&s.owner).unwrap().create("c-1").await.unwrap();
    let path = "/v1/capsules/c-1/console";

    let (status, body) = refused(ws(&s, path, None).await);
    assert_eq!(status, 401);
    assert!(body["error"]["message"].as_str().unwrap().contains("ticket"), "{body}");
    let (status, _) = refused(ws(&s, path, Some("cap_bogus")).await);
    assert_eq!(status, 401);
    for q in ["cols=0", "cols=1001", "rows=abc", "rows=-1", "cols=80&rows=0"] {
        let (status, body) = refused(ws(&s, &format!("{path}?{q}"), Some(&s.owner)).await);
        assert_eq!(status, 400, "{q}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("1 to 1000"),
            "{body}"
        );
    }
    let (status, _) = refused(ws(&s, &format!("{path}?colour=red"), Some(&s.owner)).await);
    assert_eq!(status, 400);
    let t = ticket(&s, "c-1", &s.owner).await;
    let (status, _) = refused(ws(&s, &format!("{path}?ticket={t}"), Some(&s.owner)).await);
    assert_eq!(status, 400);
    let (status, _) = refused(ws(&s, "/v1/capsules/c-9/console", Some(&s.owner)).await);
    assert_eq!(status, 404);
    let (status, _) = refused(ws(&s, "/v1/capsules/Bad_Name!/console", Some(&s.owner)).await);
    assert_eq!(status, 400);

    // A plain GET (no upgrade) is told to use a WebSocket.
    let resp = reqwest::Client::new()
        .get(format!("{}{path}", s.url))
        .bearer_auth(&s.owner)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 426);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "invalid_input");

    // The extreme sizes are accepted.
    ws(&s, &format!("{path}?cols=1&rows=1000"), Some(&s.owner))
        .await
        .unwrap();
}

#[tokio::test]
async fn echo_resize_interrupt_and_exit_through_the_client() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("c-1").await.unwrap();
    let (tx, mut rx) = cap.console(80, 24).await.unwrap().split();
    until(&mut rx, "$ ").await;

    // (The mock's shell has no arithmetic; the real-VM test sends `echo hello-$((6*7))`.)
    tx.write(&b"echo hello-42\r"[..]).await.unwrap();
    until(&mut rx, "hello-42").await;

    tx.write(&b"stty size\r"[..]).await.unwrap();
    until(&mut rx, "24 80").await;
    tx.resize(120, 50).await.unwrap();
    tx.write(&b"stty size\r"[..]).await.unwrap();
    until(&mut rx, "50 120").await;

    // Ctrl-C stops the foreground command and the prompt comes back.
    tx.write(&b"sleep 100\r"[..]).await.unwrap();
    until(&mut rx, "sleep 100").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.write(&[0x03u8][..]).await.unwrap();
    until(&mut rx, "^C").await;
    until(&mut rx, "$ ").await;
    tx.write(&b"echo $?\r"[..]).await.unwrap();
    until(&mut rx, "130").await;

    // Attaching is activity and is audited.
    let kinds: Vec<String> = cap
        .events()
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind().name().to_owned())
        .collect();
    assert!(kinds.iter().any(|k| k == "console_attached"), "{kinds:?}");

    tx.write(&b"exit 7\r"[..]).await.unwrap();
    match next_non_output(&mut rx).await {
        Some(Ok(ConsoleEvent::Exit(7))) => {}
        other => panic!("expected exit 7, got {other:?}"),
    }
    assert!(rx.next().await.is_none(), "nothing after the exit");

    // Detached: recorded once the session is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = cap.events().await.unwrap();
        if ev.iter().any(|e| e.kind().name() == "console_detached") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no console_detached event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_raw_protocol_exit_frame_then_a_normal_close() {
    let s = server().await;
    api(&s).connect(&s.owner).unwrap().create("c-1").await.unwrap();
    let mut w = ws(&s, "/v1/capsules/c-1/console", Some(&s.owner)).await.unwrap();
    // Keepalive: a ping is answered with a pong carrying the same payload.
    w.send(Message::Ping(b"are-you-there".to_vec().into())).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Message::Pong(p) = w.next().await.expect("open").unwrap() {
                assert_eq!(&p[..], b"are-you-there");
                return;
            }
        }
    })
    .await
    .expect("a pong within 10 s");
    w.send(Message::Binary(b"exit 3\r".to_vec().into())).await.unwrap();
    let mut exit = None;
    let mut close = None;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = w.next().await {
            match m.unwrap() {
                Message::Text(t) => exit = Some(serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap()),
                Message::Close(f) => {
                    close = f;
                    break;
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(exit, Some(serde_json::json!({"type": "exit", "code": 3})));
    assert_eq!(u16::from(close.expect("a close frame").code), 1000);
}

#[tokio::test]
async fn a_bad_control_message_is_answered_and_the_session_goes_on() {
    let s = server().await;
    api(&s).connect(&s.owner).unwrap().create("c-1").await.unwrap();
    let mut w = ws(&s, "/v1/capsules/c-1/console", Some(&s.owner)).await.unwrap();
    for bad in [
        r#"{"type":"resize","cols":0,"rows":24}"#,
        r#"{"type":"resize","cols":80,"rows":1001}"#,
        r#"{"type":"resize","cols":80}"#,
        r#"{"type":"shout"}"#,
        "not json",
    ] {
        w.send(Message::Text(bad.into())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match w.next().await.expect("open").unwrap() {
                    Message::Text(t) => return serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap(),
                    _ => continue,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(reply["type"], "error", "{bad}: {reply}");
        assert!(
            reply.get("kind").is_none(),
            "a refused control message is not fatal: {reply}"
        );
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    // Still attached, and a good resize works.
    w.send(Message::Text(r#"{"type":"resize","cols":132,"rows":43}"#.into()))
        .await
        .unwrap();
    w.send(Message::Binary(b"stty size\r".to_vec().into())).await.unwrap();
    ws_until(&mut w, "43 132").await;

    // The client checks sizes before sending.
    let cap = api(&s).connect(&s.owner).unwrap().capsule("c-1").unwrap();
    let (tx, _rx) = cap.console(80, 24).await.unwrap().split();
    assert_eq!(tx.resize(0, 10).await.unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(cap.console(1001, 24).await.unwrap_err().kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn terminate_ends_the_session_with_a_conflict_error() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("c-1").await.unwrap();
    let (tx, mut rx) = cap.console(80, 24).await.unwrap().split();
    until(&mut rx, "$ ").await;
    tx.write(&b"sleep 100\r"[..]).await.unwrap();
    until(&mut rx, "sleep 100").await;
    cap.terminate().await.unwrap();
    match next_non_output(&mut rx).await {
        Some(Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
            assert!(e.message().contains("terminated"), "{e}");
        }
        other => panic!("expected the conflict error, got {other:?}"),
    }
    assert!(rx.next().await.is_none());
    // The client gets the API's errors before the upgrade as errors of the same kind: by id
    // the capsule is terminated (conflict), by name there is no live one (not found).
    let e = cap.console(80, 24).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let e = c.capsule("c-1").unwrap().console(80, 24).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn closing_the_socket_detaches() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("c-1").await.unwrap();
    let session = cap.console(80, 24).await.unwrap();
    let (tx, mut rx) = session.split();
    until(&mut rx, "$ ").await;
    tx.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = cap.events().await.unwrap();
        if ev.iter().any(|e| e.kind().name() == "console_detached") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no console_detached event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The capsule is fine: a new console works.
    let (tx, mut rx) = cap.console(80, 24).await.unwrap().split();
    tx.write(&b"echo again\r"[..]).await.unwrap();
    until(&mut rx, "again").await;
}

#[tokio::test]
async fn input_sent_after_the_exit_does_not_cost_the_exit_frame() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("c-1").await.unwrap();
    let (tx, mut rx) = cap.console(80, 24).await.unwrap().split();
    // Several lines in one frame, then more input the exited shell never reads.
    tx.write(&b"echo one\nstty size\nexit 3\n"[..]).await.unwrap();
    tx.write(&b"echo never\n"[..]).await.unwrap();
    let mut seen = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await.unwrap() {
            Some(Ok(ConsoleEvent::Output(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(ConsoleEvent::Exit(code))) => {
                assert_eq!(code, 3);
                break;
            }
            other => panic!("expected the exit frame, got {other:?} after {seen:?}"),
        }
    }
    assert!(seen.contains("one\r\n") && seen.contains("24 80"), "{seen:?}");
}

#[tokio::test]
async fn a_sleeping_capsule_gets_a_ticket_and_wakes_for_the_console() {
    let s = server().await;
    let c = api(&s).connect(&s.owner).unwrap();
    let cap = c.create("c-1").await.unwrap();
    cap.sleep().await.unwrap();
    // Issuing a ticket does not wake it; opening the console does.
    let t = ticket(&s, "c-1", &s.owner).await;
    assert_eq!(cap.status().await.unwrap().state.as_str(), "sleeping");
    let mut w = ws(&s, &format!("/v1/capsules/c-1/console?ticket={t}"), None)
        .await
        .unwrap();
    assert_eq!(cap.status().await.unwrap().state.as_str(), "running");
    w.send(Message::Binary(b"echo awake\r".to_vec().into())).await.unwrap();
    ws_until(&mut w, "awake\r\n").await;
}
