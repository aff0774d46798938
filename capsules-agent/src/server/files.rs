//! Files: streamed read, atomic streamed write, metadata operations, tar upload/download.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Agent, io_reply, reply};
use crate::mux::{CHUNK, Channel, Incoming};
use crate::proto::{ErrorKind, FileStat, FileType, Reply};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn stat_of(name: String, m: &std::fs::Metadata) -> FileStat {
    let ft = m.file_type();
    let file_type = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    FileStat {
        name,
        file_type,
        size: m.len(),
        mode: m.permissions().mode() & 0o7777,
        mtime: m.mtime(),
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.to_string_lossy().into_owned())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Stream a file.
pub async fn read(agent: &Arc<Agent>, ch: Channel, path: &str) {
    let p = agent.path(path);
    let mut f = match tokio::fs::File::open(&p).await {
        Ok(f) => f,
        Err(e) => {
            let _ = reply(&ch, io_reply("cannot open", &p, &e)).await;
            return;
        }
    };
    let size = match f.metadata().await {
        Ok(m) if m.is_dir() => {
            let _ = reply(
                &ch,
                Reply::error(ErrorKind::InvalidInput, format!("{} is a directory", p.display())),
            )
            .await;
            return;
        }
        Ok(m) => m.len(),
        Err(e) => {
            let _ = reply(&ch, io_reply("cannot stat", &p, &e)).await;
            return;
        }
    };
    if reply(&ch, Reply::Opened { size }).await.is_err() {
        return;
    }
    let mut total = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        match f.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if ch.sender().data(buf.freeze()).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = reply(&ch, io_reply("read failed on", &p, &e)).await;
                return;
            }
        }
    }
    let _ = reply(&ch, Reply::Done { bytes: total }).await;
}

/// Write a file atomically: temp file in the same directory, fsync, rename, fsync directory.
pub async fn write(agent: &Arc<Agent>, mut ch: Channel, path: &str, mode: Option<u32>) {
    let p = agent.path(path);
    let (Some(dir), Some(name)) = (p.parent().map(Path::to_path_buf), p.file_name()) else {
        let _ = reply(
            &ch,
            Reply::error(ErrorKind::InvalidInput, format!("{} is not a file path", p.display())),
        )
        .await;
        return;
    };
    let mode = mode
        .or_else(|| std::fs::metadata(&p).ok().map(|m| m.permissions().mode() & 0o7777))
        .unwrap_or(0o644);
    let tmp = dir.join(format!(
        ".{}.capsules-tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let opened = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .await;
    let mut f = match opened {
        Ok(f) => f,
        Err(e) => {
            let what = if dir.is_dir() {
                "cannot create a file in"
            } else {
                "parent directory missing:"
            };
            let _ = reply(&ch, io_reply(what, &dir, &e)).await;
            return;
        }
    };
    let mut total = 0u64;
    let result: Result<(), Reply> = async {
        loop {
            match ch.recv().await {
                Some(Incoming::Data(b)) => {
                    total += b.len() as u64;
                    f.write_all(&b).await.map_err(|e| io_reply("write failed on", &p, &e))?;
                }
                Some(Incoming::Eof) => break,
                Some(_) => {}
                None => return Err(Reply::Ok), // abandoned: no reply possible
            }
        }
        f.flush().await.map_err(|e| io_reply("write failed on", &p, &e))?;
        f.sync_all().await.map_err(|e| io_reply("fsync failed on", &p, &e))?;
        // Set the mode explicitly: the umask applied at create.
        let _ = tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).await;
        tokio::fs::rename(&tmp, &p)
            .await
            .map_err(|e| io_reply("rename onto", &p, &e))?;
        if let Ok(d) = tokio::fs::File::open(&dir).await {
            let _ = d.sync_all().await;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let _ = reply(&ch, Reply::Done { bytes: total }).await;
        }
        Err(r) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            if r != Reply::Ok {
                let _ = reply(&ch, r).await;
            }
        }
    }
}

