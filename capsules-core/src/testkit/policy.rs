//! The policy part of the contract suite: run against the service over the mock backend.
//!
//! Each case is a `pub async fn(&dyn ServiceFactory)` that panics on a broken rule; [`all`] runs
//! every case. Time moves only through the service's manual clock.

use std::time::Duration;

use super::{START_MS, Service, ServiceFactory};
use crate::backend::{ExecRequest, PtyRequest};
use crate::error::ErrorKind;
use crate::events::EventKind;
use crate::ledger::{EntryKind, NewEntry};
use crate::service::{Bootstrapped, ListOptions};
use crate::state::CapsuleState;
use crate::tokens::{Scope, TokenSpec};
use crate::types::{MicroCredits, Size, TeamCaps};

/// Every case, one after another, each on a fresh service.
pub async fn all(f: &dyn ServiceFactory) {
    bootstrap_once(f).await;
    prefix_limits_every_action(f).await;
    attenuation_in_every_dimension(f).await;
    concurrent_creates_of_one_name(f).await;
    run_sleep_run_bills_two_minutes(f).await;
    credit_limit_sleeps_and_blocks_wake(f).await;
    idle_sleep_and_activity(f).await;
    bad_input_is_refused_everywhere(f).await;
    terminate_twice_and_use_after(f).await;
    money_sums_are_exact(f, 1_000_000).await;
    team_cap_of_running_capsules(f).await;
    private_network_public_url_and_grants(f).await;
    revoke_cascades_and_tokens_write_sees_its_own(f).await;
    reused_name_keeps_histories_apart(f).await;
    sleeping_capsule_wakes_on_use(f).await;
    preview_url_tokens_and_traffic(f).await;
    insufficient_credits_sleep_and_refuse(f).await;
    reconcile_adopts_running_capsules(f).await;
    limits_after_create_and_max_runtime(f).await;
    console_counts_as_activity_and_is_audited(f).await;
    jobs_run_periodically(f).await;
}

async fn setup(f: &dyn ServiceFactory) -> (Service, Bootstrapped) {
    let s = f.make().await;
    let b = s.capsules.bootstrap("acme").await.expect("bootstrap on an empty store");
    (s, b)
}

fn at(s: &Service, secs: i64) {
    s.clock.set_ms(START_MS + secs * 1000);
}

async fn agent(s: &Service, b: &Bootstrapped, prefix: &str) -> String {
    s.capsules
        .tokens(b.owner.secret.expose())
        .create(TokenSpec::new([Scope::AgentWrite]).prefix(prefix))
        .await
        .expect("owner mints an agent token")
        .secret
        .expose()
        .to_owned()
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(r: crate::Result<T>, kind: ErrorKind, needle: &str) {
    match r {
        Ok(v) => panic!("expected {kind} containing {needle:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(
                e.message().to_lowercase().contains(&needle.to_lowercase()),
                "message {:?} should name {needle:?}",
                e.message()
            );
        }
    }
}

/// Bootstrap creates operator + first team + owner + 5.00, once; the operator's teams get 5.00.
pub async fn bootstrap_once(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    assert!(b.operator.record.scopes.contains(&Scope::Operator) && b.operator.record.team.is_none());
    assert!(b.owner.record.scopes.contains(&Scope::Admin));
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    assert_eq!(owner.balance().await.unwrap(), MicroCredits::credits(5));
    assert_kind(
        s.capsules.bootstrap("other").await.map(|_| ()),
        ErrorKind::Conflict,
        "not empty",
    );
    let op = s.capsules.operator(b.operator.secret.expose());
    let t2 = op.create_team("beta").await.unwrap();
    assert_eq!(op.balance("beta").await.unwrap(), MicroCredits::credits(5));
    assert_kind(
        op.create_team("beta").await.map(|_| ()),
        ErrorKind::AlreadyExists,
        "beta",
    );
    // The operator is outside every team.
    let as_client = s.capsules.connect(b.operator.secret.expose()).unwrap();
    assert_kind(
        as_client.create("x").await.map(|_| ()),
        ErrorKind::PermissionDenied,
        "operator",
    );
    // Teams are isolated: beta's owner cannot see acme's capsules.
    let acme_cap = owner.create("shared-name").await.unwrap();
    let beta = s.capsules.connect(t2.owner.secret.expose()).unwrap();
    assert!(beta.list().await.unwrap().is_empty());
    assert_kind(
        beta.capsule("shared-name").unwrap().status().await,
        ErrorKind::NotFound,
        "shared-name",
    );
    let id = acme_cap.status().await.unwrap().id;
    assert_kind(
        beta.capsule(id.as_str()).unwrap().status().await,
        ErrorKind::NotFound,
        "",
    );
}

