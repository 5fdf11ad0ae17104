//! PostgreSQL and MySQL/MariaDB: writer threads (`writer_count`) over one queue.
//!
//! Each writer has its own connection and takes up to `MAX_BATCH` queued units into one
//! transaction, a savepoint per unit; between two units `RELEASE SAVEPOINT unit; SAVEPOINT
//! unit` goes as one round trip on MySQL, and on PostgreSQL with the next unit's first
//! statement (`Conn::defer`), and not at all after a unit that ran no statement (one
//! that only emits messages, whose rows the batch appends at its end). PostgreSQL keeps the subtransactions of a transaction in a
//! per-backend cache of 64: a batch never holds more. The units' messages are appended at the
//! end of the batch, positions taken from the log's counter row (see `log::append_numbered`),
//! whose row lock orders the appending batches' commits. A commit is durable when the server
//! answers it, so a batch is reported at once.
//!
//! The watcher wakes this process's consumers for other processes' commits: on PostgreSQL a
//! listener thread receives the `NOTIFY` each appending batch sends; on MySQL, which has no
//! notifications, a thread polls the counter row, often while the log moves and less often
//! while it rests.

use super::LogHead;
use super::{
    apply, gather, run_unit, spawn_thread, Command, Finish, Inner, Job, Migration, Outgoing, Ran,
    Readers, StoreError, UnitOfWork, WriterMetrics, Writing, WRITE_QUEUE,
};
use crate::log;
use crate::sql::{self, Backend, Conn, ServerUrl};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Writer threads, each with its own connection, as measured on each server here (2 cores
/// shared with the server). On PostgreSQL one: a batch goes out in one flight with its
/// `COMMIT`, so a second writer has no round trips to overlap and only splits the queue into
/// smaller batches that wait on each other for the log's counter row (POST −15 to −35 % with
/// two). On MySQL, which answers each statement before it takes the next, two: one runs its
/// units while the other waits for its round trips and its commit (POST with one: 0.6 – 0.7 of
/// two in one session, within noise in another; notes ingest 5 – 10 % lower). More than two
/// lose on both (four: −25 %).
fn writer_count(backend: Backend) -> usize {
    match backend {
        Backend::Postgres => 1,
        _ => 2,
    }
}

/// The most units in one transaction: PostgreSQL caches 64 subtransactions per backend.
const MAX_BATCH: usize = 64;
/// The pause before trying a failed connection or `BEGIN` again; it doubles up to `MAX_PAUSE`.
const PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// A PostgreSQL writer whose last batch committed this recently sends `BEGIN` with the
/// batch's first statement; after a longer rest it sends it alone first, so that a
/// connection the server closed meanwhile is found before any unit runs.
const BEGIN_ALONE_AFTER: Duration = Duration::from_secs(1);
/// How long the PostgreSQL listener waits for a notification before it looks for a stop.
const LISTEN_WAIT: Duration = Duration::from_millis(100);
/// The MySQL poller's interval: the shortest right after the log moved, doubling while it
/// rests, up to the longest.
const POLL_FAST: Duration = Duration::from_millis(5);
const POLL_SLOW: Duration = Duration::from_millis(40);
/// Keys of the lock that serialises schema changes across processes.
const PG_SCHEMA_LOCK: i64 = 0x636f_6e76_6579;
const MYSQL_SCHEMA_LOCK: &str = "conveyor_schema";

pub(super) fn start(server: ServerUrl) -> Result<Inner, StoreError> {
    let open_error = |source| StoreError::Open {
        path: format!("{server:?}"),
        source,
    };
    let setup = server.connect().map_err(open_error)?;
    locked(&setup, || create_platform_tables(&setup))?;
    let head = log::head(&setup)?;

    let connect = server.clone();
    let readers = Readers::start(Box::new(move || connect_reader(&connect))).map_err(open_error)?;
    let name: Arc<str> = format!("{:016x}", fastrand::u64(..)).into();
    let writers = (0..writer_count(server.backend()))
        .map(|_| {
            Ok(UnitOfWork::new(
                connect_writer(&server, &name)?,
                Arc::default(),
            ))
        })
        .collect::<Result<Vec<_>, sql::Error>>()
        .map_err(open_error)?;

    let (commands, queue) = mpsc::channel(WRITE_QUEUE);
    let queue = Arc::new(Mutex::new(queue));
    let head = Arc::new(LogHead::new(head));
    // A server makes its commits durable itself: nothing here is ever fatal, but `failed`
    // resolves once every writer (each holding the sender) has stopped.
    let (fatal_tx, fatal) = watch::channel(None);
    let fatal_tx = Arc::new(fatal_tx);
    let stopped_tx = Arc::new(watch::Sender::new(0));
    let stopped = stopped_tx.subscribe();
    let stopping = Arc::new(AtomicBool::new(false));
    let writing = Arc::new(AtomicUsize::new(0));
    for (index, uow) in writers.into_iter().enumerate() {
        let writer = Writer {
            uow,
            server: server.clone(),
            name: name.clone(),
            head: head.clone(),
            stopping: stopping.clone(),
            writing: writing.clone(),
        };
        let (queue, stopped, fatal) = (queue.clone(), stopped_tx.clone(), fatal_tx.clone());
        spawn_thread(&format!("conveyor-writer-{index}"), move || {
            writer.run(&queue);
            stopped.send_modify(|count| *count += 1);
            drop(fatal);
        })?;
    }
    let (stop_watcher, watcher_stopped) = std::sync::mpsc::channel();
    let log_head = head.clone();
    let watched = server.clone();
    match server.backend() {
        Backend::Postgres => spawn_thread("conveyor-listener", move || {
            listen(&watched, &head, &name, &watcher_stopped);
        })?,
        _ => spawn_thread("conveyor-watcher", move || {
            poll(setup, &watched, &head, &watcher_stopped);
        })?,
    }
    Ok(Inner {
        backend: server.backend(),
        commands,
        readers: Arc::new(readers),
        head: log_head,
        flushed: None,
        fatal,
        stopped,
        writers: writer_count(server.backend()),
        stop_watcher: Mutex::new(Some(stop_watcher)),
        stopping,
        server: Some(server),
        writing,
    })
}

/// Applies the migrations not yet applied, one at a time, holding the schema lock so that
/// processes starting together do not both apply one. PostgreSQL runs each migration in a
/// transaction; MySQL commits each DDL statement on its own, so a migration interrupted
/// there must be written to run again (`IF NOT EXISTS`).
pub(super) fn migrate(server: &ServerUrl, migrations: &[Migration]) -> Result<(), StoreError> {
    let conn = server.connect()?;
    locked(&conn, || {
        for migration in migrations {
            match conn.backend() {
                Backend::Postgres => {
                    conn.execute_batch("BEGIN")?;
                    apply(&conn, migration)?;
                    conn.execute_batch("COMMIT")?;
                }
                _ => apply(&conn, migration)?,
            }
        }
        Ok(())
    })
}

/// Creates the platform's tables unless this version of them is there already. Running
/// the script anyway would take locks on tables busy with other processes' writes
/// (`CREATE INDEX IF NOT EXISTS` locks its table against inserts before it finds the index)
/// and deadlock with their batches, failing this process's start.
fn create_platform_tables(conn: &Conn) -> Result<(), StoreError> {
    // On a database without the platform's tables the query fails: then create them.
    let present = conn
        .query_opt(
            "SELECT version FROM conveyor_migrations WHERE service = ? AND version = ?",
            (log::SCHEMA_SERVICE, log::SCHEMA_VERSION),
            |row| row.get::<i64>(0),
        )
        .is_ok_and(|found| found.is_some());
    if present {
        return Ok(());
    }
    conn.execute_batch(log::schema(conn.backend()))?;
    log::upgrade(conn)?;
    conn.execute(
        "INSERT INTO conveyor_migrations (service, version, applied_at) VALUES (?, ?, ?) \
         ON CONFLICT (service, version) DO NOTHING",
        (
            log::SCHEMA_SERVICE,
            log::SCHEMA_VERSION,
            crate::envelope::now_millis(),
        ),
    )?;
    Ok(())
}

/// See `Database::change_schema`.
pub(super) fn change_schema(
    server: &ServerUrl,
    change: impl FnOnce(&Conn) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let conn = server.connect()?;
    locked(&conn, || match conn.backend() {
        Backend::Postgres => {
            conn.execute_batch("BEGIN")?;
            change(&conn)?;
            Ok(conn.execute_batch("COMMIT")?)
        }
        _ => change(&conn),
    })
}

/// Runs `work` holding the schema lock: a session lock, released however `work` ends.
fn locked<T>(conn: &Conn, work: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match conn.backend() {
        Backend::Postgres => {
            conn.execute_batch(&format!("SELECT pg_advisory_lock({PG_SCHEMA_LOCK})"))?
        }
        _ => {
            let taken: Option<i64> = conn.scalar("SELECT GET_LOCK(?, 60)", (MYSQL_SCHEMA_LOCK,))?;
            if taken != Some(1) {
                return Err(StoreError::Commit(
                    "another process held the schema lock for a minute".to_owned(),
                ));
            }
        }
    }
    let result = work();
    let unlocked = match conn.backend() {
        Backend::Postgres => {
            conn.execute_batch(&format!("SELECT pg_advisory_unlock({PG_SCHEMA_LOCK})"))
        }
        _ => conn
            .execute("SELECT RELEASE_LOCK(?)", (MYSQL_SCHEMA_LOCK,))
            .map(drop),
    };
    let value = result?;
    unlocked?;
    Ok(value)
}

struct Writer {
    uow: UnitOfWork,
    server: ServerUrl,
    /// The name this process's writers give in their notifications (`connect_writer`).
    name: Arc<str>,
    head: Arc<LogHead>,
    stopping: Arc<AtomicBool>,
    writing: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, queue: &Mutex<mpsc::Receiver<Command>>) {
        let metrics = WriterMetrics::register();
        let mut failures = 0;
        let mut last_commit: Option<Instant> = None;
        // Units that had not run yet when their batch could not go on.
        let mut carried: Vec<Job> = Vec::new();
        loop {
            let batch = if carried.is_empty() {
                match take(queue) {
                    Some(batch) => batch,
                    None => break,
                }
            } else {
                std::mem::take(&mut carried)
            };
            if batch.is_empty() {
                continue;
            }
            metrics.batch_units.record(batch.len() as f64);
            let started = Instant::now();
            let defer_begin = self.uow.conn.backend() == Backend::Postgres
                && last_commit.is_some_and(|at| at.elapsed() < BEGIN_ALONE_AFTER);
            let end = {
                let _writing = Writing::enter(&self.writing, batch.len());
                run_batch(&mut self.uow, &self.head, batch, defer_begin)
            };
            metrics.commit_seconds.record(started.elapsed());
            if let Some(position) = end.committed_position {
                self.head.advance(position);
            }
            // Told after the head moved: a caller that hears Ok finds its messages counted.
            for finish in end.committed {
                finish(Ok(()));
            }
            carried = end.not_run;
            if end.failed {
                failures += 1;
                if self.stopping.load(Ordering::Acquire) {
                    tracing::error!(
                        units = carried.len(),
                        "stopping with the database failing; abandoning what is queued"
                    );
                    carried.clear();
                    continue;
                }
                self.recover(failures);
            } else {
                failures = 0;
                last_commit = Some(Instant::now());
            }
        }
    }

    /// After a failed batch: waits, and replaces the connection if the server closed it.
    fn recover(&mut self, failures: u32) {
        let pause = PAUSE
            .saturating_mul(2_u32.saturating_pow(failures.saturating_sub(1)))
            .min(MAX_PAUSE);
        std::thread::sleep(pause);
        if self.uow.conn.is_broken() {
            match connect_writer(&self.server, &self.name) {
                Ok(conn) => self.uow.conn = conn,
                Err(error) => tracing::error!(%error, "cannot reconnect to the database"),
            }
        }
    }
}

