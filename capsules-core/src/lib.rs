//! # capsules-core
//!
//! Small, safe Linux microVMs ("capsules") for AI agents: the domain model, the one enforcement point
//! for policy, the ledger, the lifecycle, and the [`backend::Backend`] contract every VMM driver
//! implements.

pub mod backend;
pub mod clock;
pub mod error;
pub mod types;

pub use backend::{Backend, BackendExt};
pub use clock::{Clock, SystemClock};
pub use error::{Error, ErrorKind, Result};
