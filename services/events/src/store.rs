//! The events service's tables: `events_locations` and `events_events`.

use crate::domain::{Event, EventId, Hall, Location, LocationId};
use platform::sql::{Conn, Error, Row};
use platform::{Migration, UnitOfWork};
use serde::{Deserialize, Serialize};

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        service: "events",
        version: 1,
        sqlite: "CREATE TABLE events_locations (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT NOT NULL UNIQUE,
            name       TEXT NOT NULL,
            address    TEXT NOT NULL,
            country    TEXT NOT NULL,
            open_time  INTEGER NOT NULL,
            close_time INTEGER NOT NULL,
            halls      TEXT NOT NULL
          );
          CREATE TABLE events_events (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            id          TEXT NOT NULL UNIQUE,
            name        TEXT NOT NULL,
            start_date  INTEGER NOT NULL,
            end_date    INTEGER NOT NULL,
            duration    INTEGER NOT NULL,
            location_id TEXT NOT NULL REFERENCES events_locations (id)
          );
          CREATE INDEX events_events_name ON events_events (name, seq);",
        // The servers start with the shape SQLite reaches at version 2.
        postgres: "CREATE TABLE events_locations (
            id         TEXT PRIMARY KEY,
            name       TEXT NOT NULL,
            address    TEXT NOT NULL,
            country    TEXT NOT NULL,
            open_time  BIGINT NOT NULL,
            close_time BIGINT NOT NULL,
            halls      TEXT NOT NULL
          );
          CREATE TABLE events_events (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            start_date  BIGINT NOT NULL,
            end_date    BIGINT NOT NULL,
            duration    BIGINT NOT NULL,
            location_id TEXT NOT NULL REFERENCES events_locations (id)
          );
          CREATE INDEX events_events_name ON events_events (name, id);",
        mysql: "CREATE TABLE IF NOT EXISTS events_locations (
            id         VARCHAR(36) PRIMARY KEY,
            name       TEXT NOT NULL,
            address    TEXT NOT NULL,
            country    TEXT NOT NULL,
            open_time  BIGINT NOT NULL,
            close_time BIGINT NOT NULL,
            halls      LONGTEXT NOT NULL
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
          CREATE TABLE IF NOT EXISTS events_events (
            id          VARCHAR(36) PRIMARY KEY,
            name        VARCHAR(255) NOT NULL,
            start_date  BIGINT NOT NULL,
            end_date    BIGINT NOT NULL,
            duration    BIGINT NOT NULL,
            location_id VARCHAR(36) NOT NULL,
            INDEX events_events_name (name, id),
            FOREIGN KEY (location_id) REFERENCES events_locations (id)
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;",
    },
    Migration {
        // Keyed by the time-ordered UUIDv7 alone: a row is one b-tree entry instead of a rowid
        // row, a unique index entry and an AUTOINCREMENT counter update. Newest first is now
        // `ORDER BY id DESC` (ids from one process are ordered by creation).
        service: "events",
        version: 2,
        sqlite: "CREATE TABLE events_locations_v2 (
            id         TEXT PRIMARY KEY,
            name       TEXT NOT NULL,
            address    TEXT NOT NULL,
            country    TEXT NOT NULL,
            open_time  INTEGER NOT NULL,
            close_time INTEGER NOT NULL,
            halls      TEXT NOT NULL
          ) WITHOUT ROWID;
          INSERT INTO events_locations_v2
            SELECT id, name, address, country, open_time, close_time, halls FROM events_locations;
          CREATE TABLE events_events_v2 (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            start_date  INTEGER NOT NULL,
            end_date    INTEGER NOT NULL,
            duration    INTEGER NOT NULL,
            location_id TEXT NOT NULL REFERENCES events_locations_v2 (id)
          ) WITHOUT ROWID;
          INSERT INTO events_events_v2
            SELECT id, name, start_date, end_date, duration, location_id FROM events_events;
          DROP TABLE events_events;
          DROP TABLE events_locations;
          -- Renaming the parent also renames it in the child's REFERENCES clause.
          ALTER TABLE events_locations_v2 RENAME TO events_locations;
          ALTER TABLE events_events_v2 RENAME TO events_events;
          CREATE INDEX events_events_name ON events_events (name, id);",
        postgres: "",
        mysql: "",
    },
];

/// How halls are stored: a JSON array in the location row (they are a value, never queried).
#[derive(Serialize, Deserialize)]
struct StoredHall {
    name: String,
    location: String,
    capacity: i64,
}

