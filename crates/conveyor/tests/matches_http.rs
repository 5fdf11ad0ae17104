//! The matches contract (`../shared/contracts/matches.md`) through real HTTP against the
//! real application, on SQLite, PostgreSQL and MariaDB: creating matches, the rules through
//! the moves, every error, the query side's GETs, 20 simultaneous moves, and the command and
//! query sides in separate processes.

#![allow(clippy::unwrap_used)]

mod common;

use common::process::{scratch_database, BINARY};
use common::{problem, replayed_match, spawn_app, spawn_app_beside, spawn_app_with, TestApp};
use platform::Backend;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

on_every_backend!(
    a_match_is_created_and_the_query_side_serves_it,
    the_originals_create_request_is_accepted_too,
    bad_creates_are_400_problems_naming_the_field,
    stones_are_captured_and_illegal_moves_say_why,
    malformed_moves_are_400_and_unknown_matches_404,
    two_passes_end_the_match_and_score_it_by_area,
    a_resignation_ends_the_match_for_the_opponent,
    matches_are_listed_newest_first_and_by_status,
    of_twenty_simultaneous_moves_exactly_one_is_played,
    the_command_and_query_sides_run_in_separate_processes,
    rebuilding_the_projection_while_moves_keep_coming_ends_equal_to_the_replay,
);

fn players() -> Value {
    json!([{"color": "white", "name": "bob"}, {"color": "black", "name": "alfred"}])
}

/// Starts a 9×9 match; its id and the 201's body.
async fn create(app: &TestApp) -> (String, Value) {
    let response = app
        .post("/matches", &json!({"gridsize": 9, "players": players()}))
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/matches/{id}"));
    (id, body)
}

async fn play(app: &TestApp, id: &str, color: &str, x: i64, y: i64) -> reqwest::Response {
    app.post(
        &format!("/matches/{id}/moves"),
        &json!({"player": color, "position": {"x": x, "y": y}}),
    )
    .await
}

/// Plays a legal move; the match after it.
async fn played(app: &TestApp, id: &str, color: &str, x: i64, y: i64) -> Value {
    let response = play(app, id, color, x, y).await;
    assert_eq!(response.status(), 201, "{color} at ({x}, {y})");
    response.json().await.unwrap()
}

async fn special(app: &TestApp, id: &str, color: &str, what: &str) -> reqwest::Response {
    app.post(
        &format!("/matches/{id}/moves"),
        &json!({"player": color, what: true}),
    )
    .await
}

