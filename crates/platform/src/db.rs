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
//! the writer.

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("cannot encode message {name}: {source}")]
    Encode {
        name: &'static str,
        source: serde_json::Error,
    },
    #[error(
        "the unit of work was abandoned before it committed (writer stopped or work panicked)"
    )]
    Abandoned,
    #[error("commit failed: {0}")]
    Commit(String),
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

/// Told whether the batch holding a successful unit of work committed.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A queued unit of work: runs it, and returns how to report the commit when it succeeded.
type Job = Box<dyn FnOnce(&mut UnitOfWork) -> Option<Finish> + Send>;

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
    /// Becomes true when the writer thread has committed its last batch and stopped.
    stopped: watch::Receiver<bool>,
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
        let wal = std::fs::File::open(&wal).map_err(|source| StoreError::OpenWal {
            path: wal.display().to_string(),
            source,
        })?;
        let readers = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(READ_CONNECTIONS)),
        });
        readers.put_back(readers.take().map_err(open_error)?);

        let (commands, queue) = mpsc::channel(WRITE_QUEUE);
        let (head_tx, head_rx) = watch::channel(head);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        std::thread::Builder::new()
            .name("conveyor-writer".into())
            .spawn(move || {
                run_writer(uow, queue, wal, head_tx);
                stopped_tx.send_replace(true);
            })
            .map_err(|error| StoreError::Commit(format!("cannot start the writer: {error}")))?;
        Ok(Database {
            inner: Arc::new(Inner {
                commands,
                readers,
                head: head_rx,
                stopped: stopped_rx,
            }),
        })
    }

    /// The position of the newest message in the log; changes after every commit that
    /// published something.
    pub fn head(&self) -> watch::Receiver<i64> {
        self.inner.head.clone()
    }

    /// Runs `work` as one unit of work and returns once it has committed (or failed).
    ///
    /// An `Err` from `work` rolls back everything it did, messages included. The messages it
    /// emitted are durable when this returns `Ok`. Dropping the returned future before `work`
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
                return None;
            }
            let _entered = span.enter();
            uow.context = context;
            match work(uow) {
                Ok(value) => Some(Box::new(move |committed: Result<(), StoreError>| {
                    let _ = reply.send(committed.map(|()| value).map_err(E::from));
                })),
                Err(error) => {
                    let _ = reply.send(Err(error));
                    None
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

    /// Is the database answering reads?
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    /// Commits what is queued, stops the writer and closes the connections.
    pub async fn close(&self) {
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

fn run_writer(
    mut uow: UnitOfWork,
    mut queue: mpsc::Receiver<Command>,
    wal: std::fs::File,
    head: watch::Sender<i64>,
) {
    let flush_failed = Arc::new(AtomicBool::new(false));
    let (committed, to_sync) = std::sync::mpsc::channel();
    let syncer = {
        let flush_failed = flush_failed.clone();
        std::thread::Builder::new()
            .name("conveyor-syncer".into())
            .spawn(move || run_syncer(&wal, &to_sync, &head, &flush_failed))
    };
    let syncer = match syncer {
        Ok(syncer) => syncer,
        Err(error) => {
            tracing::error!(%error, "cannot start the syncer; no writes are possible");
            return;
        }
    };
    // Units that had not run yet when SQLite aborted their batch's transaction.
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
        if flush_failed.load(Ordering::Acquire) {
            // Nothing more may commit: it could become durable while its caller hears it
            // failed. Dropped units tell their callers they were abandoned.
            queue.close();
            continue;
        }
        let end = run_batch(&mut uow, batch);
        if let Some(batch) = end.committed {
            // The syncer outlives this loop, so the send cannot fail.
            let _ = committed.send(batch);
        }
        carried = end.not_run;
    }
    // The connection closes only after the last flush (closing may remove the WAL).
    drop(committed);
    let _ = syncer.join();
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
    flush_failed: &AtomicBool,
) {
    let mut failure: Option<String> = None;
    while let Ok(first) = batches.recv() {
        let group: Vec<Committed> = std::iter::once(first).chain(batches.try_iter()).collect();
        if failure.is_none() {
            if let Err(error) = wal.sync_data() {
                tracing::error!(%error, "cannot flush the write-ahead log; writes now fail");
                failure = Some(error.to_string());
                flush_failed.store(true, Ordering::Release);
            }
        }
        if failure.is_none() {
            if let Some(position) = group.iter().filter_map(|batch| batch.last_position).max() {
                head.send_replace(position);
            }
        }
        for finish in group.into_iter().flat_map(|batch| batch.finishes) {
            finish(match &failure {
                None => Ok(()),
                Some(error) => Err(StoreError::Commit(format!(
                    "cannot flush the write-ahead log: {error}"
                ))),
            });
        }
    }
}

/// How a batch ended: the units committed (still to be flushed and told), and the units
/// that never ran because the transaction failed under them. Every other unit has been told.
#[derive(Default)]
struct BatchEnd {
    committed: Option<Committed>,
    not_run: Vec<Job>,
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
        tracing::error!(%error, "cannot begin a write transaction");
        return BatchEnd::default();
    }
    let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
    let mut last_position = None;
    let mut jobs = batch.into_iter();
    let outcome = loop {
        let Some(job) = jobs.next() else {
            break exec(&uow.conn, "COMMIT").map_err(|error| error.to_string());
        };
        if let Err(error) = exec(&uow.conn, "SAVEPOINT unit") {
            break Err(error.to_string());
        }
        let ran = run_unit(uow, job);
        if uow.conn.is_autocommit() {
            finishes.extend(ran.map(|(finish, _)| finish));
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
                not_run: jobs.collect(),
            }
        }
    }
}

/// Ends a unit's savepoint: releases it with the unit's messages appended to the log, or
/// rolls it back when the unit failed or its messages could not be appended.
fn close_unit(
    uow: &mut UnitOfWork,
    ran: Option<(Finish, Vec<Outgoing>)>,
    finishes: &mut Vec<Finish>,
    last_position: &mut Option<i64>,
) -> Result<(), rusqlite::Error> {
    let Some((finish, outbox)) = ran else {
        exec(&uow.conn, "ROLLBACK TO unit")?;
        return exec(&uow.conn, "RELEASE unit");
    };
    match log::append(&uow.conn, &outbox) {
        Ok(position) => {
            *last_position = position.or(*last_position);
            exec(&uow.conn, "RELEASE unit")?;
            finishes.push(finish);
        }
        Err(error) => {
            exec(&uow.conn, "ROLLBACK TO unit")?;
            exec(&uow.conn, "RELEASE unit")?;
            finish(Err(StoreError::Database(error)));
        }
    }
    Ok(())
}

/// Runs one unit of work; returns its messages, or `None` when it failed (and has been told
/// so): its changes must be rolled back.
fn run_unit(uow: &mut UnitOfWork, job: Job) -> Option<(Finish, Vec<Outgoing>)> {
    uow.outbox.clear();
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job(uow)));
    // A unit that panicked inside `within` left its deadline set.
    uow.set_deadline(None);
    let finish = match ran {
        Ok(finish) => finish?,
        Err(_) => {
            tracing::error!("a unit of work panicked; rolled back");
            return None;
        }
    };
    Some((finish, std::mem::take(&mut uow.outbox)))
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}
