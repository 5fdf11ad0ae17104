//! MyEvents split across two `conveyor serve` processes that share nothing but a broker
//! (Redis Streams, NATS JetStream, RabbitMQ): events in one, with its own database, bookings in the
//! other, with its own. And the notes service's API and workers in two processes on each
//! broker.

#![allow(clippy::unwrap_used)]

mod common;

use common::notes::{assert_each_once, until_all_listed};
use common::process::{database, reqwest, scratch_database, Server};
use platform::testing::Scratch;
use platform::Backend;
use serde_json::Value;
use std::time::{Duration, Instant};
use transport_redis::testing::OwnRedis;

#[derive(Clone, Copy)]
enum Broker {
    Redis,
    Nats,
    Amqp,
}

/// A bus of the test's own on `broker`: names in a namespace no other test uses, deleted
/// when it is dropped.
struct TestBus {
    url: String,
    broker: Broker,
}

impl TestBus {
    fn new(broker: Broker) -> TestBus {
        let (variable, default) = match broker {
            Broker::Redis => ("CONVEYOR_TEST_REDIS", "redis://127.0.0.1:6379"),
            Broker::Nats => ("CONVEYOR_TEST_NATS", "nats://127.0.0.1:4222"),
            Broker::Amqp => (
                "CONVEYOR_TEST_AMQP",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
        };
        let server = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
        let namespace = format!("test{}", uuid::Uuid::now_v7().simple());
        TestBus {
            url: format!("{server}?namespace={namespace}"),
            broker,
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let url = self.url.clone();
        match self.broker {
            Broker::Redis => reqwest::runtime().block_on(async move {
                if let Ok(redis) = transport_redis::RedisBroker::connect(&url).await {
                    let _ = redis.delete_namespace().await;
                }
            }),
            Broker::Nats => reqwest::runtime().block_on(async move {
                if let Ok(nats) = transport_nats::NatsBroker::connect(&url).await {
                    let _ = nats.delete_namespace().await;
                }
            }),
            Broker::Amqp => reqwest::runtime().block_on(async move {
                if let Ok(rabbit) = transport_amqp::AmqpBroker::connect(&url).await {
                    for (groups, topic) in AMQP_NAMES {
                        let _ = rabbit.delete(groups, topic).await;
                    }
                    let _ = rabbit.delete_dead_letters().await;
                }
            }),
        }
    }
}

/// The groups and topics of the services these tests run, whose RabbitMQ queues and
/// exchanges a test deletes after it.
const AMQP_NAMES: &[(&[&str], &str)] = &[
    (&["bookings.learn-events"], "events.events"),
    (&[], "bookings.events"),
    (&["notes.workers"], "notes.commands"),
    (&[], "notes.events"),
];

/// One service's process: its data directory and database.
struct Service {
    data: tempfile::TempDir,
    scratch: Scratch,
    db: Option<String>,
    services: &'static str,
}

impl Service {
    fn new(backend: Backend, services: &'static str) -> Service {
        let (scratch, db) = database(backend);
        Service {
            data: tempfile::tempdir().unwrap(),
            scratch,
            db,
            services,
        }
    }

    fn start(&self, bus: &str) -> Server {
        self.start_with(bus, &[])
    }

    fn start_with(&self, bus: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--services", self.services, "--bus", bus];
        args.extend_from_slice(extra);
        Server::start_with(self.data.path(), self.db.as_deref(), &args)
    }

    /// Runs `sql`, a count, on this service's database.
    async fn count(&self, sql: &'static str) -> i64 {
        let db = scratch_database(&self.scratch, self.data.path()).await;
        let count = db
            .read(move |conn| Ok::<i64, platform::StoreError>(conn.scalar(sql, ())?))
            .await
            .unwrap();
        db.close().await;
        count
    }
}

fn seed(name: &str) -> String {
    serde_json::json!({
        "name": name, "startdate": 1, "enddate": 2, "duration": 60,
        "location": { "name": "hall", "halls": [{ "name": "a", "location": "b", "capacity": 10 }] }
    })
    .to_string()
}

async fn create_event(client: &::reqwest::Client, base: &str, name: &str) -> String {
    let response = client
        .post(format!("{base}/events"))
        .body(seed(name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    created["ID"].as_str().unwrap().to_owned()
}

/// Waits (up to 20 s) until bookings at `base` knows every event of `ids`.
async fn wait_until_bookable(client: &::reqwest::Client, base: &str, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in ids {
        loop {
            let status = client
                .get(format!("{base}/events/{id}/bookings"))
                .send()
                .await
                .unwrap()
                .status();
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "event {id} never became bookable"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn an_event_created_in_one_process_becomes_bookable_in_the_other(broker: Broker, backend: Backend) {
    let bus = TestBus::new(broker);
    let bus = bus.url.as_str();
    let events = Service::new(backend, "events");
    let bookings = Service::new(backend, "bookings");
    let (events_server, bookings_server) = (events.start(bus), bookings.start(bus));
    let client = ::reqwest::Client::new();
    reqwest::runtime().block_on(async {
        let id = create_event(&client, &events_server.base, "split").await;
        // Each process serves its own services' routes only.
        let elsewhere = |base: &str, path: String| {
            let (client, url) = (client.clone(), format!("{base}{path}"));
            async move { client.get(url).send().await.unwrap().status() }
        };
        assert_eq!(
            elsewhere(&events_server.base, format!("/events/{id}/bookings")).await,
            404
        );
        assert_eq!(
            elsewhere(&bookings_server.base, format!("/events/{id}")).await,
            404
        );

        wait_until_bookable(&client, &bookings_server.base, std::slice::from_ref(&id)).await;
        let booked = client
            .post(format!("{}/events/{id}/bookings", bookings_server.base))
            .body(r#"{"seats":2,"user":"ann"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(booked.status(), 201);
    });
    drop((events_server, bookings_server));
    reqwest::runtime().block_on(async {
        // Nothing of one service is in the other's database.
        assert_eq!(
            bookings.count("SELECT COUNT(*) FROM bookings_events").await,
            1
        );
        assert_eq!(
            events
                .count("SELECT COUNT(*) FROM conveyor_log WHERE name = 'events.EventCreated'")
                .await,
            1
        );
        assert_eq!(
            bookings
                .count("SELECT COUNT(*) FROM conveyor_log WHERE name = 'events.EventCreated'")
                .await,
            0
        );
    });
}

#[test]
fn on_redis_and_sqlite_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Redis, Backend::Sqlite);
}

#[test]
fn on_redis_and_postgres_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Redis, Backend::Postgres);
}

#[test]
fn on_redis_and_mariadb_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Redis, Backend::Mysql);
}

#[test]
fn on_nats_and_postgres_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Nats, Backend::Postgres);
}

