//! The projection's documents agree with the command side's view of the same match.

use super::*;
use crate::app::tests::random_stream;
use crate::app::Match;
use crate::domain::tests::tries;
use platform::Aggregate;
use proptest::prelude::*;

/// The view the projection builds from `stream`, without a database.
fn projected(stream: &[MatchEvent]) -> MatchView {
    let Some(MatchEvent {
        match_id,
        change:
            Change::MatchStarted {
                gridsize,
                black,
                white,
                started_at,
            },
    }) = stream.first()
    else {
        panic!("a stream starts with MatchStarted");
    };
    let mut view = MatchView::started(match_id, *gridsize, black, white, *started_at);
    for event in &stream[1..] {
        view.apply(&event.change);
    }
    view
}

proptest! {
    #[test]
    fn the_projected_view_equals_the_view_of_the_replayed_match(tries in tries()) {
        let stream = random_stream(&tries);
        let mut state = Match::default();
        for event in &stream {
            state.apply(event);
        }
        let started = state.started().expect("started");
        prop_assert_eq!(projected(&stream), MatchView::of(started));
    }
}

#[test]
fn moves_are_listed_as_the_contract_shows_them() {
    let placed = MoveView::of(
        1,
        &Change::StonePlaced {
            color: Color::Black,
            x: 3,
            y: 4,
            captured: vec![],
        },
    );
    assert_eq!(
        serde_json::to_value(placed).expect("encodes"),
        serde_json::json!({"turn": 1, "player": "black", "position": {"x": 3, "y": 4}, "captured": []})
    );
    let passed = MoveView::of(
        2,
        &Change::Passed {
            color: Color::White,
        },
    );
    assert_eq!(
        serde_json::to_value(passed).expect("encodes"),
        serde_json::json!({"turn": 2, "player": "white", "pass": true})
    );
    assert_eq!(
        MoveView::of(
            3,
            &Change::MatchEnded {
                winner: None,
                scores: crate::api::Scores {
                    black: 0.0,
                    white: 6.5
                }
            }
        ),
        None
    );
}
