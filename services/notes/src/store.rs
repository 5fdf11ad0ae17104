//! The notes service's one table, `notes_notes`, written only by the workers.

use crate::domain::{Note, NoteId, Page};
use platform::sql::{Conn, Error, Row, ToValue};
use platform::Migration;

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "notes",
    version: 1,
    sqlite: "CREATE TABLE notes_notes (
            id         TEXT PRIMARY KEY,
            content    TEXT NOT NULL,
            created_at INTEGER NOT NULL
          ) WITHOUT ROWID;",
    postgres: "CREATE TABLE notes_notes (
            id         TEXT PRIMARY KEY,
            content    TEXT NOT NULL,
            created_at BIGINT NOT NULL
          );",
    mysql: "CREATE TABLE IF NOT EXISTS notes_notes (
            id         VARCHAR(36) PRIMARY KEY,
            content    MEDIUMTEXT NOT NULL,
            created_at BIGINT NOT NULL
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;",
}];

/// Notes per multi-row insert: 3 placeholders each, far below every backend's limit.
const NOTES_PER_INSERT: usize = 256;

/// Writes `notes`; one already stored (a command queued twice) is left as it is.
pub fn insert_all(conn: &Conn, notes: &[Note]) -> Result<(), Error> {
    for chunk in notes.chunks(NOTES_PER_INSERT) {
        let ids: Vec<String> = chunk.iter().map(|note| note.id.to_string()).collect();
        let mut values: Vec<&dyn ToValue> = Vec::with_capacity(chunk.len() * 3);
        for (note, id) in chunk.iter().zip(&ids) {
            values.extend([id as &dyn ToValue, &note.content, &note.created_at]);
        }
        let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        conn.execute(
            &format!(
                "INSERT INTO notes_notes (id, content, created_at) VALUES {rows} \
                 ON CONFLICT (id) DO NOTHING"
            ),
            values.as_slice(),
        )?;
    }
    Ok(())
}

/// Newest first: ids are UUIDv7, so their text sorts by the time they were accepted.
pub fn list(conn: &Conn, page: Page) -> Result<Vec<Note>, Error> {
    let limit = i64::from(page.limit);
    match page.before {
        None => conn.query_map(
            "SELECT id, content, created_at FROM notes_notes ORDER BY id DESC LIMIT ?",
            (limit,),
            note,
        ),
        Some(before) => conn.query_map(
            "SELECT id, content, created_at FROM notes_notes WHERE id < ? \
             ORDER BY id DESC LIMIT ?",
            (before.to_string(), limit),
            note,
        ),
    }
}

pub fn get(conn: &Conn, id: NoteId) -> Result<Option<Note>, Error> {
    conn.query_opt(
        "SELECT id, content, created_at FROM notes_notes WHERE id = ?",
        (id.to_string(),),
        note,
    )
}

fn note(row: &Row<'_>) -> Result<Note, Error> {
    let id: String = row.get(0)?;
    Ok(Note {
        id: NoteId::parse(&id).ok_or_else(|| Error::corrupt("notes_notes.id", &id))?,
        content: row.get(1)?,
        created_at: row.get(2)?,
    })
}
