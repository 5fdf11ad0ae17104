//! The notes REST API: the original's routes (`POST /save`, `GET /`), plus `GET /notes/{id}`.

use crate::app::{Notes, NotesError};
use crate::domain::{self, Note, NoteId, Page, MAX_CONTENT_CHARS};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use cache::Lookup;
use edge::schema::not_blank;
use edge::{AnyJson, Path, Problem, Query};
use http::{header, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What a refused save is told to wait, in seconds.
const RETRY_AFTER_SECONDS: &str = "1";

pub fn routes(notes: Notes) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(save))
        .routes(routes!(list))
        .routes(routes!(get))
        .with_state(notes)
}

impl From<NotesError> for Problem {
    fn from(error: NotesError) -> Self {
        match error {
            NotesError::Invalid(invalid) => Problem::invalid(invalid.field, invalid.message),
            NotesError::QueueFull { .. } => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
            NotesError::Store(error) => error.into(),
        }
    }
}

/// `{"content": "…"}`, with any Content-Type or none.
#[derive(Debug, Deserialize)]
pub struct SaveRequest {
    content: Option<String>,
}

impl PartialSchema for SaveRequest {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some("A note. Any Content-Type is accepted, or none."))
            .property("content", not_blank(MAX_CONTENT_CHARS))
            .required("content")
            .into()
    }
}

impl ToSchema for SaveRequest {}

#[derive(Debug, Serialize, ToSchema)]
pub struct Saved {
    /// The note's id; `GET /notes/{id}` finds it once a worker has written it.
    id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NoteResponse {
    id: String,
    content: String,
    /// When the note was accepted (RFC 3339, UTC).
    created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotesPage {
    /// Newest first.
    results: Vec<NoteResponse>,
}

impl From<Note> for NoteResponse {
    fn from(note: Note) -> Self {
        NoteResponse {
            id: note.id.to_string(),
            content: note.content,
            created_at: edge::json::timestamp(note.created_at),
        }
    }
}

/// Paging of `GET /`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// How many notes (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only notes older than this one (the last id of the previous page).
    #[param(format = Uuid)]
    before: Option<String>,
}

/// Queues a note for writing; 202 once the queue holds it durably.
#[utoipa::path(post, path = "/save", tag = "notes", request_body = SaveRequest,
    responses((status = 202, description = "Queued: a worker writes it shortly.", body = Saved,
            headers(("location" = String, description = "`/notes/{id}`, found once written."))),
        (status = 400, description = "The body is not JSON, or `content` is missing, blank or too long.", body = Problem),
        (status = 413, description = "The body is larger than the limit.", body = Problem),
        (status = 503, description = "The queue is over its limit; try again after `Retry-After` seconds.", body = Problem,
            headers(("retry-after" = String, description = "Seconds to wait.")))))]
async fn save(
    State(notes): State<Notes>,
    AnyJson(request): AnyJson<SaveRequest>,
) -> Result<Response, Response> {
    let refused = |error: NotesError| {
        let full = matches!(error, NotesError::QueueFull { .. });
        let mut response = Problem::from(error).into_response();
        if full {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    };
    let content = domain::content(request.content).map_err(|error| refused(error.into()))?;
    let id = notes.save(content).await.map_err(refused)?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/notes/{id}"))],
        Json(Saved { id: id.to_string() }),
    )
        .into_response())
}

/// The notes written so far, newest first, through the cache.
#[utoipa::path(get, path = "/", tag = "notes", params(ListQuery),
    responses((status = 200, description = "A page of notes, newest first.", body = NotesPage),
        (status = 400, description = "`limit` is not from 1 to 1000, or `before` is not a note id.", body = Problem)))]
async fn list(
    State(notes): State<Notes>,
    Query(query): Query<ListQuery>,
) -> Result<Response, Problem> {
    let page = Page::new(query.limit, query.before.as_deref())
        .map_err(|error| Problem::from(NotesError::from(error)))?;
    let key = format!(
        "list:{}:{}",
        page.limit,
        page.before.map(|id| id.to_string()).unwrap_or_default()
    );
    let body = match notes.cache().get(&key).await {
        Lookup::Hit(body) => body,
        Lookup::Miss(ticket) => {
            let results = notes.list(page).await?;
            let page = NotesPage {
                results: results.into_iter().map(NoteResponse::from).collect(),
            };
            let body = Bytes::from(serde_json::to_vec(&page).map_err(Problem::internal)?);
            notes.cache().put(ticket, &key, body.clone()).await;
            body
        }
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// One note, once a worker has written it.
#[utoipa::path(get, path = "/notes/{id}", tag = "notes",
    params(("id" = uuid::Uuid, Path, description = "The note's id, as `POST /save` gave it.")),
    responses((status = 200, description = "The note.", body = NoteResponse),
        (status = 400, description = "The path is not UTF-8 once decoded.", body = Problem),
        (status = 404, description = "No such note, or not written yet.", body = Problem)))]
async fn get(
    State(notes): State<Notes>,
    Path(id): Path<String>,
) -> Result<Json<NoteResponse>, Problem> {
    let unknown = || {
        Problem::not_found(format!(
            "no note {id} (yet: notes are written shortly after they are saved)"
        ))
    };
    let note_id = NoteId::parse(&id).ok_or_else(unknown)?;
    let note = notes.get(note_id).await?.ok_or_else(unknown)?;
    Ok(Json(note.into()))
}
