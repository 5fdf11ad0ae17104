//! The bookings service's tables: its own copy of the events it sells (`bookings_events`,
//! filled from `events.EventCreated`) and the bookings (`bookings_bookings`).

use crate::domain::Availability;
use platform::{Migration, UnitOfWork};
use sqlx::sqlite::SqlitePool;

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "bookings",
    version: 1,
    sql: "CREATE TABLE bookings_events (
            id       TEXT PRIMARY KEY,
            capacity INTEGER NOT NULL,
            booked   INTEGER NOT NULL DEFAULT 0 CHECK (booked <= capacity)
          );
          CREATE TABLE bookings_bookings (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT NOT NULL UNIQUE,
            event_id   TEXT NOT NULL REFERENCES bookings_events (id),
            seats      INTEGER NOT NULL,
            user       TEXT NOT NULL,
            created_at INTEGER NOT NULL
          );
          CREATE INDEX bookings_bookings_event ON bookings_bookings (event_id, seq);",
}];

/// Most bookings a summary lists.
pub const MAX_LISTED: i64 = 1000;

/// Remembers an event as bookable; a second copy of the same event changes nothing.
pub async fn learn_event(uow: &mut UnitOfWork, id: &str, capacity: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bookings_events (id, capacity) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(capacity)
    .execute(uow.conn())
    .await?;
    Ok(())
}

pub async fn availability<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    event_id: &str,
) -> Result<Option<Availability>, sqlx::Error> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT capacity, booked FROM bookings_events WHERE id = ?")
            .bind(event_id)
            .fetch_optional(executor)
            .await?;
    Ok(row.map(|(capacity, booked)| Availability { capacity, booked }))
}

pub async fn set_booked(
    uow: &mut UnitOfWork,
    event_id: &str,
    booked: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE bookings_events SET booked = ? WHERE id = ?")
        .bind(booked)
        .bind(event_id)
        .execute(uow.conn())
        .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredBooking {
    pub id: String,
    pub event_id: String,
    pub seats: i64,
    pub user: String,
    pub created_at: i64,
}

pub async fn insert_booking(
    uow: &mut UnitOfWork,
    booking: &StoredBooking,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bookings_bookings (id, event_id, seats, user, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&booking.id)
    .bind(&booking.event_id)
    .bind(booking.seats)
    .bind(&booking.user)
    .bind(booking.created_at)
    .execute(uow.conn())
    .await?;
    Ok(())
}

/// The newest `MAX_LISTED` bookings of an event, oldest first.
pub async fn bookings(
    pool: &SqlitePool,
    event_id: &str,
) -> Result<Vec<StoredBooking>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, event_id, seats, user, created_at FROM ( \
           SELECT * FROM bookings_bookings WHERE event_id = ? ORDER BY seq DESC LIMIT ? \
         ) ORDER BY seq",
    )
    .bind(event_id)
    .bind(MAX_LISTED)
    .fetch_all(pool)
    .await
}
