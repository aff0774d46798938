//! `capsules-server`: the example HTTP API. State lives in SQLite under the state directory (or in memory with `--store memory`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsules_core::{Backend, Capsules, Error, MemoryStore, Result};
use clap::{Parser, ValueEnum};

const ABOUT: &str = "The Capsules example server: the /v1 HTTP API over capsules-core.\n\n\
State (tokens, capsules, ledger, events) is kept in <state-dir>/capsules.db (SQLite; --store memory \
keeps it in memory instead, lost on exit). On the first start on an empty store the server \
bootstraps the operator and a first team and prints both tokens once (also written to \
<state-dir>/bootstrap.json, mode 0600); later starts resume from the database and reconcile it \
with the capsules the backend still holds.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// In-memory fake capsules (no VMs): for tests and trying the API.
    Mock,
    /// QEMU microVMs (KVM or TCG).
    Qemu,
    /// Cloud Hypervisor microVMs.
    Chv,
}

#[derive(Debug, Parser)]
#[command(name = "capsules-server", version, about = ABOUT)]
struct Args {
    /// Which backend runs capsules [default: qemu when qemu-system-x86_64 is on PATH, else mock].
    #[arg(long, env = "CAPSULES_BACKEND")]
    backend: Option<BackendKind>,
    /// Where the backend keeps VM state and where bootstrap.json is written.
    #[arg(long, default_value = "/var/lib/capsules")]
    state_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Name of the team created at bootstrap.
    #[arg(long, default_value = "default")]
    team: String,
    /// Seconds between lifecycle job runs (metering, idle sleep, limits).
    #[arg(long, default_value_t = 5)]
    tick_secs: u64,
    /// Capsule networking for the microVM backends (a tap, nftables rules and a DNS forwarder per
    /// capsule; needs root or CAP_NET_ADMIN). `off` boots capsules without a network device.
    #[arg(long, value_enum, default_value_t = NetworkMode::On, env = "CAPSULES_NETWORK")]
    network: NetworkMode,
    /// Where state lives: `sqlite` (durable, <state-dir>/capsules.db) or `memory` (lost on exit).
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// The built web console served under /console/ (`npm ci && npm run build` in
    /// examples/server/console) [default: examples/server/console/dist of this source tree].
    #[arg(long, env = "CAPSULES_CONSOLE_DIR")]
    console_dir: Option<PathBuf>,
    /// Public URLs are http://<host label>.<preview domain>:<port>/ on this server's own port
    /// (the preview proxy answers every request whose Host is under this domain).
    #[arg(long, default_value = "localhost", env = "CAPSULES_PREVIEW_DOMAIN")]
    preview_domain: String,
    /// How long a preview request waits for the capsule's port to accept (waking it included).
    #[arg(long, default_value_t = 30)]
    preview_hold_secs: u64,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key; both or neither). Without
    /// them the server speaks plain HTTP.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, RSA or EC).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Sqlite,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NetworkMode {
    On,
    Off,
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// The one place a backend is constructed.
async fn make_backend(kind: BackendKind, state_dir: &Path, network: NetworkMode) -> Result<Arc<dyn Backend>> {
    match kind {
        BackendKind::Mock => {
            use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
            let mock = MockBackend::new();
            // The mock has no node: the quickstart's `npm test` answers, saying plainly it did not run.
            mock.on_exec(
                ExecMatcher::exact(["npm", "test"]),
                ExecReply::new()
                    .stdout("mock backend: `npm test` was NOT run (no VM, no node); use --backend qemu for a real capsule\n")
                    .exit_code(0),
            );
            Ok(Arc::new(mock))
        }
        BackendKind::Qemu => qemu_backend(state_dir, network).await,
        BackendKind::Chv => chv_backend(state_dir, network).await,
    }
}

/// The capsule network layer, or none when `--network off`.
#[cfg(any(feature = "qemu", feature = "chv"))]
async fn network_layer(mode: NetworkMode) -> Result<Option<Arc<capsules_microvm::net::Network>>> {
    use capsules_microvm::net::{NetConfig, Network};
    match mode {
        NetworkMode::Off => {
            tracing::warn!("capsule networking is off (--network off): capsules boot without a network device");
            Ok(None)
        }
        NetworkMode::On => Ok(Some(Arc::new(Network::new(NetConfig::from_env()?).await?))),
    }
}

