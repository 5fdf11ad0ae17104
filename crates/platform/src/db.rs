//! The database behind every unit of work: an embedded SQLite file in WAL mode.
//!
//! All writes go through one writer task that owns the only write connection. It takes
//! whatever units of work are queued, runs each inside a savepoint of one transaction and
//! commits them together: one fsync for a whole batch (group commit). Jobs left in the batch
//! after the writer broke off are dropped, and their callers get `StoreError::Abandoned`. Because there is only
//! one writer, log positions are assigned and committed in the same order, so a consumer
//! reading "everything after position N" never skips a row that commits late.
//!
//! Reads go to a small pool of separate connections and never wait for the writer.

use crate::context::{self, CausalContext};
use crate::envelope::{header, now_millis, Envelope, Message};
use crate::log;
use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::ConnectOptions;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Units of work waiting for the writer; callers wait (backpressure) when it is full.
const WRITE_QUEUE: usize = 1024;
/// The most units of work committed in one transaction.
const MAX_BATCH: usize = 256;
const READ_CONNECTIONS: u32 = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
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
    Open { path: String, source: sqlx::Error },
}

/// A schema change owned by one service. Versions are applied once, in order, per service.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub service: &'static str,
    pub version: i64,
    pub sql: &'static str,
}

/// The work a unit of work does: a closure over the open transaction.
pub type Work<T, E> =
    Box<dyn for<'u> FnOnce(&'u mut UnitOfWork) -> BoxFuture<'u, Result<T, E>> + Send>;

/// Told whether the batch holding a successful unit of work committed.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn for<'u> FnOnce(&'u mut UnitOfWork) -> BoxFuture<'u, Option<Finish>> + Send>;

fn job<F>(f: F) -> Job
where
    F: for<'u> FnOnce(&'u mut UnitOfWork) -> BoxFuture<'u, Option<Finish>> + Send + 'static,
{
    Box::new(f)
}

/// A message waiting for its unit of work to commit.
pub(crate) struct Outgoing {
    pub envelope: Envelope,
    /// Set on a replayed dead letter: only this consumer group receives it again.
    pub only_group: Option<String>,
}

/// One database transaction, plus the messages it will publish when it commits.
pub struct UnitOfWork {
    conn: SqliteConnection,
    outbox: Vec<Outgoing>,
    context: CausalContext,
}

impl UnitOfWork {
    /// The open transaction. Everything executed on it commits or rolls back as one.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
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
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: mpsc::Sender<Job>,
    reader: SqlitePool,
    head: watch::Receiver<i64>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Database {
    /// Opens (creating if needed) the SQLite file at `path` and starts the writer task.
    pub async fn open(path: &Path) -> Result<Database, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let mut writer = options.connect().await.map_err(open_error)?;
        sqlx::raw_sql(log::SCHEMA)
            .execute(&mut writer)
            .await
            .map_err(open_error)?;
        let head = log::head(&mut writer).await.map_err(open_error)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await
            .map_err(open_error)?;

        let (jobs, queue) = mpsc::channel(WRITE_QUEUE);
        let (head_tx, head_rx) = watch::channel(head);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(run_writer(writer, queue, head_tx, stop.clone()));
        Ok(Database {
            inner: Arc::new(Inner {
                jobs,
                reader,
                head: head_rx,
                writer: std::sync::Mutex::new(Some(task)),
                stop,
            }),
        })
    }

    /// The read pool. Reads see every committed unit of work, never an uncommitted one.
    pub fn reader(&self) -> &SqlitePool {
        &self.inner.reader
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
    /// finishes rolls it back. Work runs on the single writer: keep it to database work.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'u> FnOnce(&'u mut UnitOfWork) -> BoxFuture<'u, Result<T, E>> + Send + 'static,
    {
        let (mut reply, result) = oneshot::channel::<Result<T, E>>();
        let context = context::current();
        let job = job(move |uow| {
            async move {
                uow.context = context;
                // A caller that gave up (dropped or timed out) abandons its unit of work, so a
                // stuck handler cannot hold the writer.
                let outcome = tokio::select! {
                    biased;
                    outcome = work(uow) => outcome,
                    () = reply.closed() => return None,
                };
                match outcome {
                    Ok(value) => Some(Box::new(move |committed: Result<(), StoreError>| {
                        let _ = reply.send(committed.map(|()| value).map_err(E::from));
                    }) as Finish),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        None
                    }
                }
            }
            .boxed()
        });
        self.inner
            .jobs
            .send(job)
            .await
            .map_err(|_| E::from(StoreError::Abandoned))?;
        result.await.unwrap_or(Err(E::from(StoreError::Abandoned)))
    }

