//! `conveyor bench myevents` (here), `conveyor bench notes` (`notes.rs`), `conveyor bench
//! eventstore` (`eventstore.rs`) and `conveyor bench bus` (`bus.rs`).
//!
//! `conveyor bench myevents`: MyEvents' throughput and latency on the embedded default or on
//! a PostgreSQL or MySQL/MariaDB server, each figure beside a baseline measured in the same
//! run on the same machine.
//!
//! The server under test is this binary's own `serve`, in a child process on a fresh data
//! directory (and, with `--db`, a fresh database created on that server and dropped after);
//! the load comes from this process over loopback.

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod bus;
mod eventstore;
mod notes;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// GET and POST /events rates (GET also at RUST_LOG=warn), event-to-bookable propagation in
    /// one process and from an api process to a workers process, idle CPU and memory.
    Myevents(BenchArgs),
    /// Notes: POST /save ingest vs an insert inside the request, the workers' drain rate vs
    /// bare batched inserts, and a burst of saves with the time to write them all.
    Notes(notes::NotesBenchArgs),
    /// The event store: append and load throughput on SQLite and PostgreSQL beside the peer
    /// cqrs-es + postgres-es, and matches' moves per second through HTTP.
    Eventstore(eventstore::EventStoreBenchArgs),
    /// Messages through Conveyor's outbox, relay and a broker transport (publish to handled
    /// per second, latency p50 and p99) beside the broker's own client doing the same work.
    Bus(bus::BusBenchArgs),
    /// The GET baseline's server: a bare axum handler answering `/event` with the bytes of
    /// FILE. Prints its address, then serves until killed.
    #[command(hide = true)]
    BareAxum { file: PathBuf },
    /// The notes ingest baseline's server: `POST /save` inserting the note before it
    /// answers, on the SQLite file or server database given. Prints its address, then serves
    /// until killed.
    #[command(hide = true)]
    NotesBaseline {
        #[arg(long)]
        sqlite: Option<PathBuf>,
        #[arg(long)]
        db: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Seconds each throughput measurement runs; POST and its baseline share theirs out in
    /// three slices each, alternating.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent keep-alive HTTP/1.1 connections, each sending one request at a time.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Events timed from creation to bookable.
    #[arg(long, default_value_t = 300)]
    pub samples: usize,
    /// Run on this PostgreSQL or MySQL/MariaDB server (postgres://… or mysql://…, as a user
    /// that may create databases) instead of the embedded SQLite; the bench creates a fresh
    /// database there and drops it after. POST is then compared with bare single-row insert
    /// transactions through the same driver, from as many connections as HTTP clients.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Myevents(args) => myevents(args).await,
        BenchCommand::Notes(args) => notes::notes(args).await,
        BenchCommand::Eventstore(args) => eventstore::eventstore(args).await,
        BenchCommand::Bus(args) => bus::bus(args).await,
        BenchCommand::BareAxum { file } => serve_bare_axum(Bytes::from(std::fs::read(file)?)).await,
        BenchCommand::NotesBaseline { sqlite, db } => notes::serve_baseline(sqlite, db).await,
    }
}

