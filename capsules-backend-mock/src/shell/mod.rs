//! The mock's small command interpreter: a handful of commands and a tiny `sh -c`.
//!
//! Commands: `true`, `false`, `:`, `echo [-n]`, `printf`, `cat [FILE|-]...`, `head -c N [FILE]`,
//! `sleep N[smhd]`, `pwd`, `env [NAME=V]... [CMD]`, `sha256sum [FILE|-]...`, `stty size`, and
//! `sh`/`bash -c SCRIPT [ARG0 ARGS...]`. The shell knows words with `'…'`, `"…"` and `\` quoting,
//! `$NAME`, `${NAME}`, `$?`, `$0`-`$9`, `$#`, `$@`; `NAME=value` assignments; `;`, newlines, `&&`,
//! `||`, `&` (background jobs of the same process group, waited for at the end like held pipes);
//! redirections `>`, `>>`, `<`, `2>`, `2>>`, `>&2`, `1>&2`, `2>&1`; builtins `exit`, `cd`, `export`.
//! Anything else (pipes, `$(…)`, `if`/`for`…) is refused with exit code 2 and says so; an unknown
//! command is exit code 127 with "command not found", like a shell.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsules_core::Clock;
use capsules_core::backend::ByteStream;
use capsules_core::types::CapsuleId;
use tokio::sync::watch;

use crate::fs::{Fs, normalize};
use crate::proc::{Life, Sink, Stream};
use crate::script::Scripts;

mod commands;
mod parse;
mod sh;

pub(crate) use commands::run_argv;
pub(crate) use sh::run_line;

/// Output collected for a redirection to a file.
type Buf = Arc<Mutex<Vec<u8>>>;

/// Where one output file descriptor points.
#[derive(Clone)]
pub(crate) enum Dest {
    Stdout,
    Stderr,
    Buf(Arc<Mutex<Vec<u8>>>),
    Null,
}

/// The context a command runs in.
pub(crate) struct Cx {
    pub id: CapsuleId,
    pub fs: Arc<Mutex<Fs>>,
    pub clock: Arc<dyn Clock>,
    pub scripts: Arc<Scripts>,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<ByteStream>,
    pub sink: Arc<dyn Sink>,
    pub out: Dest,
    pub err: Dest,
    pub life: watch::Receiver<Life>,
    /// (rows, cols) when running on a terminal.
    pub tty: Option<Arc<Mutex<(u16, u16)>>>,
}

impl Cx {
    /// A child context (a new process): same files and output, own copies of env and cwd, the
    /// parent's stdin handed over.
    pub(crate) fn child(&mut self) -> Cx {
        Cx {
            id: self.id.clone(),
            fs: self.fs.clone(),
            clock: self.clock.clone(),
            scripts: self.scripts.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            stdin: self.stdin.take(),
            sink: self.sink.clone(),
            out: self.out.clone(),
            err: self.err.clone(),
            life: self.life.clone(),
            tty: self.tty.clone(),
        }
    }

    fn emit(&self, d: &Dest, b: Bytes) {
        if b.is_empty() {
            return;
        }
        match d {
            Dest::Stdout => self.sink.write(Stream::Stdout, b),
            Dest::Stderr => self.sink.write(Stream::Stderr, b),
            Dest::Buf(v) => v.lock().unwrap().extend_from_slice(&b),
            Dest::Null => {}
        }
    }
    pub(crate) fn out(&self, b: impl Into<Bytes>) {
        self.emit(&self.out, b.into());
    }
    pub(crate) fn err(&self, b: impl Into<Bytes>) {
        self.emit(&self.err, b.into());
    }
    fn now_s(&self) -> i64 {
        self.clock.now_ms() / 1000
    }
    fn path(&self, p: &str) -> Result<String, String> {
        normalize(&self.cwd, p).map_err(|e| e.to_string())
    }
    fn read_file(&self, p: &str) -> Result<Bytes, String> {
        let path = self.path(p)?;
        self.fs.lock().unwrap().read(&path).map_err(|e| {
            if e.kind() == capsules_core::ErrorKind::NotFound {
                format!("{p}: No such file or directory")
            } else {
                format!("{p}: {e}")
            }
        })
    }
}
