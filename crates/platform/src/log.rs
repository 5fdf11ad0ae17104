//! The sql-log: the outbox table is the message log.
//!
//! A unit of work appends its messages to `conveyor_log` in its own transaction, so a state
//! change and the messages it emits commit together, and "published" means "committed".
//! Positions come from a single writer (see `db`), so they commit in order and never repeat.

use crate::db::Outgoing;
use crate::envelope::{key_hash, Envelope, Kind};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::Row;
use std::collections::BTreeMap;

/// The platform's own tables. Idempotent; run on every open.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS conveyor_migrations (
    service    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    PRIMARY KEY (service, version)
);
CREATE TABLE IF NOT EXISTS conveyor_log (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    key         TEXT NOT NULL,
    key_hash    INTEGER NOT NULL,
    payload     BLOB NOT NULL,
    headers     TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    only_group  TEXT
);
CREATE INDEX IF NOT EXISTS conveyor_log_topic ON conveyor_log (topic, position);
CREATE TABLE IF NOT EXISTS conveyor_partitions (
    group_name  TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    position    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, partition)
);
CREATE TABLE IF NOT EXISTS conveyor_members (
    group_name TEXT NOT NULL,
    member     TEXT NOT NULL,
    seen_until INTEGER NOT NULL,
    PRIMARY KEY (group_name, member)
);
CREATE TABLE IF NOT EXISTS conveyor_inbox (
    group_name TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conveyor_dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    group_name  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    key         TEXT NOT NULL,
    payload     BLOB NOT NULL,
    headers     TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    error       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   INTEGER NOT NULL
);
-- A crash between dead-lettering and acknowledging redelivers the message; it must not
-- become a second dead letter.
CREATE UNIQUE INDEX IF NOT EXISTS conveyor_dead_letters_message
    ON conveyor_dead_letters (group_name, message_id);
"#;

/// The columns an envelope is stored in, in the order `envelope_from_row` reads them.
pub(crate) const ENVELOPE_COLUMNS: &str =
    "message_id, kind, name, topic, key, payload, headers, occurred_at";

/// Rows per INSERT: 10 parameters each stays far below SQLite's limit on bound parameters.
const ROWS_PER_INSERT: usize = 500;

/// Appends `messages` (a statement per 500 of them), then runs `then`, statements without
/// parameters, in the same round trip as the last insert. Returns the position of the last
/// message, if any.
pub(crate) async fn append_then(
    conn: &mut SqliteConnection,
    messages: &[Outgoing],
    then: &str,
) -> Result<Option<i64>, sqlx::Error> {
    if messages.is_empty() {
        sqlx::Executor::execute(&mut *conn, then).await?;
        return Ok(None);
    }
    let chunks = messages.chunks(ROWS_PER_INSERT).count();
    let mut last = None;
    for (index, chunk) in messages.chunks(ROWS_PER_INSERT).enumerate() {
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let trailer = if index + 1 == chunks {
            format!("; {then}")
        } else {
            String::new()
        };
        let sql = format!(
            "INSERT INTO conveyor_log \
             (message_id, kind, name, topic, key, key_hash, payload, headers, occurred_at, only_group) \
             VALUES {rows}{trailer}"
        );
        let mut query = sqlx::query(&sql);
        for Outgoing {
            envelope,
            only_group,
        } in chunk
        {
            let headers = serde_json::to_string(&envelope.headers)
                .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
            query = query
                .bind(envelope.id.to_string())
                .bind(envelope.kind.as_str())
                .bind(envelope.name.clone())
                .bind(envelope.topic.clone())
                .bind(envelope.key.clone())
                .bind(key_hash(&envelope.key))
                .bind(envelope.payload.clone())
                .bind(headers)
                .bind(envelope.occurred_at)
                .bind(only_group.clone());
        }
        // The trailing statements insert nothing, so the last insert id is the log's.
        last = Some(query.execute(&mut *conn).await?.last_insert_rowid());
    }
    Ok(last)
}

/// The newest position, 0 for an empty log.
pub(crate) async fn head(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM conveyor_log")
        .fetch_one(conn)
        .await
}

/// Where a consumer group's partition reads from.
pub(crate) struct Cursor<'a> {
    pub group: &'a str,
    pub topics: &'a [String],
    pub partitions: i64,
    pub partition: i64,
    pub after: i64,
}

/// Up to `limit` messages of the cursor's partition after its position, oldest first.
pub(crate) async fn read(
    pool: &SqlitePool,
    cursor: &Cursor<'_>,
    limit: i64,
) -> Result<Vec<(i64, Envelope)>, sqlx::Error> {
    let topic_params = vec!["?"; cursor.topics.len()].join(", ");
    let sql = format!(
        "SELECT position, {ENVELOPE_COLUMNS} FROM conveyor_log \
         WHERE position > ? AND topic IN ({topic_params}) AND key_hash % ? = ? \
           AND (only_group IS NULL OR only_group = ?) \
         ORDER BY position LIMIT ?"
    );
    let mut query = sqlx::query(&sql).bind(cursor.after);
    for topic in cursor.topics {
        query = query.bind(topic);
    }
    let rows = query
        .bind(cursor.partitions)
        .bind(cursor.partition)
        .bind(cursor.group)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("position")?, envelope_from_row(row)?)))
        .collect()
}

pub(crate) fn envelope_from_row(row: &SqliteRow) -> Result<Envelope, sqlx::Error> {
    let decode = |column: &str, error: String| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: error.into(),
    };
    let id: String = row.try_get("message_id")?;
    let kind: String = row.try_get("kind")?;
    let headers: String = row.try_get("headers")?;
    Ok(Envelope {
        id: id
            .parse()
            .map_err(|e| decode("message_id", format!("{e}")))?,
        kind: Kind::parse(&kind).ok_or_else(|| decode("kind", kind.clone()))?,
        name: row.try_get("name")?,
        topic: row.try_get("topic")?,
        key: row.try_get("key")?,
        payload: row.try_get("payload")?,
        headers: serde_json::from_str::<BTreeMap<String, String>>(&headers)
            .map_err(|e| decode("headers", e.to_string()))?,
        occurred_at: row.try_get("occurred_at")?,
    })
}