async fn myevents(args: BenchArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let dir = tempfile::tempdir()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;

    let database = fresh_database(args.db.as_deref()).await?;
    let on_server: Vec<&str> = match &database {
        Some(database) => vec!["--db", database.url()],
        None => Vec::new(),
    };
    let with = |flags: &[&'static str]| -> Vec<&str> {
        on_server
            .iter()
            .copied()
            .chain(flags.iter().copied())
            .collect()
    };
    progress("starting `conveyor serve` (default settings) on a fresh data directory");
    let data = dir.path().join("data");
    let server = Server::start(&data, &with(&[]), None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = server.rss_bytes()?;

    let event = seed_event("bench");
    let created: Value = client
        .post(server.url("/events"))
        .body(event.clone())
        .send()
        .await?
        .json()
        .await?;
    let id = created["ID"]
        .as_str()
        .context("POST /events returned no ID")?
        .to_owned();
    let event_url = server.url(&format!("/events/{id}"));
    let event_bytes = client.get(&event_url).send().await?.bytes().await?;

    progress(&format!(
        "baseline: bare axum handler returning the same {} bytes",
        event_bytes.len()
    ));
    let bare_body = dir.path().join("event.json");
    std::fs::write(&bare_body, &event_bytes)?;
    let bare = BaselineServer::start(
        &[
            "bench".as_ref(),
            "bare-axum".as_ref(),
            bare_body.as_os_str(),
        ],
        "the bare axum server",
    )?;
    let load = Load {
        duration,
        concurrency: args.concurrency,
    };
    let bare_rate = load.rate(bare.address, get("/event")).await?;
    drop(bare);

    progress("GET /events/{id}");
    let event_path = format!("/events/{id}");
    let get_rate = load.rate(server.address, get(&event_path)).await?;

    // The two log levels alternate, twice each, on two live servers: back to back, runs on
    // this VM differ by about 10 %, as much as the difference looked for.
    progress("GET /events/{id} at the default log level and at RUST_LOG=warn, alternating");
    let quiet = Server::start(&data, &with(&[]), Some("warn")).await?;
    let mut logged_rate = get_rate;
    let mut quiet_rate = load.rate(quiet.address, get(&event_path)).await?;
    logged_rate += load.rate(server.address, get(&event_path)).await?;
    quiet_rate += load.rate(quiet.address, get(&event_path)).await?;
    drop(quiet);

    let bare_label = match &database {
        Some(_) => format!(
            "POST /events (req/s) vs bare tx/s, {} conns",
            args.concurrency
        ),
        None => "POST /events (req/s) vs bare SQLite tx/s".to_owned(),
    };
    let mut bare_inserts = match &database {
        Some(database) => BareInserts::server(database.url(), args.concurrency).await?,
        None => BareInserts::sqlite(&dir.path().join("bare.db"))?,
    };
    progress(&format!(
        "POST /events and {} alternating, {SLICES} slices each",
        bare_inserts.describe()
    ));
    let slice = duration / SLICES;
    let template = seed_event(NAME_SLOT);
    let (mut post_rate, mut bare_rate_tx) = (0.0, 0.0);
    for round in 0..SLICES {
        let (returned, rate) = bare_inserts.run(slice).await?;
        bare_inserts = returned;
        bare_rate_tx += rate / f64::from(SLICES);
        // No warm-up: the GETs warmed the server, and a second of POSTs would leave its
        // backlog of messages for the consumers to work off inside the measured window.
        let template = template.clone();
        post_rate += load
            .measured_for(slice)
            .measure(server.address, move |n| {
                let body = template.replacen(NAME_SLOT, &format!("load {round}-{n}"), 1);
                request(http::Method::POST, "/events", body.into())
            })
            .await?
            / f64::from(SLICES);
        // The consumers' backlog is worked off between slices, not in the next bare one.
        wait_for_zero_lag(&client, &server).await?;
    }
    bare_inserts.close().await?;

    progress(&format!(
        "propagation: {} events from POST /events returning to bookable",
        args.samples
    ));
    let (p50, p99) = propagation(&client, &server, args.samples).await?;
    progress("idle CPU of `conveyor serve`");
    let idle_cpu = idle_cpu_share(&[&server]).await?;
    let ready_after = server.ready_after;
    drop(server);

    progress(&format!(
        "--role api and --role workers on one data dir: {} events from POST to bookable",
        args.samples
    ));
    let api = Server::start(&data, &with(&["--role", "api"]), None).await?;
    let workers = Server::start(&data, &with(&["--role", "workers"]), None).await?;
    let (split_p50, split_p99) = propagation(&client, &api, args.samples).await?;
    progress("idle CPU of the api and workers processes");
    let split_idle_cpu = idle_cpu_share(&[&api, &workers]).await?;
    drop((api, workers));

    let on = match &args.db {
        Some(url) => crate::config::mask_secrets(url),
        None => "the embedded default".to_owned(),
    };
    println!(
        "MyEvents on {on} ({} s per rate, {} clients)",
        args.seconds, args.concurrency
    );
    println!(
        "{:<44} {:>12} {:>14} {:>8}  target",
        "measure", "value", "baseline", "ratio"
    );
    row(
        "GET /events/{id} (req/s) vs bare axum",
        get_rate,
        bare_rate,
        ">= 0.50",
    );
    row(
        "GET default logging vs RUST_LOG=warn",
        logged_rate / 2.0,
        quiet_rate / 2.0,
        ">= 0.90",
    );
    row(&bare_label, post_rate, bare_rate_tx, ">= 1.00");
    println!(
        "{:<44} {:>9.2} ms",
        "propagation p50, POST to bookable",
        p50.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>9.2} ms {:>23}  < 50 ms",
        "propagation p99, POST to bookable",
        p99.as_secs_f64() * 1e3,
        ""
    );
    millis_row("propagation p50, api process to workers", split_p50, "");
    millis_row(
        "propagation p99, api process to workers",
        split_p99,
        "< 50 ms",
    );
    println!(
        "{:<44} {:>9.2} %  {:>23}  < 1 %",
        "idle CPU, one process (% of a core)",
        idle_cpu * 100.0,
        ""
    );
    println!(
        "{:<44} {:>9.2} %  {:>23}  < 1 %",
        "idle CPU, api or workers (% of a core)",
        split_idle_cpu * 100.0,
        ""
    );
    println!(
        "{:<44} {:>9.1} MB {:>23}  < 60 MB",
        "idle RSS of `conveyor serve`",
        idle_rss as f64 / 1e6,
        ""
    );
    println!(
        "{:<44} {:>9.0} ms",
        "start to ready on an empty data dir",
        ready_after.as_secs_f64() * 1e3
    );
    Ok(())
}

