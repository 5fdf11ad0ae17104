//! The database behind every unit of work: an embedded SQLite file in WAL mode.
//!
//! All writes go through one writer thread that owns the only write connection. It takes
//! whatever units of work are queued, runs each inside a savepoint of one transaction and
//! commits them together (group commit). Units of work are plain functions run on that
//! thread, so each statement is a function call, not a hop to another thread. Because there
//! is only one writer, log positions are assigned and committed in the same order, so a
//! consumer reading "everything after position N" never skips a row that commits late.
//!
//! A committed batch is reported to its callers only once it is on disk, but the writer does
//! not wait for the disk: a syncer thread flushes the write-ahead log (one `fdatasync` for
//! every batch committed since the last one) while the writer runs the next batch. This is
//! exactly the sync SQLite's `synchronous=FULL` does after each commit, moved off the
//! writer's path. The log head, which wakes consumers, also moves only after the flush.
//!
//! Reads go to a small pool of read-only connections on blocking threads and never wait for
//! the writer. A watcher thread notices commits of other processes on the same file and moves
//! the log head for them too, so their messages wake this process's consumers.

use crate::context::{self, CausalContext};
use crate::envelope::{header, now_millis, Envelope, Message};
use crate::log;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use uuid::Uuid;

/// Units of work waiting for the writer; callers wait (backpressure) when it is full.
const WRITE_QUEUE: usize = 1024;
/// The most units of work committed in one transaction.
const MAX_BATCH: usize = 256;
const READ_CONNECTIONS: usize = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements each connection keeps.
const STATEMENT_CACHE: usize = 128;
/// SQLite virtual-machine steps between two looks at a unit's deadline.
const DEADLINE_CHECK_STEPS: i32 = 10_000;
/// The pause before beginning a transaction again after `BEGIN` failed.
const BEGIN_RETRY: Duration = Duration::from_millis(100);
/// How often the watcher looks for commits of other processes on the same file.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// Every how many ticks the watcher asks SQLite even though the WAL looks unchanged.
const WATCH_FULL_CHECK_TICKS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("cannot encode message {name}: {source}")]
    Encode {
        name: &'static str,
        source: serde_json::Error,
    },
    #[error("the unit of work was abandoned before it committed: the writer has stopped")]
    Abandoned,
    #[error("the unit of work panicked; it was rolled back")]
    Panicked,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the database writer did not answer within {0:?}")]
    Unresponsive(Duration),
    #[error("cannot decode stored data: {0}")]
    Undecodable(String),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot open the database's write-ahead log {path}: {source}")]
    OpenWal {
        path: String,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Is this a failure of the store itself (a full disk, a busy or failing file, a batch
    /// that did not commit), rather than of the work that ran? Such failures say nothing
    /// about the work: trying it again once the store recovers will do.
    pub fn is_infrastructure(&self) -> bool {
        use rusqlite::ErrorCode;
        match self {
            StoreError::Database(error) => matches!(
                error.sqlite_error_code(),
                Some(
                    ErrorCode::DiskFull
                        | ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::SystemIoFailure
                        | ErrorCode::CannotOpen
                        | ErrorCode::OutOfMemory
                        | ErrorCode::ReadOnly
                )
            ),
            StoreError::Abandoned
            | StoreError::Commit(_)
            | StoreError::Unresponsive(_)
            | StoreError::Open { .. }
            | StoreError::OpenWal { .. } => true,
            StoreError::Encode { .. } | StoreError::Panicked | StoreError::Undecodable(_) => false,
        }
    }
}

/// The error for a stored value that does not decode: the data is corrupt, not the query.
pub fn corrupt(column: &str, error: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("column {column}: {error}").into(),
    )
}

/// A schema change owned by one service. Versions are applied once, in order, per service.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub service: &'static str,
    pub version: i64,
    pub sql: &'static str,
}

/// Told whether the batch holding a unit of work committed, once that is known.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A queued unit of work: runs it, and says what to do with its changes.
type Job = Box<dyn FnOnce(&mut UnitOfWork) -> Ran + Send>;

