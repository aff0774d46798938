//! A progress line on stderr for long waits (create, wake, restart): a spinner, what is being
//! waited for and the seconds so far. Only when stderr is a terminal and not in `--json` mode;
//! stdout is never touched, and the line is erased when the wait ends.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
/// Waits shorter than this show nothing (no flicker for quick calls).
const DELAY: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(120);

/// Whether a progress line may be drawn: stderr is a terminal, `--json` is off, TERM is not dumb.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// A running spinner; dropping it stops it and erases its line.
#[derive(Debug)]
pub struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Spinner {
    /// Starts `message` (when `enabled`; else a no-op).
    pub fn start(enabled: bool, message: String) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut drawn = false;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let waited = started.elapsed();
                    if waited >= DELAY {
                        let mut e = std::io::stderr().lock();
                        let _ = write!(
                            e,
                            "\r\x1b[2K{} {message} ({}s)",
                            FRAMES[i % FRAMES.len()],
                            waited.as_secs()
                        );
                        let _ = e.flush();
                        drawn = true;
                        i += 1;
                    }
                    std::thread::sleep(TICK);
                }
                if drawn {
                    let mut e = std::io::stderr().lock();
                    let _ = write!(e, "\r\x1b[2K");
                    let _ = e.flush();
                }
            })
        });
        Spinner { stop, thread }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
