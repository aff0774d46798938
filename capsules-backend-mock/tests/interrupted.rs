//! A host that dies in the middle of a create or a wake (the future is dropped while the backend
//! call is in flight, as when the server is killed): at the next start, reconcile refunds the
//! start that never happened instead of charging minutes nobody ran.

use std::sync::Arc;
use std::time::Duration;

use capsules_backend_mock::{MemoryStore, MockBackend, Op};
use capsules_core::state::CapsuleState;
use capsules_core::testkit::{START_MS, Service};
use capsules_core::types::MicroCredits;
use capsules_core::{Backend, ListOptions};

async fn setup() -> (Service, MockBackend, String) {
    let mock = MockBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mock.clone());
    let s = Service::new(backend, Arc::new(MemoryStore::new())).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    (s, mock, b.owner.secret.expose().to_owned())
}

/// Net of the ledger entries of `capsule`.
async fn net(s: &Service, owner: &str, capsule: &capsules_core::CapsuleId) -> i64 {
    let entries = s.capsules.connect(owner).unwrap().ledger().await.unwrap();
    let mine = entries.iter().filter(|e| e.entry.capsule.as_ref() == Some(capsule));
    MicroCredits::sum(mine.map(|e| e.entry.amount)).unwrap().micros()
}

#[tokio::test]
async fn a_create_cut_short_is_refunded_and_terminated() {
    let (s, mock, owner) = setup().await;
    mock.delay_next(Op::Create, 1, Duration::from_secs(30));
    let c = s.capsules.connect(&owner).unwrap();
    let task = tokio::spawn(async move { c.create("cut-1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let _ = task.await;
    let c = s.capsules.connect(&owner).unwrap();
    let rec = c
        .list_with(ListOptions {
            include_terminated: true,
        })
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name.as_str() == "cut-1")
        .expect("the record of the create in flight");
    assert_eq!(rec.state, CapsuleState::Creating, "the create was cut mid-backend call");
    assert!(
        net(&s, &owner, &rec.id).await < 0,
        "the create charged its first minute up front"
    );

    // The next start: the backend has no such VM.
    s.capsules.reconcile().await.unwrap();
    let rec = c.capsule(rec.id.as_str()).unwrap().status().await.unwrap();
    assert_eq!(rec.state, CapsuleState::Terminated, "{rec:?}");
    assert_eq!(
        net(&s, &owner, &rec.id).await,
        0,
        "an interrupted create is charged nothing"
    );
    // The name is free again.
    c.create("cut-1").await.unwrap();
}

#[tokio::test]
async fn a_wake_cut_short_goes_back_to_sleep_refunded() {
    let (s, mock, owner) = setup().await;
    let c = s.capsules.connect(&owner).unwrap();
    let cap = c.create("nap-1").await.unwrap();
    s.clock.set_ms(START_MS + 30_000);
    cap.sleep().await.unwrap();
    let id = cap.status().await.unwrap().id;
    let before = net(&s, &owner, &id).await;
    // The wake starts a new run five minutes later.
    s.clock.set_ms(START_MS + 300_000);
    mock.delay_next(Op::Wake, 1, Duration::from_secs(30));
    let h = c.capsule("nap-1").unwrap();
    let task = tokio::spawn(async move { h.wake().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let _ = task.await;
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Waking);

    assert!(
        net(&s, &owner, &id).await < before,
        "the wake charged its first minute up front"
    );
    s.clock.set_ms(START_MS + 310_000);
    s.capsules.reconcile().await.unwrap();
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Sleeping);
    assert_eq!(
        net(&s, &owner, &id).await,
        before,
        "an interrupted wake is charged nothing"
    );
    cap.wake().await.unwrap();
    assert_eq!(cap.status().await.unwrap().state, CapsuleState::Running);
}
