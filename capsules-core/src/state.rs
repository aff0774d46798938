//! The capsule state machine as one table of (state, operation) → outcome.
//!
//! | state | read | use | sleep | wake | restart | terminate | update |
//! |---|---|---|---|---|---|---|---|
//! | creating | ok | busy | busy | busy | busy | start | ok |
//! | running | ok | ok | start | noop | start | start | ok |
//! | suspending | ok | wait, wake | noop | wait, wake | busy | start | ok |
//! | sleeping | ok | wake first | noop | start | start | start | ok |
//! | waking | ok | busy | busy | noop | busy | start | ok |
//! | terminating | ok | conflict | conflict | conflict | conflict | noop | conflict |
//! | terminated | ok | conflict | conflict | conflict | conflict | noop | conflict |
//! | failed | ok | conflict | conflict | conflict | start | start | ok |
//!
//! Operations: read = status, usage, events, logs; use = exec, console, files, spawn, connect,
//! preview; update = limits and the URL. Outcomes: ok = proceed in this state; noop = already
//! there, succeed; wake first = wake (through caps and limits), then proceed; wait, wake = wait for
//! the sleep in progress, then wake; start = begin that transition; busy = `Unavailable`
//! (retryable: the capsule is between states); conflict = `Conflict` naming the state.
//!
//! Wake and restart from sleeping/failed go through the team caps, the credit
//! limit and the balance (one atomic store call); a refused wake names the limit.

use std::fmt;

use crate::error::{Error, Result};

/// Where a capsule is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapsuleState {
    Creating,
    Running,
    Suspending,
    Sleeping,
    Waking,
    Terminating,
    Terminated,
    Failed,
}

impl CapsuleState {
    pub const ALL: [CapsuleState; 8] = [
        CapsuleState::Creating,
        CapsuleState::Running,
        CapsuleState::Suspending,
        CapsuleState::Sleeping,
        CapsuleState::Waking,
        CapsuleState::Terminating,
        CapsuleState::Terminated,
        CapsuleState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CapsuleState::Creating => "creating",
            CapsuleState::Running => "running",
            CapsuleState::Suspending => "suspending",
            CapsuleState::Sleeping => "sleeping",
            CapsuleState::Waking => "waking",
            CapsuleState::Terminating => "terminating",
            CapsuleState::Terminated => "terminated",
            CapsuleState::Failed => "failed",
        }
    }

    /// Counts against team caps and is billed as compute (`creating` counts as running).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            CapsuleState::Creating | CapsuleState::Running | CapsuleState::Waking | CapsuleState::Suspending
        )
    }

    /// Holds the name (every state but `terminated`).
    pub fn is_live(self) -> bool {
        self != CapsuleState::Terminated
    }
}

impl fmt::Display for CapsuleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation on a capsule, as the state table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// status, usage, events, logs.
    Read,
    /// exec, console, files, spawn, connect, preview.
    Use,
    Sleep,
    Wake,
    Restart,
    Terminate,
    /// Change limits or the URL.
    Update,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::Read,
        Operation::Use,
        Operation::Sleep,
        Operation::Wake,
        Operation::Restart,
        Operation::Terminate,
        Operation::Update,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Use => "use",
            Operation::Sleep => "sleep",
            Operation::Wake => "wake",
            Operation::Restart => "restart",
            Operation::Terminate => "terminate",
            Operation::Update => "update",
        }
    }
}

/// What the table says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Go ahead in this state.
    Proceed,
    /// Already there: succeed without doing anything.
    Noop,
    /// Wake the capsule first (through caps and limits), then proceed.
    WakeFirst,
    /// Wait until the sleep in progress finishes, then wake and proceed.
    WaitThenWake,
    /// Start this transition (sleep, wake, restart, terminate).
    Start,
    /// Between states: `Unavailable`, retry.
    Busy,
    /// Not in this state: `Conflict` naming it.
    Refuse,
}

use CapsuleState as S;
use Operation as O;
use Outcome as X;

