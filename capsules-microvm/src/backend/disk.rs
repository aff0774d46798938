//! Data disks (sparse ext4 files formatted on the host) and free-space checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsules_core::{Error, Result};

use super::Detail;

/// Finds `mkfs.ext4` on PATH or in the sbin directories (which root's PATH may lack).
fn mkfs_ext4() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .into_iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// Creates a sparse file of `gib` GiB at `path` and formats it as ext4 (the guest only mounts it).
/// Writes past its size fail with ENOSPC inside the guest; the host is unaffected.
pub(crate) async fn create_data_disk(path: &Path, gib: u32, owner: Option<(u32, u32)>) -> Result<()> {
    let fail = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        Error::internal(format!("could not create the data disk: {what}")).with_source(e)
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| fail("the disk file could not be created", e.into()))?;
    file.set_len(u64::from(gib) << 30)
        .map_err(|e| fail("the disk file could not be sized", e.into()))?;
    drop(file);
    let mkfs =
        mkfs_ext4().ok_or_else(|| Error::unsupported("mkfs.ext4 is not installed on the host; install e2fsprogs"))?;
    let mut cmd = tokio::process::Command::new(mkfs);
    cmd.args(["-q", "-F", "-L", "capsule-data"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| Error::unavailable("mkfs.ext4 did not finish formatting the data disk within 120 s"))?
        .map_err(|e| fail("mkfs.ext4 could not be run", e.into()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(fail("mkfs.ext4 failed", Box::new(Detail::msg(stderr))));
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| fail("the disk could not be given to the VMM user", e.into()))?;
    }
    Ok(())
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
pub(crate) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}
