//! Row access inside one transaction: the SQL counterparts of the memory store's helpers.

use capsules_core::events::{Event, EventKind, NewEvent};
use capsules_core::ledger::{EntryKind, LedgerEntry, NewEntry};
use capsules_core::records::{CapsuleRecord, TeamRecord};
use capsules_core::tokens::TokenRecord;
use capsules_core::types::{CapsuleId, MicroCredits, Size, TeamId, TokenId};
use capsules_core::{Error, Result};
use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::DbResult;

/// One open transaction.
pub(crate) struct Tx<'a> {
    c: &'a rusqlite::Connection,
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode a store row: {e}")))
}

fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::internal(format!("a store row does not decode: {e}")))
}

fn entry_kind(s: &str) -> Result<EntryKind> {
    Ok(match s {
        "grant" => EntryKind::Grant,
        "compute" => EntryKind::Compute,
        "storage" => EntryKind::Storage,
        "traffic" => EntryKind::Traffic,
        "lifecycle" => EntryKind::Lifecycle,
        "refund" => EntryKind::Refund,
        other => return Err(Error::internal(format!("unknown ledger entry kind {other:?}"))),
    })
}

fn no_capsule(id: &CapsuleId) -> Error {
    Error::not_found(format!("capsule {id} does not exist"))
}

const ENTRY_COLS: &str = "seq, at_ms, team, capsule, kind, quantity, amount, reason";

type RawEntry = (i64, i64, String, Option<String>, String, i64, i64, Option<String>);