#[cfg(feature = "chv")]
async fn chv_backend(state_dir: &Path, network: NetworkMode) -> Result<Arc<dyn Backend>> {
    use capsules_microvm::backend::MicroVmBackend;
    let vmm = capsules_backend_chv::ChvBuilder::from_env()
        .build()
        .map_err(|e| Error::unavailable("could not set up Cloud Hypervisor").with_source(e))?;
    let mut builder = MicroVmBackend::builder(vmm)
        .state_dir(state_dir)
        .capacity(capsules_microvm::backend::Capacity::from_env()?);
    if let Some(net) = network_layer(network).await? {
        builder = builder.network(net);
    }
    Ok(Arc::new(builder.build().await?))
}

#[cfg(not(feature = "chv"))]
async fn chv_backend(_: &Path, _: NetworkMode) -> Result<Arc<dyn Backend>> {
    Err(Error::unsupported(
        "the chv backend is not available in this build; use --backend mock or --backend qemu",
    ))
}

#[cfg(feature = "qemu")]
async fn qemu_backend(state_dir: &Path, network: NetworkMode) -> Result<Arc<dyn Backend>> {
    use capsules_backend_qemu::{QemuConfig, QemuVmm};
    use capsules_microvm::backend::MicroVmBackend;
    let config = QemuConfig::from_env().map_err(|e| Error::unavailable("could not configure QEMU").with_source(e))?;
    let vmm = QemuVmm::new(config).map_err(|e| Error::unavailable("could not set up QEMU").with_source(e))?;
    let mut builder = MicroVmBackend::builder(vmm)
        .state_dir(state_dir)
        .capacity(capsules_microvm::backend::Capacity::from_env()?);
    if let Some(net) = network_layer(network).await? {
        builder = builder.network(net);
    }
    Ok(Arc::new(builder.build().await?))
}

#[cfg(not(feature = "qemu"))]
async fn qemu_backend(_: &Path, _: NetworkMode) -> Result<Arc<dyn Backend>> {
    Err(Error::unsupported(
        "the qemu backend is not available in this build; use --backend mock",
    ))
}

/// Writes the bootstrap secrets where only the owner can read them.
/// Takes `<state-dir>/server.lock` (an advisory lock; it holds the owner's pid for the message).
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    let path = state_dir.join("server.lock");
    let io = |what: &str, e: std::io::Error| {
        Error::unavailable(format!("could not {what} {}", path.display())).with_source(e)
    };
    std::fs::create_dir_all(state_dir).map_err(|e| io("create the directory of", e))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("open", e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            let owner = owner.trim();
            return Err(Error::conflict(format!(
                "another capsules-server{} is using the state directory {}; stop it, or give this one \
                 its own --state-dir",
                if owner.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {owner})")
                },
                state_dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", e)),
    }
    f.set_len(0).map_err(|e| io("write", e))?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(|e| io("write", e))?;
    Ok(f)
}

fn write_bootstrap(state_dir: &Path, doc: &serde_json::Value) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join("bootstrap.json");
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(serde_json::to_string_pretty(doc).unwrap_or_default().as_bytes())?;
    f.write_all(b"\n")?;
    Ok(path)
}

