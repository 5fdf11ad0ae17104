//! `/docs`: Swagger UI for `/openapi.json`. Its assets are compiled into the binary, so the
//! page loads nothing from elsewhere and works offline; the online validator badge, which
//! would call out to swagger.io, is off.

use crate::json::Path;
use crate::problem::Problem;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use http::header;
use std::sync::Arc;
use utoipa_swagger_ui::Config;

type DocsConfig = Arc<Config<'static>>;

pub(crate) fn routes() -> Router {
    let config: DocsConfig = Arc::new(Config::new(["/openapi.json"]).validator_url("none"));
    Router::new()
        // The page loads its assets by relative URLs, which resolve under `/docs/` only.
        .route("/docs", get(|| async { Redirect::permanent("/docs/") }))
        .route(
            "/docs/",
            get(|State(config): State<DocsConfig>| async move { asset("", config) }),
        )
        .route(
            "/docs/{*file}",
            get(
                |State(config): State<DocsConfig>, Path(file): Path<String>| async move {
                    asset(&file, config)
                },
            ),
        )
        .with_state(config)
}

fn asset(file: &str, config: DocsConfig) -> Response {
    match utoipa_swagger_ui::serve(file, config) {
        Ok(Some(file)) => ([(header::CONTENT_TYPE, file.content_type)], file.bytes).into_response(),
        Ok(None) => Problem::not_found("no such file in the docs").into_response(),
        Err(error) => Problem::internal(error).into_response(),
    }
}
