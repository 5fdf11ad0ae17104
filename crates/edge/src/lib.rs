//! Conveyor's HTTP edge: problem details for every error, JSON extraction that names the
//! offending field, body limits, request ids, CORS, health, Prometheus metrics, the OpenAPI
//! document and its docs page, and the `ServiceModule` a service registers itself with.
//!
//! Only the edge (and the services' `http` adapters built on it) speaks HTTP. It knows no
//! particular service.

mod cors;
mod docs;
pub mod host;
pub mod json;
mod openapi;
pub mod problem;
mod request_context;
pub mod schema;

pub use host::{
    metrics, router, HttpOptions, ServiceContext, ServiceModule, WorkerOptions, DEFAULT_SNAPSHOTS,
};
pub use json::{AnyJson, CaseInsensitiveJson, Path, Query};
pub use problem::{FieldError, Problem};
