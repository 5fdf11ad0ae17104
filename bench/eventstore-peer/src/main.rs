//! `eventstore-peer`: the peer side of `conveyor bench eventstore`.
//!
//! Runs the same append / load workload as Conveyor's own event store benchmark, but through
//! `cqrs-es` 0.5 + `postgres-es` 0.5 (the plain event store: no snapshots, no queries), and
//! prints one line of JSON on stdout. Progress and diagnostics go to stderr.

use std::error::Error;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, DomainEvent, EventStore};
use postgres_es::{postgres_cqrs, PostgresCqrs, PostgresEventRepository};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// Rows per INSERT statement when seeding the load streams.
const SEED_CHUNK: u64 = 10_000;

#[derive(Parser, Debug)]
#[command(
    name = "eventstore-peer",
    about = "Benchmark cqrs-es + postgres-es on PostgreSQL (append and full-load workloads)"
)]
struct Args {
    /// PostgreSQL URL of an existing, empty database, e.g. postgres://postgres@127.0.0.1:5432/DBNAME
    #[arg(long)]
    db: String,
    /// Duration of each timed phase, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Concurrent client tasks (also the connection pool size).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clients: u64,
    /// Streams of the append phase (`counter-{i}`), split disjointly among the clients.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    streams: u64,
    /// Streams of the load phase (`load-{j}`).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    load_streams: u64,
    /// Events seeded into each load stream.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    events_per_stream: u64,
    /// sqlx's `PgPoolOptions::test_before_acquire` (a ping round trip on every pool checkout).
    /// Default true = sqlx's default, i.e. what `postgres_es::default_postgress_pool` uses.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    test_before_acquire: bool,
}

// ---------------------------------------------------------------------------------------------
// The aggregate
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    total: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum CounterCommand {
    Add { amount: i64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added { amount: i64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        match self {
            CounterEvent::Added { .. } => "Added".to_string(),
        }
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug)]
struct CounterError(String);

impl fmt::Display for CounterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for CounterError {}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            CounterCommand::Add { amount } => {
                sink.write(CounterEvent::Added { amount }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CounterEvent::Added { amount } => self.total += amount,
        }
    }
}

/// The event store `postgres_cqrs` builds inside the framework (the framework does not expose
/// its own), built the same way over the same pool.
type CounterStore = PersistedEventStore<PostgresEventRepository, Counter>;

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Report {
    append_per_sec: f64,
    append_errors: u64,
    load_streams_per_sec: f64,
    load_errors: u64,
    events_per_stream: u64,
    clients: u64,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn success(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error; prints the first few of them.
    fn failure(&self, phase: &str, what: impl fmt::Display) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < 5 {
            eprintln!("[{phase}] error #{}: {what}", n + 1);
        }
    }
}

/// Prints a progress line every second until aborted.
fn spawn_progress(
    phase: &'static str,
    counts: Arc<Counts>,
    start: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let secs = start.elapsed().as_secs_f64();
            let ok = counts.ok.load(Ordering::Relaxed);
            let err = counts.errors.load(Ordering::Relaxed);
            eprintln!(
                "[{phase}] {secs:5.1}s ok={ok} errors={err} ({:.0}/s)",
                ok as f64 / secs
            );
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// DDL of postgres-es 0.5 (`db/init.sql` of the crate). The plain event store
/// (`PersistedEventStore::new_event_store`) never touches `snapshots`, so only `events` is made.
const CREATE_EVENTS: &str = "
CREATE TABLE IF NOT EXISTS events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
)";

