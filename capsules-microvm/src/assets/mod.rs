//! Guest assets built from Debian packages: kernel, initramfs, base root filesystems.
//!
//! One explicit, idempotent setup call builds everything a capsule VM boots from, into a
//! content-addressed cache (default `/var/cache/capsules`, env `CAPSULES_ASSET_DIR`):
//!
//! - the kernel: `linux-image-cloud-amd64` of the pinned 6.12 series from bookworm-backports,
//!   fetched with a private apt configuration (the system's apt config and lists stay untouched);
//!   both the bzImage `vmlinuz` (QEMU) and the ELF `vmlinux` with its PVH note (Cloud Hypervisor);
//! - the initramfs: the statically linked agent as `/init`, plus the virtio/vsock/overlay modules;
//! - read-only ext4 base images (`small`, `full`) made with `mmdebstrap` and `mkfs.ext4 -d`.
//!
//! Every piece lives in a directory named by the sha256 of its inputs (package versions, module
//! list, agent binary hash, package lists, builder version), so it is rebuilt only when an input
//! changes; a lock file keeps two processes from building at once.
//!
//! ```no_run
//! use capsules_microvm::assets::{AssetBuilder, BaseImage, Progress};
//!
//! let assets = AssetBuilder::from_env().build()?;
//! let manifest = assets.ensure(&[BaseImage::Small], Progress::Auto)?;
//! println!("kernel {} at {}", manifest.kernel.release, manifest.kernel.vmlinuz.display());
//! # Ok::<(), capsules_microvm::assets::AssetError>(())
//! ```
//!
//! `ensure` blocks (minutes on a cold cache); call it from `tokio::task::spawn_blocking` in async
//! code. It is plain setup, never billed to anyone.

mod apt;
mod cpio;
mod error;
mod kernel;

use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::{AssetError, Result};
use error::{IoContext, find_tool, run};

use crate::vmm::KernelFormat;

/// Bump when the way any asset is built changes: it is part of every cache key.
pub const BUILDER_VERSION: u32 = 2;

/// The kernel series Capsules' guest support is pinned to.
pub const KERNEL_SERIES: &str = "6.12";

/// The kernel metapackage resolved in bookworm-backports.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The Debian release the base images and the kernel come from.
pub const DEBIAN_SUITE: &str = "bookworm";

/// Kernel modules the initramfs loads (their dependencies are added, dependencies first).
/// VIRTIO_PCI, VIRTIO_CONSOLE and EXT4 are built into the Debian cloud kernel.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
];

/// Default asset cache directory.
pub const DEFAULT_ASSET_DIR: &str = "/var/cache/capsules";

/// A base root filesystem image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseImage {
    /// `mmdebstrap --variant=minbase` plus what the contract tests need.
    Small,
    /// Development image: git, curl, ca-certificates, nodejs, npm, python3, build-essential.
    Full,
}

impl BaseImage {
    /// Every base image.
    pub const ALL: [BaseImage; 2] = [BaseImage::Small, BaseImage::Full];

    /// The image's name (`small`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            BaseImage::Small => "small",
            BaseImage::Full => "full",
        }
    }

    /// Packages installed on top of `minbase`.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            BaseImage::Small => &["procps"],
            BaseImage::Full => &[
                "ca-certificates",
                "git",
                "curl",
                "nodejs",
                "npm",
                "python3",
                "build-essential",
            ],
        }
    }

    /// Parses `small` / `full`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.name() == name)
    }
}

impl std::fmt::Display for BaseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where progress lines of [`Assets::ensure`] go.
#[derive(Clone, Copy)]
pub enum Progress<'a> {
    /// To stderr when stderr is a terminal, else nowhere.
    Auto,
    /// Nowhere.
    Silent,
    /// To stderr always.
    Stderr,
    /// To a callback, one line per call.
    Callback(&'a (dyn Fn(&str) + Sync)),
}

impl std::fmt::Debug for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Progress::Auto => "Auto",
            Progress::Silent => "Silent",
            Progress::Stderr => "Stderr",
            Progress::Callback(_) => "Callback(..)",
        })
    }
}

impl Progress<'_> {
    fn line(&self, msg: &str) {
        match self {
            Progress::Auto if std::io::stderr().is_terminal() => eprintln!("capsules assets: {msg}"),
            Progress::Stderr => eprintln!("capsules assets: {msg}"),
            Progress::Callback(f) => f(msg),
            Progress::Auto | Progress::Silent => {}
        }
    }
}

