//! A simulated terminal: a line discipline (echo, `\r\n`, backspace, Ctrl-C, Ctrl-D) in front of
//! the mock's interpreter.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use capsules_core::backend::{ExitStatus, PtyEvent, PtyInput, PtyRequest, PtySession};
use capsules_core::types::CapsuleId;
use capsules_core::{Clock, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::fs::Fs;
use crate::proc::{AbortOnDrop, Life, Phase, PtySink, cut, is_harmless, onlcr};
use crate::script::Scripts;
use crate::shell::{Cx, Dest, run_argv, run_line};

const PROMPT: &[u8] = b"$ ";

pub(crate) struct PtyStart {
    pub id: CapsuleId,
    pub fs: Arc<Mutex<Fs>>,
    pub clock: Arc<dyn Clock>,
    pub scripts: Arc<Scripts>,
    pub life: watch::Receiver<Life>,
    pub boot: u64,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub req: PtyRequest,
}

/// A command running on the terminal: it hands back its cwd and env (for `cd`, assignments).
type Job = (JoinHandle<(String, BTreeMap<String, String>, i32, bool)>, AbortOnDrop);

pub(crate) fn open(start: PtyStart) -> PtySession {
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(start, in_rx, out_tx));
    PtySession {
        input: in_tx,
        output: Box::pin(futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv().await.map(|x| (x, rx))
        })),
    }
}

fn exit(code: Option<i32>, signal: Option<i32>) -> Result<PtyEvent> {
    Ok(PtyEvent::Exit(ExitStatus {
        code,
        signal,
        ..Default::default()
    }))
}

async fn run(s: PtyStart, mut input: mpsc::Receiver<PtyInput>, out: mpsc::UnboundedSender<Result<PtyEvent>>) {
    let size = Arc::new(Mutex::new((s.req.rows, s.req.cols)));
    let sink: Arc<dyn crate::proc::Sink> = Arc::new(PtySink(out.clone()));
    let mut life = s.life.clone();
    let (mut cwd, mut env) = (s.cwd.clone(), s.env.clone());
    let cx_for = |cwd: String, env: BTreeMap<String, String>| Cx {
        id: s.id.clone(),
        fs: s.fs.clone(),
        clock: s.clock.clone(),
        scripts: s.scripts.clone(),
        cwd,
        env,
        stdin: None,
        sink: sink.clone(),
        out: Dest::Stdout,
        err: Dest::Stdout,
        life: s.life.clone(),
        tty: Some(size.clone()),
    };
    let echo = |b: &[u8]| {
        let _ = out.send(Ok(PtyEvent::Output(onlcr(b))));
    };
    let start = |line: String, cwd: String, env: BTreeMap<String, String>, last: i32| -> Job {
        let mut cx = cx_for(cwd, env);
        let h = tokio::spawn(async move {
            let (code, exited) = run_line(&mut cx, &line, last).await;
            (cx.cwd, cx.env, code, exited)
        });
        let guard = AbortOnDrop(h.abort_handle());
        (h, guard)
    };

    // A program given in the request runs alone: its end ends the terminal.
    let interactive = match &s.req.argv {
        None => true,
        Some(a) => a.len() == 1 && matches!(a[0].as_str(), "sh" | "bash" | "/bin/sh" | "/bin/bash"),
    };
    let mut running: Option<Job> = None;
    if interactive {
        echo(PROMPT);
    } else {
        let mut cx = cx_for(cwd.clone(), env.clone());
        let argv = s.req.argv.clone().unwrap_or_default();
        let h = tokio::spawn(async move {
            let code = run_argv(&mut cx, argv).await;
            (cx.cwd, cx.env, code, true)
        });
        let guard = AbortOnDrop(h.abort_handle());
        running = Some((h, guard));
    }
    let mut line: Vec<u8> = Vec::new();
    let mut queued: VecDeque<String> = VecDeque::new();
    let mut last = 0;

    loop {
        tokio::select! {
            r = async { (&mut running.as_mut().expect("guarded").0).await }, if running.is_some() => {
                running = None;
                let (c, e, code, exited) = r.unwrap_or_else(|_| (cwd.clone(), env.clone(), 134, false));
                (cwd, env, last) = (c, e, code);
                if exited {
                    let _ = out.send(if code < 0 { exit(None, Some(-code)) } else { exit(Some(code), None) });
                    return;
                }
                match queued.pop_front() {
                    Some(l) => running = Some(start(l, cwd.clone(), env.clone(), last)),
                    None => echo(PROMPT),
                }
            }
            inp = input.recv() => {
                let Some(inp) = inp else {
                    // The terminal was hung up.
                    let _ = out.send(exit(None, Some(1)));
                    return;
                };
                // Ctrl-C reaches the foreground command (and drops typed-ahead lines).
                let interrupt = |running: &mut Option<Job>, queued: &mut VecDeque<String>| -> bool {
                    queued.clear();
                    running.take().is_some()
                };
                match inp {
                    PtyInput::Resize { cols, rows } => *size.lock().unwrap() = (rows, cols),
                    PtyInput::Signal(sig) if is_harmless(sig) => {}
                    PtyInput::Signal(sig) => {
                        let was = interrupt(&mut running, &mut queued);
                        if !interactive {
                            let _ = out.send(exit(None, Some(sig)));
                            return;
                        }
                        if was {
                            last = 128 + sig;
                        }
                        line.clear();
                        echo(b"\n");
                        echo(PROMPT);
                    }
                    PtyInput::Data(data) => {
                        for &b in data.iter() {
                            match b {
                                0x03 => {
                                    let was = interrupt(&mut running, &mut queued);
                                    echo(b"^C\n");
                                    if !interactive {
                                        let _ = out.send(exit(None, Some(2)));
                                        return;
                                    }
                                    if was {
                                        last = 130;
                                    }
                                    line.clear();
                                    echo(PROMPT);
                                }
                                0x04 if line.is_empty() && running.is_none() && interactive => {
                                    echo(b"exit\n");
                                    let _ = out.send(exit(Some(last), None));
                                    return;
                                }
                                b'\r' | b'\n' => {
                                    echo(b"\n");
                                    let l = String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned();
                                    if !interactive {
                                        continue;
                                    }
                                    if running.is_some() {
                                        queued.push_back(l);
                                    } else {
                                        running = Some(start(l, cwd.clone(), env.clone(), last));
                                    }
                                }
                                0x7f | 0x08 => {
                                    if line.pop().is_some() {
                                        echo(b"\x08 \x08");
                                    }
                                }
                                b => {
                                    line.push(b);
                                    echo(&[b]);
                                }
                            }
                        }
                    }
                }
            }
            r = life.changed() => {
                let now = if r.is_err() { Life { boot: s.boot, phase: Phase::Terminated } } else { *life.borrow_and_update() };
                if let Some(e) = cut(&s.id, now, s.boot, true) {
                    let _ = out.send(Err(e));
                    return;
                }
            }
            _ = out.closed() => return,
        }
    }
}
