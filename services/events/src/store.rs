//! The events service's tables: `events_locations` and `events_events`.

use crate::domain::{Event, EventId, Hall, Location, LocationId};
use platform::{Migration, UnitOfWork};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::Row;

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "events",
    version: 1,
    sql: "CREATE TABLE events_locations (
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
}];

/// How halls are stored: a JSON array in the location row (they are a value, never queried).
#[derive(Serialize, Deserialize)]
struct StoredHall {
    name: String,
    location: String,
    capacity: i64,
}

type Insert<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

const INSERT_LOCATION: &str =
    "INSERT INTO events_locations (id, name, address, country, open_time, close_time, halls) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";
const INSERT_EVENT: &str =
    "INSERT INTO events_events (id, name, start_date, end_date, duration, location_id) \
     VALUES (?, ?, ?, ?, ?, ?)";

fn bind_location<'q>(query: Insert<'q>, location: &'q Location) -> Result<Insert<'q>, sqlx::Error> {
    let halls: Vec<StoredHall> = location
        .halls
        .iter()
        .map(|hall| StoredHall {
            name: hall.name.clone(),
            location: hall.location.clone(),
            capacity: hall.capacity,
        })
        .collect();
    let halls = serde_json::to_string(&halls).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    Ok(query
        .bind(location.id.to_string())
        .bind(&location.name)
        .bind(&location.address)
        .bind(&location.country)
        .bind(location.open_time)
        .bind(location.close_time)
        .bind(halls))
}

fn bind_event<'q>(query: Insert<'q>, event: &'q Event) -> Insert<'q> {
    query
        .bind(event.id.to_string())
        .bind(&event.name)
        .bind(event.start_date)
        .bind(event.end_date)
        .bind(event.duration)
        .bind(event.location.id.to_string())
}

pub async fn insert_location(uow: &mut UnitOfWork, location: &Location) -> Result<(), sqlx::Error> {
    bind_location(sqlx::query(INSERT_LOCATION), location)?
        .execute(uow.conn())
        .await?;
    Ok(())
}

/// Inserts the event, and first its location when that is new, in one round trip.
pub async fn insert_event(
    uow: &mut UnitOfWork,
    event: &Event,
    new_location: bool,
) -> Result<(), sqlx::Error> {
    if !new_location {
        bind_event(sqlx::query(INSERT_EVENT), event)
            .execute(uow.conn())
            .await?;
        return Ok(());
    }
    let both = format!("{INSERT_LOCATION}; {INSERT_EVENT}");
    let query = bind_location(sqlx::query(&both), &event.location)?;
    bind_event(query, event).execute(uow.conn()).await?;
    Ok(())
}

const LOCATION_COLUMNS: &str = "l.id AS location_id, l.name AS location_name, l.address, \
     l.country, l.open_time, l.close_time, l.halls";

/// A location, read through `executor`: the read pool, or a unit of work's connection to
/// reuse the location for a new event.
pub async fn location<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    id: LocationId,
) -> Result<Option<Location>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {LOCATION_COLUMNS} FROM events_locations l WHERE l.id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(location_from_row)
    .transpose()
}

pub async fn locations(
    pool: &SqlitePool,
    limit: i64,
    offset: i64,
) -> Result<Vec<Location>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {LOCATION_COLUMNS} FROM events_locations l ORDER BY l.seq DESC LIMIT ? OFFSET ?"
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?
    .iter()
    .map(location_from_row)
    .collect()
}

fn event_query(filter: &str) -> String {
    format!(
        "SELECT e.id, e.name, e.start_date, e.end_date, e.duration, {LOCATION_COLUMNS} \
         FROM events_events e JOIN events_locations l ON l.id = e.location_id {filter}"
    )
}

pub async fn event(pool: &SqlitePool, id: EventId) -> Result<Option<Event>, sqlx::Error> {
    sqlx::query(&event_query("WHERE e.id = ?"))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(event_from_row)
        .transpose()
}

/// The newest event with this exact name.
pub async fn event_by_name(pool: &SqlitePool, name: &str) -> Result<Option<Event>, sqlx::Error> {
    sqlx::query(&event_query("WHERE e.name = ? ORDER BY e.seq DESC LIMIT 1"))
        .bind(name)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(event_from_row)
        .transpose()
}

/// Newest first.
pub async fn events(pool: &SqlitePool, limit: i64, offset: i64) -> Result<Vec<Event>, sqlx::Error> {
    sqlx::query(&event_query("ORDER BY e.seq DESC LIMIT ? OFFSET ?"))
        .bind(limit)
        .bind(offset)
        .fetch_all(pool)
        .await?
        .iter()
        .map(event_from_row)
        .collect()
}

fn corrupt(column: &str, detail: impl ToString) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: detail.to_string().into(),
    }
}

fn location_from_row(row: &SqliteRow) -> Result<Location, sqlx::Error> {
    let id: String = row.try_get("location_id")?;
    let halls: String = row.try_get("halls")?;
    let halls: Vec<StoredHall> = serde_json::from_str(&halls).map_err(|e| corrupt("halls", e))?;
    Ok(Location {
        id: LocationId::parse(&id).ok_or_else(|| corrupt("location_id", &id))?,
        name: row.try_get("location_name")?,
        address: row.try_get("address")?,
        country: row.try_get("country")?,
        open_time: row.try_get("open_time")?,
        close_time: row.try_get("close_time")?,
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

fn event_from_row(row: &SqliteRow) -> Result<Event, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(Event {
        id: EventId::parse(&id).ok_or_else(|| corrupt("id", &id))?,
        name: row.try_get("name")?,
        start_date: row.try_get("start_date")?,
        end_date: row.try_get("end_date")?,
        duration: row.try_get("duration")?,
        location: location_from_row(row)?,
    })
}
