//! The sql-log: the outbox table is the message log.
//!
//! A unit of work appends its messages to `conveyor_log` in its own transaction, so a state
//! change and the messages it emits commit together, and "published" means "committed".
//! Positions come from a single writer (see `db`), so they commit in order and never repeat.

use crate::db::{corrupt, Outgoing};
use crate::envelope::{key_hash, Envelope, Kind};
use rusqlite::{params, Connection, Row, ToSql};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The platform's own tables. Idempotent; run on every open.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS conveyor_migrations (
    service    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    PRIMARY KEY (service, version)
);
-- One row the readiness probe writes, so that it proves a commit reaches the file.
CREATE TABLE IF NOT EXISTS conveyor_health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL,
    padding    BLOB
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
-- What each consumer group handles (JSON: topics and names) and its partition count, which
-- every member must agree on.
CREATE TABLE IF NOT EXISTS conveyor_groups (
    group_name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL,
    agreement  TEXT NOT NULL
);
-- The topics of each group, for retention to find what every reader has acknowledged.
CREATE TABLE IF NOT EXISTS conveyor_group_topics (
    group_name TEXT NOT NULL,
    topic      TEXT NOT NULL,
    PRIMARY KEY (topic, group_name)
) WITHOUT ROWID;
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

/// Appends `messages` to the log; returns the position of the last one, if any.
pub(crate) fn append(
    conn: &Connection,
    messages: &[Outgoing],
) -> Result<Option<i64>, rusqlite::Error> {
    if messages.is_empty() {
        return Ok(None);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO conveyor_log \
         (message_id, kind, name, topic, key, key_hash, payload, headers, occurred_at, only_group) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for Outgoing {
        envelope,
        only_group,
    } in messages
    {
        let headers = serde_json::to_string(&envelope.headers)
            .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
        insert.execute(params![
            envelope.id.to_string(),
            envelope.kind.as_str(),
            envelope.name,
            envelope.topic,
            envelope.key,
            key_hash(&envelope.key),
            envelope.payload,
            headers,
            envelope.occurred_at,
            only_group,
        ])?;
    }
    Ok(Some(conn.last_insert_rowid()))
}

/// The newest position ever handed out, 0 for a log never written: retention may have
/// deleted the rows, but AUTOINCREMENT remembers.
pub(crate) fn head(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'conveyor_log'), 0)",
    )?
    .query_row([], |row| row.get(0))
}

/// Where a consumer group's partition reads from, and which messages it wants.
pub(crate) struct Cursor {
    pub group: Arc<str>,
    pub topics: Arc<[String]>,
    /// The names the group handles. Others are read (the group's offset moves past them)
    /// but never decoded.
    pub names: Arc<[&'static str]>,
    pub partitions: i64,
    pub partition: i64,
    pub after: i64,
}

/// A row of the log, as one consumer group sees it.
pub(crate) enum Entry {
    /// A message of a name the group does not handle: only its position matters.
    Skipped,
    Message(Envelope),
    /// A row that does not decode (corrupt, or written by a newer version): why not.
    Corrupt(String),
}

impl Entry {
    fn from_row(row: &Row<'_>, names: &[&str]) -> Entry {
        let name = match row.get_ref(3).map(|name| name.as_str()) {
            Ok(Ok(name)) => name,
            Ok(Err(error)) => return Entry::Corrupt(format!("column name: {error}")),
            Err(error) => return Entry::Corrupt(error.to_string()),
        };
        if !names.contains(&name) {
            return Entry::Skipped;
        }
        match envelope_from_row(row, 1) {
            Ok(envelope) => Entry::Message(envelope),
            Err(error) => Entry::Corrupt(error.to_string()),
        }
    }
}

/// Up to `limit` rows of the cursor's partition after its position, oldest first, by
/// position. Only the rows whose names the cursor wants are decoded.
pub(crate) fn read(
    conn: &Connection,
    cursor: &Cursor,
    limit: i64,
) -> Result<Vec<(i64, Entry)>, rusqlite::Error> {
    let topic_params = vec!["?"; cursor.topics.len()].join(", ");
    let sql = format!(
        "SELECT position, {ENVELOPE_COLUMNS} FROM conveyor_log \
         WHERE position > ? AND topic IN ({topic_params}) AND key_hash % ? = ? \
           AND (only_group IS NULL OR only_group = ?) \
         ORDER BY position LIMIT ?"
    );
    let mut params: Vec<&dyn ToSql> = vec![&cursor.after];
    params.extend(cursor.topics.iter().map(|topic| topic as &dyn ToSql));
    params.extend([
        &cursor.partitions as &dyn ToSql,
        &cursor.partition,
        &cursor.group,
        &limit,
    ]);
    let mut select = conn.prepare_cached(&sql)?;
    let rows = select.query_map(params.as_slice(), |row| {
        Ok((row.get(0)?, Entry::from_row(row, &cursor.names)))
    })?;
    rows.collect()
}

/// The envelope in `ENVELOPE_COLUMNS`, the first of them at column `first`.
pub(crate) fn envelope_from_row(row: &Row<'_>, first: usize) -> Result<Envelope, rusqlite::Error> {
    let id: String = row.get(first)?;
    let kind: String = row.get(first + 1)?;
    let headers: String = row.get(first + 6)?;
    Ok(Envelope {
        id: id.parse().map_err(|e| corrupt("message_id", e))?,
        kind: Kind::parse(&kind).ok_or_else(|| corrupt("kind", format!("unknown kind {kind}")))?,
        name: row.get(first + 2)?,
        topic: row.get(first + 3)?,
        key: row.get(first + 4)?,
        payload: row.get(first + 5)?,
        headers: serde_json::from_str::<BTreeMap<String, String>>(&headers)
            .map_err(|e| corrupt("headers", e))?,
        occurred_at: row.get(first + 7)?,
    })
}
