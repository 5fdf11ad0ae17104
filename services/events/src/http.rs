//! The events service's REST API, in the original MyEvents wire format: responses use its
//! keys (`ID`, `Name`, `StartDate`, ...), requests match keys case-insensitively.

mod schema;

use crate::app::{Events, EventsError, Page, DEFAULT_PAGE, MAX_PAGE};
use crate::domain::{Event, EventDraft, EventId, HallDraft, Location, LocationDraft};
use axum::extract::{FromRef, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use edge::schema::integer;
use edge::{CaseInsensitiveJson, Path, Problem, Query};
use http::{header, StatusCode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use utoipa::openapi::schema::Object;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Rendered events kept in memory for the GETs by id. Events never change once created, so
/// a rendered copy is never stale, in this process or any other.
const RENDERED_EVENTS: usize = 10_000;

/// The API's state: the use cases, and the JSON of events already rendered.
#[derive(Clone)]
pub struct Api {
    events: Events,
    rendered: Arc<Mutex<HashMap<EventId, Bytes>>>,
}

impl Api {
    /// The event as its JSON response body.
    async fn event_json(&self, id: &str) -> Result<Bytes, Problem> {
        let id = EventId::parse(id).ok_or_else(|| EventsError::EventNotFound(id.to_owned()))?;
        let cached = self
            .rendered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(json) = cached {
            return Ok(json);
        }
        let event = self.events.event(id).await?;
        let json = Bytes::from(
            serde_json::to_vec(&EventResponse::from(&event))
                .map_err(|error| Problem::internal(error.to_string()))?,
        );
        let mut rendered = self.rendered.lock().unwrap_or_else(PoisonError::into_inner);
        if rendered.len() >= RENDERED_EVENTS {
            // Any entry will do: all are equally cheap to render again.
            if let Some(evicted) = rendered.keys().next().copied() {
                rendered.remove(&evicted);
            }
        }
        rendered.insert(id, json.clone());
        Ok(json)
    }
}

impl FromRef<Api> for Events {
    fn from_ref(api: &Api) -> Events {
        api.events.clone()
    }
}

pub fn routes(events: Events) -> OpenApiRouter {
    let api = Api {
        events,
        rendered: Arc::default(),
    };
    OpenApiRouter::new()
        .routes(routes!(list_events, create_event))
        .routes(routes!(get_event))
        .routes(routes!(get_event_by_id))
        .routes(routes!(get_event_by_name))
        .routes(routes!(list_locations, create_location))
        .routes(routes!(get_location))
        .with_state(api)
}

impl From<EventsError> for Problem {
    fn from(error: EventsError) -> Self {
        match error {
            EventsError::Invalid(invalid) => Problem::invalid(invalid.field, invalid.message),
            EventsError::EventNotFound(_) | EventsError::LocationNotFound(_) => {
                Problem::not_found(error.to_string())
            }
            EventsError::UnknownLocation(_) => Problem::invalid("location.id", error.to_string()),
            EventsError::Store(error) => error.into(),
        }
    }
}

/// A hall in a request. Request bodies are documented in `schema.rs`, from the domain's rules.
#[derive(Debug, Deserialize)]
pub struct HallRequest {
    name: Option<String>,
    location: Option<String>,
    capacity: Option<i64>,
}

/// A location in a request: give `id` to reuse a known location, or the rest to create one.
#[derive(Debug, Deserialize)]
pub struct LocationRequest {
    id: Option<String>,
    name: Option<String>,
    address: Option<String>,
    country: Option<String>,
    opentime: Option<i64>,
    closetime: Option<i64>,
    halls: Option<Vec<HallRequest>>,
}

/// An event in a request. Keys match whatever their case (`startdate`, `StartDate`, ...).
#[derive(Debug, Deserialize)]
pub struct EventRequest {
    name: Option<String>,
    startdate: Option<i64>,
    enddate: Option<i64>,
    duration: Option<i64>,
    location: Option<LocationRequest>,
}

impl From<LocationRequest> for LocationDraft {
    fn from(request: LocationRequest) -> Self {
        LocationDraft {
            name: request.name,
            address: request.address,
            country: request.country,
            open_time: request.opentime,
            close_time: request.closetime,
            halls: request.halls.map(|halls| {
                halls
                    .into_iter()
                    .map(|hall| HallDraft {
                        name: hall.name,
                        location: hall.location,
                        capacity: hall.capacity,
                    })
                    .collect()
            }),
        }
    }
}

impl From<EventRequest> for EventDraft {
    fn from(request: EventRequest) -> Self {
        let location_id = request
            .location
            .as_ref()
            .and_then(|location| location.id.clone());
        EventDraft {
            name: request.name,
            start_date: request.startdate,
            end_date: request.enddate,
            duration: request.duration,
            location_id,
            location: request.location.map(LocationDraft::from),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HallResponse {
    name: String,
    location: String,
    capacity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct LocationResponse {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    address: String,
    country: String,
    open_time: i64,
    close_time: i64,
    halls: Vec<HallResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub struct EventResponse {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    duration: i64,
    start_date: i64,
    end_date: i64,
    location: LocationResponse,
}

impl From<&Location> for LocationResponse {
    fn from(location: &Location) -> Self {
        LocationResponse {
            id: location.id.to_string(),
            name: location.name.clone(),
            address: location.address.clone(),
            country: location.country.clone(),
            open_time: location.open_time,
            close_time: location.close_time,
            halls: location
                .halls
                .iter()
                .map(|hall| HallResponse {
                    name: hall.name.clone(),
                    location: hall.location.clone(),
                    capacity: hall.capacity,
                })
                .collect(),
        }
    }
}

impl From<&Event> for EventResponse {
    fn from(event: &Event) -> Self {
        EventResponse {
            id: event.id.to_string(),
            name: event.name.clone(),
            duration: event.duration,
            start_date: event.start_date,
            end_date: event.end_date,
            location: (&event.location).into(),
        }
    }
}

/// `?limit` (1 to 1000, default 100) and `?offset` (default 0).
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// How many to return.
    #[param(schema_with = page_limit)]
    limit: Option<i64>,
    /// How many of the newest to skip.
    #[param(schema_with = page_offset)]
    offset: Option<i64>,
}

fn page_limit() -> Object {
    integer(1, MAX_PAGE)
        .default(Some(DEFAULT_PAGE.into()))
        .build()
}

fn page_offset() -> Object {
    integer(0, i64::MAX).default(Some(0.into())).build()
}

impl TryFrom<PageQuery> for Page {
    type Error = Problem;

    fn try_from(query: PageQuery) -> Result<Page, Problem> {
        Page::new(query.limit, query.offset)
            .map_err(|invalid| Problem::invalid(invalid.field, invalid.message))
    }
}

fn created(path: String, body: impl Serialize) -> Response {
    (StatusCode::CREATED, [(header::LOCATION, path)], Json(body)).into_response()
}

/// Events, newest first.
#[utoipa::path(get, path = "/events", tag = "events", params(PageQuery),
    responses((status = 200, description = "A page of events.", body = [EventResponse]),
        (status = 400, description = "`limit` or `offset` is not an integer in range.", body = Problem)))]
async fn list_events(
    State(events): State<Events>,
    Query(page): Query<PageQuery>,
) -> Result<Json<Vec<EventResponse>>, Problem> {
    let events = events.events(page.try_into()?).await?;
    Ok(Json(events.iter().map(EventResponse::from).collect()))
}

/// Creates an event, and its location unless `location.id` names a known one.
#[utoipa::path(post, path = "/events", tag = "events", request_body = EventRequest,
    responses((status = 201, description = "Created.", body = EventResponse,
            headers(("location" = String, description = "The event's URL, `/events/{id}`."))),
        (status = 400, description = "The body is not JSON or breaks a rule; `errors` names the field.", body = Problem),
        (status = 413, description = "The body is larger than the limit.", body = Problem)))]
async fn create_event(
    State(events): State<Events>,
    CaseInsensitiveJson(request): CaseInsensitiveJson<EventRequest>,
) -> Result<Response, Problem> {
    let event = events.create_event(request.into()).await?;
    Ok(created(
        format!("/events/{}", event.id),
        EventResponse::from(&event),
    ))
}

/// One event.
#[utoipa::path(get, path = "/events/{id}", tag = "events",
    params(("id" = uuid::Uuid, Path, description = "The event's id.")),
    responses((status = 200, description = "The event.", body = EventResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "No such event.", body = Problem)))]
