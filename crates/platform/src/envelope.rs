//! The one message type that crosses every boundary: events, commands and replies.

pub use crate::headers::Headers;
use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;

/// Header names carried by every envelope the platform writes.
pub mod header {
    pub const CORRELATION_ID: &str = "correlation-id";
    pub const CAUSATION_ID: &str = "causation-id";
    pub const CONTENT_TYPE: &str = "content-type";
    /// The payload's revision (see `Upcaster`), when it is not the first.
    pub const REVISION: &str = "revision";
    /// On an event from the event store: its stream, and its version in it.
    pub const STREAM: &str = "stream";
    pub const STREAM_VERSION: &str = "stream-version";
    /// On a replayed message crossing a broker: the one consumer group it is for (in the
    /// log it is the `only_group` column).
    pub const ONLY_GROUP: &str = "only-group";
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
    pub headers: Headers,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
}

impl Envelope {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.header(header::CORRELATION_ID)
    }

    pub fn causation_id(&self) -> Option<&str> {
        self.header(header::CAUSATION_ID)
    }

    /// The payload's revision: 1 unless the producer wrote a later one.
    pub fn revision(&self) -> u32 {
        self.header(header::REVISION)
            .and_then(|revision| revision.parse().ok())
            .unwrap_or(1)
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

/// A message type: a serde type owned by the producing service's api module.
///
/// Payload changes should be additive: new fields get `#[serde(default)]`, so old messages
/// still decode. A change that cannot be (a renamed or reshaped field) bumps the message's
/// revision by listing an `Upcaster` that maps the old payload to the new.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// `<service>.<Name>`.
    const NAME: &'static str;
    /// The topic it is published on.
    const TOPIC: &'static str;
    const KIND: Kind = Kind::Event;
    /// Every name a value of this type is published under: one, unless the type is an enum
    /// of several messages (an aggregate's events), whose `name` then tells them apart.
    const NAMES: &'static [&'static str] = &[Self::NAME];
    /// The maps from old revisions of these messages to new ones, in order of `from` for
    /// each name. A message is written at its newest revision.
    const UPCASTERS: &'static [Upcaster] = &[];

    /// The ordering key.
    fn key(&self) -> String;

    /// This value's name, one of `NAMES`.
    fn name(&self) -> &'static str {
        Self::NAME
    }
}

/// Maps the payload of a stored message at revision `from` to revision `from + 1`, so that
/// events written years ago still load (and replay) into today's types.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    /// The message it maps.
    pub name: &'static str,
    /// The revision it reads.
    pub from: u32,
    pub map: fn(serde_json::Value) -> Result<serde_json::Value, String>,
}

/// The revision `name` is written at today: one past its last upcaster.
pub fn revision<M: Message>(name: &str) -> u32 {
    1 + M::UPCASTERS
        .iter()
        .filter(|upcaster| upcaster.name == name)
        .count() as u32
}

/// Decodes the payload of message `name` written at `revision`, upcasting it first if it is
/// older than today's.
pub fn decode<M: Message>(name: &str, revision: u32, payload: &[u8]) -> Result<M, String> {
    let newest = self::revision::<M>(name);
    if revision >= newest {
        return serde_json::from_slice(payload).map_err(|error| error.to_string());
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|error| error.to_string())?;
    for step in revision..newest {
        let upcaster = M::UPCASTERS
            .iter()
            .find(|upcaster| upcaster.name == name && upcaster.from == step)
            .ok_or_else(|| format!("no upcaster of {name} from revision {step}"))?;
        value = (upcaster.map)(value)
            .map_err(|error| format!("upcasting {name} from revision {step}: {error}"))?;
    }
    serde_json::from_value(value).map_err(|error| error.to_string())
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
