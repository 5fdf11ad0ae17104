//! The command side: a match is an aggregate whose stream (`match-<id>`) holds its events;
//! starting one and playing a move each load it, decide with the rules and append what
//! they decided, which publishes it to the query side in the same transaction.

use crate::api::{Change, MatchEvent};
use crate::domain::{BadSize, Color, Game, Illegal, Move};
use platform::aggregate::{self, Aggregate, Cache, ExecuteError, Executed, Loaded};
use platform::event_store::EventStoreError;
use platform::{uuid, Database, Snapshots, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Longest player name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// A match as its stream tells it: nothing before `MatchStarted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Match(Option<Started>);

impl Match {
    /// The match, once it has started.
    pub fn started(&self) -> Option<&Started> {
        self.0.as_ref()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub id: String,
    /// Unix milliseconds.
    pub started_at: i64,
    pub black: String,
    pub white: String,
    pub game: Game,
}

#[derive(Debug, Clone)]
pub enum Command {
    Start {
        match_id: String,
        gridsize: u8,
        black: String,
        white: String,
        started_at: i64,
    },
    Play {
        player: Color,
        play: Move,
    },
}

/// Why a match refused a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("no such match")]
    NoMatch,
    #[error("the match has started already")]
    Started,
    #[error(transparent)]
    BadSize(#[from] BadSize),
    #[error(transparent)]
    Illegal(#[from] Illegal),
}

impl Aggregate for Match {
    type Event = MatchEvent;
    type Command = Command;
    type Error = Refused;

    fn decide(&self, command: &Command) -> Result<Vec<MatchEvent>, Refused> {
        match (command, &self.0) {
            (
                Command::Start {
                    match_id,
                    gridsize,
                    black,
                    white,
                    started_at,
                },
                None,
            ) => {
                Game::new(*gridsize)?;
                Ok(vec![MatchEvent {
                    match_id: match_id.clone(),
                    change: Change::MatchStarted {
                        gridsize: *gridsize,
                        black: black.clone(),
                        white: white.clone(),
                        started_at: *started_at,
                    },
                }])
            }
            (Command::Start { .. }, Some(_)) => Err(Refused::Started),
            (Command::Play { .. }, None) => Err(Refused::NoMatch),
            (Command::Play { player, play }, Some(started)) => Ok(started
                .game
                .decide(*player, *play)?
                .iter()
                .map(|event| MatchEvent {
                    match_id: started.id.clone(),
                    change: Change::from(event),
                })
                .collect()),
        }
    }

    fn apply(&mut self, event: &MatchEvent) {
        match (&event.change, &mut self.0) {
            (
                Change::MatchStarted {
                    gridsize,
                    black,
                    white,
                    started_at,
                },
                None,
            ) => {
                if let Ok(game) = Game::new(*gridsize) {
                    self.0 = Some(Started {
                        id: event.match_id.clone(),
                        started_at: *started_at,
                        black: black.clone(),
                        white: white.clone(),
                        game,
                    });
                }
            }
            (change, Some(started)) => {
                if let Some(event) = change.to_domain() {
                    started.game.apply(&event);
                }
            }
            (_, None) => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MatchesError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("another move was played first; load the match and try again")]
    Conflict,
    #[error(transparent)]
    Store(EventStoreError),
}

impl From<ExecuteError<Refused>> for MatchesError {
    fn from(error: ExecuteError<Refused>) -> Self {
        match error {
            ExecuteError::Refused(refused) => MatchesError::Refused(refused),
            ExecuteError::Store(error) => error.into(),
        }
    }
}

impl From<EventStoreError> for MatchesError {
    fn from(error: EventStoreError) -> Self {
        match error {
            EventStoreError::Conflict { .. } => MatchesError::Conflict,
            error => MatchesError::Store(error),
        }
    }
}

impl From<StoreError> for MatchesError {
    fn from(error: StoreError) -> Self {
        MatchesError::Store(error.into())
    }
}

/// A match's id: a UUIDv7, so ids sort by creation.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The stream a match's events are stored in.
pub fn stream(match_id: &str) -> String {
    format!("match-{match_id}")
}

/// Matches whose state the command side keeps in memory.
const CACHED_MATCHES: usize = 10_000;

/// The command side's use cases.
#[derive(Clone)]
pub struct Matches {
    db: Database,
    snapshots: Snapshots,
    /// So that a move reads only the events since the match's last move in this process.
    cache: Arc<Cache<Match>>,
}

impl Matches {
    pub fn new(db: Database, snapshots: Snapshots) -> Matches {
        Matches {
            db,
            snapshots,
            cache: Arc::new(Cache::new(CACHED_MATCHES)),
        }
    }

    /// Runs `command` on match `match_id`; the match as it is after it.
    pub async fn execute(
        &self,
        match_id: String,
        command: Command,
    ) -> Result<Started, MatchesError> {
        let snapshots = self.snapshots;
        let stream = stream(&match_id);
        let known = self.cache.get(&stream);
        let on = stream.clone();
        let Executed { state, version, .. } = self
            .db
            .write(move |uow| {
                Ok::<_, MatchesError>(aggregate::execute_from::<Match>(
                    uow,
                    &on,
                    known.clone(),
                    snapshots,
                    &command,
                )?)
            })
            .await?;
        // Committed: from here on, this is the match at `version` for good.
        self.cache.put(
            &stream,
            Loaded {
                state: state.clone(),
                version,
            },
        );
        state.0.ok_or(MatchesError::Refused(Refused::NoMatch))
    }
}

#[cfg(test)]
pub(crate) mod tests;
