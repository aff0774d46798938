//! The built-in commands.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::Cx;
use super::sh::run_script;
use crate::proc::sleep_awake;
use crate::script::{End, ExecReply, Step};

/// Runs one command (argv, no shell) and returns its exit code; a signal death is `-signal`.
pub(crate) fn run_argv(cx: &mut Cx, argv: Vec<String>) -> BoxFuture<'_, i32> {
    Box::pin(async move {
        if argv.is_empty() {
            return 0;
        }
        if let Some(reply) = cx.scripts.take(&cx.id, &argv) {
            return play(cx, reply).await;
        }
        let name = argv[0]
            .strip_prefix("/usr/bin/")
            .or_else(|| argv[0].strip_prefix("/bin/"))
            .unwrap_or(&argv[0])
            .to_owned();
        let args = &argv[1..];
        match name.as_str() {
            "true" | ":" => 0,
            "false" => 1,
            "echo" => {
                let (nl, words) = match args.first().map(String::as_str) {
                    Some("-n") => (false, &args[1..]),
                    _ => (true, args),
                };
                let mut s = words.join(" ");
                if nl {
                    s.push('\n');
                }
                cx.out(s);
                0
            }
            "printf" => match args.split_first() {
                None => {
                    cx.err("printf: usage: printf FORMAT [ARGUMENT]...\n");
                    2
                }
                Some((fmt, rest)) => {
                    cx.out(printf(fmt, rest));
                    0
                }
            },
            "cat" => cat(cx, args).await,
            "head" => head(cx, args).await,
            "sleep" => {
                let mut total = Duration::ZERO;
                for a in args {
                    match parse_duration(a) {
                        Some(d) => total += d,
                        None => {
                            cx.err(format!("sleep: invalid time interval '{a}'\n"));
                            return 1;
                        }
                    }
                }
                if args.is_empty() {
                    cx.err("sleep: missing operand\n");
                    return 1;
                }
                sleep_awake(&mut cx.life, total).await;
                0
            }
            "pwd" => {
                let line = format!("{}\n", cx.cwd);
                cx.out(line);
                0
            }
            "env" => {
                let mut i = 0;
                let mut child = cx.child();
                while let Some((k, v)) = args.get(i).and_then(|a| assignment(a)) {
                    child.env.insert(k, v);
                    i += 1;
                }
                let code = if i == args.len() {
                    let listing: String = child.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                    child.out(listing);
                    0
                } else {
                    run_argv(&mut child, args[i..].to_vec()).await
                };
                cx.stdin = child.stdin.take();
                code
            }
            "sha256sum" => sha256sum(cx, args).await,
            "stty" => match (args.iter().map(String::as_str).collect::<Vec<_>>().as_slice(), &cx.tty) {
                (["size"], Some(t)) => {
                    let (rows, cols) = *t.lock().unwrap();
                    cx.out(format!("{rows} {cols}\n"));
                    0
                }
                (["size"], None) => {
                    cx.err("stty: 'standard input': Inappropriate ioctl for device\n");
                    1
                }
                _ => {
                    cx.err("stty: the mock knows only 'stty size'\n");
                    1
                }
            },
            "sh" | "bash" | "dash" => {
                let mut rest = args;
                while let Some(f) = rest.first().filter(|f| f.starts_with('-') && f.as_str() != "-c") {
                    let _ = f;
                    rest = &rest[1..];
                }
                match rest {
                    [c, script, positional @ ..] if c == "-c" => {
                        let mut pos: Vec<String> = positional.to_vec();
                        if pos.is_empty() {
                            pos.push(name.clone());
                        }
                        let mut child = cx.child();
                        let code = run_script(&mut child, script, pos).await;
                        cx.stdin = child.stdin.take();
                        code
                    }
                    _ => {
                        cx.err(format!("{name}: the mock's shell only runs '{name} -c SCRIPT'\n"));
                        2
                    }
                }
            }
            _ => {
                cx.err(format!("mock: {}: command not found\n", argv[0]));
                127
            }
        }
    })
}

async fn play(cx: &mut Cx, reply: ExecReply) -> i32 {
    for step in reply.steps {
        match step {
            Step::Stdout(b) => cx.out(b),
            Step::Stderr(b) => cx.err(b),
            Step::Delay(d) => sleep_awake(&mut cx.life, d).await,
        }
    }
    match reply.end {
        End::Code(c) => c,
        End::Signal(s) => -s,
    }
}

