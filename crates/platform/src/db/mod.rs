//! The database behind every unit of work: an embedded SQLite file (`sqlite`), or a
//! PostgreSQL or MySQL/MariaDB server (`server`), behind one interface.
//!
//! A unit of work is a plain function run on a writer thread, inside a savepoint of a
//! transaction that several queued units share (group commit): one failing unit rolls back
//! alone, and the batch commits once. Each statement is a function call on that thread,
//! not a hop to another. SQLite has one writer; a server has a pool of them, each with its
//! own connection. The messages units emit are appended to the log in the same transaction,
//! and log positions commit in the order they were handed out (see `log`), so a consumer
//! reading "everything after position N" never skips a row that commits late.
//!
//! Reads go to a small pool of connections on blocking threads and never wait for a writer.
//! A watcher thread notices commits of other processes and moves the log head for them, so
//! their messages wake this process's consumers.

mod head;
mod server;
mod sqlite;

use crate::context::{self, CausalContext};
use crate::envelope::{header, now_millis, Envelope, Message};
use crate::sql::{self, Backend, Conn, ServerUrl};
use head::LogHead;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use uuid::Uuid;

/// Units of work waiting for a writer; callers wait (backpressure) when it is full.
const WRITE_QUEUE: usize = 1024;
const READ_CONNECTIONS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sql::Error),
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
    #[error("the unit of work kept losing races for row locks: {0}")]
    Conflict(String),
    /// Rows units inserted together failed to insert (`UnitOfWork::insert`): which unit's
    /// did is not known, so each unit of the batch runs again alone. Never reaches a caller.
    #[error("a multi-row insert of several units' rows failed: {0}")]
    Unmerged(String),
    #[error("cannot open the database {path}: {source}")]
    Open { path: String, source: sql::Error },
    #[error("cannot open the database's write-ahead log {path}: {source}")]
    OpenWal {
        path: String,
        source: std::io::Error,
    },
    #[error("unsupported database `{0}`: expected postgres://… or mysql://…")]
    Url(String),
}

impl StoreError {
    /// Is this a failure of the store itself (a full disk, a busy or failing file, a lost
    /// connection, a batch that did not commit), rather than of the work that ran? Such
    /// failures say nothing about the work: trying it again once the store recovers will do.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            StoreError::Database(error) => error.is_infrastructure(),
            StoreError::Abandoned
            | StoreError::Commit(_)
            | StoreError::Conflict(_)
            | StoreError::Unmerged(_)
            | StoreError::Unresponsive(_)
            | StoreError::Open { .. }
            | StoreError::OpenWal { .. } => true,
            StoreError::Encode { .. }
            | StoreError::Panicked
            | StoreError::Undecodable(_)
            | StoreError::Url(_) => false,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Database(error.into())
    }
}

/// A schema change owned by one service. Versions are applied once, in order, per service;
/// each backend has its own script, since their DDL differs (types, keys, auto-increment).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub service: &'static str,
    pub version: i64,
    pub sqlite: &'static str,
    pub postgres: &'static str,
    pub mysql: &'static str,
}

impl Migration {
    /// The script for `backend`.
    pub fn script(&self, backend: Backend) -> &'static str {
        match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
            Backend::Mysql => self.mysql,
        }
    }
}

/// How many times a unit that keeps losing lock races runs before its caller hears so.
const CONFLICT_ATTEMPTS: u32 = 20;
/// The pause before the second run of such a unit; it doubles with each run up to
/// `CONFLICT_MAX_PAUSE`, jittered (about 3 s in all before giving up).
const CONFLICT_PAUSE: Duration = Duration::from_millis(5);
const CONFLICT_MAX_PAUSE: Duration = Duration::from_millis(200);

/// What one run of a unit of work came to.
enum Attempt<T, E> {
    Done(Result<T, E>),
    /// It lost a race for a row lock and rolled back: worth running again.
    Conflicted(String),
    /// Rows it inserted with other units' failed together: to run again alone.
    Unmerged,
}

