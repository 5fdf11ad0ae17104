//! MyEvents' REST contract through real HTTP against the real application, on SQLite,
//! PostgreSQL and MariaDB.

#![allow(clippy::unwrap_used)]

mod common;

use common::{problem, seed_event, spawn_app, spawn_app_on, spawn_app_with};
use serde_json::{json, Value};

// The SQLite-only test at the end reproduces a database SQLite migrated from its first schema.
on_every_backend!(
    creating_the_seed_event_returns_it_with_ids_and_a_location_header,
    an_event_is_found_by_id_by_the_search_form_and_by_name,
    unknown_events_and_locations_are_404_problems,
    events_are_listed_newest_first_with_limit_and_offset,
    invalid_events_are_400_problems_naming_the_field,
    keys_match_whatever_their_case_and_the_content_type_is_ignored,
    an_event_can_reuse_a_known_location,
    bookings_learns_events_and_sells_seats_until_none_are_left,
    bad_bookings_are_400_and_unknown_events_404,
    bodies_over_the_limit_are_413_problems,
    the_default_body_limit_is_one_mebibyte,
    browsers_on_other_origins_may_call,
    cors_origins_can_be_restricted,
    health_metrics_openapi_and_request_ids,
    the_openapi_document_declares_problem_json_for_every_error,
    the_docs_page_loads_nothing_from_elsewhere,
    paths_that_do_not_decode_are_400_problems,
    integers_written_with_a_zero_fraction_are_integers,
    wrong_methods_are_405_problems,
    the_api_and_the_workers_can_run_as_separate_roles_on_one_database,
);

async fn creating_the_seed_event_returns_it_with_ids_and_a_location_header() {
    let app = spawn_app().await;
    let response = app.post("/events", &seed_event("best", 150)).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["ID"].as_str().unwrap();
    assert_eq!(location, format!("/events/{id}"));
    assert_eq!(body["Name"], "best");
    assert_eq!(body["StartDate"], 768346784368i64);
    assert_eq!(body["EndDate"], 768346784368i64);
    assert_eq!(body["Duration"], 120);
    assert_eq!(body["Location"]["Name"], "Paris fifa park");
    assert_eq!(body["Location"]["OpenTime"], 10);
    assert_eq!(body["Location"]["CloseTime"], 15);
    assert!(body["Location"]["ID"].as_str().is_some());
    assert_eq!(
        body["Location"]["Halls"],
        json!([{ "name": "lobby", "location": "principal building", "capacity": 150 }])
    );
    app.stop().await;
}

async fn an_event_is_found_by_id_by_the_search_form_and_by_name() {
    let app = spawn_app().await;
    let id = app.create_event("jazz night", 10).await;
    for path in [
        format!("/events/{id}"),
        format!("/events/id/{id}"),
        "/events/name/jazz%20night".to_owned(),
    ] {
        let response = app.get(&path).await;
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ID"], id.as_str(), "{path}");
        assert_eq!(body["Name"], "jazz night");
    }
    app.stop().await;
}

async fn unknown_events_and_locations_are_404_problems() {
    let app = spawn_app().await;
    for path in [
        "/events/01a204d9-2352-7542-92a4-832787292160",
        "/events/not-an-id",
        "/events/id/01a204d9-2352-7542-92a4-832787292160",
        "/events/name/nobody",
        "/locations/01a204d9-2352-7542-92a4-832787292160",
        "/events/01a204d9-2352-7542-92a4-832787292160/bookings",
        "/no/such/route",
    ] {
        problem(app.get(path).await, 404).await;
    }
    app.stop().await;
}

