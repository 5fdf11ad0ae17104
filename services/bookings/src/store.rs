//! The bookings service's tables: its own copy of the events it sells (`bookings_events`,
//! filled from `events.EventCreated`) and the bookings (`bookings_bookings`).

use crate::domain::{Availability, Booking, BookingId, EventId};
use platform::sql::{Conn, Error, Row};
use platform::{Migration, UnitOfWork};

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "bookings",
    version: 1,
    sqlite: "CREATE TABLE bookings_events (
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
    postgres: "CREATE TABLE bookings_events (
            id       TEXT PRIMARY KEY,
            capacity BIGINT NOT NULL,
            booked   BIGINT NOT NULL DEFAULT 0 CHECK (booked <= capacity)
          );
          CREATE TABLE bookings_bookings (
            seq        BIGSERIAL PRIMARY KEY,
            id         TEXT NOT NULL UNIQUE,
            event_id   TEXT NOT NULL REFERENCES bookings_events (id),
            seats      BIGINT NOT NULL,
            \"user\"     TEXT NOT NULL,
            created_at BIGINT NOT NULL
          );
          CREATE INDEX bookings_bookings_event ON bookings_bookings (event_id, seq);",
    mysql: "CREATE TABLE IF NOT EXISTS bookings_events (
            id       VARCHAR(36) PRIMARY KEY,
            capacity BIGINT NOT NULL,
            booked   BIGINT NOT NULL DEFAULT 0 CHECK (booked <= capacity)
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
          CREATE TABLE IF NOT EXISTS bookings_bookings (
            seq        BIGINT AUTO_INCREMENT PRIMARY KEY,
            id         VARCHAR(36) NOT NULL UNIQUE,
            event_id   VARCHAR(36) NOT NULL REFERENCES bookings_events (id),
            seats      BIGINT NOT NULL,
            \"user\"     TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            INDEX bookings_bookings_event (event_id, seq),
            FOREIGN KEY (event_id) REFERENCES bookings_events (id)
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;",
}];

/// Most bookings a summary lists.
pub const MAX_LISTED: i64 = 1000;

/// Remembers events as bookable, with their capacities; a second copy of an event changes
/// nothing. On a server the writer inserts the rows with those of the other units in its
/// batch (`UnitOfWork::insert`), in the flight of the statement after them.
pub fn learn_events(uow: &UnitOfWork, events: &[(EventId, i64)]) -> Result<(), Error> {
    for (id, capacity) in events {
        uow.insert(
            "INSERT INTO bookings_events (id, capacity) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
            (id.to_string(), *capacity),
        )?;
    }
    Ok(())
}

pub fn availability(conn: &Conn, event_id: EventId) -> Result<Option<Availability>, Error> {
    conn.query_opt(
        "SELECT capacity, booked FROM bookings_events WHERE id = ?",
        [event_id.to_string()],
        |row| {
            Ok(Availability {
                capacity: row.get(0)?,
                booked: row.get(1)?,
            })
        },
    )
}

/// Takes `seats` of the event if that many are left; false when they are not. One
/// conditional statement, so that concurrent bookings never oversell, whether or not the
/// database serialises their transactions.
pub fn take_seats(uow: &UnitOfWork, event_id: EventId, seats: i64) -> Result<bool, Error> {
    let taken = uow.conn().execute(
        "UPDATE bookings_events SET booked = booked + ? WHERE id = ? AND booked + ? <= capacity",
        (seats, event_id.to_string(), seats),
    )?;
    Ok(taken == 1)
}

fn booking_from_row(row: &Row<'_>) -> Result<Booking, Error> {
    let id: String = row.get("id")?;
    let event_id: String = row.get("event_id")?;
    Ok(Booking {
        id: BookingId::parse(&id).ok_or_else(|| Error::corrupt("id", &id))?,
        event_id: EventId::parse(&event_id).ok_or_else(|| Error::corrupt("event_id", &event_id))?,
        seats: row.get("seats")?,
        user: row.get("user")?,
        date: row.get("created_at")?,
    })
}

pub fn insert_booking(uow: &UnitOfWork, booking: &Booking) -> Result<(), Error> {
    uow.conn().execute(
        "INSERT INTO bookings_bookings (id, event_id, seats, \"user\", created_at) \
         VALUES (?, ?, ?, ?, ?)",
        (
            booking.id.to_string(),
            booking.event_id.to_string(),
            booking.seats,
            &booking.user,
            booking.date,
        ),
    )?;
    Ok(())
}

/// The newest `MAX_LISTED` bookings of an event, oldest first.
pub fn bookings(conn: &Conn, event_id: EventId) -> Result<Vec<Booking>, Error> {
    conn.query_map(
        "SELECT id, event_id, seats, \"user\", created_at FROM ( \
           SELECT * FROM bookings_bookings WHERE event_id = ? ORDER BY seq DESC LIMIT ? \
         ) AS newest ORDER BY seq",
        (event_id.to_string(), MAX_LISTED),
        booking_from_row,
    )
}