/// How a unit of work ended, as the writer must treat it.
enum Ran {
    /// Keep its changes; its caller hears `Ok` once the batch is on disk.
    Commit(Finish),
    /// Roll its changes back. A caller still waiting hears its own error only once the
    /// batch committed: had the batch rolled back, the state that error was decided on
    /// (a seat taken by an earlier unit, say) may never have existed.
    RollBack(Option<Finish>),
}

enum Command {
    Run(Job),
    /// Commit what is queued, then stop.
    Stop,
}

/// A message waiting for its unit of work to commit.
pub(crate) struct Outgoing {
    pub envelope: Envelope,
    /// Set on a replayed dead letter: only this consumer group receives it again.
    pub only_group: Option<String>,
}

/// One database transaction, plus the messages it will publish when it commits.
pub struct UnitOfWork {
    conn: Connection,
    outbox: Vec<Outgoing>,
    context: CausalContext,
    /// When set and passed, SQLite interrupts the statement running.
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl UnitOfWork {
    /// The open transaction. Everything executed on it commits or rolls back as one.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Queues `message` for publication; it is written in this transaction and delivered
    /// only after the transaction commits.
    pub fn emit<M: Message>(&mut self, message: &M) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(message).map_err(|source| StoreError::Encode {
            name: M::NAME,
            source,
        })?;
        let mut headers = BTreeMap::new();
        headers.insert(
            header::CONTENT_TYPE.to_owned(),
            "application/json".to_owned(),
        );
        if let Some(id) = &self.context.correlation_id {
            headers.insert(header::CORRELATION_ID.to_owned(), id.clone());
        }
        if let Some(id) = &self.context.causation_id {
            headers.insert(header::CAUSATION_ID.to_owned(), id.clone());
        }
        self.outbox.push(Outgoing {
            envelope: Envelope {
                id: Uuid::now_v7(),
                kind: M::KIND,
                name: M::NAME.to_owned(),
                topic: M::TOPIC.to_owned(),
                key: message.key(),
                payload,
                headers,
                occurred_at: now_millis(),
            },
            only_group: None,
        });
        Ok(())
    }

    /// Sets the causal context stamped on what is emitted from here on.
    pub(crate) fn set_context(&mut self, context: CausalContext) {
        self.context = context;
    }

    pub(crate) fn republish(&mut self, envelope: Envelope, only_group: String) {
        self.outbox.push(Outgoing {
            envelope,
            only_group: Some(only_group),
        });
    }

    /// Runs `work` with every SQL statement it starts after `limit` interrupted; also says
    /// whether the limit passed.
    pub(crate) fn within<T>(
        &mut self,
        limit: Duration,
        work: impl FnOnce(&mut UnitOfWork) -> T,
    ) -> (T, bool) {
        let deadline = Instant::now() + limit;
        self.set_deadline(Some(deadline));
        let outcome = work(self);
        self.set_deadline(None);
        (outcome, Instant::now() >= deadline)
    }

    fn set_deadline(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = deadline;
    }
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    readers: Arc<Readers>,
    head: watch::Receiver<i64>,
    /// Set once the database can no longer be trusted with a write (a failed flush).
    fatal: watch::Receiver<Option<String>>,
    /// Becomes true when the writer thread has committed its last batch and stopped.
    stopped: watch::Receiver<bool>,
    /// Dropping it stops the watcher thread.
    stop_watcher: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Set by `close`: a batch that cannot begin is then abandoned, not retried forever.
    stopping: Arc<AtomicBool>,
}

/// Read-only connections, each used by one blocking thread at a time.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    fn take(&self) -> Result<Connection, rusqlite::Error> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_connection(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY),
        }
    }

    fn put_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }
}

fn open_connection(path: &Path, access: OpenFlags) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        access | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Keeps SQLite from recompiling a cached statement whenever a bound value differs from
    // the one it was planned with (a lane's partition number, say): plans here never
    // depend on the values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

