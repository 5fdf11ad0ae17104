//! A server database that drops every connection of the app (a failover, a restart, an
//! administrator's `pg_terminate_backend`): the app reconnects its writers, readers and
//! listener, answers again, and every event it accepted is learned.

#![allow(clippy::unwrap_used)]

mod common;

use common::spawn_app_with;
use platform::Backend;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_app_reconnects_after_its_connections_are_killed() {
    reconnects_after_its_connections_are_killed(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb_the_app_reconnects_after_its_connections_are_killed() {
    reconnects_after_its_connections_are_killed(Backend::Mysql).await;
}

async fn reconnects_after_its_connections_are_killed(backend: Backend) {
    let app = common::BACKEND.scope(backend, spawn_app_with(&[])).await;
    let before = app.create_event("before the loss", 5).await;
    app.wait_until_bookable(&before).await;

    let killed = kill_connections_of(&app).await;
    assert!(killed >= 3, "only {killed} connections were the app's");
    // Reads go on, on new connections.
    for _ in 0..8 {
        assert_eq!(
            app.get(&format!("/events/{before}/bookings"))
                .await
                .status(),
            200
        );
    }

    // The first requests after the loss may fail (5xx): their connection was gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut accepted, mut failed) = (Vec::new(), 0);
    while accepted.len() < 20 {
        assert!(Instant::now() < deadline, "the app never recovered");
        let response = app.post("/events", &common::seed_event("after", 5)).await;
        if response.status() == 201 {
            let body: serde_json::Value = response.json().await.unwrap();
            accepted.push(body["ID"].as_str().unwrap().to_owned());
        } else {
            assert!(response.status().is_server_error(), "{}", response.status());
            failed += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("{failed} requests failed while the app reconnected");
    assert_eq!(app.get("/health/ready").await.status(), 200);
    for id in &accepted {
        assert_eq!(app.get(&format!("/events/{id}")).await.status(), 200);
        app.wait_until_bookable(id).await;
    }
    app.stop().await;
}

/// Ends every session on the app's database but this one; how many there were.
async fn kill_connections_of(app: &common::TestApp) -> i64 {
    let database = app.database.clone();
    tokio::task::spawn_blocking(move || {
        let conn = database.connect();
        if database.backend() == Backend::Postgres {
            return conn
                .scalar(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    (),
                )
                .unwrap();
        }
        let sessions: Vec<i64> = conn
            .query_map(
                "SELECT id FROM information_schema.processlist \
                 WHERE db = DATABASE() AND id <> CONNECTION_ID()",
                (),
                |row| row.get(0),
            )
            .unwrap();
        for id in &sessions {
            conn.execute_batch(&format!("KILL {id}")).unwrap();
        }
        sessions.len() as i64
    })
    .await
    .unwrap()
}
