//! Network pieces shared by the QEMU real-VM targets (`net_qemu`, `vm_qemu`): namespaces the test
//! makes, target namespaces behind veth pairs with an HTTP listener, a DNS stub for the
//! forwarders' upstream, and a TCP probe that runs in every guest image (perl-base).
//!
//! Everything here lives in the test process's own network namespace (each target binary unshares
//! one before anything else): every address a test connects to belongs to a namespace made here.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use capsules_microvm::testing::DnsStub;
use nix::sched::{CloneFlags, setns, unshare};

/// Runs a command in the calling thread's namespace; its stdout, or why it failed.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of links starting with `prefix` (this namespace).
pub fn links_with_prefix(prefix: &str) -> Result<Vec<String>, String> {
    let out = sh(&["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// PIDs (other than ours) whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).replace('\0', " ").contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every process whose command line contains `needle` (QEMUs of a test's state dir that
/// outlived a failed case).
pub fn kill_all_with(needle: &str) {
    for pid in pids_with(needle) {
        eprintln!("cleanup: killing leftover process {pid} ({needle})");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// An unnamed network namespace made by the test, kept alive by an fd.
pub struct Ns {
    fd: OwnedFd,
}

impl Ns {
    pub fn new() -> Result<Ns, String> {
        std::thread::spawn(|| -> Result<OwnedFd, String> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            let f = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
            sh(&["ip", "link", "set", "lo", "up"])?;
            Ok(OwnedFd::from(f))
        })
        .join()
        .map_err(|_| "netns thread panicked".to_owned())?
        .map(|fd| Ns { fd })
    }

    /// A path `ip ... netns PATH` understands.
    pub fn path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    pub fn sh(&self, args: &[&str]) -> Result<String, String> {
        let fd = self.fd.try_clone().map_err(|e| e.to_string())?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            sh(&a)
        })
        .join()
        .map_err(|_| "thread panicked".to_owned())?
    }

    /// An [`HttpListener`] on 0.0.0.0:port inside this namespace.
    pub fn http_listener(&self, port: u16) -> Result<HttpListener, String> {
        HttpListener::start(Some(self.fd.try_clone().map_err(|e| e.to_string())?), port)
    }
}

/// A TCP listener on 0.0.0.0:port that answers every connection with
/// `HTTP/1.0 200 OK … hello <the address it was reached at>` (after reading the request, or
/// after 2 s of silence) and closes it — except a connection that starts with `ECHO\n`, which
/// gets every later byte echoed back until it closes (a long-lived connection). Stopped on drop.
pub struct HttpListener {
    stop: Arc<AtomicBool>,
    t: Option<JoinHandle<()>>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

impl HttpListener {
    /// In `ns`, or in the calling thread's namespace with `None`.
    pub fn start(ns: Option<OwnedFd>, port: u16) -> Result<HttpListener, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s2, a2) = (stop.clone(), accepted.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let bound = match ns {
                Some(fd) => setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string()),
                None => Ok(()),
            }
            .and_then(|_| TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string()));
            let l = match bound {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = l.set_nonblocking(true);
            let _ = tx.send(Ok(()));
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        a2.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || serve_http(c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|e| format!("listener on port {port} did not start: {e}"))??;
        Ok(HttpListener {
            stop,
            t: Some(t),
            accepted,
        })
    }
}

fn serve_http(mut c: TcpStream) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let local = c.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.starts_with(b"ECHO\n") && req.len() < 16 * 1024 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    if let Some(rest) = req.strip_prefix(b"ECHO\n") {
        let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
        if c.write_all(rest).is_err() {
            return;
        }
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
    let body = format!("hello {local}\n");
    let _ = write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = c.shutdown(std::net::Shutdown::Write);
}

impl Drop for HttpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// A target namespace behind a veth pair: `<host_if>` here with `host_ip/24`, the peer there with
/// `target_ip/24` (plus `extra` addresses) and a default route back, and an [`HttpListener`] on
/// `port`. The links are removed on drop (the namespace dies with its fd).
pub struct Target {
    pub ns: Ns,
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub listener: Option<HttpListener>,
}

impl Target {
    pub fn new(
        host_if: &str,
        host_ip: Ipv4Addr,
        ip: Ipv4Addr,
        extra: &[Ipv4Addr],
        port: u16,
    ) -> Result<Target, String> {
        let ns = Ns::new()?;
        let peer = format!("{host_if}p");
        let _ = sh(&["ip", "link", "del", host_if]);
        sh(&["ip", "link", "add", host_if, "type", "veth", "peer", "name", &peer])?;
        let mut t = Target {
            ns,
            host_if: host_if.to_owned(),
            host_ip,
            ip,
            port,
            listener: None,
        };
        sh(&["ip", "link", "set", &peer, "netns", &t.ns.path()])?;
        sh(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", host_if])?;
        sh(&["ip", "link", "set", host_if, "up"])?;
        t.ns.sh(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &peer])?;
        for x in extra {
            t.ns.sh(&["ip", "addr", "add", &format!("{x}/24"), "dev", &peer])?;
        }
        t.ns.sh(&["ip", "link", "set", &peer, "up"])?;
        t.ns.sh(&["ip", "route", "add", "default", "via", &host_ip.to_string()])?;
        t.listener = Some(t.ns.http_listener(port)?);
        Ok(t)
    }

    /// `ip:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.listener.take();
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

/// Fetches `http://addr/` from this namespace: the body's `hello <ip>` address, or why not.
pub fn host_fetch(addr: &str) -> Result<String, String> {
    let a: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(3)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read {addr}: {e}"))?;
    out.split("hello ")
        .nth(1)
        .map(|r| r.trim().to_owned())
        .ok_or_else(|| format!("{addr} answered {out:?}"))
}

/// The forwarders' upstream: answers `A ok.test` with [`OK_IP`] and `A other.test` with
/// [`OTHER_IP`] (TTL 300), other types of those names with no records, every other name NXDOMAIN.
/// What the stub answers for `ok.test` (an address of a target namespace outside the blocked ranges).
pub const OK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// What the stub answers for `other.test` (another address of the same namespace).
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

/// The forwarders' upstream in these tests: `ok.test` and `other.test`, everything else NXDOMAIN.
pub fn dns_stub() -> Result<DnsStub, String> {
    DnsStub::start(&[("ok.test", OK_IP), ("other.test", OTHER_IP)])
}

/// A guest-side probe (perl-base only): for each `host:port` argument, connects (3 s timeout,
/// resolving names through the guest's resolver), sends an HTTP/1.0 GET, and prints
/// `<arg> ok <ip>` with the address in the `hello <ip>` answer, `<arg> open` when the connection
/// was accepted but gave no such answer, or `<arg> fail` when no connection was made.
pub const PERL_PROBE: &str = r#"use IO::Socket::INET; $| = 1;
for my $t (@ARGV) {
  my ($h, $p) = split /:/, $t;
  my $s = IO::Socket::INET->new(PeerAddr => $h, PeerPort => $p, Proto => "tcp", Timeout => 3);
  if (!$s) { print "$t fail\n"; next }
  print $s "GET / HTTP/1.0\r\nHost: $h\r\n\r\n";
  my ($r, $b) = ("", "");
  eval { local $SIG{ALRM} = sub { die "timeout\n" }; alarm 3; while (sysread($s, $b, 4096)) { $r .= $b } alarm 0 };
  if ($r =~ /hello (\S+)/) { print "$t ok $1\n" } else { print "$t open\n" }
}"#;

/// A guest-side client of one long-lived connection (perl-base only): connects to `$ARGV[0]`
/// (`host:port` of an [`HttpListener`]), sends `ECHO` and a line, and once it came back creates the
/// file `$ARGV[1]`; then waits (up to 60 s) for the file `$ARGV[2]`, sends another line and prints
/// `after ok` if it comes back within 3 s, else `after cut`. Prints `before fail` and exits 1 if
/// the first exchange fails.
pub const PERL_HELD_CONNECTION: &str = r#"use IO::Socket::INET; $| = 1;
my ($t, $ready, $go) = @ARGV; my ($h, $p) = split /:/, $t;
my $s = IO::Socket::INET->new(PeerAddr => $h, PeerPort => $p, Proto => "tcp", Timeout => 3) or do { print "before fail\n"; exit 1 };
sub exchange { my ($msg, $want) = @_; my $r = ""; my $b;
  eval { local $SIG{ALRM} = sub { die "timeout\n" }; alarm 3; syswrite($s, $msg);
    while ($r !~ /\n/ && sysread($s, $b, 4096)) { $r .= $b } alarm 0 };
  return $r eq $want }
exchange("ECHO\nping1\n", "ping1\n") ? print "before ok\n" : do { print "before fail\n"; exit 1 };
open(my $f, ">", $ready); close $f;
for (1..600) { last if -e $go; select(undef, undef, undef, 0.1) }
print exchange("ping2\n", "ping2\n") ? "after ok\n" : "after cut\n";"#;

/// A guest-side HTTP server on 0.0.0.0:`$ARGV[0]` answering like [`HttpListener`] (perl-base only).
pub const PERL_HTTP_SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => "0.0.0.0", LocalPort => $ARGV[0], Listen => 16, ReuseAddr => 1) or die "listen: $!";
while (my $c = $s->accept) { my $b; sysread($c, $b, 4096); print $c "HTTP/1.0 200 OK\r\n\r\nhello " . $c->sockhost . "\n"; close $c }"#;

/// One target's outcome in [`PERL_PROBE`]'s output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No connection was made (refused, dropped, unresolvable).
    Fail,
    /// Connected, but no `hello` answer (e.g. the DNS forwarder's TCP port).
    Open,
    /// Connected and answered `hello <ip>`.
    Ok(String),
}

/// Parses [`PERL_PROBE`]'s output, one [`Probe`] per target.
pub fn parse_probe(out: &str, targets: &[String]) -> Result<Vec<Probe>, String> {
    targets
        .iter()
        .map(|t| {
            let line = out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(t.as_str()))
                .ok_or_else(|| format!("the probe printed nothing for {t}: {out:?}"))?;
            let mut w = line.split_whitespace().skip(1);
            match (w.next(), w.next()) {
                (Some("ok"), Some(ip)) => Ok(Probe::Ok(ip.to_owned())),
                (Some("open"), _) => Ok(Probe::Open),
                (Some("fail"), _) => Ok(Probe::Fail),
                _ => Err(format!("unexpected probe line {line:?}")),
            }
        })
        .collect()
}
