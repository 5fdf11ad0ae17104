//! The embedded SQLite backend: one file in WAL mode, one writer thread.
//!
//! Because there is only one writer, log positions are handed out and committed in the same
//! order. A committed batch is reported to its callers only once it is on disk, but the
//! writer does not wait for the disk: a syncer thread flushes the write-ahead log (one
//! `fdatasync` for every batch committed since the last one) while the writer runs the next
//! batch. This is exactly the sync SQLite's `synchronous=FULL` does after each commit, moved
//! off the writer's path. The log head, which wakes consumers, also moves only after the
//! flush.

use super::{
    gather, run_unit, spawn_thread, Command, Finish, Inner, Job, LogHead, Outgoing, Ran, Readers,
    StoreError, UnitOfWork, WriterMetrics, Writing, WRITE_QUEUE,
};
use crate::log;
use crate::sql::{self, Backend, Conn};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The most units of work committed in one transaction.
const MAX_BATCH: usize = 256;
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

/// Opens (creating if needed) the file at `path` and starts the writer, syncer and
/// watcher threads.
pub(super) fn start(path: &Path) -> Result<Inner, StoreError> {
    let open_error = |source: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        source: source.into(),
    };
    let (mut writer, head) = open_writer(path).map_err(open_error)?;
    // SQLite's own idea of the file (symbolic links resolved), not ours.
    let wal = wal_path(writer.path().unwrap_or_default());
    let wal = open_wal(&wal).map_err(|source| StoreError::OpenWal {
        path: wal.display().to_string(),
        source,
    })?;
    let reader_path = path.to_owned();
    let readers = Readers::start(Box::new(move || {
        Ok(Conn::sqlite(open_connection(
            &reader_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?))
    }))
    .map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let watcher = open_connection(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(open_error)?;
    let watched_wal = wal.try_clone().map_err(|source| StoreError::OpenWal {
        path: path.display().to_string(),
        source,
    })?;
    let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
    install_deadline(&mut writer, deadline.clone()).map_err(open_error)?;
    let uow = UnitOfWork::new(Conn::sqlite(writer), deadline);

    let (commands, queue) = mpsc::channel(WRITE_QUEUE);
    // What is in the file when it opens is on disk.
    let flushed = Arc::new(AtomicI64::new(head));
    let writer_flushed = flushed.clone();
    let head = Arc::new(LogHead::new(head));
    let (fatal_tx, fatal_rx) = watch::channel(None);
    let (stopped_tx, stopped_rx) = watch::channel(0);
    let (stop_watcher, watcher_stopped) = std::sync::mpsc::channel();
    let writer_head = head.clone();
    let log_head = head.clone();
    let stopping = Arc::new(AtomicBool::new(false));
    let writer_stopping = stopping.clone();
    let writing = Arc::new(AtomicUsize::new(0));
    let writer_writing = writing.clone();
    spawn_thread("conveyor-writer", move || {
        let reports = Reports {
            head: writer_head,
            flushed: writer_flushed,
            fatal: fatal_tx,
        };
        run_writer(uow, queue, wal, reports, &writer_stopping, &writer_writing);
        stopped_tx.send_replace(1);
    })?;
    spawn_thread("conveyor-watcher", move || {
        watch_other_processes(&watcher, &watched_wal, &head, &watcher_stopped);
    })?;
    Ok(Inner {
        backend: Backend::Sqlite,
        commands,
        readers: Arc::new(readers),
        head: log_head,
        flushed: Some(flushed),
        fatal: fatal_rx,
        stopped: stopped_rx,
        writers: 1,
        stop_watcher: Mutex::new(Some(stop_watcher)),
        stopping,
        server: None,
        writing,
    })
}

/// How much of the database file each connection maps into memory (address space, not
/// memory: the pages are the OS's file cache).
const MMAP_BYTES: i64 = 256 * 1024 * 1024;

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
    // Pages are read from the OS's cache in place, not copied by a `pread` each: a
    // connection's own page cache starts empty after every commit of another connection,
    // so a consumer reading what was just written copied every page it passed (measured: a
    // quarter more notes drained per second). Writes still go through `write`.
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    Ok(conn)
}