fn parse_duration(a: &str) -> Option<Duration> {
    let (num, mult) = match a.as_bytes().last()? {
        b's' => (&a[..a.len() - 1], 1.0),
        b'm' => (&a[..a.len() - 1], 60.0),
        b'h' => (&a[..a.len() - 1], 3600.0),
        b'd' => (&a[..a.len() - 1], 86400.0),
        _ => (a, 1.0),
    };
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| Duration::from_secs_f64(n * mult))
}

pub(super) fn assignment(w: &str) -> Option<(String, String)> {
    let (k, v) = w.split_once('=')?;
    let ok = !k.is_empty()
        && k.bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
    ok.then(|| (k.to_owned(), v.to_owned()))
}

/// Reads stdin to the end, handing each chunk to `f` as it arrives.
async fn each_stdin_chunk(cx: &mut Cx, mut f: impl FnMut(&Cx, Bytes)) -> Result<(), String> {
    let Some(mut s) = cx.stdin.take() else {
        return Ok(());
    };
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(b) => f(cx, b),
            Err(e) => return Err(format!("read error on standard input: {e}")),
        }
    }
    Ok(())
}

async fn cat(cx: &mut Cx, args: &[String]) -> i32 {
    let files: Vec<&String> = args.iter().filter(|a| a.as_str() != "--").collect();
    let mut code = 0;
    if files.is_empty() {
        if let Err(e) = each_stdin_chunk(cx, |cx, b| cx.out(b)).await {
            cx.err(format!("cat: {e}\n"));
            return 1;
        }
        return 0;
    }
    for f in files {
        if f == "-" {
            if let Err(e) = each_stdin_chunk(cx, |cx, b| cx.out(b)).await {
                cx.err(format!("cat: {e}\n"));
                code = 1;
            }
            continue;
        }
        match cx.read_file(f) {
            Ok(b) => cx.out(b),
            Err(e) => {
                cx.err(format!("cat: {e}\n"));
                code = 1;
            }
        }
    }
    code
}

async fn head(cx: &mut Cx, args: &[String]) -> i32 {
    let (n, file) = match args {
        [c, n, rest @ ..] if c == "-c" && rest.len() <= 1 => (n.parse::<usize>().ok(), rest.first()),
        _ => (None, None),
    };
    let Some(n) = n else {
        cx.err("head: the mock knows only 'head -c N [FILE]'\n");
        return 1;
    };
    match file {
        Some(f) if f != "-" => match cx.read_file(f) {
            Ok(b) => {
                cx.out(b.slice(..n.min(b.len())));
                0
            }
            Err(e) => {
                cx.err(format!("head: cannot open {e}\n"));
                1
            }
        },
        _ => {
            let mut left = n;
            let r = each_stdin_chunk(cx, |cx, b| {
                let k = left.min(b.len());
                left -= k;
                cx.out(b.slice(..k));
            })
            .await;
            if let Err(e) = r {
                cx.err(format!("head: {e}\n"));
                return 1;
            }
            0
        }
    }
}

async fn sha256sum(cx: &mut Cx, args: &[String]) -> i32 {
    let files: Vec<String> = args.iter().filter(|a| a.as_str() != "--").cloned().collect();
    let files = if files.is_empty() { vec!["-".to_owned()] } else { files };
    let mut code = 0;
    for f in files {
        let digest = if f == "-" {
            let mut h = Sha256::new();
            match each_stdin_chunk(cx, |_, b| h.update(&b)).await {
                Ok(()) => Ok(h.finalize()),
                Err(e) => Err(e),
            }
        } else {
            cx.read_file(&f).map(|b| Sha256::digest(&b))
        };
        match digest {
            Ok(d) => cx.out(format!("{}  {f}\n", hex::encode(d))),
            Err(e) => {
                cx.err(format!("sha256sum: {e}\n"));
                code = 1;
            }
        }
    }
    code
}