/// A prefix `a-` token creates `a-1`; `b-*` is refused for create, exec and get; list shows `a-*`.
pub async fn prefix_limits_every_action(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    owner.create("b-x").await.unwrap();
    let a = s.capsules.connect(agent(&s, &b, "a-").await).unwrap();
    a.create("a-1").await.unwrap();
    assert_kind(a.create("b-1").await.map(|_| ()), ErrorKind::PermissionDenied, "prefix");
    let bx = a.capsule("b-x").unwrap();
    assert_kind(bx.exec(["true"]).await, ErrorKind::PermissionDenied, "prefix");
    assert_kind(bx.status().await, ErrorKind::PermissionDenied, "prefix");
    // By id too.
    let bx_id = owner.capsule("b-x").unwrap().status().await.unwrap().id;
    assert_kind(
        a.capsule(bx_id.as_str()).unwrap().status().await,
        ErrorKind::PermissionDenied,
        "prefix",
    );
    let names: Vec<String> = a
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name.to_string())
        .collect();
    assert_eq!(names, ["a-1"]);
    assert_eq!(owner.list().await.unwrap().len(), 2);
    // Denials are in the audit trail.
    let ev = owner.team_events().await.unwrap();
    assert!(ev.iter().any(|e| matches!(e.kind(), EventKind::Denied { .. })));
    // Nothing was charged for the refused create: exactly two capsules have entries.
    let ledger = owner.ledger().await.unwrap();
    let charged: std::collections::BTreeSet<_> = ledger.iter().filter_map(|e| e.entry.capsule.clone()).collect();
    assert_eq!(charged.len(), 2);
}

/// Minting a broader token from a narrower one fails, for each dimension.
pub async fn attenuation_in_every_dimension(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    s.clock.set_ms(START_MS);
    let parent = s
        .capsules
        .tokens(b.owner.secret.expose())
        .create(
            TokenSpec::new([Scope::AgentWrite, Scope::TokensWrite])
                .prefix("a-")
                .sizes([Size::S1x1gb, Size::S2x2gb])
                .max_credit_limit(MicroCredits::credits(2))
                .expires_at_ms(START_MS + 3_600_000),
        )
        .await
        .unwrap();
    let t = s.capsules.tokens(parent.secret.expose());
    let ok = TokenSpec::new([Scope::AgentWrite])
        .prefix("a-b-")
        .sizes([Size::S1x1gb])
        .max_credit_limit(MicroCredits::credits(1))
        .expires_at_ms(START_MS + 60_000);
    t.create(ok.clone()).await.expect("a narrower token mints");
    let cases: Vec<(&str, TokenSpec)> = vec![
        (
            "scope",
            TokenSpec {
                scopes: [Scope::BillingRead].into(),
                ..ok.clone()
            },
        ),
        (
            "scope",
            TokenSpec {
                scopes: [Scope::Admin].into(),
                ..ok.clone()
            },
        ),
        (
            "prefix",
            TokenSpec {
                prefix: Some("b-".into()),
                ..ok.clone()
            },
        ),
        (
            "prefix",
            TokenSpec {
                prefix: Some("a".into()),
                ..ok.clone()
            },
        ),
        (
            "sizes",
            TokenSpec {
                sizes: Some([Size::S4x8gb].into()),
                ..ok.clone()
            },
        ),
        (
            "sizes",
            TokenSpec {
                sizes: None,
                ..ok.clone()
            },
        ),
        (
            "credit limit",
            TokenSpec {
                max_credit_limit: Some(MicroCredits::credits(3)),
                ..ok.clone()
            },
        ),
        (
            "credit limit",
            TokenSpec {
                max_credit_limit: None,
                ..ok.clone()
            },
        ),
        (
            "expire",
            TokenSpec {
                expires_at_ms: Some(START_MS + 7_200_000),
                ..ok.clone()
            },
        ),
        (
            "expire",
            TokenSpec {
                expires_at_ms: None,
                ..ok.clone()
            },
        ),
    ];
    for (dim, spec) in cases {
        assert_kind(t.create(spec).await.map(|_| ()), ErrorKind::PermissionDenied, dim);
    }
    // A token without tokens:write cannot mint at all; agent:write must carry a prefix.
    let plain = agent(&s, &b, "z-").await;
    assert_kind(
        s.capsules
            .tokens(&plain)
            .create(TokenSpec::new([Scope::CapsulesRead]).prefix("z-"))
            .await
            .map(|_| ()),
        ErrorKind::PermissionDenied,
        "tokens:write",
    );
    assert_kind(
        s.capsules
            .tokens(b.owner.secret.expose())
            .create(TokenSpec::new([Scope::AgentWrite]))
            .await
            .map(|_| ()),
        ErrorKind::InvalidInput,
        "prefix",
    );
    // The bounds hold on use too: sizes and credit cap.
    let c = s.capsules.connect(parent.secret.expose()).unwrap();
    assert_kind(
        c.create("a-big").size("4x8gb").await.map(|_| ()),
        ErrorKind::PermissionDenied,
        "size",
    );
    assert_kind(
        c.create("a-rich").credit_limit("2.50").await.map(|_| ()),
        ErrorKind::PermissionDenied,
        "credit limit",
    );
    // Expiry: after it, the token no longer authenticates.
    s.clock.set_ms(START_MS + 3_600_000);
    assert_kind(c.list().await, ErrorKind::Unauthenticated, "expired");
}

