//! The web console in headless Chromium against the server in-process on the mock backend, with
//! a fake clock only this test moves (no endpoint can). Each case saves a screenshot of its final
//! page under `target/console-screenshots/`. Without Chromium, chromedriver or the built assets
//! the cases are reported ignored with the reason, except under `CI`, where they fail.

mod browser;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use browser::{Driver, Session};
use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::{Capsules, ManualClock, MemoryStore, Scope, TokenSpec};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

type R = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

struct Server {
    url: String,
    owner: String,
    capsules: Capsules,
    clock: Arc<ManualClock>,
    mock: MockBackend,
}

fn console_dir() -> PathBuf {
    capsules_server::webconsole::default_dir()
}

async fn server() -> Server {
    let mock = MockBackend::new();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
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
    let app = capsules_server::app_with(
        capsules.clone(),
        capsules_server::ServerConfig::default().with_console_dir(console_dir()),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        capsules,
        clock,
        mock,
    }
}

async fn agent_token(s: &Server) -> String {
    s.capsules
        .tokens(&s.owner)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await
        .unwrap()
        .secret
        .expose()
        .to_owned()
}

/// (status, JSON) of an API call with `token`.
async fn api(s: &Server, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method, format!("{}{path}", s.url))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The console's credit format (at least 4 decimals, more when not zero).
fn credits(micros: i64) -> String {
    let (sign, abs) = if micros < 0 { ("-", -micros) } else { ("", micros) };
    let mut frac = format!("{:06}", abs % 1_000_000);
    while frac.len() > 4 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}{}.{frac}", abs / 1_000_000)
}

/// Runs `case` with a browser window; saves the final page's screenshot even when the case fails.
async fn with_browser<F, Fut>(name: &str, case: F) -> R
where
    F: FnOnce(Arc<Driver>, Arc<Session>) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    let driver = Arc::new(Driver::start().await?);
    let session = Arc::new(driver.session(1280, 1000).await?);
    let result = case(driver.clone(), session.clone()).await;
    let shot = session.screenshot(name).await;
    if let Ok(s) = Arc::try_unwrap(session) {
        s.quit().await;
    }
    result?;
    shot.map(drop)
}

// ---------------------------------------------------------------- cases

/// An agent:write token with prefix `agent-` sees `agent-*` only; `other-1` from the form shows
/// the API's prefix error beside the name field, and nothing is created.
async fn prefix_token_list_and_form_error() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    let owner = s.capsules.connect(&s.owner).unwrap();
    owner.create("agent-a1").await.map_err(|e| e.to_string())?;
    owner.create("team-b1").await.map_err(|e| e.to_string())?;
    with_browser("prefix_token_list_and_form_error", |_d, b| async move {
        b.sign_in(&s.url, &agent).await?;
        b.wait_text("#capsules-table", "agent-a1", 10).await?;
        let list = b.text("#capsule-list").await?.unwrap_or_default();
        ensure!(
            !list.contains("team-b1"),
            "the agent token's list shows team-b1: {list}"
        );

        b.type_into("#f-name", "other-1").await?;
        b.click("#create").await?;
        let shown = b
            .wait_for("the name field's error", 10, || async {
                Ok(b.text("#error-name").await?.filter(|t| !t.is_empty()))
            })
            .await?;
        let (status, body) = api(
            &s,
            reqwest::Method::POST,
            "/v1/capsules",
            &agent,
            Some(json!({"name": "other-1"})),
        )
        .await;
        ensure!(status == 403, "the API answered {status} {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        ensure!(
            shown == message,
            "beside the name field: {shown:?}; the API says {message:?}"
        );
        ensure!(
            b.text("#create-status").await?.unwrap_or_default().is_empty(),
            "the error was shown in the form status too"
        );
        let all = owner
            .list_with(capsules_core::ListOptions {
                include_terminated: true,
            })
            .await
            .map_err(|e| e.to_string())?;
        ensure!(!all.iter().any(|c| c.name.as_str() == "other-1"), "other-1 was created");
        Ok(())
    })
    .await
}