async fn run(args: Args) -> Result<()> {
    // TLS files are checked before anything starts, so a bad path fails at once.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(capsules_server::tls::load(cert, key)?),
        _ => None,
    };
    let kind = match args.backend {
        Some(k) => k,
        None if on_path("qemu-system-x86_64") && cfg!(feature = "qemu") => BackendKind::Qemu,
        None => {
            let why = if on_path("qemu-system-x86_64") {
                "this build has no qemu backend (cargo feature `qemu`)"
            } else {
                "qemu-system-x86_64 is not installed"
            };
            eprintln!(
                "capsules-server: NOTICE: {why}; using the MOCK backend (fake capsules, no VMs). \
                 Pass --backend mock to silence this."
            );
            BackendKind::Mock
        }
    };
    // Checked before anything starts: a bad flag is an error, not a half-started server.
    let config = capsules_server::ServerConfig::default()
        .with_preview_domain(&args.preview_domain)?
        .with_preview_hold(Duration::from_secs(args.preview_hold_secs))?;
    // One server per state directory: a second one would reconcile the first one's live capsules
    // as lost. The lock lives as long as the process (the kernel drops it on any exit, kill -9 too).
    let _lock = lock_state_dir(&args.state_dir)?;
    let backend = make_backend(kind, &args.state_dir, args.network).await?;
    let info = backend.info();
    let builder = Capsules::builder().backend(backend);
    let capsules = match args.store {
        StoreKind::Memory => {
            tracing::warn!("state is in memory (--store memory): tokens, capsules and the ledger are lost on exit");
            builder.store(MemoryStore::new()).build().await?
        }
        StoreKind::Sqlite => {
            let db = args.state_dir.join("capsules.db");
            tracing::info!(db = %db.display(), "state in SQLite");
            builder
                .store(capsules_store_sqlite::SqliteStore::open(&db).await?)
                .build()
                .await?
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Error::unavailable(format!("could not listen on {}", args.listen)).with_source(e))?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    let config = config.with_public_port(addr.port());
    match capsules.bootstrap(&args.team).await {
        Ok(boot) => {
            let balance = capsules
                .operator(boot.operator.secret.expose())
                .balance(&args.team)
                .await?;
            let doc = serde_json::json!({
                "api": format!("{}://{addr}", if args.tls_cert.is_some() { "https" } else { "http" }),
                "backend": format!("{kind:?}").to_lowercase(),
                "team": boot.team.name.as_str(),
                "team_id": boot.team.id.as_str(),
                "balance": balance.to_string(),
                "operator_token": boot.operator.secret.expose(),
                "owner_token": boot.owner.secret.expose(),
            });
            let file = write_bootstrap(&args.state_dir, &doc).map_err(|e| {
                Error::internal(format!(
                    "could not write {}",
                    args.state_dir.join("bootstrap.json").display()
                ))
                .with_source(e)
            })?;
            println!(
                "capsules-server: bootstrapped team {:?} with a balance of {balance}",
                args.team
            );
            println!("  operator token (scope operator): {}", boot.operator.secret.expose());
            println!("  owner token    (scope admin):    {}", boot.owner.secret.expose());
            println!("  these are shown once; also written to {} (mode 0600)", file.display());
        }
        // Not the first start: resume, and square the records with what the backend holds
        // (adopted capsules are charged the minutes they ran while nothing metered them).
        Err(e) if e.kind() == capsules_core::ErrorKind::Conflict => {
            let records = capsules.reconcile().await?;
            println!(
                "capsules-server: resumed from the existing store ({} live capsules reconciled); \
                 the tokens were printed on the first start",
                records.len()
            );
        }
        Err(e) => return Err(e),
    }
    let _jobs = capsules.spawn_jobs(Duration::from_secs(args.tick_secs.max(1)));
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "capsules-server: listening on {scheme}://{addr} (backend {}, accelerator {}); public URLs at \
         {scheme}://<label>.{}:{}/",
        info.name,
        info.accelerator,
        config.preview_domain(),
        addr.port()
    );
    let console_dir = args
        .console_dir
        .unwrap_or_else(capsules_server::webconsole::default_dir);
    if capsules_server::webconsole::is_built(&console_dir) {
        println!("capsules-server: web console at {scheme}://{addr}/console/ (sign in with a token)");
    } else {
        println!(
            "capsules-server: the web console is not built (no {}); build it with `{}`",
            console_dir.join("index.html").display(),
            capsules_server::webconsole::BUILD_COMMAND
        );
    }
    let config = config.with_console_dir(console_dir).with_tls(tls.is_some());
    if let Some(acceptor) = tls {
        let listener = capsules_server::tls::TlsListener::new(listener, acceptor)
            .map_err(|e| Error::internal("could not start the TLS listener").with_source(e))?;
        return axum::serve(listener, capsules_server::app_with(capsules, config))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::internal("the server stopped").with_source(e));
    }
    // Streamed responses (exec output) go out at once instead of waiting on delayed ACKs.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, capsules_server::app_with(capsules, config))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| Error::internal("the server stopped").with_source(e))
}

/// SIGINT or SIGTERM (the quickstart script stops the server with `kill`).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsules-server: error: {e}");
            let mut last = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let text = s.to_string();
                if text != last {
                    eprintln!("  caused by: {text}");
                }
                last = text;
                src = s.source();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
