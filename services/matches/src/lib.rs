//! GoGo matches: Go games with the real rules, event-sourced, CQRS.
//!
//! Two services: `matches`, the command side (each match an aggregate whose stream holds
//! its events: `app`, on the rules in `domain`), and `matches-query`, the query side (a
//! projection of `matches.events` into the documents the GETs serve: `views`). Either can
//! run without the other; `api` is the contract between them.

pub mod api;
pub mod app;
pub mod domain;
mod http;
pub mod views;

use edge::ServiceModule;

/// The command side: `POST /matches`, `POST /matches/{id}/moves`.
pub const MODULE: ServiceModule = ServiceModule {
    name: "matches",
    migrations: &[],
    routes: |context| {
        http::command_routes(app::Matches::new(context.db.clone(), context.snapshots))
    },
    subscriptions: |_| Vec::new(),
    projections: Vec::new,
};

/// The query side: `GET /matches`, `GET /matches/{id}`, `GET /matches/{id}/moves`.
pub const QUERY_MODULE: ServiceModule = ServiceModule {
    name: "matches-query",
    migrations: views::MIGRATIONS,
    routes: |context| http::query_routes(context.db.clone()),
    subscriptions: |_| Vec::new(),
    projections: || vec![views::projection()],
};