/// Configures the asset builder: `new()` for defaults, `from_env()` to read the environment,
/// `with_*` to override, `build()` to check and finish.
#[derive(Debug, Clone, Default)]
pub struct AssetBuilder {
    asset_dir: Option<PathBuf>,
    agent_bin: Option<PathBuf>,
    workspace_root: Option<PathBuf>,
    mirror: Option<String>,
    refresh: Option<Duration>,
}

/// How long package lists fetched from the archive are trusted before [`Assets::ensure`] asks
/// the archive again for new versions.
pub const DEFAULT_ARCHIVE_REFRESH: Duration = Duration::from_secs(3600);

impl AssetBuilder {
    /// Defaults: cache in [`DEFAULT_ASSET_DIR`], the agent built from this crate's workspace, the
    /// system's configured Debian mirror.
    pub fn new() -> Self {
        Self::default()
    }

    /// Defaults, overridden by `CAPSULES_ASSET_DIR` (cache directory), `CAPSULES_AGENT_BIN` (a
    /// prebuilt static agent binary) and `CAPSULES_DEBIAN_MIRROR` (mirror URL) when set.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            asset_dir: var("CAPSULES_ASSET_DIR").map(PathBuf::from),
            agent_bin: var("CAPSULES_AGENT_BIN").map(PathBuf::from),
            workspace_root: None,
            mirror: var("CAPSULES_DEBIAN_MIRROR").map(|m| m.to_string_lossy().into_owned()),
            refresh: None,
        }
    }

    /// How old the cached package lists may be before `ensure` fetches them again (default
    /// [`DEFAULT_ARCHIVE_REFRESH`]; `Duration::ZERO` = every call). New package versions, and so
    /// rebuilt assets, are noticed only when the lists are fetched.
    pub fn with_archive_refresh(mut self, max_age: Duration) -> Self {
        self.refresh = Some(max_age);
        self
    }

    /// The cache directory (created if missing).
    pub fn with_asset_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.asset_dir = Some(dir.into());
        self
    }

    /// Use this statically linked agent binary instead of building one.
    pub fn with_agent_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(path.into());
        self
    }

    /// The cargo workspace to build `capsules-agent` from (default: the workspace this crate was
    /// compiled in, if it is still there).
    pub fn with_workspace_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workspace_root = Some(dir.into());
        self
    }

    /// The Debian mirror URL, e.g. `http://deb.debian.org/debian`.
    pub fn with_mirror(mut self, url: impl Into<String>) -> Self {
        self.mirror = Some(url.into());
        self
    }

    /// Checks the settings and returns the asset store. Touches nothing yet.
    pub fn build(self) -> Result<Assets> {
        let asset_dir = self.asset_dir.unwrap_or_else(|| DEFAULT_ASSET_DIR.into());
        if !asset_dir.is_absolute() {
            return Err(AssetError::Invalid(format!(
                "the asset directory must be an absolute path, not {}",
                asset_dir.display()
            )));
        }
        let agent = match self.agent_bin {
            Some(p) => AgentSource::Prebuilt(p),
            None => {
                let root = self
                    .workspace_root
                    .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
                AgentSource::Build(root)
            }
        };
        let mirror = self.mirror.unwrap_or_else(apt::system_mirror);
        let mirror = mirror.trim_end_matches('/').to_owned();
        if !(mirror.starts_with("http://") || mirror.starts_with("https://") || mirror.starts_with("file:/")) {
            return Err(AssetError::Invalid(format!(
                "the Debian mirror must be an http(s):// or file:/ URL, not {mirror:?}"
            )));
        }
        Ok(Assets {
            asset_dir,
            agent,
            mirror,
            refresh: self.refresh.unwrap_or(DEFAULT_ARCHIVE_REFRESH),
        })
    }
}

#[derive(Debug, Clone)]
enum AgentSource {
    Prebuilt(PathBuf),
    Build(PathBuf),
}

/// The asset store: builds and finds the guest assets in its cache directory.
#[derive(Debug, Clone)]
pub struct Assets {
    asset_dir: PathBuf,
    agent: AgentSource,
    mirror: String,
    refresh: Duration,
}

