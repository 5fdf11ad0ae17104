//! The bookings service's REST API, in the original MyEvents wire format.

use crate::app::{Bookings, BookingsError, Summary};
use crate::domain::Booking;
use crate::domain::BookingRequest as ValidBooking;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use edge::{CaseInsensitiveJson, Path, Problem};
use http::{header, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
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
#[derive(Debug, Deserialize, ToSchema)]
pub struct BookingRequest {
    seats: Option<i64>,
    user: Option<String>,
}

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
    responses((status = 201, body = BookingResponse), (status = 400, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 413, body = Problem)))]
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
    responses((status = 200, body = SummaryResponse), (status = 404, body = Problem)))]
async fn summary(
    State(bookings): State<Bookings>,
    Path(event_id): Path<String>,
) -> Result<Json<SummaryResponse>, Problem> {
    Ok(Json(bookings.summary(&event_id).await?.into()))
}
