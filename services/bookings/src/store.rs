//! The bookings service's tables: its own copy of the events it sells (`bookings_events`,
//! filled from `events.EventCreated`) and the bookings (`bookings_bookings`).

use crate::domain::{Availability, Booking, BookingId, EventId};
use platform::db::corrupt;
use platform::{Migration, UnitOfWork};
use rusqlite::{Connection, OptionalExtension, Row};

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
pub fn learn_event(uow: &UnitOfWork, id: EventId, capacity: i64) -> Result<(), rusqlite::Error> {
    uow.conn()
        .prepare_cached(
            "INSERT INTO bookings_events (id, capacity) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
        )?
        .execute((id.to_string(), capacity))?;
    Ok(())
}

pub fn availability(
    conn: &Connection,
    event_id: EventId,
) -> Result<Option<Availability>, rusqlite::Error> {
    conn.prepare_cached("SELECT capacity, booked FROM bookings_events WHERE id = ?")?
        .query_row([event_id.to_string()], |row| {
            Ok(Availability {
                capacity: row.get(0)?,
                booked: row.get(1)?,
            })
        })
        .optional()
}

pub fn set_booked(uow: &UnitOfWork, event_id: EventId, booked: i64) -> Result<(), rusqlite::Error> {
    uow.conn()
        .prepare_cached("UPDATE bookings_events SET booked = ? WHERE id = ?")?
        .execute((booked, event_id.to_string()))?;
    Ok(())
}

fn booking_from_row(row: &Row<'_>) -> Result<Booking, rusqlite::Error> {
    let id: String = row.get("id")?;
    let event_id: String = row.get("event_id")?;
    Ok(Booking {
        id: BookingId::parse(&id).ok_or_else(|| corrupt("id", &id))?,
        event_id: EventId::parse(&event_id).ok_or_else(|| corrupt("event_id", &event_id))?,
        seats: row.get("seats")?,
        user: row.get("user")?,
        date: row.get("created_at")?,
    })
}

pub fn insert_booking(uow: &UnitOfWork, booking: &Booking) -> Result<(), rusqlite::Error> {
    uow.conn()
        .prepare_cached(
            "INSERT INTO bookings_bookings (id, event_id, seats, user, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )?
        .execute((
            booking.id.to_string(),
            booking.event_id.to_string(),
            booking.seats,
            &booking.user,
            booking.date,
        ))?;
    Ok(())
}

/// The newest `MAX_LISTED` bookings of an event, oldest first.
pub fn bookings(conn: &Connection, event_id: EventId) -> Result<Vec<Booking>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT id, event_id, seats, user, created_at FROM ( \
           SELECT * FROM bookings_bookings WHERE event_id = ? ORDER BY seq DESC LIMIT ? \
         ) ORDER BY seq",
    )?
    .query_map((event_id.to_string(), MAX_LISTED), booking_from_row)?
    .collect()
}