#[test]
fn on_nats_and_mariadb_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Nats, Backend::Mysql);
}

fn a_killed_bookings_process_catches_up_on_restart(broker: Broker, backend: Backend) {
    let bus = TestBus::new(broker);
    let bus = bus.url.as_str();
    let events = Service::new(backend, "events");
    let bookings = Service::new(backend, "bookings");
    let events_server = events.start(bus);
    let bookings_server = bookings.start(bus);
    let client = ::reqwest::Client::new();
    let runtime = reqwest::runtime();
    let first = runtime.block_on(create_event(&client, &events_server.base, "before"));
    runtime.block_on(wait_until_bookable(
        &client,
        &bookings_server.base,
        std::slice::from_ref(&first),
    ));
    bookings_server.signal("KILL");
    drop(bookings_server);

    let created: Vec<String> = runtime.block_on(async {
        let mut created = Vec::new();
        for n in 0..50 {
            created
                .push(create_event(&client, &events_server.base, &format!("while-down-{n}")).await);
        }
        created
    });
    let restarted = bookings.start(bus);
    runtime.block_on(async {
        wait_until_bookable(&client, &restarted.base, &created).await;
        // Each learned once: one copy per event, the copy its own dedupe mark.
        assert_eq!(
            bookings.count("SELECT COUNT(*) FROM bookings_events").await,
            51
        );
    });
    drop((events_server, restarted));
}

