//! The bookings service's use cases, and the handler that learns events.

use crate::api::EventBooked;
use crate::domain::{Availability, Booking, BookingId, BookingRequest, EventId, Invalid, SoldOut};
use crate::store;
use events_api::EventCreated;
use platform::{Database, HandlerError, Incoming, StoreError, Subscription, UnitOfWork};

/// Bookings' consumer group for the events service's messages.
pub const EVENTS_GROUP: &str = "bookings.learn-events";

#[derive(Debug, thiserror::Error)]
pub enum BookingsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no event {0} is known to bookings")]
    EventNotFound(String),
    #[error(transparent)]
    SoldOut(#[from] SoldOut),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<platform::sql::Error> for BookingsError {
    fn from(error: platform::sql::Error) -> Self {
        BookingsError::Store(error.into())
    }
}

/// An event's seats and its bookings.
#[derive(Debug, Clone)]
pub struct Summary {
    pub event_id: EventId,
    pub availability: Availability,
    pub bookings: Vec<Booking>,
}

#[derive(Clone)]
pub struct Bookings {
    db: Database,
}

impl Bookings {
    pub fn new(db: Database) -> Self {
        Bookings { db }
    }

    /// Books seats if enough are left, and publishes `EventBooked`, in one unit of work.
    /// The seats are taken by a conditional update, so concurrent bookings never oversell.
    pub async fn book(
        &self,
        event_id: &str,
        request: BookingRequest,
    ) -> Result<Booking, BookingsError> {
        let event_id = known_id(event_id)?;
        let booking = self
            .db
            .write(move |uow| {
                let availability = store::availability(uow.conn(), event_id)?
                    .ok_or_else(|| BookingsError::EventNotFound(event_id.to_string()))?;
                availability.book(request.seats)?;
                if !store::take_seats(uow, event_id, request.seats)? {
                    // Taken meanwhile by a booking of another connection: refused with
                    // what is left now.
                    let now = store::availability(uow.conn(), event_id)?
                        .ok_or_else(|| BookingsError::EventNotFound(event_id.to_string()))?;
                    return Err(SoldOut {
                        requested: request.seats,
                        available: now.available(),
                    }
                    .into());
                }
                let booking = Booking {
                    id: BookingId::new(),
                    event_id,
                    seats: request.seats,
                    user: request.user.clone(),
                    date: platform::envelope::now_millis() / 1000,
                };
                store::insert_booking(uow, &booking)?;
                uow.emit(&EventBooked {
                    booking_id: booking.id.to_string(),
                    event_id: booking.event_id.to_string(),
                    seats: booking.seats,
                    user: booking.user.clone(),
                })?;
                Ok::<_, BookingsError>(booking)
            })
            .await?;
        let event = [("event", booking.event_id.to_string())];
        metrics::counter!("myevents_bookings_total", &event).increment(1);
        metrics::histogram!("myevents_booking_seats", &event).record(booking.seats as f64);
        Ok(booking)
    }

    pub async fn summary(&self, event_id: &str) -> Result<Summary, BookingsError> {
        let event_id = known_id(event_id)?;
        self.db
            .read(move |conn| {
                // One snapshot, so `Booked` always equals the seats of the bookings listed.
                conn.snapshot(|snapshot| {
                    let availability = store::availability(snapshot, event_id)?
                        .ok_or_else(|| BookingsError::EventNotFound(event_id.to_string()))?;
                    let bookings = store::bookings(snapshot, event_id)?;
                    Ok(Summary {
                        event_id,
                        availability,
                        bookings,
                    })
                })
            })
            .await
    }
}

/// An id that is not a UUID names no event bookings can know.
fn known_id(event_id: &str) -> Result<EventId, BookingsError> {
    EventId::parse(event_id).ok_or_else(|| BookingsError::EventNotFound(event_id.to_owned()))
}

/// Bookings learns events only from `events.EventCreated`, into its own table.
pub fn subscriptions() -> Vec<Subscription> {
    vec![Subscription::new(EVENTS_GROUP).on(learn_event)]
}

fn learn_event(incoming: Incoming<EventCreated>, uow: &mut UnitOfWork) -> Result<(), HandlerError> {
    let event = incoming.message;
    let Some(id) = EventId::parse(&event.id) else {
        return Err(HandlerError::permanent(format!(
            "event id {:?} is not a UUID",
            event.id
        )));
    };
    if event.capacity < 0 {
        return Err(HandlerError::permanent(format!(
            "event {} has a negative capacity",
            event.id
        )));
    }
    Ok(store::learn_event(uow, id, event.capacity)?)
}