/// Waits until the query side has the match at `turn`, and returns it.
async fn projected(app: &TestApp, id: &str, turn: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let response = app.get(&format!("/matches/{id}")).await;
        if response.status() == 200 {
            assert_eq!(response.headers()["content-type"], "application/json");
            let body: Value = response.json().await.unwrap();
            if body["turn"] == turn {
                return body;
            }
        } else {
            assert_eq!(response.status(), 404);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the query side never showed match {id} at turn {turn}");
}

async fn get_match(app: &TestApp, id: &str) -> Value {
    let response = app.get(&format!("/matches/{id}")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn moves(app: &TestApp, id: &str) -> Vec<Value> {
    let response = app.get(&format!("/matches/{id}/moves")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn list(app: &TestApp, query: &str) -> Vec<String> {
    let response = app.get(&format!("/matches{query}")).await;
    assert_eq!(response.status(), 200);
    let body: Vec<Value> = response.json().await.unwrap();
    body.iter()
        .map(|summary| {
            assert!(summary.get("gameboard").is_none(), "a summary has no board");
            summary["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn a_match_is_created_and_the_query_side_serves_it() {
    let app = spawn_app().await;
    let (id, body) = create(&app).await;
    assert_eq!(body["gridsize"], 9);
    assert_eq!(body["turn"], 0);
    assert_eq!(body["next"], "black");
    assert_eq!(body["status"], "active");
    assert_eq!(body["winner"], Value::Null);
    assert_eq!(
        body["players"],
        json!([{"color": "black", "name": "alfred", "score": 0.0},
               {"color": "white", "name": "bob", "score": 0.0}])
    );
    assert_eq!(body["gameboard"], json!(vec![vec![0; 9]; 9]));
    assert!(body["started_at"].as_str().unwrap().ends_with('Z'));
    // Read your writes: a GET right after a 201 shows what it did.
    assert_eq!(get_match(&app, &id).await, body);
    let after = played(&app, &id, "black", 3, 4).await;
    assert_eq!(after["gameboard"][4][3], 1, "gameboard[y][x]");
    assert_eq!(after["next"], "white");
    assert_eq!(get_match(&app, &id).await, after);
    assert_eq!(moves(&app, &id).await.len(), 1);
    app.stop().await;
}

async fn the_originals_create_request_is_accepted_too() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/matches",
            &json!({"gridsize": 19, "playerWhite": "bob", "playerBlack": "alfred"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["gridsize"], 19);
    assert_eq!(body["gameboard"].as_array().unwrap().len(), 19);
    assert_eq!(body["players"][0]["name"], "alfred");
    assert_eq!(body["players"][1]["name"], "bob");
    app.stop().await;
}

async fn bad_creates_are_400_problems_naming_the_field() {
    let app = spawn_app().await;
    let long = "x".repeat(101);
    let cases = [
        (json!({"players": players()}), "gridsize"),
        (json!({"gridsize": 10, "players": players()}), "gridsize"),
        (json!({"gridsize": -9, "players": players()}), "gridsize"),
        (
            json!({"gridsize": "nine", "players": players()}),
            "gridsize",
        ),
        (json!({"gridsize": 9}), "players"),
        (
            json!({"gridsize": 9, "players": [{"color": "black", "name": "a"}]}),
            "players",
        ),
        (
            json!({"gridsize": 9, "players": [{"color": "black", "name": "a"}, {"color": "black", "name": "b"}]}),
            "players[1].color",
        ),
        (
            json!({"gridsize": 9, "players": [{"color": "red", "name": "a"}, {"color": "black", "name": "b"}]}),
            "players[0].color",
        ),
        (
            json!({"gridsize": 9, "players": [{"color": "white", "name": "a"}, {"color": "black", "name": "  "}]}),
            "players[1].name",
        ),
        (
            json!({"gridsize": 9, "players": [{"color": "white", "name": long}, {"color": "black", "name": "b"}]}),
            "players[0].name",
        ),
        (json!({"gridsize": 9, "playerWhite": "bob"}), "players"),
    ];
    for (body, field) in cases {
        let problem = problem(app.post("/matches", &body).await, 400).await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
    }
    problem(app.post_raw("/matches", "{not json".into()).await, 400).await;
    problem(app.post_raw("/matches", String::new()).await, 400).await;
    assert!(list(&app, "").await.is_empty(), "no match was started");
    app.stop().await;
}

async fn stones_are_captured_and_illegal_moves_say_why() {
    let app = spawn_app().await;
    let (id, _) = create(&app).await;
    played(&app, &id, "black", 1, 0).await;
    played(&app, &id, "white", 0, 0).await;
    let capture = played(&app, &id, "black", 0, 1).await;
    assert_eq!(
        capture["gameboard"][0][0], 0,
        "the white corner stone is captured"
    );
    assert_eq!(
        capture["players"][0]["score"], 1.0,
        "black has captured one stone"
    );
    let refusals = [
        (
            play(&app, &id, "black", 5, 5).await,
            "player",
            "white's turn",
        ),
        (
            play(&app, &id, "white", 1, 0).await,
            "position",
            "already taken",
        ),
        (
            play(&app, &id, "white", 9, 0).await,
            "position",
            "off the 9×9 board",
        ),
        (play(&app, &id, "white", 0, 0).await, "position", "suicide"),
    ];
    for (response, field, reason) in refusals {
        let problem = problem(response, 400).await;
        assert_eq!(problem["errors"][0]["field"], field);
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(reason), "{detail:?} should say {reason:?}");
    }
    projected(&app, &id, 3).await;
    assert_eq!(
        moves(&app, &id).await,
        [
            json!({"turn": 1, "player": "black", "position": {"x": 1, "y": 0}, "captured": []}),
            json!({"turn": 2, "player": "white", "position": {"x": 0, "y": 0}, "captured": []}),
            json!({"turn": 3, "player": "black", "position": {"x": 0, "y": 1}, "captured": [[0, 0]]}),
        ]
    );
    app.stop().await;
}

async fn malformed_moves_are_400_and_unknown_matches_404() {
    let app = spawn_app().await;
    let (id, _) = create(&app).await;
    let path = format!("/matches/{id}/moves");
    let cases = [
        (json!({"position": {"x": 1, "y": 1}}), "player"),
        (json!({"player": "green", "pass": true}), "player"),
        (json!({"player": "black"}), "position"),
        (
            json!({"player": "black", "pass": true, "resign": true}),
            "position",
        ),
        (
            json!({"player": "black", "pass": true, "position": {"x": 1, "y": 1}}),
            "position",
        ),
        (
            json!({"player": "black", "position": {"x": -1, "y": 1}}),
            "position.x",
        ),
        (
            json!({"player": "black", "position": {"x": 1, "y": 300}}),
            "position.y",
        ),
        // A missing field is reported on the object that lacks it.
        (json!({"player": "black", "position": {"x": 1}}), "position"),
    ];
    for (body, field) in cases {
        let problem = problem(app.post(&path, &body).await, 400).await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
    }
    let unknown = "01a242a6-082a-75ab-8806-a9849f93070d";
    problem(play(&app, unknown, "black", 1, 1).await, 404).await;
    problem(play(&app, "not-a-uuid", "black", 1, 1).await, 404).await;
    problem(app.get(&format!("/matches/{unknown}")).await, 404).await;
    problem(app.get(&format!("/matches/{unknown}/moves")).await, 404).await;
    problem(app.get("/matches/not-a-uuid").await, 404).await;
    projected(&app, &id, 0).await;
    assert!(moves(&app, &id).await.is_empty());
    app.stop().await;
}

async fn two_passes_end_the_match_and_score_it_by_area() {
    let app = spawn_app().await;
    let (id, _) = create(&app).await;
    played(&app, &id, "black", 4, 4).await;
    assert_eq!(special(&app, &id, "white", "pass").await.status(), 201);
    let response = special(&app, &id, "black", "pass").await;
    assert_eq!(response.status(), 201);
    let ended: Value = response.json().await.unwrap();
    assert_eq!(ended["status"], "finished");
    assert_eq!(ended["winner"], "black");
    assert_eq!(ended["next"], Value::Null);
    // One black stone and every empty point it alone borders, against komi.
    assert_eq!(ended["players"][0]["score"], 81.0);
    assert_eq!(ended["players"][1]["score"], 6.5);
    let over = problem(play(&app, &id, "white", 0, 0).await, 400).await;
    assert!(over["detail"].as_str().unwrap().contains("over"));
    assert_eq!(projected(&app, &id, 3).await, ended);
    let listed = moves(&app, &id).await;
    assert_eq!(
        listed[1],
        json!({"turn": 2, "player": "white", "pass": true})
    );
    assert_eq!(
        listed[2],
        json!({"turn": 3, "player": "black", "pass": true})
    );
    app.stop().await;
}

async fn a_resignation_ends_the_match_for_the_opponent() {
    let app = spawn_app().await;
    let (id, _) = create(&app).await;
    let response = special(&app, &id, "black", "resign").await;
    assert_eq!(response.status(), 201);
    let ended: Value = response.json().await.unwrap();
    assert_eq!(
        (&ended["status"], &ended["winner"]),
        (&json!("finished"), &json!("white"))
    );
    assert_eq!(projected(&app, &id, 1).await, ended);
    assert_eq!(
        moves(&app, &id).await,
        [json!({"turn": 1, "player": "black", "resign": true})]
    );
    app.stop().await;
}

async fn matches_are_listed_newest_first_and_by_status() {
    let app = spawn_app().await;
    let (first, _) = create(&app).await;
    let (second, _) = create(&app).await;
    let (third, _) = create(&app).await;
    assert_eq!(
        special(&app, &second, "black", "resign").await.status(),
        201
    );
    projected(&app, &third, 0).await;
    projected(&app, &second, 1).await;
    assert_eq!(
        list(&app, "").await,
        [third.clone(), second.clone(), first.clone()]
    );
    assert_eq!(
        list(&app, "?status=active").await,
        [third.clone(), first.clone()]
    );
    assert_eq!(list(&app, "?status=finished").await, vec![second.clone()]);
    assert_eq!(
        list(&app, "?limit=2").await,
        [third.clone(), second.clone()]
    );
    for bad in ["?status=paused", "?limit=0", "?limit=1001", "?limit=x"] {
        problem(app.get(&format!("/matches{bad}")).await, 400).await;
    }
    app.stop().await;
}

async fn of_twenty_simultaneous_moves_exactly_one_is_played() {
    let app = spawn_app().await;
    let (id, _) = create(&app).await;
    let attempts: Vec<_> = (0..20)
        .map(|n| {
            let (client, url) = (app.client.clone(), app.url(&format!("/matches/{id}/moves")));
            tokio::spawn(async move {
                let body = json!({"player": "black", "position": {"x": n % 9, "y": n / 9}});
                client
                    .post(url)
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }
    let played = statuses.iter().filter(|status| **status == 201).count();
    assert_eq!(played, 1, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|status| [201, 400, 409].contains(status)),
        "the losers hear 409 (lost the race) or 400 (not their turn any more): {statuses:?}"
    );
    let view = projected(&app, &id, 1).await;
    let stones: u64 = view["gameboard"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|cell| cell.as_u64().unwrap())
        .sum();
    assert_eq!(stones, 1, "one black stone on the board");
    assert_eq!(moves(&app, &id).await.len(), 1);
    app.stop().await;
}

async fn the_command_and_query_sides_run_in_separate_processes() {
    let commands = spawn_app_with(&["--services", "matches"]).await;
    let (id, _) = create(&commands).await;
    played(&commands, &id, "black", 2, 2).await;
    // The command process serves no query.
    problem(commands.get(&format!("/matches/{id}")).await, 404).await;
    let queries = spawn_app_beside(&commands, &["--services", "matches-query"]).await;
    let view = projected(&queries, &id, 1).await;
    assert_eq!(view["gameboard"][2][2], 1);
    let refused = queries
        .post("/matches", &json!({"gridsize": 9, "players": players()}))
        .await;
    assert_eq!(refused.status(), 405, "the query process takes no command");
    let after = played(&commands, &id, "white", 3, 3).await;
    assert_eq!(
        get_match(&queries, &id).await,
        after,
        "read your writes, across processes"
    );
    queries.stop().await;
    commands.stop().await;
}

/// Plays random moves on match `id`, white to move, until `stop`; how many were played.
async fn keep_playing(app: Arc<TestApp>, id: String, stop: Arc<AtomicBool>) -> u32 {
    let (mut next, mut played) = ("white".to_owned(), 0);
    while !stop.load(Ordering::Relaxed) {
        let (x, y) = (fastrand::i64(0..9), fastrand::i64(0..9));
        let response = play(&app, &id, &next, x, y).await;
        match response.status().as_u16() {
            201 => {
                let view: Value = response.json().await.unwrap();
                played += 1;
                match view["next"].as_str() {
                    Some(color) => next = color.to_owned(),
                    None => break,
                }
            }
            400 => {}
            other => panic!(
                "a move answered {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
    played
}

/// `conveyor projections rebuild NAME` on `app`'s database, as an operator runs it.
fn rebuild(app: &TestApp, name: &str) -> String {
    let mut command = std::process::Command::new(BINARY);
    command.arg("projections");
    match app.database.backend() {
        Backend::Sqlite => command.arg("--data").arg(&app.data),
        _ => command.args(["--db", app.database.url()]),
    };
    let output = command
        .args(["rebuild", name])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn rebuilding_the_projection_while_moves_keep_coming_ends_equal_to_the_replay() {
    let app = Arc::new(spawn_app().await);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (id, _) = create(&app).await;
        played(&app, &id, "black", 4, 4).await;
        ids.push(id);
    }
    for id in &ids {
        projected(&app, id, 1).await;
    }
    // Damage the live tables, so that only a rebuild can make them right again: the first
    // match's view is lost, and every move listed.
    let db = scratch_database(&app.database, &app.data).await;
    let lost = ids[0].clone();
    db.write(move |uow| {
        uow.conn().execute(
            "DELETE FROM matches_query_views WHERE id = ?",
            [lost.as_str()],
        )?;
        uow.conn().execute("DELETE FROM matches_query_moves", ())?;
        Ok::<_, platform::StoreError>(())
    })
    .await
    .unwrap();
    problem(app.get(&format!("/matches/{}", ids[0])).await, 404).await;

    let stop = Arc::new(AtomicBool::new(false));
    let players: Vec<_> = ids[1..]
        .iter()
        .map(|id| tokio::spawn(keep_playing(app.clone(), id.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || rebuild(&app, "matches-query.views"))
            .await
            .unwrap()
    };
    assert!(
        report.contains("rebuilt matches-query.views from 5 stream(s)"),
        "{report}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = 0;
    for player in players {
        during += player.await.unwrap();
    }
    assert!(
        during > 0,
        "moves were played while the projection was rebuilt"
    );

    for id in &ids {
        let (turn, expected) = replayed_match(&db, id).await;
        assert_eq!(projected(&app, id, turn).await, expected, "match {id}");
        let listed = moves(&app, id).await;
        let turns: Vec<u64> = listed.iter().map(|m| m["turn"].as_u64().unwrap()).collect();
        assert_eq!(turns, (1..=turn).collect::<Vec<_>>(), "match {id}'s moves");
    }
    db.close().await;
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the players still hold the app"),
    }
}
