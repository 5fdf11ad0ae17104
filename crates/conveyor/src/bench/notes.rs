//! `conveyor bench notes`: the write-behind notes service on the embedded default or on a
//! server database, each figure beside a baseline measured in the same run:
//!
//! - ingest: `POST /save` through the API (`--role api`, the queue growing) vs a synchronous
//!   baseline server doing the same insert inside the request (`bench notes-baseline`);
//! - drain: the queue that left behind, written by a workers process, vs a bare loop of
//!   batched multi-row insert transactions through the same driver, run once before the
//!   drain and once after (this VM's speed drifts by a third within minutes);
//! - burst: `--burst` saves as fast as the clients send them to one process running both
//!   roles, with the time until the last is written.

use super::{fresh_database, progress, request, row, BaselineServer, Load, LoadRequest, Server};
use anyhow::bail;
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct NotesBenchArgs {
    /// Seconds each throughput measurement runs.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent keep-alive HTTP/1.1 connections, each sending one request at a time.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Saves sent in the burst.
    #[arg(long, default_value_t = 50_000)]
    pub burst: u64,
    /// Run on this PostgreSQL or MySQL/MariaDB server (as a user that may create databases)
    /// instead of the embedded SQLite; the bench creates a fresh database there and drops
    /// it after.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
}

/// Where the bench's databases are: the embedded file, or a server database.
#[derive(Debug, Clone)]
pub enum Target {
    Sqlite(PathBuf),
    Server(String),
}

/// The messages the workers handle, and the batch they take: the defaults of `serve`.
const HANDLED: &str =
    "conveyor_handler_handled_total{group=\"notes.workers\",message=\"notes.SaveNote\"}";
const WORKER_BATCH: usize = 256;
/// Far above anything the bench queues: the ingest measure must never be refused.
const NO_QUEUE_LIMIT: &str = "1000000000";
/// How often the workers' count is read while they drain: the drain's end is known to
/// within it (a drain of 100k notes takes a few tenths of a second here; each read of the metrics costs the workers about 0.3 ms of CPU).
const HANDLED_POLL: Duration = Duration::from_millis(20);

