//! The `capsules-server` binary: bootstrap on first start, bootstrap.json (0600), serving, SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_json_and_serving_on_the_mock() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsules-server"))
        .args(["--backend", "mock", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env_remove("CAPSULES_BACKEND")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = state.join("bootstrap.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    let doc: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no bootstrap.json within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(doc["balance"], "5.00");
    assert_eq!(doc["backend"], "mock");
    let api = doc["api"].as_str().unwrap();
    let owner = doc["owner_token"].as_str().unwrap();
    assert!(doc["operator_token"].as_str().unwrap().starts_with("cap_"));

    let c = capsules_client::Capsules::new(api).unwrap().connect(owner).unwrap();
    let u = c.usage().await.unwrap();
    assert_eq!(u.balance.to_string(), "5.00");
    c.create("bin-1").await.unwrap();

    // SIGTERM stops it.
    let pid = child.id();
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