async fn events_are_listed_newest_first_with_limit_and_offset() {
    let app = spawn_app().await;
    for name in ["first", "second", "third"] {
        app.create_event(name, 5).await;
    }
    let all: Vec<Value> = app.get("/events").await.json().await.unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|event| event["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["third", "second", "first"]);
    let page: Vec<Value> = app
        .get("/events?limit=1&offset=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["Name"], "second");
    for query in ["limit=0", "limit=1001", "offset=-1", "limit=ten"] {
        problem(app.get(&format!("/events?{query}")).await, 400).await;
    }
    app.stop().await;
}

async fn invalid_events_are_400_problems_naming_the_field() {
    let app = spawn_app().await;
    type Breakage = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Breakage)> = vec![
        ("name", Box::new(|e| e["name"] = json!(""))),
        ("name", Box::new(|e| e["name"] = json!("x".repeat(201)))),
        ("enddate", Box::new(|e| e["enddate"] = json!(1))),
        ("duration", Box::new(|e| e["duration"] = json!(0))),
        (
            "location.opentime",
            Box::new(|e| e["location"]["opentime"] = json!(25)),
        ),
        (
            "location.closetime",
            Box::new(|e| e["location"]["closetime"] = json!(-1)),
        ),
        (
            "location.halls",
            Box::new(|e| e["location"]["halls"] = json!([])),
        ),
        (
            "location.halls[0].capacity",
            Box::new(|e| e["location"]["halls"][0]["capacity"] = json!(0)),
        ),
        (
            "startdate",
            Box::new(|e| e["startdate"] = json!("yesterday")),
        ),
        (
            "location.id",
            Box::new(|e| e["location"]["id"] = json!("01a204d9-2352-7542-92a4-832787292160")),
        ),
    ];
    for (field, break_it) in cases {
        let mut event = seed_event("bad", 10);
        break_it(&mut event);
        let body = problem(app.post("/events", &event).await, 400).await;
        assert_eq!(body["errors"][0]["field"], field, "{body}");
    }
    for malformed in ["", "{", "[1, 2]", "name=best", "null"] {
        problem(app.post_raw("/events", malformed.to_owned()).await, 400).await;
    }
    assert!(app
        .get("/events")
        .await
        .json::<Vec<Value>>()
        .await
        .unwrap()
        .is_empty());
    app.stop().await;
}

async fn keys_match_whatever_their_case_and_the_content_type_is_ignored() {
    let app = spawn_app().await;
    let pascal = json!({
        "Name": "Pascal", "StartDate": 1, "EndDate": 2, "Duration": 3,
        "Location": { "Name": "Hall", "OpenTime": 9, "CloseTime": 17,
                      "Halls": [{ "Name": "main", "Location": "ground", "Capacity": 7 }] },
        "Unknown": "ignored"
    });
    let response = app
        .client
        .post(app.url("/events"))
        .header("content-type", "text/plain")
        .body(pascal.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["Name"], "Pascal");
    assert_eq!(body["Location"]["Halls"][0]["capacity"], 7);
    let without_type = app
        .client
        .post(app.url("/events"))
        .body(seed_event("bare", 1).to_string());
    assert_eq!(without_type.send().await.unwrap().status(), 201);
    app.stop().await;
}

async fn an_event_can_reuse_a_known_location() {
    let app = spawn_app().await;
    let location = json!({ "name": "Arena", "address": "1 Main St", "country": "nl",
        "opentime": 8, "closetime": 23, "halls": [{ "name": "A", "location": "north", "capacity": 40 },
        { "name": "B", "location": "south", "capacity": 60 }] });
    let response = app.post("/locations", &location).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let location_id = created["ID"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get(&format!("/locations/{location_id}")).await.status(),
        200
    );
    let listed: Vec<Value> = app.get("/locations").await.json().await.unwrap();
    assert_eq!(listed.len(), 1);

    let event = json!({ "name": "reuse", "startdate": 1, "enddate": 1, "duration": 1,
        "location": { "ID": location_id } });
    let response = app.post("/events", &event).await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["Location"]["ID"], location_id.as_str());
    assert_eq!(body["Location"]["Name"], "Arena");
    let locations: Vec<Value> = app.get("/locations").await.json().await.unwrap();
    assert_eq!(locations.len(), 1, "no second location was created");

    app.wait_until_bookable(body["ID"].as_str().unwrap()).await;
    let summary: Value = app
        .get(&format!(
            "/events/{}/bookings",
            body["ID"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["Capacity"], 100, "capacity is the sum of the halls");

    let bad = json!({ "name": "", "halls": [] });
    let body = problem(app.post("/locations", &bad).await, 400).await;
    assert_eq!(body["errors"][0]["field"], "halls");
    app.stop().await;
}

async fn bookings_learns_events_and_sells_seats_until_none_are_left() {
    let app = spawn_app().await;
    let id = app.create_event("small", 3).await;
    app.wait_until_bookable(&id).await;
    let path = format!("/events/{id}/bookings");

    let response = app.post(&path, &json!({ "seats": 2, "user": "ann" })).await;
    assert_eq!(response.status(), 201);
    let booking: Value = response.json().await.unwrap();
    assert_eq!(booking["EventID"], id.as_str());
    assert_eq!(booking["Seats"], 2);
    assert_eq!(booking["User"], "ann");
    assert!(booking["ID"].as_str().is_some() && booking["Date"].as_i64().is_some());

    let body = problem(app.post(&path, &json!({ "seats": 2 })).await, 409).await;
    assert!(
        body["detail"].as_str().unwrap().contains("only 1 left"),
        "{body}"
    );
    assert_eq!(app.post(&path, &json!({ "Seats": 1 })).await.status(), 201);

    let summary: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(summary["EventID"], id.as_str());
    assert_eq!(summary["Capacity"], 3);
    assert_eq!(summary["Booked"], 3);
    assert_eq!(summary["Available"], 0);
    assert_eq!(summary["Bookings"].as_array().unwrap().len(), 2);
    app.stop().await;
}

async fn bad_bookings_are_400_and_unknown_events_404() {
    let app = spawn_app().await;
    let id = app.create_event("strict", 3).await;
    app.wait_until_bookable(&id).await;
    let path = format!("/events/{id}/bookings");
    for (body, field) in [
        (json!({ "seats": 0 }), "seats"),
        (json!({}), "seats"),
        (json!({ "seats": "two" }), "seats"),
    ] {
        let problem = problem(app.post(&path, &body).await, 400).await;
        assert_eq!(problem["errors"][0]["field"], field);
    }
    problem(app.post_raw(&path, "seats=1".into()).await, 400).await;
    problem(
        app.post(
            "/events/01a204d9-2352-7542-92a4-832787292160/bookings",
            &json!({ "seats": 1 }),
        )
        .await,
        404,
    )
    .await;
    app.stop().await;
}

async fn bodies_over_the_limit_are_413_problems() {
    let app = spawn_app_with(&["--body-limit", "2048"]).await;
    let mut event = seed_event("big", 1);
    event["padding"] = json!("x".repeat(4096));
    problem(app.post("/events", &event).await, 413).await;
    problem(app.post("/locations", &event).await, 413).await;
    let id = app.create_event("small enough", 1).await;
    problem(
        app.post(
            &format!("/events/{id}/bookings"),
            &json!({ "seats": 1, "user": "x".repeat(4096) }),
        )
        .await,
        413,
    )
    .await;
    app.stop().await;
}

async fn the_default_body_limit_is_one_mebibyte() {
    let app = spawn_app().await;
    let mut event = seed_event("huge", 1);
    event["padding"] = json!("x".repeat(1024 * 1024));
    problem(app.post("/events", &event).await, 413).await;
    app.stop().await;
}

async fn browsers_on_other_origins_may_call() {
    let app = spawn_app().await;
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/events"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let browser = app
        .client
        .get(app.url("/events"))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(browser.headers()["access-control-allow-origin"], "*");
    // CORS headers are for browsers, which always send Origin: other clients get none, and
    // the Vary header keeps a shared cache from serving that answer to a browser.
    let curl = app.client.get(app.url("/events")).send().await.unwrap();
    assert!(curl.headers().get("access-control-allow-origin").is_none());
    assert_eq!(curl.headers()["vary"], "origin");
    app.stop().await;
}

async fn cors_origins_can_be_restricted() {
    let app = spawn_app_with(&["--cors-origins", "http://kiosk.example"]).await;
    let allowed = app
        .client
        .get(app.url("/events"))
        .header("origin", "http://kiosk.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://kiosk.example"
    );
    let other = app
        .client
        .get(app.url("/events"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
}

async fn health_metrics_openapi_and_request_ids() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await.status(), 200);
    assert_eq!(app.get("/health/ready").await.status(), 200);

    let id = app.create_event("measured", 5).await;
    app.wait_until_bookable(&id).await;
    assert_eq!(
        app.post(&format!("/events/{id}/bookings"), &json!({ "seats": 2 }))
            .await
            .status(),
        201
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for expected in [
        "conveyor_handler_handled_total{group=\"bookings.learn-events\",message=\"events.EventCreated\"}",
        "conveyor_handler_duration_seconds_bucket",
        "conveyor_consumer_lag",
        &format!("myevents_bookings_total{{event=\"{id}\"}} 1"),
        &format!("myevents_booking_seats_sum{{event=\"{id}\"}} 2"),
    ] {
        assert!(metrics.contains(expected), "missing {expected}");
    }

    let openapi: Value = app.get("/openapi.json").await.json().await.unwrap();
    for path in [
        "/events",
        "/events/{id}",
        "/events/id/{id}",
        "/events/name/{name}",
        "/locations",
        "/locations/{id}",
        "/events/{id}/bookings",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(openapi["components"]["schemas"]["Problem"].is_object());

    let response = app.get("/events").await;
    assert!(response.headers().contains_key("x-request-id"));
    let echoed = app
        .client
        .get(app.url("/events"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "abc-123");
    app.stop().await;
}

async fn the_openapi_document_declares_problem_json_for_every_error() {
    let app = spawn_app().await;
    let openapi: Value = app.get("/openapi.json").await.json().await.unwrap();
    let problem = json!({ "schema": { "$ref": "#/components/schemas/Problem" } });
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("500"), "{method} {path} has no 500");
            for (status, response) in responses {
                if status.as_str() >= "400" {
                    assert_eq!(
                        response["content"],
                        json!({ "application/problem+json": problem }),
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    // A few of the rules the server enforces, stated in the document.
    let schemas = &openapi["components"]["schemas"];
    assert_eq!(
        schemas["EventRequest"]["required"],
        json!(["name", "startdate", "enddate", "duration", "location"])
    );
    assert_eq!(
        schemas["LocationRequest"]["properties"]["halls"]["minItems"],
        1
    );
    assert_eq!(
        schemas["BookingRequest"]["properties"]["seats"]["minimum"],
        1
    );
    let limit = &openapi["paths"]["/events"]["get"]["parameters"][0];
    assert_eq!(limit["name"], "limit");
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(1000))
    );
    app.stop().await;
}

async fn the_docs_page_loads_nothing_from_elsewhere() {
    let app = spawn_app().await;
    let page = app.get("/docs").await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.url().path(), "/docs/", "redirected to the page");
    let html = page.text().await.unwrap();
    let assets: Vec<&str> = ["src=\"", "href=\""]
        .iter()
        .flat_map(|attribute| html.split(attribute).skip(1))
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert!(assets.len() >= 4, "{html}");
    for asset in assets {
        assert!(
            !asset.starts_with("http:") && !asset.starts_with("https:") && !asset.starts_with("//"),
            "{asset} is fetched from elsewhere"
        );
        let response = app
            .get(&format!("/docs/{}", asset.trim_start_matches("./")))
            .await;
        assert_eq!(response.status(), 200, "{asset}");
        let body = response.text().await.unwrap();
        if asset.ends_with(".css") {
            assert!(
                !body.contains("@import") && !body.contains("url(http") && !body.contains("url(//"),
                "{asset}"
            );
        }
    }
    let initializer = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        initializer.contains("\"url\": \"/openapi.json\""),
        "{initializer}"
    );
    assert!(
        initializer.contains("\"validatorUrl\": \"none\""),
        "{initializer}"
    );
    problem(app.get("/docs/no-such-file.js").await, 404).await;
    app.stop().await;
}

async fn paths_that_do_not_decode_are_400_problems() {
    let app = spawn_app().await;
    for path in [
        "/events/%FF",
        "/events/id/%FF",
        "/events/name/%FF",
        "/locations/%FF",
        "/events/%FF/bookings",
        "/docs/%FF",
    ] {
        problem(app.get(path).await, 400).await;
    }
    problem(
        app.post("/events/%FF/bookings", &json!({ "seats": 1 }))
            .await,
        400,
    )
    .await;
    app.stop().await;
}

async fn integers_written_with_a_zero_fraction_are_integers() {
    let app = spawn_app().await;
    let mut event = seed_event("whole", 1);
    event["location"]["halls"][0]["capacity"] = json!(3.0);
    event["duration"] = json!(1.2e2);
    let response = app.post("/events", &event).await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (&body["Duration"], &body["Location"]["Halls"][0]["capacity"]),
        (&json!(120), &json!(3))
    );
    event["duration"] = json!(2.5);
    let body = problem(app.post("/events", &event).await, 400).await;
    assert_eq!(body["errors"][0]["field"], "duration");
    app.stop().await;
}

async fn wrong_methods_are_405_problems() {
    let app = spawn_app().await;
    problem(
        app.client.delete(app.url("/events")).send().await.unwrap(),
        405,
    )
    .await;
    app.stop().await;
}

async fn the_api_and_the_workers_can_run_as_separate_roles_on_one_database() {
    let api = common::spawn_app_with(&["--role", "api"]).await;
    let id = api.create_event("split roles", 5).await;
    let path = format!("/events/{id}/bookings");
    // Nobody consumes `EventCreated` in an API-only process.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    problem(api.get(&path).await, 404).await;

    let workers = common::spawn_app_beside(&api, &["--role", "workers"]).await;
    problem(workers.get("/events").await, 404).await;
    assert_eq!(workers.get("/health/ready").await.status(), 200);
    api.wait_until_bookable(&id).await;
    assert_eq!(api.post(&path, &json!({ "seats": 5 })).await.status(), 201);
    // The workers learn of the API's commits at once, not at their 5 s safety poll.
    let mut slowest = std::time::Duration::ZERO;
    for n in 0..10 {
        let id = api.create_event(&format!("split {n}"), 5).await;
        let created = std::time::Instant::now();
        api.wait_until_bookable(&id).await;
        slowest = slowest.max(created.elapsed());
    }
    assert!(
        slowest < std::time::Duration::from_secs(1),
        "slowest {slowest:?}"
    );
    workers.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn events_stored_before_the_tables_were_keyed_by_id_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = platform::Database::open(&dir.path().join("conveyor.db"))
        .await
        .unwrap();
    db.migrate(&events::MODULE.migrations[..1]).await.unwrap();
    let (location, older, newer) = (
        platform::uuid::Uuid::now_v7().to_string(),
        platform::uuid::Uuid::now_v7().to_string(),
        platform::uuid::Uuid::now_v7().to_string(),
    );
    let rows = (location.clone(), older.clone(), newer.clone());
    db.write(move |uow| {
        let (location, older, newer) = rows.clone();
        uow.conn().execute(
            "INSERT INTO events_locations (id, name, address, country, open_time, close_time, halls) \
             VALUES (?, 'Old hall', 'Somewhere', 'fr', 9, 17, '[]')",
            [&location],
        )?;
        for (id, name) in [(older, "first"), (newer, "second")] {
            uow.conn().execute(
                "INSERT INTO events_events (id, name, start_date, end_date, duration, location_id) \
                 VALUES (?, ?, 1, 2, 60, ?)",
                (&id, name, &location),
            )?;
        }
        Ok::<_, platform::StoreError>(())
    })
    .await
    .unwrap();
    db.close().await;

    let app = spawn_app_on(dir.path(), &[]).await;
    let by_id: Value = app
        .get(&format!("/events/{older}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_id["Name"], "first");
    assert_eq!(by_id["Location"]["ID"], location.as_str());
    let by_name: Value = app.get("/events/name/second").await.json().await.unwrap();
    assert_eq!(by_name["ID"], newer.as_str());
    let listed: Value = app.get("/events").await.json().await.unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["second", "first"], "newest first");
    app.stop().await;
}