/// With `--db URL`, a fresh database on that server (dropped when the value is), for a bench
/// run of its own; the embedded default needs none.
async fn fresh_database(
    server: Option<&str>,
) -> anyhow::Result<Option<platform::sql::TemporaryDatabase>> {
    let Some(url) = server.map(str::to_owned) else {
        return Ok(None);
    };
    progress("creating a fresh database on the server");
    let database = tokio::task::spawn_blocking(move || {
        platform::sql::TemporaryDatabase::create(&url, "conveyor_bench_")
    })
    .await??;
    Ok(Some(database))
}

fn millis_row(label: &str, value: Duration, target: &str) {
    println!(
        "{label:<44} {:>9.2} ms {:>23}  {target}",
        value.as_secs_f64() * 1e3,
        ""
    );
}

/// Creates `samples` events one after another through `server`, timing each from its 201
/// to the first 200 of its bookings on the same server; returns p50 and p99.
async fn propagation(
    client: &reqwest::Client,
    server: &Server,
    samples: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let mut delays = Vec::with_capacity(samples);
    for n in 0..samples {
        let created: Value = client
            .post(server.url("/events"))
            .body(seed_event(&format!("p{n}")))
            .send()
            .await?
            .json()
            .await?;
        let returned = Instant::now();
        let id = created["ID"].as_str().context("no ID")?;
        let bookings = server.url(&format!("/events/{id}/bookings"));
        while client.get(&bookings).send().await?.status() != 200 {
            if returned.elapsed() > Duration::from_secs(10) {
                bail!("event {id} never became bookable");
            }
        }
        delays.push(returned.elapsed());
    }
    delays.sort();
    let percentile = |p: f64| delays[((delays.len() as f64 - 1.0) * p).round() as usize];
    Ok((percentile(0.50), percentile(0.99)))
}

/// The largest share of one core any of `servers` uses while idle, over a few seconds.
async fn idle_cpu_share(servers: &[&Server]) -> anyhow::Result<f64> {
    const WINDOW: Duration = Duration::from_secs(5);
    // Let the last requests' work finish first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<f64> = servers
        .iter()
        .map(|server| server.cpu_seconds())
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(WINDOW).await;
    let mut share: f64 = 0.0;
    for (server, before) in servers.iter().zip(before) {
        share = share.max((server.cpu_seconds()? - before) / WINDOW.as_secs_f64());
    }
    Ok(share)
}