/// What [`Assets::ensure`] produced; also written as JSON into the cache (`manifest.json`, and
/// `manifests/<key>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetManifest {
    /// sha256 over the keys of every part below.
    pub key: String,
    /// [`BUILDER_VERSION`] that built it.
    pub builder_version: u32,
    /// The Debian mirror used.
    pub mirror: String,
    /// The kernel.
    pub kernel: KernelAssets,
    /// The initramfs.
    pub initramfs: InitramfsAssets,
    /// The requested base images by name (`small`, `full`).
    pub images: BTreeMap<String, ImageAssets>,
}

/// The kernel part of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelAssets {
    /// Cache key of this kernel.
    pub key: String,
    /// The versioned Debian package, e.g. `linux-image-6.12.95+deb12-cloud-amd64`.
    pub package: String,
    /// The Debian package version, e.g. `6.12.95-1~bpo12+1`.
    pub package_version: String,
    /// The kernel release (`uname -r`), e.g. `6.12.95+deb12-cloud-amd64`.
    pub release: String,
    /// The compressed bzImage (QEMU).
    pub vmlinuz: PathBuf,
    /// The ELF vmlinux with a PVH entry note (Cloud Hypervisor).
    pub vmlinux: PathBuf,
}

/// The initramfs part of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsAssets {
    /// Cache key of this initramfs.
    pub key: String,
    /// The uncompressed newc cpio archive.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// sha256 of the agent binary inside (as `/init`).
    pub agent_sha256: String,
    /// Module file names in load order.
    pub modules: Vec<String>,
}

/// One base image in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAssets {
    /// Cache key of this image.
    pub key: String,
    /// The read-only ext4 image (label `capsules-base`).
    pub path: PathBuf,
    /// Its apparent size in bytes.
    pub size_bytes: u64,
    /// Bytes it occupies on the host's disk (it is sparse).
    pub allocated_bytes: u64,
    /// Packages installed on top of minbase, with the versions that were current.
    pub packages: BTreeMap<String, String>,
}

impl AssetManifest {
    /// The kernel file in the format a VMM asked for.
    pub fn kernel_path(&self, format: KernelFormat) -> &Path {
        match format {
            KernelFormat::BzImage => &self.kernel.vmlinuz,
            KernelFormat::ElfVmlinux => &self.kernel.vmlinux,
        }
    }

    /// A base image, if this manifest includes it.
    pub fn image(&self, image: BaseImage) -> Option<&ImageAssets> {
        self.images.get(image.name())
    }
}

