//! The policy part of core's contract suite, on the mock backend + the SQLite store (a fresh
//! temporary database file per case) + a manual clock: the same cases the memory store runs.

use std::sync::Arc;

use capsules_backend_mock::MockBackend;
use capsules_core::testkit::{Service, policy};
use capsules_store_sqlite::SqliteStore;

async fn service() -> Service {
    // Under cargo's per-target temp dir (removed by `cargo clean`): the directory must outlive
    // the service, which the suite keeps until the case ends.
    let dir = tempfile::Builder::new()
        .prefix("policy-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temp dir");
    let path = dir.keep().join("capsules.db");
    let store = SqliteStore::open(&path).await.expect("open the sqlite store");
    Service::new(Arc::new(MockBackend::new()), Arc::new(store)).await
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                policy::$name(&service).await;
            }
        )*
    };
}

cases!(
    bootstrap_once,
    prefix_limits_every_action,
    attenuation_in_every_dimension,
    concurrent_creates_of_one_name,
    run_sleep_run_bills_two_minutes,
    credit_limit_sleeps_and_blocks_wake,
    idle_sleep_and_activity,
    bad_input_is_refused_everywhere,
    terminate_twice_and_use_after,
    team_cap_of_running_capsules,
    private_network_public_url_and_grants,
    revoke_cascades_and_tokens_write_sees_its_own,
    reused_name_keeps_histories_apart,
    sleeping_capsule_wakes_on_use,
    preview_url_tokens_and_traffic,
    insufficient_credits_sleep_and_refuse,
    reconcile_adopts_running_capsules,
);

/// DESIGN.md §7: durable stores run the exact-sum check with 10⁴ entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_sums_are_exact_over_ten_thousand_entries() {
    policy::money_sums_are_exact(&service, 10_000).await;
}
