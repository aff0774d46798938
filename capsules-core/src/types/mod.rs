//! Domain types. Every constructor from user input validates and returns an error that names the
//! rule that was broken.

mod image;
mod name;
mod network;
mod size;

pub use image::{Image, Region};
pub use name::{CapsuleId, CapsuleName, CapsuleRef, TeamId, TeamName};
pub use network::{AllowEntry, BLOCKED_RANGES, Cidr, NetworkPolicy};
pub use size::Size;
