//! `capsule`: the Capsules command line, over the example server's HTTP API.
//!
//!     capsule tokens create --scope agent:write --prefix agent-
//!     capsule create agent-pr-482 --size 2x2gb --credit-limit 2.00
//!     capsule cp ./examples/quickstart/project agent-pr-482:/workspace
//!     capsule exec agent-pr-482 -- npm test
//!     capsule terminate agent-pr-482

mod console;
mod cp;
mod logs;
mod progress;
mod show;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use capsules_client::{Capsules, Client};
use capsules_core::backend::ExecEvent;
use capsules_core::{Error, ErrorKind, Result, Scope, TokenSpec};
use clap::{Parser, Subcommand};
use futures::StreamExt;

/// Exit code for a command the capsule killed at its timeout.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code for an error before (or around) the remote command: it did not report an exit.
pub const EXIT_ERROR: u8 = 125;

#[derive(Debug, Parser)]
#[command(name = "capsule", version, about = "Small, safe Linux microVMs for AI agents.")]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The Capsules API.
    #[arg(long, env = "CAPSULE_API", default_value = capsules_client::DEFAULT_API, global = true)]
    api: String,
    /// The token to act with.
    #[arg(long, env = "CAPSULE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mint, list and revoke tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Create a capsule.
    Create {
        name: String,
        /// 1x1gb (default), 2x2gb, 2x4gb, 4x8gb.
        #[arg(long)]
        size: Option<String>,
        /// In credits, e.g. 2.00 (default 1.00).
        #[arg(long)]
        credit_limit: Option<String>,
        /// full (default) or small.
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// Disk in GiB.
        #[arg(long)]
        disk: Option<u32>,
        /// `internet` (default), `none`, `allow:<cidr or domain>,...`
        #[arg(long)]
        network: Option<String>,
        /// e.g. 10m.
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
        /// e.g. 24h.
        #[arg(long, value_parser = parse_duration)]
        max_runtime: Option<Duration>,
    },
    /// List capsules.
    List {
        /// Include terminated capsules.
        #[arg(long)]
        all: bool,
    },
    /// A capsule's state and limits.
    Status { name: String },
    /// Change a capsule's limits.
    Update {
        name: String,
        #[arg(long)]
        credit_limit: Option<String>,
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
        #[arg(long, value_parser = parse_duration)]
        max_runtime: Option<Duration>,
        #[arg(long)]
        network: Option<String>,
    },
    /// Run a command in a capsule; exits with its exit code.
    Exec {
        name: String,
        /// e.g. 30s.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Working directory (default /workspace).
        #[arg(long)]
        cwd: Option<String>,
        /// K=V, repeatable.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        #[arg(last = true, required = true, num_args = 1..)]
        argv: Vec<String>,
    },
    /// Copy files: `cp DIR NAME:/path`, `cp FILE NAME:/path/file`, `cp NAME:/path LOCAL`.
    Cp { src: String, dst: String },
    /// Terminate a capsule (idempotent).
    Terminate { name: String },
    /// Put a capsule to sleep.
    Sleep { name: String },
    /// Wake a sleeping capsule.
    Wake { name: String },
    /// Boot a capsule cold from its disk.
    Restart { name: String },
    /// A capsule's exec history and boot/serial log.
    Logs { name: String },
    /// An interactive terminal in a capsule (raw mode; Ctrl-C goes to the capsule); exits with
    /// the remote program's exit code. With stdin not a terminal, forwards stdin's bytes.
    Console {
        name: String,
        /// Columns (default: this terminal's, else 80).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        cols: Option<u16>,
        /// Rows (default: this terminal's, else 24).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        rows: Option<u16>,
    },
    /// A capsule's usage (compute, storage, events, cost vs limit), or the team's.
    Usage { name: Option<String> },
    /// A capsule's audit trail.
    Events { name: String },
    /// Print a capsule's public URL; expose a port as it (`--port`), or remove it.
    Url {
        name: String,
        /// Expose this port inside the capsule (sets or replaces the one URL).
        #[arg(long)]
        port: Option<u16>,
        /// Open to anyone (needs the urls:public scope); the default is `token` access.
        #[arg(long, conflicts_with = "remove")]
        public: bool,
        /// Remove the URL.
        #[arg(long, conflicts_with_all = ["port", "preview_token"])]
        remove: bool,
        /// Also mint a preview token and print the URL a browser opens once with it.
        #[arg(long)]
        preview_token: bool,
        /// Lifetime of the preview token, e.g. 1h (at most 7d).
        #[arg(long, value_parser = parse_duration, default_value = "1h", requires = "preview_token")]
        ttl: Duration,
    },
    /// Operator: teams.
    #[command(subcommand)]
    Teams(TeamsCmd),
    /// Operator: credits.
    #[command(subcommand)]
    Credits(CreditsCmd),
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Mint a token no broader than yours; prints its secret once.
    Create {
        /// Repeatable: agent:write, capsules:read, capsules:write, tokens:write, billing:read, ...
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        #[arg(long)]
        prefix: Option<String>,
        /// Allowed sizes, repeatable.
        #[arg(long = "size")]
        sizes: Vec<String>,
        #[arg(long)]
        max_credit_limit: Option<String>,
        /// e.g. 1h.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long)]
        label: Option<String>,
    },
    /// Tokens you may see.
    List,
    /// Revoke a token and its descendants.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum TeamsCmd {
    /// Create a team (prints its owner token once).
    Create { name: String },
}

