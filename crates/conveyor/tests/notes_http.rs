//! The notes contract (`../shared/contracts/notes.md`) through real HTTP against the real
//! application, on SQLite, PostgreSQL and MariaDB: every route and error, the cache and its
//! invalidation, the queue's limit, and the API and the workers as separate roles.

#![allow(clippy::unwrap_used)]

mod common;

use common::{problem, spawn_app, spawn_app_beside, spawn_app_with, TestApp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

on_every_backend!(
    a_saved_note_is_accepted_at_once_and_written_shortly,
    the_original_curl_commands_work_verbatim,
    notes_are_listed_newest_first_and_paged_before_an_id,
    bad_saves_are_400_problems_naming_the_field,
    bad_paging_is_400_and_unknown_notes_404,
    a_cached_list_is_invalidated_by_the_next_written_batch,
    a_full_queue_refuses_saves_with_503_and_retry_after,
    the_api_and_the_workers_run_as_separate_processes_and_the_api_cache_follows_the_workers,
    the_workers_write_in_batches_and_say_so_in_metrics,
);

/// Saves `content` and returns the id the API gave it.
async fn save(app: &TestApp, content: &str) -> String {
    let response = app.post("/save", &json!({ "content": content })).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/notes/{id}"));
    id
}

/// Waits until `GET /notes/{id}` finds the note, and returns it.
async fn written(app: &TestApp, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let response = app.get(&format!("/notes/{id}")).await;
        if response.status() == 200 {
            return response.json().await.unwrap();
        }
        assert_eq!(response.status(), 404);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("note {id} was never written");
}

async fn list(app: &TestApp, query: &str) -> Vec<Value> {
    let response = app.get(&format!("/{query}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    body["results"].as_array().unwrap().clone()
}

fn ids(notes: &[Value]) -> Vec<String> {
    notes
        .iter()
        .map(|note| note["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `GET /` until it lists `id`; how long that took.
async fn until_listed(app: &TestApp, id: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if ids(&list(app, "").await).iter().any(|listed| listed == id) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("GET / did not list {id} within {within:?}");
}

async fn a_saved_note_is_accepted_at_once_and_written_shortly() {
    let app = spawn_app().await;
    let id = save(&app, "buy milk").await;
    let note = written(&app, &id).await;
    assert_eq!(note["id"], id.as_str());
    assert_eq!(note["content"], "buy milk");
    let created_at = note["created_at"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(created_at).is_ok(),
        "{created_at} is RFC 3339"
    );
    app.stop().await;
}

async fn the_original_curl_commands_work_verbatim() {
    let app = spawn_app().await;
    // curl -X POST 127.0.0.1:8080/save -d '{"content":"something"}': form Content-Type.
    let response = app
        .post_raw("/save", r#"{"content":"something"}"#.to_owned())
        .await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // And with no Content-Type at all.
    let bare = app
        .client
        .post(app.url("/save"))
        .body(r#"{"content":"something else"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 202);
    written(&app, &id).await;
    // curl 127.0.0.1:8080/
    let notes = list(&app, "").await;
    assert!(ids(&notes).contains(&id));
    app.stop().await;
}

async fn notes_are_listed_newest_first_and_paged_before_an_id() {
    let app = spawn_app().await;
    let mut saved = Vec::new();
    for n in 0..12 {
        saved.push(save(&app, &format!("note {n}")).await);
    }
    written(&app, saved.last().unwrap()).await;
    for id in &saved {
        written(&app, id).await;
    }
    let newest_first: Vec<String> = saved.iter().rev().cloned().collect();
    until_listed(&app, &saved[11], Duration::from_secs(5)).await;
    let all = list(&app, "?limit=1000").await;
    assert_eq!(ids(&all), newest_first);
    assert_eq!(all[0]["content"], "note 11");
    let first = list(&app, "?limit=5").await;
    assert_eq!(ids(&first), newest_first[..5]);
    let second = list(&app, &format!("?limit=5&before={}", newest_first[4])).await;
    assert_eq!(ids(&second), newest_first[5..10]);
    let last = list(&app, &format!("?limit=5&before={}", newest_first[9])).await;
    assert_eq!(ids(&last), newest_first[10..]);
    app.stop().await;
}

async fn bad_saves_are_400_problems_naming_the_field() {
    let app = common::spawn_app_with(&["--body-limit", "100000"]).await;
    for (body, field) in [
        (json!({}), "content"),
        (json!({ "content": null }), "content"),
        (json!({ "content": "   " }), "content"),
        (json!({ "content": "x".repeat(16 * 1024 + 1) }), "content"),
        (json!({ "content": 42 }), "content"),
    ] {
        let response = app.post("/save", &body).await;
        let problem = problem(response, 400).await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }
    let not_json = problem(app.post_raw("/save", "content=hi".to_owned()).await, 400).await;
    assert!(not_json["detail"].as_str().unwrap().contains("JSON"));
    let limited = spawn_app_with(&["--body-limit", "64"]).await;
    let response = limited
        .post("/save", &json!({ "content": "y".repeat(100) }))
        .await;
    problem(response, 413).await;
    // The longest content is accepted and stored whole, even in four-byte characters
    // (64 KiB: one byte more than MySQL's TEXT holds).
    let longest = "😀".repeat(16 * 1024);
    let id = save(&app, &longest).await;
    assert_eq!(written(&app, &id).await["content"], longest.as_str());
    limited.stop().await;
    app.stop().await;
}

async fn bad_paging_is_400_and_unknown_notes_404() {
    let app = spawn_app().await;
    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=-3", "limit"),
        ("?before=yesterday", "before"),
    ] {
        let problem = problem(app.get(&format!("/{query}")).await, 400).await;
        assert_eq!(problem["errors"][0]["field"], field, "{query}: {problem}");
    }
    problem(app.get("/?limit=ten").await, 400).await;
    let unknown = platform::uuid::Uuid::now_v7();
    problem(app.get(&format!("/notes/{unknown}")).await, 404).await;
    problem(app.get("/notes/not-a-uuid").await, 404).await;
    problem(app.get("/notes/%FF").await, 400).await;
    app.stop().await;
}

async fn a_cached_list_is_invalidated_by_the_next_written_batch() {
    // A TTL far longer than the test: only an invalidation can show the new note.
    let app = spawn_app_with(&["--cache-ttl", "1h"]).await;
    assert!(list(&app, "").await.is_empty());
    let id = save(&app, "fresh").await;
    until_listed(&app, &id, Duration::from_secs(5)).await;
    // The refreshed list is cached again, and the next batch invalidates it again.
    let second = save(&app, "fresher").await;
    until_listed(&app, &second, Duration::from_secs(5)).await;
    app.stop().await;
}

async fn a_full_queue_refuses_saves_with_503_and_retry_after() {
    // No workers: the queue only grows.
    let app = spawn_app_with(&["--role", "api", "--queue-limit", "3"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let response = app.post("/save", &json!({ "content": "more" })).await;
        if response.status() == 503 {
            break response;
        }
        assert_eq!(response.status(), 202);
        assert!(Instant::now() < deadline, "the queue was never full");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = problem(refused, 503).await;
    assert!(
        body["detail"].as_str().unwrap().contains("limit of 3"),
        "{body}"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    // At least this one: the recorder is the process's, shared with tests running beside.
    assert!(
        metric(&metrics, "notes_saves_refused_total") >= 1.0,
        "{metrics}"
    );
    // Workers drain the queue, and saves are accepted again.
    let workers = spawn_app_beside(&app, &["--role", "workers"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = app.post("/save", &json!({ "content": "later" })).await;
        if response.status() == 202 {
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers.stop().await;
    app.stop().await;
}

async fn the_api_and_the_workers_run_as_separate_processes_and_the_api_cache_follows_the_workers() {
    let api = spawn_app_with(&["--role", "api", "--cache-ttl", "1h"]).await;
    // The API process caches the empty list; nothing in it writes notes.
    assert!(list(&api, "").await.is_empty());
    let id = save(&api, "queued by the api").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(list(&api, "").await.is_empty(), "no worker runs yet");
    let workers = spawn_app_beside(&api, &["--role", "workers"]).await;
    // The workers' batch, committed in another process, invalidates the API's cache.
    until_listed(&api, &id, Duration::from_secs(5)).await;
    // The workers process serves no notes routes.
    assert_eq!(workers.get("/").await.status(), 404);
    workers.stop().await;
    api.stop().await;
}

async fn the_workers_write_in_batches_and_say_so_in_metrics() {
    // Queue 300 notes before any worker runs, then let one drain them in batches of 100.
    let api = spawn_app_with(&["--role", "api"]).await;
    let mut saved = Vec::new();
    for n in 0..300 {
        saved.push(save(&api, &format!("batch {n}")).await);
    }
    let workers = spawn_app_beside(&api, &["--role", "workers", "--worker-batch", "100"]).await;
    for id in &saved {
        written(&api, id).await;
    }
    let metrics = workers.get("/metrics").await.text().await.unwrap();
    let count = metric(
        &metrics,
        "conveyor_handler_batch_messages_count{group=\"notes.workers\"}",
    );
    let sum = metric(
        &metrics,
        "conveyor_handler_batch_messages_sum{group=\"notes.workers\"}",
    );
    // The recorder is the process's, shared with tests running beside this one: at least
    // these 300 notes, in batches far larger than one.
    assert!(sum >= 300.0, "{metrics}");
    assert!(count < sum / 4.0, "{sum} notes in {count} batches");
    assert!(metrics.contains("conveyor_handler_batch_seconds_count{group=\"notes.workers\"}"));
    workers.stop().await;
    api.stop().await;
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}
