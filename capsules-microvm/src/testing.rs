//! Shared pieces of the real-VM test targets and benches of the microVM backends (QEMU, Cloud
//! Hypervisor): the prerequisite check that turns a missing tool into an "ignored, because …"
//! reason, and a TCP echo server that runs in every guest image.

/// A TCP echo server on 127.0.0.1 with only what a Debian minbase image has (perl-base's
/// IO::Socket::INET); its one argument is the port.
pub const PERL_TCP_ECHO: &str = r#"use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ARGV[0], Listen => 16, ReuseAddr => 1) or die "listen: $!"; $SIG{CHLD} = "IGNORE"; while (my $c = $s->accept) { if (!fork) { my $b; while (sysread($c, $b, 65536)) { syswrite($c, $b) } exit } close $c }"#;

/// The argv that starts [`PERL_TCP_ECHO`], with `{port}` for the port (the form
/// `capsules_core::testkit::backend::SpawnEchoServer` takes).
pub const PERL_TCP_ECHO_ARGV: [&str; 4] = ["perl", "-e", PERL_TCP_ECHO, "{port}"];

/// Whether `bin` is a file in one of `PATH`'s directories.
pub fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// Why a real-VM test cannot run here, if it cannot: it needs root (taps, nftables, the VMM user)
/// and each `(binary, Debian package)` in `tools`.
pub fn check_prerequisites(tools: &[(&str, &str)]) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (taps, nftables, the VMM user)".into());
    }
    match tools.iter().find(|(bin, _)| !on_path(bin)) {
        Some((bin, pkg)) => Err(format!("{bin} is not installed (apt-get install {pkg})")),
        None => Ok(()),
    }
}

/// The tools a QEMU capsule with networking needs.
pub const QEMU_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
];

/// Builds (or reuses) the guest assets of `images` from the environment's asset settings, with
/// progress on stderr, so a test's first deadline never includes a cold image build. The error
/// says what failed, for the test's "ignored"/failure line.
pub async fn ensure_assets(images: &[crate::assets::BaseImage]) -> Result<(), String> {
    let assets = crate::assets::AssetBuilder::from_env()
        .build()
        .map_err(|e| format!("guest assets: {e}"))?;
    let images = images.to_vec();
    tokio::task::spawn_blocking(move || assets.ensure(&images, crate::assets::Progress::Stderr))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| format!("could not build the guest assets: {e}"))
}

/// A DNS server for tests, standing in for a capsule forwarder's upstream: UDP and TCP on one
/// port of 127.0.0.1 (in whatever network namespace the caller is in). It answers A queries for
/// the names it was given (TTL 300), other types of those names with no records, and any other
/// name NXDOMAIN; `queries` counts what it was asked. Stops when dropped.
#[derive(Debug)]
pub struct DnsStub {
    pub addr: std::net::SocketAddr,
    pub queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsStub {
    /// Starts the stub answering `answers` (name → address).
    pub fn start(answers: &[(&str, std::net::Ipv4Addr)]) -> Result<DnsStub, String> {
        use std::io::{Read, Write};
        use std::net::{TcpListener, UdpSocket};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::time::Duration;

        let answers: Arc<Vec<(String, std::net::Ipv4Addr)>> =
            Arc::new(answers.iter().map(|(n, ip)| (n.to_string(), *ip)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let (tcp, udp) = loop {
            let tcp = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let port = tcp.local_addr().map_err(|e| e.to_string())?.port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
                break (tcp, udp);
            }
        };
        let addr = udp.local_addr().map_err(|e| e.to_string())?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (s1, q1, a1) = (stop.clone(), queries.clone(), answers.clone());
        let t1 = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s1.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    q1.fetch_add(1, Ordering::SeqCst);
                    if let Some(a) = stub_answer(&a1, &buf[..n]) {
                        let _ = udp.send_to(&a, peer);
                    }
                }
            }
        });
        let (s2, q2, a2) = (stop.clone(), queries.clone(), answers);
        let t2 = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut len = [0u8; 2];
                        if c.read_exact(&mut len).is_err() {
                            continue;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if c.read_exact(&mut q).is_err() {
                            continue;
                        }
                        q2.fetch_add(1, Ordering::SeqCst);
                        if let Some(a) = stub_answer(&a2, &q) {
                            let mut out = (a.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&a);
                            let _ = c.write_all(&out);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(DnsStub {
            addr,
            queries,
            stop,
            threads: vec![t1, t2],
        })
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The stub's answer to the query `q`, or `None` for a query it cannot parse.
fn stub_answer(answers: &[(String, std::net::Ipv4Addr)], q: &[u8]) -> Option<Vec<u8>> {
    use crate::net::dns;
    let (_, question) = dns::parse_query(q).ok()?;
    // The question ends at 12 + the encoded name + 4.
    let mut name_wire = Vec::new();
    dns::encode_name(&mut name_wire, &question.name)?;
    let qend = 12 + name_wire.len() + 4;
    let mut out = q.get(..qend)?.to_vec();
    out[2] = 0x81; // QR, RD
    out[3] = 0x80; // RA, NOERROR
    out[4..6].copy_from_slice(&[0, 1]);
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    let ip = answers.iter().find(|(n, _)| *n == question.name).map(|(_, ip)| *ip);
    if ip.is_none() {
        out[3] = 0x83; // NXDOMAIN
    }
    match ip {
        Some(ip) if question.qtype == 1 => {
            out[6..8].copy_from_slice(&[0, 1]);
            out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            out.extend_from_slice(&300u32.to_be_bytes());
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(&ip.octets());
        }
        _ => out[6..8].copy_from_slice(&[0, 0]),
    }
    Some(out)
}
