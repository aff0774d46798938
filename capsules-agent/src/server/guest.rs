//! Guest mode (PID 1 after switch_root): mounts, hostname, network, the agent channel, shutdown.

use std::ffi::CString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Kernel command line parameters the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `capsules.hostname=NAME`
    pub hostname: Option<String>,
    /// `capsules.ip=A.B.C.D/PREFIX`
    pub ip: Option<(Ipv4Addr, u8)>,
    /// `capsules.gw=A.B.C.D`
    pub gw: Option<Ipv4Addr>,
    /// `capsules.dns=A.B.C.D`
    pub dns: Option<Ipv4Addr>,
    /// `capsules.channel=virtio-serial|vsock:PORT`
    pub channel: Channel,
}

/// Where the agent serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Channel {
    /// The virtio-serial port named `org.capsules.agent` (default).
    #[default]
    VirtioSerial,
    /// AF_VSOCK listener on this port.
    Vsock(u32),
}

/// Name of the virtio-serial port.
pub const PORT_NAME: &str = "org.capsules.agent";

/// Parse `/proc/cmdline` contents. Unknown or malformed values are ignored (reported on stderr).
pub fn parse_cmdline(s: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for word in s.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else { continue };
        match k {
            "capsules.hostname" => c.hostname = Some(v.to_string()),
            "capsules.ip" => {
                c.ip = v
                    .split_once('/')
                    .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok().filter(|p: &u8| *p <= 32)?)));
            }
            "capsules.gw" => c.gw = v.parse().ok(),
            "capsules.dns" => c.dns = v.parse().ok(),
            "capsules.channel" => {
                if v == "virtio-serial" {
                    c.channel = Channel::VirtioSerial;
                } else if let Some(port) = v.strip_prefix("vsock:").and_then(|p| p.parse().ok()) {
                    c.channel = Channel::Vsock(port);
                } else {
                    eprintln!("capsules-agent: ignoring capsules.channel={v}");
                }
            }
            _ => {}
        }
    }
    c
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (
        CString::new(src).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
        CString::new(data).unwrap_or_default(),
    );
    // SAFETY: valid C strings.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("capsules-agent: mount {fstype} on {target} failed: {e}");
        }
    }
}

fn is_mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(target)))
        .unwrap_or(false)
}

/// Mount the pseudo filesystems (skipping what is mounted already).
pub fn mount_all() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if !is_mounted("/proc") {
        mount("proc", "/proc", "proc", nosuid, "");
    }
    for (src, target, fs, flags, data) in [
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "ptmxmode=0666,mode=0620,gid=5",
        ),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ] {
        if !is_mounted(target) {
            mount(src, target, fs, flags, data);
        }
    }
    if std::fs::symlink_metadata("/dev/ptmx")
        .map(|m| !m.file_type().is_symlink())
        .unwrap_or(true)
    {
        let _ = std::fs::remove_file("/dev/ptmx");
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    let _ = std::fs::create_dir_all("/workspace");
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        r.ifr_name[i] = b as libc::c_char;
    }
    r
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; reinterpretation is how the API works.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: i32, req: libc::Ioctl, arg: *mut libc::c_void, what: &str) {
    // SAFETY: arg points to the struct this request expects.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        eprintln!("capsules-agent: {what} failed: {}", std::io::Error::last_os_error());
    }
}

fn link_up(fd: i32, name: &str) {
    let mut r = ifreq(name);
    ioctl(
        fd,
        libc::SIOCGIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        "SIOCGIFFLAGS",
    );
    // SAFETY: union field written by the kernel above.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("bring {name} up"),
    );
}

/// Hostname, loopback, eth0 address and default route, resolv.conf.
pub fn configure_network(c: &Cmdline) {
    if let Some(h) = &c.hostname {
        // SAFETY: pointer and length of a live buffer.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } < 0 {
            eprintln!(
                "capsules-agent: sethostname failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let _ = std::fs::write("/etc/hostname", format!("{h}\n"));
        let hosts = format!("127.0.0.1 localhost\n127.0.1.1 {h}\n::1 localhost\n");
        let _ = std::fs::write("/etc/hosts", hosts);
    }
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        eprintln!(
            "capsules-agent: socket for network setup failed: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: fresh fd.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = sock.as_raw_fd();
    link_up(fd, "lo");
    if let Some((addr, prefix)) = c.ip {
        let mut r = ifreq("eth0");
        r.ifr_ifru.ifru_addr = sockaddr_in(addr);
        ioctl(
            fd,
            libc::SIOCSIFADDR,
            (&mut r as *mut libc::ifreq).cast(),
            "set eth0 address",
        );
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        };
        let mut r = ifreq("eth0");
        r.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
        ioctl(
            fd,
            libc::SIOCSIFNETMASK,
            (&mut r as *mut libc::ifreq).cast(),
            "set eth0 netmask",
        );
        link_up(fd, "eth0");
        if let Some(gw) = c.gw {
            // SAFETY: rtentry is plain data.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr_in(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            let dev = CString::new("eth0").unwrap_or_default();
            rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
            ioctl(
                fd,
                libc::SIOCADDRT,
                (&mut rt as *mut libc::rtentry).cast(),
                "add default route",
            );
        }
    }
    if let Some(dns) = c.dns {
        let _ = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"));
    }
}

/// Print a line on the serial console.
pub fn console(line: &str) {
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(_) => eprintln!("{line}"),
    }
}

