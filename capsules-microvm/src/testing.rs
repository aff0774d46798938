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
