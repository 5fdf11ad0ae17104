//! The rules of Go, as a pure aggregate: a `Game` decides whether a move is legal and which
//! events it makes (`decide`), and changes only by applying events (`apply`), so replaying
//! a game's events rebuilds it exactly. No IO, no clock, no async.
//!
//! Rules: black moves first and colours alternate; a stone goes on an empty point of the
//! board; opposing groups left without liberties are captured; a move that leaves its own
//! group without liberties (and captures nothing) is suicide and illegal; simple ko: a move
//! may not recreate the position from before the opponent's last move; two passes in a row
//! end the game, scored by area (stones plus territory surrounded by one colour) with komi
//! 6.5 for white; a resignation ends it too.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Board sizes a match may have.
pub const SIZES: [u8; 3] = [9, 13, 19];
/// White's compensation for moving second, in points.
pub const KOMI: f64 = 6.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Black,
    White,
}

impl Color {
    pub fn opponent(self) -> Color {
        match self {
            Color::Black => Color::White,
            Color::White => Color::Black,
        }
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Color::Black => "black",
            Color::White => "white",
        })
    }
}

/// A point of the board; `x` is the column, `y` the row, both from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Point {
    pub x: u8,
    pub y: u8,
}

impl Point {
    pub fn new(x: u8, y: u8) -> Point {
        Point { x, y }
    }
}

/// What a player does on their turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Place(Point),
    Pass,
    Resign,
}

/// What happened in a game: the only way a `Game` changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    StonePlaced {
        color: Color,
        at: Point,
        /// The opposing stones this stone captured.
        captured: Vec<Point>,
    },
    Passed {
        color: Color,
    },
    Resigned {
        color: Color,
    },
    Ended {
        /// None for a draw (impossible with a half-point komi, kept for completeness).
        winner: Option<Color>,
        black: f64,
        white: f64,
    },
}

/// Why a move is refused, in words a player understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Illegal {
    #[error("the game is over")]
    Finished,
    #[error("it is {0}'s turn")]
    NotYourTurn(Color),
    #[error("({x}, {y}) is off the {size}×{size} board", x = .at.x, y = .at.y)]
    OffBoard { at: Point, size: u8 },
    #[error("({x}, {y}) is already taken", x = .0.x, y = .0.y)]
    Occupied(Point),
    #[error("a stone at ({x}, {y}) would have no liberties: suicide is not allowed", x = .0.x, y = .0.y)]
    Suicide(Point),
    #[error("a stone at ({x}, {y}) would retake the ko at once: play elsewhere first", x = .0.x, y = .0.y)]
    Ko(Point),
}

/// Refused at creation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the board size must be 9, 13 or 19, not {0}")]
pub struct BadSize(pub u8);

/// A game's whole state; serializable, so that it can be snapshotted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Game {
    size: u8,
    board: Vec<Option<Color>>,
    /// The board before the last move: a move that recreates it breaks the ko rule.
    before_last_move: Vec<Option<Color>>,
    next: Color,
    /// Moves played, passes and resignations included.
    turn: u32,
    passes_in_a_row: u8,
    captured_by_black: u32,
    captured_by_white: u32,
    outcome: Option<Outcome>,
}

/// How a finished game ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub winner: Option<Color>,
    pub black: f64,
    pub white: f64,
}

impl Game {
    pub fn new(size: u8) -> Result<Game, BadSize> {
        if !SIZES.contains(&size) {
            return Err(BadSize(size));
        }
        let cells = usize::from(size) * usize::from(size);
        Ok(Game {
            size,
            board: vec![None; cells],
            before_last_move: vec![None; cells],
            next: Color::Black,
            turn: 0,
            passes_in_a_row: 0,
            captured_by_black: 0,
            captured_by_white: 0,
            outcome: None,
        })
    }

    pub fn size(&self) -> u8 {
        self.size
    }

    pub fn next(&self) -> Color {
        self.next
    }

    pub fn turn(&self) -> u32 {
        self.turn
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    pub fn at(&self, point: Point) -> Option<Color> {
        self.index(point).and_then(|index| self.board[index])
    }

    /// Stones `color` has captured so far.
    pub fn captures(&self, color: Color) -> u32 {
        match color {
            Color::Black => self.captured_by_black,
            Color::White => self.captured_by_white,
        }
    }

    /// Every point, row by row (`y` outer).
    pub fn points(&self) -> impl Iterator<Item = Point> + '_ {
        (0..self.size).flat_map(move |y| (0..self.size).map(move |x| Point::new(x, y)))
    }

    /// The events `player`'s `play` makes, or why it is illegal. Changes nothing.
    pub fn decide(&self, player: Color, play: Move) -> Result<Vec<Event>, Illegal> {
        if self.outcome.is_some() {
            return Err(Illegal::Finished);
        }
        if player != self.next {
            return Err(Illegal::NotYourTurn(self.next));
        }
        match play {
            Move::Place(at) => self.place(player, at).map(|placed| vec![placed]),
            Move::Pass if self.passes_in_a_row == 1 => {
                let score = self.area_score();
                Ok(vec![
                    Event::Passed { color: player },
                    Event::Ended {
                        winner: score.winner,
                        black: score.black,
                        white: score.white,
                    },
                ])
            }
            Move::Pass => Ok(vec![Event::Passed { color: player }]),
            Move::Resign => Ok(vec![
                Event::Resigned { color: player },
                Event::Ended {
                    winner: Some(player.opponent()),
                    black: f64::from(self.captured_by_black),
                    white: f64::from(self.captured_by_white),
                },
            ]),
        }
    }