fn open_writer(path: &Path) -> Result<(UnitOfWork, i64), rusqlite::Error> {
    let mut conn = open_connection(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The syncer thread flushes the WAL after every commit, before anyone hears of it.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(log::SCHEMA)?;
    let head = log::head(&conn)?;
    let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watched = deadline.clone();
    conn.progress_handler(
        DEADLINE_CHECK_STEPS,
        Some(move || {
            watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|deadline| Instant::now() >= deadline)
        }),
    )?;
    let uow = UnitOfWork {
        conn,
        outbox: Vec::new(),
        context: CausalContext::default(),
        deadline,
    };
    Ok((uow, head))
}

impl Database {
    /// Opens (creating if needed) the SQLite file at `path` and starts the writer thread.
    pub async fn open(path: &Path) -> Result<Database, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let (uow, head) = open_writer(path).map_err(open_error)?;
        // SQLite's own idea of the file (symbolic links resolved), not ours.
        let wal = wal_path(uow.conn.path().unwrap_or_default());
        let wal = open_wal(&wal).map_err(|source| StoreError::OpenWal {
            path: wal.display().to_string(),
            source,
        })?;
        let readers = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(READ_CONNECTIONS)),
        });
        readers.put_back(readers.take().map_err(open_error)?);
        let watcher =
            open_connection(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(open_error)?;

        let watched_wal = wal.try_clone().map_err(|source| StoreError::OpenWal {
            path: path.display().to_string(),
            source,
        })?;

        let (commands, queue) = mpsc::channel(WRITE_QUEUE);
        let head = Arc::new(watch::Sender::new(head));
        let (fatal_tx, fatal_rx) = watch::channel(None);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let (stop_watcher, watcher_stopped) = std::sync::mpsc::channel();
        let writer_head = head.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let writer_stopping = stopping.clone();
        let head_rx = head.subscribe();
        spawn_thread("conveyor-writer", move || {
            run_writer(uow, queue, wal, writer_head, fatal_tx, &writer_stopping);
            stopped_tx.send_replace(true);
        })?;
        spawn_thread("conveyor-watcher", move || {
            watch_other_processes(&watcher, &watched_wal, &head, &watcher_stopped);
        })?;
        Ok(Database {
            inner: Arc::new(Inner {
                commands,
                readers,
                head: head_rx,
                fatal: fatal_rx,
                stopped: stopped_rx,
                stop_watcher: Mutex::new(Some(stop_watcher)),
                stopping,
            }),
        })
    }

    /// Resolves with the reason once the database can no longer take writes safely: after a
    /// failed flush of the write-ahead log, the only safe recovery is a restart, which
    /// replays the log from what is on disk (PostgreSQL does the same).
    pub async fn failed(&self) -> String {
        let mut fatal = self.inner.fatal.clone();
        let reason = match fatal.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The writer is gone; so is any chance of writing.
            Err(_) => "the database writer has stopped".to_owned(),
        };
        reason
    }

    /// The position of the newest message in the log; changes after every commit that
    /// published something.
    pub fn head(&self) -> watch::Receiver<i64> {
        self.inner.head.clone()
    }

    /// Runs `work` as one unit of work and returns once it has committed (or failed).
    ///
    /// An `Err` from `work` rolls back everything it did, messages included, and is returned
    /// only once the batch it ran in committed: if the batch rolled back instead, the caller
    /// hears the commit error, never an answer decided on state that did not survive. The
    /// messages it emitted are durable when this returns `Ok`. Dropping the returned future before `work`
    /// starts cancels it. Work runs on the single writer thread: keep it to database work.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut UnitOfWork) -> Result<T, E> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<T, E>>();
        let context = context::current();
        let span = tracing::Span::current();
        let job: Job = Box::new(move |uow| {
            if reply.is_closed() {
                return Ran::RollBack(None);
            }
            let _entered = span.enter();
            uow.context = context;
            match std::panic::catch_unwind(AssertUnwindSafe(|| work(uow))) {
                Ok(Ok(value)) => Ran::Commit(Box::new(move |batch: Result<(), StoreError>| {
                    let _ = reply.send(batch.map(|()| value).map_err(E::from));
                })),
                Ok(Err(error)) => Ran::RollBack(Some(Box::new(move |batch| {
                    let _ = reply.send(Err(batch.map_or_else(E::from, |()| error)));
                }))),
                Err(_) => {
                    tracing::error!("a unit of work panicked; rolled back");
                    let _ = reply.send(Err(E::from(StoreError::Panicked)));
                    Ran::RollBack(None)
                }
            }
        });
        self.inner
            .commands
            .send(Command::Run(job))
            .await
            .map_err(|_| E::from(StoreError::Abandoned))?;
        result.await.unwrap_or(Err(E::from(StoreError::Abandoned)))
    }

    /// Runs `query` on a read-only connection, on a blocking thread. It sees every committed
    /// unit of work, never an uncommitted one.
    pub async fn read<T, E, F>(&self, query: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        // The permit goes with the blocking task: a caller that gives up does not free the
        // connection while a query still runs on it.
        let permit = self
            .inner
            .readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| E::from(StoreError::Abandoned))?;
        let readers = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = readers.take().map_err(StoreError::from)?;
            let result = query(&conn);
            readers.put_back(conn);
            result
        })
        .await
        .unwrap_or(Err(E::from(StoreError::Abandoned)))
    }

    /// Applies the migrations not yet applied, in order, each in its own unit of work.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        for migration in migrations.iter().copied() {
            self.write(move |uow| {
                let conn = uow.conn();
                let applied = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM conveyor_migrations WHERE service = ? AND version = ?)",
                    (migration.service, migration.version),
                    |row| row.get::<_, bool>(0),
                )?;
                if !applied {
                    conn.execute_batch(migration.sql)?;
                    conn.execute(
                        "INSERT INTO conveyor_migrations (service, version, applied_at) VALUES (?, ?, ?)",
                        (migration.service, migration.version, now_millis()),
                    )?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        }
        Ok(())
    }

    /// Can the database commit? Writes a row through the writer and reads it back, within
    /// `timeout`: a full disk, a failed flush, a stopped or stuck writer all fail it.
    pub async fn probe(&self, timeout: Duration) -> Result<(), StoreError> {
        if let Some(reason) = self.inner.fatal.borrow().clone() {
            return Err(StoreError::Commit(reason));
        }
        let checked_at = now_millis();
        let write_and_read = async {
            self.write(move |uow| {
                uow.conn()
                    .prepare_cached(
                        // As many pages as a typical unit writes: a disk with room for
                        // one page but not for a write is not ready.
                        "INSERT INTO conveyor_health (id, checked_at, padding) \
                         VALUES (1, ?, zeroblob(8192)) \
                         ON CONFLICT (id) DO UPDATE \
                         SET checked_at = excluded.checked_at, padding = excluded.padding",
                    )?
                    .execute([checked_at])?;
                Ok::<_, StoreError>(())
            })
            .await?;
            self.read(|conn| {
                Ok::<i64, StoreError>(conn.query_row(
                    "SELECT checked_at FROM conveyor_health WHERE id = 1",
                    [],
                    |row| row.get(0),
                )?)
            })
            .await
        };
        tokio::time::timeout(timeout, write_and_read)
            .await
            .map_err(|_| StoreError::Unresponsive(timeout))??;
        Ok(())
    }

    /// Commits what is queued, stops the writer and closes the connections.
    pub async fn close(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner
            .stop_watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let _ = self.inner.commands.send(Command::Stop).await;
        let mut stopped = self.inner.stopped.clone();
        let _ = stopped.wait_for(|stopped| *stopped).await;
        self.inner.readers.permits.close();
        self.inner
            .readers
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// SQLite's write-ahead log beside the database file.
fn wal_path(database: &str) -> PathBuf {
    PathBuf::from(format!("{database}-wal"))
}

/// Opens the write-ahead log for flushing, and flushes its directory once: until the
/// directory entry is on disk, a crash could lose the whole WAL, not just its last frames.
fn open_wal(path: &Path) -> std::io::Result<std::fs::File> {
    let wal = std::fs::File::open(path)?;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(wal)
}

fn spawn_thread(name: &str, run: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .map(drop)
        .map_err(|error| StoreError::Commit(format!("cannot start {name}: {error}")))
}

/// Moves the log head when another process (another `conveyor` on the same file, or a CLI
/// command such as `dlq replay`) appends to the log, so this process's consumers wake within
/// a few milliseconds instead of at their safety poll. Commits of this process move the head
/// too, sometimes before the syncer does: a consumer may then read a message before it is on
/// disk, which is safe for the reason `Database` gives for readers.
///
/// Every tick looks at the WAL's size and modification time (one `fstat`); only when they
/// changed, or every `WATCH_FULL_CHECK_TICKS` ticks (file times are coarse, and a WAL reset
/// after a checkpoint rewrites it in place), does it ask SQLite, which costs a read
/// transaction: asking every tick took most of a percent of a core.
fn watch_other_processes(
    conn: &Connection,
    wal: &std::fs::File,
    head: &watch::Sender<i64>,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    let stamp = || {
        wal.metadata()
            .ok()
            .map(|metadata| (metadata.len(), metadata.modified().ok()))
    };
    let data_version = |conn: &Connection| {
        conn.prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get::<_, i64>(0))
    };
    let (mut seen_stamp, mut seen_version) = (stamp(), data_version(conn).ok());
    let mut ticks: u32 = 0;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(WATCH_INTERVAL) {
        ticks = ticks.wrapping_add(1);
        let now = stamp();
        if now == seen_stamp && !ticks.is_multiple_of(WATCH_FULL_CHECK_TICKS) {
            continue;
        }
        seen_stamp = now;
        let version = data_version(conn).ok();
        if version == seen_version {
            continue;
        }
        seen_version = version;
        match log::head(conn) {
            Ok(position) => {
                head.send_if_modified(|head| {
                    let moved = position > *head;
                    *head = (*head).max(position);
                    moved
                });
            }
            Err(error) => tracing::warn!(%error, "cannot read the log head"),
        }
    }
}

