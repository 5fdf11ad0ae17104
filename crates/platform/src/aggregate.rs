//! Aggregates on the event store: a service's domain says how its state decides a command
//! and how an event changes it; loading (snapshot plus tail), appending with optimistic
//! concurrency and taking snapshots happen here, once for every service.
//!
//! An aggregate is pure: `decide` and `apply` do no IO and are not async, so a domain can be
//! tested, and replayed, without a database.

use crate::db::{StoreError, UnitOfWork};
use crate::envelope::{now_millis, Message};
use crate::event_store::{self, EventStoreError};
use crate::sql::Conn;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// The state of one stream, rebuilt from its events.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + 'static {
    /// What happened; stored in the stream and published on `Event::TOPIC`.
    type Event: Message;
    type Command;
    /// Why a command is refused.
    type Error;
    /// The version of the state's serialized form: bump it when that form changes, and
    /// snapshots taken before are ignored (the stream is replayed instead).
    const SHAPE: u32 = 1;

    /// The events `command` makes from this state, or why it is refused. Changes nothing.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// This state after `event`. Never refuses: the event already happened.
    fn apply(&mut self, event: &Self::Event);
}

/// How many times a command is decided, each on the stream as it is after the last lost
/// race, before it is a `Conflict`.
const APPEND_ATTEMPTS: u32 = 3;

/// How often a stream's state is saved, so that loading it replays only the events since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshots {
    every: Option<u32>,
}

impl Snapshots {
    /// Never: every load replays the whole stream.
    pub const OFF: Snapshots = Snapshots { every: None };

    /// After every `events` events of a stream; 0 means never.
    pub const fn every(events: u32) -> Snapshots {
        Snapshots {
            every: if events == 0 { None } else { Some(events) },
        }
    }

    /// Every how many events, if at all.
    pub fn interval(self) -> Option<u32> {
        self.every
    }

    /// Does moving a stream from version `before` to `after` pass a snapshot point?
    fn due(self, before: u64, after: u64) -> bool {
        self.every
            .is_some_and(|every| after / u64::from(every) > before / u64::from(every))
    }
}

/// An aggregate's state at a version of its stream (0: no events yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u64,
}

