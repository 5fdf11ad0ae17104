//! The messages the events service publishes on `events.events`: its contract with the
//! services that consume them. Changes are additive only (new fields get `#[serde(default)]`).
//!
//! Depends on nothing but the platform's `Message` trait and serde.

use platform::Message;
use serde::{Deserialize, Serialize};

pub const TOPIC: &str = "events.events";

/// An event was created and can now be booked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCreated {
    pub id: String,
    pub name: String,
    pub startdate: i64,
    pub enddate: i64,
    pub duration: i64,
    pub location_id: String,
    /// The sum of the capacities of the location's halls.
    pub capacity: i64,
}

impl Message for EventCreated {
    const NAME: &'static str = "events.EventCreated";
    const TOPIC: &'static str = TOPIC;

    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hall {
    pub name: String,
    pub location: String,
    pub capacity: i64,
}

/// A location was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationCreated {
    pub id: String,
    pub name: String,
    pub address: String,
    pub country: String,
    pub halls: Vec<Hall>,
}

impl Message for LocationCreated {
    const NAME: &'static str = "events.LocationCreated";
    const TOPIC: &'static str = TOPIC;

    fn key(&self) -> String {
        self.id.clone()
    }
}
