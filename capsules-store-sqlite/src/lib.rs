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
//! - **Every trait method is one atomic step** (its own savepoint inside a `BEGIN IMMEDIATE` …
//!   `COMMIT` transaction; a lone caller's step is the whole transaction): it reads the rows, runs the pure metering functions of
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
//! One connection, owned by one worker thread, serves the embedded default. Steps from concurrent
//! callers are group-committed: the worker runs each queued step in its own `SAVEPOINT` inside one
//! `BEGIN IMMEDIATE` transaction and commits once, answering every step only after the commit.
//! A step stays atomic (a failed one rolls back its savepoint and nothing else) and is durable
//! when its call returns; concurrent steps share one fsync.

mod db;
mod schema;
mod store;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsules_core::{Error, Result};
use rusqlite::Connection;

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

/// The SQLite store. Cheap to clone (one shared connection, owned by one worker thread).
#[derive(Clone)]
pub struct SqliteStore {
    jobs: std::sync::mpsc::Sender<Box<dyn Job>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn err_of(e: &rusqlite::Error) -> Error {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    let msg = format!("the sqlite store failed: {e}");
    if busy {
        Error::unavailable(msg)
    } else {
        Error::internal(msg)
    }
}

pub(crate) fn db_err(e: rusqlite::Error) -> Error {
    err_of(&e).with_source(e)
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

/// One atomic step queued for the worker.
trait Job: Send {
    /// Runs the step inside its savepoint; `false` if it failed (the savepoint is rolled back).
    fn run(&mut self, t: &db::Tx<'_>) -> bool;
    /// Answers the caller once the transaction is committed (`None`) or failed (`Some`).
    fn finish(self: Box<Self>, err: Option<Error>);
}

struct StepJob<T, F> {
    f: Option<F>,
    result: Option<Result<T>>,
    reply: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<T, F> Job for StepJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&db::Tx<'_>) -> Result<T> + Send + 'static,
{
    fn run(&mut self, t: &db::Tx<'_>) -> bool {
        let Some(f) = self.f.take() else { return false };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t)))
            .unwrap_or_else(|_| Err(Error::internal("a sqlite store step panicked")));
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, err: Option<Error>) {
        let this = *self;
        let r = match (err, this.result) {
            // A step that failed on its own keeps its own error.
            (_, Some(Err(e))) => Err(e),
            (Some(e), _) => Err(e),
            (None, Some(r)) => r,
            (None, None) => Err(Error::internal("a sqlite store step never ran")),
        };
        let _ = this.reply.send(r);
    }
}

/// Most steps one transaction groups (group commit under concurrent callers).
const MAX_BATCH: usize = 256;

/// The worker: takes the queued steps, runs each in its own savepoint inside one `BEGIN
/// IMMEDIATE` transaction, commits once, then answers them. A step is atomic (its savepoint) and
/// durable when answered (after the commit); concurrent steps share one fsync. A lone caller gets
/// a transaction of its own.
fn worker(conn: Connection, jobs: std::sync::mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            for j in batch {
                j.finish(Some(err_of(&e)));
            }
            continue;
        }
        let mut failed: Option<rusqlite::Error> = None;
        for j in batch.iter_mut() {
            if let Err(e) = conn.execute_batch("SAVEPOINT step") {
                failed = Some(e);
                break;
            }
            let ok = j.run(&db::Tx::new(&conn));
            let end = if ok {
                conn.execute_batch("RELEASE step")
            } else {
                conn.execute_batch("ROLLBACK TO step; RELEASE step")
            };
            if let Err(e) = end {
                failed = Some(e);
                break;
            }
        }
        let outcome = match failed {
            Some(e) => Err(e),
            None => conn.execute_batch("COMMIT"),
        };
        match outcome {
            Ok(()) => {
                for j in batch {
                    j.finish(None);
                }
            }
            Err(e) => {
                // Nothing of the batch is kept; every step hears why.
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "a sqlite store transaction failed; rolled back");
                for j in batch {
                    j.finish(Some(err_of(&e)));
                }
            }
        }
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
                    Error::internal(format!(
                        "cannot create the directory {} for the store: {e}",
                        dir.display()
                    ))
                    .with_source(e)
                })?;
            }
            let mut conn = Connection::open(&p).db()?;
            configure(&mut conn, options, true)?;
            Ok(conn)
        })
        .await
        .map_err(|e| Error::internal(format!("the sqlite open task failed: {e}")))??;
        Self::start(conn, Some(path))
    }

    /// A private in-memory database (for tests): same schema and code paths, nothing on disk.
    pub fn open_in_memory() -> Result<SqliteStore> {
        let mut conn = Connection::open_in_memory().db()?;
        configure(&mut conn, SqliteOptions::default(), false)?;
        Self::start(conn, None)
    }

    fn start(conn: Connection, path: Option<PathBuf>) -> Result<SqliteStore> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("capsules-sqlite".into())
            .spawn(move || worker(conn, rx))
            .map_err(|e| Error::internal(format!("cannot start the sqlite store thread: {e}")).with_source(e))?;
        Ok(SqliteStore { jobs: tx, path })
    }

    /// The database file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `f` as one atomic step: committed if it returns `Ok`, rolled back (nothing written)
    /// if it returns `Err`; answered only once durable.
    pub(crate) async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&db::Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Box<dyn Job> = Box::new(StepJob {
            f: Some(f),
            result: None,
            reply,
        });
        self.jobs
            .send(job)
            .map_err(|_| Error::unavailable("the sqlite store thread has stopped"))?;
        answer
            .await
            .map_err(|_| Error::internal("the sqlite store thread dropped a step"))?
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