/// 20 concurrent creates of one name: one capsule, 19 `AlreadyExists`, nothing charged for them.
pub async fn concurrent_creates_of_one_name(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = owner.clone();
        tasks.push(tokio::spawn(async move { c.create("same").size("2x2gb").await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}"),
        }
    }
    assert_eq!(ok, 1);
    let all = owner
        .list_with(ListOptions {
            include_terminated: true,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let ledger = owner.ledger().await.unwrap();
    let compute: Vec<_> = ledger.iter().filter(|e| e.entry.kind == EntryKind::Compute).collect();
    assert_eq!(compute.len(), 1, "only the winner's first minute");
    assert_eq!(
        owner.balance().await.unwrap(),
        MicroCredits::from_micros(5_000_000 - 2000 - 1000),
        "5.00 - first minute of 2x2gb - first storage hour of 10 GiB"
    );
}

/// Run 50 s, sleep 300 s, run 50 s, terminate: 2 compute minutes; sleep and wake recorded;
/// storage for every started hour of the whole time (checked over a long sleep too).
pub async fn run_sleep_run_bills_two_minutes(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner.create("meter").size("2x2gb").await.unwrap();
    for t in (10..=50).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    cap.sleep().await.unwrap();
    for t in (60..=350).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    cap.wake().await.unwrap();
    for t in (360..=400).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    cap.terminate().await.unwrap();
    let u = cap.usage().await.unwrap();
    assert_eq!(u.usage.compute_minutes, 2);
    assert_eq!(u.usage.compute_cost, MicroCredits::from_micros(4000));
    assert_eq!(u.usage.storage_gib_hours, 10, "one started hour of 10 GiB");
    assert_eq!(u.usage.cost, MicroCredits::from_micros(4000 + 1000));
    let ev = cap.events().await.unwrap();
    let states: Vec<CapsuleState> = ev
        .iter()
        .filter_map(|e| match e.kind() {
            EventKind::StateChanged { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    use CapsuleState::*;
    assert_eq!(
        states,
        [Running, Suspending, Sleeping, Waking, Running, Terminating, Terminated]
    );

    // Storage accrues while asleep: asleep from 60 s to 2 h 30 min → 3 started hours.
    at(&s, 1000);
    let cap = owner.create("sleeper").await.unwrap();
    at(&s, 1070);
    cap.sleep().await.unwrap();
    for t in (1100..=1000 + 9000).step_by(600) {
        at(&s, t);
        s.capsules.tick().await;
    }
    at(&s, 1000 + 9000);
    cap.terminate().await.unwrap();
    let u = cap.usage().await.unwrap();
    assert_eq!(
        u.usage.compute_minutes, 2,
        "minute 0 at 1000 s and minute 1 at 1060 s (asleep at 1070 s)"
    );
    assert_eq!(u.usage.storage_gib_hours, 30, "hours starting at 0, 1 h and 2 h");
}

/// Credit limit 0.01 on 2x2gb with 10 GiB: 3000 µcr at minute 0, then 2000 per minute; sleeps
/// at t = 240 s with `credit_limit_reached` having been charged 9000 µcr; wake refused naming the
/// credit limit until it is raised.
pub async fn credit_limit_sleeps_and_blocks_wake(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner.create("cheap").size("2x2gb").credit_limit("0.01").await.unwrap();
    assert_eq!(cap.usage().await.unwrap().usage.cost, MicroCredits::from_micros(3000));
    let mut slept_at = None;
    for t in (10..=400).step_by(10) {
        at(&s, t);
        let r = s.capsules.tick().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        if slept_at.is_none() && cap.status().await.unwrap().state == CapsuleState::Sleeping {
            slept_at = Some(t);
        }
    }
    assert_eq!(slept_at, Some(240));
    let u = cap.usage().await.unwrap();
    assert_eq!(u.usage.cost, MicroCredits::from_micros(9000));
    assert_eq!(u.usage.compute_minutes, 4);
    let ev = cap.events().await.unwrap();
    let hit = ev
        .iter()
        .find(|e| e.reason() == Some("credit_limit_reached"))
        .expect("a credit_limit_reached event");
    assert_eq!(hit.event.at_ms, START_MS + 240_000);
    assert_eq!(cap.status().await.unwrap().state_reason, "credit_limit_reached");
    assert_kind(cap.wake().await, ErrorKind::LimitExceeded, "credit limit");
    assert_kind(cap.exec(["true"]).await, ErrorKind::LimitExceeded, "credit limit");
    cap.update().credit_limit("1.00").await.unwrap();
    let r = cap.wake().await.unwrap();
    assert_eq!(r.state, CapsuleState::Running);
}

/// Idle timeout 2 min, polled by status every 10 s: sleeps at 2 min. With a background process
/// running: stays awake.
pub async fn idle_sleep_and_activity(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let idle = owner
        .create("idle")
        .idle_timeout(Duration::from_secs(120))
        .await
        .unwrap();
    let busy = owner
        .create("busy")
        .idle_timeout(Duration::from_secs(120))
        .await
        .unwrap();
    busy.spawn(ExecRequest::new(["sleep", "100000"])).await.unwrap();
    let mut idle_slept = None;
    for t in (10..=300).step_by(10) {
        at(&s, t);
        idle.status().await.unwrap();
        busy.status().await.unwrap();
        s.capsules.tick().await;
        if idle_slept.is_none() && idle.status().await.unwrap().state == CapsuleState::Sleeping {
            idle_slept = Some(t);
        }
    }
    assert_eq!(
        idle_slept,
        Some(120),
        "idle sleeps at 2 min; status never counts as activity"
    );
    assert_eq!(idle.status().await.unwrap().state_reason, "idle_timeout");
    assert_eq!(idle.usage().await.unwrap().usage.compute_minutes, 2);
    assert_eq!(busy.status().await.unwrap().state, CapsuleState::Running);
    busy.terminate().await.unwrap();
    idle.terminate().await.unwrap();
}

/// Bad input at every entry point → `InvalidInput` (or `Unsupported`) naming the rule; nothing
/// is created or charged.
pub async fn bad_input_is_refused_everywhere(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let long = "a".repeat(64);
    for name in ["Agent-1", "ünï", long.as_str(), "1abc", "a_b", "", "a-"] {
        assert_kind(
            owner.create(name).await.map(|_| ()),
            ErrorKind::InvalidInput,
            "a-z, 0-9",
        );
    }
    assert_kind(
        owner.create("ok").size("3x3gb").await.map(|_| ()),
        ErrorKind::InvalidInput,
        "1x1gb, 2x2gb",
    );
    assert_kind(
        owner.create("ok").size("gpu-1x").await.map(|_| ()),
        ErrorKind::Unsupported,
        "gpu",
    );
    assert_kind(
        owner.create("ok").region("us-east").await.map(|_| ()),
        ErrorKind::Unsupported,
        "eu-central",
    );
    assert_kind(
        owner.create("ok").image("windows-11").await.map(|_| ()),
        ErrorKind::Unsupported,
        "windows",
    );
    assert_kind(
        owner.create("ok").image("arch").await.map(|_| ()),
        ErrorKind::InvalidInput,
        "full, small",
    );
    for (c, why) in [
        ("-1", "negative"),
        ("1e3", "exponent"),
        ("0.0000001", "6 decimals"),
        ("abc", "decimal"),
    ] {
        assert_kind(
            owner.create("ok").credit_limit(c).await.map(|_| ()),
            ErrorKind::InvalidInput,
            why,
        );
    }
    assert_kind(
        owner.create("ok").disk_gib(11).await.map(|_| ()),
        ErrorKind::InvalidInput,
        "GiB",
    );
    assert_kind(
        owner.create("ok").network("open").await.map(|_| ()),
        ErrorKind::InvalidInput,
        "internet, none",
    );
    assert_kind(
        owner
            .create("ok")
            .idle_timeout(Duration::from_secs(1))
            .await
            .map(|_| ()),
        ErrorKind::InvalidInput,
        "1 minute",
    );
    assert_kind(
        TokenSpec::parse_scopes(["capsules:read", "root"]).map(|_| ()),
        ErrorKind::InvalidInput,
        "agent:write",
    );
    assert_kind(owner.capsule("Bad_Name").map(|_| ()), ErrorKind::InvalidInput, "id");
    assert_kind(
        s.capsules.connect("not-a-token").map(|_| ()),
        ErrorKind::Unauthenticated,
        "malformed",
    );
    assert!(
        owner
            .list_with(ListOptions {
                include_terminated: true
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(owner.balance().await.unwrap(), MicroCredits::credits(5));
    assert_eq!(owner.ledger().await.unwrap().len(), 1, "only the onboarding grant");
}

/// Terminate twice → ok; exec on a terminated capsule → `Conflict` naming the state by id,
/// `NotFound` by name.
pub async fn terminate_twice_and_use_after(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let cap = owner.create("done").await.unwrap();
    let id = cap.status().await.unwrap().id;
    cap.terminate().await.unwrap();
    cap.terminate().await.unwrap();
    owner.capsule("done").unwrap().terminate().await.unwrap();
    assert_kind(cap.exec(["true"]).await, ErrorKind::Conflict, "terminated");
    assert_kind(
        owner.capsule("done").unwrap().exec(["true"]).await,
        ErrorKind::NotFound,
        "done",
    );
    // Read-only calls by name fall back to the most recently terminated capsule.
    let st = owner.capsule("done").unwrap().status().await.unwrap();
    assert_eq!((st.id, st.state), (id, CapsuleState::Terminated));
    assert_kind(cap.wake().await, ErrorKind::Conflict, "terminated");
    assert!(owner.list().await.unwrap().is_empty());
    assert_eq!(
        owner
            .list_with(ListOptions {
                include_terminated: true
            })
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Money sums are exact over `n` entries (10⁶ in memory; 10⁴ for durable stores).
pub async fn money_sums_are_exact(f: &dyn ServiceFactory, n: usize) {
    let (s, b) = setup(f).await;
    let team = b.team.id.clone();
    let mut expected: i64 = 5_000_000;
    for i in 0..n {
        let micros = (i % 997) as i64 + 1;
        expected += micros;
        s.store
            .append_entry(
                NewEntry::grant(START_MS, &team, MicroCredits::from_micros(micros), "sum test"),
                None,
            )
            .await
            .unwrap();
    }
    assert_eq!(s.store.balance(&team).await.unwrap().micros(), expected);
    let entries = s.store.entries(&team).await.unwrap();
    assert_eq!(entries.len(), n + 1);
    let sum = MicroCredits::sum(entries.iter().map(|e| e.entry.amount)).unwrap();
    assert_eq!(sum.micros(), expected);
}

/// Team cap of 3 running with 3 running: a 4th create, a wake of a sleeping one, and 10 parallel
/// creates all get `LimitExceeded`; usage never shows more than 3 running.
pub async fn team_cap_of_running_capsules(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let op = s.capsules.operator(b.operator.secret.expose());
    op.set_caps(
        "acme",
        TeamCaps {
            max_running: 3,
            ..TeamCaps::default()
        },
    )
    .await
    .unwrap();
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    owner.create("c1").await.unwrap();
    owner.create("c2").await.unwrap();
    let c3 = owner.create("c3").await.unwrap();
    assert_kind(
        owner.create("c4").await.map(|_| ()),
        ErrorKind::LimitExceeded,
        "3 running",
    );
    c3.sleep().await.unwrap();
    owner.create("c4").await.unwrap();
    assert_kind(c3.wake().await, ErrorKind::LimitExceeded, "3 running");
    assert_kind(c3.exec(["true"]).await, ErrorKind::LimitExceeded, "3 running");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = owner.clone();
        tasks.push(tokio::spawn(async move { c.create(format!("p{i}")).await.map(|_| ()) }));
    }
    for t in tasks {
        assert_kind(t.await.unwrap(), ErrorKind::LimitExceeded, "3 running");
    }
    let u = owner.usage().await.unwrap();
    assert_eq!(u.running, 3);
    assert_eq!(owner.list().await.unwrap().len(), 4);
    // Other caps: size and vCPUs.
    op.set_caps(
        "acme",
        TeamCaps {
            max_running: 10,
            max_size: Size::S2x2gb,
            ..TeamCaps::default()
        },
    )
    .await
    .unwrap();
    assert_kind(
        owner.create("huge").size("4x8gb").await.map(|_| ()),
        ErrorKind::LimitExceeded,
        "max size",
    );
    op.set_caps(
        "acme",
        TeamCaps {
            max_vcpus: 4,
            ..TeamCaps::default()
        },
    )
    .await
    .unwrap();
    assert_kind(
        owner.create("two").size("2x2gb").await.map(|_| ()),
        ErrorKind::LimitExceeded,
        "vcpus",
    );
}

/// `agent:write` cannot allow 10.0.0.0/8 or expose a public URL; `admin` can. A team's `admin`
/// cannot grant credits; the operator can.
pub async fn private_network_public_url_and_grants(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let a = s.capsules.connect(agent(&s, &b, "agent-").await).unwrap();
    let cap = a.create("agent-1").await.unwrap();
    assert_kind(
        cap.update().network("allow:10.0.0.0/8").await,
        ErrorKind::PermissionDenied,
        "network:private",
    );
    assert_kind(
        a.create("agent-2").network("allow:10.0.0.0/8").await.map(|_| ()),
        ErrorKind::PermissionDenied,
        "network:private",
    );
    assert_kind(
        cap.expose(8080, "public").await,
        ErrorKind::PermissionDenied,
        "urls:public",
    );
    cap.update()
        .network("allow:203.0.113.0/24,registry.npmjs.org")
        .await
        .unwrap();
    let url = cap.expose(8080, "token").await.unwrap();
    assert!(url.host_label.starts_with("agent-1-"));
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let same = owner.capsule("agent-1").unwrap();
    let r = same.update().network("allow:10.0.0.0/8").await.unwrap();
    assert_eq!(r.network.to_string(), "allow:10.0.0.0/8");
    let url2 = same.expose(3000, "public").await.unwrap();
    assert_eq!(url2.host_label, url.host_label, "the label is kept");
    // Grants.
    let by_admin = s
        .capsules
        .operator(b.owner.secret.expose())
        .grant("acme", "10.00", "free money")
        .await;
    assert_kind(by_admin, ErrorKind::PermissionDenied, "operator");
    let op = s.capsules.operator(b.operator.secret.expose());
    let e = op.grant("acme", "2.50", "pilot").await.unwrap();
    assert_eq!(e.entry.reason.as_deref(), Some("pilot"));
    assert_eq!(owner.balance().await.unwrap().micros(), 7_500_000 - (1000 + 1000));
    assert_kind(
        op.grant("acme", "1", " ").await.map(|_| ()),
        ErrorKind::InvalidInput,
        "reason",
    );
}

/// Revoking a token that minted two others fails all three at once; a `tokens:write` token cannot
/// list or revoke tokens it did not mint.
pub async fn revoke_cascades_and_tokens_write_sees_its_own(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner_t = s.capsules.tokens(b.owner.secret.expose());
    let parent = owner_t
        .create(TokenSpec::new([Scope::AgentWrite, Scope::TokensWrite]).prefix("a-"))
        .await
        .unwrap();
    let pt = s.capsules.tokens(parent.secret.expose());
    let k1 = pt
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("a-1"))
        .await
        .unwrap();
    let k2 = pt
        .create(TokenSpec::new([Scope::CapsulesRead]).prefix("a-2"))
        .await
        .unwrap();
    let other = owner_t.create(TokenSpec::new([Scope::TokensWrite])).await.unwrap();
    let ot = s.capsules.tokens(other.secret.expose());
    let mine = ot.create(TokenSpec::new([Scope::TokensWrite])).await.unwrap();
    let seen: Vec<_> = ot.list().await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(seen, std::slice::from_ref(&mine.id), "only what it minted");
    assert_kind(ot.revoke(k1.id.as_str()).await, ErrorKind::NotFound, "minted");
    assert_kind(ot.revoke(parent.id.as_str()).await, ErrorKind::NotFound, "minted");
    assert_eq!(pt.list().await.unwrap().len(), 2);
    assert!(
        owner_t.list().await.unwrap().len() >= 6,
        "admin sees every token of the team"
    );
    for t in [&parent, &k1, &k2] {
        s.capsules.connect(t.secret.expose()).unwrap().list().await.unwrap();
    }
    let revoked = owner_t.revoke(parent.id.as_str()).await.unwrap();
    assert_eq!(revoked.len(), 3);
    for t in [&parent, &k1, &k2] {
        assert_kind(
            s.capsules.connect(t.secret.expose()).unwrap().list().await,
            ErrorKind::Unauthenticated,
            "revoked",
        );
    }
    // The unrelated branch still works.
    ot.list().await.unwrap();
    // A wrong secret for a real id fails the same way as an unknown one.
    let forged = format!("cap_{}_{}", other.id, "0".repeat(64));
    assert_kind(
        s.capsules.connect(&forged).unwrap().list().await,
        ErrorKind::Unauthenticated,
        "not known",
    );
}

/// A name reused after terminate: the new capsule's events and usage exclude the old one's; the
/// old one's stay queryable by id.
pub async fn reused_name_keeps_histories_apart(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let old = owner.create("reuse").await.unwrap();
    old.exec(["echo", "old"]).await.unwrap();
    at(&s, 130);
    s.capsules.tick().await;
    old.terminate().await.unwrap();
    let old_id = old.status().await.unwrap().id;
    let new = owner.create("reuse").await.unwrap();
    let new_id = new.status().await.unwrap().id;
    assert_ne!(old_id, new_id);
    let by_name = owner.capsule("reuse").unwrap();
    assert_eq!(by_name.status().await.unwrap().id, new_id);
    let new_events = by_name.events().await.unwrap();
    assert!(new_events.iter().all(|e| e.event.capsule.as_ref() == Some(&new_id)));
    assert!(!new_events.iter().any(|e| matches!(e.kind(), EventKind::Exec { .. })));
    assert_eq!(by_name.usage().await.unwrap().usage.compute_minutes, 1);
    let old_by_id = owner.capsule(old_id.as_str()).unwrap();
    assert_eq!(old_by_id.usage().await.unwrap().usage.compute_minutes, 3);
    let old_events = old_by_id.events().await.unwrap();
    let exec = old_events
        .iter()
        .find_map(|e| match e.kind() {
            EventKind::Exec { argv, exit_code, .. } => Some((argv.clone(), *exit_code, e.event.token.clone())),
            _ => None,
        })
        .expect("the exec is in the old capsule's trail");
    assert_eq!(exec.0, ["echo", "old"]);
    assert_eq!(exec.1, Some(0));
    assert_eq!(exec.2, Some(b.owner.id.clone()));
}

/// exec / files on a sleeping capsule wake it; sleep of a sleeping capsule is ok.
pub async fn sleeping_capsule_wakes_on_use(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let cap = owner.create("napper").await.unwrap();
    cap.write_file("/workspace/a.txt", "hello").await.unwrap();
    cap.sleep().await.unwrap();
    cap.sleep().await.unwrap();
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Sleeping);
    let out = cap.exec(["cat", "/workspace/a.txt"]).await.unwrap();
    assert_eq!(out.stdout_lossy(), "hello");
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Running);
    cap.sleep().await.unwrap();
    assert_eq!(cap.read_file("/workspace/a.txt").await.unwrap(), b"hello");
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Running);
    let ev = cap.events().await.unwrap();
    assert!(
        ev.iter()
            .any(|e| matches!(e.kind(), EventKind::FileWritten { bytes: 5, .. }))
    );
}

/// Preview: host label → capsule, token access needs a token that can read it or a preview token
/// for it; the preview token opens nothing else; traffic is metered per MiB with the remainder
/// carried and the last partial MiB charged at terminate.
pub async fn preview_url_tokens_and_traffic(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let cap = owner.create("web").await.unwrap();
    let other = owner.create("web2").await.unwrap();
    let url = cap.expose(8080, "token").await.unwrap();
    let url2 = other.expose(8080, "token").await.unwrap();
    let pv = s.capsules.preview();
    let t = pv.resolve(&url.host_label).await.unwrap();
    assert_eq!((t.port, t.name.as_str()), (8080, "web"));
    assert_kind(
        pv.authorize(&url.host_label, None).await,
        ErrorKind::Unauthenticated,
        "token",
    );
    pv.authorize(&url.host_label, Some(b.owner.secret.expose()))
        .await
        .unwrap();
    let ptok = cap.preview_token(Duration::from_secs(3600)).await.unwrap();
    pv.authorize(&url.host_label, Some(ptok.secret.expose())).await.unwrap();
    assert_kind(
        pv.authorize(&url2.host_label, Some(ptok.secret.expose())).await,
        ErrorKind::PermissionDenied,
        "preview",
    );
    let as_client = s.capsules.connect(ptok.secret.expose()).unwrap();
    assert_kind(
        as_client.capsule("web").unwrap().exec(["true"]).await,
        ErrorKind::PermissionDenied,
        "preview",
    );
    assert_kind(as_client.list().await, ErrorKind::PermissionDenied, "preview");
    assert_kind(
        pv.resolve("nothing-here-abcdefgh").await,
        ErrorKind::NotFound,
        "nothing",
    );
    let id = cap.status().await.unwrap().id;
    pv.record_traffic(&id, 1 << 20 | 1 << 19).await.unwrap();
    assert_eq!(
        cap.usage().await.unwrap().usage.traffic_cost,
        MicroCredits::from_micros(50)
    );
    pv.record_traffic(&id, 1 << 19).await.unwrap();
    pv.record_traffic(&id, 10).await.unwrap();
    assert_eq!(cap.usage().await.unwrap().usage.traffic_mib, 2);
    cap.terminate().await.unwrap();
    let u = cap.usage().await.unwrap().usage;
    assert_eq!(
        (u.traffic_mib, u.traffic_cost, u.preview_bytes),
        (3, MicroCredits::from_micros(150), (2 << 20) + 10)
    );
    assert_kind(pv.resolve(&url.host_label).await, ErrorKind::NotFound, "");
    // Wake on use through the proxy path.
    other.sleep().await.unwrap();
    let t2 = pv
        .authorize(&url2.host_label, Some(b.owner.secret.expose()))
        .await
        .unwrap();
    let _ = pv.open(&t2).await;
    assert_eq!(other.status().await.unwrap().state, CapsuleState::Running);
}

/// When the team balance cannot pay, running capsules sleep and create/wake get
/// `InsufficientCredits`.
pub async fn insufficient_credits_sleep_and_refuse(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner
        .create("spender")
        .size("4x8gb")
        .credit_limit("50.00")
        .idle_timeout(Duration::from_secs(30 * 24 * 3600))
        .await
        .unwrap();
    // 5.00 pays about 800 minutes of 4x8gb (6000/min) plus storage.
    let mut t = 0;
    while cap.status().await.unwrap().state == CapsuleState::Running && t < 100_000 {
        t += 60;
        at(&s, t);
        s.capsules.tick().await;
    }
    let st = cap.status().await.unwrap();
    assert_eq!(
        (st.state, st.state_reason.as_str()),
        (CapsuleState::Sleeping, "insufficient_credits")
    );
    assert!(!owner.balance().await.unwrap().is_negative());
    assert_kind(
        owner.create("more").await.map(|_| ()),
        ErrorKind::InsufficientCredits,
        "balance",
    );
    assert_kind(cap.wake().await, ErrorKind::InsufficientCredits, "balance");
    s.capsules
        .operator(b.operator.secret.expose())
        .grant("acme", "5.00", "top-up")
        .await
        .unwrap();
    cap.wake().await.unwrap();
}

/// Reconcile adopts running capsules and charges at once the minutes they ran unmetered.
pub async fn reconcile_adopts_running_capsules(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner.create("adopted").await.unwrap();
    // Nothing metered for ten minutes (a host restart).
    at(&s, 600);
    let changed = s.capsules.reconcile().await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(
        cap.usage().await.unwrap().usage.compute_minutes,
        11,
        "minutes 0..=10 started by 600 s"
    );
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Running);
    assert!(
        cap.events()
            .await
            .unwrap()
            .iter()
            .any(|e| matches!(e.kind(), EventKind::Reconciled { .. }))
    );
}

/// Limits change after create within the token's bounds; the max runtime sleeps the capsule with
/// `runtime_limit_reached` and blocks wake until raised; restart boots a sleeping capsule.
pub async fn limits_after_create_and_max_runtime(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let capped = s
        .capsules
        .tokens(b.owner.secret.expose())
        .create(
            TokenSpec::new([Scope::AgentWrite])
                .prefix("l-")
                .max_credit_limit(MicroCredits::credits(1)),
        )
        .await
        .unwrap();
    let c = s.capsules.connect(capped.secret.expose()).unwrap();
    at(&s, 0);
    let cap = c
        .create("l-1")
        .max_runtime(Duration::from_secs(120))
        .idle_timeout(Duration::from_secs(30 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(
        cap.status().await.unwrap().limits.credit_limit,
        MicroCredits::credits(1)
    );
    assert_kind(
        cap.update().credit_limit("2.00").await,
        ErrorKind::PermissionDenied,
        "max credit limit",
    );
    let r = cap.update().credit_limit("0.50").await.unwrap();
    assert_eq!(r.limits.credit_limit, MicroCredits::from_micros(500_000));
    // Below what it has already spent: refused, naming the least allowed; nothing changes.
    let spent = cap.status().await.unwrap().meter.spent;
    assert!(spent > MicroCredits::ZERO);
    assert_kind(
        cap.update().credit_limit("0").await,
        ErrorKind::InvalidInput,
        "already spent",
    );
    assert_eq!(
        cap.status().await.unwrap().limits.credit_limit,
        MicroCredits::from_micros(500_000)
    );
    assert_kind(
        cap.update().idle_timeout(Duration::from_secs(1)).await,
        ErrorKind::InvalidInput,
        "1 minute",
    );
    for t in (10..=200).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    let st = cap.status().await.unwrap();
    assert_eq!(
        (st.state, st.state_reason.as_str()),
        (CapsuleState::Sleeping, "runtime_limit_reached")
    );
    assert_eq!(cap.usage().await.unwrap().usage.compute_minutes, 2);
    assert_kind(cap.wake().await, ErrorKind::LimitExceeded, "max runtime");
    cap.update().max_runtime(Duration::from_secs(3600)).await.unwrap();
    cap.wake().await.unwrap();
    cap.sleep().await.unwrap();
    if s.capsules.capabilities().restart {
        let r = cap.restart().await.unwrap();
        assert_eq!(r.state, CapsuleState::Running);
    }
}

/// An attached console keeps a capsule awake; attach and detach are in the audit trail.
pub async fn console_counts_as_activity_and_is_audited(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    if !s.capsules.capabilities().pty {
        return;
    }
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner
        .create("tty")
        .idle_timeout(Duration::from_secs(120))
        .await
        .unwrap();
    let console = cap
        .console(PtyRequest {
            argv: None,
            cols: 80,
            rows: 24,
            env: Default::default(),
            cwd: None,
        })
        .await
        .unwrap();
    for t in (10..=300).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    assert_eq!(
        cap.status().await.unwrap().state,
        CapsuleState::Running,
        "an attached console is activity"
    );
    drop(console);
    for t in (310..=450).step_by(10) {
        at(&s, t);
        s.capsules.tick().await;
    }
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Sleeping);
    // The detach event is written in the background when the console is dropped.
    let mut detached = false;
    for _ in 0..100 {
        let ev = cap.events().await.unwrap();
        assert!(ev.iter().any(|e| matches!(e.kind(), EventKind::ConsoleAttached)));
        if ev.iter().any(|e| matches!(e.kind(), EventKind::ConsoleDetached { .. })) {
            detached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(detached, "console detach is audited");
}

/// `spawn_jobs` runs `tick` periodically: an idle capsule goes to sleep without anyone calling it.
pub async fn jobs_run_periodically(f: &dyn ServiceFactory) {
    let (s, b) = setup(f).await;
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    at(&s, 0);
    let cap = owner
        .create("lazy")
        .idle_timeout(Duration::from_secs(60))
        .await
        .unwrap();
    let jobs = s.capsules.spawn_jobs(Duration::from_millis(5));
    at(&s, 61);
    let mut state = CapsuleState::Running;
    for _ in 0..400 {
        state = cap.status().await.unwrap().state;
        if state == CapsuleState::Sleeping {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    jobs.abort();
    assert_eq!(state, CapsuleState::Sleeping);
    assert_eq!(cap.status().await.unwrap().state_reason, "idle_timeout");
}
