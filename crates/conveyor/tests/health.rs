//! Health and bounded requests: readiness says whether the database commits, and no request
//! waits forever on a stuck writer.

#![allow(clippy::unwrap_used)]

mod common;

use common::problem;
use edge::HttpOptions;
use std::time::{Duration, Instant};

/// The real services' routes on `db`, served on port 0 with a short request timeout.
async fn serve(db: platform::Database) -> String {
    for service in conveyor::SERVICES {
        db.migrate(service.migrations).await.unwrap();
    }
    let apis = conveyor::SERVICES
        .iter()
        .map(|service| (service.routes)(&edge::ServiceContext::new(db.clone())))
        .collect();
    let options = HttpOptions {
        request_timeout: Duration::from_millis(500),
        ..HttpOptions::default()
    };
    let router = edge::router(apis, db, &options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_makes_the_process_unready_and_requests_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = platform::Database::open(&dir.path().join("conveyor.db"))
        .await
        .unwrap();
    let base = serve(db.clone()).await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // A unit of work that holds the single writer for longer than any deadline.
    let stuck = tokio::spawn({
        let db = db.clone();
        async move {
            db.write(|_| {
                std::thread::sleep(Duration::from_secs(4));
                Ok::<_, platform::StoreError>(())
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let started = Instant::now();
    let created = client
        .post(format!("{base}/events"))
        .body(common::seed_event("waits", 10).to_string())
        .send()
        .await
        .unwrap();
    let body = problem(created, 503).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        body["detail"].as_str().unwrap().contains("did not finish"),
        "{body}"
    );

    let unready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    let body = problem(unready, 503).await;
    assert!(
        body["detail"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );

    stuck.await.unwrap().unwrap();
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready again once the writer is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_every_series_from_the_start() {
    let app = common::spawn_app().await;
    let body = app.get("/metrics").await.text().await.unwrap();
    for series in [
        // A route nobody has called yet, per status class.
        r#"http_requests_total{route="/events/{id}",status="2xx"} 0"#,
        r#"http_request_duration_seconds_bucket{route="/events/{id}",status="5xx",le="0.001"} 0"#,
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "conveyor_log_head 0",
        "conveyor_writer_batch_units_bucket",
        "conveyor_writer_commit_seconds_bucket",
        "conveyor_writer_flush_seconds_bucket",
        r#"conveyor_consumer_lag{group="bookings.learn-events",partition="3"} 0"#,
        r#"conveyor_handler_dead_lettered_total{group="bookings.learn-events",message="events.EventCreated"} 0"#,
    ] {
        assert!(body.contains(series), "no {series} in:\n{body}");
    }
    let id = app.create_event("counted", 10).await;
    app.get(&format!("/events/{id}")).await;
    let body = app.get("/metrics").await.text().await.unwrap();
    assert!(
        body.contains(r#"http_requests_total{route="/events/{id}",status="2xx"} 1"#),
        "{body}"
    );
    // The new location's message and the event's.
    assert!(body.contains("conveyor_log_head 2"), "{body}");
    app.stop().await;
}
