//! `capsules-server`: the example HTTP API. State is in memory in this build (lost on restart).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsules_core::{Backend, Capsules, Error, MemoryStore, Result};
use clap::{Parser, ValueEnum};

const ABOUT: &str = "The Capsules example server: the /v1 HTTP API over capsules-core.\n\n\
NOTE: this build keeps all state (tokens, capsules, ledger) IN MEMORY: it is lost when the server \
stops. On every start the server bootstraps a fresh team and prints its tokens once (also written \
to <state-dir>/bootstrap.json, mode 0600).";

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
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// The one place a backend is constructed.
async fn make_backend(kind: BackendKind, state_dir: &Path) -> Result<Arc<dyn Backend>> {
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
        BackendKind::Qemu => qemu_backend(state_dir).await,
        BackendKind::Chv => Err(Error::unsupported(
            "the chv backend is not available in this build; use --backend mock or --backend qemu",
        )),
    }
}

#[cfg(feature = "qemu")]
async fn qemu_backend(state_dir: &Path) -> Result<Arc<dyn Backend>> {
    use capsules_backend_qemu::{QemuConfig, QemuVmm};
    use capsules_microvm::backend::MicroVmBackend;
    let config = QemuConfig::from_env().map_err(|e| Error::unavailable("could not configure QEMU").with_source(e))?;
    let vmm = QemuVmm::new(config).map_err(|e| Error::unavailable("could not set up QEMU").with_source(e))?;
    let backend = MicroVmBackend::builder(vmm).state_dir(state_dir).build().await?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "qemu"))]
async fn qemu_backend(_: &Path) -> Result<Arc<dyn Backend>> {
    Err(Error::unsupported(
        "the qemu backend is not available in this build; use --backend mock",
    ))
}

/// Writes the bootstrap secrets where only the owner can read them.
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
    let backend = make_backend(kind, &args.state_dir).await?;
    let capsules = Capsules::builder()
        .backend(backend)
        .store(MemoryStore::new())
        .build()
        .await?;
    tracing::warn!("state is in memory (MemoryStore): tokens, capsules and the ledger are lost on restart");
    let boot = capsules.bootstrap(&args.team).await?;
    let balance = capsules
        .operator(boot.operator.secret.expose())
        .balance(&args.team)
        .await?;
    let doc = serde_json::json!({
        "api": format!("http://{}", args.listen),
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
    println!("  state is IN MEMORY and lost when the server stops");
    let _jobs = capsules.spawn_jobs(Duration::from_secs(args.tick_secs.max(1)));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Error::unavailable(format!("could not listen on {}", args.listen)).with_source(e))?;
    println!(
        "capsules-server: listening on http://{} (backend {kind:?})",
        listener.local_addr().unwrap_or(args.listen)
    );
    axum::serve(listener, capsules_server::app(capsules))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::internal("the server stopped").with_source(e))
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
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
