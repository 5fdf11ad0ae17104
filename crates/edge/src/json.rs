//! Request extractors whose rejections are problem details: axum's own answer in plain text,
//! which no client of a problem+json API expects.
//!
//! JSON bodies are read whatever the Content-Type says: the original clients of the
//! reference systems send none, `text/plain` or form-urlencoded.

use crate::problem::Problem;
use axum::extract::{FromRequest, FromRequestParts, Request};
use bytes::Bytes;
use http::request::Parts;
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

/// A JSON body, whatever the Content-Type. 413 past the body limit; 400 naming the field
/// that failed to parse.
pub struct AnyJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AnyJson<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        let body = body_bytes(request, state).await?;
        parse(&body).map(AnyJson)
    }
}

/// Like `AnyJson`, but object keys match the target's field names whatever their case (the
/// target's fields must be named in lower case), and an integer written with a zero fraction
/// (`2.0`) is read as one, as JSON Schema (and so the OpenAPI document) counts it.
pub struct CaseInsensitiveJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for CaseInsensitiveJson<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        let body = body_bytes(request, state).await?;
        reject_empty(&body)?;
        // Syntax errors have no field to name: no need to track paths for the first pass.
        let mut value: Value = serde_json::from_slice(&body).map_err(|error| {
            Problem::bad_request(format!("the request body is not valid JSON: {error}"))
        })?;
        normalize(&mut value);
        let value = serde_path_to_error::deserialize(value).map_err(field_problem)?;
        Ok(CaseInsensitiveJson(value))
    }
}

async fn body_bytes<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, Problem> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is larger than the limit",
                )
            } else {
                Problem::bad_request(format!("cannot read the request body: {rejection}"))
            }
        })
}

fn reject_empty(body: &[u8]) -> Result<(), Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::bad_request(
            "the request body is empty; expected JSON",
        ));
    }
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    reject_empty(body)?;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(field_problem)
}

fn field_problem(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_syntax() || inner.is_eof() || path == "." {
        Problem::bad_request(format!("the request body is not valid JSON: {inner}"))
    } else {
        Problem::invalid(path, inner.to_string())
    }
}

/// Keys in lower case, and whole floats as integers.
fn normalize(value: &mut Value) {
    match value {
        // Most clients already send lower-case keys: rebuild only the maps that need it.
        Value::Object(map) if map.keys().any(|key| key.chars().any(char::is_uppercase)) => {
            let entries = std::mem::take(map);
            for (key, mut inner) in entries {
                normalize(&mut inner);
                map.insert(key.to_lowercase(), inner);
            }
        }
        Value::Object(map) => map.values_mut().for_each(normalize),
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::Number(number) => {
            if let Some(whole) = whole_float(number) {
                *number = whole.into();
            }
        }
        _ => {}
    }
}

/// `2.0` as `2`. Only up to 2^53: past it a float stands for more than one integer literal,
/// so which one the client wrote is lost.
fn whole_float(number: &Number) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let float = number.as_f64().filter(|_| number.is_f64())?;
    (float.fract() == 0.0 && float.abs() <= EXACT).then_some(float as i64)
}

/// Query parameters; 400 problem naming the problem when they do not parse.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| Query(query.0))
            .map_err(|rejection| Problem::bad_request(rejection.body_text()))
    }
}

/// Path parameters; 400 problem when one does not decode (e.g. `%FF`, not UTF-8).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| Path(path.0))
            .map_err(|rejection| {
                let status = rejection.status();
                // A 5xx rejection means a route and its extractor disagree: a bug, not the client's.
                if status.is_server_error() {
                    Problem::internal(rejection.body_text())
                } else {
                    Problem::new(status, rejection.body_text())
                }
            })
    }
}

/// Unix milliseconds as the API writes every instant: RFC 3339, UTC, to the millisecond.
pub fn timestamp(millis: i64) -> String {
    let millis = u64::try_from(millis).unwrap_or_default();
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis),
    )
    .to_string()
}