/// Find `/dev/vportNpM` whose sysfs name is [`PORT_NAME`].
pub fn find_virtio_port() -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(std::path::Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// An fd (virtio-serial port or vsock connection) as a tokio stream. `read` returns 0 when the
/// host side is not connected; the caller then waits with [`wait_connected`] on the same fd.
#[derive(Debug, Clone)]
pub struct FdStream {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl FdStream {
    /// Wrap an fd (set non-blocking here).
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        super::process::set_nonblocking(fd.as_raw_fd())?;
        Ok(FdStream {
            fd: Arc::new(super::process::async_fd(fd)?),
        })
    }

    /// Raw fd.
    pub fn raw(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut g = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // SAFETY: reading into the initialized unfilled part of buf.
            let r = g.try_io(|f| {
                let n = unsafe { libc::read(f.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut g = ready!(self.fd.poll_write_ready(cx))?;
            // SAFETY: writing from a valid buffer.
            let r = g.try_io(|f| {
                let n = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(res) => return Poll::Ready(res),
                Err(_) => continue,
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Wait until the host side of a virtio-serial port is connected and has sent data.
pub async fn wait_connected(fd: i32) {
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & libc::POLLIN != 0 && p.revents & libc::POLLHUP == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serve sessions one after another on a virtio-serial port, forever. The host may be
/// disconnected (before it first connects, across snapshot/restore): keep the fd and wait for
/// the next session; a new hello on a stream whose disconnect went unnoticed starts it too.
pub async fn serve_port(agent: Arc<super::Agent>, stream: FdStream) -> ! {
    let mut next_hello = None;
    loop {
        if next_hello.is_none() {
            wait_connected(stream.raw()).await;
        }
        next_hello = agent.serve_session(stream.clone(), next_hello.take()).await;
    }
}

/// Listen on AF_VSOCK `port` (any CID).
pub fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket calls with a valid sockaddr.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of_val(&addr) as u32,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 16) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Accept one connection on a (non-blocking) listener.
pub async fn vsock_accept(listener: &AsyncFd<OwnedFd>) -> std::io::Result<OwnedFd> {
    loop {
        let mut g = listener.readable().await?;
        // SAFETY: accept4 with null address.
        match g.try_io(|f| {
            let n = unsafe {
                libc::accept4(
                    f.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        }) {
            // SAFETY: fresh fd.
            Ok(Ok(fd)) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Ok(Err(e)) => return Err(e),
            Err(_) => continue,
        }
    }
}

/// Kill everything, sync, unmount or remount read-only, power off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: plain syscalls; as PID 1, kill(-1) signals every other process.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    targets.reverse();
    for t in targets {
        if matches!(t, "/proc" | "/sys" | "/dev" | "/dev/pts") {
            continue;
        }
        let c = CString::new(t).unwrap_or_default();
        // SAFETY: valid C strings.
        unsafe {
            if libc::umount2(c.as_ptr(), 0) < 0 {
                libc::mount(
                    std::ptr::null(),
                    c.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                );
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{AgentClient, ClientOptions};

    #[tokio::test]
    async fn port_serves_a_new_hello_on_the_same_stream() {
        use crate::frame::{Frame, FrameKind, FrameReader, encode};
        use crate::proto::{Reply, Request};
        use tokio::io::AsyncWriteExt;

        let (agent_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let agent = super::super::Agent::new(super::super::Config::test(dir.path().into())).unwrap();
        let port = FdStream::new(agent_end.into()).unwrap();
        tokio::spawn(serve_port(agent, port));
        host_end.set_nonblocking(true).unwrap();
        let mut host = tokio::net::UnixStream::from_std(host_end).unwrap();
        // Session 1 by hand: hello and a ping.
        let mut buf = bytes::BytesMut::new();
        let hello = serde_json::to_vec(&Request::Hello {
            version: crate::PROTOCOL_VERSION,
            epoch: 1,
        })
        .unwrap();
        encode(&Frame::new(FrameKind::Control, 0, hello), &mut buf).unwrap();
        encode(
            &Frame::new(FrameKind::Control, 1, serde_json::to_vec(&Request::Ping).unwrap()),
            &mut buf,
        )
        .unwrap();
        host.write_all(&buf).await.unwrap();
        {
            let mut r = FrameReader::new(&mut host);
            let f = r.read().await.unwrap().unwrap();
            assert!(matches!(
                serde_json::from_slice(&f.payload).unwrap(),
                Reply::HelloOk { epoch: 1, .. }
            ));
            let f = r.read().await.unwrap().unwrap();
            assert_eq!(serde_json::from_slice::<Reply>(&f.payload).unwrap(), Reply::Pong);
            let f = r.read().await.unwrap().unwrap();
            assert_eq!((f.kind, f.channel), (FrameKind::Cancel, 1));
        }
        // Session 2 on the same stream (no disconnect seen by the agent).
        let c2 = AgentClient::handshake(host, 2, ClientOptions::default()).await.unwrap();
        assert_eq!(c2.epoch(), 2);
        c2.ping().await.unwrap();
    }

    #[test]
    fn cmdline() {
        let c = parse_cmdline(
            "console=ttyS0 capsules.hostname=cap-1 capsules.ip=10.0.0.2/30 capsules.gw=10.0.0.1 capsules.dns=10.0.0.1 capsules.channel=vsock:1024 quiet",
        );
        assert_eq!(c.hostname.as_deref(), Some("cap-1"));
        assert_eq!(c.ip, Some(("10.0.0.2".parse().unwrap(), 30)));
        assert_eq!(c.gw, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.channel, Channel::Vsock(1024));
        assert_eq!(parse_cmdline("capsules.ip=1.2.3.4/99").ip, None);
        assert_eq!(parse_cmdline("").channel, Channel::VirtioSerial);
    }
}
