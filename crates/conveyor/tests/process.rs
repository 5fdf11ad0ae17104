//! The real `conveyor` binary: crash safety, graceful shutdown, configuration errors and the
//! dead-letter commands.

#![allow(clippy::unwrap_used)]

mod common;

use common::process::{database, free_port, reqwest, scratch_database, Server, BINARY};
use platform::Backend;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn seed(name: &str) -> String {
    serde_json::json!({
        "name": name, "startdate": 1, "enddate": 2, "duration": 60,
        "location": { "name": "hall", "halls": [{ "name": "a", "location": "b", "capacity": 10 }] }
    })
    .to_string()
}

/// The harness's own guard: a second server given a port the first holds cannot bind it and
/// exits, and is not taken for ready because the first answers on that port.
#[test]
fn a_server_whose_port_another_holds_is_not_taken_for_ready() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path());
    let port = first.base.rsplit(':').next().unwrap().to_owned();
    let other = tempfile::tempdir().unwrap();
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(other.path())
        .stderr(Stdio::null());
    let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Server::spawn(command, port.parse().unwrap())
    }));
    assert!(second.is_err(), "the second server was taken for ready");
}

/// mimalloc would otherwise fill whole 2 MiB pages for each thread's heap (an idle RSS of
/// 83 MB on MariaDB).
#[cfg(target_os = "linux")]
#[test]
fn a_served_process_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "THP_enabled in /proc/PID/status");
}

#[test]
fn events_created_before_a_sigkill_survive_it_and_bookings_learns_them_all() {
    sigkill_mid_load(Backend::Sqlite);
}

#[test]
fn on_postgres_events_created_before_a_sigkill_survive_it_and_are_learned_once() {
    sigkill_mid_load(Backend::Postgres);
}

#[test]
fn on_mariadb_events_created_before_a_sigkill_survive_it_and_are_learned_once() {
    sigkill_mid_load(Backend::Mysql);
}

