//! Known positions, and properties of random legal games.

use super::*;
use proptest::prelude::*;

fn p(x: u8, y: u8) -> Point {
    Point::new(x, y)
}

/// Plays `play` for whoever is next; panics if it is illegal.
fn play(game: &mut Game, play: Move) -> Vec<Event> {
    let events = game
        .decide(game.next(), play)
        .unwrap_or_else(|illegal| panic!("{play:?}: {illegal}"));
    for event in &events {
        game.apply(event);
    }
    events
}

/// A 9×9 game with these stones, placed alternately (black first); the side with fewer
/// stones passes while the other places its rest. Black is next when it returns.
fn position(black: &[(u8, u8)], white: &[(u8, u8)]) -> Game {
    let mut game = Game::new(9).expect("a 9×9 board");
    let (mut black, mut white) = (black.iter(), white.iter());
    loop {
        let (b, w) = (black.next(), white.next());
        if b.is_none() && w.is_none() {
            break;
        }
        play(
            &mut game,
            b.map_or(Move::Pass, |&(x, y)| Move::Place(p(x, y))),
        );
        play(
            &mut game,
            w.map_or(Move::Pass, |&(x, y)| Move::Place(p(x, y))),
        );
    }
    game
}

fn captured(events: &[Event]) -> Vec<Point> {
    match events {
        [Event::StonePlaced { captured, .. }] => captured.clone(),
        other => panic!("not one stone placed: {other:?}"),
    }
}

#[test]
fn a_surrounded_stone_is_captured() {
    let mut game = position(&[(1, 0), (0, 1), (2, 1)], &[(1, 1)]);
    let events = play(&mut game, Move::Place(p(1, 2)));
    assert_eq!(captured(&events), [p(1, 1)]);
    assert_eq!(game.at(p(1, 1)), None);
    assert_eq!(game.captures(Color::Black), 1);
}

#[test]
fn a_group_of_several_stones_is_captured_whole() {
    let mut game = position(&[(1, 0), (2, 0), (0, 1), (3, 1), (1, 2)], &[(1, 1), (2, 1)]);
    let events = play(&mut game, Move::Place(p(2, 2)));
    assert_eq!(captured(&events), [p(1, 1), p(2, 1)]);
    assert_eq!(game.captures(Color::Black), 2);
}

#[test]
fn stones_on_the_edge_and_in_the_corner_have_fewer_liberties() {
    let mut edge = position(&[(0, 2), (0, 4)], &[(0, 3)]);
    assert_eq!(captured(&play(&mut edge, Move::Place(p(1, 3)))), [p(0, 3)]);
    let mut corner = position(&[(1, 0)], &[(0, 0)]);
    assert_eq!(
        captured(&play(&mut corner, Move::Place(p(0, 1)))),
        [p(0, 0)]
    );
}

#[test]
fn suicide_is_illegal() {
    let mut game = position(&[(1, 0), (0, 1)], &[(8, 8)]);
    play(&mut game, Move::Place(p(7, 7)));
    assert_eq!(
        game.decide(Color::White, Move::Place(p(0, 0))),
        Err(Illegal::Suicide(p(0, 0)))
    );
}

#[test]
fn a_move_without_liberties_that_captures_is_legal() {
    let mut game = position(&[(2, 0), (1, 1), (0, 2)], &[(1, 0), (0, 1)]);
    let events = play(&mut game, Move::Place(p(0, 0)));
    assert_eq!(captured(&events), [p(0, 1), p(1, 0)]);
    assert_eq!(game.at(p(0, 0)), Some(Color::Black));
}

/// . B W .
/// B W . W
/// . B W .
fn ko_shape() -> Game {
    position(&[(1, 0), (0, 1), (1, 2)], &[(2, 0), (1, 1), (3, 1), (2, 2)])
}

#[test]
fn the_ko_cannot_be_retaken_at_once_but_can_after_a_move_elsewhere() {
    let mut game = ko_shape();
    assert_eq!(captured(&play(&mut game, Move::Place(p(2, 1)))), [p(1, 1)]);
    assert_eq!(
        game.decide(Color::White, Move::Place(p(1, 1))),
        Err(Illegal::Ko(p(1, 1)))
    );
    play(&mut game, Move::Place(p(8, 8)));
    play(&mut game, Move::Place(p(8, 0)));
    assert_eq!(captured(&play(&mut game, Move::Place(p(1, 1)))), [p(2, 1)]);
}

#[test]
fn a_pass_is_a_move_elsewhere_for_the_ko() {
    let mut game = ko_shape();
    play(&mut game, Move::Place(p(2, 1)));
    play(&mut game, Move::Pass);
    play(&mut game, Move::Place(p(8, 0)));
    assert_eq!(captured(&play(&mut game, Move::Place(p(1, 1)))), [p(2, 1)]);
}

