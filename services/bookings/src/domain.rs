//! Bookings: the rule that an event never sells more seats than it has. Pure: no IO, no async.

platform::uuid_id!(BookingId);
platform::uuid_id!(
    /// An event, as the events service names it; bookings knows it from `EventCreated`.
    EventId
);

/// A sold booking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub id: BookingId,
    pub event_id: EventId,
    pub seats: i64,
    pub user: String,
    /// Unix seconds.
    pub date: i64,
}

pub const MAX_USER_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

/// A validated booking request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingRequest {
    pub seats: i64,
    pub user: String,
}

impl BookingRequest {
    pub fn new(seats: Option<i64>, user: Option<String>) -> Result<Self, Invalid> {
        let seats = match seats {
            Some(seats) if seats >= 1 => seats,
            _ => {
                return Err(Invalid {
                    field: "seats",
                    message: "must be at least 1".into(),
                })
            }
        };
        let user = user.unwrap_or_default();
        if user.chars().count() > MAX_USER_CHARS {
            return Err(Invalid {
                field: "user",
                message: format!("must be at most {MAX_USER_CHARS} characters"),
            });
        }
        Ok(BookingRequest { seats, user })
    }
}

/// How many seats an event has and how many are sold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Availability {
    pub capacity: i64,
    pub booked: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{requested} seats requested but only {available} left")]
pub struct SoldOut {
    pub requested: i64,
    pub available: i64,
}

impl Availability {
    pub fn available(&self) -> i64 {
        (self.capacity - self.booked).max(0)
    }

    /// The availability after selling `seats`, if there are enough left.
    pub fn book(self, seats: i64) -> Result<Availability, SoldOut> {
        if seats > self.available() {
            return Err(SoldOut {
                requested: seats,
                available: self.available(),
            });
        }
        Ok(Availability {
            booked: self.booked + seats,
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_must_be_positive() {
        assert_eq!(
            BookingRequest::new(Some(0), None).unwrap_err().field,
            "seats"
        );
        assert_eq!(BookingRequest::new(None, None).unwrap_err().field, "seats");
        assert_eq!(
            BookingRequest::new(Some(2), Some("ann".into()))
                .unwrap()
                .seats,
            2
        );
        assert_eq!(
            BookingRequest::new(Some(1), Some("x".repeat(201)))
                .unwrap_err()
                .field,
            "user"
        );
    }

    #[test]
    fn never_sells_more_than_capacity() {
        let open = Availability {
            capacity: 100,
            booked: 98,
        };
        assert_eq!(open.book(2).unwrap().available(), 0);
        assert_eq!(
            open.book(3),
            Err(SoldOut {
                requested: 3,
                available: 2
            })
        );
        let full = open.book(2).unwrap();
        assert!(full.book(1).is_err());
    }
}
