//! The query side: a projection of `matches.events` into the documents the GETs serve
//! as they are stored (a match with its board, a summary, each move), and the reads.
//!
//! The projection is a consumer group: its offsets are its checkpoint, and its updates
//! commit with its inbox marks and the version it applied of each match's stream, so after
//! a crash or a restart it resumes where it stopped and applies each event exactly once.
//! `conveyor projections rebuild matches-query.views` rebuilds it from the event store.

use crate::api::{Change, MatchEvent};
use crate::app::Started;
use crate::domain::{Color, Point};
use platform::projection::{Projected, Tables};
use platform::sql::{Conn, Error, ToValue};
use platform::{HandlerError, Migration, Projection};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The projection, named as its consumer group.
pub const PROJECTION: &str = "matches-query.views";
const VIEWS: &str = "matches_query_views";
const MOVES: &str = "matches_query_moves";

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "matches-query",
    version: 1,
    sqlite: "CREATE TABLE matches_query_views (
            id      TEXT PRIMARY KEY,
            status  TEXT NOT NULL,
            view    TEXT NOT NULL,
            summary TEXT NOT NULL
          ) WITHOUT ROWID;
          CREATE INDEX matches_query_views_status ON matches_query_views (status, id);
          CREATE TABLE matches_query_moves (
            match_id TEXT NOT NULL,
            turn     INTEGER NOT NULL,
            body     TEXT NOT NULL,
            PRIMARY KEY (match_id, turn)
          ) WITHOUT ROWID;",
    postgres: "CREATE TABLE matches_query_views (
            id      TEXT PRIMARY KEY,
            status  TEXT NOT NULL,
            view    TEXT NOT NULL,
            summary TEXT NOT NULL
          );
          CREATE INDEX matches_query_views_status ON matches_query_views (status, id);
          CREATE TABLE matches_query_moves (
            match_id TEXT NOT NULL,
            turn     BIGINT NOT NULL,
            body     TEXT NOT NULL,
            PRIMARY KEY (match_id, turn)
          );",
    mysql: "CREATE TABLE IF NOT EXISTS matches_query_views (
            id      VARCHAR(36) PRIMARY KEY,
            status  VARCHAR(16) NOT NULL,
            view    MEDIUMTEXT NOT NULL,
            summary TEXT NOT NULL,
            KEY matches_query_views_status (status, id)
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
          CREATE TABLE IF NOT EXISTS matches_query_moves (
            match_id VARCHAR(36) NOT NULL,
            turn     BIGINT NOT NULL,
            body     TEXT NOT NULL,
            PRIMARY KEY (match_id, turn)
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;",
}];

/// A match as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MatchView {
    pub id: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub gridsize: u8,
    /// Moves played (passes and resignations too).
    pub turn: u32,
    /// Whose move it is; null once the match is over.
    #[schema(value_type = Option<String>, example = "black")]
    pub next: Option<Color>,
    /// `active` or `finished`.
    pub status: String,
    #[schema(value_type = Option<String>, example = "white")]
    pub winner: Option<Color>,
    /// Black, then white.
    pub players: Vec<PlayerView>,
    /// `gameboard[y][x]`: 0 empty, 1 black, 2 white. Not in the list's summaries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gameboard: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlayerView {
    #[schema(value_type = String, example = "black")]
    pub color: Color,
    pub name: String,
    /// Stones captured so far; the area score (komi to white) once the match is over.
    pub score: f64,
}

/// One move, as `GET /matches/{id}/moves` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MoveView {
    /// 1 for the first move.
    pub turn: u32,
    #[schema(value_type = String, example = "black")]
    pub player: Color,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, example = json!({"x": 3, "y": 4}))]
    pub position: Option<Point>,
    /// The stones it captured, as `[x, y]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured: Option<Vec<[u8; 2]>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pass: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resign: bool,
}

const ACTIVE: &str = "active";
const FINISHED: &str = "finished";

fn stone(color: Option<Color>) -> u8 {
    match color {
        None => 0,
        Some(Color::Black) => 1,
        Some(Color::White) => 2,
    }
}

