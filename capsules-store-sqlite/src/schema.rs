//! The schema and its migrations.

use capsules_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::DbResult;

/// Migrations in order; migration `i` (0-based) brings the schema to version `i + 1`. Append
/// only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE teams (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    -- Cached sum of the team's ledger entries, µcr; updated in the entry's transaction.
    balance       INTEGER NOT NULL DEFAULT 0,
    record        TEXT NOT NULL
) STRICT;

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY NOT NULL,
    team          TEXT REFERENCES teams(id),
    parent        TEXT REFERENCES tokens(id),
    -- SHA-256 of the secret; the secret itself is never stored.
    secret_hash   BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER,
    record        TEXT NOT NULL
) STRICT;
CREATE INDEX tokens_team ON tokens(team);
CREATE INDEX tokens_parent ON tokens(parent);

CREATE TABLE ledger (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    team     TEXT NOT NULL REFERENCES teams(id),
    capsule  TEXT,
    kind     TEXT NOT NULL CHECK (kind IN ('grant', 'compute', 'storage', 'traffic', 'lifecycle', 'refund')),
    quantity INTEGER NOT NULL CHECK (quantity >= 0),
    amount   INTEGER NOT NULL,
    reason   TEXT
) STRICT;
CREATE INDEX ledger_team ON ledger(team, seq);
CREATE INDEX ledger_capsule ON ledger(capsule, seq) WHERE capsule IS NOT NULL;
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;

CREATE TABLE capsules (
    id               TEXT PRIMARY KEY NOT NULL,
    team             TEXT NOT NULL REFERENCES teams(id),
    name             TEXT NOT NULL,
    state            TEXT NOT NULL,
    host_label       TEXT,
    created_at_ms    INTEGER NOT NULL,
    terminated_at_ms INTEGER,
    -- Order of termination (the most recent one answers a name with no live capsule).
    dead_seq         INTEGER,
    record           TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX capsules_live_name ON capsules(team, name) WHERE state != 'terminated';
CREATE UNIQUE INDEX capsules_live_label ON capsules(host_label)
    WHERE host_label IS NOT NULL AND state != 'terminated';
CREATE INDEX capsules_team ON capsules(team);
CREATE INDEX capsules_dead ON capsules(team, name, dead_seq) WHERE state = 'terminated';
CREATE INDEX capsules_live ON capsules(created_at_ms, id) WHERE state != 'terminated';

CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    team    TEXT,
    capsule TEXT,
    token   TEXT,
    kind    TEXT NOT NULL,
    event   TEXT NOT NULL
) STRICT;
CREATE INDEX events_team ON events(team, seq) WHERE team IS NOT NULL;
CREATE INDEX events_capsule ON events(capsule, seq) WHERE capsule IS NOT NULL;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database to [`SCHEMA_VERSION`] in one transaction; refuses a newer database.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let t = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
    t.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL) STRICT;")
        .db()?;
    let current: Option<i64> = t
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .optional()
        .db()?
        .flatten();
    let current = current.unwrap_or(0);
    if current > i64::from(SCHEMA_VERSION) {
        return Err(Error::unsupported(format!(
            "the database has schema version {current}, newer than this build of capsules-store-sqlite \
             understands (version {SCHEMA_VERSION}); open it with a newer build"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        t.execute_batch(sql).db()?;
        t.execute("INSERT INTO schema_version (version) VALUES (?1)", [i as i64 + 1])
            .db()?;
    }
    t.commit().db()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, i64::from(SCHEMA_VERSION));
        c.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i64::from(SCHEMA_VERSION) + 1],
        )
        .unwrap();
        let e = migrate(&mut c).unwrap_err();
        assert_eq!(e.kind(), capsules_core::ErrorKind::Unsupported);
        assert!(e.message().contains("newer"), "{e}");
    }

    #[test]
    fn ledger_and_events_are_append_only() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        c.execute_batch(
            "INSERT INTO teams (id, name, created_at_ms, record) VALUES ('team_a', 'a', 0, '{}');
             INSERT INTO ledger (at_ms, team, kind, quantity, amount) VALUES (0, 'team_a', 'grant', 1, 5);
             INSERT INTO events (at_ms, kind, event) VALUES (0, 'x', '{}');",
        )
        .unwrap();
        for sql in [
            "UPDATE ledger SET amount = 6",
            "DELETE FROM ledger",
            "UPDATE events SET kind = 'y'",
            "DELETE FROM events",
        ] {
            let e = c.execute(sql, []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{sql}: {e}");
        }
    }
}
