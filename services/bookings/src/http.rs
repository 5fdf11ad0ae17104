//! The bookings service's REST API, in the original MyEvents wire format.

use crate::app::{Bookings, BookingsError, Summary};
use crate::domain::BookingRequest as ValidBooking;
use crate::domain::{Booking, MAX_USER_CHARS};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use edge::schema::{integer, or_null, text};
use edge::{CaseInsensitiveJson, Path, Problem};
use http::{header, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn routes(bookings: Bookings) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(book, summary))
        .with_state(bookings)
}

impl From<BookingsError> for Problem {
    fn from(error: BookingsError) -> Self {
        match error {
            BookingsError::Invalid(invalid) => Problem::invalid(invalid.field, invalid.message),
            BookingsError::EventNotFound(_) => Problem::not_found(error.to_string()),
            BookingsError::SoldOut(_) => Problem::conflict(error.to_string()),
            BookingsError::Store(error) => error.into(),
        }
    }
}

/// `{"seats": n, "user": "optional name"}`; keys match whatever their case.
#[derive(Debug, Deserialize)]
pub struct BookingRequest {
    seats: Option<i64>,
    user: Option<String>,
}

/// Written from `domain::BookingRequest::new`'s rules: the DTO's fields are all optional, so
/// that a missing one is named by the domain.
impl PartialSchema for BookingRequest {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "Seats to book. Keys match whatever their case (`seats`, `Seats`, ...).",
            ))
            .property("seats", integer(1, i64::MAX))
            .property("user", or_null(text(MAX_USER_CHARS)))
            .required("seats")
            .into()
    }
}

impl ToSchema for BookingRequest {}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct BookingResponse {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "EventID")]
    event_id: String,
    seats: i64,
    user: String,
    /// Unix seconds.
    date: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct SummaryResponse {
    #[serde(rename = "EventID")]
    event_id: String,
    capacity: i64,
    booked: i64,
    available: i64,
    /// The newest 1000 bookings, oldest first.
    bookings: Vec<BookingResponse>,
}

impl From<Booking> for BookingResponse {
    fn from(booking: Booking) -> Self {
        BookingResponse {
            id: booking.id.to_string(),
            event_id: booking.event_id.to_string(),
            seats: booking.seats,
            user: booking.user,
            date: booking.date,
        }
    }
}

impl From<Summary> for SummaryResponse {
    fn from(summary: Summary) -> Self {
        SummaryResponse {
            event_id: summary.event_id.to_string(),
            capacity: summary.availability.capacity,
            booked: summary.availability.booked,
            available: summary.availability.available(),
            bookings: summary
                .bookings
                .into_iter()
                .map(BookingResponse::from)
                .collect(),
        }
    }
}

/// Books seats; 409 when not enough are left.
#[utoipa::path(post, path = "/events/{id}/bookings", tag = "bookings", request_body = BookingRequest,
    params(("id" = uuid::Uuid, Path, description = "The event's id.")),
    responses((status = 201, description = "Booked.", body = BookingResponse,
            headers(("location" = String, description = "The event's bookings, `/events/{id}/bookings`."))),
        (status = 400, description = "The body is not JSON or breaks a rule, or the path is not UTF-8.", body = Problem),
        (status = 404, description = "Bookings knows no such event (yet: it learns events from messages).", body = Problem),
        (status = 409, description = "Not enough seats are left.", body = Problem),
        (status = 413, description = "The body is larger than the limit.", body = Problem)))]
async fn book(
    State(bookings): State<Bookings>,
    Path(event_id): Path<String>,
    CaseInsensitiveJson(request): CaseInsensitiveJson<BookingRequest>,
) -> Result<Response, Problem> {
    let request = ValidBooking::new(request.seats, request.user).map_err(BookingsError::from)?;
    let booking = bookings.book(&event_id, request).await?;
    let location = format!("/events/{event_id}/bookings");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(BookingResponse::from(booking)),
    )
        .into_response())
}

/// An event's capacity, seats booked and left, and its bookings.
#[utoipa::path(get, path = "/events/{id}/bookings", tag = "bookings",
    params(("id" = uuid::Uuid, Path, description = "The event's id.")),
    responses((status = 200, description = "The event's seats and bookings.", body = SummaryResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "Bookings knows no such event (yet: it learns events from messages).", body = Problem)))]
async fn summary(
    State(bookings): State<Bookings>,
    Path(event_id): Path<String>,
) -> Result<Json<SummaryResponse>, Problem> {
    Ok(Json(bookings.summary(&event_id).await?.into()))
}