#[test]
fn on_rabbitmq_and_postgres_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Amqp, Backend::Postgres);
}

#[test]
fn on_rabbitmq_and_mariadb_an_event_created_in_one_process_becomes_bookable_in_the_other() {
    an_event_created_in_one_process_becomes_bookable_in_the_other(Broker::Amqp, Backend::Mysql);
}

#[test]
fn on_rabbitmq_and_postgres_a_killed_bookings_process_catches_up_on_restart() {
    a_killed_bookings_process_catches_up_on_restart(Broker::Amqp, Backend::Postgres);
}

#[test]
fn on_redis_and_postgres_a_killed_bookings_process_catches_up_on_restart() {
    a_killed_bookings_process_catches_up_on_restart(Broker::Redis, Backend::Postgres);
}

#[test]
fn on_nats_and_mariadb_a_killed_bookings_process_catches_up_on_restart() {
    a_killed_bookings_process_catches_up_on_restart(Broker::Nats, Backend::Mysql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_so_while_the_broker_does_not_answer() {
    let mut redis = OwnRedis::start();
    let app = common::spawn_app_with(&["--services", "events", "--bus", &redis.url()]).await;
    assert_eq!(app.get("/health/ready").await.status(), 200);

    tokio::task::block_in_place(|| redis.stop());
    let problem = common::problem(app.get("/health/ready").await, 503).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("the broker does not answer"), "{detail}");

    tokio::task::block_in_place(|| redis.resume());
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.get("/health/ready").await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// The notes API in one process and its workers in another, on one PostgreSQL database and
/// `broker`. While no worker runs, the queue fills until the API refuses saves (503 with
/// `Retry-After`); what it accepted before waits on the broker (on RabbitMQ too, where the
/// API declared the workers' queues), and once the workers start every accepted note is
/// listed once, and saves are accepted again.
fn notes_split_across_processes(broker: Broker) {
    let bus = TestBus::new(broker);
    let service = Service::new(Backend::Postgres, "notes");
    let api = service.start_with(&bus.url, &["--role", "api", "--queue-limit", "20"]);
    let runtime = reqwest::runtime();
    let client = ::reqwest::Client::new();
    let accepted = runtime.block_on(save_until_refused(&client, &api.base));
    assert!(accepted.len() > 20, "refused at {} queued", accepted.len());
    let _workers = service.start_with(&bus.url, &["--role", "workers"]);
    let listed = runtime.block_on(until_all_listed(
        &api.base,
        accepted.len(),
        Duration::from_secs(30),
    ));
    assert_each_once(&accepted, &listed);
    runtime.block_on(until_a_save_is_accepted(&client, &api.base));
}

async fn save(client: &::reqwest::Client, base: &str) -> ::reqwest::Response {
    client
        .post(format!("{base}/save"))
        .body(r#"{"content":"queued"}"#)
        .send()
        .await
        .unwrap()
}

/// Saves notes one after another until the API refuses one for a full queue; the ids of
/// those it accepted.
async fn save_until_refused(client: &::reqwest::Client, base: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut accepted = Vec::new();
    loop {
        let response = save(client, base).await;
        if response.status() == 503 {
            assert!(response.headers().contains_key("retry-after"));
            let problem: Value = response.json().await.unwrap();
            assert!(
                problem["detail"].as_str().unwrap().contains("limit"),
                "{problem}"
            );
            return accepted;
        }
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        accepted.push(body["id"].as_str().unwrap().to_owned());
        assert!(
            Instant::now() < deadline,
            "{} saves and none refused",
            accepted.len()
        );
    }
}

/// Waits (up to 20 s) until the API accepts a save again: the queue drained.
async fn until_a_save_is_accepted(client: &::reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while save(client, base).await.status() != 202 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn on_redis_the_notes_api_and_workers_run_in_two_processes() {
    notes_split_across_processes(Broker::Redis);
}

#[test]
fn on_nats_the_notes_api_and_workers_run_in_two_processes() {
    notes_split_across_processes(Broker::Nats);
}

#[test]
fn on_rabbitmq_the_notes_api_and_workers_run_in_two_processes() {
    notes_split_across_processes(Broker::Amqp);
}