/// Waits until every consumer partition reports it has caught up with the log.
async fn wait_for_zero_lag(client: &reqwest::Client, server: &Server) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let lagging = metrics
            .lines()
            .filter(|line| line.starts_with(platform::metric::CONSUMER_LAG))
            .any(|line| !line.ends_with(" 0"));
        if !lagging {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the consumers did not catch up within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn progress(message: &str) {
    eprintln!("bench: {message} ...");
}

fn row(label: &str, value: f64, baseline: f64, target: &str) {
    println!(
        "{label:<44} {value:>12.0} {baseline:>14.0} {:>8.2}  {target}",
        value / baseline
    );
}

pub fn seed_event(name: &str) -> String {
    serde_json::json!({
        "name": name, "startdate": 768346784368i64, "enddate": 768346784368i64, "duration": 120,
        "location": { "name": "Paris fifa park", "address": "le monses", "country": "frn",
            "opentime": 10, "closetime": 15,
            "halls": [{ "name": "lobby", "location": "principal building", "capacity": 150 }] }
    })
    .to_string()
}

/// Where the load generator puts each POST's event name in the seed event.
const NAME_SLOT: &str = "<event name>";

/// The load generator: `concurrency` keep-alive HTTP/1.1 connections, each sending one
/// request after another for `duration`. Each is a bare hyper connection, so the generator
/// takes as little as it can of the CPU it shares with the server.
struct Load {
    duration: Duration,
    concurrency: usize,
}

type LoadRequest = http::Request<Full<Bytes>>;

/// The load a server gets before it is measured: a fresh process answers its first second of
/// load a quarter slower (caches, allocator pools, connection setup), which made a server
/// measured first look slower than one measured later.
const WARM_UP: Duration = Duration::from_secs(1);

impl Load {
    /// The same load, for `duration` instead.
    fn measured_for(&self, duration: Duration) -> Load {
        Load {
            duration,
            concurrency: self.concurrency,
        }
    }

    /// Successful (2xx) requests per second, after `WARM_UP`; `make` builds request number `n`.
    async fn rate<F>(&self, address: SocketAddr, make: F) -> anyhow::Result<f64>
    where
        F: Fn(u64) -> LoadRequest + Clone + Send + 'static,
    {
        let warm_up = Load {
            duration: WARM_UP,
            concurrency: self.concurrency,
        };
        warm_up.measure(address, make.clone()).await?;
        self.measure(address, make).await
    }

    async fn measure<F>(&self, address: SocketAddr, make: F) -> anyhow::Result<f64>
    where
        F: Fn(u64) -> LoadRequest + Clone + Send + 'static,
    {
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + self.duration;
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..self.concurrency {
            let (make, done) = (make.clone(), done.clone());
            let mut sender = connect(address).await?;
            workers.spawn(async move {
                let mut n = worker as u64 * 1_000_000_000;
                while Instant::now() < deadline {
                    let response = sender.send_request(make(n)).await?;
                    let success = response.status().is_success();
                    response.into_body().collect().await?;
                    if success {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                anyhow::Ok(())
            });
        }
        while let Some(worker) = workers.join_next().await {
            worker??;
        }
        Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
    }
}

/// One keep-alive HTTP/1.1 connection of the load generator.
async fn connect(
    address: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn request(method: http::Method, path: &str, body: Bytes) -> LoadRequest {
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = http::Uri::try_from(path).unwrap_or_default();
    request.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("localhost"),
    );
    request
}

/// A `Load::rate` request maker: GET `path`.
fn get(path: &str) -> impl Fn(u64) -> LoadRequest + Clone + Send + 'static {
    let path = path.to_owned();
    move |_| request(http::Method::GET, &path, Bytes::new())
}

/// A baseline's server: this binary run with `args` (a hidden `bench` command), in a process
/// of its own like the server under test. It prints its address, then serves until killed.
struct BaselineServer {
    child: Child,
    address: SocketAddr,
}

impl BaselineServer {
    fn start(args: &[&std::ffi::OsStr], what: &str) -> anyhow::Result<BaselineServer> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        match line.trim().parse() {
            Ok(address) => Ok(BaselineServer { child, address }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} did not print its address: {line:?}")
            }
        }
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The GET baseline's server: a bare axum handler returning the same bytes from memory.
async fn serve_bare_axum(body: Bytes) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let router = axum::Router::new().route(
        "/event",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    axum::serve(listener, router).await?;
    Ok(())
}

/// How many slices the POST rate and its baseline's are each measured in, alternating: on
/// this VM two runs minutes apart can differ by a quarter or more, so measuring one after the
/// other compared two moments as much as two ways of writing.
const SLICES: u32 = 3;

/// The baseline POST is compared with: single-row insert transactions (`BEGIN`, `INSERT`,
/// `COMMIT`) of the seed event's JSON, through the platform's drivers, on connections opened
/// once and kept between slices.
enum BareInserts {
    /// One connection with the durability settings the platform uses (WAL,
    /// `synchronous=FULL`), committing one transaction after another.
    Sqlite(rusqlite::Connection),
    /// As many server connections as HTTP clients, each on a thread of its own, and the
    /// next row's id.
    Server {
        conns: Vec<platform::sql::Conn>,
        next: AtomicU64,
    },
}

impl BareInserts {
    fn sqlite(path: &Path) -> anyhow::Result<BareInserts> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")?;
        Ok(BareInserts::Sqlite(conn))
    }

    async fn server(url: &str, clients: usize) -> anyhow::Result<BareInserts> {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            let conns = (0..clients)
                .map(|_| platform::sql::connect(&url))
                .collect::<Result<Vec<_>, _>>()?;
            conns[0].execute_batch(
                "CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, body TEXT NOT NULL)",
            )?;
            Ok(BareInserts::Server {
                conns,
                next: AtomicU64::new(0),
            })
        })
        .await?
    }

    /// Closes the connections off the async runtime (a PostgreSQL session has a runtime of
    /// its own, which may not be dropped inside another).
    async fn close(self) -> anyhow::Result<()> {
        Ok(tokio::task::spawn_blocking(move || drop(self)).await?)
    }

    fn describe(&self) -> String {
        match self {
            BareInserts::Sqlite(_) => {
                "bare single-row SQLite transactions (WAL, synchronous=FULL)".to_owned()
            }
            BareInserts::Server { conns, .. } => format!(
                "bare single-row insert transactions from {} connections",
                conns.len()
            ),
        }
    }

    /// Transactions per second over `duration`; the connections come back for the next slice.
    async fn run(mut self, duration: Duration) -> anyhow::Result<(BareInserts, f64)> {
        tokio::task::spawn_blocking(move || {
            let body = seed_event("bare");
            let started = Instant::now();
            let committed = match &mut self {
                BareInserts::Sqlite(conn) => insert_until(started + duration, || {
                    conn.execute_batch("BEGIN")?;
                    conn.prepare_cached("INSERT INTO bench_rows (body) VALUES (?)")?
                        .execute([&body])?;
                    Ok(conn.execute_batch("COMMIT")?)
                })?,
                BareInserts::Server { conns, next } => {
                    std::thread::scope(|scope| {
                        let threads: Vec<_> = conns
                            // Each thread its own connection: one is not shared (`!Sync`).
                            .iter_mut()
                            .map(|conn| {
                                let (next, body) = (&*next, &body);
                                scope.spawn(move || {
                                    insert_until(started + duration, || {
                                        let id = next.fetch_add(1, Ordering::Relaxed) as i64;
                                        conn.execute_batch("BEGIN")?;
                                        conn.execute(
                                            "INSERT INTO bench_rows (id, body) VALUES (?, ?)",
                                            (id, body),
                                        )?;
                                        Ok(conn.execute_batch("COMMIT")?)
                                    })
                                })
                            })
                            .collect();
                        threads.into_iter().try_fold(0, |total, thread| {
                            let count = thread
                                .join()
                                .map_err(|_| anyhow::anyhow!("a baseline client panicked"))??;
                            anyhow::Ok(total + count)
                        })
                    })?
                }
            };
            let rate = committed as f64 / started.elapsed().as_secs_f64();
            Ok((self, rate))
        })
        .await?
    }
}

