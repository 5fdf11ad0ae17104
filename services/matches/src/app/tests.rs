//! The match aggregate: its commands, and properties of its stream.

use super::*;
use crate::domain::tests::{random_game, tries};
use platform::Message;
use proptest::prelude::*;

const ID: &str = "0190a4f2-0000-7000-8000-000000000001";

fn start(gridsize: u8) -> Command {
    Command::Start {
        match_id: ID.to_owned(),
        gridsize,
        black: "alfred".to_owned(),
        white: "bob".to_owned(),
        started_at: 1_700_000_000_000,
    }
}

/// The stream of a random 9×9 match: its start, then the moves `tries` makes.
pub(crate) fn random_stream(tries: &[(u8, u8, u8)]) -> Vec<MatchEvent> {
    let mut stream = Match::default()
        .decide(&start(9))
        .expect("a new match starts");
    let (_, events, _) = random_game(tries);
    stream.extend(events.iter().map(|event| MatchEvent {
        match_id: ID.to_owned(),
        change: Change::from(event),
    }));
    stream
}

fn fold(start: Match, events: &[MatchEvent]) -> Match {
    events.iter().fold(start, |mut state, event| {
        state.apply(event);
        state
    })
}

#[test]
fn a_match_starts_once_and_takes_moves_only_once_started() {
    let empty = Match::default();
    assert_eq!(
        empty.decide(&Command::Play {
            player: Color::Black,
            play: Move::Pass
        }),
        Err(Refused::NoMatch)
    );
    assert_eq!(empty.decide(&start(10)), Err(Refused::BadSize(BadSize(10))));
    let started = fold(empty.clone(), &empty.decide(&start(13)).expect("starts"));
    assert_eq!(started.decide(&start(13)), Err(Refused::Started));
    let game = &started.0.as_ref().expect("started").game;
    assert_eq!(
        (game.size(), game.next(), game.turn()),
        (13, Color::Black, 0)
    );
}

#[test]
fn illegal_moves_are_refused_with_the_rules_reason() {
    let started = fold(
        Match::default(),
        &Match::default().decide(&start(9)).expect("starts"),
    );
    assert_eq!(
        started.decide(&Command::Play {
            player: Color::White,
            play: Move::Pass
        }),
        Err(Refused::Illegal(Illegal::NotYourTurn(Color::Black)))
    );
}

#[test]
fn events_are_published_under_the_contracts_names_and_shapes() {
    let placed = MatchEvent {
        match_id: ID.to_owned(),
        change: Change::StonePlaced {
            color: Color::White,
            x: 3,
            y: 4,
            captured: vec![[3, 5]],
        },
    };
    assert_eq!(placed.name(), "matches.StonePlaced");
    assert_eq!(placed.key(), ID);
    assert_eq!(
        serde_json::to_value(&placed).expect("encodes"),
        serde_json::json!({"match_id": ID, "type": "StonePlaced", "color": "white",
            "x": 3, "y": 4, "captured": [[3, 5]]})
    );
    for event in random_stream(&[(0, 0, 1), (0, 0, 0), (1, 1, 0)]) {
        assert!(MatchEvent::NAMES.contains(&event.name()));
        let decoded: MatchEvent =
            serde_json::from_slice(&serde_json::to_vec(&event).expect("encodes")).expect("decodes");
        assert_eq!(decoded, event);
    }
}

proptest! {
    #[test]
    fn a_snapshot_plus_the_tail_equals_the_full_replay(
        tries in tries(),
        cut in any::<prop::sample::Index>(),
    ) {
        let stream = random_stream(&tries);
        let cut = cut.index(stream.len() + 1);
        let replayed = fold(Match::default(), &stream);
        // What `conveyor_snapshots` holds: the state at the cut, as JSON.
        let snapshot = serde_json::to_vec(&fold(Match::default(), &stream[..cut])).expect("encodes");
        let restored: Match = serde_json::from_slice(&snapshot).expect("decodes");
        prop_assert_eq!(fold(restored, &stream[cut..]), replayed);
    }

    #[test]
    fn the_stream_replays_to_the_game_the_rules_played(tries in tries()) {
        let (game, _, _) = random_game(&tries);
        let replayed = fold(Match::default(), &random_stream(&tries));
        prop_assert_eq!(&replayed.0.expect("started").game, &game);
    }
}
