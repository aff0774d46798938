//! PTY sessions: openpty, a child with its own session and controlling terminal, resize with
//! TIOCSWINSZ (the kernel sends SIGWINCH), signals to the terminal's foreground group.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;

use super::exec::{prepare, spawn_reply};
use super::process::{self, SpawnError};
use super::{Agent, reply};
use crate::mux::{Channel, Incoming};
use crate::proto::{ProcessInfo, PtyRequest, Reply, Request};

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn open(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = winsize(cols, rows);
    // SAFETY: valid out pointers; name and termios may be null.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds we own.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [m.as_raw_fd(), s.as_raw_fd()] {
        // SAFETY: fcntl on an owned fd.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        let mut g = fd.writable().await?;
        // SAFETY: writing from a valid buffer.
        match g.try_io(|f| {
            let n = unsafe { libc::write(f.as_raw_fd(), b.as_ptr().cast(), b.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => b = &b[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Run a PTY session on `ch`.
pub async fn run(agent: &Arc<Agent>, mut ch: Channel, req: PtyRequest) {
    let argv = if req.argv.is_empty() {
        vec![std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into())]
    } else {
        req.argv.clone()
    };
    let started = async {
        let (master, slave) = open(req.cols, req.rows).map_err(|e| SpawnError::Os("openpty", e))?;
        let mut spec = prepare(
            agent,
            &argv,
            &req.env,
            req.cwd.as_deref(),
            req.user.as_ref(),
            &[("TERM", "xterm-256color"), ("SHELL", "")],
        )?;
        spec.stdio = [slave.as_raw_fd(); 3];
        spec.controlling_tty = true;
        let info = ProcessInfo {
            pid: 0,
            argv: argv.clone(),
            background: None,
            pty: true,
        };
        let reaper = agent.reaper.clone();
        let (pid, status) = tokio::task::spawn_blocking(move || {
            let r = reaper.spawn(&spec, info);
            drop(slave);
            r
        })
        .await
        .map_err(|e| SpawnError::Os("spawn task", std::io::Error::other(e)))??;
        process::set_nonblocking(master.as_raw_fd()).map_err(|e| SpawnError::Os("fcntl", e))?;
        let master = process::async_fd(master).map_err(|e| SpawnError::Os("register pty", e))?;
        Ok::<_, SpawnError>((pid, status, Arc::new(master)))
    };
    let (pid, mut status, master) = match started.await {
        Ok(x) => x,
        Err(e) => {
            let _ = reply(&ch, spawn_reply(e)).await;
            return;
        }
    };
    if reply(&ch, Reply::Started { pid }).await.is_err() {
        process::kill_group(pid, libc::SIGKILL);
        return;
    }
    let tx = ch.sender().clone();
    let m2 = master.clone();
    let mut out = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut g) = m2.readable().await else { return };
            // SAFETY: reading into a valid buffer.
            let r = g.try_io(|f| {
                let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) | Ok(Err(_)) => return, // EIO once the last slave fd closed
                Ok(Ok(n)) => {
                    if tx.data(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
                Err(_would_block) => continue,
            }
        }
    });
    let closer = ch.sender().clone();
    let mut abandoned = false;
    let mut out_done = false;
    let st = loop {
        tokio::select! {
            s = async { loop {
                if let Some(s) = *status.borrow_and_update() { return s }
                if status.changed().await.is_err() { return 0 }
            } } => break s,
            _ = &mut out, if !out_done => { out_done = true; }
            _ = closer.closed(), if !abandoned => {
                abandoned = true;
                process::kill_group(pid, libc::SIGHUP);
                process::kill_group(pid, libc::SIGKILL);
            }
            m = ch.recv(), if !abandoned => match m {
                None => {
                    abandoned = true;
                    process::kill_group(pid, libc::SIGHUP);
                    process::kill_group(pid, libc::SIGKILL);
                }
                Some(Incoming::Data(b)) => { let _ = write_all(&master, &b).await; }
                Some(Incoming::Control(c)) => match serde_json::from_slice::<Request>(&c) {
                    Ok(Request::Resize { cols, rows }) => {
                        let ws = winsize(cols, rows);
                        // SAFETY: ioctl with a valid winsize pointer.
                        unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                    Ok(Request::Signal { signal }) => {
                        // SAFETY: plain syscalls on our fd.
                        let pgrp = unsafe { libc::tcgetpgrp(master.get_ref().as_raw_fd()) };
                        process::kill_group(if pgrp > 0 { pgrp } else { pid }, signal);
                    }
                    // Anything else is ignored: an error reply would end the channel.
                    _ => {}
                },
                Some(Incoming::Eof) | Some(Incoming::Stderr(_)) => {}
            },
        }
    };
    if !out_done {
        // Remaining output; other holders of the slave may keep it open, so bounded.
        if tokio::time::timeout(Duration::from_millis(250), &mut out)
            .await
            .is_err()
        {
            out.abort();
        }
    }
    if abandoned {
        return;
    }
    let _ = reply(&ch, Reply::Exit(process::exit_info(st))).await;
}