pub async fn notes(args: NotesBenchArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let database = fresh_database(args.db.as_deref()).await?;
    let target = match &database {
        Some(database) => Target::Server(database.url().to_owned()),
        None => Target::Sqlite(data.join(crate::config::DATABASE_FILE)),
    };
    let on_server: Vec<&str> = match &database {
        Some(database) => vec!["--db", database.url()],
        None => Vec::new(),
    };
    let with = |flags: &[&'static str]| -> Vec<&str> {
        let mut all = on_server.clone();
        all.extend(["--services", "notes"]);
        all.extend_from_slice(flags);
        all
    };
    let load = Load {
        duration,
        concurrency: args.concurrency,
    };

    progress(
        "ingest: POST /save through `conveyor serve --role api` (no workers: the queue grows)",
    );
    let api = Server::start(
        &data,
        &with(&["--role", "api", "--queue-limit", NO_QUEUE_LIMIT]),
        None,
    )
    .await?;
    let ingest = load.rate(api.address, save).await?;
    drop(api);

    progress("baseline: the same insert inside the request (`bench notes-baseline`)");
    let baseline = start_baseline(&target)?;
    let synchronous = load.rate(baseline.address, save).await?;
    drop(baseline);

    let queued = count(
        &target,
        "SELECT COUNT(*) FROM conveyor_log WHERE topic = 'notes.commands'",
    )
    .await?;
    progress(&format!(
        "baseline: {queued} rows in multi-row insert transactions of {WORKER_BATCH}, \
         before the drain"
    ));
    let bare_before = bare_batched_inserts(&target, queued, WORKER_BATCH, "before").await?;
    progress(&format!(
        "drain: a `--role workers` process writes the {queued} queued notes"
    ));
    // Timed from the moment the process is ready, as the baseline is timed from its first
    // insert: opening the database and joining the group are not draining. What the lanes
    // wrote before that moment is left out of the count.
    let workers = Server::start(&data, &with(&["--role", "workers"]), None).await?;
    let ready = Instant::now();
    let written_before_ready = handled(&workers).await?;
    let drained_at = wait_until_handled(&workers, queued, "queued notes written").await?;
    let drain = queued.saturating_sub(written_before_ready) as f64
        / drained_at.duration_since(ready).as_secs_f64();
    let workers_ready_after = workers.ready_after;
    drop(workers);
    progress("baseline: the same again, after the drain");
    let bare_after = bare_batched_inserts(&target, queued, WORKER_BATCH, "after").await?;
    let bare = (bare_before + bare_after) / 2.0;

    progress(&format!(
        "burst: {} saves as fast as {} clients send them, to one process with both roles",
        args.burst, args.concurrency
    ));
    let server = Server::start(&data, &with(&[]), None).await?;
    let burst_started = Instant::now();
    let (accepted, refused) = load.send(server.address, args.burst, save).await?;
    let sent_in = burst_started.elapsed();
    let last_accepted = Instant::now();
    let drained_at = wait_until_handled(&server, accepted, "burst notes written").await?;
    let drained_after = drained_at.duration_since(last_accepted);
    let total = drained_at.duration_since(burst_started);
    drop(server);

    let on = match &args.db {
        Some(url) => crate::config::mask_secrets(url),
        None => "the embedded default".to_owned(),
    };
    println!(
        "Notes on {on} ({} s per rate, {} clients)",
        args.seconds, args.concurrency
    );
    println!(
        "{:<44} {:>12} {:>14} {:>8}  target",
        "measure", "value", "baseline", "ratio"
    );
    row(
        "ingest POST /save (req/s) vs insert in request",
        ingest,
        synchronous,
        ">= 3.00",
    );
    row(
        "drain (rows/s) vs bare batched inserts",
        drain,
        bare,
        ">= 0.70",
    );
    println!(
        "{:<44} {:>12.0} {:>14.0}",
        "drain: bare inserts before / after (rows/s)", bare_before, bare_after
    );
    println!(
        "{:<44} {:>9.0} ms  ({written_before_ready} notes written by then, not counted)",
        "drain: workers' start to ready",
        workers_ready_after.as_secs_f64() * 1e3,
    );
    println!(
        "{:<44} {:>12} {:>14}",
        "burst: saves accepted / refused or failed", accepted, refused
    );
    println!(
        "{:<44} {:>9.2} s  ({:.0} saves/s)",
        "burst: time to send",
        sent_in.as_secs_f64(),
        accepted as f64 / sent_in.as_secs_f64()
    );
    println!(
        "{:<44} {:>9.2} s  (first save to last written: {:.2} s)",
        "burst: drained after the last 202",
        drained_after.as_secs_f64(),
        total.as_secs_f64()
    );
    if refused > 0 {
        bail!("{refused} saves of the burst were not accepted");
    }
    Ok(())
}