async fn get_event(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, Problem> {
    Ok(json_response(api.event_json(&id).await?))
}

/// One event (the original's search form).
#[utoipa::path(get, path = "/events/id/{id}", tag = "events",
    params(("id" = uuid::Uuid, Path, description = "The event's id.")),
    responses((status = 200, description = "The event.", body = EventResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "No such event.", body = Problem)))]
async fn get_event_by_id(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    Ok(json_response(api.event_json(&id).await?))
}

fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The newest event with this exact name.
#[utoipa::path(get, path = "/events/name/{name}", tag = "events",
    params(("name" = String, Path, min_length = 1, description = "The event's exact name.")),
    responses((status = 200, description = "The newest event of that name.", body = EventResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "No event has that name.", body = Problem)))]
async fn get_event_by_name(
    State(events): State<Events>,
    Path(name): Path<String>,
) -> Result<Json<EventResponse>, Problem> {
    Ok(Json((&events.event_by_name(&name).await?).into()))
}

/// Locations, newest first.
#[utoipa::path(get, path = "/locations", tag = "events", params(PageQuery),
    responses((status = 200, description = "A page of locations.", body = [LocationResponse]),
        (status = 400, description = "`limit` or `offset` is not an integer in range.", body = Problem)))]
async fn list_locations(
    State(events): State<Events>,
    Query(page): Query<PageQuery>,
) -> Result<Json<Vec<LocationResponse>>, Problem> {
    let locations = events.locations(page.try_into()?).await?;
    Ok(Json(locations.iter().map(LocationResponse::from).collect()))
}

/// Creates a location.
#[utoipa::path(post, path = "/locations", tag = "events", request_body = LocationRequest,
    responses((status = 201, description = "Created.", body = LocationResponse,
            headers(("location" = String, description = "The location's URL, `/locations/{id}`."))),
        (status = 400, description = "The body is not JSON or breaks a rule; `errors` names the field.", body = Problem),
        (status = 413, description = "The body is larger than the limit.", body = Problem)))]
async fn create_location(
    State(events): State<Events>,
    CaseInsensitiveJson(request): CaseInsensitiveJson<LocationRequest>,
) -> Result<Response, Problem> {
    let location = events.create_location(request.into()).await?;
    Ok(created(
        format!("/locations/{}", location.id),
        LocationResponse::from(&location),
    ))
}

/// One location.
#[utoipa::path(get, path = "/locations/{id}", tag = "events",
    params(("id" = uuid::Uuid, Path, description = "The location's id.")),
    responses((status = 200, description = "The location.", body = LocationResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "No such location.", body = Problem)))]
async fn get_location(
    State(events): State<Events>,
    Path(id): Path<String>,
) -> Result<Json<LocationResponse>, Problem> {
    Ok(Json((&events.location(&id).await?).into()))
}