fn raw_entry(r: &Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn decode_entry((seq, at_ms, team, capsule, kind, quantity, amount, reason): RawEntry) -> Result<LedgerEntry> {
    Ok(LedgerEntry {
        seq: seq as u64,
        entry: NewEntry {
            at_ms,
            team: TeamId::parse(&team)?,
            capsule: capsule.as_deref().map(CapsuleId::parse).transpose()?,
            kind: entry_kind(&kind)?,
            quantity: quantity as u64,
            amount: MicroCredits::from_micros(amount),
            reason,
        },
    })
}

impl<'a> Tx<'a> {
    /// `c` is inside a transaction (and a savepoint for this one step).
    pub(crate) fn new(c: &'a rusqlite::Connection) -> Self {
        Tx { c }
    }

    // ---- ledger -------------------------------------------------------------------------

    pub(crate) fn balance(&self, team: &TeamId) -> Result<MicroCredits> {
        let b: Option<i64> = self
            .c
            .prepare_cached("SELECT balance FROM teams WHERE id = ?1")
            .db()?
            .query_row([team.as_str()], |r| r.get(0))
            .optional()
            .db()?;
        Ok(MicroCredits::from_micros(b.unwrap_or(0)))
    }

    pub(crate) fn push_entry(&self, e: NewEntry) -> Result<LedgerEntry> {
        let bal = self.balance(&e.team)?;
        let new_bal = bal.checked_add(e.amount)?;
        let quantity = i64::try_from(e.quantity)
            .map_err(|_| Error::invalid_input(format!("quantity {} is out of range", e.quantity)))?;
        self.c
            .prepare_cached(
                "INSERT INTO ledger (at_ms, team, capsule, kind, quantity, amount, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .db()?
            .execute(params![
                e.at_ms,
                e.team.as_str(),
                e.capsule.as_ref().map(|c| c.as_str()),
                e.kind.as_str(),
                quantity,
                e.amount.micros(),
                e.reason,
            ])
            .db()?;
        let seq = self.c.last_insert_rowid() as u64;
        let n = self
            .c
            .prepare_cached("UPDATE teams SET balance = ?1 WHERE id = ?2")
            .db()?
            .execute(params![new_bal.micros(), e.team.as_str()])
            .db()?;
        if n != 1 {
            return Err(Error::not_found(format!("team {} does not exist", e.team)));
        }
        Ok(LedgerEntry { seq, entry: e })
    }

    fn entries_where(&self, sql_where: &str, key: &str) -> Result<Vec<LedgerEntry>> {
        let sql = format!("SELECT {ENTRY_COLS} FROM ledger WHERE {sql_where} ORDER BY seq");
        let mut st = self.c.prepare_cached(&sql).db()?;
        let raws = st
            .query_map([key], raw_entry)
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        raws.into_iter().map(decode_entry).collect()
    }

    pub(crate) fn team_entries(&self, team: &TeamId) -> Result<Vec<LedgerEntry>> {
        self.entries_where("team = ?1", team.as_str())
    }

    pub(crate) fn capsule_entries(&self, capsule: &CapsuleId) -> Result<Vec<LedgerEntry>> {
        self.entries_where("capsule = ?1", capsule.as_str())
    }

    // ---- events -------------------------------------------------------------------------

    pub(crate) fn push_event(&self, e: NewEvent) -> Result<Event> {
        let json = to_json(&e)?;
        self.c
            .prepare_cached(
                "INSERT INTO events (at_ms, team, capsule, token, kind, event) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .db()?
            .execute(params![
                e.at_ms,
                e.team.as_ref().map(|t| t.as_str()),
                e.capsule.as_ref().map(|c| c.as_str()),
                e.token.as_ref().map(|t| t.as_str()),
                e.kind.name(),
                json,
            ])
            .db()?;
        Ok(Event {
            seq: self.c.last_insert_rowid() as u64,
            event: e,
        })
    }

    pub(crate) fn events_where(&self, column: &str, key: &str) -> Result<Vec<Event>> {
        let sql = format!("SELECT seq, event FROM events WHERE {column} = ?1 ORDER BY seq");
        let mut st = self.c.prepare_cached(&sql).db()?;
        let raws = st
            .query_map([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        raws.into_iter()
            .map(|(seq, j)| {
                Ok(Event {
                    seq: seq as u64,
                    event: from_json(&j)?,
                })
            })
            .collect()
    }

    // ---- tokens -------------------------------------------------------------------------

    pub(crate) fn token(&self, id: &TokenId) -> Result<Option<TokenRecord>> {
        let j: Option<String> = self
            .c
            .prepare_cached("SELECT record FROM tokens WHERE id = ?1")
            .db()?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()
            .db()?;
        j.as_deref().map(from_json).transpose()
    }

    pub(crate) fn any_token_or_team(&self) -> Result<bool> {
        let n: i64 = self
            .c
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM tokens) OR EXISTS(SELECT 1 FROM teams)",
                [],
                |r| r.get(0),
            )
            .db()?;
        Ok(n != 0)
    }

    pub(crate) fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        if self.token(&t.id)?.is_some() {
            return Err(Error::already_exists(format!("token {} exists", t.id)));
        }
        self.c
            .prepare_cached(
                "INSERT INTO tokens (id, team, parent, secret_hash, created_at_ms, revoked_at_ms, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .db()?
            .execute(params![
                t.id.as_str(),
                t.team.as_ref().map(|x| x.as_str()),
                t.parent.as_ref().map(|x| x.as_str()),
                &t.secret_hash[..],
                t.created_at_ms,
                t.revoked_at_ms,
                to_json(t)?,
            ])
            .db()?;
        Ok(())
    }

    pub(crate) fn update_token(&self, t: &TokenRecord) -> Result<()> {
        self.c
            .prepare_cached("UPDATE tokens SET revoked_at_ms = ?1, record = ?2 WHERE id = ?3")
            .db()?
            .execute(params![t.revoked_at_ms, to_json(t)?, t.id.as_str()])
            .db()?;
        Ok(())
    }

    /// Ids of the tokens `parent` minted, in mint order.
    pub(crate) fn children(&self, parent: &TokenId) -> Result<Vec<TokenId>> {
        let mut st = self
            .c
            .prepare_cached("SELECT id FROM tokens WHERE parent = ?1 ORDER BY rowid")
            .db()?;
        let ids = st
            .query_map([parent.as_str()], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        ids.iter().map(|s| TokenId::parse(s)).collect()
    }

    pub(crate) fn team_tokens(&self, team: &TeamId) -> Result<Vec<TokenRecord>> {
        self.records(
            "SELECT record FROM tokens WHERE team = ?1 ORDER BY rowid",
            team.as_str(),
        )
    }

    // ---- teams --------------------------------------------------------------------------

    pub(crate) fn team(&self, id: &TeamId) -> Result<Option<TeamRecord>> {
        Ok(self
            .records("SELECT record FROM teams WHERE id = ?1", id.as_str())?
            .pop())
    }

    pub(crate) fn team_by_name(&self, name: &str) -> Result<Option<TeamRecord>> {
        Ok(self.records("SELECT record FROM teams WHERE name = ?1", name)?.pop())
    }

    pub(crate) fn all_teams(&self) -> Result<Vec<TeamRecord>> {
        let mut st = self.c.prepare_cached("SELECT record FROM teams").db()?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    pub(crate) fn put_team(&self, t: &TeamRecord, insert: bool) -> Result<()> {
        if insert {
            self.c
                .prepare_cached(
                    "INSERT INTO teams (id, name, created_at_ms, balance, record) VALUES (?1, ?2, ?3, 0, ?4)",
                )
                .db()?
                .execute(params![t.id.as_str(), t.name.as_str(), t.created_at_ms, to_json(t)?])
                .db()?;
        } else {
            self.c
                .prepare_cached("UPDATE teams SET record = ?1 WHERE id = ?2")
                .db()?
                .execute(params![to_json(t)?, t.id.as_str()])
                .db()?;
        }
        Ok(())
    }

    pub(crate) fn insert_team(&self, team: TeamRecord, owner: TokenRecord, grant: NewEntry) -> Result<()> {
        if self.team_by_name(team.name.as_str())?.is_some() {
            return Err(Error::already_exists(format!("team {} exists", team.name)));
        }
        if self.team(&team.id)?.is_some() {
            return Err(Error::already_exists(format!("team id {} exists", team.id)));
        }
        let at = team.created_at_ms;
        self.put_team(&team, true)?;
        self.push_event(
            NewEvent::new(
                at,
                EventKind::TeamCreated {
                    name: team.name.to_string(),
                },
            )
            .team(&team.id),
        )?;
        self.push_event(
            NewEvent::new(
                at,
                EventKind::TokenMinted {
                    id: owner.id.clone(),
                    scopes: owner.scopes.iter().map(|s| s.to_string()).collect(),
                },
            )
            .team(&team.id),
        )?;
        self.insert_token(&owner)?;
        let amount = grant.amount;
        let reason = grant.reason.clone().unwrap_or_default();
        self.push_entry(grant)?;
        self.push_event(NewEvent::new(at, EventKind::Granted { amount, reason }).team(&team.id))?;
        Ok(())
    }

    // ---- capsules -----------------------------------------------------------------------

    fn records<T: DeserializeOwned>(&self, sql: &str, key: &str) -> Result<Vec<T>> {
        let mut st = self.c.prepare_cached(sql).db()?;
        let rows = st
            .query_map([key], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    pub(crate) fn find(&self, id: &CapsuleId) -> Result<Option<CapsuleRecord>> {
        Ok(self
            .records("SELECT record FROM capsules WHERE id = ?1", id.as_str())?
            .pop())
    }

    pub(crate) fn get(&self, id: &CapsuleId) -> Result<CapsuleRecord> {
        self.find(id)?.ok_or_else(|| no_capsule(id))
    }

    pub(crate) fn live_by_name(&self, team: &TeamId, name: &str) -> Result<Option<CapsuleRecord>> {
        let j: Option<String> = self
            .c
            .prepare_cached("SELECT record FROM capsules WHERE team = ?1 AND name = ?2 AND state != 'terminated'")
            .db()?
            .query_row([team.as_str(), name], |r| r.get(0))
            .optional()
            .db()?;
        j.as_deref().map(from_json).transpose()
    }

    pub(crate) fn dead_by_name(&self, team: &TeamId, name: &str) -> Result<Option<CapsuleRecord>> {
        let j: Option<String> = self
            .c
            .prepare_cached(
                "SELECT record FROM capsules WHERE team = ?1 AND name = ?2 AND state = 'terminated'
                 ORDER BY dead_seq DESC LIMIT 1",
            )
            .db()?
            .query_row([team.as_str(), name], |r| r.get(0))
            .optional()
            .db()?;
        j.as_deref().map(from_json).transpose()
    }

    pub(crate) fn team_capsules(&self, team: &TeamId, include_terminated: bool) -> Result<Vec<CapsuleRecord>> {
        let sql = if include_terminated {
            "SELECT record FROM capsules WHERE team = ?1 ORDER BY rowid"
        } else {
            "SELECT record FROM capsules WHERE team = ?1 AND state != 'terminated' ORDER BY rowid"
        };
        self.records(sql, team.as_str())
    }

    pub(crate) fn live_capsules(&self) -> Result<Vec<CapsuleRecord>> {
        let mut st = self
            .c
            .prepare_cached("SELECT record FROM capsules WHERE state != 'terminated' ORDER BY created_at_ms, id")
            .db()?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    /// The live capsule holding `label`, if any.
    pub(crate) fn label_owner(&self, label: &str) -> Result<Option<CapsuleRecord>> {
        let j: Option<String> = self
            .c
            .prepare_cached("SELECT record FROM capsules WHERE host_label = ?1 AND state != 'terminated'")
            .db()?
            .query_row([label], |r| r.get(0))
            .optional()
            .db()?;
        j.as_deref().map(from_json).transpose()
    }

    /// Inserts or updates the record (its row keeps its place in the team's order). Moving to
    /// `terminated` frees the name and the host label and stamps the termination order.
    pub(crate) fn put(&self, rec: &CapsuleRecord) -> Result<()> {
        self.c
            .prepare_cached(
                "INSERT INTO capsules (id, team, name, state, host_label, created_at_ms, terminated_at_ms, dead_seq, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8)
                 ON CONFLICT (id) DO UPDATE SET
                    state = excluded.state,
                    host_label = excluded.host_label,
                    terminated_at_ms = excluded.terminated_at_ms,
                    record = excluded.record,
                    dead_seq = CASE
                        WHEN excluded.state != 'terminated' THEN NULL
                        WHEN capsules.dead_seq IS NOT NULL THEN capsules.dead_seq
                        ELSE (SELECT COALESCE(MAX(dead_seq), 0) + 1 FROM capsules)
                    END",
            )
            .db()?
            .execute(params![
                rec.id.as_str(),
                rec.team.as_str(),
                rec.name.as_str(),
                rec.state.as_str(),
                rec.host_label,
                rec.created_at_ms,
                rec.terminated_at_ms,
                to_json(rec)?,
            ])
            .db()?;
        Ok(())
    }

    /// Team caps for one more running capsule of `size` (and, on create, `disk_gib` more disk).
    /// The same rule and messages as the memory store.
    pub(crate) fn check_caps(
        &self,
        team: &TeamId,
        size: Size,
        new_disk: Option<u32>,
        except: Option<&CapsuleId>,
    ) -> Result<()> {
        let t = self
            .team(team)?
            .ok_or_else(|| Error::not_found(format!("team {team} does not exist")))?;
        let capsules = self.team_capsules(team, false)?;
        capsules_core::ledger::check_team_caps(t.caps, &capsules, size, new_disk, except)
    }
}