fn sigkill_mid_load(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (scratch, db) = database(backend);
    let runtime = reqwest::runtime();
    let server = Server::start_on(dir.path(), db.as_deref());
    let client = ::reqwest::Client::new();

    // Create events concurrently and kill the process while requests are still in flight.
    let (ids, base) = (
        std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        server.base.clone(),
    );
    let creating = {
        let (ids, client) = (ids.clone(), client.clone());
        std::thread::spawn(move || {
            reqwest::runtime().block_on(async move {
                let mut tasks = Vec::new();
                for worker in 0..8 {
                    let (ids, client, base) = (ids.clone(), client.clone(), base.clone());
                    tasks.push(tokio::spawn(async move {
                        for i in 0.. {
                            let sent = client
                                .post(format!("{base}/events"))
                                .body(seed(&format!("e{worker}-{i}")))
                                .send()
                                .await;
                            let Ok(response) = sent else { break };
                            if response.status() != 201 {
                                break;
                            }
                            let Ok(body) = response.json::<Value>().await else {
                                break;
                            };
                            ids.lock()
                                .unwrap()
                                .push(body["ID"].as_str().unwrap().to_owned());
                        }
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.lock().unwrap().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.signal("KILL");
    creating.join().unwrap();
    drop(server);
    let created = ids.lock().unwrap().clone();
    assert!(
        created.len() >= 200,
        "only {} events created before the kill",
        created.len()
    );

    let restarted = Server::start_on(dir.path(), db.as_deref());
    runtime.block_on(async {
        for id in &created {
            let event = client
                .get(format!("{}/events/{id}", restarted.base))
                .send()
                .await
                .unwrap();
            assert_eq!(event.status(), 200, "event {id} was lost");
        }
        wait_until_bookable(&client, &restarted.base, &created).await;
    });
    // Every event committed was published once and handled once, whatever the kill cut off
    // (some committed without their response reaching the client).
    runtime.block_on(async {
        let db = scratch_database(&scratch, dir.path()).await;
        let count = |sql: &'static str| {
            let db = db.clone();
            async move {
                db.read(move |conn| Ok::<i64, platform::StoreError>(conn.scalar(sql, ())?))
                    .await
                    .unwrap()
            }
        };
        let events = count("SELECT COUNT(*) FROM events_events").await;
        let published =
            count("SELECT COUNT(*) FROM conveyor_log WHERE name = 'events.EventCreated'").await;
        assert_eq!(
            published, events,
            "an event and its message did not commit together"
        );
        // Bookings' copy of an event is keyed by the event's id and inserted only if new, so
        // the copy is its own dedupe mark: one copy of each committed event, and no other,
        // is each learned once.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let copies = count("SELECT COUNT(*) FROM bookings_events").await;
            let of_events = count(
                "SELECT COUNT(*) FROM bookings_events JOIN events_events \
                 ON events_events.id = bookings_events.id",
            )
            .await;
            assert_eq!(
                copies, of_events,
                "bookings learned an event never committed"
            );
            if copies == events {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{copies} of {events} events learned"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db.close().await;
    });
    drop(restarted);
}

/// Creates an event with one hall of `capacity` seats through the server at `base`; its id.
async fn create_event(client: &::reqwest::Client, base: &str, name: &str, capacity: i64) -> String {
    let event = serde_json::json!({
        "name": name, "startdate": 1, "enddate": 2, "duration": 60,
        "location": { "name": "hall", "halls": [{ "name": "a", "location": "b", "capacity": capacity }] }
    });
    let created: Value = client
        .post(format!("{base}/events"))
        .body(event.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["ID"].as_str().unwrap().to_owned()
}

/// Books one seat for each `(server, event id)`, all at once; the statuses, in order.
async fn book_one_seat_each<'a>(
    client: &::reqwest::Client,
    targets: impl Iterator<Item = (&'a Server, &'a String)>,
) -> Vec<u16> {
    let bookings: Vec<_> = targets
        .map(|(server, id)| {
            let request = client
                .post(format!("{}/events/{id}/bookings", server.base))
                .body(r#"{"seats": 1}"#)
                .send();
            tokio::spawn(async move { request.await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for booking in bookings {
        statuses.push(booking.await.unwrap());
    }
    statuses
}

#[test]
fn two_processes_on_one_postgres_database_sell_exactly_the_seats() {
    two_processes_sell_exactly_the_seats(Backend::Postgres);
}

#[test]
fn two_processes_on_one_mariadb_database_sell_exactly_the_seats() {
    two_processes_sell_exactly_the_seats(Backend::Mysql);
}

#[test]
fn two_processes_on_one_sqlite_file_sell_exactly_the_seats() {
    two_processes_sell_exactly_the_seats(Backend::Sqlite);
}

/// 300 concurrent one-seat bookings of a 100-seat event, half through each of two
/// `conveyor serve` processes on one database: exactly 100 succeed, the rest are sold out.
fn two_processes_sell_exactly_the_seats(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_scratch, db) = database(backend);
    let first = Server::start_on(dir.path(), db.as_deref());
    let second = Server::start_on(dir.path(), db.as_deref());
    let client = ::reqwest::Client::new();
    let runtime = reqwest::runtime();
    let (booked, sold_out, summary) = runtime.block_on(async {
        let id = create_event(&client, &first.base, "a hundred seats", 100).await;
        wait_until_bookable(&client, &first.base, std::slice::from_ref(&id)).await;
        wait_until_bookable(&client, &second.base, std::slice::from_ref(&id)).await;
        let targets = (0..300).map(|n| (if n % 2 == 0 { &first } else { &second }, &id));
        let statuses = book_one_seat_each(&client, targets).await;
        let summary: Value = client
            .get(format!("{}/events/{id}/bookings", second.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let count = |status| statuses.iter().filter(|s| **s == status).count();
        (count(201), count(409), summary)
    });
    assert_eq!((booked, sold_out), (100, 200), "201s and 409s");
    assert_eq!(summary["Booked"], 100, "{summary}");
    assert_eq!(summary["Bookings"].as_array().unwrap().len(), 100);
}

/// Waits (up to 20 s) until bookings has learned every event of `ids`.
async fn wait_until_bookable(client: &::reqwest::Client, base: &str, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in ids {
        loop {
            let summary = client
                .get(format!("{base}/events/{id}/bookings"))
                .send()
                .await
                .unwrap();
            if summary.status() == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bookings never learned event {id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Creates events until the server refuses one; returns the ids of those it created.
async fn create_until_refused(client: &::reqwest::Client, base: &str) -> Vec<String> {
    let mut created = Vec::new();
    for n in 0..100_000 {
        let response = client
            .post(format!("{base}/events"))
            .body(seed(&format!("filling {n}")))
            .send()
            .await
            .unwrap();
        if response.status() != 201 {
            assert!(response.status().is_server_error(), "{}", response.status());
            return created;
        }
        let body: Value = response.json().await.unwrap();
        created.push(body["ID"].as_str().unwrap().to_owned());
    }
    panic!("the disk never filled up");
}

#[test]
fn a_full_disk_makes_the_server_unready_and_loses_no_message() {
    // A 3 MB filesystem of the server's own, in a mount namespace (no root needed where
    // user namespaces are allowed), mostly taken by a file we remove later.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().display().to_string();
    let port = free_port();
    let script = format!(
        "mount -t tmpfs -o size=3m tmpfs {mount} && \
         dd if=/dev/zero of={mount}/filler bs=64k count=36 2>/dev/null && \
         exec {BINARY} serve --http 127.0.0.1:{port} --data {mount}/data"
    );
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .stderr(Stdio::null());
    let server = Server::spawn(command, port);
    // The server's view of its filesystem, from outside its namespace.
    let inside = format!("/proc/{}/root{mount}", server.child.id());
    let client = ::reqwest::Client::new();
    reqwest::runtime().block_on(async {
        // A refusal may come from a batch that needed more room than is left, while a
        // smaller write still fits: fill on until not even the probe fits.
        let mut created = Vec::new();
        let unready = loop {
            created.extend(create_until_refused(&client, &server.base).await);
            let ready = client
                .get(format!("{}/health/ready", server.base))
                .send()
                .await
                .unwrap();
            if ready.status() == 503 {
                break ready.json::<Value>().await.unwrap();
            }
            assert!(created.len() < 10_000, "never unready");
        };
        assert!(!created.is_empty(), "no event fitted at all");
        let detail = unready["detail"].as_str().unwrap();
        assert!(detail.contains("full"), "{unready}");

        // Longer than every retry a handler has, were store failures counted as attempts.
        tokio::time::sleep(Duration::from_secs(4)).await;
        std::fs::remove_file(format!("{inside}/filler")).expect("free the space");
        let deadline = Instant::now() + Duration::from_secs(20);
        while client
            .get(format!("{}/health/ready", server.base))
            .send()
            .await
            .unwrap()
            .status()
            != 200
        {
            assert!(Instant::now() < deadline, "never ready again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        created.extend(create_until_refused_or(&client, &server.base, 20).await);
        // A dead-lettered `EventCreated` would leave its event unknown to bookings for good.
        wait_until_bookable(&client, &server.base, &created).await;
    });
}

/// Creates up to `count` events, all of which must be accepted.
async fn create_until_refused_or(
    client: &::reqwest::Client,
    base: &str,
    count: usize,
) -> Vec<String> {
    let mut created = Vec::new();
    for n in 0..count {
        let response = client
            .post(format!("{base}/events"))
            .body(seed(&format!("after {n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "refused once space came back");
        let body: Value = response.json().await.unwrap();
        created.push(body["ID"].as_str().unwrap().to_owned());
    }
    created
}

/// A shared library that makes `fdatasync` fail with EIO once the file named by
/// `FAIL_FSYNC_AFTER` exists: a disk that stops flushing, for `LD_PRELOAD`.
const FAILING_FSYNC: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
int fdatasync(int fd) {
    const char *trigger = getenv("FAIL_FSYNC_AFTER");
    if (trigger && access(trigger, F_OK) == 0) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int)) dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"#;

#[test]
fn a_failed_flush_makes_the_process_exit_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("failing_fsync.c");
    let library = dir.path().join("failing_fsync.so");
    std::fs::write(&source, FAILING_FSYNC).unwrap();
    // `cc` is there wherever cargo links Rust programs.
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc");
    assert!(built.success());
    let trigger = dir.path().join("fail-now");
    let port = free_port();
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path().join("data"))
        .env("LD_PRELOAD", &library)
        .env("FAIL_FSYNC_AFTER", &trigger)
        .env("RUST_LOG", "off")
        .stderr(Stdio::null());
    let mut server = Server::spawn(command, port);
    std::fs::write(&trigger, "").unwrap();
    let status = reqwest::runtime().block_on(async {
        ::reqwest::Client::new()
            .post(format!("{}/events", server.base))
            .body(seed("never flushed"))
            .send()
            .await
            .map(|response| response.status().as_u16())
    });
    assert!(!matches!(status, Ok(201)), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(exited) = server.child.try_wait().unwrap() {
            break exited;
        }
        assert!(
            Instant::now() < deadline,
            "still running after a failed flush"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!exited.success(), "{exited}");
}

#[test]
fn the_default_log_level_writes_no_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let port = free_port();
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap());
    let server = Server::spawn(command, port);
    reqwest::runtime().block_on(async {
        let client = ::reqwest::Client::new();
        for n in 0..100 {
            let created = client
                .post(format!("{}/events", server.base))
                .body(seed(&format!("quiet {n}")))
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            let listed = client.get(format!("{}/events", server.base)).send().await;
            assert_eq!(listed.unwrap().status(), 200);
        }
    });
    server.signal("TERM");
    let mut server = server;
    assert!(server.child.wait().unwrap().success());
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(written.contains("serving"), "{written}");
    assert!(written.contains("effective configuration"), "{written}");
    // The start-up lines (the effective configuration is one line per setting) and the
    // shutdown's, but nothing near one per request.
    let lines = written.lines().count();
    assert!(lines < 50, "{lines} lines for 200 requests:\n{written}");
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let runtime = reqwest::runtime();
    let client = ::reqwest::Client::new();
    let base = server.base.clone();
    let statuses = runtime.block_on(async {
        let requests: Vec<_> = (0..50)
            .map(|i| {
                let (client, base) = (client.clone(), base.clone());
                tokio::spawn(async move {
                    client
                        .post(format!("{base}/events"))
                        .body(seed(&format!("t{i}")))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        server.signal("TERM");
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(request.await.unwrap());
        }
        statuses
    });
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit}");
    // Every request either completed normally or was never accepted.
    for status in statuses.iter().flatten() {
        assert_eq!(*status, 201);
    }
    let accepted = statuses.iter().filter(|status| status.is_ok()).count();
    let restarted = Server::start(dir.path());
    let listed: Vec<Value> = runtime.block_on(async {
        client
            .get(format!("{}/events?limit=1000", restarted.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        listed.len(),
        accepted,
        "every answered request's event is stored"
    );
}

fn conveyor(args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .args(args)
        .env_remove("CONVEYOR_CONFIG")
        .output()
        .expect("run conveyor")
}

#[test]
fn configuration_errors_are_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let read_only = dir.path().join("ro");
    std::fs::create_dir(&read_only).unwrap();
    let file = read_only.join("blocker");
    std::fs::write(&file, "").unwrap();
    let under_a_file = file.join("data").display().to_string();
    for (args, expected) in [
        (
            vec!["serve", "--data", &data, "--services", "nope"],
            "unknown service `nope`",
        ),
        (
            vec!["serve", "--data", &data, "--http", "not-an-address"],
            "--http not-an-address",
        ),
        (
            vec!["serve", "--data", &data, "--db", "oracle://u:secret@h/db"],
            "unsupported database",
        ),
        (
            vec!["serve", "--data", &data, "--bus", "kafka://u:secret@h"],
            "--bus",
        ),
        (vec!["serve", "--data", &under_a_file], "data dir"),
    ] {
        let output = conveyor(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("secret"));
    }
}

#[test]
fn config_prints_the_effective_settings_from_file_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conveyor.toml");
    std::fs::write(
        &file,
        "services = [\"events\"]\nrole = \"api\"\nbody_limit = 10\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .args(["config", "--config"])
        .arg(&file)
        .args(["--body-limit", "20"])
        .env("CONVEYOR_ROLE", "workers")
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("services = [\"events\"]"), "{printed}");
    assert!(
        printed.contains("role = \"workers\""),
        "env beats the file: {printed}"
    );
    assert!(
        printed.contains("body_limit = 20"),
        "flags beat the file: {printed}"
    );
    assert!(printed.contains("bus = \"sql-log\""), "{printed}");
}

#[test]
fn dlq_lists_shows_replays_and_purges_dead_letters() {
    use platform::conformance::Ping;
    use platform::{
        ConsumerOptions, HandlerError, Incoming, RetryPolicy, Subscription, UnitOfWork,
    };

    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("conveyor.db");
    reqwest::runtime().block_on(async {
        let db = platform::Database::open(&database).await.unwrap();
        let options = ConsumerOptions {
            retry: RetryPolicy {
                max_attempts: 2,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            },
            ..ConsumerOptions::default()
        };
        let failing = Subscription::new("test.failing").with_options(options).on(
            |_incoming: Incoming<Ping>, _uow: &mut UnitOfWork| {
                Err(HandlerError::transient("always broken"))
            },
        );
        let consumer = platform::Bus::subscribe(&platform::SqlLog::new(db.clone()), failing)
            .await
            .unwrap();
        for seq in 0..2 {
            db.write(move |uow| {
                uow.emit(&Ping {
                    key: "k".into(),
                    seq,
                })
            })
            .await
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while platform::dead_letter::list(&db, None, 10)
            .await
            .unwrap()
            .len()
            < 2
        {
            assert!(Instant::now() < deadline, "no dead letters");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        consumer.stop().await;
        db.close().await;
    });

    let data = dir.path().display().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["dlq", "--data", &data];
        all.extend_from_slice(args);
        let output = conveyor(&all);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let listed = run(&["list"]);
    assert!(
        listed.contains("test.failing") && listed.contains("conformance.Ping"),
        "{listed}"
    );
    assert!(listed.contains("2 dead letter(s)"), "{listed}");

    let shown: Value = serde_json::from_str(&run(&["show", "1"])).unwrap();
    assert_eq!(shown["group"], "test.failing");
    assert_eq!(shown["attempts"], 2);
    assert_eq!(shown["error"], "always broken");
    assert_eq!(shown["message"]["payload"]["seq"], 0);

    assert!(run(&["replay", "1"]).contains("queued for redelivery"));
    assert!(run(&["list"]).contains("1 dead letter(s)"));
    let missing = conveyor(&["dlq", "--data", &data, "show", "1"]);
    assert!(!missing.status.success());
    assert!(run(&["purge", "--all"]).contains("purged 1"));
    assert!(run(&["list", "--group", "test.failing"]).contains("0 dead letter(s)"));
}

#[test]
fn migrate_creates_the_tables_once_and_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    for _ in 0..2 {
        let output = conveyor(&["migrate", "--data", &data]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8(output.stdout).unwrap();
        assert!(
            printed.contains("migrated") && printed.contains("events, bookings"),
            "{printed}"
        );
    }
    assert!(dir.path().join("conveyor.db").exists());
}

#[test]
fn an_unreachable_database_server_is_a_one_line_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let port = free_port().to_string();
    for url in [
        format!("postgres://conveyor:hunter2@127.0.0.1:{port}/db"),
        format!("mysql://conveyor:hunter2@127.0.0.1:{port}/db"),
    ] {
        let output = conveyor(&["serve", "--data", &data, "--db", &url]);
        assert_eq!(output.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("cannot open the database"), "{stderr}");
        assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

#[test]
fn on_postgres_bookings_of_two_busy_events_from_two_processes_all_succeed() {
    bookings_of_two_busy_events_all_succeed(Backend::Postgres);
}

#[test]
fn on_mariadb_bookings_of_two_busy_events_from_two_processes_all_succeed() {
    bookings_of_two_busy_events_all_succeed(Backend::Mysql);
}

/// 400 concurrent one-seat bookings, alternating between two events with room for all and
/// between two processes: batches of different writers take the two events' rows in opposite
/// orders, which the databases answer with deadlocks. Every booking must still succeed.
fn bookings_of_two_busy_events_all_succeed(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_scratch, db) = database(backend);
    let first = Server::start_on(dir.path(), db.as_deref());
    let second = Server::start_on(dir.path(), db.as_deref());
    let client = ::reqwest::Client::new();
    let statuses = reqwest::runtime().block_on(async {
        let ids = [
            create_event(&client, &first.base, "one", 1000).await,
            create_event(&client, &first.base, "two", 1000).await,
        ];
        wait_until_bookable(&client, &first.base, &ids).await;
        wait_until_bookable(&client, &second.base, &ids).await;
        let targets =
            (0..400).map(|n| (if n % 2 == 0 { &first } else { &second }, &ids[(n / 2) % 2]));
        book_one_seat_each(&client, targets).await
    });
    let failed: Vec<_> = statuses.iter().filter(|status| **status != 201).collect();
    assert!(
        failed.is_empty(),
        "{} of 400 failed: {failed:?}",
        failed.len()
    );
}