/// A `Load` request maker: `POST /save` of note `n`, as the original's curl sends it.
fn save(n: u64) -> LoadRequest {
    let body = format!(r#"{{"content":"bench note {n}"}}"#);
    request(http::Method::POST, "/save", Bytes::from(body))
}

/// How many saves `server`'s workers have handled.
async fn handled(server: &Server) -> anyhow::Result<u64> {
    let metrics = reqwest::get(server.url("/metrics")).await?.text().await?;
    Ok(metrics
        .lines()
        .find_map(|line| line.strip_prefix(HANDLED))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_default() as u64)
}

/// Waits until `server`'s workers have handled `total` saves, with a progress bar; when it
/// saw them handled, to within `HANDLED_POLL`.
async fn wait_until_handled(server: &Server, total: u64, what: &str) -> anyhow::Result<Instant> {
    let bar = ProgressBar::new(total).with_message(what.to_owned());
    bar.set_style(
        ProgressStyle::with_template(
            "bench: {bar:40} {pos}/{len} {msg} ({per_sec}, {elapsed} so far, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    loop {
        let handled = handled(server).await?;
        bar.set_position(handled.min(total));
        if handled >= total {
            bar.finish_and_clear();
            return Ok(Instant::now());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {handled} of {total} notes written after 10 minutes");
        }
        tokio::time::sleep(HANDLED_POLL).await;
    }
}

impl Load {
    /// Sends `total` requests, `concurrency` at a time; how many got a 2xx and how many did
    /// not (or failed to send).
    async fn send<F>(&self, address: SocketAddr, total: u64, make: F) -> anyhow::Result<(u64, u64)>
    where
        F: Fn(u64) -> LoadRequest + Clone + Send + 'static,
    {
        let next = Arc::new(AtomicU64::new(0));
        let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.concurrency {
            let (make, next) = (make.clone(), next.clone());
            let (accepted, refused) = (accepted.clone(), refused.clone());
            let mut sender = super::connect(address).await?;
            workers.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return anyhow::Ok(());
                    }
                    let succeeded = match sender.send_request(make(n)).await {
                        Ok(response) => {
                            let success = response.status().is_success();
                            http_body_util::BodyExt::collect(response.into_body()).await?;
                            success
                        }
                        Err(_) => false,
                    };
                    let counter = if succeeded { &accepted } else { &refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while let Some(worker) = workers.join_next().await {
            worker??;
        }
        Ok((
            accepted.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
        ))
    }
}

/// One number from the target database.
async fn count(target: &Target, sql: &'static str) -> anyhow::Result<u64> {
    let target = target.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let count: i64 = match &target {
            Target::Sqlite(path) => {
                rusqlite::Connection::open(path)?.query_row(sql, [], |row| row.get(0))?
            }
            Target::Server(url) => platform::sql::connect(url)?.scalar(sql, ())?,
        };
        Ok(u64::try_from(count).unwrap_or_default())
    })
    .await?
}

/// The notes table's shape, for a baseline's own table `name`.
fn notes_table(target: &Target, name: &str) -> String {
    let id = match target {
        Target::Server(url) if url.starts_with("mysql") || url.starts_with("mariadb") => {
            "VARCHAR(36)"
        }
        _ => "TEXT",
    };
    format!(
        "CREATE TABLE {name} (id {id} PRIMARY KEY, content TEXT NOT NULL, created_at BIGINT NOT NULL)"
    )
}

/// Rows per second written by one connection in transactions of `batch` rows, each one
/// multi-row `INSERT`: the drain's work without the queue. SQLite runs with the platform's
/// durability (WAL, every commit on disk). Each `run` writes a table of its own (on SQLite
/// in a file of its own), so that one run does not start where another left off.
async fn bare_batched_inserts(
    target: &Target,
    rows: u64,
    batch: usize,
    run: &'static str,
) -> anyhow::Result<f64> {
    type Note = (String, String, i64);
    type WriteBatch = Box<dyn FnMut(&str, &[Note]) -> anyhow::Result<()>>;
    let target = target.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let table = format!("bench_bare_notes_{run}");
        let create = notes_table(&target, &table);
        let mut write: WriteBatch = match &target {
            Target::Sqlite(path) => {
                let conn =
                    rusqlite::Connection::open(path.with_file_name(format!("bare-{run}.db")))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                conn.execute_batch(&create)?;
                Box::new(move |sql, notes| {
                    let values: Vec<&dyn rusqlite::ToSql> = notes
                        .iter()
                        .flat_map(|(id, content, at)| [id as &dyn rusqlite::ToSql, content, at])
                        .collect();
                    conn.execute_batch("BEGIN")?;
                    conn.prepare_cached(sql)?.execute(values.as_slice())?;
                    Ok(conn.execute_batch("COMMIT")?)
                })
            }
            Target::Server(url) => {
                let conn = platform::sql::connect(url)?;
                conn.execute_batch(&create)?;
                Box::new(move |sql, notes| {
                    let values: Vec<&dyn platform::sql::ToValue> = notes
                        .iter()
                        .flat_map(|(id, content, at)| {
                            [id as &dyn platform::sql::ToValue, content, at]
                        })
                        .collect();
                    conn.execute_batch("BEGIN")?;
                    conn.execute(sql, values.as_slice())?;
                    Ok(conn.execute_batch("COMMIT")?)
                })
            }
        };
        let started = Instant::now();
        for first in (0..rows).step_by(batch) {
            let notes: Vec<Note> = (first..rows.min(first + batch as u64))
                .map(|n| {
                    let id = platform::uuid::Uuid::now_v7().to_string();
                    (
                        id,
                        format!("bench note {n}"),
                        platform::envelope::now_millis(),
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO {table} (id, content, created_at) VALUES {}",
                vec!["(?, ?, ?)"; notes.len()].join(", ")
            );
            write(&sql, &notes)?;
        }
        Ok(rows as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

/// The ingest baseline: `bench notes-baseline`, whose `POST /save` validates the note as the
/// notes service does and inserts it in its own transaction before answering.
fn start_baseline(target: &Target) -> anyhow::Result<BaselineServer> {
    let (flag, value): (&str, &std::ffi::OsStr) = match target {
        Target::Sqlite(path) => ("--sqlite", path.as_os_str()),
        Target::Server(url) => ("--db", url.as_ref()),
    };
    BaselineServer::start(
        &[
            "bench".as_ref(),
            "notes-baseline".as_ref(),
            flag.as_ref(),
            value,
        ],
        "the notes baseline server",
    )
}

/// The baseline's connections: one SQLite connection (SQLite takes one writer at a time), or
/// a pool of server connections that grows to the load's concurrency.
enum Connections {
    Sqlite(Mutex<rusqlite::Connection>),
    Server {
        url: String,
        idle: Mutex<Vec<platform::Conn>>,
    },
}

impl Connections {
    fn insert(&self, id: &str, content: &str, created_at: i64) -> anyhow::Result<()> {
        const INSERT: &str =
            "INSERT INTO bench_sync_notes (id, content, created_at) VALUES (?, ?, ?)";
        match self {
            Connections::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                conn.prepare_cached(INSERT)?
                    .execute(rusqlite::params![id, content, created_at])?;
            }
            Connections::Server { url, idle } => {
                let taken = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
                let conn = match taken {
                    Some(conn) => conn,
                    None => platform::sql::connect(url)?,
                };
                conn.execute(INSERT, (id, content, created_at))?;
                idle.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            }
        }
        Ok(())
    }
}

/// `conveyor bench notes-baseline`: prints its address, then serves until killed.
pub async fn serve_baseline(sqlite: Option<PathBuf>, db: Option<String>) -> anyhow::Result<()> {
    let target = match (sqlite, db) {
        (Some(path), None) => Target::Sqlite(path),
        (None, Some(url)) => Target::Server(url),
        _ => bail!("give one of --sqlite PATH and --db URL"),
    };
    // A server's driver blocks (the `postgres` client panics on a runtime's thread).
    let connections = Arc::new(
        tokio::task::spawn_blocking(move || -> anyhow::Result<Connections> {
            Ok(match &target {
                Target::Sqlite(path) => {
                    Connections::Sqlite(Mutex::new(open_sqlite(path, &target)?))
                }
                Target::Server(url) => {
                    let conn = platform::sql::connect(url)?;
                    conn.execute_batch(&notes_table(&target, "bench_sync_notes"))?;
                    Connections::Server {
                        url: url.clone(),
                        idle: Mutex::new(vec![conn]),
                    }
                }
            })
        })
        .await??,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let router = axum::Router::new().route(
        "/save",
        axum::routing::post(move |body: Bytes| {
            let connections = connections.clone();
            async move { save_synchronously(&connections, &body).await }
        }),
    );
    axum::serve(listener, router).await?;
    Ok(())
}

fn open_sqlite(path: &Path, target: &Target) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(&notes_table(target, "bench_sync_notes"))?;
    Ok(conn)
}

async fn save_synchronously(
    connections: &Arc<Connections>,
    body: &[u8],
) -> axum::response::Response {
    use axum::response::IntoResponse;
    #[derive(serde::Deserialize)]
    struct SaveRequest {
        content: Option<String>,
    }
    let Ok(request) = serde_json::from_slice::<SaveRequest>(body) else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    let Ok(content) = notes::domain::content(request.content) else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    let connections = connections.clone();
    let id = notes::domain::NoteId::new().to_string();
    let answer = serde_json::json!({ "id": id });
    let inserted = tokio::task::spawn_blocking(move || {
        connections.insert(&id, &content, platform::envelope::now_millis())
    })
    .await;
    match inserted {
        Ok(Ok(())) => (http::StatusCode::CREATED, axum::Json(answer)).into_response(),
        _ => http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
