//! Projections: read models kept from an aggregate's events, and rebuilt from the event
//! store while the service keeps serving.
//!
//! Live, a projection is a consumer group (its offsets are its checkpoint): each event it is
//! delivered names its stream and version (headers the event store writes), and the version
//! the projection has applied of each stream is kept beside its tables, in
//! `conveyor_projected`, in the same transaction. So an event it already applied changes
//! nothing, and one that arrives past a gap (the events between were applied to tables a
//! rebuild has since replaced) first brings its stream up to date from the event store.
//!
//! A rebuild writes every stream into shadow tables (`<table>_rebuild`), catches up, then,
//! in one transaction that live handling waits for, copies the shadows over the live tables
//! and takes their versions. It reads the event store rather than the log: the store keeps
//! every event forever, the log only until retention. Events of one stream are applied in
//! order; across streams a projection must not rely on order, as live delivery promises
//! order only per key.

use crate::db::{Database, StoreError, UnitOfWork};
use crate::envelope::{header, Message};
use crate::event_store::{self, EventStoreError};
use crate::handler::{ConsumerOptions, HandlerError, Incoming, Subscription};
use crate::sql::{Backend, Conn, ToValue};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most events live handling applies in one transaction, and how long it waits for them:
/// a read model may lag a few milliseconds, and bigger batches write each row once for
/// several events (a match's view, for its moves).
const BATCH: u16 = 256;
const LINGER: Duration = Duration::from_millis(5);
/// How often `caught_up` looks again.
const CATCH_UP_POLL: Duration = Duration::from_millis(2);
/// Streams a rebuild writes in one transaction.
const STREAMS_PER_UNIT: usize = 100;
/// The name a rebuild keeps its versions under, beside the live ones.
const REBUILDING: &str = "~rebuild";
/// The suffix of a projection's shadow tables.
const SHADOW: &str = "_rebuild";

/// The physical names of a projection's tables: the live ones, or a rebuild's shadows.
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    suffix: &'static str,
}

impl Tables {
    pub const LIVE: Tables = Tables { suffix: "" };
    const SHADOW: Tables = Tables { suffix: SHADOW };

    /// Where `table` (one of the projection's) is written.
    pub fn name(&self, table: &str) -> String {
        format!("{table}{}", self.suffix)
    }
}

/// One stored event, for a projection: its stream and version, and the event.
#[derive(Debug, Clone)]
pub struct Projected<E> {
    pub stream: String,
    pub version: u64,
    pub event: E,
}

/// Applies events to the tables, in order: several streams' events may come in one call,
/// each stream's in its order, so that a projection can write each of its rows once.
type Apply<E> = fn(&Tables, &Conn, &[Projected<E>]) -> Result<(), HandlerError>;

/// A read model: the tables it owns and how an event changes them.
#[derive(Clone)]
pub struct Projection {
    name: &'static str,
    tables: &'static [&'static str],
    topic: &'static str,
    names: &'static [&'static str],
    kind: Arc<dyn Kind>,
}

impl std::fmt::Debug for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projection")
            .field("name", &self.name)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

/// What the projection does with events of its own type, type-erased.
trait Kind: Send + Sync {
    fn subscription(&self, projection: &Projection) -> Subscription;

    /// Brings `stream` up to its newest version in `tables`; how many events that applied.
    fn catch_up(
        &self,
        projection: &Projection,
        tables: Tables,
        conn: &Conn,
        stream: &str,
    ) -> Result<u64, HandlerError>;
}

struct Typed<E> {
    apply: Apply<E>,
}

impl<E: Message> Kind for Typed<E> {
    fn subscription(&self, projection: &Projection) -> Subscription {
        let (projection, apply) = (projection.clone(), self.apply);
        Subscription::new(projection.name)
            .on_batch(move |incoming: Vec<Incoming<E>>, uow: &mut UnitOfWork| {
                projection.handle(apply, incoming, uow)
            })
            .with_options(ConsumerOptions {
                batch: BATCH,
                linger: LINGER,
                ..ConsumerOptions::default()
            })
    }

