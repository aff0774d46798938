//! `capsule console NAME`: the capsule's terminal in this one. On a terminal: raw mode (restored
//! on every way out, panics included), resize on SIGWINCH, Ctrl-C goes to the capsule. Otherwise
//! stdin's bytes are forwarded as they are (and a Ctrl-D at its end), termios untouched.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Mutex;

use capsules_client::{Client, ConsoleEvent};
use capsules_core::{Error, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::EXIT_ERROR;

/// The terminal settings to put back (also read by the panic hook).
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

fn restore() {
    if let Ok(mut s) = SAVED.lock()
        && let Some((fd, t)) = s.take()
    {
        // SAFETY: `t` came from tcgetattr on this descriptor.
        unsafe {
            libc::tcsetattr(fd, libc::TCSAFLUSH, &t);
        }
    }
}

/// Raw mode on stdin while alive.
struct RawMode;

impl RawMode {
    fn enter() -> Result<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(
                Error::internal("could not read the terminal's settings").with_source(std::io::Error::last_os_error())
            );
        }
        *SAVED
            .lock()
            .map_err(|_| Error::internal("terminal state lock poisoned"))? = Some((fd, t));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        let mut raw = t;
        // SAFETY: cfmakeraw edits the struct in place; tcsetattr applies it to our own stdin.
        unsafe {
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) != 0 {
                let e = std::io::Error::last_os_error();
                restore();
                return Err(Error::internal("could not put the terminal in raw mode").with_source(e));
            }
        }
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// (cols, rows) of the terminal on `fd`, if it is one.
fn size_of(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize or fails.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_col == 0 || ws.ws_row == 0 {
        return None;
    }
    Some((ws.ws_col.min(1000), ws.ws_row.min(1000)))
}

fn local_size() -> Option<(u16, u16)> {
    size_of(std::io::stdout().as_raw_fd()).or_else(|| size_of(std::io::stdin().as_raw_fd()))
}

/// Reads stdin on a plain thread (a tokio stdin read cannot be cancelled and would hold the exit).
fn stdin_chunks() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(if (0..=255).contains(&code) {
        code as u8
    } else {
        EXIT_ERROR
    })
}

/// Runs the console; the exit code is the remote program's.
pub async fn run(client: &Client, name: &str, cols: Option<u16>, rows: Option<u16>) -> Result<ExitCode> {
    let tty = std::io::stdin().is_terminal();
    let (lc, lr) = local_size().unwrap_or((80, 24));
    let (cols, rows) = (cols.unwrap_or(lc), rows.unwrap_or(lr));
    let (tx, mut rx) = client.capsule(name)?.console(cols, rows).await?.split();
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let mut winch = signal(SignalKind::window_change())
        .map_err(|e| Error::internal("could not watch for terminal resizes").with_source(e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::internal("could not watch for SIGTERM").with_source(e))?;
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| Error::internal("could not watch for SIGHUP").with_source(e))?;
    let mut input = stdin_chunks();
    let mut input_open = true;
    let mut out = std::io::stdout();
    let result = loop {
        tokio::select! {
            ev = rx.next() => match ev {
                Some(Ok(ConsoleEvent::Output(b))) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Ok(ConsoleEvent::Refused(m))) => eprint!("\r\ncapsule: the server refused a control message: {m}\r\n"),
                Some(Ok(ConsoleEvent::Exit(code))) => break Ok(code),
                Some(Err(e)) => break Err(e),
                None => break Err(Error::unavailable("the console ended without an exit status")),
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(Some(b)) => {
                    if tx.write(b).await.is_err() {
                        input_open = false;
                    }
                }
                // End of input: a Ctrl-D, as a terminal would send, so a piped script ends.
                _ => {
                    input_open = false;
                    let _ = tx.write(&[0x04u8][..]).await;
                }
            },
            _ = winch.recv() => {
                if let Some((c, r)) = local_size() {
                    let _ = tx.resize(c, r).await;
                }
            }
            _ = term.recv() => break Err(Error::unavailable("stopped by SIGTERM; detached from the console")),
            _ = hup.recv() => break Err(Error::unavailable("the terminal hung up; detached from the console")),
        }
    };
    drop(raw);
    let _ = tx.close().await;
    match result {
        Ok(code) => {
            if tty {
                eprintln!("\r\n[console: exit {code}]");
            }
            Ok(exit_code(code))
        }
        Err(e) => {
            crate::fail(&e, None);
            Ok(ExitCode::from(EXIT_ERROR))
        }
    }
}
