//! Running parsed scripts: lists, background jobs, redirections, builtins.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsules_core::backend::ByteStream;
use futures::future::BoxFuture;

use super::commands::{assignment, run_argv};
use super::parse::{AndOr, Part, Redir, Simple, Stmt, Word, parse};
use super::{Buf, Cx, Dest};
use crate::fs::normalize;
use crate::proc::AbortOnDrop;

/// The shell's own state while it runs one script.
struct Sh {
    status: i32,
    positional: Vec<String>,
    exit: Option<i32>,
}

impl Sh {
    fn lookup(&self, cx: &Cx, name: &str) -> String {
        match name {
            "?" => self.status.to_string(),
            "#" => self.positional.len().saturating_sub(1).to_string(),
            "@" | "*" => self.positional.iter().skip(1).cloned().collect::<Vec<_>>().join(" "),
            "$" | "!" => "1".to_owned(),
            n if n.bytes().all(|b| b.is_ascii_digit()) => n
                .parse::<usize>()
                .ok()
                .and_then(|i| self.positional.get(i))
                .cloned()
                .unwrap_or_default(),
            n => cx.env.get(n).cloned().unwrap_or_default(),
        }
    }

    /// Expands one word into fields (unquoted expansions split on whitespace).
    fn expand(&self, cx: &Cx, w: &Word) -> Vec<String> {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut have = w.quoted;
        for p in &w.parts {
            match p {
                Part::Lit(s) => {
                    cur.push_str(s);
                    have = true;
                }
                Part::Var { name, quoted: true } => {
                    cur.push_str(&self.lookup(cx, name));
                    have = true;
                }
                Part::Var { name, quoted: false } => {
                    let v = self.lookup(cx, name);
                    let mut pieces = v.split([' ', '\t', '\n']).peekable();
                    let starts_blank = v.starts_with([' ', '\t', '\n']);
                    if starts_blank && have {
                        fields.push(std::mem::take(&mut cur));
                        have = false;
                    }
                    while let Some(piece) = pieces.next() {
                        if !piece.is_empty() {
                            cur.push_str(piece);
                            have = true;
                        }
                        if pieces.peek().is_some() && have {
                            fields.push(std::mem::take(&mut cur));
                            have = false;
                        }
                    }
                }
            }
        }
        if have {
            fields.push(cur);
        }
        fields
    }

    fn expand_one(&self, cx: &Cx, w: &Word) -> String {
        self.expand(cx, w).join(" ")
    }
}

/// Runs `script` as `sh -c` would; `positional[0]` is `$0`.
pub(crate) fn run_script<'a>(cx: &'a mut Cx, script: &'a str, positional: Vec<String>) -> BoxFuture<'a, i32> {
    Box::pin(async move {
        let stmts = match parse(script) {
            Ok(s) => s,
            Err(e) => {
                cx.err(format!("sh: {e}\n"));
                return 2;
            }
        };
        let mut sh = Sh {
            status: 0,
            positional,
            exit: None,
        };
        run_stmts(cx, &mut sh, stmts).await
    })
}

/// Runs a parsed script in an interactive shell (the terminal): `exit` is reported, not final.
pub(crate) async fn run_line(cx: &mut Cx, line: &str, last_status: i32) -> (i32, bool) {
    let stmts = match parse(line) {
        Ok(s) => s,
        Err(e) => {
            cx.err(format!("sh: {e}\n"));
            return (2, false);
        }
    };
    let mut sh = Sh {
        status: last_status,
        positional: vec!["sh".to_owned()],
        exit: None,
    };
    let code = run_stmts(cx, &mut sh, stmts).await;
    (code, sh.exit.is_some())
}

async fn run_stmts(cx: &mut Cx, sh: &mut Sh, stmts: Vec<Stmt>) -> i32 {
    let mut jobs: Vec<(tokio::task::JoinHandle<i32>, AbortOnDrop)> = Vec::new();
    for stmt in stmts {
        if stmt.background {
            let mut child = cx.child();
            cx.stdin = child.stdin.take();
            let list = stmt.list.clone();
            let mut job_sh = Sh {
                status: sh.status,
                positional: sh.positional.clone(),
                exit: None,
            };
            let h = tokio::spawn(async move { run_andor(&mut child, &mut job_sh, &list).await });
            let guard = AbortOnDrop(h.abort_handle());
            jobs.push((h, guard));
            sh.status = 0;
            continue;
        }
        sh.status = run_andor(cx, sh, &stmt.list).await;
        if sh.exit.is_some() {
            break;
        }
    }
    // Background jobs hold the output open, so the command ends when they do.
    for (h, _guard) in jobs {
        let _ = h.await;
    }
    sh.exit.unwrap_or(sh.status)
}

