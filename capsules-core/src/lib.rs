//! # capsules-core
//!
//! Small, safe Linux microVMs ("capsules") for AI agents: the domain model, the one enforcement point
//! for policy, the ledger, the lifecycle, and the [`backend::Backend`] contract every VMM driver
//! implements. [`Capsules`] is the front door; nothing reaches a backend around it.
//!
//! ```no_run
//! use capsules_core::{Backend, Capsules, MemoryStore, Scope, TokenSpec};
//!
//! # async fn quickstart(backend: impl Backend) -> capsules_core::Result<()> {
//! // `backend` is a MockBackend, QemuBackend or ChvBackend.
//! let capsules = Capsules::builder().backend(backend).store(MemoryStore::new()).build().await?;
//! let boot = capsules.bootstrap("acme").await?; // operator + first team + owner token + 5.00
//! let agent = capsules
//!     .tokens(&boot.owner.secret)
//!     .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-"))
//!     .await?;
//! let cap = capsules.connect(&agent.secret)?.create("agent-pr-482").size("2x2gb").credit_limit("2.00").await?;
//! cap.upload_dir("examples/quickstart/project", "/workspace").await?;
//! let out = cap.exec(["npm", "test"]).await?; // runs in /workspace
//! println!("exit {}: {}", out.exit_code(), out.stdout_lossy());
//! cap.terminate().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Modules, one concept each: [`types`] (names, ids, sizes, money, limits, URLs), [`tokens`]
//! (scopes, secrets, attenuation), [`policy`] (the one `check`), [`state`] (the state table),
//! [`ledger`] (entries and the metering rules), [`events`] (the audit trail), [`records`] and
//! [`store`] (the store traits and [`MemoryStore`]), [`backend`] (the `Backend` contract),
//! [`clock`]. With feature `testkit`: the contract suite.
//!
//! Lifecycle jobs run in [`Capsules::tick`] at the clock's now (tests drive a [`ManualClock`];
//! deployments call [`Capsules::spawn_jobs`]).

pub mod backend;
pub mod clock;
pub mod error;
pub mod events;
pub mod ledger;
pub mod policy;
pub mod records;
mod service;
pub mod state;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tokens;
pub mod types;

pub use backend::{Backend, BackendExt};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, ErrorKind, Result};
pub use service::{
    Arg, Bootstrapped, CapsuleHandle, CapsuleUsage, Capsules, CapsulesBuilder, Client, Console, CreateBuilder,
    ExecBuilder, ListOptions, NewTeam, Operator, Preview, PreviewTarget, TeamUsage, TickReport, Tokens, UpdateBuilder,
};
pub use store::{MemoryStore, Store};
pub use tokens::{MintedToken, Principal, Scope, Secret, TokenSpec};
pub use types::{CapsuleId, CapsuleName, CapsuleRef, Credits, MicroCredits, Size};