#[derive(Debug, Subcommand)]
enum CreditsCmd {
    /// Grant credits to a team.
    Grant {
        team: String,
        amount: String,
        #[arg(long)]
        reason: String,
    },
}

/// `30s`, `10m`, `24h`, `1d`, or plain seconds.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 30s, 10m, 24h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?} has an unknown unit; use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

struct Ctx {
    api: Capsules,
    token: Option<String>,
    json: bool,
}

impl Ctx {
    fn secret(&self) -> Result<&str> {
        self.token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::unauthenticated("no token: set CAPSULE_TOKEN (or pass --token)"))
    }
    fn client(&self) -> Result<Client> {
        self.api.connect(self.secret()?)
    }
    fn print_json<T: serde::Serialize>(&self, v: &T) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // `capsule list | head` ends quietly when the reader goes away, like other Unix tools.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread writes.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let api = match Capsules::new(&cli.api) {
        Ok(a) => a,
        Err(e) => return fail(&e, None),
    };
    let ctx = Ctx {
        api,
        token: cli.token,
        json: cli.json,
    };
    match run(&ctx, cli.cmd).await {
        Ok(code) => code,
        Err(e) => fail(&e, Some(&ctx)),
    }
}

/// One line `error: <message>`, a hint where one helps, exit code 125 (1 for usage-level ones).
/// With `--json` the error is one JSON object on stderr: `{"error": {"kind", "message", "hint"?}}`.
fn fail(e: &Error, ctx: Option<&Ctx>) -> ExitCode {
    let hint = match e.kind() {
        ErrorKind::Unauthenticated => Some("hint: check CAPSULE_TOKEN; a revoked or expired token is refused"),
        ErrorKind::Unavailable if e.message().contains("unreachable") => {
            Some("hint: is capsules-server running? set CAPSULE_API to its address")
        }
        ErrorKind::InsufficientCredits => Some("hint: the team's operator can grant credits"),
        _ => None,
    };
    if ctx.is_some_and(|c| c.json) {
        json_error(
            &e.kind().to_string(),
            &e.to_string(),
            hint.map(|h| h.trim_start_matches("hint: ")),
        );
        return ExitCode::from(1);
    }
    eprintln!("error: {e}");
    if let Some(h) = hint {
        eprintln!("{h}");
    }
    ExitCode::from(1)
}

/// One JSON error object on stderr (the `--json` form of `error: ...`).
fn json_error(kind: &str, message: &str, hint: Option<&str>) {
    let mut detail = serde_json::json!({ "kind": kind, "message": message });
    if let Some(h) = hint {
        detail["hint"] = h.into();
    }
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{}", serde_json::json!({ "error": detail }));
    let _ = err.flush();
}

/// Parses the command line; with `--json` a usage error is a JSON error on stderr (exit 2).
fn parse_cli() -> std::result::Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(c) => Ok(c),
        Err(e) => {
            use clap::error::ErrorKind as K;
            let json = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            if !json
                || matches!(
                    e.kind(),
                    K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                e.exit();
            }
            let text = e.render().to_string();
            let message = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .to_owned();
            json_error(
                "invalid_input",
                &message,
                Some("run capsule --help for the commands and their options"),
            );
            Err(ExitCode::from(2))
        }
    }
}

