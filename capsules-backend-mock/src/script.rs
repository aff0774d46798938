//! Scripted exec results: a test says "when argv looks like this, answer that".

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capsules_core::types::CapsuleId;

type Predicate = dyn Fn(&[String]) -> bool + Send + Sync;

/// Which commands a scripted reply answers. Matched against the argv of every command the mock
/// runs: an exec's argv, and each simple command inside `sh -c`.
#[derive(Clone)]
pub struct ExecMatcher {
    describe: String,
    test: Arc<Predicate>,
}

impl ExecMatcher {
    /// Exactly this argv.
    pub fn exact<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let want: Vec<String> = argv.into_iter().map(Into::into).collect();
        ExecMatcher {
            describe: format!("exact {want:?}"),
            test: Arc::new(move |a| a == want.as_slice()),
        }
    }

    /// Any argv that starts with these words.
    pub fn prefix<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let want: Vec<String> = argv.into_iter().map(Into::into).collect();
        ExecMatcher {
            describe: format!("prefix {want:?}"),
            test: Arc::new(move |a| a.starts_with(&want)),
        }
    }

    /// Any argv the predicate accepts.
    pub fn predicate(f: impl Fn(&[String]) -> bool + Send + Sync + 'static) -> Self {
        ExecMatcher {
            describe: "predicate".to_owned(),
            test: Arc::new(f),
        }
    }

    pub fn matches(&self, argv: &[String]) -> bool {
        (self.test)(argv)
    }
}

impl fmt::Debug for ExecMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExecMatcher({})", self.describe)
    }
}

/// One step of a scripted reply, played in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Stdout(Bytes),
    Stderr(Bytes),
    Delay(Duration),
}

/// How a scripted command ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Code(i32),
    Signal(i32),
}

/// What a scripted command does: output and delays in order, then an exit code or a signal.
///
/// ```
/// use std::time::Duration;
/// use capsules_backend_mock::ExecReply;
/// let r = ExecReply::new()
///     .stdout("building\n")
///     .delay(Duration::from_secs(2))
///     .stderr("1 test failed\n")
///     .exit_code(1);
/// # let _ = r;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecReply {
    pub(crate) steps: Vec<Step>,
    pub(crate) end: End,
}

impl Default for ExecReply {
    fn default() -> Self {
        Self::new()
    }
}

impl ExecReply {
    /// No output, exit code 0.
    pub fn new() -> Self {
        ExecReply {
            steps: Vec::new(),
            end: End::Code(0),
        }
    }
    /// Writes these bytes to stdout.
    pub fn stdout(mut self, b: impl Into<Bytes>) -> Self {
        self.steps.push(Step::Stdout(b.into()));
        self
    }
    /// Writes these bytes to stderr.
    pub fn stderr(mut self, b: impl Into<Bytes>) -> Self {
        self.steps.push(Step::Stderr(b.into()));
        self
    }
    /// Waits (tokio time; frozen while the capsule sleeps, honours timeouts and signals).
    pub fn delay(mut self, d: Duration) -> Self {
        self.steps.push(Step::Delay(d));
        self
    }
    /// Exits with this code.
    pub fn exit_code(mut self, code: i32) -> Self {
        self.end = End::Code(code);
        self
    }
    /// Ends as if killed by this signal.
    pub fn killed_by(mut self, signal: i32) -> Self {
        self.end = End::Signal(signal);
        self
    }
}

#[derive(Debug)]
struct Rule {
    matcher: ExecMatcher,
    reply: ExecReply,
    capsule: Option<CapsuleId>,
    remaining: Option<usize>,
}

/// The registry of scripted replies; the newest matching rule wins.
#[derive(Debug, Default)]
pub(crate) struct Scripts {
    rules: Mutex<Vec<Rule>>,
}

impl Scripts {
    pub(crate) fn add(&self, matcher: ExecMatcher, reply: ExecReply, capsule: Option<CapsuleId>, times: Option<usize>) {
        self.rules.lock().unwrap().push(Rule {
            matcher,
            reply,
            capsule,
            remaining: times,
        });
    }

    pub(crate) fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// The reply for `argv` in `capsule`, using up one of a limited rule's answers.
    pub(crate) fn take(&self, capsule: &CapsuleId, argv: &[String]) -> Option<ExecReply> {
        let mut rules = self.rules.lock().unwrap();
        let i = rules.iter().rposition(|r| {
            r.capsule.as_ref().is_none_or(|c| c == capsule) && r.remaining != Some(0) && r.matcher.matches(argv)
        })?;
        let rule = &mut rules[i];
        let reply = rule.reply.clone();
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
            if *n == 0 {
                rules.remove(i);
            }
        }
        Some(reply)
    }
}