/// . . W B
/// W W W B
/// B B B .
#[test]
fn a_snapback_takes_back_more_than_it_gave() {
    let mut game = position(
        &[(3, 0), (3, 1), (0, 2), (1, 2), (2, 2)],
        &[(2, 0), (0, 1), (1, 1), (2, 1)],
    );
    // Black throws a stone in; white takes it; black retakes at the same point.
    assert!(captured(&play(&mut game, Move::Place(p(1, 0)))).is_empty());
    assert_eq!(captured(&play(&mut game, Move::Place(p(0, 0)))), [p(1, 0)]);
    let retaken = captured(&play(&mut game, Move::Place(p(1, 0))));
    assert_eq!(retaken, [p(0, 0), p(0, 1), p(1, 1), p(2, 0), p(2, 1)]);
    assert_eq!(game.captures(Color::Black), 5);
    assert_eq!(game.captures(Color::White), 1);
}

#[test]
fn two_passes_end_the_game_and_score_it_by_area_with_komi() {
    // Black walls off four columns, white three; the middle two are stones.
    let mut game = Game::new(9).expect("9×9");
    for y in 0..9 {
        play(&mut game, Move::Place(p(4, y)));
        play(&mut game, Move::Place(p(5, y)));
    }
    play(&mut game, Move::Pass);
    let ended = play(&mut game, Move::Pass);
    assert_eq!(
        ended.last(),
        Some(&Event::Ended {
            winner: Some(Color::Black),
            black: 9.0 + 36.0,
            white: 9.0 + 27.0 + KOMI,
        })
    );
    assert_eq!(
        game.decide(Color::Black, Move::Pass),
        Err(Illegal::Finished)
    );
}

#[test]
fn turns_alternate_from_black_and_moves_stay_on_empty_points_of_the_board() {
    let mut game = Game::new(13).expect("13×13");
    assert_eq!(
        game.decide(Color::White, Move::Place(p(3, 3))),
        Err(Illegal::NotYourTurn(Color::Black))
    );
    assert_eq!(
        game.decide(Color::Black, Move::Place(p(13, 0))),
        Err(Illegal::OffBoard {
            at: p(13, 0),
            size: 13
        })
    );
    play(&mut game, Move::Place(p(3, 3)));
    assert_eq!(
        game.decide(Color::White, Move::Place(p(3, 3))),
        Err(Illegal::Occupied(p(3, 3)))
    );
    assert_eq!(game.turn(), 1);
    assert_eq!(Game::new(10), Err(BadSize(10)));
}

#[test]
fn resigning_ends_the_game_for_the_opponent() {
    let mut game = Game::new(19).expect("19×19");
    play(&mut game, Move::Place(p(3, 3)));
    play(&mut game, Move::Resign);
    assert_eq!(
        game.outcome().map(|outcome| outcome.winner),
        Some(Some(Color::Black))
    );
}

/// A random game on 9×9: each step is a point to try, or a pass (one step in forty); the
/// illegal tries are skipped. The game, every event it made and the stones placed.
pub(crate) fn random_game(tries: &[(u8, u8, u8)]) -> (Game, Vec<Event>, u32) {
    let mut game = Game::new(9).expect("9×9");
    let mut events = Vec::new();
    let mut placed = 0;
    for &(x, y, pass) in tries {
        if game.outcome().is_some() {
            break;
        }
        let try_move = if pass == 0 {
            Move::Pass
        } else {
            Move::Place(p(x, y))
        };
        let Ok(made) = game.decide(game.next(), try_move) else {
            continue;
        };
        if matches!(try_move, Move::Place(_)) {
            placed += 1;
        }
        for event in &made {
            game.apply(event);
        }
        events.extend(made);
    }
    (game, events, placed)
}

/// Long enough to fill much of the board, so that groups form and get captured.
pub(crate) fn tries() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
    proptest::collection::vec((0u8..9, 0u8..9, 0u8..40), 0..400)
}

proptest! {
    #[test]
    fn no_group_on_the_board_is_ever_without_liberties(tries in tries()) {
        let (game, _, _) = random_game(&tries);
        for point in game.points() {
            if game.at(point).is_some() {
                let (_, liberties) = game.group(&game.board, point);
                prop_assert!(liberties > 0, "the group at {point:?} has no liberty");
            }
        }
    }

    #[test]
    fn stones_on_the_board_and_captured_add_up_to_stones_played(tries in tries()) {
        let (game, _, placed) = random_game(&tries);
        let on_board = game.points().filter(|point| game.at(*point).is_some()).count() as u32;
        let captured = game.captures(Color::Black) + game.captures(Color::White);
        prop_assert_eq!(on_board + captured, placed);
    }

    #[test]
    fn replaying_the_events_rebuilds_the_game(tries in tries()) {
        let (game, events, _) = random_game(&tries);
        let mut replayed = Game::new(9).expect("9×9");
        for event in &events {
            replayed.apply(event);
        }
        prop_assert_eq!(replayed, game);
    }
}
