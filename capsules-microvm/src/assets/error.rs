//! The asset builder's error type and the helpers that run external tools.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Why building or loading the guest assets failed. Each message says what failed; where the fix
/// is known (a missing tool) it says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssetError {
    /// A host tool the asset builder runs is not installed.
    #[error("`{tool}` not found; install it with `apt-get install {package}`")]
    MissingTool {
        /// The program that was looked for on `PATH` (and in `/usr/sbin`, `/sbin`).
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// An external command ran but failed.
    #[error("{what} failed ({status}): {output}")]
    Command {
        /// What the command was for.
        what: String,
        /// How it ended (exit code or signal).
        status: String,
        /// The last lines of its output (stderr, then stdout), which usually say why.
        output: String,
    },
    /// The archive serves a kernel outside the series Capsules is pinned to.
    #[error(
        "the Debian archive serves kernel {found} for linux-image-cloud-amd64 in bookworm-backports, not the \
         pinned {expected} series; update Capsules (its guest support is tested against {expected})"
    )]
    KernelSeries {
        /// The versioned package (or version) found.
        found: String,
        /// The pinned series, e.g. `6.12`.
        expected: String,
    },
    /// An input or an intermediate file is not what the builder expects.
    #[error("{0}")]
    Invalid(String),
    /// The Debian archive could not be reached and nothing suitable is cached.
    #[error(
        "cannot reach the Debian mirror {mirror} and no cached assets match; check the network or the mirror setting"
    )]
    Offline {
        /// The mirror URL that was tried.
        mirror: String,
        /// What the fetch reported.
        #[source]
        source: Box<AssetError>,
    },
    /// A filesystem operation failed.
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Result alias for the asset builder.
pub type Result<T, E = AssetError> = std::result::Result<T, E>;

/// Attaches "what was being done" to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AssetError::Io { what: what(), source })
    }
}

/// Finds `tool` on `PATH` (plus the sbin directories, which a non-root `PATH` often lacks).
pub(crate) fn find_tool(tool: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    for dir in std::env::split_paths(&path).chain(extra) {
        let candidate = dir.join(tool);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(AssetError::MissingTool {
        tool: tool.to_owned(),
        package: package.to_owned(),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `cmd` to completion with captured output; a non-zero exit becomes [`AssetError::Command`].
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .ctx(|| format!("start {what} ({:?})", cmd.get_program()))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(AssetError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: tail(&out.stderr, &out.stdout),
        })
    }
}

/// The last lines of a command's output: stderr first (where tools say why), then stdout.
pub(crate) fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    const LINES: usize = 15;
    let mut s = String::new();
    for stream in [stderr, stdout] {
        let text = String::from_utf8_lossy(stream);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for l in &lines[lines.len().saturating_sub(LINES)..] {
            let _ = writeln!(s, "{l}");
        }
    }
    if s.is_empty() {
        s.push_str("(no output)");
    }
    s.trim_end().to_owned()
}
