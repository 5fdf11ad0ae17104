//! Matches across process crashes: the command side and the query side in processes of
//! their own, both killed with SIGKILL in the middle of a stream of moves. After a restart
//! every acknowledged move is in its match's stream, the board the command side serves is
//! the replay of the stored events, and the query side catches up to it.

#![allow(clippy::unwrap_used)]

mod common;

use common::process::{database, reqwest, scratch_database, Server};
use platform::Backend;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const MATCHES: usize = 8;

fn side(data: &Path, db: Option<&str>, service: &str) -> Server {
    Server::start_with(data, db, &["--services", service])
}

#[test]
fn on_sqlite_a_sigkill_mid_game_loses_no_acknowledged_move() {
    a_sigkill_mid_game_loses_no_acknowledged_move(Backend::Sqlite);
}

#[test]
fn on_postgres_a_sigkill_mid_game_loses_no_acknowledged_move() {
    a_sigkill_mid_game_loses_no_acknowledged_move(Backend::Postgres);
}

/// Plays random moves on match `id` until the process stops answering; the last turn a
/// 201 acknowledged.
async fn play_until_killed(client: ::reqwest::Client, base: String, id: String) -> u64 {
    let mut acknowledged = 0;
    let mut next = "black".to_owned();
    loop {
        let body = if fastrand::u8(0..30) == 0 {
            json!({"player": next, "pass": true})
        } else {
            json!({"player": next, "position": {"x": fastrand::u8(0..9), "y": fastrand::u8(0..9)}})
        };
        let sent = client
            .post(format!("{base}/matches/{id}/moves"))
            .body(body.to_string())
            .send()
            .await;
        let Ok(response) = sent else {
            return acknowledged;
        };
        match response.status().as_u16() {
            201 => {
                let Ok(view) = response.json::<Value>().await else {
                    return acknowledged;
                };
                acknowledged = view["turn"].as_u64().unwrap();
                match view["next"].as_str() {
                    Some(color) => next = color.to_owned(),
                    None => return acknowledged,
                }
            }
            400 => {}
            other => panic!("move answered {other}"),
        }
    }
}

fn a_sigkill_mid_game_loses_no_acknowledged_move(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (scratch, db) = database(backend);
    let commands = side(dir.path(), db.as_deref(), "matches");
    let queries = side(dir.path(), db.as_deref(), "matches-query");
    let runtime = reqwest::runtime();
    let client = ::reqwest::Client::new();
    let (ids, acknowledged) = runtime.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..MATCHES {
            let response = client
                .post(format!("{}/matches", commands.base))
                .body(json!({"gridsize": 9, "playerBlack": "b", "playerWhite": "w"}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            let view: Value = response.json().await.unwrap();
            ids.push(view["id"].as_str().unwrap().to_owned());
        }
        let players: Vec<_> = ids
            .iter()
            .map(|id| {
                tokio::spawn(play_until_killed(
                    client.clone(),
                    commands.base.clone(),
                    id.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        commands.signal("KILL");
        queries.signal("KILL");
        let mut acknowledged = Vec::new();
        for player in players {
            acknowledged.push(player.await.unwrap());
        }
        (ids, acknowledged)
    });
    drop((commands, queries));
    assert!(
        acknowledged.iter().sum::<u64>() > 0,
        "the moves were played before the kill"
    );

    let queries = side(dir.path(), db.as_deref(), "matches-query");
    let commands = side(dir.path(), db.as_deref(), "matches");
    runtime.block_on(async {
        let db = scratch_database(&scratch, dir.path()).await;
        for (id, acknowledged) in ids.iter().zip(&acknowledged) {
            let (turn, expected) = common::replayed_match(&db, id).await;
            // At most the one move in flight at the kill committed without its answer.
            assert!(
                (*acknowledged..=*acknowledged + 1).contains(&turn),
                "match {id}: {acknowledged} moves acknowledged, {turn} stored"
            );
            let served = caught_up(&client, &queries.base, id, &expected).await;
            assert_eq!(served, expected, "the query side equals the replay");
            let moves: Vec<Value> = client
                .get(format!("{}/matches/{id}/moves", queries.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(moves.len() as u64, turn, "each move projected once");
        }
        // The command side goes on from the stored state.
        let id = &ids[0];
        let view: Value = client
            .get(format!("{}/matches/{id}", queries.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(next) = view["next"].as_str() {
            let response = client
                .post(format!("{}/matches/{id}/moves", commands.base))
                .body(json!({"player": next, "pass": true}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }
        db.close().await;
    });
}

/// Polls the query side until it serves `expected` for match `id`; what it served last.
async fn caught_up(client: &::reqwest::Client, base: &str, id: &str, expected: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = client
            .get(format!("{base}/matches/{id}"))
            .send()
            .await
            .unwrap();
        let served: Value = if response.status() == 200 {
            response.json().await.unwrap()
        } else {
            Value::Null
        };
        if &served == expected || Instant::now() > deadline {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
