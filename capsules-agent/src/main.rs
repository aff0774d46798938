//! `capsules-agent`: PID 1 in every capsule.
//!
//! Modes:
//! - `init`: run from the initramfs as `/init` (see `init.rs`): load modules, mount the base and data
//!   disks, assemble the overlay, switch root, exec `guest` mode.
//! - `guest`: PID 1 after switch root: mounts, network, reaping, serve the protocol on the agent channel.
//! - `serve --unix PATH [--root DIR] [--set-clock]`: host test mode over a unix socket (child
//!   subreaper, not PID 1).

mod init;

use std::path::PathBuf;
use std::sync::Arc;

use capsules_agent::PROTOCOL_VERSION;
use capsules_agent::server::{Agent, Config, guest, serve_unix};

const USAGE: &str = "usage: capsules-agent init | guest | serve --unix PATH [--root DIR] [--set-clock]";

fn ready_line() -> String {
    format!("capsules-agent: ready v{PROTOCOL_VERSION}")
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("capsules-agent: cannot start the runtime: {e}");
            std::process::exit(1)
        }
    }
}

fn run_guest() -> ! {
    guest::mount_all();
    let cmdline = guest::parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    guest::configure_network(&cmdline);
    let rt = runtime();
    rt.block_on(async move {
        let cfg = Config {
            workspace: PathBuf::from("/workspace"),
            guest: true,
            set_clock: true,
            path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        };
        let agent = match Agent::new(cfg) {
            Ok(a) => a,
            Err(e) => {
                guest::console(&format!("capsules-agent: cannot start: {e}"));
                return;
            }
        };
        let a = agent.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            a.shutdown.cancel();
        });
        let serve = serve_guest_channel(agent.clone(), cmdline.channel.clone());
        tokio::select! {
            _ = serve => {}
            _ = agent.shutdown.cancelled() => {}
        }
        agent.reaper.kill_all(libc::SIGKILL);
    });
    guest::power_off()
}

async fn serve_guest_channel(agent: Arc<Agent>, channel: guest::Channel) {
    match channel {
        guest::Channel::VirtioSerial => {
            let mut warned = false;
            let path = loop {
                if let Some(p) = guest::find_virtio_port() {
                    break p;
                }
                if !warned {
                    guest::console(&format!("capsules-agent: waiting for virtio port {}", guest::PORT_NAME));
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let file = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    guest::console(&format!("capsules-agent: cannot open {}: {e}", path.display()));
                    return;
                }
            };
            let stream = match guest::FdStream::new(file.into()) {
                Ok(s) => s,
                Err(e) => {
                    guest::console(&format!("capsules-agent: cannot register {}: {e}", path.display()));
                    return;
                }
            };
            guest::console(&ready_line());
            guest::serve_port(agent, stream).await
        }
        guest::Channel::Vsock(port) => {
            let listener = match guest::vsock_listen(port).and_then(|fd| {
                capsules_agent::server::process::set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                capsules_agent::server::process::async_fd(fd)
            }) {
                Ok(l) => l,
                Err(e) => {
                    guest::console(&format!("capsules-agent: cannot listen on vsock port {port}: {e}"));
                    return;
                }
            };
            guest::console(&ready_line());
            loop {
                match guest::vsock_accept(&listener).await.and_then(guest::FdStream::new) {
                    Ok(s) => {
                        let a = agent.clone();
                        tokio::spawn(async move { a.serve_stream(s).await });
                    }
                    Err(e) => {
                        eprintln!("capsules-agent: vsock accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

fn run_serve(args: &[String]) -> ! {
    let mut unix = None;
    let mut root = None;
    let mut set_clock = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--unix" => unix = it.next().cloned(),
            "--root" => root = it.next().cloned(),
            "--set-clock" => set_clock = true,
            other => {
                eprintln!("capsules-agent: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let Some(unix) = unix else {
        eprintln!("capsules-agent: serve needs --unix PATH\n{USAGE}");
        std::process::exit(2)
    };
    let root = root
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| "/".into()));
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        eprintln!(
            "capsules-agent: PR_SET_CHILD_SUBREAPER failed: {}",
            std::io::Error::last_os_error()
        );
    }
    let rt = runtime();
    rt.block_on(async move {
        let mut cfg = Config::test(root);
        cfg.set_clock = set_clock;
        let agent = match Agent::new(cfg) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("capsules-agent: cannot start: {e}");
                std::process::exit(1);
            }
        };
        let _ = std::fs::remove_file(&unix);
        let listener = match tokio::net::UnixListener::bind(&unix) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("capsules-agent: cannot listen on {unix}: {e}");
                std::process::exit(1);
            }
        };
        println!("{}", ready_line());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = serve_unix(agent.clone(), listener) => {}
            _ = agent.shutdown.cancelled() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        agent.reaper.kill_all(libc::SIGKILL);
        let _ = std::fs::remove_file(&unix);
    });
    std::process::exit(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // When the kernel runs us as /init, argv[0] is "/init" and there are no arguments.
    let argv0_is_init = args
        .first()
        .map(|a| a.ends_with("/init") || a == "init")
        .unwrap_or(false);
    let mode = args.get(1).map(String::as_str);
    match mode {
        Some("init") => init::run(),
        None if argv0_is_init => init::run(),
        Some("guest") => run_guest(),
        Some("serve") => run_serve(&args[2..]),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}