/// List a directory.
pub async fn list(agent: &Arc<Agent>, ch: Channel, path: &str) {
    let p = agent.path(path);
    let r = blocking(move || -> Reply {
        let rd = match std::fs::read_dir(&p) {
            Ok(r) => r,
            Err(e) => return io_reply("cannot list", &p, &e),
        };
        let mut entries = Vec::new();
        for e in rd.flatten() {
            if let Ok(m) = e.path().symlink_metadata() {
                entries.push(stat_of(e.file_name().to_string_lossy().into_owned(), &m));
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Reply::Entries { entries }
    })
    .await;
    let _ = reply(&ch, r.unwrap_or_else(internal)).await;
}

fn internal() -> Reply {
    Reply::error(ErrorKind::Internal, "file task failed")
}

/// Stat a path (not following symlinks).
pub async fn stat(agent: &Arc<Agent>, ch: Channel, path: &str) {
    let p = agent.path(path);
    let r = match tokio::fs::symlink_metadata(&p).await {
        Ok(m) => Reply::Stat(stat_of(name_of(&p), &m)),
        Err(e) => io_reply("cannot stat", &p, &e),
    };
    let _ = reply(&ch, r).await;
}

/// mkdir -p.
pub async fn mkdir(agent: &Arc<Agent>, ch: Channel, path: &str) {
    let p = agent.path(path);
    let r = match tokio::fs::create_dir_all(&p).await {
        Ok(()) => Reply::Ok,
        Err(e) => io_reply("cannot create directory", &p, &e),
    };
    let _ = reply(&ch, r).await;
}

/// Remove a file, an empty directory, or (recursive) a tree.
pub async fn remove(agent: &Arc<Agent>, ch: Channel, path: &str, recursive: bool) {
    let p = agent.path(path);
    let r = match tokio::fs::symlink_metadata(&p).await {
        Err(e) => io_reply("cannot remove", &p, &e),
        Ok(m) => {
            let res = if !m.is_dir() {
                tokio::fs::remove_file(&p).await
            } else if recursive {
                tokio::fs::remove_dir_all(&p).await
            } else {
                tokio::fs::remove_dir(&p).await
            };
            match res {
                Ok(()) => Reply::Ok,
                Err(e) => io_reply("cannot remove", &p, &e),
            }
        }
    };
    let _ = reply(&ch, r).await;
}

/// Rename a path.
pub async fn rename(agent: &Arc<Agent>, ch: Channel, from: &str, to: &str) {
    let (f, t) = (agent.path(from), agent.path(to));
    let r = match tokio::fs::rename(&f, &t).await {
        Ok(()) => Reply::Ok,
        Err(e) => io_reply(&format!("cannot rename to {}:", t.display()), &f, &e),
    };
    let _ = reply(&ch, r).await;
}

/// Blocking reader over chunks from an async channel.
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Unpack the incoming tar stream into `dest` (created if missing).
pub async fn upload_tar(agent: &Arc<Agent>, mut ch: Channel, dest: &str) {
    let d = agent.path(dest);
    if let Err(e) = tokio::fs::create_dir_all(&d).await {
        let _ = reply(&ch, io_reply("cannot create directory", &d, &e)).await;
        return;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let d2 = d.clone();
    let task = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut ar = tar::Archive::new(ChunkReader { rx, cur: Bytes::new() });
        ar.set_preserve_permissions(true);
        ar.set_preserve_mtime(true);
        ar.set_overwrite(true);
        ar.set_unpack_xattrs(false);
        let mut n = 0;
        for entry in ar.entries()? {
            let mut entry = entry?;
            n += entry.size();
            entry.unpack_in(&d2)?;
        }
        Ok(n)
    });
    let mut tx = Some(tx);
    loop {
        match ch.recv().await {
            Some(Incoming::Data(b)) => {
                let ok = match &tx {
                    Some(t) => t.send(b).await.is_ok(),
                    None => false,
                };
                if !ok {
                    break; // the unpacker stopped (error); its result says why
                }
            }
            Some(Incoming::Eof) => break,
            Some(_) => {}
            None => return,
        }
    }
    tx.take();
    let r = match task.await {
        Ok(Ok(n)) => Reply::Done { bytes: n },
        Ok(Err(e)) => io_reply("cannot unpack the tar stream into", &d, &e),
        Err(_) => internal(),
    };
    let _ = reply(&ch, r).await;
}

/// Blocking writer that forwards chunks to an async channel.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = self.buf.split().freeze();
            self.tx
                .blocking_send(b)
                .map_err(|_| std::io::Error::other("download cancelled"))?;
        }
        Ok(())
    }
}

/// Pack a directory into a tar stream.
pub async fn download_tar(agent: &Arc<Agent>, ch: Channel, path: &str) {
    let p: PathBuf = agent.path(path);
    match tokio::fs::metadata(&p).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            let _ = reply(
                &ch,
                Reply::error(ErrorKind::InvalidInput, format!("{} is not a directory", p.display())),
            )
            .await;
            return;
        }
        Err(e) => {
            let _ = reply(&ch, io_reply("cannot read", &p, &e)).await;
            return;
        }
    }
    if reply(&ch, Reply::Opened { size: 0 }).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let p2 = p.clone();
    let task = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(ChunkWriter {
            tx,
            buf: BytesMut::new(),
        });
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", &p2)?;
        let mut w = b.into_inner()?;
        w.flush()
    });
    let mut total = 0u64;
    while let Some(b) = rx.recv().await {
        total += b.len() as u64;
        if ch.sender().data(b).await.is_err() {
            return; // dropping rx stops the packer
        }
    }
    let r = match task.await {
        Ok(Ok(())) => Reply::Done { bytes: total },
        Ok(Err(e)) => io_reply("cannot pack", &p, &e),
        Err(_) => internal(),
    };
    let _ = reply(&ch, r).await;
}
