//! Problem details (RFC 9457): the body of every error response.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// What is wrong with one field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// A path into the request body, e.g. `location.halls[0].capacity`.
    pub field: String,
    pub message: String,
}

/// An error response. 4xx problems carry a message for the user; 5xx are deliberately vague
/// (the cause is logged where it happened, never sent to the client).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Why a 5xx happened: never sent, logged by the host's layer.
    #[serde(skip)]
    cause: Option<String>,
}

/// The cause of a 5xx response, carried in its extensions for the host's layer to log.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: Some(detail.into()),
            errors: Vec::new(),
            cause: None,
        }
    }

    /// 400 naming the offending field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        let mut problem = Problem::new(StatusCode::BAD_REQUEST, format!("{field}: {message}"));
        problem.errors.push(FieldError { field, message });
        problem
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::CONFLICT, detail)
    }

    /// 500 telling the client nothing of `cause`, which the host logs.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut problem = Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server failed to handle the request; it has been logged",
        );
        problem.cause = Some(cause.to_string());
        problem
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(mut self) -> Response {
        let status = self.status();
        let cause = self.cause.take();
        let mut response = (status, axum::Json(self)).into_response();
        if let Some(cause) = cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        response
    }
}

impl From<platform::StoreError> for Problem {
    fn from(error: platform::StoreError) -> Self {
        Problem::internal(error)
    }
}
