//! Dead letters: messages a consumer group gave up on, kept with the error for inspection,
//! replay or purge.

use crate::db::{Database, StoreError, UnitOfWork};
use crate::envelope::{now_millis, Envelope};
use crate::log::{envelope_from_row, ENVELOPE_COLUMNS};
use futures::FutureExt;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

/// Most dead letters `list` returns in one call.
pub const MAX_LIST: i64 = 1000;

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    pub envelope: Envelope,
    pub error: String,
    pub attempts: i64,
    /// Milliseconds since the Unix epoch.
    pub failed_at: i64,
}

pub(crate) async fn record(
    uow: &mut UnitOfWork,
    group: &str,
    envelope: &Envelope,
    error: &str,
    attempts: u32,
) -> Result<(), StoreError> {
    let headers = serde_json::to_string(&envelope.headers)
        .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query(
        "INSERT INTO conveyor_dead_letters \
         (group_name, message_id, kind, name, topic, key, payload, headers, occurred_at, error, attempts, failed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (group_name, message_id) DO NOTHING",
    )
    .bind(group)
    .bind(envelope.id.to_string())
    .bind(envelope.kind.as_str())
    .bind(&envelope.name)
    .bind(&envelope.topic)
    .bind(&envelope.key)
    .bind(&envelope.payload)
    .bind(headers)
    .bind(envelope.occurred_at)
    .bind(error)
    .bind(attempts)
    .bind(now_millis())
    .execute(uow.conn())
    .await?;
    Ok(())
}

fn from_row(row: &SqliteRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        group: row.try_get("group_name")?,
        envelope: envelope_from_row(row)?,
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        failed_at: row.try_get("failed_at")?,
    })
}

/// Dead letters, oldest first, of one group or of all; at most `limit` (capped at `MAX_LIST`).
pub async fn list(
    db: &Database,
    group: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT id, group_name, error, attempts, failed_at, {ENVELOPE_COLUMNS} \
         FROM conveyor_dead_letters WHERE (? IS NULL OR group_name = ?) ORDER BY id LIMIT ?"
    ))
    .bind(group)
    .bind(group)
    .bind(limit.clamp(0, MAX_LIST))
    .fetch_all(db.reader())
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

pub async fn get(db: &Database, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT id, group_name, error, attempts, failed_at, {ENVELOPE_COLUMNS} \
         FROM conveyor_dead_letters WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(db.reader())
    .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Delivers dead letter `id` again, to its group only, and removes it from the dead letters,
/// in one unit of work. Returns false when there is no such dead letter.
pub async fn replay(db: &Database, id: i64) -> Result<bool, StoreError> {
    db.write(move |uow| {
        async move {
            let row = sqlx::query(&format!(
                "DELETE FROM conveyor_dead_letters WHERE id = ? \
                 RETURNING id, group_name, error, attempts, failed_at, {ENVELOPE_COLUMNS}"
            ))
            .bind(id)
            .fetch_optional(uow.conn())
            .await?;
            let Some(row) = row else { return Ok(false) };
            let letter = from_row(&row)?;
            sqlx::query("DELETE FROM conveyor_inbox WHERE group_name = ? AND message_id = ?")
                .bind(&letter.group)
                .bind(letter.envelope.id.to_string())
                .execute(uow.conn())
                .await?;
            uow.republish(letter.envelope, letter.group);
            Ok(true)
        }
        .boxed()
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
        async move {
            let done = sqlx::query(
                "DELETE FROM conveyor_dead_letters \
                 WHERE (? IS NULL OR id = ?) AND (? IS NULL OR group_name = ?)",
            )
            .bind(id)
            .bind(id)
            .bind(group.as_deref())
            .bind(group.as_deref())
            .execute(uow.conn())
            .await?;
            Ok(done.rows_affected())
        }
        .boxed()
    })
    .await
}