impl MatchView {
    /// A match just started: an empty board, black to move.
    fn started(id: &str, gridsize: u8, black: &str, white: &str, started_at: i64) -> MatchView {
        let size = usize::from(gridsize);
        MatchView {
            id: id.to_owned(),
            started_at: edge::json::timestamp(started_at),
            gridsize,
            turn: 0,
            next: Some(Color::Black),
            status: ACTIVE.to_owned(),
            winner: None,
            players: vec![
                PlayerView {
                    color: Color::Black,
                    name: black.to_owned(),
                    score: 0.0,
                },
                PlayerView {
                    color: Color::White,
                    name: white.to_owned(),
                    score: 0.0,
                },
            ],
            gameboard: vec![vec![0; size]; size],
        }
    }

    /// The command side's view of a match it just changed: the same document the
    /// projection makes from the match's events.
    pub fn of(started: &Started) -> MatchView {
        let game = &started.game;
        let mut view = MatchView::started(
            &started.id,
            game.size(),
            &started.black,
            &started.white,
            started.started_at,
        );
        view.turn = game.turn();
        for point in game.points() {
            view.gameboard[usize::from(point.y)][usize::from(point.x)] = stone(game.at(point));
        }
        for player in &mut view.players {
            player.score = f64::from(game.captures(player.color));
        }
        match game.outcome() {
            None => view.next = Some(game.next()),
            Some(outcome) => view.end(outcome.winner, outcome.black, outcome.white),
        }
        view
    }

    fn end(&mut self, winner: Option<Color>, black: f64, white: f64) {
        self.status = FINISHED.to_owned();
        self.next = None;
        self.winner = winner;
        for player in &mut self.players {
            player.score = match player.color {
                Color::Black => black,
                Color::White => white,
            };
        }
    }

    /// This view after `change` (any change but the start).
    fn apply(&mut self, change: &Change) {
        match change {
            Change::MatchStarted { .. } => {}
            Change::StonePlaced {
                color,
                x,
                y,
                captured,
            } => {
                self.set(*x, *y, stone(Some(*color)));
                for [x, y] in captured {
                    self.set(*x, *y, 0);
                }
                if let Some(player) = self.players.iter_mut().find(|p| p.color == *color) {
                    player.score += captured.len() as f64;
                }
                self.moved(*color);
            }
            Change::Passed { color } | Change::Resigned { color } => self.moved(*color),
            Change::MatchEnded { winner, scores } => self.end(*winner, scores.black, scores.white),
        }
    }

    fn set(&mut self, x: u8, y: u8, value: u8) {
        if let Some(cell) = self
            .gameboard
            .get_mut(usize::from(y))
            .and_then(|row| row.get_mut(usize::from(x)))
        {
            *cell = value;
        }
    }

    fn moved(&mut self, color: Color) {
        self.turn += 1;
        self.next = Some(color.opponent());
    }

    fn summary(&self) -> MatchView {
        MatchView {
            gameboard: Vec::new(),
            ..self.clone()
        }
    }
}

impl MoveView {
    /// The move `change` records as turn `turn`, if it is one.
    fn of(turn: u32, change: &Change) -> Option<MoveView> {
        let (player, position, captured, pass, resign) = match change {
            Change::StonePlaced {
                color,
                x,
                y,
                captured,
            } => (
                *color,
                Some(Point::new(*x, *y)),
                Some(captured.clone()),
                false,
                false,
            ),
            Change::Passed { color } => (*color, None, None, true, false),
            Change::Resigned { color } => (*color, None, None, false, true),
            Change::MatchStarted { .. } | Change::MatchEnded { .. } => return None,
        };
        Some(MoveView {
            turn,
            player,
            position,
            captured,
            pass,
            resign,
        })
    }
}

pub fn projection() -> Projection {
    Projection::new(PROJECTION, &[VIEWS, MOVES], project)
}

