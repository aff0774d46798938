//! `capsules-agent`: PID 1 in every capsule.
//!
//! Modes:
//! - `init`: run from the initramfs as `/init` (see `init.rs`): load modules, mount the base and data
//!   disks, assemble the overlay, switch root, exec `guest` mode.
//! - `guest`: PID 1 after switch root: mounts, network, reaping, serve the protocol on the agent channel.
//! - `serve --unix PATH`: host test mode over a unix socket (child subreaper, not PID 1).

mod init;

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
        _ => {
            eprintln!("usage: capsules-agent init | guest | serve --unix PATH");
            std::process::exit(2);
        }
    }
}
