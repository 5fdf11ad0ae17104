//! Dead letters: messages a consumer group gave up on, kept with the error for inspection,
//! replay or purge.

use crate::db::{Database, StoreError, UnitOfWork};
use crate::envelope::{now_millis, Envelope};
use crate::log::{envelope_from_row, ENVELOPE_COLUMNS};
use rusqlite::{params, OptionalExtension, Row};

/// Most dead letters `list` returns in one call.
pub const MAX_LIST: i64 = 1000;

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    /// The message given up on, or why its stored form does not decode (a row of the log
    /// that was corrupt, or written by a newer version, is dead-lettered as it was).
    pub envelope: Result<Envelope, String>,
    pub error: String,
    pub attempts: i64,
    /// Milliseconds since the Unix epoch.
    pub failed_at: i64,
}

pub(crate) fn record(
    uow: &UnitOfWork,
    group: &str,
    envelope: &Envelope,
    error: &str,
    attempts: u32,
) -> Result<(), StoreError> {
    let headers = serde_json::to_string(&envelope.headers)
        .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
    uow.conn().execute(
        "INSERT INTO conveyor_dead_letters \
         (group_name, message_id, kind, name, topic, key, payload, headers, occurred_at, error, attempts, failed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (group_name, message_id) DO NOTHING",
        params![
            group,
            envelope.id.to_string(),
            envelope.kind.as_str(),
            envelope.name,
            envelope.topic,
            envelope.key,
            envelope.payload,
            headers,
            envelope.occurred_at,
            error,
            attempts,
            now_millis(),
        ],
    )?;
    Ok(())
}

/// Dead-letters the log row at `position` as it is stored, for a row that does not decode.
pub(crate) fn record_corrupt(
    uow: &UnitOfWork,
    group: &str,
    position: i64,
    error: &str,
) -> Result<(), StoreError> {
    uow.conn().execute(
        "INSERT INTO conveyor_dead_letters \
         (group_name, message_id, kind, name, topic, key, payload, headers, occurred_at, error, attempts, failed_at) \
         SELECT ?, message_id, kind, name, topic, key, payload, headers, occurred_at, ?, 1, ? \
         FROM conveyor_log WHERE position = ? \
         ON CONFLICT (group_name, message_id) DO NOTHING",
        params![
            group,
            format!("the stored message does not decode: {error}"),
            now_millis(),
            position
        ],
    )?;
    Ok(())
}

fn from_row(row: &Row<'_>) -> Result<DeadLetter, rusqlite::Error> {
    Ok(DeadLetter {
        id: row.get("id")?,
        group: row.get("group_name")?,
        envelope: envelope_from_row(row, ENVELOPE_FIRST).map_err(|error| error.to_string()),
        error: row.get("error")?,
        attempts: row.get("attempts")?,
        failed_at: row.get("failed_at")?,
    })
}

const COLUMNS: &str = "id, group_name, error, attempts, failed_at";
/// Where `ENVELOPE_COLUMNS` start, after `COLUMNS`.
const ENVELOPE_FIRST: usize = 5;

/// Dead letters, oldest first, of one group or of all; at most `limit` (capped at `MAX_LIST`).
pub async fn list(
    db: &Database,
    group: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    let group = group.map(str::to_owned);
    db.read(move |conn| {
        let mut select = conn.prepare(&format!(
            "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters \
             WHERE (?1 IS NULL OR group_name = ?1) ORDER BY id LIMIT ?2"
        ))?;
        let letters = select
            .query_map((group, limit.clamp(0, MAX_LIST)), from_row)?
            .collect::<Result<_, _>>()?;
        Ok(letters)
    })
    .await
}

pub async fn get(db: &Database, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    db.read(move |conn| {
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters WHERE id = ?"
                ),
                [id],
                from_row,
            )
            .optional()?)
    })
    .await
}

/// Delivers dead letter `id` again, to its group only, and removes it from the dead letters,
/// in one unit of work. Returns false when there is no such dead letter; one whose message
/// does not decode cannot be replayed (`StoreError::Undecodable`), only purged.
pub async fn replay(db: &Database, id: i64) -> Result<bool, StoreError> {
    db.write(move |uow| {
        let letter = uow
            .conn()
            .query_row(
                &format!(
                    "DELETE FROM conveyor_dead_letters WHERE id = ? \
                     RETURNING {COLUMNS}, {ENVELOPE_COLUMNS}"
                ),
                [id],
                from_row,
            )
            .optional()?;
        let Some(letter) = letter else {
            return Ok(false);
        };
        let envelope = letter
            .envelope
            .map_err(|error| StoreError::Undecodable(format!("dead letter {id}: {error}")))?;
        uow.conn().execute(
            "DELETE FROM conveyor_inbox WHERE group_name = ? AND message_id = ?",
            (&letter.group, envelope.id.to_string()),
        )?;
        uow.republish(envelope, letter.group);
        Ok(true)
    })
    .await
}

/// Deletes dead letter `id`, or all of `group`'s, or all; returns how many went.
pub async fn purge(
    db: &Database,
    id: Option<i64>,
    group: Option<String>,
) -> Result<u64, StoreError> {
    db.write(move |uow| {
        let deleted = uow.conn().execute(
            "DELETE FROM conveyor_dead_letters \
             WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR group_name = ?2)",
            (id, group),
        )?;
        Ok(deleted as u64)
    })
    .await
}
