//! `capsule cp`: local ↔ capsule. `NAME:/path` is a capsule path (the part before `:` has no `/`).

use std::path::{Path, PathBuf};

use capsules_client::Client;
use capsules_core::backend::FileKind;
use capsules_core::{Error, Result};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// `NAME:/path` → (NAME, /path); anything else is local.
pub fn remote(s: &str) -> Option<(&str, &str)> {
    let (name, path) = s.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && path.starts_with('/')).then_some((name, path))
}

pub async fn run(client: &Client, src: &str, dst: &str) -> Result<String> {
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => upload(client, Path::new(src), name, path).await,
        (Some((name, path)), None) => download(client, name, path, Path::new(dst)).await,
        (Some(_), Some(_)) => Err(Error::invalid_input(
            "copying between capsules is not supported; copy to a local path first",
        )),
        (None, None) => Err(match [src, dst].into_iter().find_map(relative_remote) {
            Some((name, path)) => Error::invalid_input(format!(
                "the path inside capsule {name} must be absolute: {name}:/{path} (for example \
                 {name}:/workspace), not {name}:{path}"
            )),
            None => Error::invalid_input("one side of cp must be a capsule path like NAME:/workspace"),
        }),
    }
}

/// `NAME:path` with a relative (or empty) path: what the user meant as a capsule path.
fn relative_remote(s: &str) -> Option<(&str, &str)> {
    let (name, path) = s.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && !path.starts_with('/')).then_some((name, path))
}

async fn upload(client: &Client, local: &Path, name: &str, path: &str) -> Result<String> {
    let meta = tokio::fs::metadata(local)
        .await
        .map_err(|e| Error::invalid_input(format!("cannot read {}", local.display())).with_source(e))?;
    let h = client.capsule(name)?;
    if meta.is_dir() {
        h.upload_dir(local, path).await?;
        Ok(format!("copied the contents of {} to {name}:{path}", local.display()))
    } else {
        let path = if path.ends_with('/') {
            let file = local
                .file_name()
                .ok_or_else(|| Error::invalid_input(format!("{} has no file name", local.display())))?;
            format!("{path}{}", file.to_string_lossy())
        } else {
            path.to_owned()
        };
        let f = tokio::fs::File::open(local)
            .await
            .map_err(|e| Error::invalid_input(format!("cannot open {}", local.display())).with_source(e))?;
        let n = h.write_file_from(&path, f).await?;
        Ok(format!("copied {} ({n} bytes) to {name}:{path}", local.display()))
    }
}

fn split(path: &str) -> (&str, &str) {
    let p = path.trim_end_matches('/');
    match p.rsplit_once('/') {
        Some(("", base)) => ("/", base),
        Some((dir, base)) => (dir, base),
        None => ("/", p),
    }
}

async fn download(client: &Client, name: &str, path: &str, local: &Path) -> Result<String> {
    let h = client.capsule(name)?;
    let (parent, base) = split(path);
    let is_dir = base.is_empty()
        || h.list_dir(parent)
            .await?
            .iter()
            .find(|e| e.name == base)
            .ok_or_else(|| Error::not_found(format!("{name}:{path} does not exist")))?
            .kind
            == FileKind::Dir;
    if is_dir {
        let mut s = h.download_tar(path).await?;
        let mut tar = Vec::new();
        while let Some(c) = s.next().await {
            tar.extend_from_slice(&c?);
        }
        let dest = local.to_owned();
        let d2 = dest.clone();
        tokio::task::spawn_blocking(move || unpack(&tar, &d2))
            .await
            .map_err(|e| Error::internal("unpacking panicked").with_source(e))??;
        Ok(format!("copied {name}:{path} into {}", dest.display()))
    } else {
        let dest: PathBuf = if local.is_dir() {
            local.join(base)
        } else {
            local.to_owned()
        };
        let mut f = tokio::fs::File::create(&dest)
            .await
            .map_err(|e| Error::invalid_input(format!("cannot create {}", dest.display())).with_source(e))?;
        let mut s = h.read_file_stream(path).await?;
        let mut n = 0u64;
        while let Some(c) = s.next().await {
            let c = c?;
            n += c.len() as u64;
            f.write_all(&c)
                .await
                .map_err(|e| Error::internal(format!("cannot write {}", dest.display())).with_source(e))?;
        }
        f.flush()
            .await
            .map_err(|e| Error::internal(format!("cannot write {}", dest.display())).with_source(e))?;
        Ok(format!("copied {name}:{path} ({n} bytes) to {}", dest.display()))
    }
}

fn unpack(tar: &[u8], dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)
        .map_err(|e| Error::invalid_input(format!("cannot create {}", dest.display())).with_source(e))?;
    tar::Archive::new(tar)
        .unpack(dest)
        .map_err(|e| Error::internal(format!("could not unpack into {}", dest.display())).with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(remote("agent-pr-482:/workspace"), Some(("agent-pr-482", "/workspace")));
        assert_eq!(remote("./examples/quickstart/project"), None);
        assert_eq!(remote("./a:b/c"), None);
        assert_eq!(remote("x:relative"), None);
        assert_eq!(split("/workspace/a.txt"), ("/workspace", "a.txt"));
        assert_eq!(split("/workspace/"), ("/", "workspace"));
    }
}
