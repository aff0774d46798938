//! Spawning processes (fork + exec) and the one reaper that collects every exit status.
//!
//! The agent never uses `std::process`/`tokio::process` waiting: as PID 1 (or a child
//! subreaper in test mode) it reaps every orphan with `waitpid(-1, WNOHANG)` on SIGCHLD, and
//! the same loop hands the statuses of its own children to their waiters. Children are
//! registered under the reaper's lock while forking, so a status can never arrive for a pid
//! that is not yet registered.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::proto::{ExitInfo, ProcessInfo, User};

/// Raw wait status as returned by `waitpid`.
pub type WaitStatus = i32;

/// Convert a wait status into code/signal.
pub fn exit_info(status: WaitStatus) -> ExitInfo {
    let mut e = ExitInfo::default();
    if libc::WIFEXITED(status) {
        e.code = Some(libc::WEXITSTATUS(status));
    } else if libc::WIFSIGNALED(status) {
        e.signal = Some(libc::WTERMSIG(status));
    }
    e
}

struct Tracked {
    status: watch::Sender<Option<WaitStatus>>,
    info: ProcessInfo,
}

/// Registry of the agent's children and the reaper loop.
#[derive(Default)]
pub struct Reaper {
    procs: Mutex<HashMap<i32, Tracked>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Start the SIGCHLD-driven loop (needs a tokio runtime).
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                // A periodic sweep as well: signals coalesce and a lost wakeup must not leave
                // zombies forever.
                tokio::select! {
                    _ = sig.recv() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        });
        Ok(())
    }

    fn reap_all(&self) {
        loop {
            let mut status = 0;
            // SAFETY: plain syscall with a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
            if pid <= 0 {
                return;
            }
            let t = self.procs.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
            if let Some(t) = t {
                let _ = t.status.send(Some(status));
            }
        }
    }

    /// Running processes started through the agent.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let p = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.values().map(|t| t.info.clone()).collect();
        v.sort_by_key(|i| i.pid);
        v
    }

    /// Kill every tracked process group.
    pub fn kill_all(&self, sig: i32) {
        let p = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        for pid in p.keys() {
            // SAFETY: plain syscalls.
            unsafe {
                libc::kill(-*pid, sig);
                libc::kill(*pid, sig);
            }
        }
    }

    /// Fork and exec `spec`; returns the pid and a receiver of its wait status.
    pub fn spawn(
        &self,
        spec: &Prepared,
        info: ProcessInfo,
    ) -> Result<(i32, watch::Receiver<Option<WaitStatus>>), SpawnError> {
        let (err_r, err_w) = pipe()?;
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the child only calls async-signal-safe functions on memory prepared before
        // the fork (see `child`), then execs or `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(SpawnError::Os("fork", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: in the child, see above.
            unsafe { child(spec, err_w.as_raw_fd()) }
        }
        let (tx, rx) = watch::channel(None);
        procs.insert(
            pid,
            Tracked {
                status: tx,
                info: ProcessInfo { pid, ..info },
            },
        );
        drop(procs);
        drop(err_w);
        // Exec success closes the CLOEXEC pipe with nothing written.
        let mut buf = [0u8; 5];
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(err_r.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n as usize;
        }
        if got == 0 {
            return Ok((pid, rx));
        }
        let errno = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let stage = match buf[4] {
            1 => "chdir to the working directory",
            2 => "switch user",
            3 => "set up the terminal",
            4 => "exec the program",
            _ => "set up the process",
        };
        Err(SpawnError::Child(stage, std::io::Error::from_raw_os_error(errno)))
    }
}