/// Create `agent-web-1` from the form; listed as running; after the fake clock moves 5 minutes,
/// the capsule page's chart shows 6 charged minutes and the ledger's cost.
async fn create_from_form_then_chart_matches_ledger() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    with_browser("capsule_page", |_d, b| async move {
        b.sign_in(&s.url, &agent).await?;
        b.type_into("#f-name", "agent-web-1").await?;
        b.type_into("#f-credit_limit", "2.00").await?;
        b.click("#create").await?;
        b.wait_for("the capsule page", 10, || async {
            Ok((b.hash().await? == "#/capsules/agent-web-1").then_some(()))
        })
        .await?;
        b.goto(&format!("{}/console/#/capsules", s.url)).await?;
        // The liveness bound: the mock starts capsules at once; the page polls every 5 s.
        b.wait_for("agent-web-1 listed as running", 10, || async {
            let v = b
                .js(
                    "const r = document.querySelector('tr[data-capsule=\"agent-web-1\"] [data-state]'); return r ? r.dataset.state : null;",
                    json!([]),
                )
                .await?;
            Ok((v == "running").then_some(()))
        })
        .await?;

        s.clock.advance(Duration::from_secs(5 * 60));
        s.capsules.tick().await;

        b.click("tr[data-capsule=\"agent-web-1\"] a").await?;
        let minutes = b.wait_text("#usage-minutes", "6", 10).await?;
        ensure!(minutes == "6", "the chart shows {minutes} minutes");
        let (_, ledger) = api(&s, reqwest::Method::GET, "/v1/team/ledger", &s.owner, None).await;
        let (_, cap) = api(&s, reqwest::Method::GET, "/v1/capsules/agent-web-1", &agent, None).await;
        let id = cap["id"].as_str().unwrap_or_default();
        let cost: i64 = ledger["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["capsule"] == id)
            .map(|e| -e["amount"].as_i64().unwrap_or(0))
            .sum();
        ensure!(cost > 0, "the ledger has no charges for {id}: {ledger}");
        let compute_minutes: i64 = ledger["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["capsule"] == id && e["kind"] == "compute")
            .map(|e| e["quantity"].as_i64().unwrap_or(0))
            .sum();
        ensure!(compute_minutes == 6, "the ledger has {compute_minutes} compute minutes");
        let shown = b.text("#usage-cost").await?.unwrap_or_default();
        ensure!(shown == credits(cost), "the page shows cost {shown}; the ledger says {}", credits(cost));
        let chart = b
            .js(
                "const c = document.querySelector('#usage-chart'); return c ? [c.dataset.minutes, c.dataset.cost, c.querySelectorAll('rect').length] : null;",
                json!([]),
            )
            .await?;
        ensure!(
            chart == json!(["6", cost.to_string(), chart[2]]) && chart[2].as_u64().unwrap_or(0) > 0,
            "the chart's data: {chart}"
        );
        b.js("window.scrollTo(0, 0)", json!([])).await?;
        Ok(())
    })
    .await
}

/// Exec output that looks like markup renders as text; no dialog opens.
async fn exec_output_is_text() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    s.mock.on_exec(
        ExecMatcher::exact(["sh", "-c", "cat page.html"]),
        ExecReply::new().stdout(format!("{evil}\n")).exit_code(0),
    );
    s.capsules
        .connect(&agent)
        .unwrap()
        .create("agent-xss")
        .await
        .map_err(|e| e.to_string())?;
    // A name cannot carry markup at all: names are DNS labels.
    let (status, body) = api(
        &s,
        reqwest::Method::POST,
        "/v1/capsules",
        &agent,
        Some(json!({"name": "agent-<b>x</b>"})),
    )
    .await;
    ensure!(status == 400, "a markup name got {status} {body}");
    with_browser("exec_output_is_text", |_d, b| async move {
        b.sign_in(&s.url, &agent).await?;
        b.goto(&format!("{}/console/#/capsules/agent-xss", s.url)).await?;
        b.wait_for("the run box", 10, || async { b.text("#exec-form").await })
            .await?;
        b.type_into("#exec-cmd", "cat page.html").await?;
        b.click("#exec-run").await?;
        b.wait_text("#exec-exit", "exit 0", 10).await?;
        let out = b.text("#exec-output").await?.unwrap_or_default();
        ensure!(out == format!("{evil}\n"), "the output shows {out:?}");
        let elements = b
            .js("return document.querySelectorAll('#exec-output *').length", json!([]))
            .await?;
        ensure!(elements == json!(0), "the output made {elements} elements");
        // The history and audit trail list the command, as text too.
        b.wait_text("#exec-history", "cat page.html", 10).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(b.dialog().await?.is_none(), "a dialog opened");
        let injected = b
            .js(
                "return document.querySelectorAll('img[src=x], main script').length",
                json!([]),
            )
            .await?;
        ensure!(
            injected == json!(0),
            "markup from the output reached the DOM: {injected}"
        );
        Ok(())
    })
    .await
}

