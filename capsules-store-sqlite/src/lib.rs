//! # capsules-store-sqlite
//!
//! The durable store of Capsules: tokens (hashes only), teams and the append-only ledger, capsule
//! records and the audit trail in one SQLite file. It implements the four store traits of
//! [`capsules_core::store`] ([`TokenStore`](capsules_core::store::TokenStore),
//! [`Ledger`](capsules_core::store::Ledger), [`CapsuleStore`](capsules_core::store::CapsuleStore),
//! [`EventLog`](capsules_core::store::EventLog)) with the same behaviour as
//! [`MemoryStore`](capsules_core::MemoryStore), and runs the same contract suite.
//!
//! ```no_run
//! use capsules_core::{Backend, Capsules};
//! use capsules_store_sqlite::SqliteStore;
//!
//! # async fn embed(backend: impl Backend) -> capsules_core::Result<()> {
//! let store = SqliteStore::open("capsules.db").await?; // creates the file (and its directory)
//! let capsules = Capsules::builder().backend(backend).store(store).build().await?;
//! # let _ = capsules;
//! # Ok(())
//! # }
//! ```
//!
//! How it keeps money safe:
//! - **Every trait method is one SQLite transaction** (`BEGIN IMMEDIATE` … `COMMIT` for the ones
//!   that write): it reads the rows, runs the pure metering functions of
//!   [`capsules_core::ledger`] and the state table of [`capsules_core::state`] — the same code the
//!   memory store runs — and writes the result. An error rolls the whole step back; nothing
//!   read-modify-writes money outside a transaction.
//! - The database is in WAL mode with `synchronous = FULL` by default, so a committed step
//!   survives a `kill -9` or a power cut; foreign keys are on; a busy timeout covers other
//!   processes holding the file.
//! - Ledger entries and events are append-only (triggers refuse `UPDATE` and `DELETE`); a
//!   team's balance is cached in `teams.balance`, updated in the same transaction as the entry,
//!   and always equals the sum of its entries.
//! - The schema is versioned (`schema_version`); migrations run in one transaction at open, and a
//!   database written by a newer build is refused with a clear error.
//!
//! One connection behind a mutex serves the embedded default; calls run on tokio's blocking pool.

mod db;
mod schema;
mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsules_core::{Error, Result};
use rusqlite::{Connection, TransactionBehavior};

pub use schema::SCHEMA_VERSION;

/// How hard SQLite syncs a commit to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `synchronous = FULL`: every commit is on disk before the call returns (survives power loss).
    /// The default: money must survive a crash.
    #[default]
    Full,
    /// `synchronous = NORMAL`: in WAL mode, survives a process crash (`kill -9`) but a power loss
    /// may drop the last commits. Faster.
    Normal,
}

/// Options for [`SqliteStore::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// How long a call waits for another process holding the database's write lock.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The SQLite store. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

pub(crate) fn db_err(e: rusqlite::Error) -> Error {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    let msg = format!("the sqlite store failed: {e}");
    if busy {
        Error::unavailable(msg).with_source(e)
    } else {
        Error::internal(msg).with_source(e)
    }
}

/// `?` on rusqlite results inside this crate.
pub(crate) trait DbResult<T> {
    fn db(self) -> Result<T>;
}

impl<T> DbResult<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(db_err)
    }
}

impl SqliteStore {
    /// Opens (or creates, with its parent directory) the database at `path` with the default
    /// options (WAL, `synchronous = FULL`), migrating it to this build's schema.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`open`](Self::open) with options.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            if let Some(dir) = p.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::internal(format!("cannot create the directory {} for the store: {e}", dir.display()))
                        .with_source(e)
                })?;
            }
            let mut conn = Connection::open(&p).db()?;
            configure(&mut conn, options, true)?;
            Ok(conn)
        })
        .await
        .map_err(|e| Error::internal(format!("the sqlite open task failed: {e}")))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Some(path),
        })
    }

    /// A private in-memory database (for tests): same schema and code paths, nothing on disk.
    pub fn open_in_memory() -> Result<SqliteStore> {
        let mut conn = Connection::open_in_memory().db()?;
        configure(&mut conn, SqliteOptions::default(), false)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: None,
        })
    }

    /// The database file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `f` in one transaction on the blocking pool: committed if it returns `Ok`, rolled
    /// back (nothing written) if it returns `Err`.
    pub(crate) async fn tx<T, F>(&self, write: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&db::Tx<'_>) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside a transaction drops it (rollback), so a poisoned lock still guards a
            // consistent database.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            let behavior = if write {
                TransactionBehavior::Immediate
            } else {
                TransactionBehavior::Deferred
            };
            let t = guard.transaction_with_behavior(behavior).db()?;
            let out = f(&db::Tx::new(&t))?;
            t.commit().db()?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal(format!("a sqlite store task failed: {e}")))?
    }
}

fn configure(conn: &mut Connection, options: SqliteOptions, file: bool) -> Result<()> {
    conn.busy_timeout(options.busy_timeout).db()?;
    if file {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).db()?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::internal(format!(
                "the sqlite store needs WAL mode, but the database stays in {mode} mode"
            )));
        }
    }
    let sync = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"))
        .db()?;
    conn.set_prepared_statement_cache_capacity(64);
    schema::migrate(conn)
}
