//! The events service: events and the locations they take place in. It publishes
//! `events.EventCreated` and `events.LocationCreated` (see the `events-api` crate).
//!
//! `domain` is pure; `app` holds the use cases; `store` and `http` are its adapters. It knows
//! no other service.

pub mod app;
pub mod domain;
mod http;
mod store;

use edge::ServiceModule;

pub const MODULE: ServiceModule = ServiceModule {
    name: "events",
    migrations: store::MIGRATIONS,
    routes: |context| http::routes(app::Events::new(context.db.clone())),
    subscriptions: |_context| Vec::new(),
    projections: Vec::new,
};
