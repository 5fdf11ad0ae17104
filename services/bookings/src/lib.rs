//! The bookings service: sells an event's seats and never oversells. It learns events only
//! from `events.EventCreated` messages, into its own table; it never reads the events
//! service's tables. It publishes `bookings.EventBooked` (see `api`).
//!
//! `domain` is pure; `app` holds the use cases and the message handler; `store` and `http`
//! are its adapters.

pub mod api;
pub mod app;
pub mod domain;
mod http;
mod store;

use edge::ServiceModule;

pub const MODULE: ServiceModule = ServiceModule {
    name: "bookings",
    migrations: store::MIGRATIONS,
    routes: |context| http::routes(app::Bookings::new(context.db.clone())),
    subscriptions: |_context| app::subscriptions(),
    projections: Vec::new,
};
