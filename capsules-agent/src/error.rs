//! Errors of the host-side client.

use crate::proto::ErrorKind;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The stream was cut or the session was superseded (e.g. the capsule went to sleep).
    /// Retryable on a new session.
    #[error("agent session ended")]
    SessionEnded,
    /// A deadline passed.
    #[error("agent did not answer {0} in time")]
    Timeout(&'static str),
    /// The agent refused or failed the request.
    #[error("{message}")]
    Remote {
        /// What kind of failure.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The agent sent something that breaks the protocol.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// The stream failed during the handshake.
    #[error("agent stream failed")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// Whether retrying on a new session may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AgentError::SessionEnded | AgentError::Timeout(_))
    }

    /// Error kind of a remote failure.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            AgentError::Remote { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Result alias.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
