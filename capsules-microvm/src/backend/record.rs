//! The durable per-capsule record (`capsule.json`), the snapshot completion marker, and the small
//! fsync helpers that make each step of sleep/wake durable before the next one starts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use capsules_core::backend::CapsuleSpec;
use capsules_core::types::{CapsuleId, CapsuleName, Image, NetworkPolicy, Size, TeamId};
use serde::{Deserialize, Serialize};

use super::adapters::{BootAssets, NetAttachment};

/// Version of the record format.
pub const RECORD_VERSION: u32 = 1;

/// File names inside a capsule directory.
pub(crate) const RECORD_FILE: &str = "capsule.json";
pub(crate) const DATA_DISK: &str = "data.ext4";
pub(crate) const VM_DIR: &str = "vm";
pub(crate) const SERIAL_LOG: &str = "serial.log";
pub(crate) const SNAPSHOT_DIR: &str = "snapshot";
pub(crate) const SNAPSHOT_TMP: &str = "snapshot.tmp";
pub(crate) const SNAPSHOT_CONSUMED: &str = "snapshot.consumed";
pub(crate) const SNAPSHOT_MARKER: &str = "snapshot.complete";

/// What the record says the capsule is doing. Only `Sleeping` (with the marker) makes a snapshot
/// restorable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Being created (a crash here leaves it failed, disk kept, or adopted if its VMM lives).
    Creating,
    /// A VMM process runs (or ran) it.
    Running,
    /// Asleep on the snapshot in `snapshot/` (valid only with `snapshot.complete`).
    Sleeping,
    /// Lost its VM without a valid snapshot; the disk is kept.
    Failed,
    /// Being deleted; recovery finishes the job.
    Terminating,
}

/// The durable record of one capsule (`<state>/capsules/<id>/capsule.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Capsule id (also the directory name).
    pub id: CapsuleId,
    /// Capsule name (the guest hostname).
    pub name: CapsuleName,
    /// Owning team.
    pub team: TeamId,
    /// vCPUs and memory.
    pub size: Size,
    /// Base image name.
    pub image: Image,
    /// Data disk size in GiB.
    pub disk_gib: u32,
    /// Current network policy.
    pub network: NetworkPolicy,
    /// Assets pinned at create (the base image is pinned by its content hash).
    pub assets: BootAssets,
    /// Host network objects, when the backend has a network layer.
    pub net: Option<NetAttachment>,
    /// Durable state.
    pub state: RecordState,
    /// Why it failed, when `state` is `Failed`.
    #[serde(default)]
    pub failed_reason: Option<String>,
    /// The last agent session epoch handed out; the next session uses `epoch + 1`.
    pub epoch: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

impl CapsuleRecord {
    /// A new record in state `Creating`.
    pub fn new(spec: &CapsuleSpec, assets: BootAssets, created_at_ms: i64) -> Self {
        CapsuleRecord {
            version: RECORD_VERSION,
            id: spec.id.clone(),
            name: spec.name.clone(),
            team: spec.team.clone(),
            size: spec.size,
            image: spec.image,
            disk_gib: spec.disk_gib,
            network: spec.network.clone(),
            assets,
            net: None,
            state: RecordState::Creating,
            failed_reason: None,
            epoch: 0,
            created_at_ms,
        }
    }

    /// Whether this record describes the same capsule as `spec` (for an idempotent create).
    pub fn matches(&self, spec: &CapsuleSpec) -> bool {
        self.id == spec.id
            && self.name == spec.name
            && self.team == spec.team
            && self.size == spec.size
            && self.image == spec.image
            && self.disk_gib == spec.disk_gib
    }
}

/// Paths of one capsule's directory.
#[derive(Debug, Clone)]
pub struct CapsulePaths {
    /// `<state>/capsules/<id>`.
    pub dir: PathBuf,
}

impl CapsulePaths {
    pub(crate) fn new(root: &Path, id: &CapsuleId) -> Self {
        CapsulePaths {
            dir: root.join(id.as_str()),
        }
    }
    pub(crate) fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }
    pub(crate) fn data_disk(&self) -> PathBuf {
        self.dir.join(DATA_DISK)
    }
    pub(crate) fn vm_dir(&self) -> PathBuf {
        self.dir.join(VM_DIR)
    }
    pub(crate) fn serial_log(&self) -> PathBuf {
        self.vm_dir().join(SERIAL_LOG)
    }
    pub(crate) fn snapshot(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }
    pub(crate) fn snapshot_tmp(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_TMP)
    }
    pub(crate) fn snapshot_consumed(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_CONSUMED)
    }
    pub(crate) fn marker(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_MARKER)
    }
    /// A snapshot is restorable only with its completion marker (and a `sleeping` record).
    pub(crate) fn has_valid_snapshot(&self) -> bool {
        self.marker().is_file() && self.snapshot().is_dir()
    }
}

/// Fsyncs a directory (so a rename or unlink in it is durable).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_durable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Removes a file durably (no error if it is already gone).
pub(crate) fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Fsyncs every regular file under `dir` and the directories themselves.
pub(crate) fn fsync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            fsync_tree(&entry.path())?;
        } else if ty.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    fsync_dir(dir)
}

/// Removes a directory tree if it exists.
pub(crate) fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads a record.
pub(crate) fn read_record(path: &Path) -> io::Result<CapsuleRecord> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// Writes a record durably.
pub(crate) fn write_record(paths: &CapsulePaths, record: &CapsuleRecord) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    write_durable(&paths.record(), &json)
}

/// Reads at most the last `max` bytes of a file (empty when it does not exist).
pub(crate) fn tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut out = Vec::with_capacity(len.min(max) as usize);
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_write_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_durable(&p, b"hello world").unwrap();
        write_durable(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(tail(&p, 3).unwrap(), b"ond");
        assert_eq!(tail(&dir.path().join("none"), 3).unwrap(), b"");
        remove_durable(&p).unwrap();
        remove_durable(&p).unwrap();
        assert!(!p.exists());
    }
}
