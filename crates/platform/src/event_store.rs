//! The event store: streams of events by version, with optimistic concurrency, on every
//! backend through the unit of work.
//!
//! `append` writes a command's events to their stream in the caller's unit of work and
//! emits each of them too, so the state change and its publication commit together (the
//! outbox), and the events' global order is their position in the log: gap-free and in
//! commit order on every backend, which is what projections read. An append names the
//! version it decided on; if the stream moved since, nothing is written and the caller
//! hears `Conflict`. Each published event names its stream and version in its headers
//! (`stream`, `stream-version`), which is how a projection knows what it has seen.

use crate::db::{StoreError, UnitOfWork};
use crate::envelope::{self, header, now_millis, Message};
use crate::sql::{Conn, ToValue};

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error(
        "stream {stream} is at version {actual}, not {expected}: another command changed it first"
    )]
    Conflict {
        stream: String,
        expected: u64,
        actual: u64,
    },
    #[error("event {version} of stream {stream} does not decode: {message}")]
    Corrupt {
        stream: String,
        version: u64,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::sql::Error> for EventStoreError {
    fn from(error: crate::sql::Error) -> Self {
        EventStoreError::Store(error.into())
    }
}

/// An event as stored, with its version in its stream (from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<E> {
    pub version: u64,
    pub event: E,
}

/// Appends `events` to `stream`, which must be at version `expected` (0: a new stream),
/// and emits each; returns the stream's new version. All or nothing: on `Conflict` the
/// caller's unit must fail (return the error) so that nothing of it commits.
pub fn append<E: Message>(
    uow: &mut UnitOfWork,
    stream: &str,
    expected: u64,
    events: &[E],
) -> Result<u64, EventStoreError> {
    let conflict = |actual| EventStoreError::Conflict {
        stream: stream.to_owned(),
        expected,
        actual,
    };
    let actual = version(uow.conn(), stream)?;
    if actual != expected {
        return Err(conflict(actual));
    }
    match try_append(uow, stream, expected, events)? {
        Some(version) => Ok(version),
        None => Err(conflict(version(uow.conn(), stream)?)),
    }
}

/// Appends `events` at `expected` unless the stream has moved past it, and then writes
/// nothing: `Ok(None)`. For a caller that read the stream to `expected` in this unit of work,
/// or holds a state of it that was committed at `expected` (so the stream is at `expected`
/// or beyond, never behind, and whether it moved on is the insert's to say: version
/// `expected + 1` exists then). A stream that moved on by fewer events than are appended
/// takes some of them: that is a `Conflict`, and the caller's unit must fail.
pub(crate) fn try_append<E: Message>(
    uow: &mut UnitOfWork,
    stream: &str,
    expected: u64,
    events: &[E],
) -> Result<Option<u64>, EventStoreError> {
    if events.is_empty() {
        return Ok(Some(expected));
    }
    let payloads = events
        .iter()
        .map(|event| {
            serde_json::to_vec(event).map_err(|source| StoreError::Encode {
                name: E::NAME,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let versions: Vec<i64> = (1..=events.len() as u64)
        .map(|n| i64::try_from(expected + n).unwrap_or(i64::MAX))
        .collect();
    let names: Vec<&str> = events.iter().map(Message::name).collect();
    let revisions: Vec<i64> = names
        .iter()
        .map(|name| i64::from(envelope::revision::<E>(name)))
        .collect();
    let recorded_at = now_millis();
    let mut values: Vec<&dyn ToValue> = Vec::with_capacity(events.len() * 6);
    for (((version, name), revision), payload) in
        versions.iter().zip(&names).zip(&revisions).zip(&payloads)
    {
        values.extend([
            &stream as &dyn ToValue,
            version,
            name,
            revision,
            payload,
            &recorded_at,
        ]);
    }
    let rows = vec!["(?, ?, ?, ?, ?, ?)"; events.len()].join(", ");
    // A concurrent append of the same versions waits for this one's key locks, then
    // inserts nothing: it lost the race, and the count says so.
    let inserted = uow.conn().execute(
        &format!(
            "INSERT INTO conveyor_events (stream_id, version, name, revision, payload, recorded_at) \
             VALUES {rows} ON CONFLICT (stream_id, version) DO NOTHING"
        ),
        values.as_slice(),
    )?;
    if inserted == 0 {
        return Ok(None);
    }
    if inserted != events.len() as u64 {
        return Err(EventStoreError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: version(uow.conn(), stream)?,
        });
    }
    for (event, version) in events.iter().zip(&versions) {
        uow.emit_with(
            event,
            [
                (header::STREAM, stream.to_owned()),
                (header::STREAM_VERSION, version.to_string()),
            ],
        )?;
    }
    Ok(Some(expected + events.len() as u64))
}

/// The events of `stream` after version `after` (0: all of them), in order, each upcast
/// to its newest revision.
pub fn load<E: Message>(
    conn: &Conn,
    stream: &str,
    after: u64,
) -> Result<Vec<Recorded<E>>, EventStoreError> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows: Vec<(i64, String, i64, Vec<u8>)> = conn.query_map(
        "SELECT version, name, revision, payload FROM conveyor_events \
         WHERE stream_id = ? AND version > ? ORDER BY version",
        (stream, after),
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
    )?;
    rows.into_iter()
        .map(|(version, name, revision, payload)| {
            let version = u64::try_from(version).unwrap_or_default();
            let revision = u32::try_from(revision).unwrap_or_default();
            let event = envelope::decode(&name, revision, &payload).map_err(|message| {
                EventStoreError::Corrupt {
                    stream: stream.to_owned(),
                    version,
                    message,
                }
            })?;
            Ok(Recorded { version, event })
        })
        .collect()
}

/// The stream's version: its newest event's, 0 for a stream with none.
pub fn version(conn: &Conn, stream: &str) -> Result<u64, EventStoreError> {
    let version: Option<i64> = conn.scalar(
        "SELECT MAX(version) FROM conveyor_events WHERE stream_id = ?",
        [stream],
    )?;
    Ok(version.map_or(0, |version| u64::try_from(version).unwrap_or_default()))
}
