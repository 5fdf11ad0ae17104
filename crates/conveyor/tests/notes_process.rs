//! The notes service as separate `conveyor` processes: an API and workers on MariaDB with
//! the Redis cache, SIGKILL of every process right after a burst of saves, and a database
//! outage under a running worker.

#![allow(clippy::unwrap_used)]

mod common;

use common::notes::{assert_each_once, save_all, until_all_listed};
use common::process::{database, reqwest, scratch_database, Server};
use platform::testing::Scratch;
use platform::Backend;
use std::path::Path;
use std::time::{Duration, Instant};

fn redis_url() -> String {
    std::env::var("CONVEYOR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A notes process of `role` on `db` (SQLite in `data` when `None`), with `extra` flags.
fn notes(data: &Path, db: Option<&str>, role: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--services", "notes", "--role", role];
    args.extend_from_slice(extra);
    Server::start_with(data, db, &args)
}

async fn count(db: &platform::Database, sql: &'static str) -> i64 {
    db.read(move |conn| Ok::<i64, platform::StoreError>(conn.scalar(sql, ())?))
        .await
        .unwrap()
}

async fn stored_ids(db: &platform::Database) -> Vec<String> {
    db.read(|conn| {
        Ok::<_, platform::StoreError>(
            conn.query_map("SELECT id FROM notes_notes", (), |row| row.get(0))?,
        )
    })
    .await
    .unwrap()
}

fn handled_by(server: &Server) -> f64 {
    let series =
        "conveyor_handler_handled_total{group=\"notes.workers\",message=\"notes.SaveNote\"}";
    reqwest::runtime().block_on(async {
        let text = ::reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_default()
    })
}

#[test]
fn an_api_and_two_workers_on_mariadb_with_the_redis_cache_read_back_a_thousand_notes_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (scratch, db) = database(Backend::Mysql);
    let redis = redis_url();
    let cache = ["--cache", redis.as_str()];
    let api = notes(dir.path(), db.as_deref(), "api", &cache);
    let first = notes(dir.path(), db.as_deref(), "workers", &cache);
    let second = notes(dir.path(), db.as_deref(), "workers", &cache);
    let runtime = reqwest::runtime();
    // The second worker joins a group that the first has all of: wait for the share-out.
    runtime.block_on(async {
        let db = scratch.open().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while count(
            &db,
            "SELECT COUNT(DISTINCT owner) FROM conveyor_partitions \
             WHERE group_name = 'notes.workers'",
        )
        .await
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "the workers never shared the queue"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        db.close().await;
    });
    let accepted = runtime.block_on(save_all(&api.base, 1000, 16));
    let listed = runtime.block_on(until_all_listed(&api.base, 1000, Duration::from_secs(30)));
    assert_each_once(&accepted, &listed);
    // Both workers took their share of the queue.
    let (by_first, by_second) = (handled_by(&first), handled_by(&second));
    assert!(
        by_first > 0.0 && by_second > 0.0,
        "{by_first} and {by_second}"
    );
    assert_eq!(by_first + by_second, 1000.0);
}

#[test]
fn on_sqlite_every_accepted_note_survives_a_sigkill_of_every_process_once() {
    every_accepted_note_survives_a_sigkill_of_every_process(Backend::Sqlite);
}

#[test]
fn on_mariadb_every_accepted_note_survives_a_sigkill_of_every_process_once() {
    every_accepted_note_survives_a_sigkill_of_every_process(Backend::Mysql);
}

/// 3,000 concurrent saves through an API process while a worker process writes them; both
/// killed with SIGKILL right after the last 202; then a restarted process writes the rest.
fn every_accepted_note_survives_a_sigkill_of_every_process(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (scratch, db) = database(backend);
    let api = notes(dir.path(), db.as_deref(), "api", &[]);
    let worker = notes(dir.path(), db.as_deref(), "workers", &[]);
    let runtime = reqwest::runtime();
    let accepted = runtime.block_on(save_all(&api.base, 3000, 64));
    api.signal("KILL");
    worker.signal("KILL");
    drop((api, worker));
    assert_eq!(accepted.len(), 3000);

    let restarted = notes(dir.path(), db.as_deref(), "all", &[]);
    runtime.block_on(async {
        let db = scratch_database(&scratch, dir.path()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while count(&db, "SELECT COUNT(*) FROM notes_notes").await < 3000 {
            assert!(Instant::now() < deadline, "the queue was not drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_each_once(&accepted, &stored_ids(&db).await);
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM conveyor_dead_letters").await,
            0
        );
        let listed = until_all_listed(&restarted.base, 3000, Duration::from_secs(10)).await;
        assert_each_once(&accepted, &listed);
        db.close().await;
    });
}

/// The worker's own MariaDB account, so that an outage can be made for it alone.
fn worker_account(scratch: &Scratch) -> (String, String) {
    let conn = scratch.connect();
    let database: String = conn.scalar("SELECT DATABASE()", ()).unwrap();
    let user = format!("w{}", &database[database.len().saturating_sub(12)..]);
    conn.execute_batch(&format!(
        "CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'outage'; \
         GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'127.0.0.1'"
    ))
    .unwrap();
    let url = format!("mysql://{user}:outage@127.0.0.1:3306/{database}");
    (user, url)
}

#[test]
fn on_mariadb_a_database_outage_under_a_running_worker_drops_and_dead_letters_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (scratch, db) = database(Backend::Mysql);
    let (user, worker_url) = worker_account(&scratch);
    let api = notes(dir.path(), db.as_deref(), "api", &[]);
    let worker = notes(dir.path(), Some(&worker_url), "workers", &[]);
    let runtime = reqwest::runtime();
    let mut accepted = runtime.block_on(save_all(&api.base, 200, 8));

    // For 10 s the worker's account may not log in, and its sessions are killed as they
    // appear, while the API (another account) keeps queueing notes.
    let admin = scratch.connect();
    admin
        .execute_batch(&format!("ALTER USER '{user}'@'127.0.0.1' ACCOUNT LOCK"))
        .unwrap();
    let outage_ends = Instant::now() + Duration::from_secs(10);
    let saving = {
        let base = api.base.clone();
        std::thread::spawn(move || reqwest::runtime().block_on(save_all(&base, 200, 4)))
    };
    let mut killed = 0;
    while Instant::now() < outage_ends {
        let sessions: Vec<i64> = admin
            .query_map(
                "SELECT id FROM information_schema.processlist WHERE user = ?",
                (&user,),
                |row| row.get(0),
            )
            .unwrap();
        for session in sessions {
            // A session may end by itself between the list and the kill.
            if admin.execute_batch(&format!("KILL {session}")).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    accepted.extend(saving.join().unwrap());
    admin
        .execute_batch(&format!("ALTER USER '{user}'@'127.0.0.1' ACCOUNT UNLOCK"))
        .unwrap();
    assert!(killed > 0, "the worker had no session to cut");

    runtime.block_on(async {
        let db = scratch.open().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while count(&db, "SELECT COUNT(*) FROM notes_notes").await < 400 {
            assert!(Instant::now() < deadline, "the worker did not resume");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_each_once(&accepted, &stored_ids(&db).await);
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM conveyor_dead_letters").await,
            0
        );
        db.close().await;
    });
    drop(worker);
    drop(api);
    let _ = admin.execute_batch(&format!("DROP USER '{user}'@'127.0.0.1'"));
}