/// Why a process could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A syscall in the agent failed.
    #[error("{0} failed: {1}")]
    Os(&'static str, std::io::Error),
    /// The child failed before exec.
    #[error("could not {0}: {1}")]
    Child(&'static str, std::io::Error),
    /// Bad request (argv, env, user).
    #[error("{0}")]
    Invalid(String),
    /// The program or user does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// Create a CLOEXEC pipe.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(SpawnError::Os("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Everything the child needs, prepared before fork (no allocation after fork).
#[derive(Debug)]
pub struct Prepared {
    path: CString,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    ids: Option<(u32, u32)>,
    /// fds to install as 0, 1, 2 in the child.
    pub stdio: [RawFd; 3],
    /// Make fd 0 the controlling terminal (PTY).
    pub controlling_tty: bool,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct.
unsafe impl Send for Prepared {}
// SAFETY: as above; never mutated after construction.
unsafe impl Sync for Prepared {}

/// A resolved user.
#[derive(Debug, Clone)]
pub struct Account {
    /// Name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Look up a user in `/etc/passwd` (no NSS: the binary is static).
pub fn lookup_user(user: &User) -> Result<Account, SpawnError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        let hit = match user {
            User::Uid(u) => *u == uid,
            User::Name(n) => n == f[0],
        };
        if hit {
            return Ok(Account {
                name: f[0].into(),
                uid,
                gid,
                home: f[5].into(),
                shell: f[6].into(),
            });
        }
    }
    match user {
        User::Uid(u) => Ok(Account {
            name: u.to_string(),
            uid: *u,
            gid: *u,
            home: "/".into(),
            shell: "/bin/sh".into(),
        }),
        User::Name(n) => Err(SpawnError::NotFound(format!("user {n:?} is not in /etc/passwd"))),
    }
}

fn cstr(s: &str, what: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Invalid(format!("{what} contains a NUL byte")))
}

/// Find `prog` on `path` unless it contains a slash.
fn resolve(prog: &str, path: &str) -> Result<String, SpawnError> {
    if prog.contains('/') {
        return Ok(prog.into());
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = format!("{dir}/{prog}");
        if let Ok(m) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(SpawnError::NotFound(format!("program {prog:?} not found on PATH")))
}

impl Prepared {
    /// Prepare argv/env/cwd/user. `env` is the complete environment. `switch_user` is `None`
    /// to keep the agent's own identity.
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        switch_user: Option<&Account>,
    ) -> Result<Self, SpawnError> {
        let Some(prog) = argv.first() else {
            return Err(SpawnError::Invalid("argv is empty".into()));
        };
        let path_var = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
        let path = resolve(prog, path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin"))?;
        let argv: Vec<CString> = argv.iter().map(|a| cstr(a, "argv")).collect::<Result<_, _>>()?;
        let mut envp = Vec::new();
        for (k, v) in env {
            if k.is_empty() || k.contains('=') {
                return Err(SpawnError::Invalid(format!("invalid environment variable name {k:?}")));
            }
            envp.push(cstr(&format!("{k}={v}"), "environment")?);
        }
        let mut p = Prepared {
            path: cstr(&path, "program path")?,
            argv_ptrs: Vec::new(),
            argv,
            envp_ptrs: Vec::new(),
            envp,
            cwd: cstr(cwd, "cwd")?,
            ids: switch_user.map(|a| (a.uid, a.gid)),
            stdio: [-1; 3],
            controlling_tty: false,
        };
        p.argv_ptrs = p
            .argv
            .iter()
            .map(|c| c.as_ptr())
            .chain(Some(std::ptr::null()))
            .collect();
        p.envp_ptrs = p
            .envp
            .iter()
            .map(|c| c.as_ptr())
            .chain(Some(std::ptr::null()))
            .collect();
        Ok(p)
    }
}

/// Child side of the fork. Only async-signal-safe calls.
unsafe fn child(spec: &Prepared, err: RawFd) -> ! {
    unsafe fn fail(err: RawFd, stage: u8) -> ! {
        let errno = unsafe { *libc::__errno_location() };
        let mut b = [0u8; 5];
        b[..4].copy_from_slice(&errno.to_be_bytes());
        b[4] = stage;
        unsafe {
            libc::write(err, b.as_ptr().cast(), 5);
            libc::_exit(127)
        }
    }
    unsafe {
        // Default signal state: the agent ignores SIGPIPE and tokio installs handlers.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for s in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGCHLD, libc::SIGHUP] {
            libc::signal(s, libc::SIG_DFL);
        }
        // Own session and process group, so a timeout can kill the whole group.
        if libc::setsid() < 0 {
            fail(err, 0);
        }
        // Move the stdio fds out of the way first so dup2 order cannot clobber them.
        let mut fds = spec.stdio;
        for fd in fds.iter_mut() {
            if *fd >= 0 && *fd < 3 {
                let n = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                if n < 0 {
                    fail(err, 0);
                }
                *fd = n;
            }
        }
        for (target, fd) in fds.iter().enumerate() {
            if *fd >= 0 && libc::dup2(*fd, target as i32) < 0 {
                fail(err, 0);
            }
        }
        if spec.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(err, 3);
        }
        if libc::chdir(spec.cwd.as_ptr()) < 0 {
            fail(err, 1);
        }
        if let Some((uid, gid)) = spec.ids {
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) < 0 || libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                fail(err, 2);
            }
        }
        libc::execve(spec.path.as_ptr(), spec.argv_ptrs.as_ptr(), spec.envp_ptrs.as_ptr());
        fail(err, 4)
    }
}

/// Open `/dev/null` read-write (CLOEXEC).
pub fn dev_null() -> std::io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    Ok(f.into())
}

/// Set `O_NONBLOCK` on an fd.
pub fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Send `sig` to the process group `pgid` and to the process itself.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: plain syscalls.
    unsafe {
        libc::kill(-pgid, sig);
        libc::kill(pgid, sig);
    }
}

/// Register an owned fd with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and refers to the same file for its whole life, and the
    // AsyncFd owns it.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}