/// The table. Rows: states; columns in [`Operation::ALL`] order.
pub const TABLE: [(CapsuleState, [Outcome; 7]); 8] = [
    //               read       use             sleep      wake            restart    terminate  update
    (
        S::Creating,
        [X::Proceed, X::Busy, X::Busy, X::Busy, X::Busy, X::Start, X::Proceed],
    ),
    (
        S::Running,
        [
            X::Proceed,
            X::Proceed,
            X::Start,
            X::Noop,
            X::Start,
            X::Start,
            X::Proceed,
        ],
    ),
    (
        S::Suspending,
        [
            X::Proceed,
            X::WaitThenWake,
            X::Noop,
            X::WaitThenWake,
            X::Busy,
            X::Start,
            X::Proceed,
        ],
    ),
    (
        S::Sleeping,
        [
            X::Proceed,
            X::WakeFirst,
            X::Noop,
            X::Start,
            X::Start,
            X::Start,
            X::Proceed,
        ],
    ),
    (
        S::Waking,
        [X::Proceed, X::Busy, X::Busy, X::Noop, X::Busy, X::Start, X::Proceed],
    ),
    (
        S::Terminating,
        [
            X::Proceed,
            X::Refuse,
            X::Refuse,
            X::Refuse,
            X::Refuse,
            X::Noop,
            X::Refuse,
        ],
    ),
    (
        S::Terminated,
        [
            X::Proceed,
            X::Refuse,
            X::Refuse,
            X::Refuse,
            X::Refuse,
            X::Noop,
            X::Refuse,
        ],
    ),
    (
        S::Failed,
        [
            X::Proceed,
            X::Refuse,
            X::Refuse,
            X::Refuse,
            X::Start,
            X::Start,
            X::Proceed,
        ],
    ),
];

/// Looks up (state, operation).
pub fn outcome(state: CapsuleState, op: Operation) -> Outcome {
    let row = TABLE
        .iter()
        .find(|(s, _)| *s == state)
        .map(|(_, r)| r)
        .expect("every state has a row");
    let col = Operation::ALL
        .iter()
        .position(|o| *o == op)
        .expect("every operation has a column");
    row[col]
}

/// The error for `Busy` and `Refuse` outcomes; `Ok` for the others.
pub fn refusal(state: CapsuleState, op: Operation, capsule: &str) -> Result<Outcome> {
    match outcome(state, op) {
        X::Busy => Err(Error::unavailable(format!(
            "capsule {capsule} is {state}; {} is possible once that finishes, retry shortly",
            op.as_str()
        ))),
        X::Refuse => Err(Error::conflict(match state {
            S::Failed => format!(
                "capsule {capsule} is failed (its VM was lost; the disk is kept); restart it before {}",
                op.as_str()
            ),
            _ => format!(
                "capsule {capsule} is {state}; {} is not possible in that state",
                op.as_str()
            ),
        })),
        o => Ok(o),
    }
}

impl Outcome {
    /// How the docs' table spells it.
    pub fn label(self) -> &'static str {
        match self {
            X::Proceed => "ok",
            X::Noop => "noop",
            X::WakeFirst => "wake first",
            X::WaitThenWake => "wait, wake",
            X::Start => "start",
            X::Busy => "busy",
            X::Refuse => "conflict",
        }
    }
}

/// Renders the table as Markdown (what the module docs show; a test keeps them equal).
pub fn render_table() -> String {
    let mut s = String::from("| state |");
    for o in O::ALL {
        s.push_str(&format!(" {} |", o.as_str()));
    }
    s.push_str("\n|---|");
    for _ in O::ALL {
        s.push_str("---|");
    }
    s.push('\n');
    for (state, row) in TABLE {
        s.push_str(&format!("| {state} |"));
        for x in row {
            s.push_str(&format!(" {} |", x.label()));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_operation_has_an_answer() {
        for s in S::ALL {
            for o in O::ALL {
                let _ = outcome(s, o);
            }
        }
        assert_eq!(outcome(S::Terminated, O::Terminate), X::Noop);
        assert_eq!(outcome(S::Sleeping, O::Use), X::WakeFirst);
        let e = refusal(S::Terminated, O::Use, "a").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Conflict);
        assert!(e.message().contains("terminated"));
        assert!(refusal(S::Waking, O::Use, "a").unwrap_err().is_retryable());
        assert!(render_table().contains("| sleeping | ok | wake first |"));
        // The module docs show exactly this table.
        let src = include_str!("state.rs");
        for line in render_table().lines() {
            assert!(
                src.contains(&format!("//! {line}\n")),
                "module docs lack the row {line}"
            );
        }
    }
}
