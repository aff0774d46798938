//! `capsule-mcp`: Capsules as MCP tools, over stdio.
//!
//! A client of the example server's HTTP API (`capsules-client`): every tool call is an HTTP
//! request made with `CAPSULE_TOKEN` to `CAPSULE_API` (default `http://127.0.0.1:7878`), so it goes
//! through the same authentication, policy and ledger as the CLI. Any API error comes back as a
//! tool result with `isError: true` and the API's message, never as a protocol error.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use capsules_client::{Capsules, Client};
use futures::StreamExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

/// Bytes of each output stream (stdout, stderr) an `exec` result keeps: the first half and the
/// last half of this; the middle is dropped and counted.
pub const STREAM_CAP: usize = 16 * 1024;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct CreateArgs {
    /// The capsule's name (lowercase letters, digits and '-'). Your token may only use names
    /// starting with its prefix (e.g. `agent-`).
    name: String,
    /// vCPUs x memory: `1x1gb` (default), `2x2gb`, `2x4gb` or `4x8gb`.
    size: Option<String>,
    /// The guest image (the server's default if omitted).
    image: Option<String>,
    /// The most this capsule may spend, in credits, as a decimal string (e.g. "2.00").
    credit_limit: Option<String>,
    /// Network policy, e.g. `none`, `egress` (the server's default if omitted).
    network: Option<String>,
    /// Disk size in GiB.
    disk_gib: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct NameArgs {
    /// The capsule's name (or id).
    name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ExecArgs {
    /// The capsule's name (or id).
    name: String,
    /// The command as an argument vector, e.g. ["npm", "test"]. Give this or `shell`.
    argv: Option<Vec<String>>,
    /// A shell command line, run with `sh -c`, e.g. "cd /workspace && npm test". Give this or `argv`.
    shell: Option<String>,
    /// The working directory.
    cwd: Option<String>,
    /// Extra environment variables.
    env: Option<BTreeMap<String, String>>,
    /// Kill the command after this many seconds.
    timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    /// Text.
    #[default]
    Utf8,
    /// Base64 (standard alphabet, padded): any bytes.
    Base64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct WriteFileArgs {
    /// The capsule's name (or id).
    name: String,
    /// Absolute path in the capsule.
    path: String,
    /// The file's contents, as text or as base64 (see `encoding`).
    content: String,
    /// How `content` is encoded: "utf8" (default) or "base64".
    encoding: Option<Encoding>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ReadFileArgs {
    /// The capsule's name (or id).
    name: String,
    /// Absolute path in the capsule.
    path: String,
    /// How to return the contents: "utf8" (default; fails if the file is not valid UTF-8) or
    /// "base64" (any bytes).
    encoding: Option<Encoding>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ListFilesArgs {
    /// The capsule's name (or id).
    name: String,
    /// Absolute directory path in the capsule (default "/").
    path: Option<String>,
}

/// A background command takes the same arguments as `exec`.
type SpawnArgs = ExecArgs;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ReadOutputArgs {
    /// The capsule's name (or id).
    name: String,
    /// The handle `exec_background` returned.
    handle: String,
    /// Byte offset in the process's combined output (stdout and stderr) to read from: 0 (default)
    /// for the start, or the `next_offset` of the previous read.
    offset: Option<u64>,
    /// Seconds to wait for more output or the exit (default 2, at most 60).
    wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ExposeArgs {
    /// The capsule's name (or id).
    name: String,
    /// The TCP port a server in the capsule listens on (1-65535).
    port: u16,
    /// Who may open the URL: "token" (default: a bearer token that can read the capsule) or
    /// "public" (anyone; your token needs `urls:public`).
    access: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ListArgs {
    /// Include terminated capsules too (default false).
    include_terminated: Option<bool>,
}

type ToolResult = Result<Value, capsules_core::Error>;

#[derive(Debug, Clone)]
struct CapsuleTools {
    api: Capsules,
    token: String,
    #[expect(dead_code, reason = "read by the tool_handler macro")]
    tool_router: ToolRouter<Self>,
}

fn ok(v: Value) -> CallToolResult {
    let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn finish(r: ToolResult) -> CallToolResult {
    match r {
        Ok(v) => ok(v),
        Err(e) => CallToolResult::error(vec![ContentBlock::text(error_text(&e))]),
    }
}

/// The text of a failed tool call: the API's message, or for a transport failure (the API is
/// down, or went away mid-call) one that says the API is unreachable and why.
fn error_text(e: &capsules_core::Error) -> String {
    const PREFIX: &str = "the Capsules API at ";
    let msg = e.message();
    if e.kind() == capsules_core::ErrorKind::Unavailable
        && let Some(rest) = msg.strip_prefix(PREFIX)
        && let Some((url, what)) = rest.split_once(' ')
    {
        let chain = e.chain();
        let detail = chain.strip_prefix(msg).unwrap_or("").trim_start_matches(": ");
        let what = what.strip_prefix("is unreachable").unwrap_or(what).trim();
        let why = match (what.is_empty(), detail.is_empty()) {
            (true, true) => "no connection".to_owned(),
            (true, false) => detail.to_owned(),
            (false, true) => format!("it {what}"),
            (false, false) => format!("it {what} ({detail})"),
        };
        return format!(
            "unavailable error: {PREFIX}{url} is unreachable: {why}. The call may not have completed; \
             retry once the API is back (check with `status` before repeating anything that changes state)"
        );
    }
    format!("{} error: {}", e.kind(), msg)
}

/// `argv`, or `sh -c shell`: exactly one of them.
fn command(argv: Option<Vec<String>>, shell: Option<String>) -> Result<Vec<String>, capsules_core::Error> {
    match (argv, shell) {
        (Some(v), None) if !v.is_empty() => Ok(v),
        (None, Some(s)) => Ok(vec!["sh".to_owned(), "-c".to_owned(), s]),
        _ => Err(capsules_core::Error::invalid_input(
            "give exactly one of `argv` (a non-empty array) or `shell` (a string)",
        )),
    }
}

/// The URL of an exposed port: the server's `href` when it sends one, else built from the host
/// label under `CAPSULE_PREVIEW_DOMAIN` (default `localhost`) on the API's scheme and port.
fn public_href(url: &Value, api: &str, preview_domain: &str) -> Option<String> {
    if let Some(h) = url.get("href").and_then(Value::as_str) {
        return Some(h.to_owned());
    }
    let label = url.get("host_label")?.as_str()?;
    let (scheme, rest) = api.split_once("://").unwrap_or(("http", api));
    let authority = rest.split('/').next().unwrap_or(rest);
    let port = authority
        .rsplit_once(':')
        .filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, p)| format!(":{p}"))
        .unwrap_or_default();
    Some(format!("{scheme}://{label}.{preview_domain}{port}/"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Keeps the first and last `cap / 2` bytes of `b`; the text and the number of bytes dropped.
pub fn head_tail(b: &[u8], cap: usize) -> (String, usize) {
    if b.len() <= cap {
        return (String::from_utf8_lossy(b).into_owned(), 0);
    }
    let half = cap / 2;
    let dropped = b.len() - 2 * half;
    let head = String::from_utf8_lossy(&b[..half]);
    let tail = String::from_utf8_lossy(&b[b.len() - half..]);
    (format!("{head}\n[... {dropped} bytes dropped ...]\n{tail}"), dropped)
}

fn record_summary(r: &capsules_core::records::CapsuleRecord) -> Value {
    json!({
        "id": to_json(&r.id),
        "name": to_json(&r.name),
        "state": to_json(&r.state),
        "size": to_json(&r.size),
        "image": to_json(&r.image),
        "network": to_json(&r.network),
        "disk_gib": r.disk_gib,
        "limits": to_json(&r.limits),
        "url": to_json(&r.url),
    })
}

impl CapsuleTools {
    fn new(api: Capsules, token: String) -> Self {
        CapsuleTools {
            api,
            token,
            tool_router: Self::tool_router(),
        }
    }

    fn client(&self) -> Result<Client, capsules_core::Error> {
        self.api.connect(&self.token)
    }
}

#[tool_router]
impl CapsuleTools {
    #[tool(
        description = "Create a capsule: a small, isolated Linux microVM you can run commands in. Returns its id, name and state. It costs credits while running; terminate it when done."
    )]
    async fn create(&self, Parameters(a): Parameters<CreateArgs>) -> CallToolResult {
        finish(
            async {
                let mut b = self.client()?.create(a.name);
                if let Some(s) = a.size {
                    b = b.size(s);
                }
                if let Some(s) = a.image {
                    b = b.image(s);
                }
                if let Some(s) = a.credit_limit {
                    b = b.credit_limit(s);
                }
                if let Some(s) = a.network {
                    b = b.network(s);
                }
                if let Some(g) = a.disk_gib {
                    b = b.disk_gib(g);
                }
                let h = b.await?;
                Ok(match h.created() {
                    Some(r) => record_summary(r),
                    None => json!({ "id": h.target() }),
                })
            }
            .await,
        )
    }

    #[tool(description = "List your capsules (live ones unless include_terminated is true): name, id, state, size.")]
    async fn list(&self, Parameters(a): Parameters<ListArgs>) -> CallToolResult {
        finish(
            async {
                let opts = capsules_client::ListOptions {
                    include_terminated: a.include_terminated.unwrap_or(false),
                };
                let caps = self.client()?.list_with(opts).await?;
                Ok(json!({ "capsules": caps.iter().map(record_summary).collect::<Vec<_>>() }))
            }
            .await,
        )
    }

    #[tool(description = "Show one capsule: state, size, image, network policy, limits and public URL.")]
    async fn status(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        finish(async { Ok(record_summary(&self.client()?.capsule(&a.name)?.status().await?)) }.await)
    }

    #[tool(
        description = "Run a command in a capsule and wait for it. Give `argv` (e.g. [\"npm\",\"test\"]) or `shell` (run with sh -c). Returns exit_code, stdout and stderr. Each stream is capped at 16 KiB (16384 bytes): longer output keeps its first 8 KiB and last 8 KiB, and stdout_dropped_bytes / stderr_dropped_bytes say how many bytes were cut from the middle."
    )]
    async fn exec(&self, Parameters(a): Parameters<ExecArgs>) -> CallToolResult {
        finish(
            async {
                let argv = command(a.argv, a.shell)?;
                let h = self.client()?.capsule(&a.name)?;
                let mut b = h.exec(argv);
                if let Some(c) = a.cwd {
                    b = b.cwd(c);
                }
                for (k, v) in a.env.unwrap_or_default() {
                    b = b.env(k, v);
                }
                if let Some(t) = a.timeout_secs {
                    b = b.timeout(Duration::from_secs(t));
                }
                let out = b.await?;
                let (stdout, so_dropped) = head_tail(&out.stdout, STREAM_CAP);
                let (stderr, se_dropped) = head_tail(&out.stderr, STREAM_CAP);
                Ok(json!({
                    "exit_code": out.exit_code(),
                    "stdout": stdout,
                    "stderr": stderr,
                    "stdout_bytes": out.stdout.len(),
                    "stderr_bytes": out.stderr.len(),
                    "stdout_dropped_bytes": so_dropped,
                    "stderr_dropped_bytes": se_dropped,
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Start a command in a capsule in the background (a server, a long build) and return at once with a `handle`. Read its output later with `read_output`. Give `argv` or `shell`."
    )]
    async fn exec_background(&self, Parameters(a): Parameters<SpawnArgs>) -> CallToolResult {
        finish(
            async {
                let spec = capsules_client::wire::ExecSpec {
                    argv: command(a.argv, a.shell)?,
                    env: a.env.unwrap_or_default(),
                    cwd: a.cwd,
                    timeout_secs: a.timeout_secs,
                    output_cap: None,
                };
                let p = self.client()?.capsule(&a.name)?.spawn(&spec).await?;
                Ok(json!({
                    "handle": p.handle,
                    "pid": p.pid,
                    "argv": p.argv,
                    "running": p.running,
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Read the output of a background command (from `exec_background`) from byte `offset` of its combined output, waiting up to `wait_secs` (default 2) for more. Returns stdout, stderr, next_offset (pass it as `offset` next time), running, and exit_code once it ended. Each stream is capped at 16 KiB per read like `exec`."
    )]
    async fn read_output(&self, Parameters(a): Parameters<ReadOutputArgs>) -> CallToolResult {
        finish(
            async {
                let wait = a.wait_secs.unwrap_or(2);
                if wait > 60 {
                    return Err(capsules_core::Error::invalid_input(format!(
                        "wait_secs is {wait}; at most 60 is allowed"
                    )));
                }
                let offset = a.offset.unwrap_or(0);
                let mut s = self.client()?.capsule(&a.name)?.attach(&a.handle, offset).await?;
                let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
                loop {
                    match tokio::time::timeout_at(deadline, s.events.next()).await {
                        Err(_) | Ok(None) => break,
                        Ok(Some(Ok(capsules_core::backend::ExecEvent::Stdout(b)))) => out.extend_from_slice(&b),
                        Ok(Some(Ok(capsules_core::backend::ExecEvent::Stderr(b)))) => err.extend_from_slice(&b),
                        Ok(Some(Ok(capsules_core::backend::ExecEvent::Exit(x)))) => {
                            exit = Some(x);
                            break;
                        }
                        Ok(Some(Err(e))) => return Err(e),
                    }
                }
                let (stdout, so_dropped) = head_tail(&out, STREAM_CAP);
                let (stderr, se_dropped) = head_tail(&err, STREAM_CAP);
                Ok(json!({
                    "handle": a.handle,
                    "running": exit.is_none(),
                    "exit_code": exit.as_ref().map(|x| x.shell_code()),
                    "stdout": stdout,
                    "stderr": stderr,
                    "stdout_dropped_bytes": so_dropped,
                    "stderr_dropped_bytes": se_dropped,
                    "next_offset": offset + (out.len() + err.len()) as u64,
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Expose a TCP port of a capsule at its one public URL (replacing any earlier port) and return the URL. access \"token\" (default) needs a bearer token that can read the capsule; \"public\" lets anyone in."
    )]
    async fn expose_port(&self, Parameters(a): Parameters<ExposeArgs>) -> CallToolResult {
        finish(
            async {
                if a.port == 0 {
                    return Err(capsules_core::Error::invalid_input(
                        "port is 0; give a TCP port from 1 to 65535",
                    ));
                }
                let access = a.access.as_deref().unwrap_or("token");
                let u = self.client()?.capsule(&a.name)?.expose(a.port, access).await?;
                let v = to_json(&u);
                let domain = std::env::var("CAPSULE_PREVIEW_DOMAIN").unwrap_or_else(|_| "localhost".to_owned());
                let href = public_href(&v, self.api.base(), &domain);
                Ok(json!({
                    "url": href,
                    "port": v.get("port"),
                    "access": v.get("access"),
                    "host_label": v.get("host_label"),
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Write a file in a capsule (created or replaced). `content` is text, or base64 with encoding \"base64\" for any bytes. Returns the bytes written."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteFileArgs>) -> CallToolResult {
        finish(
            async {
                let data = match a.encoding.unwrap_or_default() {
                    Encoding::Utf8 => a.content.into_bytes(),
                    Encoding::Base64 => base64::engine::general_purpose::STANDARD
                        .decode(a.content.trim())
                        .map_err(|e| {
                            capsules_core::Error::invalid_input(format!("`content` is not valid base64: {e}"))
                        })?,
                };
                let n = self.client()?.capsule(&a.name)?.write_file(&a.path, data).await?;
                Ok(json!({ "path": a.path, "bytes": n }))
            }
            .await,
        )
    }

    #[tool(
        description = "Read a file from a capsule. encoding \"utf8\" (default) returns text (an error if the file is not UTF-8); \"base64\" returns any bytes as base64."
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadFileArgs>) -> CallToolResult {
        finish(
            async {
                let data = self.client()?.capsule(&a.name)?.read_file(&a.path).await?;
                let bytes = data.len();
                let (content, encoding) = match a.encoding.unwrap_or_default() {
                    Encoding::Utf8 => (
                        String::from_utf8(data).map_err(|_| {
                            capsules_core::Error::invalid_input(format!(
                                "{} is not valid UTF-8; read it with encoding \"base64\"",
                                a.path
                            ))
                        })?,
                        "utf8",
                    ),
                    Encoding::Base64 => (base64::engine::general_purpose::STANDARD.encode(&data), "base64"),
                };
                Ok(json!({ "path": a.path, "bytes": bytes, "encoding": encoding, "content": content }))
            }
            .await,
        )
    }

    #[tool(description = "List a directory in a capsule: name, kind (file/dir/symlink), size and mode of each entry.")]
    async fn list_files(&self, Parameters(a): Parameters<ListFilesArgs>) -> CallToolResult {
        finish(
            async {
                let path = a.path.unwrap_or_else(|| "/".to_owned());
                let entries = self.client()?.capsule(&a.name)?.list_dir(&path).await?;
                Ok(json!({ "path": path, "entries": to_json(&entries) }))
            }
            .await,
        )
    }

    #[tool(
        description = "What a capsule has cost so far (compute, storage, traffic, total; micro-credits) and its credit limit; also the team's balance when your token may read billing."
    )]
    async fn usage(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        finish(
            async {
                let client = self.client()?;
                let u = client.capsule(&a.name)?.usage().await?;
                let mut v = json!({
                    "name": to_json(&u.capsule.name),
                    "state": to_json(&u.capsule.state),
                    "usage": to_json(&u.usage),
                    "limits": to_json(&u.capsule.limits),
                });
                // The team's balance needs billing:read; leave it out when the token lacks it.
                match client.usage().await {
                    Ok(t) => v["team_balance"] = to_json(&t.balance),
                    Err(e) if e.kind() == capsules_core::ErrorKind::Unavailable => return Err(e),
                    Err(_) => {}
                }
                Ok(v)
            }
            .await,
        )
    }

    #[tool(description = "Put a capsule to sleep: it stops using compute (its disk is kept) until woken.")]
    async fn sleep(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        finish(async { Ok(record_summary(&self.client()?.capsule(&a.name)?.sleep().await?)) }.await)
    }

    #[tool(description = "Wake a sleeping capsule.")]
    async fn wake(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        finish(async { Ok(record_summary(&self.client()?.capsule(&a.name)?.wake().await?)) }.await)
    }

    #[tool(description = "Terminate a capsule for good: it stops and its disk is deleted. Idempotent.")]
    async fn terminate(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        finish(async { Ok(record_summary(&self.client()?.capsule(&a.name)?.terminate().await?)) }.await)
    }
}

#[tool_handler]
impl ServerHandler for CapsuleTools {
    fn get_info(&self) -> ServerConfig {
        let mut me = rmcp::model::Implementation::from_build_env();
        me.name = "capsule-mcp".to_owned();
        me.version = env!("CARGO_PKG_VERSION").to_owned();
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(me)
            .with_instructions(
                "Capsules: small, isolated Linux microVMs. Create one, run commands and move files in it, \
             check its cost, and terminate it when done.",
            )
    }
}

const USAGE: &str = "usage: capsule-mcp [--http 127.0.0.1:PORT]

Serves Capsules as MCP tools over stdio (the default), or over streamable HTTP at
http://ADDR/mcp with --http (loopback addresses only). Reads CAPSULE_API (default
http://127.0.0.1:7878) and CAPSULE_TOKEN; every tool call is made with that token.";

/// `--http ADDR`: a loopback socket address, or an error saying what is allowed.
fn parse_args(args: &[String]) -> Result<Option<std::net::SocketAddr>, String> {
    let mut http = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--http" => it
                .next()
                .ok_or("--http needs an address, e.g. --http 127.0.0.1:8765")?
                .as_str(),
            s if s.starts_with("--http=") => &s["--http=".len()..],
            other => {
                return Err(format!(
                    "unknown argument {other:?}; the only option is --http 127.0.0.1:PORT"
                ));
            }
        };
        let addr: std::net::SocketAddr = value
            .parse()
            .map_err(|_| format!("--http {value:?} is not an IP:PORT address; use e.g. 127.0.0.1:8765"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--http {addr} is not a loopback address; the MCP endpoint has no authentication of its \
                 own (it acts with CAPSULE_TOKEN), so only 127.0.0.1:PORT or [::1]:PORT is allowed"
            ));
        }
        http = Some(addr);
    }
    Ok(http)
}

/// MCP over streamable HTTP at `http://addr/mcp`, one session per client.
async fn serve_http(tools: CapsuleTools, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
    let service = StreamableHttpService::new(
        move || Ok(tools.clone()),
        std::sync::Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    eprintln!("capsule-mcp: serving MCP over streamable HTTP at http://{addr}/mcp");
    axum::serve(listener, router).await
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let http = match parse_args(&args) {
        Ok(h) => h,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("capsule-mcp: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let url = std::env::var("CAPSULE_API").unwrap_or_else(|_| capsules_client::DEFAULT_API.to_owned());
    let token = std::env::var("CAPSULE_TOKEN").unwrap_or_default();
    let api = match Capsules::new(&url) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("capsule-mcp: CAPSULE_API={url}: {e}");
            std::process::exit(2);
        }
    };
    if token.is_empty() {
        eprintln!("capsule-mcp: CAPSULE_TOKEN is not set; every tool call will fail to authenticate");
    }
    let tools = CapsuleTools::new(api, token);
    if let Some(addr) = http {
        if let Err(e) = serve_http(tools, addr).await {
            eprintln!("capsule-mcp: HTTP on {addr}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let service = match tools.serve(rmcp::transport::stdio()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capsule-mcp: could not start the MCP session: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = service.waiting().await {
        eprintln!("capsule-mcp: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::{head_tail, parse_args, public_href};
    use serde_json::json;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn http_flag_takes_loopback_addresses_only() {
        assert_eq!(parse_args(&[]).unwrap(), None);
        let a = parse_args(&args(&["--http", "127.0.0.1:8765"])).unwrap().unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:8765");
        assert!(parse_args(&args(&["--http=[::1]:9"])).unwrap().is_some());
        let e = parse_args(&args(&["--http", "0.0.0.0:8765"])).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let e = parse_args(&args(&["--http", "localhost"])).unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
        assert!(parse_args(&args(&["--http"])).unwrap_err().contains("needs an address"));
        assert!(
            parse_args(&args(&["--stdio"]))
                .unwrap_err()
                .contains("unknown argument")
        );
    }

    #[test]
    fn public_url_prefers_the_servers_href() {
        let with = json!({"href": "https://x-abc.preview.example/", "host_label": "x-abc"});
        assert_eq!(
            public_href(&with, "http://127.0.0.1:7878", "localhost").as_deref(),
            Some("https://x-abc.preview.example/")
        );
        let without = json!({"host_label": "x-abc", "port": 8080});
        assert_eq!(
            public_href(&without, "http://127.0.0.1:7878", "localhost").as_deref(),
            Some("http://x-abc.localhost:7878/")
        );
        assert_eq!(
            public_href(&without, "https://api.example/v", "preview.example").as_deref(),
            Some("https://x-abc.preview.example/")
        );
        assert_eq!(public_href(&json!({}), "http://h", "d"), None);
    }

    #[test]
    fn short_output_is_kept_whole() {
        assert_eq!(head_tail(b"hi\n", 16), ("hi\n".to_owned(), 0));
        assert_eq!(head_tail(&[b'a'; 16], 16).1, 0);
    }

    #[test]
    fn long_output_keeps_head_and_tail_and_counts_the_rest() {
        let mut b = b"HEAD".to_vec();
        b.extend([b'.'; 100]);
        b.extend(b"TAIL");
        let (s, dropped) = head_tail(&b, 8);
        assert_eq!(dropped, 108 - 8);
        assert!(s.starts_with("HEAD") && s.ends_with("TAIL"), "{s}");
        assert!(s.contains("100 bytes dropped"), "{s}");
    }
}