async fn run(ctx: &Ctx, cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Tokens(t) => tokens(ctx, t).await?,
        Cmd::Create {
            name,
            size,
            credit_limit,
            image,
            region,
            disk,
            network,
            idle_timeout,
            max_runtime,
        } => {
            let spinner = progress::Spinner::start(
                progress::wanted(ctx.json),
                format!("creating {name}: booting the capsule (a first image build can take minutes)"),
            );
            let mut b = ctx.client()?.create(name);
            if let Some(v) = size {
                b = b.size(v);
            }
            if let Some(v) = credit_limit {
                b = b.credit_limit(v);
            }
            if let Some(v) = image {
                b = b.image(v);
            }
            if let Some(v) = region {
                b = b.region(v);
            }
            if let Some(v) = disk {
                b = b.disk_gib(v);
            }
            if let Some(v) = network {
                b = b.network(v);
            }
            if let Some(v) = idle_timeout {
                b = b.idle_timeout(v);
            }
            if let Some(v) = max_runtime {
                b = b.max_runtime(v);
            }
            let h = b.await?;
            let rec = match h.created() {
                Some(r) => r.clone(),
                None => h.status().await?,
            };
            drop(spinner);
            if ctx.json {
                ctx.print_json(&rec);
            } else {
                println!(
                    "created capsule {} ({}, {}, credit limit {}) — {}",
                    rec.name, rec.id, rec.size, rec.limits.credit_limit, rec.state
                );
            }
        }
        Cmd::List { all } => {
            let v = ctx
                .client()?
                .list_with(capsules_client::ListOptions {
                    include_terminated: all,
                })
                .await?;
            if ctx.json {
                ctx.print_json(&v);
            } else {
                show::capsules(&v);
            }
        }
        Cmd::Status { name } => {
            let rec = ctx.client()?.capsule(&name)?.status().await?;
            if ctx.json {
                ctx.print_json(&rec);
            } else {
                show::capsule(&rec);
            }
        }
        Cmd::Update {
            name,
            credit_limit,
            idle_timeout,
            max_runtime,
            network,
        } => {
            let h = ctx.client()?.capsule(&name)?;
            let mut b = h.update();
            if let Some(v) = credit_limit {
                b = b.credit_limit(v);
            }
            if let Some(v) = idle_timeout {
                b = b.idle_timeout(v);
            }
            if let Some(v) = max_runtime {
                b = b.max_runtime(v);
            }
            if let Some(v) = network {
                b = b.network(v);
            }
            let rec = b.await?;
            if ctx.json {
                ctx.print_json(&rec);
            } else {
                show::capsule(&rec);
            }
        }
        Cmd::Exec {
            name,
            timeout,
            cwd,
            env,
            argv,
        } => {
            return Ok(match exec(ctx, &name, timeout, cwd, env, argv).await {
                Ok(code) => code,
                Err(e) => {
                    fail(&e, Some(ctx));
                    ExitCode::from(EXIT_ERROR)
                }
            });
        }
        Cmd::Cp { src, dst } => {
            let summary = cp::run(&ctx.client()?, &src, &dst).await?;
            if ctx.json {
                ctx.print_json(&serde_json::json!({ "copied": summary }));
            } else {
                println!("{summary}");
            }
        }
        Cmd::Terminate { name } => {
            lifecycle(ctx, &name, "terminated", |h| {
                Box::pin(async move { h.terminate().await })
            })
            .await?
        }
        Cmd::Sleep { name } => lifecycle(ctx, &name, "asleep", |h| Box::pin(async move { h.sleep().await })).await?,
        Cmd::Wake { name } => lifecycle(ctx, &name, "awake", |h| Box::pin(async move { h.wake().await })).await?,
        Cmd::Restart { name } => {
            lifecycle(ctx, &name, "restarted", |h| Box::pin(async move { h.restart().await })).await?
        }
        Cmd::Logs { name } => logs::run(&ctx.client()?, &name, ctx.json).await?,
        Cmd::Console { name, cols, rows } => return console::run(&ctx.client()?, &name, cols, rows).await,
        Cmd::Usage { name: Some(name) } => {
            let u = ctx.client()?.capsule(&name)?.usage().await?;
            if ctx.json {
                ctx.print_json(&u);
            } else {
                show::capsule_usage(&u);
            }
        }
        Cmd::Usage { name: None } => {
            let u = ctx.client()?.usage().await?;
            if ctx.json {
                ctx.print_json(&u);
            } else {
                show::team_usage(&u);
            }
        }
        Cmd::Events { name } => {
            let ev = ctx.client()?.capsule(&name)?.events().await?;
            if ctx.json {
                ctx.print_json(&ev);
            } else {
                show::events(&ev);
            }
        }
        Cmd::Url {
            name,
            port,
            public,
            remove,
            preview_token,
            ttl,
        } => url(ctx, &name, port, public, remove, preview_token.then_some(ttl)).await?,
        Cmd::Teams(TeamsCmd::Create { name }) => {
            let t = ctx.api.operator(ctx.secret()?).create_team(&name).await?;
            if ctx.json {
                ctx.print_json(&t);
            } else {
                println!("created team {} ({})", t.team.name, t.team.id);
                println!("owner token (shown once): {}", t.owner.secret);
                println!("export CAPSULE_TOKEN={}", t.owner.secret);
            }
        }
        Cmd::Credits(CreditsCmd::Grant { team, amount, reason }) => {
            let e = ctx.api.operator(ctx.secret()?).grant(&team, &amount, &reason).await?;
            if ctx.json {
                ctx.print_json(&e);
            } else {
                println!("granted {} to {team}: {reason}", e.entry.amount);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `capsule url`: show, set (`--port`, `--public`) or remove the URL; `--preview-token` mints a
/// token and prints the browser URL.
async fn url(
    ctx: &Ctx,
    name: &str,
    port: Option<u16>,
    public: bool,
    remove: bool,
    preview: Option<Duration>,
) -> Result<()> {
    let h = ctx.client()?.capsule(name)?;
    if remove {
        h.unexpose().await?;
        if ctx.json {
            ctx.print_json(&serde_json::json!({ "url": null }));
        } else {
            println!("removed the URL of capsule {name}");
        }
        return Ok(());
    }
    let access = if public { "public" } else { "token" };
    let url = match port {
        Some(0) => return Err(Error::invalid_input("--port must be 1-65535")),
        Some(p) => h.expose(p, access).await?,
        None => {
            let cur = h.url().await?.ok_or_else(|| {
                Error::not_found(format!(
                    "capsule {name} has no URL; expose a port with `capsule url {name} --port N`"
                ))
            })?;
            // `--public` alone switches the current URL's access.
            if public && cur.access.as_str() != "public" {
                h.expose(cur.port, access).await?
            } else {
                cur
            }
        }
    };
    let token = match preview {
        Some(ttl) => Some(h.preview_token(ttl).await?),
        None => None,
    };
    if ctx.json {
        let mut v = serde_json::json!({ "url": url });
        if let Some(t) = &token {
            v["preview_token"] = serde_json::to_value(t).unwrap_or_default();
            v["browser_url"] = url.browser_url(&t.secret).into();
        }
        ctx.print_json(&v);
        return Ok(());
    }
    match &token {
        Some(t) => {
            println!("{}", url.browser_url(&t.secret));
            eprintln!(
                "open it once in a browser: it sets a cookie for {} and redirects (port {}, {} access;                  the token opens this URL only{})",
                url.href,
                url.port,
                url.access,
                t.token
                    .expires_at_ms
                    .map(|ms| format!(", for {} s", (ms - t.token.created_at_ms) / 1000))
                    .unwrap_or_default()
            );
        }
        None => {
            println!("{}", url.href);
            if url.access.as_str() == "token" {
                eprintln!(
                    "port {}, token access: send Authorization: Bearer <token>, or run                      `capsule url {name} --preview-token` for a browser link",
                    url.port
                );
            }
        }
    }
    Ok(())
}

type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<capsules_core::records::CapsuleRecord>>>>;

async fn lifecycle(
    ctx: &Ctx,
    name: &str,
    done: &str,
    f: impl FnOnce(capsules_client::CapsuleHandle) -> Fut,
) -> Result<()> {
    // Waking and restarting boot or restore a VM: show that something is happening.
    let spinner = matches!(done, "awake" | "restarted").then(|| {
        let doing = if done == "awake" { "waking" } else { "restarting" };
        progress::Spinner::start(progress::wanted(ctx.json), format!("{doing} {name}"))
    });
    let rec = f(ctx.client()?.capsule(name)?).await;
    drop(spinner);
    let rec = rec?;
    if ctx.json {
        ctx.print_json(&rec);
    } else {
        println!("capsule {} {done} ({})", rec.name, rec.state);
    }
    Ok(())
}

async fn tokens(ctx: &Ctx, t: TokensCmd) -> Result<()> {
    let tokens = ctx.api.tokens(ctx.secret()?);
    match t {
        TokensCmd::Create {
            scopes,
            prefix,
            sizes,
            max_credit_limit,
            expires_in,
            label,
        } => {
            let mut spec = TokenSpec::new(scopes.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>>>()?);
            if let Some(p) = prefix {
                spec = spec.prefix(p);
            }
            if !sizes.is_empty() {
                spec = spec.sizes(
                    sizes
                        .iter()
                        .map(|s| capsules_core::Size::parse(s))
                        .collect::<Result<Vec<_>>>()?,
                );
            }
            if let Some(c) = max_credit_limit {
                spec = spec.max_credit_limit(capsules_core::MicroCredits::parse(&c)?);
            }
            if let Some(d) = expires_in {
                spec = spec.ttl(d);
            }
            if let Some(l) = label {
                spec = spec.label(l);
            }
            let m = tokens.create(spec).await?;
            if ctx.json {
                ctx.print_json(&m);
            } else {
                println!("token {} ({})", m.id, show::token_summary(&m.token));
                println!("secret (shown once): {}", m.secret);
                println!("export CAPSULE_TOKEN={}", m.secret);
            }
        }
        TokensCmd::List => {
            let v = tokens.list().await?;
            if ctx.json {
                ctx.print_json(&v);
            } else {
                show::tokens(&v);
            }
        }
        TokensCmd::Revoke { id } => {
            let v = tokens.revoke(&id).await?;
            if ctx.json {
                ctx.print_json(&v);
            } else {
                for id in v {
                    println!("revoked {id}");
                }
            }
        }
    }
    Ok(())
}

/// Our stdin, where a read error (a closed descriptor under CI) counts as its end.
struct LenientStdin(tokio::io::Stdin);

impl tokio::io::AsyncRead for LenientStdin {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(Ok(())),
            other => other,
        }
    }
}

async fn exec(
    ctx: &Ctx,
    name: &str,
    timeout: Option<Duration>,
    cwd: Option<String>,
    env: Vec<String>,
    argv: Vec<String>,
) -> Result<ExitCode> {
    let h = ctx.client()?.capsule(name)?;
    let mut b = h.exec(argv);
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::invalid_input(format!("--env {kv:?} must be K=V")))?;
        b = b.env(k, v);
    }
    if let Some(c) = cwd {
        b = b.cwd(c);
    }
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    if !std::io::stdin().is_terminal() {
        b = b.stdin_from(LenientStdin(tokio::io::stdin()));
    }
    let mut s = match b.stream().await {
        Ok(s) => s,
        Err(e) => {
            fail(&e, Some(ctx));
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut collected = (Vec::new(), Vec::new());
    while let Some(ev) = s.events.next().await {
        match ev {
            Ok(ExecEvent::Stdout(b)) if ctx.json => collected.0.extend_from_slice(&b),
            Ok(ExecEvent::Stderr(b)) if ctx.json => collected.1.extend_from_slice(&b),
            Ok(ExecEvent::Stdout(b)) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(ExecEvent::Stderr(b)) => {
                let _ = err.write_all(&b);
                let _ = err.flush();
            }
            Ok(ExecEvent::Exit(st)) => {
                if ctx.json {
                    ctx.print_json(&serde_json::json!({
                        "stdout": String::from_utf8_lossy(&collected.0),
                        "stderr": String::from_utf8_lossy(&collected.1),
                        "exit": st,
                    }));
                }
                if st.timed_out {
                    if ctx.json {
                        json_error("timed_out", "the command timed out and was killed", None);
                    } else {
                        eprintln!("error: the command timed out and was killed");
                    }
                    return Ok(ExitCode::from(EXIT_TIMEOUT));
                }
                if st.stdout_dropped + st.stderr_dropped > 0 && !ctx.json {
                    eprintln!(
                        "note: the output cap dropped {} bytes of stdout and {} of stderr",
                        st.stdout_dropped, st.stderr_dropped
                    );
                }
                let code = st.shell_code();
                return Ok(ExitCode::from(if (0..=255).contains(&code) {
                    code as u8
                } else {
                    EXIT_ERROR
                }));
            }
            Err(e) => {
                fail(&e, Some(ctx));
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        }
    }
    fail(
        &Error::unavailable("the command's output ended without an exit status"),
        Some(ctx),
    );
    Ok(ExitCode::from(EXIT_ERROR))
}