    fn catch_up(
        &self,
        projection: &Projection,
        tables: Tables,
        conn: &Conn,
        stream: &str,
    ) -> Result<u64, HandlerError> {
        let key = projection.key(tables);
        let applied = projected_version(conn, &key, stream)?;
        projection.apply_stored(self.apply, tables, conn, stream, applied)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Handler(#[from] HandlerError),
}

impl From<crate::sql::Error> for ProjectionError {
    fn from(error: crate::sql::Error) -> Self {
        ProjectionError::Store(error.into())
    }
}

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Streams of its events in the event store.
    pub streams: u64,
    /// Streams whose newest event it has applied.
    pub current: u64,
}

impl Projection {
    /// A projection named after its consumer group (`<service>.<name>`), owning `tables`
    /// (created by its service's migrations), kept by `apply` from events of type `E`.
    pub fn new<E: Message>(
        name: &'static str,
        tables: &'static [&'static str],
        apply: Apply<E>,
    ) -> Projection {
        Projection {
            name,
            tables,
            topic: E::TOPIC,
            names: E::NAMES,
            kind: Arc::new(Typed { apply }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn tables(&self) -> &'static [&'static str] {
        self.tables
    }

    /// The topic its events are published on.
    pub fn topic(&self) -> &'static str {
        self.topic
    }

    /// The consumer group that keeps the live tables.
    pub fn subscription(&self) -> Subscription {
        self.kind.subscription(self)
    }

    /// Creates the row live handling locks, so that a rebuild's swap can wait for it.
    pub async fn register(&self, db: &Database) -> Result<(), StoreError> {
        let name = self.name;
        db.write(move |uow| {
            uow.conn().execute(
                "INSERT INTO conveyor_projections (name) VALUES (?) ON CONFLICT (name) DO NOTHING",
                [name],
            )?;
            Ok(())
        })
        .await
    }

    /// The key its versions are kept under in `conveyor_projected`.
    fn key(&self, tables: Tables) -> String {
        if tables.suffix.is_empty() {
            self.name.to_owned()
        } else {
            format!("{}{REBUILDING}", self.name)
        }
    }

    /// Live handling of delivered events, in log order.
    fn handle<E: Message>(
        &self,
        apply: Apply<E>,
        incoming: Vec<Incoming<E>>,
        uow: &mut UnitOfWork,
    ) -> Result<(), HandlerError> {
        let conn = uow.conn();
        lock(conn, self.name, Lock::Shared)?;
        // Per stream: the version applied before this batch, and after it.
        let mut applied: HashMap<String, (u64, u64)> = HashMap::new();
        let mut events = Vec::with_capacity(incoming.len());
        for incoming in incoming {
            let (stream, version) = stream_version(&incoming)?;
            let (_, last) = match applied.get_mut(&stream) {
                Some(versions) => versions,
                None => {
                    let before = projected_version(conn, self.name, &stream)?;
                    applied.entry(stream.clone()).or_insert((before, before))
                }
            };
            if version <= *last {
                continue;
            }
            if version > *last + 1 {
                // A gap: what came between went to tables a rebuild replaced since.
                let stored = event_store::load::<E>(conn, &stream, *last).map_err(stored_error)?;
                events.extend(
                    stored
                        .into_iter()
                        .take_while(|recorded| recorded.version < version)
                        .map(|recorded| Projected {
                            stream: stream.clone(),
                            version: recorded.version,
                            event: recorded.event,
                        }),
                );
            }
            *last = version;
            events.push(Projected {
                stream,
                version,
                event: incoming.message,
            });
        }
        apply(&Tables::LIVE, conn, &events)?;
        for (stream, (before, after)) in applied {
            if after > before {
                set_projected_version(conn, self.name, &stream, after)?;
            }
        }
        Ok(())
    }

    /// Applies the stored events of `stream` after `applied`.
    fn apply_stored<E: Message>(
        &self,
        apply: Apply<E>,
        tables: Tables,
        conn: &Conn,
        stream: &str,
        applied: u64,
    ) -> Result<u64, HandlerError> {
        let events: Vec<Projected<E>> = event_store::load::<E>(conn, stream, applied)
            .map_err(stored_error)?
            .into_iter()
            .map(|recorded| Projected {
                stream: stream.to_owned(),
                version: recorded.version,
                event: recorded.event,
            })
            .collect();
        let Some(last) = events.last().map(|event| event.version) else {
            return Ok(0);
        };
        apply(&tables, conn, &events)?;
        set_projected_version(conn, &self.key(tables), stream, last)?;
        Ok(events.len() as u64)
    }

    /// Waits until the projection has applied `stream` as far as the event store holds it
    /// (a read that follows a command then sees what the command did), polling every few
    /// milliseconds for at most `within`; whether it got there. A stream the store does
    /// not hold is as far as it goes at once.
    pub async fn caught_up(
        &self,
        db: &Database,
        stream: &str,
        within: Duration,
    ) -> Result<bool, StoreError> {
        let deadline = Instant::now() + within;
        loop {
            let (name, on) = (self.name, stream.to_owned());
            let current = db
                .read(move |conn| {
                    let stored = event_store::version(conn, &on).map_err(|error| match error {
                        EventStoreError::Store(error) => error,
                        other => StoreError::Undecodable(other.to_string()),
                    })?;
                    Ok::<_, StoreError>(projected_version(conn, name, &on)? >= stored)
                })
                .await?;
            if current || Instant::now() >= deadline {
                return Ok(current);
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    /// How many of the store's streams it has applied in full.
    pub async fn status(&self, db: &Database) -> Result<Status, StoreError> {
        let projection = self.clone();
        db.read(move |conn| {
            let streams = streams(conn, projection.names)?.len() as u64;
            let behind = behind(conn, projection.names, projection.name)?.len() as u64;
            Ok(Status {
                streams,
                current: streams - behind.min(streams),
            })
        })
        .await
    }

    /// Rebuilds the projection from the event store into shadow tables and swaps them in,
    /// while live handling goes on; `progress` hears (streams done, streams in all).
    pub async fn rebuild(
        &self,
        db: &Database,
        progress: impl Fn(u64, u64),
    ) -> Result<u64, ProjectionError> {
        self.register(db).await?;
        let tables = self.tables;
        db.change_schema(move |conn| {
            for table in tables {
                let shadow = Tables::SHADOW.name(table);
                conn.execute_batch(&format!("DROP TABLE IF EXISTS {shadow}"))?;
                conn.create_table_like(&shadow, table)?;
            }
            Ok(())
        })
        .await?;
        let key = self.key(Tables::SHADOW);
        db.write(move |uow| {
            uow.conn().execute(
                "DELETE FROM conveyor_projected WHERE projection = ?",
                [key.as_str()],
            )?;
            Ok::<_, StoreError>(())
        })
        .await?;
        let names = self.names;
        let streams: Vec<String> = db
            .read(move |conn| Ok::<_, StoreError>(streams(conn, names)?))
            .await?
            .into_iter()
            .map(|(stream, _)| stream)
            .collect();
        let total = streams.len() as u64;
        let mut done = 0;
        for chunk in streams.chunks(STREAMS_PER_UNIT) {
            self.catch_up_shadow(db, chunk.to_vec()).await?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        // What moved during the pass, caught up before the swap, so that the swap (which live
        // handling waits for) has only the last moments' events left to apply.
        let (names, key) = (self.names, self.key(Tables::SHADOW));
        let moved: Vec<String> = db
            .read(move |conn| Ok::<_, StoreError>(behind(conn, names, &key)?))
            .await?;
        for chunk in moved.chunks(STREAMS_PER_UNIT) {
            self.catch_up_shadow(db, chunk.to_vec()).await?;
        }
        self.swap(db).await?;
        Ok(total)
    }

    /// Brings `streams` up to date in the shadow tables, in one unit of work.
    async fn catch_up_shadow(
        &self,
        db: &Database,
        streams: Vec<String>,
    ) -> Result<(), ProjectionError> {
        let projection = self.clone();
        db.write(move |uow| {
            for stream in &streams {
                projection
                    .kind
                    .catch_up(&projection, Tables::SHADOW, uow.conn(), stream)?;
            }
            Ok::<_, ProjectionError>(())
        })
        .await
    }

    /// Copies the caught-up shadows over the live tables, with their versions, while live
    /// handling waits; then drops the shadows.
    async fn swap(&self, db: &Database) -> Result<(), ProjectionError> {
        let projection = self.clone();
        db.write(move |uow| {
            let conn = uow.conn();
            lock(conn, projection.name, Lock::Exclusive)?;
            // Streams that moved since the rebuild read them, as of this transaction.
            let key = projection.key(Tables::SHADOW);
            for stream in behind(conn, projection.names, &key)? {
                projection
                    .kind
                    .catch_up(&projection, Tables::SHADOW, conn, &stream)?;
            }
            for table in projection.tables {
                let shadow = Tables::SHADOW.name(table);
                conn.execute(&format!("DELETE FROM {table}"), ())?;
                conn.execute(&format!("INSERT INTO {table} SELECT * FROM {shadow}"), ())?;
            }
            conn.execute(
                "DELETE FROM conveyor_projected WHERE projection = ?",
                [projection.name],
            )?;
            conn.execute(
                "UPDATE conveyor_projected SET projection = ? WHERE projection = ?",
                (projection.name, projection.key(Tables::SHADOW)),
            )?;
            Ok::<_, ProjectionError>(())
        })
        .await?;
        let tables = self.tables;
        db.change_schema(move |conn| {
            for table in tables {
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS {}",
                    Tables::SHADOW.name(table)
                ))?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }
}

/// The stream and version the event store wrote on a published event.
fn stream_version<E>(incoming: &Incoming<E>) -> Result<(String, u64), HandlerError> {
    let envelope = &incoming.envelope;
    match (
        envelope.header(header::STREAM),
        envelope
            .header(header::STREAM_VERSION)
            .and_then(|version| version.parse::<u64>().ok()),
    ) {
        (Some(stream), Some(version)) => Ok((stream.to_owned(), version)),
        _ => Err(HandlerError::permanent(format!(
            "{} carries no stream version: projections follow the event store's events",
            envelope.name
        ))),
    }
}

fn stored_error(error: EventStoreError) -> HandlerError {
    match error {
        EventStoreError::Store(error) => error.into(),
        other => HandlerError::permanent(other),
    }
}

enum Lock {
    /// Live handling: many at once.
    Shared,
    /// A swap: alone.
    Exclusive,
}

/// Takes the projection's lock for the rest of the transaction. SQLite has one writer at a
/// time already.
fn lock(conn: &Conn, name: &str, lock: Lock) -> Result<(), StoreError> {
    let mode = match (conn.backend(), lock) {
        (Backend::Sqlite, _) => return Ok(()),
        (Backend::Postgres, Lock::Shared) => "FOR SHARE",
        (Backend::Mysql, Lock::Shared) => "LOCK IN SHARE MODE",
        (_, Lock::Exclusive) => "FOR UPDATE",
    };
    conn.query_opt(
        &format!("SELECT name FROM conveyor_projections WHERE name = ? {mode}"),
        [name],
        |row| row.get::<String>(0),
    )?;
    Ok(())
}

/// The streams holding events of these names that the versions kept under `key` are behind.
fn behind(conn: &Conn, names: &[&str], key: &str) -> Result<Vec<String>, crate::sql::Error> {
    let placeholders = vec!["?"; names.len()].join(", ");
    let mut values: Vec<&dyn ToValue> = names.iter().map(|name| name as &dyn ToValue).collect();
    values.push(&key);
    conn.query_map(
        &format!(
            "SELECT e.stream_id FROM (SELECT stream_id, MAX(version) AS newest \
               FROM conveyor_events WHERE name IN ({placeholders}) GROUP BY stream_id) e \
             LEFT JOIN conveyor_projected p ON p.projection = ? AND p.stream_id = e.stream_id \
             WHERE COALESCE(p.version, 0) < e.newest"
        ),
        values.as_slice(),
        |row| row.get(0),
    )
}

/// Every stream holding events of these names, with its newest version.
fn streams(conn: &Conn, names: &[&str]) -> Result<Vec<(String, u64)>, crate::sql::Error> {
    let placeholders = vec!["?"; names.len()].join(", ");
    let values: Vec<&dyn ToValue> = names.iter().map(|name| name as &dyn ToValue).collect();
    conn.query_map(
        &format!(
            "SELECT stream_id, MAX(version) FROM conveyor_events \
             WHERE name IN ({placeholders}) GROUP BY stream_id ORDER BY stream_id"
        ),
        values.as_slice(),
        |row| {
            let version: i64 = row.get(1)?;
            Ok((row.get(0)?, u64::try_from(version).unwrap_or_default()))
        },
    )
}

fn projected_version(conn: &Conn, key: &str, stream: &str) -> Result<u64, StoreError> {
    let version: Option<i64> = conn.query_opt(
        "SELECT version FROM conveyor_projected WHERE projection = ? AND stream_id = ?",
        (key, stream),
        |row| row.get(0),
    )?;
    Ok(version.map_or(0, |version| u64::try_from(version).unwrap_or_default()))
}

fn set_projected_version(
    conn: &Conn,
    key: &str,
    stream: &str,
    version: u64,
) -> Result<(), HandlerError> {
    conn.execute(
        "INSERT INTO conveyor_projected (projection, stream_id, version) VALUES (?, ?, ?) \
         ON CONFLICT (projection, stream_id) DO UPDATE SET version = excluded.version",
        (key, stream, i64::try_from(version).unwrap_or(i64::MAX)),
    )?;
    Ok(())
}
