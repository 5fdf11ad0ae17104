//! The one message type that crosses every boundary: events, commands and replies.

use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Header names carried by every envelope the platform writes.
pub mod header {
    pub const CORRELATION_ID: &str = "correlation-id";
    pub const CAUSATION_ID: &str = "causation-id";
    pub const CONTENT_TYPE: &str = "content-type";
}

/// What a message asks of its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Command,
    Reply,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Command => "command",
            Kind::Reply => "reply",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "event" => Some(Kind::Event),
            "command" => Some(Kind::Command),
            "reply" => Some(Kind::Reply),
            _ => None,
        }
    }
}

/// A published message. Immutable once built: transports store and deliver it as is.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// UUIDv7: unique, and roughly time-ordered.
    pub id: Uuid,
    pub kind: Kind,
    /// `<service>.<Name>`, e.g. `events.EventCreated`.
    pub name: String,
    /// `<service>.events`, `<service>.commands` or `<saga>.replies`.
    pub topic: String,
    /// The ordering key (an aggregate id): messages with one key are delivered in order.
    pub key: String,
    /// JSON bytes.
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
}

impl Envelope {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.header(header::CORRELATION_ID)
    }

    pub fn causation_id(&self) -> Option<&str> {
        self.header(header::CAUSATION_ID)
    }

    /// A stable 62-bit hash of the key: which partition of a consumer group the message belongs to.
    pub fn key_hash(&self) -> i64 {
        key_hash(&self.key)
    }
}

/// FNV-1a, because partition assignment must not change between builds or processes.
pub fn key_hash(key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash >> 2) as i64
}

/// A message type: a serde struct owned by the producing service's api crate.
///
/// Payload changes must be additive: new fields get `#[serde(default)]`, so old
/// messages still decode.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// `<service>.<Name>`.
    const NAME: &'static str;
    /// The topic it is published on.
    const TOPIC: &'static str;
    const KIND: Kind = Kind::Event;

    /// The ordering key.
    fn key(&self) -> String;
}

pub fn now_millis() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_stable_and_non_negative() {
        assert_eq!(key_hash("order-1"), key_hash("order-1"));
        assert_ne!(key_hash("order-1"), key_hash("order-2"));
        for key in ["", "a", "zzzzzzzzzzzzzzzzzzzz", "ünïcødé"] {
            assert!(key_hash(key) >= 0);
        }
    }

    #[test]
    fn kind_round_trips_through_its_name() {
        for kind in [Kind::Event, Kind::Command, Kind::Reply] {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Kind::parse("bogus"), None);
    }
}
