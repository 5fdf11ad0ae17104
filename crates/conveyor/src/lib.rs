//! The `conveyor` binary's library: configuration, process wiring and the operator commands.
//! It is the one place that knows the list of services.

pub mod app;
pub mod bench;
pub mod config;
pub mod dlq;
pub mod projections;
pub mod telemetry;

pub use app::{Application, SERVICES};
pub use config::{Settings, SettingsArgs};
