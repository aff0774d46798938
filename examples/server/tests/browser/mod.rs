//! Headless Chromium for the console tests, driven over WebDriver (`chromedriver`, W3C protocol)
//! with a few plain HTTP calls: no client crate needed. Chromium runs with a fresh profile, no
//! background networking, and talks only to the loopback server the test started.
//!
//! The prerequisites (Debian's `chromium` and `chromium-driver`, and the built console assets)
//! are checked by [`prerequisites`]; a missing one makes a case "ignored: <reason>", except when
//! `CI` is set, where it fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Why the browser cases cannot run here, if they cannot.
pub fn prerequisites(console_dir: &Path) -> Result<(), String> {
    if !Path::new(CHROMIUM).is_file() {
        return Err(format!("{CHROMIUM} is not installed (apt-get install chromium)"));
    }
    if !Path::new(CHROMEDRIVER).is_file() {
        return Err(format!(
            "{CHROMEDRIVER} is not installed (apt-get install chromium-driver)"
        ));
    }
    if !capsules_server::webconsole::is_built(console_dir) {
        return Err(format!(
            "the console assets are not built in {} (run `{}`)",
            console_dir.display(),
            capsules_server::webconsole::BUILD_COMMAND
        ));
    }
    Ok(())
}

/// Where screenshots go: `<target>/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|p| p.join("console-screenshots"))
        .unwrap_or_else(|| PathBuf::from("console-screenshots"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A chromedriver process in a process group of its own (the browsers it starts join it), killed
/// as a group on drop, so no Chromium outlives a failed test.
pub struct Driver {
    child: Child,
    pub url: String,
    http: reqwest::Client,
    _profiles: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Driver {
    pub async fn start() -> Result<Driver, String> {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start {CHROMEDRIVER}: {e}"))?;
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _profiles: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = d.http.get(format!("{}/status", d.url)).send().await
                && r.status().is_success()
            {
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err("chromedriver did not answer within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new headless browser window (its own fresh profile).
    pub async fn session(&self, width: u32, height: u32) -> Result<Session, String> {
        let profile = tempfile::tempdir_in(self._profiles.path()).map_err(|e| e.to_string())?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Dialogs stay open so the test can see them (and fail on them).
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    "--disable-gpu", "--disable-dev-shm-usage", "--disable-default-apps",
                    "--disable-extensions", "--no-default-browser-check", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let v = call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/session", self.url),
            Some(caps),
        )
        .await?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {v}"))?
            .to_owned();
        let s = Session {
            base: format!("{}/session/{id}", self.url),
            http: self.http.clone(),
            _profile: profile,
        };
        s.set_window(width, height).await?;
        Ok(s)
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut r = http.request(method.clone(), url).timeout(Duration::from_secs(60));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| format!("{method} {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "webdriver {}: {}",
            v["value"]["error"].as_str().unwrap_or("error"),
            v["value"]["message"]
                .as_str()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    Ok(v["value"].clone())
}

const SIGN_IN_TO_CAPSULE_PAGE_JS: &str = r##"
const [token, name, done] = arguments;
const until = (f) => new Promise((resolve, reject) => {
  const found = f();
  if (found) return resolve(found);
  const timer = setTimeout(() => { o.disconnect(); reject(new Error("timeout")); }, 20000);
  const o = new MutationObserver(() => {
    const v = f();
    if (v) { o.disconnect(); clearTimeout(timer); resolve(v); }
  });
  o.observe(document.body, { subtree: true, childList: true, attributes: true });
});
(async () => {
  document.querySelector("#token").value = token;
  const t0 = performance.now();
  document.querySelector("#sign-in").click();
  const link = await until(() => document.querySelector(`tr[data-capsule="${name}"] a`));
  link.click();
  await until(() => document.querySelector("#usage-chart"));
  done(performance.now() - t0);
})().catch((e) => done(String(e)));
"##;

/// One browser window.
pub struct Session {
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Session {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        call(&self.http, method, &format!("{}{path}", self.base), body).await
    }

    pub async fn goto(&self, url: &str) -> Result<(), String> {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    pub async fn set_window(&self, width: u32, height: u32) -> Result<(), String> {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await
        .map(drop)
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Value) -> Result<Value, String> {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs `script` asynchronously: it calls `arguments[arguments.length - 1]` with its result.
    pub async fn js_async(&self, script: &str, args: Value) -> Result<Value, String> {
        self.cmd(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// From a fresh sign-in page: signs in with `token`, opens `capsule` from the list, and waits
    /// for its page (usage chart drawn). Returns the milliseconds the page itself measured from the
    /// sign-in click (no WebDriver round trip inside).
    pub async fn time_sign_in_to_capsule_page(&self, base: &str, token: &str, capsule: &str) -> Result<f64, String> {
        self.goto(&format!("{base}/console/#/sign-in")).await?;
        self.js("sessionStorage.clear(); location.reload()", json!([])).await?;
        self.wait_for("the sign-in form", 20, || async { self.text("#sign-in-form").await })
            .await?;
        let v = self
            .js_async(SIGN_IN_TO_CAPSULE_PAGE_JS, json!([token, capsule]))
            .await?;
        match v.as_f64() {
            Some(ms) if ms >= 0.0 => Ok(ms),
            _ => Err(format!("the page did not reach {capsule}'s page: {v}")),
        }
    }

    async fn element(&self, css: &str) -> Result<String, String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .map_err(|e| format!("{css}: {e}"))?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{css}: no element id in {v}"))
    }

    /// Types `text` into the element (WebDriver key codes such as `\u{E007}` Enter allowed).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .map(drop)
    }

    pub async fn clear(&self, css: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/clear"), Some(json!({})))
            .await
            .map(drop)
    }

    pub async fn click(&self, css: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({})))
            .await
            .map(drop)
    }

    /// Key presses through the actions API (to whatever has focus), e.g. Ctrl-C.
    pub async fn keys(&self, actions: Vec<Value>) -> Result<(), String> {
        let body = json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]});
        self.cmd(reqwest::Method::POST, "/actions", Some(body)).await.map(drop)
    }

    /// The element's textContent, or None when there is no such element.
    pub async fn text(&self, css: &str) -> Result<Option<String>, String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                json!([css]),
            )
            .await?;
        Ok(v.as_str().map(str::to_owned))
    }

    pub async fn hash(&self) -> Result<String, String> {
        Ok(self
            .js("return location.hash", json!([]))
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// Polls `f` until it returns Some, or fails after `secs` with `what`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, secs: u64, mut f: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, String>>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last_err = String::new();
        loop {
            match f().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = e,
            }
            if Instant::now() > deadline {
                return Err(format!("timed out after {secs} s waiting for {what} {last_err}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element's text contains `needle`; returns the text.
    pub async fn wait_text(&self, css: &str, needle: &str, secs: u64) -> Result<String, String> {
        self.wait_for(&format!("{css} to contain {needle:?}"), secs, || async {
            Ok(self.text(css).await?.filter(|t| t.contains(needle)))
        })
        .await
    }

    /// The handles of the session's windows and tabs.
    pub async fn windows(&self) -> Result<Vec<String>, String> {
        let v = self.cmd(reqwest::Method::GET, "/window/handles", None).await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect())
    }

    pub async fn current_window(&self) -> Result<String, String> {
        let v = self.cmd(reqwest::Method::GET, "/window", None).await?;
        Ok(v.as_str().unwrap_or("").to_owned())
    }

    pub async fn switch_to(&self, handle: &str) -> Result<(), String> {
        self.cmd(reqwest::Method::POST, "/window", Some(json!({ "handle": handle })))
            .await
            .map(drop)
    }

    /// The text of an open dialog (alert/confirm), if one is open.
    pub async fn dialog(&self) -> Result<Option<String>, String> {
        match self.cmd(reqwest::Method::GET, "/alert/text", None).await {
            Ok(v) => Ok(Some(v.as_str().unwrap_or("").to_owned())),
            Err(e) if e.contains("no such alert") => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn accept_dialog(&self) -> Result<(), String> {
        self.cmd(reqwest::Method::POST, "/alert/accept", Some(json!({})))
            .await
            .map(drop)
    }

    /// Saves a PNG of the window as `<screenshot dir>/<name>.png`; prints and returns the path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf, String> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .map_err(|e| e.to_string())?;
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }

    pub async fn quit(self) {
        let _ = self.cmd(reqwest::Method::DELETE, "", None).await;
    }

    /// Signs in on the console at `base` with `token` and waits for the capsule list.
    pub async fn sign_in(&self, base: &str, token: &str) -> Result<(), String> {
        self.goto(&format!("{base}/console/#/sign-in")).await?;
        self.wait_for("the sign-in form", 20, || async { self.text("#sign-in-form").await })
            .await?;
        self.type_into("#token", token).await?;
        self.click("#sign-in").await?;
        self.wait_for("the capsule list", 20, || async {
            Ok(self.text("#capsule-list").await?.filter(|t| !t.contains("Loading")))
        })
        .await
        .map(drop)
    }
}

// ---------------------------------------------------------------- the terminal page

/// The terminal's visible text (xterm's DOM renderer: one element per row).
async fn screen(b: &Session) -> Result<String, String> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#terminal .xterm-rows > div')].map(r => r.textContent.replace(/\\u00a0/g, ' ')).join('\\n')",
            json!([]),
        )
        .await?;
    Ok(v.as_str().unwrap_or("").to_owned())
}

async fn wait_screen(b: &Session, what: &str, secs: u64, f: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = screen(b).await?;
        if f(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {secs} s waiting for {what}; the terminal shows:\n{s}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn type_line(b: &Session, line: &str) -> Result<(), String> {
    b.type_into("#terminal textarea.xterm-helper-textarea", &format!("{line}\u{E007}"))
        .await
}

/// The terminal page on `capsule`: `echo hello-$((6*7))` prints hello-42; resizing the window
/// resizes the PTY (`stty size`); Ctrl-C ends `sleep 100` and the prompt takes commands again.
/// `boot_secs` bounds the wait for the first prompt (a real capsule's shell may take a while).
/// `mock_shell`: the mock's shell has no `$((...))`, so the lines use `printf` there instead.
pub async fn terminal_checks(
    b: &Session,
    url: &str,
    token: &str,
    capsule: &str,
    boot_secs: u64,
    mock_shell: bool,
) -> Result<(), String> {
    let (hello, back) = if mock_shell {
        ("printf 'hello-%s\\n' 42", "printf 'back-%s\\n' 2")
    } else {
        ("echo hello-$((6*7))", "echo back-$((1+1))")
    };
    b.sign_in(url, token).await?;
    b.goto(&format!("{url}/console/#/capsules/{capsule}/terminal")).await?;
    b.wait_text("#term-status", "connected", boot_secs).await?;
    // The shell's prompt.
    wait_screen(b, "a prompt", boot_secs, |s| s.contains('$') || s.contains('#')).await?;

    type_line(b, hello).await?;
    wait_screen(b, "hello-42", 60, |s| s.lines().any(|l| l.trim() == "hello-42")).await?;

    // Resize the window: the fit addon resizes the terminal; the PTY follows.
    let before: Value = b
        .js(
            "const t = document.querySelector('#terminal'); return [t.dataset.cols, t.dataset.rows]",
            json!([]),
        )
        .await?;
    b.set_window(900, 560).await?;
    let after = b
        .wait_for("the terminal to take the new size", 10, || async {
            let v = b
                .js(
                    "const t = document.querySelector('#terminal'); return [t.dataset.cols, t.dataset.rows]",
                    json!([]),
                )
                .await?;
            Ok((v != before).then_some(v))
        })
        .await?;
    let (cols, rows) = (after[0].as_str().unwrap_or(""), after[1].as_str().unwrap_or(""));
    let want = format!("{rows} {cols}");
    // Clear first so an older `stty size` line cannot match.
    type_line(b, "clear; stty size").await?;
    wait_screen(b, &format!("stty size = {want}"), 60, |s| {
        s.lines().any(|l| l.trim() == want)
    })
    .await?;

    // Ctrl-C reaches the foreground program: sleep ends, the prompt takes commands again.
    type_line(b, "sleep 100").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    b.keys(vec![
        json!({"type": "keyDown", "value": "\u{E009}"}),
        json!({"type": "keyDown", "value": "c"}),
        json!({"type": "keyUp", "value": "c"}),
        json!({"type": "keyUp", "value": "\u{E009}"}),
    ])
    .await?;
    type_line(b, back).await?;
    wait_screen(b, "back-2 after Ctrl-C", 60, |s| {
        s.lines().any(|l| l.trim() == "back-2")
    })
    .await?;
    ensure!(
        t.elapsed() < Duration::from_secs(90),
        "the prompt came back only after {:?}",
        t.elapsed()
    );
    let s = screen(b).await?;
    ensure!(s.contains("^C"), "no ^C echoed:\n{s}");
    Ok(())
}