/// A read connection. On PostgreSQL it plans without sequential and bitmap scans: a lane's
/// read filters by `key_hash % partitions`, an expression whose selectivity the planner
/// guesses at 0.5 % (a quarter, with four partitions), so with a backlog it chose to read the
/// whole backlog and sort it on every read of 256 rows (measured: 19 ms per read with 60k
/// rows queued; the drain of 200k notes went at 16k rows/s). The platform's and the
/// services' reads are all index reads by design; a table without a usable index is still
/// scanned, only costed last.
fn connect_reader(server: &ServerUrl) -> Result<Conn, sql::Error> {
    let conn = server.connect()?;
    if conn.backend() == Backend::Postgres {
        conn.execute_batch("SET enable_seqscan = off; SET enable_bitmapscan = off")?;
    }
    Ok(conn)
}

/// A writer's connection: one that gives up waiting for a row lock soon, so that two batches
/// waiting on each other's rows (a deadlock the server would take a second or more to see)
/// fail one unit fast, and `Database::write` runs it again. On PostgreSQL it is named
/// `name`, which its notifications carry (`log::WRITER_SETTING`).
fn connect_writer(server: &ServerUrl, name: &str) -> Result<Conn, sql::Error> {
    let conn = server.connect()?;
    match server.backend() {
        Backend::Postgres => conn.execute_batch(&format!(
            "SET lock_timeout = '25ms'; SET {} = '{name}'",
            log::WRITER_SETTING
        ))?,
        _ => conn.execute_batch("SET SESSION innodb_lock_wait_timeout = 2")?,
    }
    Ok(conn)
}

