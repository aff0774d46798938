//! Durability: what a committed step leaves survives a reopen (and a `kill -9`), and a step that
//! fails leaves nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use capsules_backend_mock::MockBackend;
use capsules_core::events::{EventKind, NewEvent};
use capsules_core::ledger::{EntryKind, NewEntry};
use capsules_core::records::TeamRecord;
use capsules_core::store::{CapsuleStore, EventLog, Ledger, Store, TokenStore};
use capsules_core::testkit::{START_MS, Service};
use capsules_core::types::{MicroCredits, TeamCaps, TeamId, TeamName};
use capsules_core::{ErrorKind, Scope, TokenSpec};
use capsules_store_sqlite::{SCHEMA_VERSION, SqliteStore};

fn db_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    // A nested directory: `open` creates it.
    let path = dir.path().join("state").join("capsules.db");
    (dir, path)
}

async fn service_on(store: SqliteStore) -> Service {
    Service::new(Arc::new(MockBackend::new()), Arc::new(store)).await
}

/// The balance is the sum of the entries, and the sequence numbers are strictly increasing.
async fn assert_ledger_consistent(store: &dyn Store, team: &TeamId) -> Vec<capsules_core::ledger::LedgerEntry> {
    let entries = store.entries(team).await.unwrap();
    let sum = MicroCredits::sum(entries.iter().map(|e| e.entry.amount)).unwrap();
    assert_eq!(store.balance(team).await.unwrap(), sum, "balance = sum of entries");
    assert!(
        entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq strictly increasing"
    );
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_everything_exactly_once() {
    let (_dir, path) = db_path();
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(path.exists(), "open creates the file and its directory");
    let s = service_on(store.clone()).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let agent = s
        .capsules
        .tokens(b.owner.secret.expose())
        .create(TokenSpec::new([Scope::AgentWrite]).prefix("a-"))
        .await
        .unwrap();
    let cap = owner.create("a-one").size("2x2gb").await.unwrap();
    for secs in (10..=130).step_by(10) {
        s.clock.set_ms(START_MS + secs * 1000);
        s.capsules.tick().await;
    }
    cap.sleep().await.unwrap();
    let id = cap.status().await.unwrap().id;
    let team = b.team.id.clone();

    let before_entries = assert_ledger_consistent(&store, &team).await;
    assert!(before_entries.len() > 5, "{before_entries:?}");
    let before_balance = store.balance(&team).await.unwrap();
    assert!(before_balance < MicroCredits::credits(5), "charges were made");
    let before_record = store.capsule(&id).await.unwrap().unwrap();
    let before_events = store.capsule_events(&id).await.unwrap();
    let before_team_events = store.team_events(&team).await.unwrap();
    let before_tokens = store.list_tokens(&team).await.unwrap();
    let before_teams = store.list_teams().await.unwrap();
    drop(owner);
    drop(cap);
    drop(s);
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        store.entries(&team).await.unwrap(),
        before_entries,
        "every entry exactly once"
    );
    assert_eq!(
        store.capsule_entries(&id).await.unwrap().len(),
        before_entries
            .iter()
            .filter(|e| e.entry.capsule.as_ref() == Some(&id))
            .count()
    );
    assert_eq!(store.balance(&team).await.unwrap(), before_balance);
    assert_eq!(store.capsule(&id).await.unwrap().unwrap(), before_record);
    assert_eq!(store.capsule_events(&id).await.unwrap(), before_events);
    assert_eq!(store.team_events(&team).await.unwrap(), before_team_events);
    assert_eq!(store.list_tokens(&team).await.unwrap(), before_tokens);
    assert_eq!(store.list_teams().await.unwrap(), before_teams);
    let name = before_record.name.clone();
    assert_eq!(
        store.capsule_by_name(&team, &name, false).await.unwrap().unwrap().id,
        id
    );
    // Bootstrap refuses the non-empty store after a reopen too.
    let s = service_on(store.clone()).await;
    assert_eq!(
        s.capsules.bootstrap("again").await.map(|_| ()).unwrap_err().kind(),
        ErrorKind::Conflict
    );
    // The tokens still verify (only their hashes are stored) and the agent's prefix still holds.
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    assert_eq!(owner.balance().await.unwrap(), before_balance);
    let agent = s.capsules.connect(agent.secret.expose()).unwrap();
    assert_eq!(agent.list().await.unwrap().len(), 1);
    assert_eq!(
        agent.create("b-two").await.map(|_| ()).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    // The secret is nowhere in the file.
    drop(agent);
    drop(owner);
    drop(s);
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
    let secret = b.owner.secret.expose().as_bytes();
    for hay in [&bytes, &wal] {
        assert!(!hay.windows(secret.len()).any(|w| w == secret), "a secret was stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_leaves_nothing() {
    let (_dir, path) = db_path();
    let store = SqliteStore::open(&path).await.unwrap();
    let s = service_on(store.clone()).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    let teams: Vec<TeamId> = store.list_teams().await.unwrap().into_iter().map(|t| t.id).collect();
    let event_count = store.team_events(&b.team.id).await.unwrap().len();

    // create_team fails mid-way: the team row and its `team_created` event are written before
    // the owner token, whose id is taken. The whole step rolls back.
    let t2 = TeamRecord {
        id: TeamId::generate(),
        name: TeamName::new("beta").unwrap(),
        caps: TeamCaps::default(),
        created_at_ms: START_MS,
    };
    let dup_owner = b.owner.record.clone();
    let e = store
        .create_team(
            t2.clone(),
            dup_owner,
            NewEntry::grant(START_MS, &t2.id, MicroCredits::credits(5), "onboarding"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let check = async |store: &SqliteStore| {
        assert!(store.team_by_name(&t2.name).await.unwrap().is_none(), "no team row");
        assert!(store.team(&t2.id).await.unwrap().is_none());
        assert!(store.team_events(&t2.id).await.unwrap().is_empty(), "no event");
        assert!(store.entries(&t2.id).await.unwrap().is_empty(), "no grant");
        assert_eq!(store.balance(&t2.id).await.unwrap(), MicroCredits::ZERO);
        let now: Vec<TeamId> = store.list_teams().await.unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(now, teams);
    };
    check(&store).await;

    // A create refused by a team cap writes no record, entry or event.
    let owner = s.capsules.connect(b.owner.secret.expose()).unwrap();
    let op = s.capsules.operator(b.operator.secret.expose());
    op.set_caps(
        "acme",
        TeamCaps {
            max_running: 1,
            ..TeamCaps::default()
        },
    )
    .await
    .unwrap();
    let entries = store.entries(&b.team.id).await.unwrap();
    owner.create("first").await.unwrap();
    let entries_after_first = store.entries(&b.team.id).await.unwrap();
    assert!(entries_after_first.len() > entries.len());
    let e = owner.create("second").await.map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    let second = capsules_core::CapsuleName::new("second").unwrap();
    assert!(
        store
            .capsule_by_name(&b.team.id, &second, true)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.entries(&b.team.id).await.unwrap(), entries_after_first);
    assert!(
        !store
            .team_events(&b.team.id)
            .await
            .unwrap()
            .iter()
            .any(|e| matches!(e.kind(), EventKind::Created { name, .. } if name == "second"))
    );
    assert!(store.team_events(&b.team.id).await.unwrap().len() > event_count);
    drop(owner);
    drop(op);
    drop(s);
    drop(store);
    let store = SqliteStore::open(&path).await.unwrap();
    check(&store).await;
    assert_eq!(store.entries(&b.team.id).await.unwrap(), entries_after_first);
}

#[tokio::test]
async fn a_newer_database_is_refused() {
    let (_dir, path) = db_path();
    drop(SqliteStore::open(&path).await.unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [i64::from(SCHEMA_VERSION) + 1],
    )
    .unwrap();
    drop(c);
    let e = SqliteStore::open(&path).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.message().contains("newer"), "{e}");
}

#[tokio::test]
async fn the_file_is_in_wal_mode_with_foreign_keys() {
    let (_dir, path) = db_path();
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.path(), Some(path.as_path()));
    drop(store);
    let c = rusqlite::Connection::open(&path).unwrap();
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode.to_lowercase(), "wal");
    // An entry of an unknown team is refused by the store (and by the foreign key below it).
    let store = SqliteStore::open(&path).await.unwrap();
    let e = store
        .append_entry(
            NewEntry::grant(0, &TeamId::generate(), MicroCredits::credits(1), "x"),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

// ---- kill -9 ----------------------------------------------------------------------------

const CHILD_ENV: &str = "CAPSULES_SQLITE_KILL9_DB";
const CHILD_TEAM: &str = "CAPSULES_SQLITE_KILL9_TEAM";

/// Lanes of concurrent charging in the child (their steps are group-committed together).
const LANES: i64 = 8;
const LANE_MS: i64 = 1_000_000_000;

fn lane_amount(i: i64) -> MicroCredits {
    MicroCredits::from_micros(-(i % 97 + 1))
}

/// The child half of [`kill_9_mid_charging_leaves_a_consistent_ledger`]: charges from
/// [`LANES`] concurrent loops until it is killed. A no-op when the test runs normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_child_charges_in_a_loop() {
    let (Ok(path), Ok(team)) = (std::env::var(CHILD_ENV), std::env::var(CHILD_TEAM)) else {
        return;
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let team = TeamId::parse(&team).unwrap();
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let (store, team) = (store.clone(), team.clone());
        lanes.push(tokio::spawn(async move {
            for i in 0i64.. {
                let at = START_MS + lane * LANE_MS + i;
                let amount = lane_amount(i);
                // One step: the entry, the cached balance and its event, atomically.
                store
                    .append_entry(
                        NewEntry {
                            at_ms: at,
                            team: team.clone(),
                            capsule: None,
                            kind: EntryKind::Compute,
                            quantity: 1,
                            amount,
                            reason: Some("kill9".into()),
                        },
                        Some(
                            NewEvent::new(
                                at,
                                EventKind::Charged {
                                    what: "compute".into(),
                                    quantity: 1,
                                    amount: amount.negate(),
                                },
                            )
                            .team(&team),
                        ),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    // libtest prints the test name without a newline first: the marker ends a line.
    println!("KILL9-CHILD-READY");
    for l in lanes {
        l.await.unwrap();
    }
}

fn run_child_and_kill(path: &Path, team: &TeamId, after: Duration) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill9_child_charges_in_a_loop",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .env(CHILD_TEAM, team.as_str())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child exited before it was ready"
        );
        if line.contains("KILL9-CHILD-READY") {
            break;
        }
    }
    std::thread::sleep(after);
    // Child::kill is SIGKILL on Unix: no destructor, no rollback, no checkpoint runs.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the child was killed, not finished: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_charging_leaves_a_consistent_ledger() {
    use rand::Rng;
    let (_dir, path) = db_path();
    let store = SqliteStore::open(&path).await.unwrap();
    let s = service_on(store.clone()).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    let team = b.team.id.clone();
    drop(s);
    drop(store);

    let mut last_count = 1; // the onboarding grant
    for round in 0..3 {
        let ms = rand::rng().random_range(150..900);
        let team2 = team.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || run_child_and_kill(&p, &team2, Duration::from_millis(ms)))
            .await
            .unwrap();

        let store = SqliteStore::open(&path).await.unwrap();
        let entries = assert_ledger_consistent(&store, &team).await;
        assert!(
            entries.len() > last_count,
            "round {round}: the child charged nothing in {ms} ms ({} entries)",
            entries.len()
        );
        eprintln!(
            "round {round}: killed after {ms} ms; {} entries after reopen",
            entries.len()
        );
        last_count = entries.len();
        // Every step complete: one `charged` event per charge entry, with the same amount, in order.
        let charged: Vec<MicroCredits> = store
            .team_events(&team)
            .await
            .unwrap()
            .iter()
            .filter_map(|e| match e.kind() {
                EventKind::Charged { amount, .. } => Some(amount.negate()),
                _ => None,
            })
            .collect();
        let charges: Vec<MicroCredits> = entries
            .iter()
            .filter(|e| e.entry.reason.as_deref() == Some("kill9"))
            .map(|e| e.entry.amount)
            .collect();
        assert_eq!(charges.len(), entries.len() - 1);
        assert_eq!(
            charged, charges,
            "round {round}: an entry without its event or the reverse"
        );
        // Every entry is whole (its amount matches its loop index), and each lane's charges are
        // a prefix of its loop per round: none lost in the middle, none doubled. Each round
        // restarts the counters at 0, so the number of entries for index i never grows with i.
        let mut per_lane = std::collections::BTreeMap::<(i64, i64), usize>::new();
        for e in entries.iter().skip(1) {
            let off = e.entry.at_ms - START_MS;
            let (lane, i) = (off / LANE_MS, off % LANE_MS);
            assert!((0..LANES).contains(&lane), "{e:?}");
            assert_eq!(e.entry.amount, lane_amount(i), "{e:?}");
            *per_lane.entry((lane, i)).or_default() += 1;
        }
        for lane in 0..LANES {
            let counts: Vec<(i64, usize)> = per_lane
                .range((lane, 0)..(lane + 1, 0))
                .map(|(&(_, i), &n)| (i, n))
                .collect();
            assert!(
                counts.windows(2).all(|w| w[0].1 >= w[1].1),
                "round {round}, lane {lane}: a gap in the charges {counts:?}"
            );
            assert!(
                counts.iter().all(|&(_, n)| n <= round + 1),
                "round {round}, lane {lane}: doubled"
            );
            assert!(
                counts.iter().enumerate().all(|(k, &(i, _))| i == k as i64),
                "round {round}, lane {lane}: a missing index"
            );
        }
    }
}

/// Group commit: concurrent steps share a transaction, but each stays atomic on its own — steps
/// failing mid-way (after some of their rows were written) leave nothing, and the others commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_steps_stay_atomic_one_by_one() {
    let (_dir, path) = db_path();
    let store = SqliteStore::open(&path).await.unwrap();
    let s = service_on(store.clone()).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    let team = b.team.id.clone();
    let mut tasks = Vec::new();
    for i in 0..200i64 {
        let (st, team, owner) = (store.clone(), team.clone(), b.owner.record.clone());
        tasks.push(tokio::spawn(async move {
            if i % 10 == 3 {
                // Fails after writing the team row and its event: the owner token id is taken.
                let t = TeamRecord {
                    id: TeamId::generate(),
                    name: TeamName::new(format!("t{i}")).unwrap(),
                    caps: TeamCaps::default(),
                    created_at_ms: START_MS,
                };
                let g = NewEntry::grant(START_MS, &t.id, MicroCredits::credits(5), "onboarding");
                let e = st.create_team(t, owner, g).await.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
                0
            } else {
                st.append_entry(
                    NewEntry::grant(START_MS, &team, MicroCredits::from_micros(i + 1), "par"),
                    None,
                )
                .await
                .unwrap();
                i + 1
            }
        }));
    }
    let mut expected = 5_000_000i64;
    for t in tasks {
        expected += t.await.unwrap();
    }
    drop(s);
    drop(store);
    let store = SqliteStore::open(&path).await.unwrap();
    let entries = assert_ledger_consistent(&store, &team).await;
    assert_eq!(entries.len(), 1 + 180);
    assert_eq!(store.balance(&team).await.unwrap().micros(), expected);
    assert_eq!(store.list_teams().await.unwrap().len(), 1, "no failed team left a row");
}

#[tokio::test]
async fn in_memory_store_runs_the_same_code() {
    let store = SqliteStore::open_in_memory().unwrap();
    assert_eq!(store.path(), None);
    let s = service_on(store.clone()).await;
    let b = s.capsules.bootstrap("acme").await.unwrap();
    let e = store
        .append_entry(
            NewEntry::grant(START_MS, &b.team.id, MicroCredits::from_micros(7), "x"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(e.seq, 2, "the onboarding grant is entry 1");
    assert_eq!(store.balance(&b.team.id).await.unwrap().micros(), 5_000_007);
    assert_eq!(
        store.token_chain(&b.owner.record.id).await.unwrap(),
        vec![b.owner.record.clone()]
    );
}
