//! `capsule console` on a terminal: the binary runs on a pseudo-terminal that is its controlling
//! terminal (so a Ctrl-C in cooked mode would kill it), against an in-test server (mock backend).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsules_backend_mock::MockBackend;
use capsules_core::{Capsules, MemoryStore};
use nix::pty::{Winsize, openpty};
use nix::sys::termios::{Termios, tcgetattr};

struct Server {
    url: String,
    owner: String,
}

async fn server() -> Server {
    let capsules = Capsules::builder()
        .backend(MockBackend::new())
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let boot = capsules.bootstrap("default").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, capsules_server::app(capsules)).await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        owner: boot.owner.secret.expose().to_owned(),
    }
}

/// The flags raw mode changes (what must come back exactly).
fn modes(t: &Termios) -> [libc::tcflag_t; 4] {
    [
        t.input_flags.bits(),
        t.output_flags.bits(),
        t.local_flags.bits(),
        t.control_flags.bits(),
    ]
}

struct Tty {
    master: std::fs::File,
    slave: OwnedFd,
    seen: Arc<Mutex<String>>,
}

impl Tty {
    fn new(cols: u16, rows: u16) -> Tty {
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let p = openpty(Some(&ws), None).unwrap();
        let master = std::fs::File::from(p.master);
        let seen = Arc::new(Mutex::new(String::new()));
        let (mut r, s) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Tty {
            master,
            slave: p.slave,
            seen,
        }
    }

    /// Runs `capsule ARGS` with the slave as its stdio and controlling terminal.
    fn spawn(&self, s: &Server, args: &[&str]) -> Child {
        let fd = |f: &OwnedFd| Stdio::from(f.try_clone().unwrap());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsule"));
        cmd.args(args)
            .env("CAPSULE_API", &s.url)
            .env("CAPSULE_TOKEN", &s.owner)
            .stdin(fd(&self.slave))
            .stdout(fd(&self.slave))
            .stderr(fd(&self.slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    fn write(&self, b: &[u8]) {
        (&self.master).write_all(b).unwrap();
    }

    fn resize(&self, cols: u16, rows: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize; the kernel sends SIGWINCH to the foreground group.
        assert_eq!(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
    }

    /// Waits until the output since `from` contains `needle`; returns the new length.
    fn until(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let s = self.seen.lock().unwrap();
                if let Some(i) = s[from.min(s.len())..].find(needle) {
                    return from + i + needle.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "no {needle:?} within 10 s; saw {:?}",
                    &s[from.min(s.len())..]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "capsule console did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_terminal_raw_mode_resize_ctrl_c_and_the_exit_code() {
    let s = server().await;
    let c = capsules_client::Capsules::new(&s.url)
        .unwrap()
        .connect(&s.owner)
        .unwrap();
    c.create("tty-1").await.unwrap();

    let tty = Tty::new(100, 30);
    let before = modes(&tcgetattr(&tty.slave).unwrap());
    let mut child = tty.spawn(&s, &["console", "tty-1"]);
    // The size comes from the terminal.
    let at = tty.until(0, "$ ");
    tty.write(b"stty size\r");
    let at = tty.until(at, "30 100");
    // Raw mode is on while attached.
    let during = modes(&tcgetattr(&tty.slave).unwrap());
    assert_ne!(during, before, "the local terminal is not in raw mode");

    // SIGWINCH: the new size reaches the capsule.
    tty.resize(120, 40);
    std::thread::sleep(Duration::from_millis(300));
    tty.write(b"stty size\r");
    let at = tty.until(at, "40 120");

    // Ctrl-C goes to the capsule's foreground command, not to the CLI.
    tty.write(b"sleep 100\r");
    let at = tty.until(at, "sleep 100");
    std::thread::sleep(Duration::from_millis(200));
    tty.write(&[0x03]);
    let at = tty.until(at, "^C");
    assert!(child.try_wait().unwrap().is_none(), "Ctrl-C killed the CLI");
    tty.write(b"echo $?\r");
    let at = tty.until(at, "130");

    tty.write(b"exit 4\r");
    tty.until(at, "exit 4");
    assert_eq!(wait(&mut child), 4);
    assert_eq!(
        modes(&tcgetattr(&tty.slave).unwrap()),
        before,
        "the terminal was not restored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_terminal_an_error_also_restores_it() {
    let s = server().await;
    let c = capsules_client::Capsules::new(&s.url)
        .unwrap()
        .connect(&s.owner)
        .unwrap();
    let cap = c.create("tty-2").await.unwrap();

    let tty = Tty::new(80, 24);
    let before = modes(&tcgetattr(&tty.slave).unwrap());
    let mut child = tty.spawn(&s, &["console", "tty-2"]);
    let at = tty.until(0, "$ ");
    // The capsule is terminated under the session: one error line, exit 125, terminal back.
    cap.terminate().await.unwrap();
    tty.until(at, "terminated");
    assert_eq!(wait(&mut child), 125);
    assert_eq!(
        modes(&tcgetattr(&tty.slave).unwrap()),
        before,
        "the terminal was not restored"
    );
}