    /// Applies an event `decide` made (or one stored): it is not checked again.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::StonePlaced {
                color,
                at,
                captured,
            } => {
                self.before_last_move = self.board.clone();
                if let Some(index) = self.index(*at) {
                    self.board[index] = Some(*color);
                }
                for stone in captured {
                    if let Some(index) = self.index(*stone) {
                        self.board[index] = None;
                    }
                }
                let count = u32::try_from(captured.len()).unwrap_or(u32::MAX);
                match color {
                    Color::Black => self.captured_by_black += count,
                    Color::White => self.captured_by_white += count,
                }
                self.end_turn(*color, 0);
            }
            Event::Passed { color } => {
                self.before_last_move = self.board.clone();
                self.end_turn(*color, self.passes_in_a_row.saturating_add(1));
            }
            Event::Resigned { color } => self.end_turn(*color, 0),
            Event::Ended {
                winner,
                black,
                white,
            } => {
                self.outcome = Some(Outcome {
                    winner: *winner,
                    black: *black,
                    white: *white,
                });
            }
        }
    }

    fn end_turn(&mut self, color: Color, passes_in_a_row: u8) {
        self.next = color.opponent();
        self.turn += 1;
        self.passes_in_a_row = passes_in_a_row;
    }

    fn place(&self, color: Color, at: Point) -> Result<Event, Illegal> {
        let index = self.index(at).ok_or(Illegal::OffBoard {
            at,
            size: self.size,
        })?;
        if self.board[index].is_some() {
            return Err(Illegal::Occupied(at));
        }
        let mut after = self.board.clone();
        after[index] = Some(color);
        let mut captured = Vec::new();
        for neighbour in self.neighbours(at) {
            if after[self.cell(neighbour)] != Some(color.opponent())
                || captured.contains(&neighbour)
            {
                continue;
            }
            let (group, liberties) = self.group(&after, neighbour);
            if liberties == 0 {
                captured.extend(group);
            }
        }
        for stone in &captured {
            after[self.cell(*stone)] = None;
        }
        if captured.is_empty() && self.group(&after, at).1 == 0 {
            return Err(Illegal::Suicide(at));
        }
        if after == self.before_last_move {
            return Err(Illegal::Ko(at));
        }
        captured.sort();
        Ok(Event::StonePlaced {
            color,
            at,
            captured,
        })
    }

    /// The stones of the group at `start` on `board`, and how many liberties it has.
    fn group(&self, board: &[Option<Color>], start: Point) -> (Vec<Point>, usize) {
        let color = board[self.cell(start)];
        let mut stones = vec![start];
        let mut seen = HashSet::from([start]);
        let mut liberties = HashSet::new();
        let mut next = 0;
        while let Some(&stone) = stones.get(next) {
            next += 1;
            for neighbour in self.neighbours(stone) {
                let there = board[self.cell(neighbour)];
                if there.is_none() {
                    liberties.insert(neighbour);
                } else if there == color && seen.insert(neighbour) {
                    stones.push(neighbour);
                }
            }
        }
        (stones, liberties.len())
    }

    /// Stones plus the empty regions that touch only that colour, komi to white.
    fn area_score(&self) -> Outcome {
        let mut black = 0.0;
        let mut white = KOMI;
        let mut counted = HashSet::new();
        for point in self.points() {
            match self.board[self.cell(point)] {
                Some(Color::Black) => black += 1.0,
                Some(Color::White) => white += 1.0,
                None if counted.contains(&point) => {}
                None => {
                    let (region, borders) = self.empty_region(point);
                    let size = region.len() as f64;
                    counted.extend(region);
                    match borders.as_slice() {
                        [Color::Black] => black += size,
                        [Color::White] => white += size,
                        _ => {}
                    }
                }
            }
        }
        let winner = if black > white {
            Some(Color::Black)
        } else if white > black {
            Some(Color::White)
        } else {
            None
        };
        Outcome {
            winner,
            black,
            white,
        }
    }

    /// The empty points connected to `start`, and the colours that border them.
    fn empty_region(&self, start: Point) -> (Vec<Point>, Vec<Color>) {
        let mut region = vec![start];
        let mut seen = HashSet::from([start]);
        let mut borders = Vec::new();
        let mut next = 0;
        while let Some(&point) = region.get(next) {
            next += 1;
            for neighbour in self.neighbours(point) {
                match self.board[self.cell(neighbour)] {
                    None if seen.insert(neighbour) => region.push(neighbour),
                    None => {}
                    Some(color) if !borders.contains(&color) => borders.push(color),
                    Some(_) => {}
                }
            }
        }
        (region, borders)
    }

    fn neighbours(&self, point: Point) -> impl Iterator<Item = Point> {
        let size = self.size;
        let Point { x, y } = point;
        [
            (x.checked_sub(1), Some(y)),
            (x.checked_add(1).filter(|x| *x < size), Some(y)),
            (Some(x), y.checked_sub(1)),
            (Some(x), y.checked_add(1).filter(|y| *y < size)),
        ]
        .into_iter()
        .filter_map(|(x, y)| Some(Point::new(x?, y?)))
    }

    fn index(&self, point: Point) -> Option<usize> {
        (point.x < self.size && point.y < self.size).then(|| self.cell(point))
    }

    /// The index of a point known to be on the board.
    fn cell(&self, point: Point) -> usize {
        usize::from(point.y) * usize::from(self.size) + usize::from(point.x)
    }
}

#[cfg(test)]
pub(crate) mod tests;
