//! Core benches: token verify + policy check per call, ledger charges in memory, and the
//! create → exec → terminate cycle on the mock.

use std::future::IntoFuture;
use std::hint::black_box;
use std::sync::Arc;

use capsules_backend_mock::MockBackend;
use capsules_core::ledger::{EntryKind, NewEntry};
use capsules_core::policy::{self, Action, Target};
use capsules_core::store::{Ledger, MemoryStore, Store, TokenStore};
use capsules_core::tokens::{self, Principal};
use capsules_core::types::{CapsuleName, MicroCredits};
use capsules_core::{Capsules, Scope, TokenSpec};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn service(store: Arc<dyn Store>) -> (Capsules, capsules_core::Bootstrapped) {
    let c = Capsules::builder()
        .backend(MockBackend::new())
        .shared_store(store)
        .build()
        .await
        .unwrap();
    let b = c.bootstrap("bench").await.unwrap();
    (c, b)
}

fn auth_and_policy(c: &mut Criterion) {
    let rt = rt();
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let (caps, boot) = rt.block_on(service(store.clone()));
    let agent = rt
        .block_on(
            caps.tokens(&boot.owner.secret)
                .create(TokenSpec::new([Scope::AgentWrite]).prefix("agent-")),
        )
        .unwrap();
    let secret = agent.secret.expose().to_owned();
    let team = boot.team.id.clone();
    let name = CapsuleName::new("agent-pr-482").unwrap();
    c.bench_function("token verify + policy check", |b| {
        b.to_async(&rt).iter(|| async {
            let id = tokens::parse_secret(&secret).unwrap();
            let chain = store.token_chain(&id).await.unwrap();
            assert!(tokens::verify_secret(&secret, &chain[0].secret_hash));
            assert!(chain.iter().all(|t| t.is_live(0)));
            let p = Principal::from_record(&chain[0]);
            policy::check(
                &p,
                &Action::Write,
                Target::Capsule {
                    team: &team,
                    name: &name,
                    id: None,
                },
            )
            .unwrap();
            black_box(p);
        })
    });
    let client = caps.connect(&secret).unwrap();
    let cap = rt.block_on(client.create("agent-status").into_future()).unwrap();
    c.bench_function("status call end to end (auth + resolve + policy)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(cap.status().await.unwrap()) })
    });
}

fn ledger_charges(c: &mut Criterion) {
    let rt = rt();
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let (_caps, boot) = rt.block_on(service(store.clone()));
    let team = boot.team.id.clone();
    let mut g = c.benchmark_group("ledger");
    const N: u64 = 10_000;
    g.throughput(Throughput::Elements(N));
    g.bench_function("charge entries in memory", |b| {
        b.to_async(&rt).iter(|| async {
            for _ in 0..N {
                let e = NewEntry {
                    at_ms: 0,
                    team: team.clone(),
                    capsule: None,
                    kind: EntryKind::Compute,
                    quantity: 1,
                    amount: MicroCredits::from_micros(-1000),
                    reason: None,
                };
                black_box(store.append_entry(e, None).await.unwrap());
            }
        })
    });
    g.finish();
}

fn mock_cycle(c: &mut Criterion) {
    let rt = rt();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (caps, boot) = rt.block_on(service(store));
    rt.block_on(caps.operator(&boot.operator.secret).grant("bench", "1000000", "bench"))
        .unwrap();
    let client = caps.connect(&boot.owner.secret).unwrap();
    let mut g = c.benchmark_group("mock");
    g.throughput(Throughput::Elements(1));
    g.bench_function("create + exec + terminate", |b| {
        b.to_async(&rt).iter(|| async {
            let cap = client.create("cycle").await.unwrap();
            let out = cap.exec(["echo", "hi"]).await.unwrap();
            assert_eq!(out.exit_code(), 0);
            cap.terminate().await.unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, auth_and_policy, ledger_charges, mock_cycle);
criterion_main!(benches);