/// Runs `insert` until `deadline`; how many times it ran.
fn insert_until(
    deadline: Instant,
    mut insert: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut count = 0;
    while Instant::now() < deadline {
        insert()?;
        count += 1;
    }
    Ok(count)
}

struct Server {
    child: Child,
    address: SocketAddr,
    base: String,
    ready_after: Duration,
}

impl Server {
    /// `conveyor serve` on `data` with `extra` flags, logging at `rust_log` (or the
    /// default level, to a sink: the figures are of the server, not of a terminal).
    async fn start(data: &Path, extra: &[&str], rust_log: Option<&str>) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let started = Instant::now();
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let child = command.spawn().context("starting conveyor serve")?;
        let base = format!("http://127.0.0.1:{port}");
        let ready = format!("{base}/health/ready");
        loop {
            if let Ok(response) = reqwest::get(&ready).await {
                if response.status().is_success() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("conveyor serve did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Server {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            base,
            ready_after: started.elapsed(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// CPU time the process's threads have used, to the nanosecond: the first field of each
    /// thread's `schedstat` (the tick-based times of `stat` are 10 ms coarse).
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let mut nanos: u64 = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let schedstat = std::fs::read_to_string(task?.path().join("schedstat"))?;
            let ran = schedstat
                .split_whitespace()
                .next()
                .context("empty schedstat")?;
            nanos += ran.parse::<u64>()?;
        }
        Ok(nanos as f64 / 1e9)
    }

    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc")?;
        Ok(kib * 1024)
    }
}

impl Drop for Server {
    /// Stops the server as a supervisor would (SIGTERM), so that it hands its partitions back
    /// and the next server on the data dir need not wait for its leases to lapse.
    fn drop(&mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while terminated && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
