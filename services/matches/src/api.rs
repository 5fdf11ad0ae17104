//! The matches service's events as stored in each match's stream and published on
//! `matches.events`: `matches.MatchStarted`, `matches.StonePlaced`, `matches.Passed`,
//! `matches.Resigned`, `matches.MatchEnded`. This is the contract the query side (and any
//! other consumer) reads; the domain's own `Event` stays free of it.

use crate::domain::{self, Color, Point};
use platform::Message;
use serde::{Deserialize, Serialize};

/// Something that happened in match `match_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchEvent {
    pub match_id: String,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Change {
    MatchStarted {
        gridsize: u8,
        black: String,
        white: String,
        /// Unix milliseconds.
        started_at: i64,
    },
    StonePlaced {
        color: Color,
        x: u8,
        y: u8,
        /// The opposing stones it captured, as `[x, y]`.
        captured: Vec<[u8; 2]>,
    },
    Passed {
        color: Color,
    },
    Resigned {
        color: Color,
    },
    MatchEnded {
        /// None for a draw.
        winner: Option<Color>,
        scores: Scores,
    },
}

/// Final area scores, komi included.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub black: f64,
    pub white: f64,
}

const STARTED: &str = "matches.MatchStarted";
const PLACED: &str = "matches.StonePlaced";
const PASSED: &str = "matches.Passed";
const RESIGNED: &str = "matches.Resigned";
const ENDED: &str = "matches.MatchEnded";

impl Message for MatchEvent {
    const NAME: &'static str = "matches.MatchEvent";
    const TOPIC: &'static str = "matches.events";
    const NAMES: &'static [&'static str] = &[STARTED, PLACED, PASSED, RESIGNED, ENDED];

    fn key(&self) -> String {
        self.match_id.clone()
    }

    fn name(&self) -> &'static str {
        match self.change {
            Change::MatchStarted { .. } => STARTED,
            Change::StonePlaced { .. } => PLACED,
            Change::Passed { .. } => PASSED,
            Change::Resigned { .. } => RESIGNED,
            Change::MatchEnded { .. } => ENDED,
        }
    }
}

impl From<&domain::Event> for Change {
    fn from(event: &domain::Event) -> Self {
        match event {
            domain::Event::StonePlaced {
                color,
                at,
                captured,
            } => Change::StonePlaced {
                color: *color,
                x: at.x,
                y: at.y,
                captured: captured.iter().map(|stone| [stone.x, stone.y]).collect(),
            },
            domain::Event::Passed { color } => Change::Passed { color: *color },
            domain::Event::Resigned { color } => Change::Resigned { color: *color },
            domain::Event::Ended {
                winner,
                black,
                white,
            } => Change::MatchEnded {
                winner: *winner,
                scores: Scores {
                    black: *black,
                    white: *white,
                },
            },
        }
    }
}

impl Change {
    /// The move or ending as the rules know it; None for the start, which the rules do not
    /// record (it makes the game).
    pub fn to_domain(&self) -> Option<domain::Event> {
        Some(match self {
            Change::MatchStarted { .. } => return None,
            Change::StonePlaced {
                color,
                x,
                y,
                captured,
            } => domain::Event::StonePlaced {
                color: *color,
                at: Point::new(*x, *y),
                captured: captured.iter().map(|[x, y]| Point::new(*x, *y)).collect(),
            },
            Change::Passed { color } => domain::Event::Passed { color: *color },
            Change::Resigned { color } => domain::Event::Resigned { color: *color },
            Change::MatchEnded { winner, scores } => domain::Event::Ended {
                winner: *winner,
                black: scores.black,
                white: scores.white,
            },
        })
    }
}
