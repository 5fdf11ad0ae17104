//! The bookings service's tables: its own copy of the events it sells (`bookings_events`,
//! filled from `events.EventCreated`) and the bookings (`bookings_bookings`).

use crate::domain::{Availability, Booking, BookingId, EventId};
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
pub async fn learn_event(
    uow: &mut UnitOfWork,
    id: EventId,
    capacity: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bookings_events (id, capacity) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(capacity)
    .execute(uow.conn())
    .await?;
    Ok(())
}

pub async fn availability<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    event_id: EventId,
) -> Result<Option<Availability>, sqlx::Error> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT capacity, booked FROM bookings_events WHERE id = ?")
            .bind(event_id.to_string())
            .fetch_optional(executor)
            .await?;
    Ok(row.map(|(capacity, booked)| Availability { capacity, booked }))
}

pub async fn set_booked(
    uow: &mut UnitOfWork,
    event_id: EventId,
    booked: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE bookings_events SET booked = ? WHERE id = ?")
        .bind(booked)
        .bind(event_id.to_string())
        .execute(uow.conn())
        .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct BookingRow {
    id: String,
    event_id: String,
    seats: i64,
    user: String,
    created_at: i64,
}

impl TryFrom<BookingRow> for Booking {
    type Error = sqlx::Error;

    fn try_from(row: BookingRow) -> Result<Booking, sqlx::Error> {
        let corrupt = |column: &str, value: &str| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: format!("not an id: {value}").into(),
        };
        Ok(Booking {
            id: BookingId::parse(&row.id).ok_or_else(|| corrupt("id", &row.id))?,
            event_id: EventId::parse(&row.event_id)
                .ok_or_else(|| corrupt("event_id", &row.event_id))?,
            seats: row.seats,
            user: row.user,
            date: row.created_at,
        })
    }
}

pub async fn insert_booking(uow: &mut UnitOfWork, booking: &Booking) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bookings_bookings (id, event_id, seats, user, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(booking.id.to_string())
    .bind(booking.event_id.to_string())
    .bind(booking.seats)
    .bind(&booking.user)
    .bind(booking.date)
    .execute(uow.conn())
    .await?;
    Ok(())
}

/// The newest `MAX_LISTED` bookings of an event, oldest first.
pub async fn bookings(pool: &SqlitePool, event_id: EventId) -> Result<Vec<Booking>, sqlx::Error> {
    let rows: Vec<BookingRow> = sqlx::query_as(
        "SELECT id, event_id, seats, user, created_at FROM ( \
           SELECT * FROM bookings_bookings WHERE event_id = ? ORDER BY seq DESC LIMIT ? \
         ) ORDER BY seq",
    )
    .bind(event_id.to_string())
    .bind(MAX_LISTED)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Booking::try_from).collect()
}