/// The next batch from the queue: waits for one unit, then takes what else is queued. None
/// once the queue is closed and empty.
fn take(queue: &Mutex<mpsc::Receiver<Command>>) -> Option<Vec<Job>> {
    let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
    let first = queue.blocking_recv()?;
    let mut batch = Vec::new();
    gather(&mut queue, first, &mut batch, MAX_BATCH);
    Some(batch)
}

/// How a batch ended. Every unit that ran and failed has been told.
struct BatchEnd {
    /// The last position the batch appended, once committed.
    committed_position: Option<i64>,
    /// The units of a batch that committed, still to be told.
    committed: Vec<Finish>,
    /// The units that never ran because the transaction could not begin.
    not_run: Vec<Job>,
    failed: bool,
}

/// Runs a batch of units in one transaction, each in a savepoint, appends their messages
/// and commits. A failed step fails every unit that ran: nothing is reported committed that
/// is not. `defer_begin`: `BEGIN` goes with the first statement (PostgreSQL).
fn run_batch(uow: &mut UnitOfWork, head: &LogHead, batch: Vec<Job>, defer_begin: bool) -> BatchEnd {
    let begin = "BEGIN; SAVEPOINT unit";
    let begun = if defer_begin {
        uow.conn.defer(begin)
    } else {
        uow.conn.execute_batch(begin)
    };
    if let Err(error) = begun {
        tracing::error!(%error, "cannot begin a write transaction; will try again");
        let _ = uow.conn.execute_batch("ROLLBACK");
        return BatchEnd {
            committed_position: None,
            committed: Vec::new(),
            not_run: batch,
            failed: true,
        };
    }
    let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
    let mut outbox: Vec<Outgoing> = Vec::new();
    let mut jobs = batch.into_iter().peekable();
    // Whether a unit lost a lock race: MySQL then rolls the whole transaction back, and the
    // step after the unit fails for that reason.
    let mut conflicted = false;
    // Whether the transaction waits long for the log's counter row yet (see `COUNTER_WAIT`).
    let mut counter_wait = false;
    let outcome = loop {
        let Some(job) = jobs.next() else {
            if uow.conn.seen_closed() {
                break Err(Failure::Lost);
            }
            break commit(&uow.conn, head, &outbox, counter_wait)
                .map_err(|error| Failure::of(&uow.conn, &error, conflicted));
        };
        let held = uow.conn.held_mark();
        let (ran, emitted) = run_unit(uow, job);
        conflicted |= uow.conn.had_conflict();
        if uow.conn.seen_closed() {
            finishes.extend(ran.into_finish());
            break Err(Failure::Lost);
        }
        // Rows of several units failed together: no unit of the batch can be told it failed.
        if let Some(reason) = uow.conn.held_failure() {
            finishes.extend(ran.into_finish());
            break Err(Failure::Unmerged(reason));
        }
        // A unit that ran no statement (one that only emits) left its savepoint empty: the
        // next unit uses it as it is. After a unit that ran any, the release is also the
        // check that the transaction is still alive (a unit may have swallowed the error of
        // a statement that aborted it, and `COMMIT` of an aborted transaction rolls back
        // without an error on PostgreSQL), so the last one is released too.
        let touched = uow.conn.ran_statements();
        // Each finish joins the batch's before the step, so a failing step tells it.
        let step = match ran {
            Ran::Commit(finish) => {
                finishes.push(finish);
                outbox.extend(emitted);
                touched.then_some(if jobs.peek().is_some() {
                    "RELEASE SAVEPOINT unit; SAVEPOINT unit"
                } else {
                    "RELEASE SAVEPOINT unit"
                })
            }
            Ran::RollBack(finish) => {
                finishes.extend(finish);
                uow.conn.roll_back_held(held);
                touched.then_some("ROLLBACK TO SAVEPOINT unit")
            }
        };
        // The last step also sets the counter row's wait, in the same round trip.
        let step = match step {
            Some(step) if jobs.peek().is_none() && waits_for_counter(&uow.conn, &outbox) => {
                counter_wait = true;
                Some(format!("{step}; {COUNTER_WAIT}"))
            }
            step => step.map(str::to_owned),
        };
        // The previous step went out with this unit's first statement (`Conn::defer`).
        if let Some(error) = uow.conn.take_deferred_error() {
            break Err(Failure::before_commit(&uow.conn, &error, conflicted));
        }
        if let Some(Err(error)) = step.map(|step| uow.conn.defer(&step)) {
            break Err(Failure::before_commit(&uow.conn, &error, conflicted));
        }
    };
    match outcome {
        Ok(position) => {
            uow.conn.clear_held();
            BatchEnd {
                committed_position: position,
                committed: finishes,
                not_run: Vec::new(),
                failed: false,
            }
        }
        Err(failure) => {
            // Its units run again (`Database::write`), routine under contention; or alone.
            match &failure {
                Failure::Conflict(reason) => {
                    tracing::debug!(%reason, "a batch lost a lock race; it is rolled back")
                }
                Failure::Unmerged(reason) => tracing::debug!(
                    %reason,
                    "rows of several units failed to insert together; each runs again alone"
                ),
                Failure::Lost => {
                    tracing::warn!(
                        "the connection was lost before the batch committed; its units run again"
                    )
                }
                Failure::Commit(reason) => {
                    tracing::error!(%reason, "group commit failed; the batch is rolled back")
                }
            }
            uow.conn.forget_deferred();
            uow.conn.clear_held();
            let _ = uow.conn.execute_batch("ROLLBACK");
            for finish in finishes {
                finish(Err(failure.clone().into()));
            }
            // Units not run yet go to the next batch; none was started.
            BatchEnd {
                committed_position: None,
                committed: Vec::new(),
                not_run: jobs.collect(),
                failed: true,
            }
        }
    }
}

