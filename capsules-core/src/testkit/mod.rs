//! The contract suite (feature `testkit`).
//!
//! - [`backend`]: what every `Backend` must do, taking `&dyn Backend`.
//! - [`policy`]: tokens, prefixes, scopes, team caps, money, concurrency and the state table,
//!   taking a [`ServiceFactory`] that builds a fresh [`Capsules`] over some backend and store with
//!   a [`ManualClock`].

pub mod backend;
pub mod policy;

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::backend::Backend;
use crate::clock::ManualClock;
use crate::service::Capsules;
use crate::store::Store;
use crate::types::RateCard;

/// Where the suite's manual clocks start (2027-01-15T08:00:00Z; a whole hour).
pub const START_MS: i64 = 1_800_000_000_000;

/// A fresh service for one test case.
#[derive(Debug, Clone)]
pub struct Service {
    pub capsules: Capsules,
    pub clock: Arc<ManualClock>,
    /// The same backend the service drives (inspect it through the `Backend` trait only).
    pub backend: Arc<dyn Backend>,
    /// The same store the service uses.
    pub store: Arc<dyn Store>,
}

impl Service {
    /// Builds the service over `backend` and `store`, on a manual clock at [`START_MS`], with
    /// the default rates.
    pub async fn new(backend: Arc<dyn Backend>, store: Arc<dyn Store>) -> Service {
        let clock = Arc::new(ManualClock::new(START_MS));
        let capsules = Capsules::builder()
            .backend(backend.clone())
            .shared_store(store.clone())
            .clock(clock.clone())
            .rates(RateCard::default())
            .build()
            .await
            .expect("the service builds");
        Service {
            capsules,
            clock,
            backend,
            store,
        }
    }
}

/// Makes a fresh [`Service`] per test case. Any `Fn() -> impl Future<Output = Service>` is one.
pub trait ServiceFactory: Send + Sync {
    fn make(&self) -> BoxFuture<'static, Service>;
}

impl<F, Fut> ServiceFactory for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Service> + Send + 'static,
{
    fn make(&self) -> BoxFuture<'static, Service> {
        Box::pin(self())
    }
}