/// Opens every connection of the pool up front so that no phase pays for connecting.
async fn warm_pool(pool: &PgPool, n: u64) -> Result<(), BoxError> {
    let mut held = Vec::with_capacity(n as usize);
    for _ in 0..n {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 1: append
// ---------------------------------------------------------------------------------------------

async fn append_phase(args: &Args, cqrs: Arc<PostgresCqrs<Counter>>) -> (f64, u64, u64) {
    let counts = Arc::new(Counts::default());
    // Each client's disjoint set of streams: i in 0..streams with i % clients == c.
    let per_client: Vec<Vec<String>> = (0..args.clients)
        .map(|c| {
            (c..args.streams)
                .step_by(args.clients as usize)
                .map(|i| format!("counter-{i}"))
                .collect()
        })
        .collect();
    let idle = per_client.iter().filter(|ids| ids.is_empty()).count();
    if idle > 0 {
        eprintln!("[append] warning: {idle} clients have no stream (streams < clients)");
    }

    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let progress = spawn_progress("append", counts.clone(), start);
    let mut tasks = Vec::with_capacity(per_client.len());
    for ids in per_client {
        let cqrs = cqrs.clone();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            if ids.is_empty() {
                return;
            }
            let mut k = 0usize;
            while Instant::now() < deadline {
                let id = &ids[k % ids.len()];
                k += 1;
                match cqrs.execute(id, CounterCommand::Add { amount: 1 }).await {
                    Ok(()) => counts.success(),
                    Err(e) => counts.failure("append", format_args!("{id}: {e:?}")),
                }
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            counts.failure("append", format_args!("client task failed: {e}"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.abort();
    let ok = counts.ok.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    (ok as f64 / elapsed, ok, errors)
}

// ---------------------------------------------------------------------------------------------
// Phase 2: load
// ---------------------------------------------------------------------------------------------

/// Executes one command on `load-0` through the framework, reads back the row it wrote, and
/// seeds every load stream with `events_per_stream` events of exactly that form (the probe row
/// is sequence 1 of `load-0`).
async fn seed_load_streams(
    args: &Args,
    pool: &PgPool,
    cqrs: &PostgresCqrs<Counter>,
) -> Result<(), BoxError> {
    cqrs.execute("load-0", CounterCommand::Add { amount: 1 })
        .await
        .map_err(|e| format!("probe command on load-0 failed: {e:?}"))?;
    let row = sqlx::query(
        "SELECT event_type, event_version, payload::text AS payload, metadata::text AS metadata
           FROM events WHERE aggregate_type = $1 AND aggregate_id = 'load-0' AND sequence = 1",
    )
    .bind(Counter::TYPE)
    .fetch_one(pool)
    .await?;
    let event_type: String = row.get("event_type");
    let event_version: String = row.get("event_version");
    let payload: String = row.get("payload");
    let metadata: String = row.get("metadata");
    eprintln!(
        "[seed] framework wrote: aggregate_type={:?} event_type={event_type:?} \
         event_version={event_version:?} payload={payload} metadata={metadata}",
        Counter::TYPE
    );
    // Sanity: it is serde's externally tagged form of the event, and empty metadata.
    let expected = serde_json::to_value(CounterEvent::Added { amount: 1 })?;
    if serde_json::from_str::<serde_json::Value>(&payload)? != expected
        || serde_json::from_str::<serde_json::Value>(&metadata)? != serde_json::json!({})
        || event_type != "Added"
        || event_version != "1"
    {
        eprintln!("[seed] warning: unexpected serialized form (expected payload {expected}, metadata {{}})");
    }

    let n = args.events_per_stream;
    let seed_start = Instant::now();
    for j in 0..args.load_streams {
        let id = format!("load-{j}");
        let first = if j == 0 { 2 } else { 1 };
        let mut tx = pool.begin().await?;
        let mut lo = first;
        while lo <= n {
            let hi = (lo + SEED_CHUNK - 1).min(n);
            sqlx::query(
                "INSERT INTO events
                   (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 SELECT $1, $2, s, $3, $4, $5::json, $6::json
                   FROM generate_series($7::bigint, $8::bigint) AS s",
            )
            .bind(Counter::TYPE)
            .bind(&id)
            .bind(&event_type)
            .bind(&event_version)
            .bind(&payload)
            .bind(&metadata)
            .bind(lo as i64)
            .bind(hi as i64)
            .execute(&mut *tx)
            .await?;
            lo = hi + 1;
        }
        tx.commit().await?;
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    eprintln!(
        "[seed] {} streams x {n} events in {:.2}s",
        args.load_streams,
        seed_start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn load_phase(args: &Args, store: Arc<CounterStore>) -> (f64, u64, u64) {
    let counts = Arc::new(Counts::default());
    let ids: Arc<Vec<String>> = Arc::new(
        (0..args.load_streams)
            .map(|j| format!("load-{j}"))
            .collect(),
    );
    let expected = args.events_per_stream;
    let clients = args.clients;

    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let progress = spawn_progress("load", counts.clone(), start);
    let mut tasks = Vec::with_capacity(clients as usize);
    for c in 0..clients {
        let store = store.clone();
        let counts = counts.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < deadline {
                // Client c loads load-{(c + k*clients) % load_streams}, k = 0, 1, 2, ...
                let id = &ids[((c + k * clients) % ids.len() as u64) as usize];
                k += 1;
                match store.load_aggregate(id).await {
                    Ok(ctx) => {
                        if ctx.aggregate.total == expected as i64
                            && ctx.current_sequence as u64 == expected
                        {
                            counts.success();
                        } else {
                            counts.failure(
                                "load",
                                format_args!(
                                    "{id}: total {} at sequence {}, expected {expected}",
                                    ctx.aggregate.total, ctx.current_sequence
                                ),
                            );
                        }
                    }
                    Err(e) => counts.failure("load", format_args!("{id}: {e:?}")),
                }
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            counts.failure("load", format_args!("client task failed: {e}"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.abort();
    let ok = counts.ok.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    (ok as f64 / elapsed, ok, errors)
}

// ---------------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("eventstore-peer: {e}");
                std::process::exit(1);
            }
        },
        Err(e) => {
            eprintln!("eventstore-peer: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args) -> Result<Report, BoxError> {
    eprintln!(
        "eventstore-peer: cqrs-es 0.5 + postgres-es 0.5; seconds={} clients={} streams={} \
         load_streams={} events_per_stream={} test_before_acquire={}",
        args.seconds,
        args.clients,
        args.streams,
        args.load_streams,
        args.events_per_stream,
        args.test_before_acquire
    );
    let pool = PgPoolOptions::new()
        .max_connections(args.clients as u32)
        .test_before_acquire(args.test_before_acquire)
        .connect(&args.db)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.db))?;
    sqlx::query(CREATE_EVENTS).execute(&pool).await?;
    warm_pool(&pool, args.clients).await?;

    // The plain event store: no queries, no snapshots.
    let cqrs = Arc::new(postgres_cqrs::<Counter>(pool.clone(), vec![], ()));

    // Phase 1.
    let (append_per_sec, appended, append_errors) = append_phase(args, cqrs.clone()).await;
    eprintln!("[append] done: {appended} commands, {append_errors} errors, {append_per_sec:.1}/s");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = $1")
        .bind(Counter::TYPE)
        .fetch_one(&pool)
        .await?;
    if stored as u64 != appended {
        eprintln!("[append] warning: {stored} events stored but {appended} commands succeeded");
    }

    // Phase 2.
    seed_load_streams(args, &pool, &cqrs).await?;
    let store: Arc<CounterStore> = Arc::new(PersistedEventStore::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    ));
    // One checked load before timing.
    let ctx = store
        .load_aggregate("load-0")
        .await
        .map_err(|e| format!("load of load-0 failed: {e:?}"))?;
    if ctx.aggregate.total != args.events_per_stream as i64 {
        return Err(format!(
            "load-0 has total {} after seeding, expected {}",
            ctx.aggregate.total, args.events_per_stream
        )
        .into());
    }
    let (load_streams_per_sec, loaded, load_errors) = load_phase(args, store).await;
    eprintln!("[load] done: {loaded} loads, {load_errors} errors, {load_streams_per_sec:.1}/s");

    pool.close().await;
    Ok(Report {
        append_per_sec,
        append_errors,
        load_streams_per_sec,
        load_errors,
        events_per_stream: args.events_per_stream,
        clients: args.clients,
    })
}