fn run_andor<'a>(cx: &'a mut Cx, sh: &'a mut Sh, list: &'a AndOr) -> BoxFuture<'a, i32> {
    Box::pin(async move {
        let mut status = run_simple(cx, sh, &list.first).await;
        for (and, s) in &list.rest {
            if sh.exit.is_some() {
                break;
            }
            if (status == 0) == *and {
                sh.status = status;
                status = run_simple(cx, sh, s).await;
            }
        }
        status
    })
}

async fn run_simple(cx: &mut Cx, sh: &mut Sh, s: &Simple) -> i32 {
    let mut argv: Vec<String> = s.words.iter().flat_map(|w| sh.expand(cx, w)).collect();
    let mut assigns = Vec::new();
    while let Some((k, v)) = argv.first().and_then(|a| assignment(a)) {
        assigns.push((k, v));
        argv.remove(0);
    }
    if argv.is_empty() {
        for (k, v) in assigns {
            cx.env.insert(k, v);
        }
        return 0;
    }
    match argv[0].as_str() {
        "exit" => {
            let code = argv.get(1).map_or(Some(sh.status), |a| a.parse::<i32>().ok());
            let Some(code) = code else {
                cx.err(format!("sh: exit: Illegal number: {}\n", argv[1]));
                sh.exit = Some(2);
                return 2;
            };
            sh.exit = Some(code & 0xff);
            return code & 0xff;
        }
        "cd" => {
            let target = argv.get(1).cloned().unwrap_or_else(|| "/root".to_owned());
            let dir = match normalize(&cx.cwd, &target) {
                Ok(d) => d,
                Err(e) => {
                    cx.err(format!("sh: cd: {e}\n"));
                    return 2;
                }
            };
            if !cx.fs.lock().unwrap().is_dir(&dir) {
                cx.err(format!("sh: cd: can't cd to {target}\n"));
                return 2;
            }
            cx.cwd = dir;
            return 0;
        }
        "export" => {
            for a in &argv[1..] {
                if let Some((k, v)) = assignment(a) {
                    cx.env.insert(k, v);
                }
            }
            return 0;
        }
        "if" | "then" | "else" | "fi" | "for" | "while" | "until" | "do" | "done" | "case" | "esac" => {
            cx.err(format!("sh: '{}' is not supported by the mock shell\n", argv[0]));
            return 2;
        }
        _ => {}
    }
    let mut child = cx.child();
    for (k, v) in assigns {
        child.env.insert(k, v);
    }
    let mut files: Vec<(String, Buf, bool)> = Vec::new();
    let mut stdin_redirected = false;
    for r in &s.redirs {
        match r {
            Redir::Dup { from: 1, .. } => child.out = child.err.clone(),
            Redir::Dup { .. } => child.err = child.out.clone(),
            Redir::Out { fd, target, append } => {
                let name = sh.expand_one(cx, target);
                let dest = if name == "/dev/null" {
                    Dest::Null
                } else {
                    let path = match normalize(&cx.cwd, &name) {
                        Ok(p) => p,
                        Err(e) => {
                            cx.err(format!("sh: {e}\n"));
                            cx.stdin = child.stdin.take();
                            return 2;
                        }
                    };
                    let buf = Arc::new(Mutex::new(Vec::new()));
                    files.push((path, buf.clone(), *append));
                    Dest::Buf(buf)
                };
                if *fd == 1 {
                    child.out = dest;
                } else {
                    child.err = dest;
                }
            }
            Redir::In(target) => {
                let name = sh.expand_one(cx, target);
                let data = if name == "/dev/null" {
                    Ok(Bytes::new())
                } else {
                    cx.read_file(&name)
                };
                if !stdin_redirected {
                    // The parent keeps its own stdin for later commands.
                    cx.stdin = child.stdin.take();
                    stdin_redirected = true;
                }
                match data {
                    Ok(b) => {
                        let s: ByteStream = Box::pin(futures::stream::once(async move { Ok(b) }));
                        child.stdin = Some(s);
                    }
                    Err(e) => {
                        cx.err(format!("sh: cannot open {e}\n"));
                        return 2;
                    }
                }
            }
        }
    }
    // `> file` creates (and truncates) the file before the command runs.
    let now = cx.now_s();
    for (path, _, append) in &files {
        let mut fs = cx.fs.lock().unwrap();
        let r = if *append {
            fs.append(path, b"", now)
        } else {
            fs.write(path, Bytes::new(), None, now)
        };
        if let Err(e) = r {
            drop(fs);
            cx.err(format!("sh: cannot create {path}: {e}\n"));
            return 2;
        }
    }
    let code = run_argv(&mut child, argv).await;
    if !stdin_redirected {
        cx.stdin = child.stdin.take();
    }
    for (path, buf, _) in files {
        let data = std::mem::take(&mut *buf.lock().unwrap());
        if let Err(e) = cx.fs.lock().unwrap().append(&path, &data, now) {
            cx.err(format!("sh: write error: {e}\n"));
            return 1;
        }
    }
    code
}