/// sha256 over labelled parts, as lowercase hex.
fn key_of(parts: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in parts {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The first 16 hex digits of a key: the directory name of a cached part.
fn short(key: &str) -> &str {
    &key[..16]
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An exclusive `flock` on `<asset_dir>/.lock`, released on drop.
struct Lock(fs::File);

impl Lock {
    fn acquire(dir: &Path, progress: &Progress<'_>) -> Result<Self> {
        let path = dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("open the asset lock {}", path.display()))?;
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress.line("waiting for another process that is building assets");
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error()).ctx(|| format!("lock {}", path.display()));
            }
        }
        Ok(Self(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A directory being built, renamed into place on `commit`, removed otherwise.
struct Staging {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Staging {
    fn new(dest: &Path) -> Result<Self> {
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("part");
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            remove_tree(&tmp)?;
        }
        fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    fn commit(mut self) -> Result<()> {
        sync_dir(&self.tmp);
        if self.dest.exists() {
            remove_tree(&self.dest)?;
        }
        fs::rename(&self.tmp, &self.dest).ctx(|| format!("move {} into place", self.dest.display()))?;
        if let Some(parent) = self.dest.parent() {
            sync_dir(parent);
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = remove_tree(&self.tmp);
        }
    }
}

/// `remove_dir_all`, but never into a mount: a build killed mid-way (mmdebstrap mounts /proc,
/// /sys and /dev inside its tree) must not make us delete through them into the host's files.
fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mounts = fs::read_to_string("/proc/self/mounts").ctx(|| "read /proc/self/mounts".into())?;
    let prefix = format!("{}/", path.display());
    if let Some(m) = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|m| m.starts_with(&prefix) || *m == prefix.trim_end_matches('/'))
    {
        return Err(AssetError::Invalid(format!(
            "not removing {}: {m} is still mounted inside it (left by a killed build); \
             run `umount -R {m}` and retry",
            path.display()
        )));
    }
    fs::remove_dir_all(path).ctx(|| format!("remove {}", path.display()))
}

fn sync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).expect("manifest serializes");
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, &json).ctx(|| format!("write {}", tmp.display()))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("sync {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("move {} into place", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The kernel resolved from the archive (before fetching).
struct KernelChoice {
    package: String,
    version: String,
}

impl Assets {
    /// The cache directory.
    pub fn asset_dir(&self) -> &Path {
        &self.asset_dir
    }

    /// The Debian mirror in use.
    pub fn mirror(&self) -> &str {
        &self.mirror
    }

    /// The manifest written by the last successful [`ensure`](Self::ensure), if any.
    pub fn cached_manifest(&self) -> Option<AssetManifest> {
        read_json(&self.asset_dir.join("manifest.json"))
    }

    /// Builds whatever of the kernel, initramfs and the given base images is not cached yet and
    /// returns their manifest. Idempotent; a second call with unchanged inputs rebuilds nothing
    /// (it runs `cargo build` of the agent, a no-op when up to date, and re-reads the archive's
    /// package lists when they are older than the refresh interval). If the mirror cannot be
    /// reached, the last manifest is reused when it covers `images`.
    pub fn ensure(&self, images: &[BaseImage], progress: Progress<'_>) -> Result<AssetManifest> {
        fs::create_dir_all(&self.asset_dir)
            .ctx(|| format!("create the asset directory {}", self.asset_dir.display()))?;
        let _lock = Lock::acquire(&self.asset_dir, &progress)?;
        let t0 = Instant::now();
        self.remove_stale_staging(&progress);

        let agent = self.agent_binary(&progress)?;
        let agent_sha = sha256_hex(&agent);

        let backports = apt::PrivateApt::new(
            &self.asset_dir.join("apt/backports"),
            &self.mirror,
            "bookworm-backports",
        )?;
        let bookworm = apt::PrivateApt::new(&self.asset_dir.join("apt/bookworm"), &self.mirror, DEBIAN_SUITE)?;
        let t = Instant::now();
        match backports
            .update(self.refresh)
            .and_then(|a| Ok(bookworm.update(self.refresh)? || a))
        {
            Ok(true) => progress.line(&format!(
                "package lists updated from {} in {:.1} s",
                self.mirror,
                secs(t)
            )),
            Ok(false) => {}
            Err(e) => return self.offline_fallback(images, e, &progress),
        }

        let choice = self.resolve_kernel(&backports)?;
        let kernel = self.ensure_kernel(&backports, &choice, &progress)?;
        let initramfs = self.ensure_initramfs(&kernel, &agent, &agent_sha, &progress)?;

        let mut image_assets = BTreeMap::new();
        let mut wanted: Vec<BaseImage> = images.to_vec();
        wanted.sort();
        wanted.dedup();
        for image in wanted {
            let a = self.ensure_image(&bookworm, image, &progress)?;
            image_assets.insert(image.name().to_owned(), a);
        }

        let mut parts = vec![
            ("builder", BUILDER_VERSION.to_string()),
            ("kernel", kernel.key.clone()),
            ("initramfs", initramfs.key.clone()),
        ];
        for (name, img) in &image_assets {
            parts.push(("image", format!("{name}={}", img.key)));
        }
        let parts_ref: Vec<(&str, &str)> = parts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let manifest = AssetManifest {
            key: key_of(&parts_ref),
            builder_version: BUILDER_VERSION,
            mirror: self.mirror.clone(),
            kernel,
            initramfs,
            images: image_assets,
        };
        let mdir = self.asset_dir.join("manifests");
        fs::create_dir_all(&mdir).ctx(|| format!("create {}", mdir.display()))?;
        write_json(&mdir.join(format!("{}.json", short(&manifest.key))), &manifest)?;
        write_json(&self.asset_dir.join("manifest.json"), &manifest)?;
        progress.line(&format!(
            "assets ready in {:.1} s (manifest {})",
            secs(t0),
            short(&manifest.key)
        ));
        Ok(manifest)
    }

    /// Removes half-built parts a crashed or killed build left behind (we hold the lock, so no
    /// build is running).
    fn remove_stale_staging(&self, progress: &Progress<'_>) {
        for sub in ["kernel", "initramfs", "images"] {
            let Ok(entries) = fs::read_dir(self.asset_dir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(".tmp-")
                    && let Err(err) = remove_tree(&e.path())
                {
                    progress.line(&err.to_string());
                }
            }
        }
    }

    fn offline_fallback(
        &self,
        images: &[BaseImage],
        err: AssetError,
        progress: &Progress<'_>,
    ) -> Result<AssetManifest> {
        if let Some(m) = self.cached_manifest() {
            let complete = images.iter().all(|i| m.image(*i).is_some_and(|a| a.path.exists()))
                && m.kernel.vmlinuz.exists()
                && m.kernel.vmlinux.exists()
                && m.initramfs.path.exists();
            if complete {
                progress.line(&format!(
                    "cannot reach {} ({err}); using the cached assets",
                    self.mirror
                ));
                return Ok(m);
            }
        }
        Err(AssetError::Offline {
            mirror: self.mirror.clone(),
            source: Box::new(err),
        })
    }

    /// The agent binary's bytes: the prebuilt one, or `cargo build` of `capsules-agent`.
    fn agent_binary(&self, progress: &Progress<'_>) -> Result<Vec<u8>> {
        let path = match &self.agent {
            AgentSource::Prebuilt(p) => p.clone(),
            AgentSource::Build(root) => self.build_agent(root, progress)?,
        };
        let bin = fs::read(&path).ctx(|| format!("read the agent binary {}", path.display()))?;
        if !kernel::is_static_elf(&bin) {
            return Err(AssetError::Invalid(format!(
                "the agent binary {} is not a statically linked ELF executable; build it with \
                 RUSTFLAGS=-Ctarget-feature=+crt-static cargo build -p capsules-agent --release \
                 --target x86_64-unknown-linux-gnu",
                path.display()
            )));
        }
        Ok(bin)
    }

    fn build_agent(&self, root: &Path, progress: &Progress<'_>) -> Result<PathBuf> {
        if !root.join("capsules-agent/Cargo.toml").exists() {
            return Err(AssetError::Invalid(format!(
                "cannot build the agent: {} is not the Capsules workspace; set CAPSULES_AGENT_BIN to a \
                 static capsules-agent binary (or AssetBuilder::with_agent_bin / with_workspace_root)",
                root.display()
            )));
        }
        let cargo = std::env::var_os("CARGO")
            .map(PathBuf::from)
            .map_or_else(|| find_tool("cargo", "cargo"), Ok)?;
        let target_dir = self.asset_dir.join("agent-target");
        let t = Instant::now();
        progress.line("building the static agent (cargo build -p capsules-agent --release; quick when up to date)");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root)
            .args([
                "build",
                "-p",
                "capsules-agent",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--target-dir",
            ])
            .arg(&target_dir)
            .env("RUSTFLAGS", "-Ctarget-feature=+crt-static")
            // The binary lives in every guest's RAM (initramfs, then /run): keep symbols for
            // backtraces but drop the line tables (17 MiB -> 4 MiB).
            .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
            // Settings of an outer cargo (when called from a test or build) must not leak in.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        run(&mut cmd, "building the static capsules-agent")?;
        progress.line(&format!("agent built in {:.1} s", secs(t)));
        Ok(target_dir.join("x86_64-unknown-linux-gnu/release/capsules-agent"))
    }

    fn resolve_kernel(&self, apt: &apt::PrivateApt) -> Result<KernelChoice> {
        let meta = apt.show(&[KERNEL_METAPACKAGE])?;
        let st = meta.get(KERNEL_METAPACKAGE).ok_or_else(|| {
            AssetError::Invalid(format!(
                "{KERNEL_METAPACKAGE} is not in bookworm-backports on {}",
                self.mirror
            ))
        })?;
        let package = st
            .depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
            .ok_or_else(|| {
                AssetError::Invalid(format!(
                    "{KERNEL_METAPACKAGE} {} depends on no linux-image-*-cloud-amd64 package ({})",
                    st.version, st.depends
                ))
            })?
            .to_owned();
        let series = format!("linux-image-{KERNEL_SERIES}.");
        if !package.starts_with(&series) {
            return Err(AssetError::KernelSeries {
                found: format!("{package} ({})", st.version),
                expected: KERNEL_SERIES.into(),
            });
        }
        let versioned = apt.show(&[&package])?;
        let version = versioned
            .get(&package)
            .map(|s| s.version.clone())
            .ok_or_else(|| AssetError::Invalid(format!("{package} is not in bookworm-backports on {}", self.mirror)))?;
        Ok(KernelChoice { package, version })
    }

    fn ensure_kernel(
        &self,
        apt: &apt::PrivateApt,
        choice: &KernelChoice,
        progress: &Progress<'_>,
    ) -> Result<KernelAssets> {
        let key = key_of(&[
            ("builder", &BUILDER_VERSION.to_string()),
            ("package", &choice.package),
            ("version", &choice.version),
        ]);
        let dir = self.asset_dir.join("kernel").join(short(&key));
        if let Some(k) = read_json::<KernelAssets>(&dir.join("kernel.json"))
            && k.key == key
            && k.vmlinuz.exists()
            && k.vmlinux.exists()
        {
            return Ok(k);
        }
        let t = Instant::now();
        progress.line(&format!("fetching {} {}", choice.package, choice.version));
        let stage = Staging::new(&dir)?;
        let deb = apt.download(&choice.package, &choice.version, &stage.tmp.join("deb"))?;
        let dpkg_deb = find_tool("dpkg-deb", "dpkg")?;
        let tree = stage.tmp.join("tree");
        run(
            Command::new(dpkg_deb).arg("-x").arg(&deb).arg(&tree),
            "unpacking the kernel package (dpkg-deb -x)",
        )?;
        fs::remove_dir_all(stage.tmp.join("deb")).ctx(|| "remove the downloaded kernel package".into())?;
        let release = choice.package.trim_start_matches("linux-image-").to_owned();
        let src = tree.join("boot").join(format!("vmlinuz-{release}"));
        let vmlinuz = fs::read(&src).ctx(|| format!("read {}", src.display()))?;
        let vmlinux = kernel::extract_vmlinux(&vmlinuz)?;
        fs::write(stage.tmp.join("vmlinuz"), &vmlinuz).ctx(|| "write vmlinuz".into())?;
        fs::write(stage.tmp.join("vmlinux"), &vmlinux).ctx(|| "write vmlinux".into())?;
        let k = KernelAssets {
            key,
            package: choice.package.clone(),
            package_version: choice.version.clone(),
            release,
            vmlinuz: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
        };
        write_json(&stage.tmp.join("kernel.json"), &k)?;
        stage.commit()?;
        progress.line(&format!(
            "kernel {} ready in {:.1} s (vmlinux {} MiB)",
            k.release,
            secs(t),
            vmlinux.len() >> 20
        ));
        Ok(k)
    }

    fn kernel_tree(&self, k: &KernelAssets) -> PathBuf {
        self.asset_dir.join("kernel").join(short(&k.key)).join("tree")
    }

    fn ensure_initramfs(
        &self,
        k: &KernelAssets,
        agent: &[u8],
        agent_sha: &str,
        progress: &Progress<'_>,
    ) -> Result<InitramfsAssets> {
        let key = key_of(&[
            ("builder", &BUILDER_VERSION.to_string()),
            ("kernel", &k.key),
            ("agent", agent_sha),
            ("modules", &INITRAMFS_MODULES.join(",")),
        ]);
        let dir = self.asset_dir.join("initramfs").join(short(&key));
        if let Some(i) = read_json::<InitramfsAssets>(&dir.join("initramfs.json"))
            && i.key == key
            && i.path.exists()
        {
            return Ok(i);
        }
        let t = Instant::now();
        let mod_root = self.kernel_tree(k).join("lib/modules").join(&k.release);
        let index = kernel::index_modules(&mod_root)?;
        let xz = find_tool("xz", "xz-utils")?;
        let mut decompressed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut load = |name: &str| -> Result<Vec<u8>> {
            if let Some(b) = decompressed.get(name) {
                return Ok(b.clone());
            }
            let path = index.get(name).ok_or_else(|| {
                AssetError::Invalid(format!(
                    "kernel module {name} is not in {} {}",
                    k.package, k.package_version
                ))
            })?;
            let bytes = match path.extension().and_then(|e| e.to_str()) {
                Some("xz") => {
                    run(
                        Command::new(&xz).arg("-dc").arg(path),
                        &format!("decompressing {}", path.display()),
                    )?
                    .stdout
                }
                Some("zst") => {
                    run(
                        Command::new(find_tool("zstd", "zstd")?).arg("-dcq").arg(path),
                        &format!("decompressing {}", path.display()),
                    )?
                    .stdout
                }
                _ => fs::read(path).ctx(|| format!("read {}", path.display()))?,
            };
            decompressed.insert(name.to_owned(), bytes.clone());
            Ok(bytes)
        };
        let order = kernel::load_order(INITRAMFS_MODULES, |m| kernel::module_depends(&load(m)?))?;

        let stage = Staging::new(&dir)?;
        let out_path = stage.tmp.join("initramfs.cpio");
        let file = fs::File::create(&out_path).ctx(|| format!("create {}", out_path.display()))?;
        let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(file));
        let mut module_files = Vec::new();
        let cpio_result = (|| -> std::io::Result<u64> {
            for d in [
                "dev",
                "proc",
                "sys",
                "mnt",
                "mnt/base",
                "mnt/data",
                "newroot",
                "lib",
                "lib/modules",
                "lib/modules/capsules",
            ] {
                w.dir(d, 0o755)?;
            }
            w.char_dev("dev/console", 0o600, 5, 1)?;
            w.char_dev("dev/null", 0o666, 1, 3)?;
            w.file("init", 0o755, agent)?;
            for m in &order {
                let name = format!("{m}.ko");
                w.file(
                    &format!("lib/modules/capsules/{name}"),
                    0o644,
                    &load(m).map_err(std::io::Error::other)?,
                )?;
                module_files.push(name);
            }
            let mut list = module_files.join("\n");
            list.push('\n');
            w.file("lib/modules/capsules/order", 0o644, list.as_bytes())?;
            let (buf, n) = w.finish()?;
            buf.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(n)
        })();
        let size = cpio_result.ctx(|| format!("write the initramfs {}", out_path.display()))?;
        let i = InitramfsAssets {
            key,
            path: dir.join("initramfs.cpio"),
            size_bytes: size,
            agent_sha256: agent_sha.to_owned(),
            modules: module_files,
        };
        write_json(&stage.tmp.join("initramfs.json"), &i)?;
        stage.commit()?;
        progress.line(&format!(
            "initramfs ready in {:.1} s ({} KiB, modules: {})",
            secs(t),
            size >> 10,
            order.join(" ")
        ));
        Ok(i)
    }

    fn ensure_image(&self, apt: &apt::PrivateApt, image: BaseImage, progress: &Progress<'_>) -> Result<ImageAssets> {
        let pkgs = image.packages();
        let shown = apt.show(pkgs)?;
        let mut versions = BTreeMap::new();
        for p in pkgs {
            let st = shown.get(*p).ok_or_else(|| {
                AssetError::Invalid(format!(
                    "package {p} (for the {image} image) is not in {DEBIAN_SUITE} on {}",
                    self.mirror
                ))
            })?;
            versions.insert((*p).to_owned(), st.version.clone());
        }
        let listed: Vec<String> = versions.iter().map(|(p, v)| format!("{p}={v}")).collect();
        let key = key_of(&[
            ("builder", &BUILDER_VERSION.to_string()),
            ("suite", DEBIAN_SUITE),
            ("variant", "minbase"),
            ("image", image.name()),
            ("packages", &listed.join(" ")),
        ]);
        let dir = self
            .asset_dir
            .join("images")
            .join(format!("{}-{}", image.name(), short(&key)));
        if let Some(a) = read_json::<ImageAssets>(&dir.join("image.json"))
            && a.key == key
            && a.path.exists()
        {
            return Ok(a);
        }
        let mmdebstrap = find_tool("mmdebstrap", "mmdebstrap")?;
        let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
        let stage = Staging::new(&dir)?;
        let tree = stage.tmp.join("tree");
        let t = Instant::now();
        progress.line(&format!(
            "building the {image} base image with mmdebstrap ({})",
            pkgs.join(" ")
        ));
        let mut cmd = Command::new(mmdebstrap);
        cmd.args([
            "--variant=minbase",
            "--aptopt=Apt::Install-Recommends \"false\"",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            // mmdebstrap copies the host's hostname and resolver into the tree: keep the image
            // neutral (the agent sets the hostname and writes resolv.conf from the cmdline).
            "--customize-hook=echo capsule > \"$1/etc/hostname\"",
            "--customize-hook=: > \"$1/etc/resolv.conf\"",
            "--customize-hook=printf '127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' > \"$1/etc/hosts\"",
            &format!("--include={}", pkgs.join(",")),
            DEBIAN_SUITE,
        ])
        .arg(&tree)
        .arg(format!(
            "deb [signed-by={}] {} {DEBIAN_SUITE} main",
            apt::KEYRING,
            self.mirror
        ))
        .env("LC_ALL", "C");
        run(&mut cmd, &format!("mmdebstrap of the {image} image"))?;
        let t_tree = secs(t);

        let (bytes, inodes) = tree_usage(&tree)?;
        // Room for ext4 metadata plus a little slack; the image is read-only in the guest.
        let size = (bytes + bytes / 10 + (64 << 20)).div_ceil(4 << 20) * (4 << 20);
        let inodes = inodes + inodes / 5 + 4096;
        let img_path = stage.tmp.join("rootfs.ext4");
        let f = fs::File::create(&img_path).ctx(|| format!("create {}", img_path.display()))?;
        f.set_len(size).ctx(|| format!("size {}", img_path.display()))?;
        drop(f);
        run(
            Command::new(mkfs)
                .args([
                    "-F",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "capsules-base",
                    "-m",
                    "0",
                    "-O",
                    "^has_journal",
                    "-N",
                ])
                .arg(inodes.to_string())
                .arg("-d")
                .arg(&tree)
                .arg(&img_path)
                .env("E2FSPROGS_FAKE_TIME", "0"),
            &format!("mkfs.ext4 -d for the {image} image"),
        )?;
        remove_tree(&tree)?;
        fs::File::open(&img_path)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("sync {}", img_path.display()))?;
        let allocated = fs::metadata(&img_path)
            .ctx(|| format!("stat {}", img_path.display()))?
            .blocks()
            * 512;
        let a = ImageAssets {
            key,
            path: dir.join("rootfs.ext4"),
            size_bytes: size,
            allocated_bytes: allocated,
            packages: versions,
        };
        write_json(&stage.tmp.join("image.json"), &a)?;
        stage.commit()?;
        progress.line(&format!(
            "{image} image ready in {:.1} s (mmdebstrap {t_tree:.1} s; {} MiB, {} MiB allocated)",
            secs(t),
            size >> 20,
            allocated >> 20
        ));
        Ok(a)
    }
}

