//! A capsule's filesystem, in memory: a map from normalised absolute path to node.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use bytes::Bytes;
use capsules_core::backend::{FileKind, FileStat};
use capsules_core::{Error, Result};

pub(crate) const GIB: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir { mode: u32, mtime: i64 },
    File { data: Bytes, mode: u32, mtime: i64 },
    Symlink { target: String, mtime: i64 },
}

impl Node {
    fn size(&self) -> u64 {
        match self {
            Node::File { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// One capsule's files. Paths are absolute and normalised (`/a/b`); relative paths are taken from
/// `/workspace`, the default cwd.
#[derive(Debug, Clone)]
pub(crate) struct Fs {
    nodes: BTreeMap<String, Node>,
    /// Bytes the files may take in total (the capsule's disk).
    pub(crate) limit: u64,
}

/// Normalises `path` against `base` (used for relative paths), refusing what no file system accepts.
pub(crate) fn normalize(base: &str, path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(Error::invalid_input("the path is empty"));
    }
    if path.contains('\0') {
        return Err(Error::invalid_input(format!("path {path:?} contains a NUL byte")));
    }
    let full = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c if c.len() > 255 => {
                return Err(Error::invalid_input(format!(
                    "a path component of {path:?} is {} bytes long; the limit is 255",
                    c.len()
                )));
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn base_name(path: &str) -> &str {
    if path == "/" {
        "/"
    } else {
        path.rsplit('/').next().unwrap_or(path)
    }
}

/// Whether `p` is `dir` or lies below it.
fn within(p: &str, dir: &str) -> bool {
    p == dir || (dir == "/" && p.starts_with('/')) || p.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn not_found(path: &str) -> Error {
    Error::not_found(format!("{path}: no such file or directory"))
}

impl Fs {
    pub(crate) fn new(limit: u64, now: i64) -> Self {
        let mut nodes = BTreeMap::new();
        for d in ["/", "/etc", "/root", "/tmp", "/workspace"] {
            nodes.insert(
                d.to_owned(),
                Node::Dir {
                    mode: 0o755,
                    mtime: now,
                },
            );
        }
        nodes.insert(
            "/etc/os-release".to_owned(),
            Node::File {
                data: Bytes::from_static(b"PRETTY_NAME=\"capsules mock\"\nID=mock\n"),
                mode: 0o644,
                mtime: now,
            },
        );
        Fs { nodes, limit }
    }

    pub(crate) fn used(&self) -> u64 {
        self.nodes.values().map(Node::size).sum()
    }

    pub(crate) fn is_dir(&self, path: &str) -> bool {
        matches!(self.nodes.get(path), Some(Node::Dir { .. }))
    }

    fn space_error(&self, extra: u64) -> Error {
        let limit = if self.limit.is_multiple_of(GIB) {
            format!("{} GiB", self.limit / GIB)
        } else {
            format!("{} bytes", self.limit)
        };
        Error::limit_exceeded(format!(
            "no space left on device: the write needs {extra} more bytes than the capsule's {limit} storage limit allows"
        ))
    }

    /// `mkdir -p`; fails where a component is a file.
    pub(crate) fn mkdir_p(&mut self, path: &str, now: i64) -> Result<()> {
        let mut cur = String::new();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            cur.push('/');
            cur.push_str(c);
            match self.nodes.get(&cur) {
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(Error::conflict(format!("{cur}: not a directory"))),
                None => {
                    self.nodes.insert(
                        cur.clone(),
                        Node::Dir {
                            mode: 0o755,
                            mtime: now,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Replaces or creates a file at once (the mock's writes are atomic by construction).
    pub(crate) fn write(&mut self, path: &str, data: Bytes, mode: Option<u32>, now: i64) -> Result<u64> {
        if path == "/" || self.is_dir(path) {
            return Err(Error::conflict(format!("{path}: is a directory")));
        }
        let old = self.nodes.get(path).map_or(0, Node::size);
        let after = self.used() - old + data.len() as u64;
        if after > self.limit {
            return Err(self.space_error(after - self.limit));
        }
        if let Some(p) = parent(path) {
            self.mkdir_p(p, now)?;
        }
        let mode = mode.unwrap_or(match self.nodes.get(path) {
            Some(Node::File { mode, .. }) => *mode,
            _ => 0o644,
        });
        let n = data.len() as u64;
        self.nodes.insert(
            path.to_owned(),
            Node::File {
                data,
                mode: mode & 0o7777,
                mtime: now,
            },
        );
        Ok(n)
    }

    /// Appends (for the shell's `>>`).
    pub(crate) fn append(&mut self, path: &str, data: &[u8], now: i64) -> Result<u64> {
        let mut v = match self.nodes.get(path) {
            Some(Node::File { data, .. }) => data.to_vec(),
            Some(Node::Dir { .. }) => return Err(Error::conflict(format!("{path}: is a directory"))),
            _ => Vec::new(),
        };
        v.extend_from_slice(data);
        self.write(path, Bytes::from(v), None, now)
    }

    /// A file's contents, following symlinks (a few hops).
    pub(crate) fn read(&self, path: &str) -> Result<Bytes> {
        let mut p = path.to_owned();
        for _ in 0..8 {
            match self.nodes.get(&p) {
                Some(Node::File { data, .. }) => return Ok(data.clone()),
                Some(Node::Dir { .. }) => return Err(Error::invalid_input(format!("{path}: is a directory"))),
                Some(Node::Symlink { target, .. }) => {
                    p = normalize(parent(&p).unwrap_or("/"), target)?;
                }
                None => return Err(not_found(path)),
            }
        }
        Err(Error::invalid_input(format!(
            "{path}: too many levels of symbolic links"
        )))
    }

    fn stat_node(path: &str, node: &Node) -> FileStat {
        let (kind, mode, mtime) = match node {
            Node::Dir { mode, mtime } => (FileKind::Dir, *mode, *mtime),
            Node::File { mode, mtime, .. } => (FileKind::File, *mode, *mtime),
            Node::Symlink { mtime, .. } => (FileKind::Symlink, 0o777, *mtime),
        };
        FileStat {
            name: base_name(path).to_owned(),
            kind,
            size: node.size(),
            mode,
            mtime,
        }
    }

    pub(crate) fn stat(&self, path: &str) -> Result<FileStat> {
        self.nodes
            .get(path)
            .map(|n| Self::stat_node(path, n))
            .ok_or_else(|| not_found(path))
    }

    /// Direct children of `path`, sorted by name.
    pub(crate) fn list(&self, path: &str) -> Result<Vec<FileStat>> {
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => {}
            Some(_) => return Err(Error::invalid_input(format!("{path}: not a directory"))),
            None => return Err(not_found(path)),
        }
        let mut out: Vec<FileStat> = self
            .children(path)
            .filter(|(p, _)| parent(p) == Some(path))
            .map(|(p, n)| Self::stat_node(p, n))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every node strictly below `dir`.
    fn children<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a String, &'a Node)> + 'a {
        self.nodes
            .iter()
            .filter(move |(p, _)| p.as_str() != dir && within(p, dir))
    }

    pub(crate) fn remove(&mut self, path: &str, recursive: bool) -> Result<()> {
        if path == "/" {
            return Err(Error::invalid_input("refusing to remove /"));
        }
        match self.nodes.get(path) {
            None => return Err(not_found(path)),
            Some(Node::Dir { .. }) => {
                let has_children = self.children(path).next().is_some();
                if has_children && !recursive {
                    return Err(Error::conflict(format!("{path}: directory not empty")));
                }
                let doomed: Vec<String> = self.children(path).map(|(p, _)| p.clone()).collect();
                for p in doomed {
                    self.nodes.remove(&p);
                }
            }
            Some(_) => {}
        }
        self.nodes.remove(path);
        Ok(())
    }

    pub(crate) fn rename(&mut self, from: &str, to: &str, now: i64) -> Result<()> {
        if from == "/" || to == "/" {
            return Err(Error::invalid_input("cannot rename /"));
        }
        let Some(node) = self.nodes.get(from).cloned() else {
            return Err(not_found(from));
        };
        if from == to {
            return Ok(());
        }
        if within(to, from) {
            return Err(Error::invalid_input(format!("cannot move {from} into itself ({to})")));
        }
        match parent(to).map(|p| self.nodes.get(p)) {
            Some(Some(Node::Dir { .. })) => {}
            Some(Some(_)) => return Err(Error::conflict(format!("{to}: a parent is not a directory"))),
            _ => return Err(not_found(parent(to).unwrap_or(to))),
        }
        let is_dir = matches!(node, Node::Dir { .. });
        match self.nodes.get(to) {
            None => {}
            Some(Node::Dir { .. }) if is_dir && self.children(to).next().is_some() => {
                return Err(Error::conflict(format!("{to}: directory not empty")));
            }
            Some(Node::Dir { .. }) if is_dir => {}
            Some(Node::Dir { .. }) => return Err(Error::conflict(format!("{to}: is a directory"))),
            Some(_) if is_dir => return Err(Error::conflict(format!("{to}: not a directory"))),
            Some(_) => {}
        }
        let moved: Vec<(String, Node)> = self
            .nodes
            .iter()
            .filter(|(p, _)| within(p, from))
            .map(|(p, n)| (format!("{to}{}", &p[from.len()..]), n.clone()))
            .collect();
        let old: Vec<String> = self.nodes.keys().filter(|p| within(p, from)).cloned().collect();
        for p in old {
            self.nodes.remove(&p);
        }
        self.nodes.remove(to);
        for (p, n) in moved {
            self.nodes.insert(p, n);
        }
        if let Some(Node::Dir { mtime, .. } | Node::File { mtime, .. } | Node::Symlink { mtime, .. }) =
            self.nodes.get_mut(to)
        {
            *mtime = now;
        }
        Ok(())
    }

    /// Unpacks a tar archive into `dest`. All or nothing: the archive is checked (paths, space) first.
    pub(crate) fn unpack(&mut self, dest: &str, archive: &[u8], now: i64) -> Result<()> {
        if let Some(Node::File { .. } | Node::Symlink { .. }) = self.nodes.get(dest) {
            return Err(Error::conflict(format!("{dest}: not a directory")));
        }
        let bad = |e: std::io::Error| Error::invalid_input("the upload is not a valid tar archive").with_source(e);
        let mut staged = self.clone();
        staged.mkdir_p(dest, now)?;
        let mut ar = tar::Archive::new(Cursor::new(archive));
        for entry in ar.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let raw = entry.path_bytes().into_owned();
            let rel = String::from_utf8(raw)
                .map_err(|_| Error::invalid_input("a tar entry's name is not UTF-8, which the mock cannot store"))?;
            if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
                return Err(Error::invalid_input(format!(
                    "tar entry {rel:?} would land outside the destination directory"
                )));
            }
            let path = normalize(dest, &rel)?;
            let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
            let mtime = entry.header().mtime().map_or(now, |m| m as i64);
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    staged.mkdir_p(&path, now)?;
                    staged.nodes.insert(path, Node::Dir { mode, mtime });
                }
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).map_err(bad)?;
                    staged.write(&path, Bytes::from(data), Some(mode), mtime)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(bad)?
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if let Some(p) = parent(&path) {
                        staged.mkdir_p(p, now)?;
                    }
                    staged.nodes.insert(path, Node::Symlink { target, mtime });
                }
                // Metadata entries (pax, GNU long names) are consumed by the tar crate itself.
                t if t.is_pax_global_extensions() || t.is_pax_local_extensions() => {}
                other => {
                    return Err(Error::unsupported(format!(
                        "tar entry {rel:?} has type {other:?}, which the mock does not store"
                    )));
                }
            }
        }
        *self = staged;
        Ok(())
    }

    /// Packs directory `path` into a tar archive, entries relative to it.
    pub(crate) fn pack(&self, path: &str) -> Result<Vec<u8>> {
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => {}
            Some(_) => return Err(Error::invalid_input(format!("{path}: not a directory"))),
            None => return Err(not_found(path)),
        }
        let io = |e: std::io::Error| Error::internal("could not pack the directory").with_source(e);
        let mut b = tar::Builder::new(Vec::new());
        let prefix_len = if path == "/" { 1 } else { path.len() + 1 };
        for (p, node) in self.children(path) {
            let rel = &p[prefix_len..];
            let mut h = tar::Header::new_gnu();
            match node {
                Node::Dir { mode, mtime } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_mtime(*mtime as u64);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{rel}/"), std::io::empty()).map_err(io)?;
                }
                Node::File { data, mode, mtime } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_mtime(*mtime as u64);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, rel, &data[..]).map_err(io)?;
                }
                Node::Symlink { target, mtime } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_mtime(*mtime as u64);
                    h.set_size(0);
                    b.append_link(&mut h, rel, target).map_err(io)?;
                }
            }
        }
        b.into_inner().map_err(io)
    }

    /// Every regular file with its contents (for inspection).
    pub(crate) fn files(&self) -> BTreeMap<String, Bytes> {
        self.nodes
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File { data, .. } => Some((p.clone(), data.clone())),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsules_core::ErrorKind;

    #[test]
    fn normalises_paths() {
        assert_eq!(normalize("/workspace", "a/../b/./c").unwrap(), "/workspace/b/c");
        assert_eq!(normalize("/workspace", "/x//y/").unwrap(), "/x/y");
        assert_eq!(normalize("/workspace", "/..").unwrap(), "/");
        assert!(normalize("/w", "a\0b").is_err());
        assert!(normalize("/w", "").is_err());
    }

    #[test]
    fn rename_moves_a_subtree() {
        let mut fs = Fs::new(GIB, 0);
        fs.write("/workspace/d/a/f", Bytes::from_static(b"x"), None, 0).unwrap();
        fs.rename("/workspace/d", "/workspace/e", 0).unwrap();
        assert_eq!(fs.read("/workspace/e/a/f").unwrap(), Bytes::from_static(b"x"));
        assert_eq!(fs.stat("/workspace/d").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(
            fs.rename("/workspace/e", "/workspace/e/a/z", 0).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn remove_needs_recursive_for_a_full_directory() {
        let mut fs = Fs::new(GIB, 0);
        fs.write("/workspace/d/f", Bytes::from_static(b"x"), None, 0).unwrap();
        // `/workspace/dd` must survive removing `/workspace/d` (prefix, not subtree).
        fs.write("/workspace/dd", Bytes::from_static(b"y"), None, 0).unwrap();
        assert_eq!(
            fs.remove("/workspace/d", false).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        fs.remove("/workspace/d", true).unwrap();
        assert!(fs.read("/workspace/dd").is_ok());
    }

    #[test]
    fn writes_past_the_limit_fail() {
        let mut fs = Fs::new(0, 0);
        fs.limit = fs.used() + 100;
        fs.write("/a", Bytes::from(vec![0; 60]), None, 0).unwrap();
        let e = fs.write("/b", Bytes::from(vec![0; 60]), None, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LimitExceeded);
        assert!(e.message().contains("storage limit"), "{e}");
        // Replacing a file counts only the difference.
        fs.write("/a", Bytes::from(vec![0; 90]), None, 0).unwrap();
    }

    #[test]
    fn tar_round_trip() {
        let mut fs = Fs::new(GIB, 0);
        fs.write("/workspace/t/a.txt", Bytes::from_static(b"A"), Some(0o755), 0)
            .unwrap();
        fs.mkdir_p("/workspace/t/empty", 0).unwrap();
        let ar = fs.pack("/workspace/t").unwrap();
        let mut other = Fs::new(GIB, 0);
        other.unpack("/workspace/u", &ar, 0).unwrap();
        assert_eq!(other.read("/workspace/u/a.txt").unwrap(), Bytes::from_static(b"A"));
        assert_eq!(other.stat("/workspace/u/a.txt").unwrap().mode, 0o755);
        assert!(other.is_dir("/workspace/u/empty"));
    }
}