fn run_writer(
    mut uow: UnitOfWork,
    mut queue: mpsc::Receiver<Command>,
    wal: std::fs::File,
    head: Arc<watch::Sender<i64>>,
    fatal: watch::Sender<Option<String>>,
    stopping: &AtomicBool,
) {
    let metrics = WriterMetrics::register();
    let (committed, to_sync) = std::sync::mpsc::channel();
    let syncer = {
        let fatal = fatal.clone();
        let flushes = metrics.flush_seconds.clone();
        std::thread::Builder::new()
            .name("conveyor-syncer".into())
            .spawn(move || run_syncer(&wal, &to_sync, &head, &fatal, &flushes))
    };
    let syncer = match syncer {
        Ok(syncer) => syncer,
        Err(error) => {
            tracing::error!(%error, "cannot start the syncer; no writes are possible");
            fatal.send_replace(Some(format!("cannot start the syncer: {error}")));
            return;
        }
    };
    // Units that had not run yet when their batch could not go on.
    let mut carried: Vec<Job> = Vec::new();
    loop {
        let mut next = None;
        if carried.is_empty() {
            match queue.blocking_recv() {
                Some(command) => next = Some(command),
                None => break,
            }
        }
        let mut batch = std::mem::take(&mut carried);
        while let Some(command) = next {
            match command {
                Command::Run(job) => batch.push(job),
                // What was queued before the stop still runs; then `blocking_recv` ends the loop.
                Command::Stop => queue.close(),
            }
            next = if batch.len() < MAX_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if fatal.borrow().is_some() {
            // Nothing more may commit: it could become durable while its caller hears it
            // failed. Dropped units tell their callers they were abandoned.
            queue.close();
            continue;
        }
        metrics.batch_units.record(batch.len() as f64);
        let started = Instant::now();
        let end = run_batch(&mut uow, batch);
        metrics.commit_seconds.record(started.elapsed());
        if let Some(batch) = end.committed {
            // The syncer outlives this loop, so the send cannot fail.
            let _ = committed.send(batch);
        }
        carried = end.not_run;
        if !end.began && stopping.load(Ordering::Acquire) {
            // Shutting down while the file stays locked: the callers hear their units were
            // abandoned (a redelivery or a retry will do them), rather than wait forever.
            tracing::error!(
                units = carried.len(),
                "stopping with the database still locked; abandoning what is queued"
            );
            carried.clear();
            queue.close();
            while queue.try_recv().is_ok() {}
        }
    }
    // The connection closes only after the last flush (closing may remove the WAL).
    drop(committed);
    let _ = syncer.join();
}

/// Metric names of the writer.
pub mod metric {
    /// Units of work per transaction (histogram).
    pub const BATCH_UNITS: &str = "conveyor_writer_batch_units";
    /// Time to run and commit one batch, before its flush (histogram).
    pub const COMMIT_SECONDS: &str = "conveyor_writer_commit_seconds";
    /// Time of one flush of the write-ahead log (histogram).
    pub const FLUSH_SECONDS: &str = "conveyor_writer_flush_seconds";
}

struct WriterMetrics {
    batch_units: metrics::Histogram,
    commit_seconds: metrics::Histogram,
    flush_seconds: metrics::Histogram,
}

impl WriterMetrics {
    fn register() -> Self {
        WriterMetrics {
            batch_units: metrics::histogram!(metric::BATCH_UNITS),
            commit_seconds: metrics::histogram!(metric::COMMIT_SECONDS),
            flush_seconds: metrics::histogram!(metric::FLUSH_SECONDS),
        }
    }
}

/// A batch committed to the WAL, waiting to be flushed to disk before it is reported.
struct Committed {
    finishes: Vec<Finish>,
    last_position: Option<i64>,
}

/// Flushes the WAL once for every batch committed meanwhile, then reports them committed
/// and moves the log head. A failed flush fails its batches and every later one: after an
/// fsync error the kernel may have dropped the data, and a later flush proves nothing.
fn run_syncer(
    wal: &std::fs::File,
    batches: &std::sync::mpsc::Receiver<Committed>,
    head: &watch::Sender<i64>,
    fatal: &watch::Sender<Option<String>>,
    flushes: &metrics::Histogram,
) {
    let mut failure: Option<String> = None;
    while let Ok(first) = batches.recv() {
        let group: Vec<Committed> = std::iter::once(first).chain(batches.try_iter()).collect();
        if failure.is_none() {
            let started = Instant::now();
            if let Err(error) = wal.sync_data() {
                tracing::error!(%error, "cannot flush the write-ahead log; writes now fail");
                let reason = format!("cannot flush the write-ahead log: {error}");
                failure = Some(reason.clone());
                fatal.send_replace(Some(reason));
            }
            flushes.record(started.elapsed());
        }
        if failure.is_none() {
            if let Some(position) = group.iter().filter_map(|batch| batch.last_position).max() {
                head.send_if_modified(|head| {
                    let moved = position > *head;
                    *head = (*head).max(position);
                    moved
                });
            }
        }
        for finish in group.into_iter().flat_map(|batch| batch.finishes) {
            finish(match &failure {
                None => Ok(()),
                Some(reason) => Err(StoreError::Commit(reason.clone())),
            });
        }
    }
}

/// How a batch ended: the units committed (still to be flushed and told), and the units
/// that never ran because the transaction failed under them. Every other unit has been told.
struct BatchEnd {
    committed: Option<Committed>,
    not_run: Vec<Job>,
    /// False when `BEGIN` failed, so nothing of the batch ran.
    began: bool,
}

/// Runs a batch of units of work in one transaction, each inside its own savepoint so one
/// failing unit rolls back alone, then commits once.
///
/// If a savepoint step or the commit fails, or SQLite rolls the whole transaction back on
/// its own (it does when a write statement is interrupted, or on a full disk or an IO
/// error), every unit that ran is told it failed: nothing may be reported committed that is
/// not. The units not yet run go to the next batch.
fn run_batch(uow: &mut UnitOfWork, batch: Vec<Job>) -> BatchEnd {
    if let Err(error) = exec(&uow.conn, "BEGIN IMMEDIATE") {
        // Another process held the write lock past the busy timeout, or the file failed:
        // nothing ran, so the whole batch waits for the next try.
        tracing::error!(%error, "cannot begin a write transaction; will try again");
        std::thread::sleep(BEGIN_RETRY);
        return BatchEnd {
            committed: None,
            not_run: batch,
            began: false,
        };
    }
    let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
    let mut last_position = None;
    let mut jobs = batch.into_iter();
    // A unit that could not start, for the next batch.
    let mut unstarted = None;
    let outcome = loop {
        let Some(job) = jobs.next() else {
            break exec(&uow.conn, "COMMIT").map_err(|error| error.to_string());
        };
        if let Err(error) = exec(&uow.conn, "SAVEPOINT unit") {
            unstarted = Some(job);
            break Err(error.to_string());
        }
        let ran = run_unit(uow, job);
        if uow.conn.is_autocommit() {
            match ran.0 {
                // It failed, and its failure rolled everything back: its own error stands.
                Ran::RollBack(Some(finish)) => finish(Ok(())),
                Ran::RollBack(None) => {}
                Ran::Commit(finish) => finishes.push(finish),
            }
            break Err("SQLite rolled the transaction back (an interrupted write?)".to_owned());
        }
        if let Err(error) = close_unit(uow, ran, &mut finishes, &mut last_position) {
            break Err(error.to_string());
        }
    };
    match outcome {
        Ok(()) => BatchEnd {
            committed: Some(Committed {
                finishes,
                last_position,
            }),
            not_run: Vec::new(),
            began: true,
        },
        Err(error) => {
            tracing::error!(%error, "group commit failed; the batch is rolled back");
            if !uow.conn.is_autocommit() {
                let _ = exec(&uow.conn, "ROLLBACK");
            }
            for finish in finishes {
                finish(Err(StoreError::Commit(error.clone())));
            }
            BatchEnd {
                committed: None,
                not_run: unstarted.into_iter().chain(jobs).collect(),
                began: true,
            }
        }
    }
}

/// Ends a unit's savepoint: releases it with the unit's messages appended to the log, or
/// rolls it back when the unit failed or its messages could not be appended.
fn close_unit(
    uow: &mut UnitOfWork,
    (ran, outbox): (Ran, Vec<Outgoing>),
    finishes: &mut Vec<Finish>,
    last_position: &mut Option<i64>,
) -> Result<(), rusqlite::Error> {
    // Each finish joins the batch's before a step that can fail, so that a failing step
    // tells it the batch failed.
    let finish = match ran {
        Ran::Commit(finish) => finish,
        Ran::RollBack(finish) => {
            finishes.extend(finish);
            exec(&uow.conn, "ROLLBACK TO unit")?;
            return exec(&uow.conn, "RELEASE unit");
        }
    };
    match log::append(&uow.conn, &outbox) {
        Ok(position) => {
            *last_position = position.or(*last_position);
            finishes.push(finish);
            exec(&uow.conn, "RELEASE unit")
        }
        Err(error) => {
            finish(Err(StoreError::Database(error)));
            exec(&uow.conn, "ROLLBACK TO unit")?;
            exec(&uow.conn, "RELEASE unit")
        }
    }
}

/// Runs one unit of work; returns how it ended and the messages it emitted.
fn run_unit(uow: &mut UnitOfWork, job: Job) -> (Ran, Vec<Outgoing>) {
    uow.outbox.clear();
    let ran = job(uow);
    // A unit that panicked inside `within` left its deadline set.
    uow.set_deadline(None);
    (ran, std::mem::take(&mut uow.outbox))
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}