/// Why a batch rolled back, as each of its units is told.
#[derive(Clone)]
enum Failure {
    /// A unit lost a race for a row lock: each runs again.
    Conflict(String),
    /// Rows of several units failed to insert together: each runs again alone.
    Unmerged(String),
    /// The connection was lost before `COMMIT` was sent: each unit runs again.
    Lost,
    Commit(String),
}

impl Failure {
    /// `of`, for a failure before the batch's `COMMIT` was sent.
    fn before_commit(conn: &Conn, error: &sql::Error, conflicted: bool) -> Failure {
        if conn.seen_closed() {
            return Failure::Lost;
        }
        Failure::of(conn, error, conflicted)
    }

    /// How `error`, the statement or step that failed the batch, fails it.
    fn of(conn: &Conn, error: &sql::Error, conflicted: bool) -> Failure {
        match conn.held_failure() {
            Some(reason) => Failure::Unmerged(reason),
            None if conflicted || error.is_conflict() => Failure::Conflict(error.to_string()),
            None => Failure::Commit(error.to_string()),
        }
    }
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Conflict(reason) => StoreError::Conflict(reason),
            Failure::Unmerged(reason) => StoreError::Unmerged(reason),
            Failure::Lost => StoreError::Conflict(
                "the connection to the database was lost before the batch committed".to_owned(),
            ),
            Failure::Commit(reason) => StoreError::Commit(reason),
        }
    }
}

