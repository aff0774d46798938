//! The DESIGN.md §1 quickstart through the library.
//!
//! `cargo run -p quickstart [-- --backend mock]`: bootstraps a team, mints an `agent:write` token
//! with prefix `agent-`, creates `agent-pr-482` (2x2gb, credit limit 2.00), uploads
//! `examples/quickstart/project` into `/workspace`, runs `npm test`, terminates, and prints the
//! usage trail and the ledger. Backend selection lives in [`backend`] only: `qemu` (a real microVM;
//! the default when `qemu-system-x86_64` is installed and we run as root) or `mock`.

use std::path::PathBuf;
use std::sync::Arc;

use capsules_backend_mock::{ExecMatcher, ExecReply, MockBackend};
use capsules_core::backend::Backend;
use capsules_core::{Capsules, MemoryStore, Scope, TokenSpec};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Picks the backend named on the command line. The only place that knows backends.
async fn backend(name: &str) -> Result<(Arc<dyn Backend>, &'static str), Error> {
    match name {
        "qemu" => {
            // Capsule state in CAPSULES_STATE_DIR (default /var/lib/capsules), guest assets in
            // CAPSULES_ASSET_DIR (default /var/cache/capsules, built on first use: a few minutes).
            let b = capsules_backend_qemu::backend_from_env().await?;
            Ok((Arc::new(b), "qemu (a real microVM)"))
        }
        "mock" => {
            let mock = MockBackend::new();
            // The mock has no Node: script `npm test` so the flow runs end to end, and say so.
            mock.on_exec(
                ExecMatcher::exact(["npm", "test"]),
                ExecReply::new()
                    .stdout(
                        "> capsules-quickstart-project@1.0.0 test\n> node --test\n\n\
                         # tests 2\n# pass 2\n# fail 0\n\
                         (scripted by the mock backend: no real Node ran)\n",
                    )
                    .exit_code(0),
            );
            Ok((
                Arc::new(mock),
                "mock (in-memory simulation; `npm test` output is scripted)",
            ))
        }
        other => Err(format!("backend {other:?} is not known; use --backend qemu or --backend mock").into()),
    }
}

fn project_dir() -> PathBuf {
    let local = PathBuf::from("examples/quickstart/project");
    if local.is_dir() {
        local
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("project")
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let name = match args.iter().position(|a| a == "--backend") {
        Some(i) => args.get(i + 1).map(String::as_str).ok_or("--backend needs a name")?,
        None if default_is_qemu() => "qemu",
        None => {
            eprintln!("quickstart: QEMU is not installed or we are not root: using the mock backend (no VM)");
            "mock"
        }
    };
    run(name).await
}

/// QEMU is installed and we may create taps and nftables rules.
fn default_is_qemu() -> bool {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    // SAFETY: geteuid has no preconditions.
    on_path && unsafe { libc::geteuid() } == 0
}

/// The quickstart on the backend named `name`.
async fn run(name: &str) -> Result<(), Error> {
    let (backend, what) = backend(name).await?;
    println!("backend: {what}");

    let capsules = Capsules::builder()
        .backend(backend)
        .store(MemoryStore::new())
        .build()
        .await?;
    let boot = capsules.bootstrap("quickstart").await?;
    println!(
        "bootstrapped team {} (operator and owner tokens created)",
        boot.team.name
    );

    println!("$ capsule tokens create --scope agent:write --prefix agent-");
    let agent = capsules
        .tokens(&boot.owner.secret)
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
        .await?;
    println!("token {} (agent:write, prefix agent-)", agent.id);

    println!("$ capsule create agent-pr-482 --size 2x2gb --credit-limit 2.00");
    let cap = capsules
        .connect(&agent.secret)?
        .create("agent-pr-482")
        .size("2x2gb")
        .credit_limit("2.00")
        .await?;
    let st = cap.status().await?;
    println!("{} {} {} on {}", st.id, st.name, st.state, st.size);

    let dir = project_dir();
    println!("$ capsule cp {} agent-pr-482:/workspace", dir.display());
    cap.upload_dir(&dir, "/workspace").await?;

    println!("$ capsule exec agent-pr-482 -- npm test");
    let out = cap.exec(["npm", "test"]).await?;
    print!("{}", out.stdout_lossy());
    eprint!("{}", out.stderr_lossy());
    println!("exit {}", out.exit_code());
    if name == "mock" {
        println!("(this ran on the mock backend: the output above is scripted, not a real Node run)");
    }

    println!("$ capsule terminate agent-pr-482");
    let st = cap.terminate().await?;
    println!("{} {}", st.name, st.state);

    let usage = cap.usage().await?;
    let u = usage.usage;
    println!("\nusage of {}:", usage.capsule.id);
    println!(
        "  compute {} min ({}), storage {} GiB-h ({}), traffic {} MiB ({}), {} lifecycle events, total {}",
        u.compute_minutes,
        u.compute_cost,
        u.storage_gib_hours,
        u.storage_cost,
        u.traffic_mib,
        u.traffic_cost,
        u.lifecycle_events,
        u.cost
    );
    println!("events:");
    for e in cap.events().await? {
        println!("  #{} {} {:?}", e.seq, e.kind().name(), e.kind());
    }
    let owner = capsules.connect(&boot.owner.secret)?;
    println!("ledger (team {}):", boot.team.name);
    for e in owner.ledger().await? {
        let e = e.entry;
        println!(
            "  {:<9} {:>10} x{:<3} {}",
            e.kind.as_str(),
            e.amount.to_string(),
            e.quantity,
            e.reason.unwrap_or_default()
        );
    }
    println!("balance {}", owner.balance().await?);
    if out.exit_code() != 0 {
        return Err(format!("npm test failed with exit {}", out.exit_code()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn quickstart_runs_on_the_mock() {
        super::run("mock").await.expect("the quickstart runs");
        assert!(super::run("vmware").await.is_err());
    }
}
