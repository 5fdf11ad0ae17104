//! The matches REST API: the command side's `POST /matches` and `POST /matches/{id}/moves`,
//! and the query side's GETs, each served by its own service so that they can run in
//! separate processes.

mod schema;

use crate::app::{self, Command, Matches, MatchesError, Refused, MAX_NAME_CHARS};
use crate::domain::{Color, Illegal, Move, Point, SIZES};
use crate::views::{self, MatchView, MoveView, Status};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use edge::{CaseInsensitiveJson, Path, Problem, Query};
use http::{header, HeaderValue, StatusCode};
use platform::event_store::EventStoreError;
use platform::{Database, StoreError};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The largest coordinate of the largest board.
const MAX_COORDINATE: u8 = 18;
const DEFAULT_LIST: u16 = 100;
/// The longest a GET of one match waits for the projection to apply what the event store
/// holds of it (usually a few milliseconds), before it serves what it has.
const READ_YOUR_WRITES: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_LIST: u16 = 1000;

pub fn command_routes(matches: Matches) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(play))
        .with_state(matches)
}

pub fn query_routes(db: Database) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(get))
        .routes(routes!(moves))
        .with_state(db)
}

impl From<MatchesError> for Problem {
    fn from(error: MatchesError) -> Self {
        match error {
            MatchesError::Refused(Refused::NoMatch) => Problem::not_found("no such match"),
            MatchesError::Refused(Refused::Started) | MatchesError::Conflict => {
                Problem::conflict(error.to_string())
            }
            MatchesError::Refused(Refused::BadSize(bad)) => {
                Problem::invalid("gridsize", bad.to_string())
            }
            MatchesError::Refused(Refused::Illegal(illegal)) => match illegal {
                Illegal::Finished => Problem::bad_request(format!("illegal move: {illegal}")),
                Illegal::NotYourTurn(_) => Problem::invalid("player", illegal.to_string()),
                Illegal::OffBoard { .. }
                | Illegal::Occupied(_)
                | Illegal::Suicide(_)
                | Illegal::Ko(_) => Problem::invalid("position", illegal.to_string()),
            },
            MatchesError::Store(EventStoreError::Store(error)) => error.into(),
            MatchesError::Store(error) => Problem::internal(error),
        }
    }
}

/// `{"gridsize": 19, "players": [{"color": "white", "name": "bob"}, {"color": "black", "name": "alfred"}]}`,
/// or the original's `{"gridsize": 19, "playerWhite": "bob", "playerBlack": "alfred"}`.
#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    gridsize: Option<i64>,
    players: Option<Vec<PlayerRequest>>,
    #[serde(rename = "playerwhite")]
    player_white: Option<String>,
    #[serde(rename = "playerblack")]
    player_black: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PlayerRequest {
    /// `black` or `white`.
    color: String,
    name: String,
}

impl CreateRequest {
    /// The start of match `match_id` this asks for, or the first field that is wrong.
    fn into_command(self, match_id: String) -> Result<Command, Problem> {
        let gridsize = self
            .gridsize
            .ok_or_else(|| Problem::invalid("gridsize", "required: 9, 13 or 19"))?;
        let gridsize = u8::try_from(gridsize)
            .ok()
            .filter(|size| SIZES.contains(size))
            .ok_or_else(|| {
                Problem::invalid("gridsize", format!("must be 9, 13 or 19, not {gridsize}"))
            })?;
        // With `players`, the original's keys are ignored.
        let (black, white) = match (self.players, self.player_black, self.player_white) {
            (Some(players), _, _) => names_by_color(players)?,
            (None, Some(black), Some(white)) => (
                player_name("playerBlack", black)?,
                player_name("playerWhite", white)?,
            ),
            _ => {
                return Err(Problem::invalid(
                    "players",
                    "required: a black and a white player, as `players` \
                     (or as `playerBlack` and `playerWhite`)",
                ))
            }
        };
        Ok(Command::Start {
            match_id,
            gridsize,
            black,
            white,
            started_at: platform::envelope::now_millis(),
        })
    }
}