/// Writers give up a lock wait after 25 ms (`connect_writer`), which breaks deadlocks
/// between units quickly. The log's counter row is every appending batch's last lock, so
/// waiting for it cannot deadlock: an appending batch waits as long as the batch holding it
/// takes to commit, which on a starved CPU can be more than 25 ms. (MySQL's writers wait
/// 2 s for any lock already.)
const COUNTER_WAIT: &str = "SET LOCAL lock_timeout = '10s'";

/// Does this batch append to the log on PostgreSQL, and so take the counter row?
fn waits_for_counter(conn: &Conn, outbox: &[Outgoing]) -> bool {
    conn.backend() == Backend::Postgres && !outbox.is_empty()
}

/// Appends the batch's messages, commits, and records their topics in `head` (before the
/// writer moves it); the last position appended, if any. PostgreSQL sends `COMMIT` in the
/// append's flight, and its listener leaves this process's notifications to the writers.
/// MySQL records the topics before it commits: its poller cannot tell whose commit moved
/// the counter. `counter_wait`: the batch's last step already set `COUNTER_WAIT`.
fn commit(
    conn: &Conn,
    head: &LogHead,
    outbox: &[Outgoing],
    counter_wait: bool,
) -> Result<Option<i64>, sql::Error> {
    if !counter_wait && waits_for_counter(conn, outbox) {
        // With the held rows or the counter bump, whichever goes first.
        conn.defer(COUNTER_WAIT)?;
    }
    let committed = match conn.backend() {
        Backend::Postgres => {
            log::append_numbered(conn, outbox, Some("COMMIT")).inspect(|position| {
                head.appended(*position, outbox);
            })
        }
        _ => log::append_numbered(conn, outbox, None).and_then(|position| {
            head.appended(position, outbox);
            conn.execute_batch("COMMIT")?;
            Ok(position)
        }),
    };
    // The last unit's step went out with the first of these: if it failed, so did the
    // transaction, and PostgreSQL answers `COMMIT` of a failed transaction by rolling back.
    match conn.take_deferred_error() {
        Some(error) => Err(error),
        None => committed,
    }
}

