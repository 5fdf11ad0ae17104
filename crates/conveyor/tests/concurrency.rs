//! Bookings never oversell, also when hundreds of requests race for the last seats.

#![allow(clippy::unwrap_used)]

mod common;

use common::spawn_app;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_one_seat_bookings_on_a_hundred_seat_event_sell_exactly_a_hundred() {
    let app = spawn_app().await;
    let id = app.create_event("sold out", 100).await;
    app.wait_until_bookable(&id).await;
    let path = format!("/events/{id}/bookings");

    let requests = (0..300).map(|i| {
        let (client, url) = (app.client.clone(), app.url(&path));
        tokio::spawn(async move {
            let body = json!({ "seats": 1, "user": format!("booker {i}") });
            client
                .post(url)
                .body(body.to_string())
                .send()
                .await
                .expect("POST")
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        statuses.push(request.await.expect("join"));
    }
    assert_eq!(
        statuses.iter().filter(|&&status| status == 201).count(),
        100
    );
    assert_eq!(
        statuses.iter().filter(|&&status| status == 409).count(),
        200
    );

    let summary: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(summary["Booked"], 100);
    assert_eq!(summary["Available"], 0);
    assert_eq!(summary["Bookings"].as_array().unwrap().len(), 100);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_summary_read_while_seats_sell_counts_exactly_the_bookings_it_lists() {
    let app = spawn_app().await;
    let id = app.create_event("busy", 400).await;
    app.wait_until_bookable(&id).await;
    let path = format!("/events/{id}/bookings");
    let booking = (0..400).map(|i| {
        let (client, url) = (app.client.clone(), app.url(&path));
        tokio::spawn(async move {
            let body = json!({ "seats": 1, "user": format!("booker {i}") });
            client.post(url).body(body.to_string()).send().await
        })
    });
    let booking: Vec<_> = booking.collect();
    let mut reads = 0;
    while booking.iter().any(|request| !request.is_finished()) {
        let summary: Value = app.get(&path).await.json().await.unwrap();
        let listed = summary["Bookings"].as_array().unwrap().len();
        assert_eq!(summary["Booked"], listed, "one snapshot: {summary}");
        reads += 1;
    }
    for request in booking {
        assert_eq!(request.await.unwrap().unwrap().status(), 201);
    }
    assert!(reads > 0);
    app.stop().await;
}