/// `printf FORMAT ARGS...`: `%s %b %d %i %u %x %X %o %c %%` with flags, width and precision;
/// backslash escapes; the format is reused while arguments remain.
pub(crate) fn printf(fmt: &str, args: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut args = args.iter();
    let f: Vec<char> = fmt.chars().collect();
    loop {
        let mut used = false;
        let mut i = 0;
        while i < f.len() {
            match f[i] {
                '\\' => i = escape(&f, i + 1, &mut out),
                '%' if f.get(i + 1) == Some(&'%') => {
                    out.push(b'%');
                    i += 2;
                }
                '%' => {
                    let start = i + 1;
                    let mut j = start;
                    while j < f.len() && "-+ #0".contains(f[j]) {
                        j += 1;
                    }
                    while j < f.len() && (f[j].is_ascii_digit() || f[j] == '.') {
                        j += 1;
                    }
                    let Some(&conv) = f.get(j) else {
                        out.extend(f[i..].iter().collect::<String>().bytes());
                        break;
                    };
                    let spec: String = f[start..j].iter().collect();
                    let arg = args.next();
                    used |= arg.is_some();
                    let arg = arg.map(String::as_str).unwrap_or("");
                    let body: Vec<u8> = match conv {
                        's' => {
                            let mut s = arg.to_owned();
                            if let Some(p) = spec.split_once('.').and_then(|(_, p)| p.parse::<usize>().ok()) {
                                s = s.chars().take(p).collect();
                            }
                            s.into_bytes()
                        }
                        'b' => {
                            let mut v = Vec::new();
                            let a: Vec<char> = arg.chars().collect();
                            let mut k = 0;
                            while k < a.len() {
                                if a[k] == '\\' {
                                    k = escape(&a, k + 1, &mut v);
                                } else {
                                    let mut buf = [0; 4];
                                    v.extend_from_slice(a[k].encode_utf8(&mut buf).as_bytes());
                                    k += 1;
                                }
                            }
                            v
                        }
                        'c' => arg
                            .chars()
                            .next()
                            .map(|c| c.to_string().into_bytes())
                            .unwrap_or_default(),
                        'd' | 'i' | 'u' | 'x' | 'X' | 'o' => {
                            let n: i64 = arg.trim().parse().unwrap_or(0);
                            match conv {
                                'x' => format!("{n:x}"),
                                'X' => format!("{n:X}"),
                                'o' => format!("{n:o}"),
                                _ => n.to_string(),
                            }
                            .into_bytes()
                        }
                        other => format!("%{spec}{other}").into_bytes(),
                    };
                    let width: usize = spec
                        .trim_start_matches(['-', '+', ' ', '#', '0'])
                        .split('.')
                        .next()
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(0);
                    let pad = width.saturating_sub(String::from_utf8_lossy(&body).chars().count());
                    let fill = if spec.starts_with('0') && conv != 's' {
                        b'0'
                    } else {
                        b' '
                    };
                    if spec.starts_with('-') {
                        out.extend_from_slice(&body);
                        out.extend(std::iter::repeat_n(b' ', pad));
                    } else {
                        out.extend(std::iter::repeat_n(fill, pad));
                        out.extend_from_slice(&body);
                    }
                    i = j + 1;
                }
                c => {
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    i += 1;
                }
            }
        }
        if !used || args.len() == 0 {
            return out;
        }
    }
}

/// One backslash escape starting at `f[i]` (after the backslash); returns the next index.
fn escape(f: &[char], i: usize, out: &mut Vec<u8>) -> usize {
    let Some(&c) = f.get(i) else {
        out.push(b'\\');
        return i;
    };
    let simple = match c {
        'n' => Some(b'\n'),
        't' => Some(b'\t'),
        'r' => Some(b'\r'),
        'a' => Some(7),
        'b' => Some(8),
        'f' => Some(12),
        'v' => Some(11),
        'e' => Some(27),
        '\\' => Some(b'\\'),
        '"' => Some(b'"'),
        '\'' => Some(b'\''),
        _ => None,
    };
    if let Some(b) = simple {
        out.push(b);
        return i + 1;
    }
    if c.is_digit(8) {
        // \NNN (and \0NNN) octal: a raw byte.
        let mut j = i;
        if c == '0' {
            j += 1;
        }
        let mut n: u32 = 0;
        let mut k = 0;
        while k < 3 && f.get(j).is_some_and(|d| d.is_digit(8)) {
            n = n * 8 + f[j].to_digit(8).unwrap_or(0);
            j += 1;
            k += 1;
        }
        out.push((n & 0xff) as u8);
        return j;
    }
    if c == 'x' {
        let mut j = i + 1;
        let mut n: u32 = 0;
        while j < i + 3 && f.get(j).is_some_and(|d| d.is_ascii_hexdigit()) {
            n = n * 16 + f[j].to_digit(16).unwrap_or(0);
            j += 1;
        }
        if j > i + 1 {
            out.push(n as u8);
            return j;
        }
    }
    out.push(b'\\');
    let mut buf = [0; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    i + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printf_formats() {
        assert_eq!(printf("[%s]", &["a b".into(), "c".into()]), b"[a b][c]");
        assert_eq!(
            printf("%5s|%-3d|%03d%%\\n", &["x".into(), "7".into(), "5".into()]),
            b"    x|7  |005%\n"
        );
        assert_eq!(printf("\\377\\0\\x41", &[]), vec![0xff, 0, b'A']);
    }
}
