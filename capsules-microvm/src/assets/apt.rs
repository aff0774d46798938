//! A private apt configuration (own sources list, state and cache) so fetching the kernel and
//! reading package versions never touches the system's apt config or lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::error::{IoContext, Result, find_tool, run};

/// The keyring Debian's archive is signed with (package `debian-archive-keyring`).
pub(crate) const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// One private apt root: `<dir>/etc/sources.list`, `<dir>/state`, `<dir>/cache`.
#[derive(Debug)]
pub(crate) struct PrivateApt {
    dir: PathBuf,
    apt_get: PathBuf,
    apt_cache: PathBuf,
}

impl PrivateApt {
    /// Prepares the directories and writes a sources list for `suite` from `mirror`.
    pub(crate) fn new(dir: &Path, mirror: &str, suite: &str) -> Result<Self> {
        let apt_get = find_tool("apt-get", "apt")?;
        let apt_cache = find_tool("apt-cache", "apt")?;
        if !Path::new(KEYRING).exists() {
            return Err(super::AssetError::MissingTool {
                tool: KEYRING.into(),
                package: "debian-archive-keyring".into(),
            });
        }
        for sub in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "etc/apt.conf.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).ctx(|| format!("create {}", d.display()))?;
        }
        let list = format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n");
        let path = dir.join("etc/sources.list");
        std::fs::write(&path, list).ctx(|| format!("write {}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            apt_get,
            apt_cache,
        })
    }

    fn opts(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::State={d}/state"),
            format!("Dir::Cache={d}/cache"),
            format!("Dir::Etc::SourceList={d}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={d}/etc/sources.list.d"),
            format!("Dir::Etc::Preferences={d}/etc/preferences"),
            format!("Dir::Etc::PreferencesParts={d}/etc/preferences.d"),
            format!("Dir::Etc::Parts={d}/etc/apt.conf.d"),
            // Resolve against no installed packages: the host's dpkg status is irrelevant here.
            format!("Dir::State::status={d}/state/status"),
            "APT::Architecture=amd64".into(),
            "APT::Architectures=amd64".into(),
            // Files land in our own (root-owned) directories; the _apt sandbox user cannot write there.
            "APT::Sandbox::User=root".into(),
            "Debug::NoLocking=1".into(),
            "Acquire::Languages=none".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect()
    }

    fn apt_get(&self) -> Command {
        let mut c = Command::new(&self.apt_get);
        c.args(self.opts()).env("LC_ALL", "C");
        c
    }

    fn apt_cache(&self) -> Command {
        let mut c = Command::new(&self.apt_cache);
        c.args(self.opts()).env("LC_ALL", "C");
        c
    }

    /// `apt-get update` on the private lists, unless the last successful one is younger than
    /// `max_age`. Returns whether it ran.
    pub(crate) fn update(&self, max_age: Duration) -> Result<bool> {
        let status = self.dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "").ctx(|| format!("create {}", status.display()))?;
        }
        let stamp = self.dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < max_age);
        if fresh {
            return Ok(false);
        }
        run(self.apt_get().arg("update").arg("-q"), "apt-get update (private lists)")?;
        // New lists: what we resolved from the old ones is stale.
        let _ = std::fs::remove_file(self.show_cache());
        std::fs::write(&stamp, "").ctx(|| format!("write {}", stamp.display()))?;
        Ok(true)
    }

    fn show_cache(&self) -> PathBuf {
        self.dir.join("resolved.json")
    }

    /// The candidate version and `Depends` of each package, from the private lists. Answers are
    /// remembered until the lists are next updated (`apt-cache` takes seconds per call on
    /// bookworm's lists).
    pub(crate) fn show(&self, packages: &[&str]) -> Result<BTreeMap<String, Stanza>> {
        let cache_path = self.show_cache();
        let mut cache: BTreeMap<String, Stanza> = std::fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let missing: Vec<&str> = packages.iter().copied().filter(|p| !cache.contains_key(*p)).collect();
        if !missing.is_empty() {
            let out = run(
                self.apt_cache().arg("show").arg("--no-all-versions").args(&missing),
                &format!("apt-cache show {}", missing.join(" ")),
            )?;
            cache.extend(parse_stanzas(&String::from_utf8_lossy(&out.stdout)));
            let json = serde_json::to_vec(&cache).expect("stanzas serialize");
            let tmp = cache_path.with_extension("json.tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, &cache_path);
            }
        }
        Ok(packages
            .iter()
            .filter_map(|p| cache.get(*p).map(|st| ((*p).to_owned(), st.clone())))
            .collect())
    }

    /// Downloads `package=version` into `dest` and returns the `.deb` path.
    pub(crate) fn download(&self, package: &str, version: &str, dest: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dest).ctx(|| format!("create {}", dest.display()))?;
        run(
            self.apt_get()
                .current_dir(dest)
                .arg("download")
                .arg("-q")
                .arg(format!("{package}={version}")),
            &format!("apt-get download {package}={version}"),
        )?;
        for entry in std::fs::read_dir(dest).ctx(|| format!("list {}", dest.display()))? {
            let path = entry.ctx(|| format!("list {}", dest.display()))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                return Ok(path);
            }
        }
        Err(super::AssetError::Invalid(format!(
            "apt-get download {package} reported success but no .deb is in {}",
            dest.display()
        )))
    }
}