/// Bytes (rounded up to 4 KiB blocks) and inodes a directory tree needs; hard links count once.
fn tree_usage(root: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", dir.display()))?;
            let meta = entry.metadata().ctx(|| format!("stat {}", entry.path().display()))?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
                continue;
            }
            inodes += 1;
            bytes += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part() {
        let a = key_of(&[("a", "1"), ("b", "2")]);
        assert_eq!(a, key_of(&[("a", "1"), ("b", "2")]));
        assert_ne!(a, key_of(&[("a", "1"), ("b", "3")]));
        // Length-prefixed: moving a boundary changes the key.
        assert_ne!(key_of(&[("ab", "")]), key_of(&[("a", "b")]));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn builder_checks_settings() {
        let err = AssetBuilder::new().with_asset_dir("relative").build().unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = AssetBuilder::new()
            .with_asset_dir("/tmp/x")
            .with_mirror("ftp://nope")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("mirror"), "{err}");
        let a = AssetBuilder::new()
            .with_asset_dir("/tmp/x")
            .with_mirror("http://m.example/debian/")
            .build()
            .unwrap();
        assert_eq!(a.mirror(), "http://m.example/debian");
    }

    #[test]
    fn missing_tool_says_how_to_install() {
        let err = find_tool("definitely-not-a-tool-xyz", "some-package").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`definitely-not-a-tool-xyz` not found; install it with `apt-get install some-package`"
        );
    }

    #[test]
    fn image_names_round_trip() {
        for i in BaseImage::ALL {
            assert_eq!(BaseImage::from_name(i.name()), Some(i));
        }
        assert_eq!(BaseImage::from_name("medium"), None);
    }

    #[test]
    fn staging_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("part");
        assert!(remove_tree(&dir.path().join("absent")).is_ok());
        let s = Staging::new(&dest).unwrap();
        let tmp = s.tmp.clone();
        fs::write(tmp.join("f"), b"x").unwrap();
        drop(s);
        assert!(!tmp.exists() && !dest.exists());
        let s = Staging::new(&dest).unwrap();
        fs::write(s.tmp.join("f"), b"y").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(dest.join("f")).unwrap(), b"y");
    }
}
