//! The notes service: write-behind. `POST /save` answers 202 as soon as a `notes.SaveNote`
//! command is durably queued; workers (`--role workers`, any number of processes) write the
//! queue to `notes_notes` in batches, one transaction each; `GET /` reads through a cache
//! that every committed batch invalidates, in every process.
//!
//! `domain` is pure; `app` holds the use cases and the batch handler; `store` and `http`
//! are its adapters; `api` its messages.

pub mod api;
pub mod app;
pub mod domain;
mod http;
mod store;

use edge::ServiceModule;

pub const MODULE: ServiceModule = ServiceModule {
    name: "notes",
    migrations: store::MIGRATIONS,
    routes: |context| {
        let notes = app::Notes::new(
            context.db.clone(),
            context.bus.clone(),
            &context.cache,
            context.workers.queue_limit,
        );
        http::routes(notes)
    },
    subscriptions: |context| app::subscriptions(context.workers.batch, context.workers.wait),
    projections: Vec::new,
};