fn cli_binary() -> Option<PathBuf> {
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_capsules-server"));
    let p = debug.parent()?.join("capsule");
    p.is_file().then_some(p)
}

/// Mint a token on the team page: the secret is shown once and works with the CLI; revoke it:
/// the API answers 401 and the console signed in with it returns to sign-in with the message.
async fn mint_use_and_revoke_a_token() -> R {
    let Some(cli) = cli_binary() else {
        // The workspace test run builds it; a lone `cargo test -p capsules-server` may not.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "capsules-cli"])
            .status()
            .map_err(|e| e.to_string())?;
        ensure!(status.success(), "could not build the capsule CLI");
        return Box::pin(mint_use_and_revoke_a_token()).await;
    };
    let s = server().await;
    s.capsules
        .connect(&s.owner)
        .unwrap()
        .create("agent-cli-1")
        .await
        .map_err(|e| e.to_string())?;
    with_browser("mint_use_and_revoke_a_token", |d, owner| async move {
        owner.sign_in(&s.url, &s.owner).await?;
        owner.goto(&format!("{}/console/#/team", s.url)).await?;
        owner
            .wait_for("the mint form", 10, || async { owner.text("#mint-form").await })
            .await?;
        owner.click("input[data-scope=\"agent:write\"]").await?;
        owner.type_into("#t-prefix", "agent-").await?;
        owner.type_into("#t-label", "from-the-console").await?;
        owner.click("#mint").await?;
        let secret = owner
            .wait_for("the minted secret", 10, || async { owner.text("#minted-secret").await })
            .await?;
        ensure!(secret.starts_with("cap_"), "the secret shown: {secret:?}");
        // Shown once: gone after leaving the page and coming back.
        owner.goto(&format!("{}/console/#/capsules", s.url)).await?;
        owner.goto(&format!("{}/console/#/team", s.url)).await?;
        owner.wait_text("#tokens-table", "from-the-console", 10).await?;
        ensure!(
            owner.text("#minted-secret").await?.is_none(),
            "the secret is shown again"
        );
        let html = owner.js("return document.documentElement.outerHTML", json!([])).await?;
        ensure!(
            !html.as_str().unwrap_or("").contains(&secret),
            "the secret is still in the page"
        );

        // The CLI with it.
        let out = tokio::process::Command::new(&cli)
            .arg("list")
            .env("CAPSULE_TOKEN", &secret)
            .env("CAPSULE_API", &s.url)
            .output()
            .await
            .map_err(|e| format!("{}: {e}", cli.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.contains("agent-cli-1"),
            "capsule list with the minted token: {} {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );

        // A second window signed in with it.
        let agent = d.session(1280, 900).await?;
        let res: R = async {
            agent.sign_in(&s.url, &secret).await?;
            agent.wait_text("#capsules-table", "agent-cli-1", 10).await?;

            let id = secret.split('_').take(3).collect::<Vec<_>>().join("_");
            let id = id.strip_prefix("cap_").unwrap_or(&id).to_owned();
            owner.click(&format!("button[data-revoke=\"{id}\"]")).await?;
            owner
                .wait_for("the revoke confirmation", 5, || async { owner.dialog().await })
                .await?;
            owner.accept_dialog().await?;
            owner
                .wait_for("the token to leave the list", 10, || async {
                    Ok((!owner.text("#tokens-table").await?.unwrap_or_default().contains(&id)).then_some(()))
                })
                .await?;
            let (status, body) = api(&s, reqwest::Method::GET, "/v1/capsules", &secret, None).await;
            ensure!(status == 401, "the revoked token got {status} {body}");
            let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
            // Its next call (the list refreshes every 5 s, or any click) signs the window out.
            agent.click("a[data-nav=\"team\"]").await?;
            let shown = agent.wait_text("#signed-out", &message, 10).await?;
            ensure!(agent.hash().await? == "#/sign-in", "not on the sign-in page: {shown}");
            let stored = agent.js("return sessionStorage.length", json!([])).await?;
            ensure!(stored == json!(0), "the revoked token is still stored");
            Ok(())
        }
        .await;
        let shot = agent.screenshot("revoked_token_signed_out").await;
        agent.quit().await;
        shot?;
        res
    })
    .await
}

/// The time from submitting the sign-in form to a listed capsule's page, on the mock (printed).
async fn sign_in_to_capsule_page_time() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    let c = s.capsules.connect(&agent).unwrap();
    for i in 0..10 {
        c.create(format!("agent-t{i}")).await.map_err(|e| e.to_string())?;
    }
    with_browser("sign_in_to_capsule_page", |_d, b| async move {
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(b.time_sign_in_to_capsule_page(&s.url, &agent, "agent-t9").await?);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "measure: sign-in to a listed capsule page (mock, 10 capsules, measured in the page): median {:.1} ms, min {:.1} ms, max {:.1} ms (criterion: cargo bench -p capsules-benches --bench console)",
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1]
        );
        Ok(())
    })
    .await
}

