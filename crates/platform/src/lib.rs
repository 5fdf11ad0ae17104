//! Conveyor's platform: the envelope, the unit of work (database transaction plus outbox),
//! the bus port with its embedded sql-log transport, and the middleware every delivered
//! message goes through (inbox, retries with backoff, dead letters, tracing, metrics).
//!
//! The platform knows no service and speaks no HTTP: services build on it, the edge and the
//! binary compose them.

pub mod aggregate;
pub mod broker;
pub mod bus;
pub mod context;
pub mod db;
pub mod dead_letter;
mod dispatch;
pub mod envelope;
pub mod event_store;
pub mod handler;
mod headers;
mod id;
mod inbox;
mod log;
pub mod projection;
pub mod retention;
pub mod retry;
pub mod sql;
pub mod sql_log;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "conformance")]
pub mod testing;

pub use aggregate::{Aggregate, Snapshots};
pub use broker::{Broker, BrokerBus, BrokerError};
pub use bus::{Bus, BusError, Consumer};
pub use db::{Database, Migration, StoreError, UnitOfWork};
pub use dispatch::metric;
pub use envelope::{Envelope, Kind, Message, Upcaster};
pub use handler::{ConsumerOptions, HandlerError, Incoming, Subscription};
pub use projection::Projection;
pub use retry::RetryPolicy;
pub use sql::{Backend, Conn};
pub use sql_log::SqlLog;
/// For `uuid_id!`.
pub use uuid;
