//! The policy part of core's contract suite, on the mock backend + the in-memory store + a manual
//! clock.

use std::sync::Arc;

use capsules_backend_mock::MockBackend;
use capsules_core::store::MemoryStore;
use capsules_core::testkit::{Service, policy};

async fn service() -> Service {
    Service::new(Arc::new(MockBackend::new()), Arc::new(MemoryStore::new())).await
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
    limits_after_create_and_max_runtime,
    console_counts_as_activity_and_is_audited,
    jobs_run_periodically,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_sums_are_exact_over_a_million_entries() {
    policy::money_sums_are_exact(&service, 1_000_000).await;
}