/// Each match's events in `events` change its view once: read, applied in order, written.
fn project(
    tables: &Tables,
    conn: &Conn,
    events: &[Projected<MatchEvent>],
) -> Result<(), HandlerError> {
    let (views, moves) = (tables.name(VIEWS), tables.name(MOVES));
    let mut by_match: Vec<(&str, Vec<&Projected<MatchEvent>>)> = Vec::new();
    for projected in events {
        let match_id = projected.event.match_id.as_str();
        match by_match.iter_mut().find(|(id, _)| *id == match_id) {
            Some((_, changes)) => changes.push(projected),
            None => by_match.push((match_id, vec![projected])),
        }
    }
    for (match_id, changes) in by_match {
        let mut view = match &changes[0].event.change {
            Change::MatchStarted { .. } => None,
            _ => view(conn, &views, match_id)?,
        };
        let mut played = Vec::new();
        for projected in changes {
            match (&projected.event.change, &mut view) {
                (
                    Change::MatchStarted {
                        gridsize,
                        black,
                        white,
                        started_at,
                    },
                    _,
                ) => {
                    view = Some(MatchView::started(
                        match_id,
                        *gridsize,
                        black,
                        white,
                        *started_at,
                    ));
                }
                (change, Some(view)) => {
                    view.apply(change);
                    played.extend(MoveView::of(view.turn, change));
                }
                (_, None) => {
                    // A stream starts with its MatchStarted: this one is broken upstream.
                    return Err(HandlerError::permanent(format!(
                        "version {} of {} precedes its match's start",
                        projected.version, projected.stream
                    )));
                }
            }
        }
        if let Some(view) = view {
            write(conn, &views, &moves, &view, &played)?;
        }
    }
    Ok(())
}

fn write(
    conn: &Conn,
    views: &str,
    moves: &str,
    view: &MatchView,
    played: &[MoveView],
) -> Result<(), HandlerError> {
    if !played.is_empty() {
        let bodies = played.iter().map(json).collect::<Result<Vec<_>, _>>()?;
        let turns: Vec<i64> = played.iter().map(|m| i64::from(m.turn)).collect();
        let mut values: Vec<&dyn ToValue> = Vec::with_capacity(played.len() * 3);
        for (turn, body) in turns.iter().zip(&bodies) {
            values.extend([&view.id as &dyn ToValue, turn, body]);
        }
        let rows = vec!["(?, ?, ?)"; played.len()].join(", ");
        conn.execute(
            &format!(
                "INSERT INTO {moves} (match_id, turn, body) VALUES {rows} \
                 ON CONFLICT (match_id, turn) DO NOTHING"
            ),
            values.as_slice(),
        )?;
    }
    conn.execute(
        &format!(
            "INSERT INTO {views} (id, status, view, summary) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, view = excluded.view, \
             summary = excluded.summary"
        ),
        (&view.id, &view.status, json(view)?, json(&view.summary())?),
    )?;
    Ok(())
}

fn json(value: &impl Serialize) -> Result<String, HandlerError> {
    serde_json::to_string(value).map_err(HandlerError::permanent)
}

fn view(conn: &Conn, views: &str, match_id: &str) -> Result<Option<MatchView>, HandlerError> {
    let body: Option<String> = conn.query_opt(
        &format!("SELECT view FROM {views} WHERE id = ?"),
        [match_id],
        |row| row.get(0),
    )?;
    let Some(body) = body else {
        return Ok(None);
    };
    serde_json::from_str(&body)
        .map(Some)
        .map_err(|error| HandlerError::permanent(format!("match {match_id}'s view: {error}")))
}

/// A match's view, as its JSON.
pub fn document(conn: &Conn, match_id: &str) -> Result<Option<String>, Error> {
    conn.query_opt(
        "SELECT view FROM matches_query_views WHERE id = ?",
        [match_id],
        |row| row.get(0),
    )
}

/// Which matches `GET /matches` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Finished,
}

/// The newest `limit` matches' summaries (of one status, if given), as JSON, newest first.
pub fn summaries(conn: &Conn, status: Option<Status>, limit: u16) -> Result<Vec<String>, Error> {
    let limit = i64::from(limit);
    match status {
        None => conn.query_map(
            "SELECT summary FROM matches_query_views ORDER BY id DESC LIMIT ?",
            (limit,),
            |row| row.get(0),
        ),
        Some(status) => conn.query_map(
            "SELECT summary FROM matches_query_views WHERE status = ? ORDER BY id DESC LIMIT ?",
            (
                match status {
                    Status::Active => ACTIVE,
                    Status::Finished => FINISHED,
                },
                limit,
            ),
            |row| row.get(0),
        ),
    }
}

/// A match's moves in order, as JSON.
pub fn moves(conn: &Conn, match_id: &str) -> Result<Vec<String>, Error> {
    conn.query_map(
        "SELECT body FROM matches_query_moves WHERE match_id = ? ORDER BY turn",
        [match_id],
        |row| row.get(0),
    )
}

#[cfg(test)]
mod tests;
