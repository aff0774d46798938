//! SQLite store benches: durable ledger charges (one transaction each) with `synchronous = FULL`
//! and `NORMAL`, sequential and from concurrent callers, and a metering tick of a running capsule.

use std::sync::Arc;

use capsules_backend_mock::MockBackend;
use capsules_core::ledger::{EntryKind, NewEntry};
use capsules_core::store::{Ledger, Store};
use capsules_core::types::{MicroCredits, TeamId};
use capsules_core::{Capsules, ManualClock};
use capsules_store_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn charge(team: &TeamId) -> NewEntry {
    NewEntry {
        at_ms: 0,
        team: team.clone(),
        capsule: None,
        kind: EntryKind::Compute,
        quantity: 1,
        amount: MicroCredits::from_micros(-1000),
        reason: None,
    }
}

async fn setup(dir: &std::path::Path, sync: Synchronous) -> (SqliteStore, Capsules, TeamId) {
    let store = SqliteStore::open_with(
        dir.join(format!("{sync:?}.db")),
        SqliteOptions {
            synchronous: sync,
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let c = Capsules::builder()
        .backend(MockBackend::new())
        .shared_store(shared)
        .clock(Arc::new(ManualClock::new(1_800_000_000_000)))
        .build()
        .await
        .unwrap();
    let b = c.bootstrap("bench").await.unwrap();
    (store, c, b.team.id)
}

fn charges(c: &mut Criterion) {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let (store, _caps, team) = rt.block_on(setup(dir.path(), sync));
        let mut g = c.benchmark_group(format!("sqlite charge, synchronous={sync:?}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("one caller", |b| {
            b.to_async(&rt).iter(|| async {
                store.append_entry(charge(&team), None).await.unwrap();
            })
        });
        const PAR: u64 = 32;
        g.throughput(Throughput::Elements(PAR));
        g.bench_function(format!("{PAR} concurrent callers"), |b| {
            b.to_async(&rt).iter(|| async {
                let mut tasks = Vec::new();
                for _ in 0..PAR {
                    let (s, t) = (store.clone(), team.clone());
                    tasks.push(tokio::spawn(
                        async move { s.append_entry(charge(&t), None).await.unwrap() },
                    ));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
        });
        g.finish();
        // The sums stayed exact.
        let entries = rt.block_on(store.entries(&team)).unwrap();
        let sum = MicroCredits::sum(entries.iter().map(|e| e.entry.amount)).unwrap();
        assert_eq!(rt.block_on(store.balance(&team)).unwrap(), sum);
    }
}

criterion_group!(benches, charges);
criterion_main!(benches);
