//! Domain types. Every constructor from user input validates and returns an error that names the
//! rule that was broken.

mod image;
mod limits;
mod money;
mod name;
mod network;
mod size;
mod url;

pub use image::{Image, Region};
pub use limits::{
    CapsuleLimits, DEFAULT_CREDIT_LIMIT, DEFAULT_DISK_GIB, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_RUNTIME, ONBOARDING_GRANT,
    RateCard, TeamCaps, check_disk, check_duration,
};
pub use money::{Credits, MICROS_PER_CREDIT, MicroCredits};
pub use name::{CapsuleId, CapsuleName, CapsuleRef, TeamId, TeamName, TokenId};
pub use network::{AllowEntry, BLOCKED_RANGES, Cidr, NetworkPolicy};
pub use size::Size;
pub use url::{PublicUrl, UrlAccess, new_host_label};
