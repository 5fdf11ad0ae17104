//! The messages the bookings service publishes on `bookings.events`. Additive changes only.

use platform::Message;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBooked {
    pub booking_id: String,
    pub event_id: String,
    pub seats: i64,
    pub user: String,
}

impl Message for EventBooked {
    const NAME: &'static str = "bookings.EventBooked";
    const TOPIC: &'static str = "bookings.events";

    fn key(&self) -> String {
        self.event_id.clone()
    }
}
