//! The Capsules guest agent: the wire protocol (shared with the host), the async host-side
//! client, and the agent itself (the `capsules-agent` binary, PID 1 in every capsule).
//!
//! ```no_run
//! # async fn demo() -> Result<(), capsules_agent::AgentError> {
//! use capsules_agent::client::{AgentClient, ClientOptions};
//! use capsules_agent::proto::ExecRequest;
//!
//! let stream = tokio::net::UnixStream::connect("/tmp/agent.sock").await?;
//! let agent = AgentClient::handshake(stream, 1, ClientOptions::default()).await?;
//! let out = agent
//!     .run(ExecRequest { argv: vec!["uname".into(), "-a".into()], timeout_ms: Some(5_000), ..Default::default() })
//!     .await?;
//! println!("{} (exit {:?})", out.stdout_lossy(), out.exit.code);
//! # Ok(()) }
//! ```
//!
//! # Binary modes
//! - `capsules-agent init` (or run as `/init`): the initramfs init (see `init.rs`), which
//!   switches root and execs `guest` mode.
//! - `capsules-agent guest`: PID 1 after switch_root. Mounts proc, sys, devtmpfs, devpts
//!   (`ptmxmode=0666`, `/dev/ptmx` symlink), tmpfs on `/tmp`, `/run`, `/dev/shm` (EBUSY and
//!   already-mounted are fine); creates `/workspace`; reads `/proc/cmdline`:
//!   `capsules.hostname=NAME`, `capsules.ip=A.B.C.D/PREFIX` (on `eth0`; `lo` always up),
//!   `capsules.gw=A.B.C.D` (default route), `capsules.dns=A.B.C.D` (`/etc/resolv.conf`),
//!   `capsules.channel=virtio-serial` (default: the port named `org.capsules.agent`) or
//!   `capsules.channel=vsock:PORT`. Prints `capsules-agent: ready v1` on `/dev/console` once
//!   serving. Reaps every orphan; SIGTERM/SIGINT or a `Shutdown` request kills processes,
//!   syncs, unmounts (or remounts read-only) and powers off.
//! - `capsules-agent serve --unix PATH [--root DIR] [--set-clock]`: host test mode. Each
//!   accepted connection is a stream; the agent is a child subreaper so orphan reaping works as
//!   in the guest; `DIR` replaces `/workspace`; the ready line goes to stdout. `SetClock` only
//!   sets the clock with `--set-clock` as root.
//!
//! # Wire protocol (version [`PROTOCOL_VERSION`])
//! One byte stream carries many concurrent operations.
//!
//! **Frames** ([`frame`]): `u32` big-endian length `L`, then `kind: u8`, `channel: u32` BE,
//! and `L - 5` payload bytes; `5 <= L <= 1 MiB` ([`frame::MAX_FRAME`]). Kinds: `0` control
//! (JSON), `1` data (raw bytes: stdin, stdout, PTY, file and tar chunks, TCP bytes), `2` stderr
//! (raw), `3` EOF (empty; half-close of the sender's data), `4` credit (`u32` BE), `5` cancel
//! (empty; the sender abandons the channel). A malformed, truncated or oversized frame ends the
//! stream (the agent first sends a session error on channel 0 if it can); a bad control message
//! gets an error reply on its channel. Nothing is allocated from a length before it is checked.
//!
//! **Flow control** ([`mux`]): every frame on a channel costs `len + 16` of the receiver's
//! window (2 MiB per channel and direction); receivers grant credit back as they consume, so a
//! slow consumer stalls only its own channel and no side buffers more than one window per
//! channel. A peer that exceeds its window has broken the protocol and the stream is closed.
//!
//! **Session**: the first frame is `{"op":"hello","version":1,"epoch":E}` on channel 0; the agent
//! answers `{"reply":"hello_ok","version":1,"boot_id":..,"epoch":E}` or an error
//! (`version_mismatch`, `stale_epoch` if `E` is below an epoch already seen). A higher epoch
//! supersedes every older session: their streams are closed, partial input dropped, and their
//! foreground execs and PTYs killed; background processes keep running and stay attachable by
//! handle. `quiesce` → `quiesced`, after which the agent writes nothing more on that stream
//! (running processes block on their full pipes: bounded buffering). After a restore the host
//! reconnects with a higher epoch and sends `set_clock`.
//!
//! **Calls** ([`proto`]): the host opens a channel by sending a control request on a fresh id
//! (`exec`, `spawn_background`, `list_background`, `attach`, `signal_background`, `wait`, `pty`,
//! `connect`, `read_file`, `write_file`, `list_dir`, `stat`, `mkdir`, `remove`, `rename`,
//! `upload_tar`, `download_tar`, `set_clock`, `info`, `ping`, `quiesce`, `shutdown`). Data frames
//! follow in either direction; `signal`/`resize` controls may be sent on an open exec/PTY
//! channel. The agent ends every channel with exactly one terminal reply (`exit`, `done`, `ok`,
//! `error`, …; `started`, `opened`, `connected` are non-terminal). Dropping a call on the host
//! sends `cancel`: a foreground exec or PTY is killed, a transfer stops, a temp file is removed.
//!
//! **Client** ([`client`]): every pending call ends with [`AgentError::SessionEnded`] when the
//! stream ends or the session is superseded; simple calls and each file chunk have a deadline;
//! an exec has its own timeout plus a grace; `collect` caps what it keeps (head and tail).

pub mod client;
pub mod error;
pub mod frame;
pub mod mux;
pub mod proto;
pub mod server;

pub use client::AgentClient;
pub use error::AgentError;
pub use proto::PROTOCOL_VERSION;