/// A tiny web server inside the mock capsule: answers every request with a page.
fn serve_hello(s: &Server, id: &capsules_core::CapsuleId, port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.mock
        .serve_port(id, port, |mut stream| async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<!doctype html><title>app</title><h1 id=hello>hello from the capsule</h1>";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .unwrap();
}

/// Expose a port from the capsule page, open the URL (a preview token for this capsule only,
/// traded for a cookie by the proxy), then remove it.
async fn public_url_expose_open_remove() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    let cap = s
        .capsules
        .connect(&agent)
        .unwrap()
        .create("agent-web-2")
        .await
        .map_err(|e| e.to_string())?;
    let id = cap.status().await.map_err(|e| e.to_string())?.id;
    serve_hello(&s, &id, 8080);
    with_browser("public_url_expose_open_remove", |_d, b| async move {
        b.sign_in(&s.url, &agent).await?;
        b.goto(&format!("{}/console/#/capsules/agent-web-2", s.url)).await?;
        b.wait_for("the URL form", 10, || async { b.text("#url-form").await })
            .await?;
        b.type_into("#u-port", "8080").await?;
        b.click("#url-set").await?;
        let href = b.wait_text("#url-href", ".localhost:", 10).await?;
        ensure!(href.starts_with("http://agent-web-2-"), "the URL shown: {href}");

        let console_window = b.current_window().await?;
        b.click("#url-open").await?;
        let tab = b
            .wait_for("the preview tab", 10, || async {
                Ok(b.windows().await?.into_iter().find(|h| *h != console_window))
            })
            .await?;
        b.switch_to(&tab).await?;
        b.wait_text("#hello", "hello from the capsule", 20).await?;
        let at = b.js("return location.href", json!([])).await?;
        ensure!(
            at.as_str()
                .is_some_and(|u| u.starts_with(&href) && !u.contains("capsule_token")),
            "the preview tab is at {at}"
        );
        b.screenshot("public_url_preview_tab").await?;
        b.js("window.close()", json!([])).await?;
        b.switch_to(&console_window).await?;

        // The token it used was a preview token for this capsule alone.
        let (_, toks) = api(&s, reqwest::Method::GET, "/v1/tokens", &s.owner, None).await;
        let previews: Vec<&Value> = toks["tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["scopes"] == json!(["preview"]))
            .collect();
        ensure!(
            previews.len() == 1 && previews[0]["capsule"] == id.as_str(),
            "preview tokens: {previews:?}"
        );

        b.click("#url-remove").await?;
        b.wait_for("the URL to be removed", 10, || async { b.text("#url-none").await })
            .await?;
        let (_, c) = api(&s, reqwest::Method::GET, "/v1/capsules/agent-web-2", &agent, None).await;
        ensure!(c["url"].is_null(), "the capsule still has a URL: {c}");
        Ok(())
    })
    .await
}

/// The terminal page over the console WebSocket on the mock's PTY shell (the same checks run on a
/// real capsule in `console_vm`).
async fn terminal_on_the_mock() -> R {
    let s = server().await;
    let agent = agent_token(&s).await;
    s.capsules
        .connect(&agent)
        .unwrap()
        .create("agent-term-1")
        .await
        .map_err(|e| e.to_string())?;
    with_browser("terminal_on_the_mock", |_d, b| async move {
        browser::terminal_checks(&b, &s.url, &agent, "agent-term-1", 20, true).await
    })
    .await
}

/// The served page's headers (checked in the browser's own fetch as well as by status).
async fn headers_are_strict() -> R {
    let s = server().await;
    let resp = reqwest::get(format!("{}/console/", s.url))
        .await
        .map_err(|e| e.to_string())?;
    let csp = resp
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    for part in [
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
        "base-uri 'none'",
    ] {
        ensure!(csp.contains(part), "the CSP lacks {part}: {csp}");
    }
    ensure!(
        !csp.contains("unsafe-eval") && !csp.contains("script-src 'self' 'unsafe-inline'"),
        "the CSP allows inline script: {csp}"
    );
    with_browser("csp_blocks_inline_script", |_d, b| async move {
        b.goto(&format!("{}/console/#/sign-in", s.url)).await?;
        b.wait_for("the sign-in form", 10, || async { b.text("#sign-in-form").await }).await?;
        // An inline script added to the page does not run under the policy.
        let ran = b
            .js(
                "window.__ran = false; const s = document.createElement('script'); s.textContent = 'window.__ran = true'; document.body.appendChild(s); return window.__ran;",
                json!([]),
            )
            .await?;
        ensure!(ran == json!(false), "an inline script ran");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------- harness

type Case = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = R> + Send>>;

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("prefix_token_list_and_form_error", || {
            Box::pin(prefix_token_list_and_form_error())
        }),
        ("create_from_form_then_chart_matches_ledger", || {
            Box::pin(create_from_form_then_chart_matches_ledger())
        }),
        ("exec_output_is_text", || Box::pin(exec_output_is_text())),
        (
            "mint_use_and_revoke_a_token",
            || Box::pin(mint_use_and_revoke_a_token()),
        ),
        ("sign_in_to_capsule_page_time", || {
            Box::pin(sign_in_to_capsule_page_time())
        }),
        ("headers_are_strict", || Box::pin(headers_are_strict())),
        ("terminal_on_the_mock", || Box::pin(terminal_on_the_mock())),
        ("public_url_expose_open_remove", || {
            Box::pin(public_url_expose_open_remove())
        }),
    ]
}

fn main() {
    let args = Arguments::from_args();
    let missing = browser::prerequisites(&console_dir()).err();
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let trials = cases()
        .into_iter()
        .map(|(name, case)| match &missing {
            Some(why) if !ci => Trial::test(name, || Ok(()))
                .with_ignored_flag(true)
                .with_kind(why.clone()),
            Some(why) => {
                let why = why.clone();
                Trial::test(name, move || Err(Failed::from(format!("CI is set and {why}"))))
            }
            None => Trial::test(name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| Failed::from(e.to_string()))?;
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(180), case()).await })
                    .map_err(|_| Failed::from("timed out after 180 s"))?
                    .map_err(Failed::from)
            }),
        })
        .collect();
    if let Some(why) = &missing
        && !ci
    {
        eprintln!("console_browser: ignored: {why}");
    }
    libtest_mimic::run(&args, trials).exit();
}
