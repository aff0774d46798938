//! Private error detail kept in the source chain of [`VmmError`].

use capsules_microvm::vmm::VmmError;

/// What went wrong on the QMP connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// QEMU answered the command with an error object.
    #[error("QEMU error {class}: {desc}")]
    Qemu { class: String, desc: String },
    /// The connection closed (QEMU exited or dropped the client).
    #[error("the QMP connection closed")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    #[error("QMP socket I/O failed")]
    Io(#[source] std::io::Error),
    /// No answer within the deadline.
    #[error("no QMP answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// A migration that QEMU reported as failed.
#[derive(Debug, thiserror::Error)]
#[error("QEMU reported migration status {status}: {desc}")]
pub(crate) struct MigrationFailed {
    pub status: String,
    pub desc: String,
}

pub(crate) fn control(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> VmmError {
    VmmError::Control {
        message: message.into(),
        source: Some(Box::new(source)),
    }
}

pub(crate) fn process(message: impl Into<String>) -> VmmError {
    VmmError::Process {
        message: message.into(),
        source: None,
    }
}

pub(crate) fn process_src(
    message: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> VmmError {
    VmmError::Process {
        message: message.into(),
        source: Some(Box::new(source)),
    }
}

/// Wraps a [`QmpError`] of command `cmd` as a control error.
pub(crate) fn qmp(cmd: &str, e: QmpError) -> VmmError {
    control(format!("QMP command `{cmd}` failed"), e)
}
