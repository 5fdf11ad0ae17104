//! Dead letters: messages a consumer group gave up on, kept with the error for inspection,
//! replay or purge.

use crate::db::{Database, StoreError, UnitOfWork};
use crate::envelope::{now_millis, Envelope, Message};
use crate::log::{envelope_from_row, ENVELOPE_COLUMNS};
use crate::sql::{self, Row, ToValue};
use serde::{Deserialize, Serialize};

/// Most dead letters `list` returns in one call.
pub const MAX_LIST: i64 = 1000;

/// What a group gave up on, published when it reads a broker, so that the broker's own tools
/// show it: on RabbitMQ its topic's exchange is the dead-letter exchange, with a queue that
/// keeps what reaches it. The dead letter itself stays in the group's database, where
/// `conveyor dlq` shows, replays and purges it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLettered {
    pub group: String,
    /// The message's envelope id; for one that did not decode, the dead letter's own.
    pub message_id: String,
    /// Empty for a message that did not decode, as its topic and key.
    pub name: String,
    pub topic: String,
    pub key: String,
    pub error: String,
    pub attempts: u32,
    /// The payload as text (replacement characters where it was not UTF-8).
    pub payload: String,
}

impl Message for DeadLettered {
    const NAME: &'static str = "conveyor.DeadLettered";
    const TOPIC: &'static str = "conveyor.dead-letters";

    fn key(&self) -> String {
        self.group.clone()
    }
}

impl DeadLettered {
    fn of(group: &str, envelope: &Envelope, error: &str, attempts: u32) -> DeadLettered {
        DeadLettered {
            group: group.to_owned(),
            message_id: envelope.id.to_string(),
            name: envelope.name.clone(),
            topic: envelope.topic.clone(),
            key: envelope.key.clone(),
            error: error.to_owned(),
            attempts,
            payload: String::from_utf8_lossy(&envelope.payload).into_owned(),
        }
    }
}

/// Whether a dead letter is also published (`DeadLettered`): by groups that read a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Announce {
    No,
    Publish,
}

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
    uow: &mut UnitOfWork,
    group: &str,
    envelope: &Envelope,
    error: &str,
    attempts: u32,
    announce: Announce,
) -> Result<(), StoreError> {
    if announce == Announce::Publish {
        uow.emit(&DeadLettered::of(group, envelope, error, attempts))?;
    }
    let headers = envelope
        .headers
        .to_json()
        .map_err(|error| sql::Error::Encode {
            what: "message headers",
            message: error.to_string(),
        })?;
    uow.conn().execute(
        "INSERT INTO conveyor_dead_letters \
         (group_name, message_id, kind, name, topic, \"key\", payload, headers, occurred_at, error, attempts, failed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (group_name, message_id) DO NOTHING",
        (
            group,
            envelope.id.to_string(),
            envelope.kind.as_str(),
            &envelope.name,
            &envelope.topic,
            &envelope.key,
            &envelope.payload,
            &*headers,
            envelope.occurred_at,
            error,
            attempts,
            now_millis(),
        ),
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
         (group_name, message_id, kind, name, topic, \"key\", payload, headers, occurred_at, error, attempts, failed_at) \
         SELECT ?, message_id, kind, name, topic, \"key\", payload, headers, occurred_at, ?, 1, ? \
         FROM conveyor_log WHERE position = ? \
         ON CONFLICT (group_name, message_id) DO NOTHING",
        (
            group,
            format!("the stored message does not decode: {error}"),
            now_millis(),
            position,
        ),
    )?;
    Ok(())
}

/// Dead-letters a message that arrived from a broker and does not decode, with its bytes as
/// the payload. It gets an id of its own and the kind `undecodable`, so it shows and purges
/// but cannot be replayed (its envelope does not decode either).
pub(crate) fn record_undecodable(
    uow: &mut UnitOfWork,
    group: &str,
    body: &[u8],
    error: &str,
) -> Result<(), StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let error = format!("the message does not decode: {error}");
    uow.conn().execute(
        "INSERT INTO conveyor_dead_letters \
         (group_name, message_id, kind, name, topic, \"key\", payload, headers, occurred_at, error, attempts, failed_at) \
         VALUES (?, ?, 'undecodable', '', '', '', ?, '{}', ?, ?, 1, ?)",
        (group, &id, body, now_millis(), &error, now_millis()),
    )?;
    // Only a broker delivers what does not decode: always announced.
    uow.emit(&DeadLettered {
        group: group.to_owned(),
        message_id: id,
        name: String::new(),
        topic: String::new(),
        key: String::new(),
        error,
        attempts: 1,
        payload: String::from_utf8_lossy(body).into_owned(),
    })
}

fn from_row(row: &Row<'_>) -> Result<DeadLetter, sql::Error> {
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
        let letters = match &group {
            Some(group) => conn.query_map(
                &format!(
                    "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters \
                     WHERE group_name = ? ORDER BY id LIMIT ?"
                ),
                (group, limit.clamp(0, MAX_LIST)),
                from_row,
            )?,
            None => conn.query_map(
                &format!(
                    "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters \
                     ORDER BY id LIMIT ?"
                ),
                (limit.clamp(0, MAX_LIST),),
                from_row,
            )?,
        };
        Ok(letters)
    })
    .await
}

pub async fn get(db: &Database, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    db.read(move |conn| {
        Ok(conn.query_opt(
            &format!(
                "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters WHERE id = ?"
            ),
            [id],
            from_row,
        )?)
    })
    .await
}

/// Delivers dead letter `id` again, to its group only, and removes it from the dead letters,
/// in one unit of work. Returns false when there is no such dead letter; one whose message
/// does not decode cannot be replayed (`StoreError::Undecodable`), only purged.
pub async fn replay(db: &Database, id: i64) -> Result<bool, StoreError> {
    db.write(move |uow| {
        let conn = uow.conn();
        let letter = conn.query_opt(
            &format!(
                "SELECT {COLUMNS}, {ENVELOPE_COLUMNS} FROM conveyor_dead_letters WHERE id = ?"
            ),
            [id],
            from_row,
        )?;
        // The delete decides: of two replays at once, only one removes the letter.
        let Some(letter) = letter else {
            return Ok(false);
        };
        if conn.execute("DELETE FROM conveyor_dead_letters WHERE id = ?", [id])? == 0 {
            return Ok(false);
        }
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
        let mut filters: Vec<&str> = Vec::new();
        let mut values: Vec<&dyn ToValue> = Vec::new();
        if let Some(id) = &id {
            filters.push("id = ?");
            values.push(id);
        }
        if let Some(group) = &group {
            filters.push("group_name = ?");
            values.push(group);
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filters.join(" AND "))
        };
        let deleted = uow.conn().execute(
            &format!("DELETE FROM conveyor_dead_letters{filter}"),
            values.as_slice(),
        )?;
        Ok(deleted)
    })
    .await
}