const INSERT_LOCATION: &str =
    "INSERT INTO events_locations (id, name, address, country, open_time, close_time, halls) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";
const INSERT_EVENT: &str =
    "INSERT INTO events_events (id, name, start_date, end_date, duration, location_id) \
     VALUES (?, ?, ?, ?, ?, ?)";

pub fn insert_location(uow: &UnitOfWork, location: &Location) -> Result<(), Error> {
    let halls: Vec<StoredHall> = location
        .halls
        .iter()
        .map(|hall| StoredHall {
            name: hall.name.clone(),
            location: hall.location.clone(),
            capacity: hall.capacity,
        })
        .collect();
    let halls = serde_json::to_string(&halls).map_err(|error| Error::Encode {
        what: "halls",
        message: error.to_string(),
    })?;
    uow.insert(
        INSERT_LOCATION,
        (
            location.id.to_string(),
            &location.name,
            &location.address,
            &location.country,
            location.open_time,
            location.close_time,
            halls,
        ),
    )?;
    Ok(())
}

pub fn insert_event(uow: &UnitOfWork, event: &Event) -> Result<(), Error> {
    uow.insert(
        INSERT_EVENT,
        (
            event.id.to_string(),
            &event.name,
            event.start_date,
            event.end_date,
            event.duration,
            event.location.id.to_string(),
        ),
    )?;
    Ok(())
}

const LOCATION_COLUMNS: &str = "l.id AS location_id, l.name AS location_name, l.address, \
     l.country, l.open_time, l.close_time, l.halls";

/// A location, read on `conn`: a read connection, or a unit of work's to reuse the location
/// for a new event.
pub fn location(conn: &Conn, id: LocationId) -> Result<Option<Location>, Error> {
    conn.query_opt(
        &format!("SELECT {LOCATION_COLUMNS} FROM events_locations l WHERE l.id = ?"),
        [id.to_string()],
        location_from_row,
    )
}

pub fn locations(conn: &Conn, limit: i64, offset: i64) -> Result<Vec<Location>, Error> {
    conn.query_map(
        &format!(
            "SELECT {LOCATION_COLUMNS} FROM events_locations l \
             ORDER BY l.id DESC LIMIT ? OFFSET ?"
        ),
        [limit, offset],
        location_from_row,
    )
}

fn event_query(filter: &str) -> String {
    format!(
        "SELECT e.id, e.name, e.start_date, e.end_date, e.duration, {LOCATION_COLUMNS} \
         FROM events_events e JOIN events_locations l ON l.id = e.location_id {filter}"
    )
}

pub fn event(conn: &Conn, id: EventId) -> Result<Option<Event>, Error> {
    conn.query_opt(
        &event_query("WHERE e.id = ?"),
        [id.to_string()],
        event_from_row,
    )
}

/// The newest event with this exact name.
pub fn event_by_name(conn: &Conn, name: &str) -> Result<Option<Event>, Error> {
    conn.query_opt(
        &event_query("WHERE e.name = ? ORDER BY e.id DESC LIMIT 1"),
        [name],
        event_from_row,
    )
}

/// Newest first.
pub fn events(conn: &Conn, limit: i64, offset: i64) -> Result<Vec<Event>, Error> {
    conn.query_map(
        &event_query("ORDER BY e.id DESC LIMIT ? OFFSET ?"),
        [limit, offset],
        event_from_row,
    )
}

fn location_from_row(row: &Row<'_>) -> Result<Location, Error> {
    let id: String = row.get("location_id")?;
    let halls: String = row.get("halls")?;
    let halls: Vec<StoredHall> =
        serde_json::from_str(&halls).map_err(|e| Error::corrupt("halls", e))?;
    Ok(Location {
        id: LocationId::parse(&id).ok_or_else(|| Error::corrupt("location_id", &id))?,
        name: row.get("location_name")?,
        address: row.get("address")?,
        country: row.get("country")?,
        open_time: row.get("open_time")?,
        close_time: row.get("close_time")?,
        halls: halls
            .into_iter()
            .map(|hall| Hall {
                name: hall.name,
                location: hall.location,
                capacity: hall.capacity,
            })
            .collect(),
    })
}

fn event_from_row(row: &Row<'_>) -> Result<Event, Error> {
    let id: String = row.get("id")?;
    Ok(Event {
        id: EventId::parse(&id).ok_or_else(|| Error::corrupt("id", &id))?,
        name: row.get("name")?,
        start_date: row.get("start_date")?,
        end_date: row.get("end_date")?,
        duration: row.get("duration")?,
        location: location_from_row(row)?,
    })
}
