//! What the web console needs from the server over plain HTTP (no browser): the assets with
//! strict headers, the page that says how to build them when they are absent (the API still
//! working), the size catalogue, and create errors that name their field.

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};
use capsules_server::{ServerConfig, app_with};
use serde_json::{Value, json};

struct Server {
    url: String,
    owner: String,
    capsules: Capsules,
}

async fn server(console_dir: &std::path::Path) -> Server {
    let capsules = Capsules::builder()
        .backend(MockBackend::new())
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("acme").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app_with(capsules.clone(), ServerConfig::default().with_console_dir(console_dir));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
        capsules,
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A fake built console: index.html and a hashed bundle.
fn built_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("index.html"), "<!doctype html><title>console</title>").unwrap();
    std::fs::create_dir(d.path().join("assets")).unwrap();
    std::fs::write(d.path().join("assets/app-ABC.js"), "export {};").unwrap();
    std::fs::write(d.path().join("assets/app-ABC.css"), "body{}").unwrap();
    std::fs::write(d.path().join("secret.sh"), "echo no").unwrap();
    d
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn console_assets_are_served_with_strict_headers() {
    let dir = built_dir();
    let s = server(dir.path()).await;
    let http = no_redirects();

    for from in ["/", "/console"] {
        let r = http.get(format!("{}{from}", s.url)).send().await.unwrap();
        assert!(r.status().is_redirection(), "{from}: {}", r.status());
        assert_eq!(header(&r, "location"), "/console/", "{from}");
    }

    let r = http.get(format!("{}/console/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&r, "cache-control"), "no-cache");
    let csp = header(&r, "content-security-policy");
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(part), "CSP lacks {part}: {csp}");
    }
    let script_src = csp.split(';').find(|d| d.trim().starts_with("script-src")).unwrap();
    assert!(!script_src.contains("unsafe"), "{script_src}");
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert_eq!(header(&r, "referrer-policy"), "no-referrer");

    let r = http
        .get(format!("{}/console/assets/app-ABC.js", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/javascript; charset=utf-8");
    assert!(header(&r, "cache-control").contains("immutable"));
    let r = http
        .get(format!("{}/console/assets/app-ABC.css", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type"), "text/css; charset=utf-8");

    // Nothing outside the directory, nothing of an unknown type, no traversal.
    for bad in [
        "/console/secret.sh",
        "/console/assets/nope.js",
        "/console/..%2fCargo.toml",
        "/console/.hidden.js",
    ] {
        let r = http.get(format!("{}{bad}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{bad}");
    }
    // The API is unchanged beside it.
    let r = http
        .get(format!("{}/v1/capsules", s.url))
        .bearer_auth(&s.owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn without_assets_the_console_says_how_to_build_them_and_the_api_works() {
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("dist");
    let s = server(&missing).await;
    let r = reqwest::get(format!("{}/console/", s.url)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    assert!(!header(&r, "content-security-policy").is_empty());
    let text = r.text().await.unwrap();
    assert!(text.contains("npm ci &amp;&amp; npm run build"), "{text}");
    assert!(text.contains("examples/server/console"), "{text}");
    let c = capsules_client::Capsules::new(&s.url)
        .unwrap()
        .connect(&s.owner)
        .unwrap();
    c.create("still-works").await.unwrap();
    assert_eq!(c.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn sizes_lists_the_catalogue_with_rates() {
    let dir = built_dir();
    let s = server(dir.path()).await;
    let v: Value = reqwest::get(format!("{}/v1/sizes", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = v["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["name"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = capsules_core::Size::ALL.iter().map(|z| z.as_str()).collect();
    assert_eq!(names, expected);
    let rates = s.capsules.rates();
    for (z, size) in v["sizes"].as_array().unwrap().iter().zip(capsules_core::Size::ALL) {
        assert_eq!(z["vcpus"], size.vcpus());
        assert_eq!(z["max_disk_gib"], size.max_disk_gib());
        assert_eq!(z["compute_per_minute"], json!(rates.compute_minute(size)));
    }
}

#[tokio::test]
async fn create_errors_name_the_field() {
    let dir = built_dir();
    let s = server(dir.path()).await;
    let agent = s
        .capsules
        .tokens(&s.owner)
        .create(
            TokenSpec::new([Scope::AgentWrite])
                .prefix("agent-")
                .max_credit_limit(capsules_core::MicroCredits::parse("1.00").unwrap()),
        )
        .await
        .unwrap()
        .secret
        .expose()
        .to_owned();
    let cases = [
        (json!({"name": "other-1"}), 403, "name"),
        (json!({"name": "Agent_1"}), 400, "name"),
        (json!({"name": "agent-1", "size": "9x9gb"}), 400, "size"),
        (json!({"name": "agent-1", "credit_limit": "lots"}), 400, "credit_limit"),
        (json!({"name": "agent-1", "credit_limit": "5.00"}), 403, "credit_limit"),
        (json!({"name": "agent-1", "disk_gib": 500}), 400, "disk_gib"),
        (json!({"name": "agent-1", "network": "everything"}), 400, "network"),
        (
            json!({"name": "agent-1", "idle_timeout_secs": 0}),
            400,
            "idle_timeout_secs",
        ),
    ];
    let http = reqwest::Client::new();
    for (body, status, field) in cases {
        let r = http
            .post(format!("{}/v1/capsules", s.url))
            .bearer_auth(&agent)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["field"], field, "{body} → {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // Errors with no field say none.
    let r = http
        .get(format!("{}/v1/capsules/agent-nope", s.url))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].get("field").is_none(), "{v}");
    assert!(s.capsules.connect(&agent).unwrap().list().await.unwrap().is_empty());
}