fn names_by_color(players: Vec<PlayerRequest>) -> Result<(String, String), Problem> {
    let (mut black, mut white) = (None, None);
    if players.len() != 2 {
        return Err(Problem::invalid(
            "players",
            format!(
                "must hold exactly one black and one white player, not {} players",
                players.len()
            ),
        ));
    }
    for (index, player) in players.into_iter().enumerate() {
        let slot = match player.color.as_str() {
            "black" => &mut black,
            "white" => &mut white,
            other => {
                return Err(Problem::invalid(
                    format!("players[{index}].color"),
                    format!("must be `black` or `white`, not {other:?}"),
                ))
            }
        };
        if slot.is_some() {
            return Err(Problem::invalid(
                format!("players[{index}].color"),
                format!("there is already a {} player", player.color),
            ));
        }
        *slot = Some(player_name(&format!("players[{index}].name"), player.name)?);
    }
    black
        .zip(white)
        .ok_or_else(|| Problem::invalid("players", "must hold one black and one white player"))
}

fn player_name(field: &str, name: String) -> Result<String, Problem> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Problem::invalid(field, "must not be blank"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Problem::invalid(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    Ok(name.to_owned())
}

/// `{"player": "black", "position": {"x": 3, "y": 4}}`, `{"player": "white", "pass": true}`
/// or `{"player": "black", "resign": true}`.
#[derive(Debug, Deserialize)]
pub struct MoveRequest {
    player: Option<String>,
    position: Option<PositionRequest>,
    pass: Option<bool>,
    resign: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct PositionRequest {
    x: i64,
    y: i64,
}

impl MoveRequest {
    fn into_command(self) -> Result<Command, Problem> {
        let player = match self.player.as_deref() {
            Some("black") => Color::Black,
            Some("white") => Color::White,
            Some(other) => {
                return Err(Problem::invalid(
                    "player",
                    format!("must be `black` or `white`, not {other:?}"),
                ))
            }
            None => return Err(Problem::invalid("player", "required: `black` or `white`")),
        };
        let chosen = |flag: Option<bool>| flag.unwrap_or_default();
        let play = match (self.position, chosen(self.pass), chosen(self.resign)) {
            (Some(position), false, false) => Move::Place(point(position)?),
            (None, true, false) => Move::Pass,
            (None, false, true) => Move::Resign,
            _ => {
                return Err(Problem::invalid(
                    "position",
                    "give exactly one of a `position`, `\"pass\": true` or `\"resign\": true`",
                ))
            }
        };
        Ok(Command::Play { player, play })
    }
}

/// A point on no board at all (negative, or past the largest) is refused here; one that
/// is off this match's board is the rules' to refuse.
fn point(position: PositionRequest) -> Result<Point, Problem> {
    let coordinate = |field: &str, value: i64| {
        u8::try_from(value)
            .ok()
            .filter(|value| *value <= MAX_COORDINATE)
            .ok_or_else(|| {
                Problem::invalid(
                    format!("position.{field}"),
                    format!("{value} is off every board (0 to {MAX_COORDINATE})"),
                )
            })
    };
    Ok(Point::new(
        coordinate("x", position.x)?,
        coordinate("y", position.y)?,
    ))
}

fn created(view: &MatchView) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/matches/{}", view.id))],
        Json(view),
    )
        .into_response()
}

/// Starts a match; black moves first.
#[utoipa::path(post, path = "/matches", tag = "matches", request_body = CreateRequest,
    responses((status = 201, description = "The match, with an empty board.", body = MatchView,
            headers(("location" = String, description = "`/matches/{id}`."))),
        (status = 400, description = "A field is missing or wrong; the problem names it.", body = Problem)))]
async fn create(
    State(matches): State<Matches>,
    CaseInsensitiveJson(request): CaseInsensitiveJson<CreateRequest>,
) -> Result<Response, Problem> {
    let match_id = app::new_id();
    let command = request.into_command(match_id.clone())?;
    let started = matches.execute(match_id, command).await?;
    Ok(created(&MatchView::of(&started)))
}