/// Has `close` asked the watcher to stop?
fn stopped(stop: &Receiver<()>) -> bool {
    matches!(stop.try_recv(), Err(TryRecvError::Disconnected) | Ok(()))
}

/// PostgreSQL: moves the head on every `NOTIFY conveyor_log` of another process, whose
/// payload is the last position the notifying batch appended and the name of the writer
/// that sent it: writers named `own` are this process's, which move the head themselves
/// once they have recorded what they appended (`commit`). On (re)connecting it reads the
/// head, for what was notified while it was away.
fn listen(server: &ServerUrl, head: &LogHead, own: &str, stop: &Receiver<()>) {
    let mut listening: Option<Conn> = None;
    while !stopped(stop) {
        let Some(conn) = &listening else {
            match subscribe(server, head) {
                Ok(conn) => listening = Some(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for commits; will try again");
                    std::thread::sleep(MAX_PAUSE);
                }
            }
            continue;
        };
        match conn.postgres_notifications(LISTEN_WAIT) {
            Ok(payloads) => {
                let others = payloads.iter().filter_map(|payload| {
                    let (position, writer) = payload.split_once(' ').unwrap_or((payload, ""));
                    (writer != own).then(|| position.parse().ok()).flatten()
                });
                if let Some(position) = others.max() {
                    head.advance_seen(position);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "lost the connection listening for commits");
                listening = None;
            }
        }
    }
}

fn subscribe(server: &ServerUrl, head: &LogHead) -> Result<Conn, StoreError> {
    let conn = server.connect()?;
    conn.execute_batch(&format!("LISTEN {}", log::CHANNEL))?;
    head.advance_seen(log::head(&conn)?);
    Ok(conn)
}

/// MySQL: reads the counter row, every `POLL_FAST` while it moves, slowing to `POLL_SLOW`
/// while it rests.
fn poll(mut conn: Conn, server: &ServerUrl, head: &LogHead, stop: &Receiver<()>) {
    let mut interval = POLL_FAST;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        match log::head(&conn) {
            Ok(position) => {
                let moved = head.advance_seen(position);
                interval = if moved {
                    POLL_FAST
                } else {
                    (interval * 2).min(POLL_SLOW)
                };
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the log head");
                interval = MAX_PAUSE;
                if conn.is_broken() {
                    if let Ok(fresh) = server.connect() {
                        conn = fresh;
                    }
                }
            }
        }
    }
}
