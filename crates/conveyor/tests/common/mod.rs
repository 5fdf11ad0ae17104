//! Test helpers: the real application on port 0 with a database of its own: a SQLite file, or
//! a fresh database on PostgreSQL or MariaDB for the tests `on_every_backend!` runs there.

#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

pub mod notes;
pub mod process;

use clap::Parser;
use conveyor::{Application, SettingsArgs, SERVICES};
use platform::testing::Scratch;
use platform::Backend;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    settings: SettingsArgs,
}

tokio::task_local! {
    /// The database the tests of one `on_every_backend!` module run on.
    pub static BACKEND: Backend;
}

/// Generates, for each test function named, one `#[tokio::test]` per backend, in modules
/// `sqlite`, `postgres` and `mariadb`; `spawn_app*` then start the app on that backend.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::on_every_backend!(@backend sqlite, platform::Backend::Sqlite; $($name),*);
        $crate::on_every_backend!(@backend postgres, platform::Backend::Postgres; $($name),*);
        $crate::on_every_backend!(@backend mariadb, platform::Backend::Mysql; $($name),*);
    };
    (@backend $module:ident, $backend:expr; $($name:ident),*) => {
        mod $module {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::common::BACKEND.scope($backend, super::$name()).await;
            }
        )*}
    };
}

/// The backend of the running test: SQLite outside `on_every_backend!`.
pub fn backend() -> Backend {
    BACKEND
        .try_with(|backend| *backend)
        .unwrap_or(Backend::Sqlite)
}

pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The database, shared with any other process started beside this one.
    pub database: std::sync::Arc<Scratch>,
    /// The data directory.
    pub data: std::path::PathBuf,
}

/// Starts the whole process (all services) on a fresh database with `extra` flags.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let database = std::sync::Arc::new(Scratch::new(backend()).await);
    let data = match database.sqlite_path() {
        Some(file) => file.parent().expect("the file's directory").to_owned(),
        None => std::env::temp_dir(),
    };
    start(database, data, extra).await
}

/// Starts a second process on `app`'s database.
pub async fn spawn_app_beside(app: &TestApp, extra: &[&str]) -> TestApp {
    start(app.database.clone(), app.data.clone(), extra).await
}

/// Starts a process on an existing data directory, as a second process on the same files.
pub async fn spawn_app_on(data: &std::path::Path, extra: &[&str]) -> TestApp {
    let database = std::sync::Arc::new(Scratch::new(Backend::Sqlite).await);
    start(database, data.to_owned(), extra).await
}

async fn start(
    database: std::sync::Arc<Scratch>,
    data: std::path::PathBuf,
    extra: &[&str],
) -> TestApp {
    let data_arg = data.display().to_string();
    let mut argv = vec!["conveyor", "--http", "127.0.0.1:0", "--data", &data_arg];
    if database.backend() != Backend::Sqlite {
        argv.extend(["--db", database.url()]);
    }
    argv.extend_from_slice(extra);
    let settings = Args::parse_from(argv)
        .settings
        .resolve(SERVICES)
        .expect("settings");
    let application = Application::build(settings).await.expect("build");
    let address = application.addresses()[0];
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    TestApp {
        address,
        client: reqwest::Client::new(),
        shutdown,
        task,
        database,
        data,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The seed's event, as its curl command sends it.
pub fn seed_event(name: &str, capacity: i64) -> Value {
    json!({
        "name": name,
        "startdate": 768346784368i64,
        "enddate": 768346784368i64,
        "duration": 120,
        "location": {
            "name": "Paris fifa park",
            "address": "le monses",
            "country": "frn",
            "opentime": 10,
            "closetime": 15,
            "halls": [ { "name": "lobby", "location": "principal building", "capacity": capacity } ]
        }
    })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// POSTs `body` as curl -d does: form-urlencoded Content-Type, JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn post_raw(&self, path: &str, body: String) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// Creates an event and returns its id.
    pub async fn create_event(&self, name: &str, capacity: i64) -> String {
        let response = self.post("/events", &seed_event(name, capacity)).await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        body["ID"].as_str().expect("ID").to_owned()
    }

    /// Waits until bookings has learned event `id` (it learns from messages, asynchronously).
    pub async fn wait_until_bookable(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.get(&format!("/events/{id}/bookings")).await.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("bookings never learned event {id}");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("clean stop");
    }
}

/// Asserts a problem+json response with `status`, returning its body.
pub async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status);
    body
}

/// Match `id` as the replay of its stored events makes it (snapshots ignored): its turn, and
/// the document the API should serve for it.
pub async fn replayed_match(db: &platform::Database, id: &str) -> (u64, Value) {
    let stream = matches::app::stream(id);
    let replayed = db
        .read(move |conn| platform::aggregate::replay::<matches::app::Match>(conn, &stream))
        .await
        .map_err(|error: platform::event_store::EventStoreError| error.to_string())
        .unwrap();
    let started = replayed.state.started().expect("a started match");
    let view = serde_json::to_value(matches::views::MatchView::of(started)).unwrap();
    (u64::from(started.game.turn()), view)
}