/// Plays a move: places a stone, passes or resigns.
#[utoipa::path(post, path = "/matches/{id}/moves", tag = "matches", request_body = MoveRequest,
    params(("id" = uuid::Uuid, Path, description = "The match.")),
    responses((status = 201, description = "The match after the move.", body = MatchView),
        (status = 400, description = "The move is illegal (the problem says why) or malformed.", body = Problem),
        (status = 404, description = "No such match.", body = Problem),
        (status = 409, description = "Another move was played at the same time and won.", body = Problem)))]
async fn play(
    State(matches): State<Matches>,
    Path(id): Path<String>,
    CaseInsensitiveJson(request): CaseInsensitiveJson<MoveRequest>,
) -> Result<Response, Problem> {
    let id = known_id(&id)?;
    let command = request.into_command()?;
    let started = matches.execute(id, command).await?;
    let view = MatchView::of(&started);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Waits (briefly) for the query side to have applied every stored event of the match, so
/// that a GET after a 201 shows what that command did.
async fn caught_up(db: &Database, id: &str) -> Result<(), Problem> {
    views::projection()
        .caught_up(db, &app::stream(id), READ_YOUR_WRITES)
        .await?;
    Ok(())
}

/// Only a UUID can name a match: anything else is unknown without asking the database.
fn known_id(id: &str) -> Result<String, Problem> {
    uuid::Uuid::parse_str(id)
        .map(|id| id.to_string())
        .map_err(|_| Problem::not_found("no such match"))
}

/// Paging and filter of `GET /matches`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only active or only finished matches.
    #[param(inline)]
    status: Option<Status>,
    /// How many (default 100, at most 1000), newest first.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

fn json_body(body: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The matches, newest first, without their boards.
#[utoipa::path(get, path = "/matches", tag = "matches", params(ListQuery),
    responses((status = 200, description = "Match summaries, newest first.", body = Vec<MatchView>),
        (status = 400, description = "`status` or `limit` is not one the API knows.", body = Problem)))]
async fn list(
    State(db): State<Database>,
    Query(query): Query<ListQuery>,
) -> Result<Response, Problem> {
    let limit = match query.limit {
        None => DEFAULT_LIST,
        Some(limit) => u16::try_from(limit)
            .ok()
            .filter(|limit| (1..=MAX_LIST).contains(limit))
            .ok_or_else(|| {
                Problem::invalid(
                    "limit",
                    format!("must be from 1 to {MAX_LIST}, not {limit}"),
                )
            })?,
    };
    let status = query.status;
    let summaries = db
        .read(move |conn| Ok::<_, StoreError>(views::summaries(conn, status, limit)?))
        .await?;
    Ok(json_body(format!("[{}]", summaries.join(","))))
}

/// A match with its board, from the query side, once it has applied every move stored.
#[utoipa::path(get, path = "/matches/{id}", tag = "matches",
    params(("id" = uuid::Uuid, Path, description = "The match.")),
    responses((status = 200, description = "The match.", body = MatchView),
        (status = 404, description = "No such match (or not projected yet).", body = Problem)))]
async fn get(State(db): State<Database>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = known_id(&id)?;
    caught_up(&db, &id).await?;
    let view = db
        .read(move |conn| Ok::<_, StoreError>(views::document(conn, &id)?))
        .await?
        .ok_or_else(|| Problem::not_found("no such match"))?;
    Ok(json_body(view))
}

/// A match's moves, in order.
#[utoipa::path(get, path = "/matches/{id}/moves", tag = "matches",
    params(("id" = uuid::Uuid, Path, description = "The match.")),
    responses((status = 200, description = "The moves, first first.", body = Vec<MoveView>),
        (status = 404, description = "No such match (or not projected yet).", body = Problem)))]
async fn moves(State(db): State<Database>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = known_id(&id)?;
    caught_up(&db, &id).await?;
    let (exists, moves) = db
        .read(move |conn| {
            conn.snapshot(|snapshot| {
                let exists = views::document(snapshot, &id)?.is_some();
                Ok::<_, StoreError>((exists, views::moves(snapshot, &id)?))
            })
        })
        .await?;
    if !exists {
        return Err(Problem::not_found("no such match"));
    }
    Ok(json_body(format!("[{}]", moves.join(","))))
}
