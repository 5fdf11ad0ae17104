//! `conveyor bench eventstore`: the event store's append and load throughput on SQLite and
//! (with `--db`) PostgreSQL, beside the Rust peer `cqrs-es` + `postgres-es` doing the same
//! on the same server in the same run; and the matches command side's moves per second
//! through HTTP on the embedded default.
//!
//! The workload, the same for both stores: a counter aggregate whose one command adds to
//! it. Append: `clients` tasks, each cycling through its own streams of `streams`, each
//! command loading its stream, deciding and appending with optimistic concurrency (no
//! snapshots). Load: `load-streams` streams of `events-per-stream` events, loaded whole
//! (no snapshots) by `clients` tasks. The peer lives in `bench/eventstore-peer/`, a
//! workspace of its own so that the main build stays lean; it prints its figures as JSON.

use super::{connect, fresh_database, progress, request, Server};
use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::BodyExt;
use platform::aggregate::{self, Aggregate, Cache, Loaded};
use platform::event_store::{self, EventStoreError};
use platform::{Database, Message, Snapshots};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `bench/eventstore-peer` builds its binary, from the repository's root.
const PEER: &str = "bench/eventstore-peer/target/release/eventstore-peer";
/// Events per append while seeding the load phase's streams.
const SEED_CHUNK: usize = 1000;

#[derive(Debug, Clone, Args)]
pub struct EventStoreBenchArgs {
    /// Seconds each throughput measurement runs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent clients (tasks for the stores, HTTP connections for matches).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Streams the append phase spreads its commands over.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Streams the load phase reads.
    #[arg(long, default_value_t = 20)]
    pub load_streams: usize,
    /// Events in each stream the load phase reads.
    #[arg(long, default_value_t = 1000)]
    pub events_per_stream: usize,
    /// Also measure on this PostgreSQL server (a user that may create databases), beside
    /// the peer. Without it, only SQLite and matches are measured.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// The peer's binary (build it with `cargo build --release` in bench/eventstore-peer).
    #[arg(long, value_name = "PATH", default_value = PEER)]
    pub peer: PathBuf,
}

/// The bench's aggregate: a running total.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    total: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Added {
    counter: String,
    amount: i64,
}

impl Message for Added {
    const NAME: &'static str = "bench.Added";
    const TOPIC: &'static str = "bench.events";

    fn key(&self) -> String {
        self.counter.clone()
    }
}

struct Add {
    counter: String,
}

impl Aggregate for Counter {
    type Event = Added;
    type Command = Add;
    type Error = std::convert::Infallible;

    fn decide(&self, command: &Add) -> Result<Vec<Added>, Self::Error> {
        Ok(vec![Added {
            counter: command.counter.clone(),
            amount: 1,
        }])
    }

    fn apply(&mut self, event: &Added) {
        self.total += event.amount;
    }
}

/// What one store measured.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Figures {
    append_per_sec: f64,
    load_streams_per_sec: f64,
}

pub async fn eventstore(args: EventStoreBenchArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let dir = tempfile::tempdir()?;
    progress("conveyor's event store on SQLite");
    let sqlite = Database::open(&dir.path().join("bench.db")).await?;
    let on_sqlite = measure(&sqlite, &args, duration).await?;
    sqlite.close().await;

    let on_postgres = match &args.db {
        None => None,
        Some(url) => {
            if !url.starts_with("postgres") {
                bail!("--db {url}: the peer runs on PostgreSQL only");
            }
            progress("conveyor's event store on PostgreSQL");
            let database = fresh_database(Some(url))
                .await?
                .context("a fresh database")?;
            let db = Database::connect(database.url()).await?;
            let ours = measure(&db, &args, duration).await?;
            db.close().await;
            progress("the peer, cqrs-es + postgres-es, on the same PostgreSQL");
            let database = fresh_database(Some(url))
                .await?
                .context("a fresh database")?;
            let peer = run_peer(&args, database.url()).await?;
            Some((ours, peer))
        }
    };

    progress("matches: moves through HTTP on the embedded default");
    let server = Server::start(&dir.path().join("data"), &[], None).await?;
    let moves = moves_per_second(server.address, args.clients, duration).await?;
    drop(server);

    println!();
    println!(
        "{:<44} {:>12} {:>14} {:>8}  target",
        "event store", "conveyor", "cqrs-es", "ratio"
    );
    let plain = |label: &str, value: f64| println!("{label:<44} {value:>12.0}");
    plain("append commands/s, SQLite", on_sqlite.append_per_sec);
    plain(
        "load 1000-event streams/s, SQLite",
        on_sqlite.load_streams_per_sec,
    );
    if let Some((ours, peer)) = on_postgres {
        super::row(
            "append commands/s, PostgreSQL",
            ours.append_per_sec,
            peer.append_per_sec,
            ">= 2.0",
        );
        super::row(
            "load 1000-event streams/s, PostgreSQL",
            ours.load_streams_per_sec,
            peer.load_streams_per_sec,
            ">= 1.0",
        );
    }
    println!(
        "{:<44} {moves:>12.0} {:>14} {:>8.2}  >= 1.0 (5000 moves/s)",
        "matches moves/s, embedded default",
        "5000",
        moves / 5000.0
    );
    Ok(())
}