    /// Applies the migrations not yet applied, in order, each in its own unit of work.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        for migration in migrations.iter().copied() {
            self.write(move |uow| {
                async move {
                    let applied: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM conveyor_migrations WHERE service = ? AND version = ?",
                    )
                    .bind(migration.service)
                    .bind(migration.version)
                    .fetch_optional(uow.conn())
                    .await?;
                    if applied.is_none() {
                        // SQLite runs every statement of a multi-statement string.
                        sqlx::Executor::execute(uow.conn(), migration.sql).await?;
                        sqlx::query(
                            "INSERT INTO conveyor_migrations (service, version, applied_at) VALUES (?, ?, ?)",
                        )
                        .bind(migration.service)
                        .bind(migration.version)
                        .bind(now_millis())
                        .execute(uow.conn())
                        .await?;
                    }
                    Ok::<_, StoreError>(())
                }
                .boxed()
            })
            .await?;
        }
        Ok(())
    }

    /// Is the database answering reads?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.reader()).await?;
        Ok(())
    }

    /// Commits what is queued, stops the writer and closes the connections.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        self.inner.reader.close().await;
    }
}

async fn run_writer(
    conn: SqliteConnection,
    mut queue: mpsc::Receiver<Job>,
    head: watch::Sender<i64>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut uow = UnitOfWork {
        conn,
        outbox: Vec::new(),
        context: CausalContext::default(),
    };
    loop {
        let first = tokio::select! {
            biased;
            job = queue.recv() => job,
            () = stop.cancelled() => {
                queue.close();
                queue.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&mut uow, batch, &head).await;
    }
    let _ = sqlx::Connection::close(uow.conn).await;
}

/// Runs a batch of units of work in one transaction, each inside its own savepoint so one
/// failing unit rolls back alone (a lone unit needs none: its failure rolls back the
/// transaction), then commits once and tells every unit the outcome.
///
/// Every statement is a round trip to SQLite's thread, and those are slow on small machines,
/// so closing one savepoint, opening the next and committing share round trips.
async fn run_batch(uow: &mut UnitOfWork, batch: Vec<Job>, head: &watch::Sender<i64>) {
    let isolate = batch.len() > 1;
    let begin = if isolate {
        "BEGIN IMMEDIATE; SAVEPOINT unit"
    } else {
        "BEGIN IMMEDIATE"
    };
    if let Err(error) = exec(uow, begin).await {
        tracing::error!(%error, "cannot begin a write transaction");
        return;
    }
    let count = batch.len();
    let mut finishes: Vec<Finish> = Vec::with_capacity(count);
    let mut last_position = None;
    let mut outcome = Ok(());
    for (index, job) in batch.into_iter().enumerate() {
        let outbox = match run_unit(uow, job).await {
            Some((finish, outbox)) => {
                finishes.push(finish);
                Some(outbox)
            }
            None => None,
        };
        let step = match (isolate, outbox.is_some(), index + 1 == count) {
            (false, true, _) => "COMMIT",
            (false, false, _) => "ROLLBACK",
            (true, true, false) => "RELEASE unit; SAVEPOINT unit",
            (true, false, false) => "ROLLBACK TO unit; RELEASE unit; SAVEPOINT unit",
            (true, true, true) => "RELEASE unit; COMMIT",
            (true, false, true) => "ROLLBACK TO unit; RELEASE unit; COMMIT",
        };
        // The unit's messages and the step share a round trip. If either fails (or SQLite has
        // rolled the whole transaction back on its own, on a full disk or an IO error), the
        // whole batch is rolled back: nothing may be reported committed that is not.
        match log::append_then(&mut uow.conn, &outbox.unwrap_or_default(), step).await {
            Ok(position) => last_position = position.or(last_position),
            Err(error) => {
                outcome = Err(error);
                break;
            }
        }
    }
    if let Err(error) = &outcome {
        tracing::error!(%error, "group commit failed; the batch is rolled back");
        let _ = exec(uow, "ROLLBACK").await;
    }
    if let (Ok(()), Some(position)) = (&outcome, last_position) {
        head.send_replace(position);
    }
    for finish in finishes {
        finish(
            outcome
                .as_ref()
                .map(|_| ())
                .map_err(|e| StoreError::Commit(e.to_string())),
        );
    }
}

/// Runs one unit of work; returns its messages, or `None` when it failed (and has been told
/// so): its changes must be rolled back.
async fn run_unit(uow: &mut UnitOfWork, job: Job) -> Option<(Finish, Vec<Outgoing>)> {
    uow.outbox.clear();
    let finish = match AssertUnwindSafe(job(uow)).catch_unwind().await {
        Ok(finish) => finish?,
        Err(_) => {
            tracing::error!("a unit of work panicked; rolled back");
            return None;
        }
    };
    Some((finish, std::mem::take(&mut uow.outbox)))
}

async fn exec(uow: &mut UnitOfWork, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(&mut uow.conn, sql)
        .await
        .map(|_| ())
}
