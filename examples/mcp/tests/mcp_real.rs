//! The MCP must-hold flow once against a real capsule: `capsules-server --backend qemu` on a
//! loopback port with a fresh state directory, an `agent:write` token limited to `agent-`, and
//! `capsule-mcp` driven by the official MCP Python SDK (`tests/client.py real`): create
//! `agent-mcp-1`, exec `echo hi`, a binary file written and read back byte-exact, terminate, and
//! usage shows compute charged.
//!
//! Needs root, QEMU, nft, ip (the server's network layer), `python3 -c "import mcp"` and the
//! `capsules-server` binary (`cargo build -p capsules-server`); without one of them the test is
//! reported ignored with the reason. The process first moves into a network namespace of its own
//! (the server, its capsule's tap and nftables table live and die there). Run explicitly
//! (`test = false`): `cargo test -p capsules-mcp --test mcp_real`.

mod common;

use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};

const NAME: &str = "mcp_real_capsule_flow";

fn prerequisites() -> Result<std::path::PathBuf, String> {
    capsules_microvm::testing::check_prerequisites(capsules_microvm::testing::QEMU_TOOLS)?;
    if !common::have_python_mcp() {
        return Err("python3 cannot `import mcp` (pip install \"mcp>=1,<2\")".into());
    }
    let bin = common::server_binary()?;
    // First thing, while single-threaded: leave the machine's network namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot create a network namespace: {e}"))?;
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip link set lo up: {e}"))?;
    if !up.success() {
        return Err("ip link set lo up failed in the new network namespace".into());
    }
    Ok(bin)
}

fn main() {
    let args = Arguments::from_args();
    let trial = match prerequisites() {
        Ok(bin) => Trial::test(NAME, move || run(&bin)),
        Err(why) => {
            eprintln!("{NAME}: ignored: {why}");
            Trial::test(NAME, || Ok(())).with_ignored_flag(true).with_kind(why)
        }
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

fn run(bin: &std::path::Path) -> Result<(), Failed> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::Builder::new().prefix("capsules-mcp-real-").tempdir()?;
        // The VMM runs as an unprivileged user that must reach the state directory inside.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let state = dir.path().join("state");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port()?).parse()?;
        let server = common::Server::start(bin, "qemu", addr, &state, Duration::from_secs(600)).await?;
        let result = drive(&server).await;
        if result.is_err() {
            eprintln!("the server's log:\n{}", server.log_tail());
        }
        server.stop().await;
        result
    })
}

async fn drive(server: &common::Server) -> Result<(), Failed> {
    let token = server.agent_token().await?;
    let mut child = common::client_script("real", &server.url(), &token)?;
    let from_script = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(from_script));
    let mut saw_ok = false;
    let session = async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("client.py: {line}");
            if line.trim() == "OK" {
                saw_ok = true;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    // A cold boot under TCG takes tens of seconds; the whole flow gets 10 minutes.
    tokio::time::timeout(Duration::from_secs(600), session)
        .await
        .map_err(|_| "client.py took longer than 600 s")??;
    let status = child.wait().await?;
    if !status.success() {
        return Err(format!("client.py failed: {status}").into());
    }
    if !saw_ok {
        return Err("client.py ended without OK".into());
    }
    // Checked through the API: the capsule is terminated and was charged.
    let owner = capsules_client::Capsules::new(server.url())?.connect(server.owner_token()?)?;
    let u = owner.capsule("agent-mcp-1")?.usage().await?;
    if u.capsule.state != capsules_core::state::CapsuleState::Terminated {
        return Err(format!("agent-mcp-1 is {:?}, not terminated", u.capsule.state).into());
    }
    Ok(())
}
