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

/// `capsules-server` on the mock backend and the memory store, on a free loopback port, with
/// `state` as its state directory.
fn mock_server(state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsules-server"));
    c.args([
        "--backend",
        "mock",
        "--store",
        "memory",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
    ])
    .arg(state)
    .env_remove("CAPSULES_BACKEND");
    c
}

/// Starts the server on the mock with `extra` flags; (child, bootstrap.json) once it is written.
/// The caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
async fn start_mock(state: &std::path::Path, extra: &[&std::ffi::OsStr]) -> (std::process::Child, serde_json::Value) {
    let mut child = mock_server(state)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = state.join("bootstrap.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return (child, v);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no bootstrap.json within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the server with `args` and expects it to refuse to start; its stderr.
fn refused_start(args: &[&std::ffi::OsStr]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = mock_server(dir.path()).args(args).output().unwrap();
    assert!(!out.status.success(), "the server started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let state = dir.path().join("state");
    let (mut child, doc) = start_mock(
        &state,
        &[
            "--tls-cert".as_ref(),
            cert_path.as_os_str(),
            "--tls-key".as_ref(),
            key_path.as_os_str(),
        ],
    )
    .await;
    let api = doc["api"].as_str().unwrap().to_owned();
    assert!(api.starts_with("https://127.0.0.1:"), "{api}");
    let owner = doc["owner_token"].as_str().unwrap();

    let trusting = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = trusting
        .get(format!("{api}/v1/team/usage"))
        .bearer_auth(owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["balance"], 5_000_000, "{v}");
    // Errors come over TLS too, as JSON.
    let r = trusting.get(format!("{api}/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A client that does not trust the certificate is refused at the handshake.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting.get(format!("{api}/v1/openapi.json")).send().await.is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = api.replace("https://", "http://");
    let r = reqwest::Client::new()
        .get(format!("{plain}/v1/openapi.json"))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    // The server still serves after the failed handshakes.
    let r = trusting.get(format!("{api}/v1/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_flags_come_in_pairs_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("cert.pem"), cert.pem()).unwrap();
    std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(p("other.pem"), other_key.serialize_pem()).unwrap();
    std::fs::write(p("junk.pem"), "not a pem file\n").unwrap();
    let os = |n: &str| p(n).into_os_string();
    let (cert_p, key_p, other_p, junk_p, missing_p) = (
        os("cert.pem"),
        os("key.pem"),
        os("other.pem"),
        os("junk.pem"),
        os("missing.pem"),
    );

    let err = refused_start(&["--tls-cert".as_ref(), &cert_p]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = refused_start(&["--tls-key".as_ref(), &key_p]);
    assert!(err.contains("--tls-cert"), "{err}");
    let err = refused_start(&["--tls-cert".as_ref(), &missing_p, "--tls-key".as_ref(), &key_p]);
    assert!(err.contains("missing.pem") && err.contains("certificate"), "{err}");
    let err = refused_start(&["--tls-cert".as_ref(), &cert_p, "--tls-key".as_ref(), &missing_p]);
    assert!(err.contains("missing.pem") && err.contains("key"), "{err}");
    let err = refused_start(&["--tls-cert".as_ref(), &junk_p, "--tls-key".as_ref(), &key_p]);
    assert!(err.contains("junk.pem") && err.contains("CERTIFICATE"), "{err}");
    let err = refused_start(&["--tls-cert".as_ref(), &cert_p, "--tls-key".as_ref(), &junk_p]);
    assert!(err.contains("junk.pem") && err.contains("private key"), "{err}");
    let err = refused_start(&["--tls-cert".as_ref(), &cert_p, "--tls-key".as_ref(), &other_p]);
    assert!(err.contains("other.pem") && err.contains("does not fit"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _) = start_mock(dir.path(), &[]).await;
    let out = mock_server(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a second server started: {stderr}");
    assert!(
        stderr.contains("another capsules-server") && stderr.contains(&format!("pid {}", first.id())),
        "{stderr}"
    );
    let _ = first.kill();
    let _ = first.wait();
    // The lock goes with the process, kill -9 included: the next start takes the directory.
    let (mut again, _) = {
        std::fs::remove_file(dir.path().join("bootstrap.json")).unwrap();
        start_mock(dir.path(), &[]).await
    };
    let _ = again.kill();
    let _ = again.wait();
}