impl<T, E: From<StoreError>> Attempt<T, E> {
    /// What a unit's caller hears when its batch failed.
    fn batch_failed(error: StoreError) -> Attempt<T, E> {
        match error {
            StoreError::Conflict(reason) => Attempt::Conflicted(reason),
            StoreError::Unmerged(_) => Attempt::Unmerged,
            error => Attempt::Done(Err(E::from(error))),
        }
    }
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

impl Ran {
    /// Who is still to be told how the unit's batch ended.
    fn into_finish(self) -> Option<Finish> {
        match self {
            Ran::Commit(finish) => Some(finish),
            Ran::RollBack(finish) => finish,
        }
    }
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
    conn: Conn,
    outbox: Vec<Outgoing>,
    context: CausalContext,
    /// When set and passed, SQLite interrupts the statement running.
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl UnitOfWork {
    fn new(conn: Conn, deadline: Arc<Mutex<Option<Instant>>>) -> UnitOfWork {
        UnitOfWork {
            conn,
            outbox: Vec::new(),
            context: CausalContext::default(),
            deadline,
        }
    }

    /// The open transaction. Everything executed on it commits or rolls back as one.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Inserts one row with `sql`, a single-row `INSERT … VALUES (?, …)`, for a unit that
    /// does not need the answer. On SQLite it runs at once. On a server the writer holds
    /// the row to insert it with the rows of the other units in its batch, one multi-row
    /// `INSERT` per statement, before the transaction runs any other statement or commits:
    /// what the unit (or a later one) reads sees it, but its own error does not reach the
    /// unit here. When such an insert fails, the batch rolls back and each of its units
    /// runs again alone, inserting at once: then the error is the unit's, as it would be
    /// with `conn().execute`. Any other statement runs at once (see `sql::held`).
    pub fn insert(&self, sql: &'static str, params: impl sql::Params) -> Result<(), sql::Error> {
        self.conn.insert(sql, params)
    }

    /// Queues `message` for publication; it is written in this transaction and delivered
    /// only after the transaction commits.
    pub fn emit<M: Message>(&mut self, message: &M) -> Result<(), StoreError> {
        self.emit_with(message, [])
    }

    /// `emit`, with `extra` headers.
    pub(crate) fn emit_with<M: Message, const N: usize>(
        &mut self,
        message: &M,
        extra: [(&str, String); N],
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(message).map_err(|source| StoreError::Encode {
            name: M::NAME,
            source,
        })?;
        let name = message.name();
        let mut headers = BTreeMap::new();
        headers.insert(
            header::CONTENT_TYPE.to_owned(),
            "application/json".to_owned(),
        );
        headers.extend(extra.map(|(name, value)| (name.to_owned(), value)));
        let revision = crate::envelope::revision::<M>(name);
        if revision > 1 {
            headers.insert(header::REVISION.to_owned(), revision.to_string());
        }
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
                name: name.to_owned(),
                topic: M::TOPIC.to_owned(),
                key: message.key(),
                payload,
                headers: headers.into(),
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

    /// Runs `work` with every SQL statement it starts after `limit` interrupted (on SQLite;
    /// a server's statements run to their end); also says whether the limit passed.
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

/// What a backend's `start` sets up: the writers' queue, the readers, and what the writer
/// and watcher threads report.
struct Inner {
    backend: Backend,
    commands: mpsc::Sender<Command>,
    readers: Arc<Readers>,
    head: Arc<LogHead>,
    /// On SQLite, the newest log position this process flushed; every earlier row, of any
    /// process, was written to the write-ahead log before it and is on disk too.
    flushed: Option<Arc<AtomicI64>>,
    /// Set once the database can no longer be trusted with a write (a failed flush).
    fatal: watch::Receiver<Option<String>>,
    /// How many writer threads have committed their last batch and stopped, of `writers`.
    stopped: watch::Receiver<usize>,
    writers: usize,
    /// Dropping it stops the watcher thread.
    stop_watcher: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Set by `close`: a batch that cannot begin is then abandoned, not retried forever.
    stopping: Arc<AtomicBool>,
    /// A server's address, for work that needs a connection of its own (migrations).
    server: Option<ServerUrl>,
    /// How many units the writers' running batches hold (`Database::is_busy`).
    writing: Arc<AtomicUsize>,
}

/// Counts a running batch's units for as long as it lives.
struct Writing<'a> {
    writing: &'a AtomicUsize,
    units: usize,
}

impl<'a> Writing<'a> {
    fn enter(writing: &'a AtomicUsize, units: usize) -> Writing<'a> {
        writing.fetch_add(units, Ordering::Relaxed);
        Writing { writing, units }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.writing.fetch_sub(self.units, Ordering::Relaxed);
    }
}

type Connect = Box<dyn Fn() -> Result<Conn, sql::Error> + Send + Sync>;

/// Connections for reads, each used by one blocking thread at a time.
struct Readers {
    connect: Connect,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    /// Readers over `connect`, with one connection opened now, so that a database that
    /// cannot be read fails at once.
    fn start(connect: Connect) -> Result<Readers, sql::Error> {
        let first = connect()?;
        Ok(Readers {
            connect,
            idle: Mutex::new(vec![first]),
            permits: Arc::new(Semaphore::new(READ_CONNECTIONS)),
        })
    }

    fn take(&self) -> Result<Conn, sql::Error> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => (self.connect)(),
        }
    }

    /// A new connection, for one the server closed.
    fn connect(&self) -> Result<Conn, sql::Error> {
        (self.connect)()
    }

    fn put_back(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    fn close(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        close_off_runtime(idle);
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.close();
    }
}

/// Closes `conns`. The PostgreSQL client closes its connection by blocking on a runtime of
/// its own, which panics on a tokio worker: a server's connections close on a thread of
/// their own.
fn close_off_runtime(conns: Vec<Conn>) {
    if conns.iter().all(|conn| conn.backend() == Backend::Sqlite) {
        return drop(conns);
    }
    if let Err(error) = std::thread::Builder::new()
        .name("conveyor-closer".into())
        .spawn(move || drop(conns))
    {
        tracing::warn!(%error, "cannot start a thread to close connections");
    }
}

impl Database {
    /// Opens (creating if needed) the SQLite file at `path` and starts its writer thread.
    pub async fn open(path: &Path) -> Result<Database, StoreError> {
        Ok(Database {
            inner: Arc::new(sqlite::start(path)?),
        })
    }

    /// Connects to the PostgreSQL (`postgres://`) or MySQL/MariaDB (`mysql://`) database at
    /// `url`, creates the platform's tables if needed and starts a pool of writer threads.
    pub async fn connect(url: &str) -> Result<Database, StoreError> {
        let scheme = url.split(':').next().unwrap_or_default();
        let server = ServerUrl::parse(url).ok_or_else(|| StoreError::Url(scheme.to_owned()))?;
        let inner = tokio::task::spawn_blocking(move || server::start(server))
            .await
            .map_err(|_| StoreError::Panicked)??;
        Ok(Database {
            inner: Arc::new(inner),
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.inner.backend
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
        self.inner.head.subscribe()
    }

    /// May the log hold a message on one of `topics` after position `after`, as far as
    /// this process knows? Ask after reading `head`: a false answer holds up to it.
    pub(crate) fn log_may_hold(&self, topics: &[String], after: i64) -> bool {
        self.inner.head.may_hold(topics, after)
    }

    /// Runs `work` as one unit of work and returns once it has committed (or failed).
    ///
    /// An `Err` from `work` rolls back everything it did, messages included, and is returned
    /// only once the batch it ran in committed: if the batch rolled back instead, the caller
    /// hears the commit error, never an answer decided on state that did not survive. The
    /// messages it emitted are durable when this returns `Ok`. Dropping the returned future
    /// before `work` starts cancels it. Work runs on a writer thread: keep it to database work.
    ///
    /// On a server, a unit that lost a race for a row lock (a deadlock between two batches,
    /// a lock wait past its limit) runs again, up to `CONFLICT_ATTEMPTS` times in all: `work`
    /// is `Fn` because it may run more than once, each time in a fresh savepoint.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: Fn(&mut UnitOfWork) -> Result<T, E> + Send + Sync + 'static,
    {
        let work = Arc::new(work);
        let context = context::current();
        let mut attempt = 1;
        let mut alone = false;
        loop {
            match self
                .write_once(work.clone(), context.clone(), alone)
                .await?
            {
                Attempt::Done(result) => return result,
                // Not a lost race: another unit's row may be what failed.
                Attempt::Unmerged => alone = true,
                Attempt::Conflicted(reason) if attempt >= CONFLICT_ATTEMPTS => {
                    return Err(E::from(StoreError::Conflict(reason)));
                }
                Attempt::Conflicted(reason) => {
                    tracing::debug!(%reason, attempt, "a unit lost a lock race; running it again");
                    let pause = CONFLICT_PAUSE
                        .saturating_mul(2_u32.saturating_pow(attempt - 1))
                        .min(CONFLICT_MAX_PAUSE);
                    tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One run of a unit of work.
    async fn write_once<T, E, F>(
        &self,
        work: Arc<F>,
        context: CausalContext,
        alone: bool,
    ) -> Result<Attempt<T, E>, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: Fn(&mut UnitOfWork) -> Result<T, E> + Send + Sync + 'static,
    {
        let (reply, result) = oneshot::channel::<Attempt<T, E>>();
        let span = tracing::Span::current();
        let job: Job = Box::new(move |uow| {
            if reply.is_closed() {
                return Ran::RollBack(None);
            }
            let _entered = span.enter();
            uow.context = context;
            uow.conn.hold_rows(!alone);
            match std::panic::catch_unwind(AssertUnwindSafe(|| work(uow))) {
                Ok(Ok(value)) => Ran::Commit(Box::new(move |batch: Result<(), StoreError>| {
                    let _ = reply.send(match batch {
                        Ok(()) => Attempt::Done(Ok(value)),
                        Err(error) => Attempt::batch_failed(error),
                    });
                })),
                Ok(Err(_)) if uow.conn.had_conflict() => {
                    Ran::RollBack(Some(Box::new(move |_batch| {
                        let _ = reply.send(Attempt::Conflicted(
                            "a statement lost a race for a row lock".to_owned(),
                        ));
                    })))
                }
                Ok(Err(error)) => Ran::RollBack(Some(Box::new(move |batch| {
                    let _ = reply.send(match batch {
                        Ok(()) => Attempt::Done(Err(error)),
                        Err(failed) => Attempt::batch_failed(failed),
                    });
                }))),
                Err(_) => {
                    tracing::error!("a unit of work panicked; rolled back");
                    let _ = reply.send(Attempt::Done(Err(E::from(StoreError::Panicked))));
                    Ran::RollBack(None)
                }
            }
        });
        self.inner
            .commands
            .send(Command::Run(job))
            .await
            .map_err(|_| E::from(StoreError::Abandoned))?;
        Ok(result
            .await
            .unwrap_or(Attempt::Done(Err(E::from(StoreError::Abandoned)))))
    }

    /// Are the writers under load: running batches of several units? At rest a batch is
    /// one unit (a request's, or one consumer lane's), and mostly none is running.
    pub(crate) fn is_busy(&self) -> bool {
        self.inner.writing.load(Ordering::Relaxed) > 1
    }

    /// Returns once the log's rows up to `position`, of this process or of another on the
    /// same file, are on disk. On SQLite a reader sees a commit before the syncer has
    /// flushed it (see `db::sqlite`): safe for what stays in the database, since anything
    /// derived from it is written later in the same write-ahead log and cannot outlive it,
    /// but not for what leaves it: the relay waits for this before it publishes what it
    /// read. A server's commit is durable before others see it: nothing to wait for.
    pub async fn flush_through(&self, position: i64) -> Result<(), StoreError> {
        let Some(flushed) = &self.inner.flushed else {
            return Ok(());
        };
        if position <= flushed.load(Ordering::Acquire) {
            return Ok(());
        }
        // An empty unit commits an empty batch, and its caller hears of it after the
        // syncer's next flush of the write-ahead log, which takes every frame before it.
        self.write(|_| Ok::<_, StoreError>(())).await
    }

    /// Runs `query` on a read-only connection, on a blocking thread. It sees every committed
    /// unit of work, never an uncommitted one. A query that failed because its (pooled)
    /// connection had been closed by the server runs once more, on a new connection: reads
    /// can run twice, which is why `query` is `Fn`.
    pub async fn read<T, E, F>(&self, query: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: Fn(&Conn) -> Result<T, E> + Send + 'static,
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
            if result.is_ok() || !conn.is_broken() {
                readers.put_back(conn);
                return result;
            }
            tracing::warn!("a read connection was closed by the server; reading on a new one");
            close_off_runtime(vec![conn]);
            let fresh = readers.connect().map_err(StoreError::from)?;
            let result = query(&fresh);
            readers.put_back(fresh);
            result
        })
        .await
        .unwrap_or(Err(E::from(StoreError::Abandoned)))
    }

    /// Applies the migrations not yet applied, in order. On SQLite each is one unit of work;
    /// on a server each runs on a connection of its own, holding a lock that keeps other
    /// processes from migrating at the same time (see `server::migrate`).
    /// Runs `change` (DDL: creating or dropping tables) on a connection of its own, holding
    /// the schema lock, outside every unit of work: MySQL commits a transaction that runs
    /// DDL, which inside a batch would commit its other units early.
    pub async fn change_schema<F>(&self, change: F) -> Result<(), StoreError>
    where
        F: Fn(&Conn) -> Result<(), StoreError> + Send + Sync + 'static,
    {
        if let Some(server) = self.inner.server.clone() {
            return tokio::task::spawn_blocking(move || server::change_schema(&server, change))
                .await
                .map_err(|_| StoreError::Panicked)?;
        }
        self.write(move |uow| change(uow.conn())).await
    }

    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        if let Some(server) = self.inner.server.clone() {
            let migrations = migrations.to_vec();
            return tokio::task::spawn_blocking(move || server::migrate(&server, &migrations))
                .await
                .map_err(|_| StoreError::Panicked)?;
        }
        for &migration in migrations {
            self.write(move |uow| apply(uow.conn(), &migration)).await?;
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
                // As many pages as a typical unit writes: a disk with room for one page
                // but not for a write is not ready.
                let padding = vec![0_u8; 8192];
                uow.conn().execute(
                    "INSERT INTO conveyor_health (id, checked_at, padding) VALUES (1, ?, ?) \
                     ON CONFLICT (id) DO UPDATE \
                     SET checked_at = excluded.checked_at, padding = excluded.padding",
                    (checked_at, padding),
                )?;
                Ok::<_, StoreError>(())
            })
            .await?;
            self.read(|conn| {
                Ok::<i64, StoreError>(
                    conn.scalar("SELECT checked_at FROM conveyor_health WHERE id = 1", ())?,
                )
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
        let writers = self.inner.writers;
        let mut stopped = self.inner.stopped.clone();
        let _ = stopped.wait_for(|stopped| *stopped >= writers).await;
        self.inner.readers.permits.close();
        self.inner.readers.close();
    }
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

/// Adds `first` and whatever else is queued to `batch`, up to `max` units. A stop closes the
/// queue: what was queued before it still runs, then every writer's wait for more ends.
fn gather(queue: &mut mpsc::Receiver<Command>, first: Command, batch: &mut Vec<Job>, max: usize) {
    let mut next = Some(first);
    while let Some(command) = next {
        match command {
            Command::Run(job) => batch.push(job),
            Command::Stop => queue.close(),
        }
        next = if batch.len() < max {
            queue.try_recv().ok()
        } else {
            None
        };
    }
}

/// Applies `migration` on `conn` unless it already was.
fn apply(conn: &Conn, migration: &Migration) -> Result<(), StoreError> {
    let applied: bool = conn.scalar(
        "SELECT EXISTS (SELECT 1 FROM conveyor_migrations WHERE service = ? AND version = ?)",
        (migration.service, migration.version),
    )?;
    if !applied {
        let script = migration.script(conn.backend());
        // An empty script: the change does not apply to this backend.
        if !script.trim().is_empty() {
            conn.execute_batch(script)?;
        }
        conn.execute(
            "INSERT INTO conveyor_migrations (service, version, applied_at) VALUES (?, ?, ?)",
            (migration.service, migration.version, now_millis()),
        )?;
    }
    Ok(())
}

fn spawn_thread(name: &str, run: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .map(drop)
        .map_err(|error| StoreError::Commit(format!("cannot start {name}: {error}")))
}

/// Runs one unit of work; returns how it ended and the messages it emitted.
fn run_unit(uow: &mut UnitOfWork, job: Job) -> (Ran, Vec<Outgoing>) {
    uow.outbox.clear();
    uow.conn.reset_marks();
    let ran = job(uow);
    // A unit that panicked inside `within` left its deadline set.
    uow.set_deadline(None);
    (ran, std::mem::take(&mut uow.outbox))
}