/// One package stanza (the fields we use).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stanza {
    pub(crate) version: String,
    pub(crate) depends: String,
}

fn parse_stanzas(text: &str) -> BTreeMap<String, Stanza> {
    let mut map = BTreeMap::new();
    for block in text.split("\n\n") {
        let mut name = None;
        let mut st = Stanza::default();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                st.version = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("Depends: ") {
                st.depends = v.trim().to_owned();
            }
        }
        if let Some(n) = name {
            map.entry(n).or_insert(st);
        }
    }
    map
}

/// The Debian mirror the system's apt uses for bookworm (deb822 `.sources` files first, then
/// `sources.list`), else `http://deb.debian.org/debian`.
pub(crate) fn system_mirror() -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    files.sort();
    for f in &files {
        if let Some(m) = std::fs::read_to_string(f).ok().and_then(|t| mirror_from_deb822(&t)) {
            return m;
        }
    }
    if let Some(m) = std::fs::read_to_string("/etc/apt/sources.list")
        .ok()
        .and_then(|t| mirror_from_one_line(&t))
    {
        return m;
    }
    "http://deb.debian.org/debian".into()
}

fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(':')))
                .map(str::trim)
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let bookworm = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == "bookworm"));
        if enabled
            && deb
            && bookworm
            && let Some(uri) = field("URIs").and_then(|u| u.split_whitespace().next())
        {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

fn mirror_from_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        // Skip `[options]`.
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').map(|(_, r)| r.trim_start())?,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if suite == "bookworm" {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_mirror() {
        let t = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\n\
                 Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                 Components: main\n";
        assert_eq!(mirror_from_deb822(t).as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_deb822("Types: deb\nURIs: http://x\nSuites: trixie\n"), None);
    }

    #[test]
    fn one_line_mirror() {
        let t = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(mirror_from_one_line(t).as_deref(), Some("http://m.example/debian"));
        assert_eq!(
            mirror_from_one_line("deb http://s.example bookworm-security main"),
            None
        );
    }

    #[test]
    fn stanzas() {
        let t =
            "Package: a\nVersion: 1.0\nDepends: b (>= 2), c\nDescription: x\n continued\n\nPackage: b\nVersion: 2\n";
        let m = parse_stanzas(t);
        assert_eq!(m["a"].version, "1.0");
        assert_eq!(m["a"].depends, "b (>= 2), c");
        assert_eq!(m["b"].version, "2");
    }
}