/// What a command did: the new state and version, and the events it appended.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    pub state: A,
    pub version: u64,
    pub events: Vec<A::Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E> {
    /// The aggregate refused the command.
    #[error("{0}")]
    Refused(E),
    /// The store failed, or (`EventStoreError::Conflict`) another command changed the
    /// stream between this one's load and its append.
    #[error(transparent)]
    Store(#[from] EventStoreError),
}

impl<E> From<StoreError> for ExecuteError<E> {
    fn from(error: StoreError) -> Self {
        ExecuteError::Store(error.into())
    }
}

/// The stream's state: from its newest snapshot (when one exists in today's shape) plus the
/// events after it.
pub fn load<A: Aggregate>(conn: &Conn, stream: &str) -> Result<Loaded<A>, EventStoreError> {
    let start = snapshot::<A>(conn, stream)?.unwrap_or_default();
    replay_onto(conn, stream, start)
}

/// The stream's state from its events alone, ignoring snapshots.
pub fn replay<A: Aggregate>(conn: &Conn, stream: &str) -> Result<Loaded<A>, EventStoreError> {
    replay_onto(conn, stream, Loaded::default())
}

fn replay_onto<A: Aggregate>(
    conn: &Conn,
    stream: &str,
    mut loaded: Loaded<A>,
) -> Result<Loaded<A>, EventStoreError> {
    for recorded in event_store::load::<A::Event>(conn, stream, loaded.version)? {
        loaded.state.apply(&recorded.event);
        loaded.version = recorded.version;
    }
    Ok(loaded)
}

/// Loads the stream, decides `command` on it and appends what it decided, in `uow`; takes
/// a snapshot when the stream passes a multiple of `snapshots`. If another command changed
/// the stream meanwhile (on a server database, whose writers run side by side), the command
/// is decided again on what that one left, in the same unit; a stream that keeps moving
/// fails with `EventStoreError::Conflict`, and the caller's unit must fail with it.
pub fn execute<A: Aggregate>(
    uow: &mut UnitOfWork,
    stream: &str,
    snapshots: Snapshots,
    command: &A::Command,
) -> Result<Executed<A>, ExecuteError<A::Error>> {
    execute_from(uow, stream, None, snapshots, command)
}

/// `execute`, starting from `known`, a state of the stream that was committed (from a
/// `Cache`), so that only the events after it are read.
pub fn execute_from<A: Aggregate>(
    uow: &mut UnitOfWork,
    stream: &str,
    known: Option<Loaded<A>>,
    snapshots: Snapshots,
    command: &A::Command,
) -> Result<Executed<A>, ExecuteError<A::Error>> {
    // From a committed state, the append itself says whether the stream moved on since
    // (then it writes nothing): read the events after it only then.
    let (mut loaded, mut read) = match known {
        Some(known) => (known, false),
        // With snapshots off there is none to read: replay, a round trip sooner.
        None if snapshots == Snapshots::OFF => (replay::<A>(uow.conn(), stream)?, true),
        None => (load::<A>(uow.conn(), stream)?, true),
    };
    let mut attempts = 0;
    let (events, new_version) = loop {
        attempts += 1;
        let events = loaded
            .state
            .decide(command)
            .map_err(ExecuteError::Refused)?;
        let appended = if events.is_empty() && !read {
            None
        } else {
            event_store::try_append(uow, stream, loaded.version, &events)?
        };
        match appended {
            Some(new_version) => break (events, new_version),
            // Another command got there first: decide again on what it left.
            None if attempts < APPEND_ATTEMPTS => {
                loaded = replay_onto(uow.conn(), stream, loaded)?;
                read = true;
            }
            None => {
                return Err(EventStoreError::Conflict {
                    stream: stream.to_owned(),
                    expected: loaded.version,
                    actual: event_store::version(uow.conn(), stream)?,
                }
                .into())
            }
        }
    };
    let Loaded { mut state, version } = loaded;
    for event in &events {
        state.apply(event);
    }
    if snapshots.due(version, new_version) {
        save_snapshot(uow.conn(), stream, new_version, &state)?;
    }
    Ok(Executed {
        state,
        version: new_version,
        events,
    })
}

/// Committed states of recently used streams, so that a command reads only the events
/// after the state it starts from. Only a state whose unit of work committed may be put
/// here: a version of a stream, once committed, is the same state forever, in every process,
/// so a cached state is never wrong, only possibly old (and then its tail is read).
pub struct Cache<A> {
    streams: Mutex<HashMap<String, Loaded<A>>>,
    capacity: usize,
}

impl<A: Aggregate + Clone> Cache<A> {
    pub fn new(capacity: usize) -> Cache<A> {
        Cache {
            streams: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn get(&self, stream: &str) -> Option<Loaded<A>> {
        self.lock().get(stream).cloned()
    }

    /// Keeps `loaded` unless a newer state of the stream is kept already.
    pub fn put(&self, stream: &str, loaded: Loaded<A>) {
        let mut streams = self.lock();
        if let Some(kept) = streams.get_mut(stream) {
            if kept.version < loaded.version {
                *kept = loaded;
            }
            return;
        }
        if streams.len() >= self.capacity {
            // Any stream will do: reading one back costs one snapshot and its tail.
            if let Some(evicted) = streams.keys().next().cloned() {
                streams.remove(&evicted);
            }
        }
        streams.insert(stream.to_owned(), loaded);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Loaded<A>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<A: Default> Default for Loaded<A> {
    fn default() -> Self {
        Loaded {
            state: A::default(),
            version: 0,
        }
    }
}

/// The stream's snapshot, if it has one that today's code can read.
fn snapshot<A: Aggregate>(conn: &Conn, stream: &str) -> Result<Option<Loaded<A>>, StoreError> {
    let row: Option<(i64, i64, Vec<u8>)> = conn.query_opt(
        "SELECT version, shape, state FROM conveyor_snapshots WHERE stream_id = ?",
        [stream],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    let Some((version, shape, state)) = row else {
        return Ok(None);
    };
    if shape != i64::from(A::SHAPE) {
        return Ok(None);
    }
    match serde_json::from_slice(&state) {
        Ok(state) => Ok(Some(Loaded {
            state,
            version: u64::try_from(version).unwrap_or_default(),
        })),
        Err(error) => {
            // The events are the truth; a snapshot is only a shortcut to them.
            tracing::warn!(stream, %error, "ignoring a snapshot that does not decode");
            Ok(None)
        }
    }
}

fn save_snapshot<A: Aggregate>(
    conn: &Conn,
    stream: &str,
    version: u64,
    state: &A,
) -> Result<(), StoreError> {
    let encoded = serde_json::to_vec(state).map_err(|source| StoreError::Encode {
        name: std::any::type_name::<A>(),
        source,
    })?;
    conn.execute(
        "INSERT INTO conveyor_snapshots (stream_id, version, shape, state, taken_at) \
         VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET \
         version = excluded.version, shape = excluded.shape, state = excluded.state, \
         taken_at = excluded.taken_at",
        (
            stream,
            i64::try_from(version).unwrap_or(i64::MAX),
            i64::from(A::SHAPE),
            encoded,
            now_millis(),
        ),
    )?;
    Ok(())
}