fn open_writer(path: &Path) -> Result<(Connection, i64), rusqlite::Error> {
    let conn = open_connection(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The syncer thread flushes the WAL after every commit, before anyone hears of it.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Each unit runs in a savepoint, for which SQLite copies every page the unit first
    // changes into a statement journal; past 64 KiB that journal spills to a temporary file,
    // a `write` per page (a unit of 256 notes changes about 20). In memory it stays a copy,
    // as large as the pages one unit changes (the platform's own units change at most 500
    // rows: `retention::BATCH`).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.execute_batch(log::SQLITE_SCHEMA)?;
    log::sqlite_upgrade(&conn)?;
    let head = log::sqlite_head(&conn)?;
    Ok((conn, head))
}

/// Makes SQLite interrupt a statement that runs past the unit's deadline.
fn install_deadline(
    conn: &mut Connection,
    deadline: Arc<Mutex<Option<Instant>>>,
) -> Result<(), rusqlite::Error> {
    conn.progress_handler(
        DEADLINE_CHECK_STEPS,
        Some(move || {
            deadline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|deadline| Instant::now() >= deadline)
        }),
    )
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

/// Moves the log head when another process (another `conveyor` on the same file, or a CLI
/// command such as `dlq replay`) appends to the log, so this process's consumers wake within
/// a few milliseconds instead of at their safety poll. Commits of this process move the head
/// too, sometimes before the syncer does: a consumer may then read a message before it is on
/// disk, which is safe for what stays in the database; what leaves it waits for
/// `Database::flush`.
///
/// Every tick looks at the WAL's size and modification time (one `fstat`); only when they
/// changed, or every `WATCH_FULL_CHECK_TICKS` ticks (file times are coarse, and a WAL reset
/// after a checkpoint rewrites it in place), does it ask SQLite, which costs a read
/// transaction: asking every tick took most of a percent of a core.
fn watch_other_processes(
    conn: &Connection,
    wal: &std::fs::File,
    head: &LogHead,
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
        match log::sqlite_head(conn) {
            Ok(position) => {
                head.advance_seen(position);
            }
            Err(error) => tracing::warn!(%error, "cannot read the log head"),
        }
    }
}

/// What the writer and its syncer tell the rest of the process.
struct Reports {
    /// The newest log position committed and flushed, or appended by another process.
    head: Arc<LogHead>,
    /// The newest log position this process's syncer flushed (`Database::flush_through`).
    flushed: Arc<AtomicI64>,
    /// Why writes are no longer possible, once they are not.
    fatal: watch::Sender<Option<String>>,
}

fn run_writer(
    mut uow: UnitOfWork,
    mut queue: mpsc::Receiver<Command>,
    wal: std::fs::File,
    reports: Reports,
    stopping: &AtomicBool,
    writing: &AtomicUsize,
) {
    let metrics = WriterMetrics::register();
    let head = reports.head.clone();
    let (committed, to_sync) = std::sync::mpsc::channel();
    let fatal = reports.fatal.clone();
    let syncer = {
        let flushes = metrics.flush_seconds.clone();
        std::thread::Builder::new()
            .name("conveyor-syncer".into())
            .spawn(move || run_syncer(&wal, &to_sync, &reports, &flushes))
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
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match queue.blocking_recv() {
                Some(first) => gather(&mut queue, first, &mut batch, MAX_BATCH),
                None => break,
            }
        }
        if fatal.borrow().is_some() {
            // Nothing more may commit: it could become durable while its caller hears it
            // failed. Dropped units tell their callers they were abandoned.
            queue.close();
            continue;
        }
        metrics.batch_units.record(batch.len() as f64);
        let started = Instant::now();
        let end = {
            let _writing = Writing::enter(writing, batch.len());
            run_batch(&mut uow, &head, batch)
        };
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
    reports: &Reports,
    flushes: &metrics::Histogram,
) {
    let Reports {
        head,
        flushed,
        fatal,
    } = reports;
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
                flushed.fetch_max(position, Ordering::AcqRel);
                head.advance(position);
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
fn run_batch(uow: &mut UnitOfWork, head: &LogHead, batch: Vec<Job>) -> BatchEnd {
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
        if let Err(error) = close_unit(uow, head, ran, &mut finishes, &mut last_position) {
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
    head: &LogHead,
    (ran, outbox): (Ran, Vec<Outgoing>),
    finishes: &mut Vec<Finish>,
    last_position: &mut Option<i64>,
) -> Result<(), sql::Error> {
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
            head.appended(position, &outbox);
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

fn exec(conn: &Conn, sql: &str) -> Result<(), sql::Error> {
    conn.execute(sql, ()).map(drop)
}
