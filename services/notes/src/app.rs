//! The notes use cases: queue a note, list and get the written ones, and the workers'
//! batch handler.

use crate::api::{NotesWritten, SaveNote};
use crate::domain::{Invalid, Note, NoteId, Page};
use crate::store;
use cache::Cache;
use platform::envelope::now_millis;
use platform::{
    Bus, ConsumerOptions, Database, HandlerError, Incoming, Message, SqlLog, StoreError,
    Subscription, UnitOfWork,
};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The consumer group of the workers.
pub const WORKERS: &str = "notes.workers";
/// How old the queue's depth may be when a save is checked against the limit.
const DEPTH_FRESHNESS: Duration = Duration::from_millis(100);

pub mod metric {
    /// Notes queued and not yet written, at most (gauge; sampled as saves arrive).
    pub const QUEUE_DEPTH: &str = "notes_queue_depth";
    /// Saves refused because the queue was full.
    pub const REFUSED: &str = "notes_saves_refused_total";
}

#[derive(Debug, thiserror::Error)]
pub enum NotesError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{depth} notes wait to be written, more than the queue's limit of {limit}; try again shortly")]
    QueueFull { depth: i64, limit: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Notes {
    db: Database,
    cache: Cache,
    queue: Arc<QueueDepth>,
}

impl Notes {
    /// The use cases over `db`, with `cache` (scoped here) invalidated after every batch the
    /// workers commit, in any process. Refuses saves past `queue_limit` notes waiting on
    /// `bus` for the workers.
    pub fn new(db: Database, bus: Arc<dyn Bus>, cache: &Cache, queue_limit: u64) -> Notes {
        let cache = cache.scoped("notes");
        invalidate_on_writes(&db, cache.clone());
        Notes {
            queue: Arc::new(QueueDepth::new(bus, queue_limit)),
            db,
            cache,
        }
    }

    /// Queues the note for the workers; it is durable once this returns its id.
    pub async fn save(&self, content: String) -> Result<NoteId, NotesError> {
        self.queue.admit()?;
        let id = NoteId::new();
        let command = SaveNote {
            id: id.to_string(),
            content,
            created_at: now_millis(),
        };
        self.db.write(move |uow| uow.emit(&command)).await?;
        Ok(id)
    }

    pub async fn list(&self, page: Page) -> Result<Vec<Note>, StoreError> {
        self.db.read(move |conn| Ok(store::list(conn, page)?)).await
    }

    pub async fn get(&self, id: NoteId) -> Result<Option<Note>, StoreError> {
        self.db.read(move |conn| Ok(store::get(conn, id)?)).await
    }

    /// The cache of rendered lists, which the workers' batches invalidate.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }
}

/// The workers: `SaveNote` commands written in batches of up to `batch`, waiting up to
/// `wait` for a batch to fill.
pub fn subscriptions(batch: u16, wait: Duration) -> Vec<Subscription> {
    let options = ConsumerOptions {
        batch,
        linger: wait,
        ..ConsumerOptions::default()
    };
    // A note is inserted only if its id is new: handling a command twice changes nothing,
    // and the note's row is its own dedupe mark (see `Subscription::idempotent`).
    vec![Subscription::new(WORKERS)
        .on_batch(write_notes)
        .idempotent()
        .with_options(options)]
}

/// Writes a batch of queued notes in the unit of work that marks them handled, and tells
/// every process (through the log) that the list changed.
fn write_notes(batch: Vec<Incoming<SaveNote>>, uow: &mut UnitOfWork) -> Result<(), HandlerError> {
    let notes = batch
        .into_iter()
        .map(|incoming| {
            let SaveNote {
                id,
                content,
                created_at,
            } = incoming.message;
            let id = NoteId::parse(&id)
                .ok_or_else(|| HandlerError::permanent(format!("{id:?} is not a note id")))?;
            Ok(Note {
                id,
                content,
                created_at,
            })
        })
        .collect::<Result<Vec<_>, HandlerError>>()?;
    store::insert_all(uow.conn(), &notes)?;
    if let Some(newest) = notes.iter().map(|note| note.id).max() {
        uow.emit(&NotesWritten {
            count: notes.len(),
            newest: newest.to_string(),
        })?;
    }
    Ok(())
}

/// Clears `cache` each time a `NotesWritten` commits, in this process or another. The API
/// and the workers share the notes database whatever the bus, so its log is where every
/// process sees a batch commit.
fn invalidate_on_writes(db: &Database, cache: Cache) {
    let mut written = SqlLog::new(db.clone()).watch(NotesWritten::TOPIC);
    tokio::spawn(async move {
        while written.changed().await.is_ok() {
            cache.invalidate().await;
        }
    });
}

/// The queue's depth as last sampled; saves refresh it when it is older than
/// `DEPTH_FRESHNESS`, off the request's path.
struct QueueDepth {
    bus: Arc<dyn Bus>,
    limit: u64,
    depth: AtomicI64,
    sampled: Mutex<Option<Instant>>,
    sampling: AtomicBool,
}

impl QueueDepth {
    fn new(bus: Arc<dyn Bus>, limit: u64) -> QueueDepth {
        QueueDepth {
            bus,
            limit,
            depth: AtomicI64::new(0),
            sampled: Mutex::new(None),
            sampling: AtomicBool::new(false),
        }
    }

    /// Refuses a save while the queue holds more than the limit.
    fn admit(self: &Arc<Self>) -> Result<(), NotesError> {
        self.sample_if_stale();
        let depth = self.depth.load(Ordering::Relaxed);
        if u64::try_from(depth).unwrap_or_default() > self.limit {
            metrics::counter!(metric::REFUSED).increment(1);
            return Err(NotesError::QueueFull {
                depth,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn sample_if_stale(self: &Arc<Self>) {
        let stale = self
            .sampled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= DEPTH_FRESHNESS);
        if !stale || self.sampling.swap(true, Ordering::AcqRel) {
            return;
        }
        let queue = self.clone();
        tokio::spawn(async move {
            match queue.bus.backlog(WORKERS, SaveNote::TOPIC).await {
                Ok(depth) => {
                    queue.depth.store(depth, Ordering::Relaxed);
                    metrics::gauge!(metric::QUEUE_DEPTH).set(depth as f64);
                }
                Err(error) => tracing::warn!(%error, "cannot measure the notes queue"),
            }
            *queue.sampled.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            queue.sampling.store(false, Ordering::Release);
        });
    }
}