async fn measure(
    db: &Database,
    args: &EventStoreBenchArgs,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let append_per_sec = appends(db, args.clients, args.streams, duration).await?;
    seed(db, args.load_streams, args.events_per_stream).await?;
    let load_streams_per_sec = loads(
        db,
        args.clients,
        args.load_streams,
        args.events_per_stream,
        duration,
    )
    .await?;
    Ok(Figures {
        append_per_sec,
        load_streams_per_sec,
    })
}

/// Commands per second: each loads its stream (from the state its client's last command
/// left, as a service's `aggregate::Cache` does, plus the events since), decides and
/// appends at the version it saw.
async fn appends(
    db: &Database,
    clients: usize,
    streams: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let cache = Arc::new(Cache::<Counter>::new(streams));
    for client in 0..clients {
        let (db, done, cache) = (db.clone(), done.clone(), cache.clone());
        let own: Vec<String> = (client..streams.max(clients))
            .step_by(clients)
            .map(|n| format!("counter-{n}"))
            .collect();
        tasks.spawn(async move {
            for counter in own.iter().cycle() {
                if started.elapsed() >= duration {
                    break;
                }
                let command = Add {
                    counter: counter.clone(),
                };
                let known = cache.get(counter);
                let executed = db
                    .write(move |uow| {
                        aggregate::execute_from::<Counter>(
                            uow,
                            &command.counter,
                            known.clone(),
                            Snapshots::OFF,
                            &command,
                        )
                        .map_err(|error| anyhow::anyhow!("{error}"))
                    })
                    .await?;
                cache.put(
                    counter,
                    Loaded {
                        state: executed.state,
                        version: executed.version,
                    },
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Writes the load phase's streams.
async fn seed(db: &Database, streams: usize, events: usize) -> anyhow::Result<()> {
    for stream in 0..streams {
        let counter = format!("load-{stream}");
        let mut version = 0;
        while version < events as u64 {
            let count = SEED_CHUNK.min(events - version as usize);
            let batch: Vec<Added> = (0..count)
                .map(|_| Added {
                    counter: counter.clone(),
                    amount: 1,
                })
                .collect();
            let stream = counter.clone();
            version = db
                .write(move |uow| event_store::append(uow, &stream, version, &batch))
                .await?;
        }
    }
    Ok(())
}

/// Whole streams loaded per second, each checked.
async fn loads(
    db: &Database,
    clients: usize,
    streams: usize,
    events: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (db, done) = (db.clone(), done.clone());
        tasks.spawn(async move {
            let mut n = client;
            while started.elapsed() < duration {
                let stream = format!("load-{}", n % streams);
                let loaded = db
                    .read(move |conn| aggregate::replay::<Counter>(conn, &stream))
                    .await
                    .map_err(|error: EventStoreError| anyhow::anyhow!("{error}"))?;
                if loaded.state.total != events as i64 {
                    bail!("a stream loaded {} of {events} events", loaded.state.total);
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += clients;
            }
            anyhow::Ok(())
        });
    }
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// The peer's figures: its binary run on `url` with the same workload.
async fn run_peer(args: &EventStoreBenchArgs, url: &str) -> anyhow::Result<Figures> {
    if !args.peer.exists() {
        bail!(
            "the peer's binary {} is missing: build it with \
             `cargo build --release --manifest-path bench/eventstore-peer/Cargo.toml`",
            args.peer.display()
        );
    }
    let output = tokio::process::Command::new(&args.peer)
        .args(["--db", url])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .args(["--streams", &args.streams.to_string()])
        .args(["--load-streams", &args.load_streams.to_string()])
        .args(["--events-per-stream", &args.events_per_stream.to_string()])
        // Its fastest setting: no ping of a pooled connection before each use.
        .args(["--test-before-acquire", "false"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("running the peer")?;
    if !output.status.success() {
        bail!("the peer failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("the peer printed {line:?}"))
}

/// Legal moves per second: each client plays a 19×19 match of its own, its stones placed
/// point after point (a 400 for a point that is taken or suicide is skipped, and not
/// counted), and starts another match when it has tried every point.
async fn moves_per_second(
    address: SocketAddr,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let played = Arc::new(AtomicU64::new(0));
    let warm_up = Duration::from_secs(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let played = played.clone();
        let mut sender = connect(address).await?;
        tasks.spawn(async move {
            while started.elapsed() < warm_up + duration {
                let body = Bytes::from_static(
                    br#"{"gridsize": 19, "playerBlack": "b", "playerWhite": "w"}"#,
                );
                let response = sender
                    .send_request(request(http::Method::POST, "/matches", body))
                    .await?;
                let location = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|location| location.to_str().ok())
                    .map(|location| format!("{location}/moves"))
                    .context("POST /matches answered no Location")?;
                response.into_body().collect().await?;
                let mut black = true;
                for point in 0..19u32 * 19 {
                    if started.elapsed() >= warm_up + duration {
                        break;
                    }
                    let body = format!(
                        r#"{{"player": "{}", "position": {{"x": {}, "y": {}}}}}"#,
                        if black { "black" } else { "white" },
                        point % 19,
                        point / 19
                    );
                    let response = sender
                        .send_request(request(http::Method::POST, &location, Bytes::from(body)))
                        .await?;
                    let legal = response.status() == http::StatusCode::CREATED;
                    response.into_body().collect().await?;
                    if legal {
                        black = !black;
                        if started.elapsed() >= warm_up {
                            played.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    Ok(played.load(Ordering::Relaxed) as f64
        / started.elapsed().saturating_sub(warm_up).as_secs_f64())
}
