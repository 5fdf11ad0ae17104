//! Configuration: one typed tree, from defaults < `conveyor.toml` < `CONVEYOR_*` env < flags.
//! Nothing else in the process reads the environment, but for `RUST_LOG` (the log filter).

use clap::{Args, ValueEnum};
use edge::{ServiceModule, WorkerOptions};
use platform::retention::Retention;
use platform::Snapshots;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA: &str = "./data";
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
pub const DATABASE_FILE: &str = "conveyor.db";
pub const SQL_LOG: &str = "sql-log";
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const LOCAL_CACHE: &str = "local";
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10);
/// The most messages `--worker-batch` may ask for in one batch.
pub const MAX_WORKER_BATCH: u16 = 1000;

/// A configuration the process cannot start with; printed as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn config_error(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// HTTP APIs and message handlers.
    #[default]
    All,
    /// HTTP APIs only.
    Api,
    /// Message handlers only (plus health and metrics).
    Workers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Settings shared by the commands that open the database; every one is also a `CONVEYOR_*`
/// variable and a key of `conveyor.toml`.
#[derive(Debug, Clone, Default, Args)]
pub struct SettingsArgs {
    /// Configuration file (missing is fine unless given explicitly).
    #[arg(long, env = "CONVEYOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP on; repeat (or comma-separate) to listen on several. [default: 127.0.0.1:8080]
    #[arg(
        long,
        env = "CONVEYOR_HTTP",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub http: Vec<String>,
    /// Directory for the embedded database. [default: ./data]
    #[arg(long, env = "CONVEYOR_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Database URL: sqlite:PATH, postgres://USER[:PASSWORD]@HOST[:PORT]/DB or
    /// mysql://USER[:PASSWORD]@HOST[:PORT]/DB (MySQL 8 or MariaDB). [default: sqlite:<data>/conveyor.db]
    #[arg(long, env = "CONVEYOR_DB", value_name = "URL")]
    pub db: Option<String>,
    /// Message bus: sql-log (consumers read the database's log), redis://HOST[:PORT][/DB]
    /// (Redis Streams), nats://HOST[:PORT] (NATS JetStream) or
    /// amqp://USER:PASSWORD@HOST[:PORT]/VHOST (RabbitMQ), a broker URL with
    /// ?partitions=N (4) and ?namespace=NAME (conveyor). On a broker the log is relayed there
    /// and consumers read it there, so services may each have a database of their own.
    /// [default: sql-log]
    #[arg(long, env = "CONVEYOR_BUS", value_name = "URL")]
    pub bus: Option<String>,
    /// Services to run, comma-separated. [default: all]
    #[arg(
        long,
        env = "CONVEYOR_SERVICES",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub services: Vec<String>,
    /// What this process does for its services. [default: all]
    #[arg(long, env = "CONVEYOR_ROLE", value_enum)]
    pub role: Option<Role>,
    /// Log output. [default: text]
    #[arg(long, env = "CONVEYOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Largest accepted request body in bytes; larger gets 413. [default: 1048576]
    #[arg(long, env = "CONVEYOR_BODY_LIMIT", value_name = "BYTES")]
    pub body_limit: Option<usize>,
    /// Origins browsers may call the APIs from, comma-separated. [default: any]
    #[arg(
        long,
        env = "CONVEYOR_CORS_ORIGINS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// A request still running after this long is answered 503, e.g. 30s or 500ms. [default: 30s]
    #[arg(long, env = "CONVEYOR_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// How long messages every consumer group has acknowledged stay in the log, e.g. 7d. [default: 7d]
    #[arg(long, env = "CONVEYOR_LOG_RETENTION", value_name = "DURATION")]
    pub log_retention: Option<String>,
    /// How long a handled message's dedupe mark is kept; must be longer than the log's
    /// retention, so no redelivery outlives its mark. [default: 30d]
    #[arg(long, env = "CONVEYOR_INBOX_RETENTION", value_name = "DURATION")]
    pub inbox_retention: Option<String>,
    /// Read cache: `local` (in this process) or redis://HOST[:PORT][/DB], shared by every
    /// process pointed at it. [default: local]
    #[arg(long, env = "CONVEYOR_CACHE", value_name = "URL")]
    pub cache: Option<String>,
    /// How long a cached read may be served before it is read again; committed writes
    /// invalidate it sooner. [default: 10s]
    #[arg(long, env = "CONVEYOR_CACHE_TTL", value_name = "DURATION")]
    pub cache_ttl: Option<String>,
    /// Most queued messages a worker writes in one transaction (notes), 1 to 1000. [default: 256]
    #[arg(long, env = "CONVEYOR_WORKER_BATCH", value_name = "N")]
    pub worker_batch: Option<u16>,
    /// How long a worker waits for a batch to fill before writing it, e.g. 10ms. [default: 10ms]
    #[arg(long, env = "CONVEYOR_WORKER_WAIT", value_name = "DURATION")]
    pub worker_wait: Option<String>,
    /// Past this many queued notes the API answers 503 with Retry-After. [default: 100000]
    #[arg(long, env = "CONVEYOR_QUEUE_LIMIT", value_name = "N")]
    pub queue_limit: Option<u64>,
    /// Event-sourced streams (matches) save their state every N events, so loading one
    /// replays at most N; 0 turns snapshots off. [default: 100]
    #[arg(long, env = "CONVEYOR_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u32>,
}

/// `conveyor.toml`: the same keys as the flags, in snake case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    http: Option<Vec<String>>,
    data: Option<PathBuf>,
    db: Option<String>,
    bus: Option<String>,
    services: Option<Vec<String>>,
    role: Option<Role>,
    log_format: Option<LogFormat>,
    body_limit: Option<usize>,
    cors_origins: Option<Vec<String>>,
    request_timeout: Option<String>,
    log_retention: Option<String>,
    inbox_retention: Option<String>,
    cache: Option<String>,
    cache_ttl: Option<String>,
    worker_batch: Option<u16>,
    worker_wait: Option<String>,
    queue_limit: Option<u64>,
    snapshot_every: Option<u32>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub database: DatabaseAt,
    pub bus: BusAt,
    pub services: Vec<&'static ServiceModule>,
    pub role: Role,
    pub log_format: LogFormat,
    pub body_limit: usize,
    pub cors_origins: Vec<String>,
    pub request_timeout: Duration,
    pub retention: Retention,
    pub cache: CacheAt,
    pub cache_ttl: Duration,
    pub workers: WorkerOptions,
    pub snapshots: Snapshots,
}

/// Which transport carries messages between processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAt {
    /// The log table of the database: consumers read it there.
    SqlLog,
    /// Redis Streams; the URL, password included.
    Redis(String),
    /// NATS JetStream; the URL, password included.
    Nats(String),
    /// RabbitMQ; the URL, password included.
    Amqp(String),
}

impl BusAt {
    pub fn parse(url: &str) -> Result<BusAt, ConfigError> {
        if url == SQL_LOG {
            return Ok(BusAt::SqlLog);
        }
        let broker = match url.split_once("://") {
            Some(("redis", _)) => BusAt::Redis(url.to_owned()),
            Some(("nats", _)) => BusAt::Nats(url.to_owned()),
            Some(("amqp", _)) => BusAt::Amqp(url.to_owned()),
            _ => {
                return Err(config_error(format!(
                    "--bus {}: use `{SQL_LOG}`, redis://HOST[:PORT][/DB], nats://HOST[:PORT] or \
                     amqp://USER:PASSWORD@HOST[:PORT]/VHOST (any with ?partitions=N&namespace=NAME)",
                    mask_secrets(url)
                )))
            }
        };
        platform::broker::BusUrl::parse(url)
            .map_err(|error| config_error(format!("--bus {}: {}", mask_secrets(url), error.0)))?;
        Ok(broker)
    }

    pub fn describe(&self) -> String {
        match self {
            BusAt::SqlLog => SQL_LOG.to_owned(),
            BusAt::Redis(url) | BusAt::Nats(url) | BusAt::Amqp(url) => mask_secrets(url),
        }
    }
}

/// Where the read cache is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheAt {
    Local,
    /// A Redis server's URL, password included.
    Redis(String),
}

impl CacheAt {
    fn parse(url: &str) -> Result<CacheAt, ConfigError> {
        if url == LOCAL_CACHE {
            return Ok(CacheAt::Local);
        }
        match url.split_once("://") {
            Some(("redis", _)) => Ok(CacheAt::Redis(url.to_owned())),
            _ => Err(config_error(format!(
                "--cache {}: use `{LOCAL_CACHE}` or redis://HOST[:PORT][/DB]",
                mask_secrets(url)
            ))),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CacheAt::Local => LOCAL_CACHE.to_owned(),
            CacheAt::Redis(url) => mask_secrets(url),
        }
    }
}

impl SettingsArgs {
    /// Merges the file (if any) under these flags and env values and validates the result.
    pub fn resolve(self, all_services: &'static [ServiceModule]) -> Result<Settings, ConfigError> {
        let file = read_file(self.config.as_deref())?;
        let http = non_empty(self.http)
            .or(file.http)
            .unwrap_or_else(|| vec![DEFAULT_HTTP.to_owned()]);
        let data_dir = self
            .data
            .or(file.data)
            .unwrap_or_else(|| DEFAULT_DATA.into());
        let database = match self.db.or(file.db) {
            Some(url) => DatabaseAt::parse(&url)?,
            None => DatabaseAt::Sqlite(data_dir.join(DATABASE_FILE)),
        };
        let bus = match self.bus.or(file.bus) {
            Some(url) => BusAt::parse(url.trim())?,
            None => BusAt::SqlLog,
        };
        let names = non_empty(self.services).or(file.services);
        let defaults = Retention::default();
        let retention = Retention {
            log: duration(
                "log-retention",
                self.log_retention.or(file.log_retention),
                defaults.log,
            )?,
            inbox: duration(
                "inbox-retention",
                self.inbox_retention.or(file.inbox_retention),
                defaults.inbox,
            )?,
        };
        if retention.inbox <= retention.log {
            return Err(config_error(format!(
                "--inbox-retention {}: must be longer than --log-retention {}, or a redelivered \
                 message could outlive its dedupe mark",
                humantime::format_duration(retention.inbox),
                humantime::format_duration(retention.log)
            )));
        }
        let request_timeout = duration(
            "request-timeout",
            self.request_timeout.or(file.request_timeout),
            DEFAULT_REQUEST_TIMEOUT,
        )?;
        let cache = match self.cache.or(file.cache) {
            Some(url) => CacheAt::parse(url.trim())?,
            None => CacheAt::Local,
        };
        let cache_ttl = duration(
            "cache-ttl",
            self.cache_ttl.or(file.cache_ttl),
            DEFAULT_CACHE_TTL,
        )?;
        let defaults = WorkerOptions::default();
        let batch = self
            .worker_batch
            .or(file.worker_batch)
            .unwrap_or(defaults.batch);
        if !(1..=MAX_WORKER_BATCH).contains(&batch) {
            return Err(config_error(format!(
                "--worker-batch {batch}: must be from 1 to {MAX_WORKER_BATCH}"
            )));
        }
        let workers = WorkerOptions {
            batch,
            wait: match self.worker_wait.or(file.worker_wait) {
                // Zero is meaningful here: write each read at once.
                Some(wait) if wait.trim() == "0" => Duration::ZERO,
                wait => duration("worker-wait", wait, defaults.wait)?,
            },
            queue_limit: self
                .queue_limit
                .or(file.queue_limit)
                .unwrap_or(defaults.queue_limit),
        };
        let services = select_services(all_services, names)?;
        Ok(Settings {
            http: http
                .iter()
                .map(|addr| parse_addr(addr))
                .collect::<Result<_, _>>()?,
            data_dir,
            database,
            bus,
            services,
            role: self.role.or(file.role).unwrap_or_default(),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            body_limit: self
                .body_limit
                .or(file.body_limit)
                .unwrap_or(DEFAULT_BODY_LIMIT),
            cors_origins: non_empty(self.cors_origins)
                .or(file.cors_origins)
                .unwrap_or_default(),
            request_timeout,
            retention,
            cache,
            cache_ttl,
            workers,
            snapshots: self
                .snapshot_every
                .or(file.snapshot_every)
                .map_or(edge::DEFAULT_SNAPSHOTS, Snapshots::every),
        })
    }
}

/// A duration like `30s`, `500ms` or `7d`; zero is refused.
fn duration(flag: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match humantime::parse_duration(value.trim()) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err(config_error(format!(
            "--{flag} {value}: must be more than zero"
        ))),
        Err(error) => Err(config_error(format!(
            "--{flag} {value}: {error} (write it like 30s, 500ms or 7d)"
        ))),
    }
}

fn non_empty(values: Vec<String>) -> Option<Vec<String>> {
    let values: Vec<String> = values
        .into_iter()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
        .collect();
    (!values.is_empty()).then_some(values)
}

/// Reads the configuration file: an explicit path must exist; `./conveyor.toml` may not.
fn read_file(explicit: Option<&Path>) -> Result<FileSettings, ConfigError> {
    let path = explicit.unwrap_or(Path::new("conveyor.toml"));
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if explicit.is_none() && error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileSettings::default())
        }
        Err(error) => {
            return Err(config_error(format!(
                "cannot read {}: {error}",
                path.display()
            )))
        }
    };
    toml::from_str(&text)
        .map_err(|error| config_error(format!("{}: {}", path.display(), error.message())))
}

fn parse_addr(addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.parse()
        .map_err(|_| config_error(format!("--http {addr}: not an address like 127.0.0.1:8080")))
}

/// Where the database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseAt {
    /// The embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL or MySQL/MariaDB server's URL, password included.
    Server(String),
}

impl DatabaseAt {
    fn parse(url: &str) -> Result<DatabaseAt, ConfigError> {
        if url.starts_with("sqlite:") {
            return sqlite_path(url).map(DatabaseAt::Sqlite);
        }
        let scheme = url.split(':').next().unwrap_or(url);
        match scheme {
            "postgres" | "postgresql" | "mysql" | "mariadb" if url.contains("://") => {
                Ok(DatabaseAt::Server(url.to_owned()))
            }
            _ => Err(config_error(format!(
                "--db {}: unsupported database `{scheme}`; use sqlite:PATH, postgres://… or mysql://…",
                mask_secrets(url)
            ))),
        }
    }

    /// The URL, its password masked: what may be shown and logged.
    pub fn describe(&self) -> String {
        match self {
            DatabaseAt::Sqlite(path) => format!("sqlite:{}", path.display()),
            DatabaseAt::Server(url) => mask_secrets(url),
        }
    }
}

/// `sqlite:PATH`, `sqlite://PATH` or `sqlite:///ABSOLUTE/PATH`.
fn sqlite_path(url: &str) -> Result<PathBuf, ConfigError> {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Err(config_error(format!("--db {url}: not a sqlite: URL")));
    };
    let path = rest.strip_prefix("//").unwrap_or(rest);
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() {
        return Err(config_error(format!("--db {url}: no file path")));
    }
    Ok(PathBuf::from(path))
}

fn select_services(
    all: &'static [ServiceModule],
    names: Option<Vec<String>>,
) -> Result<Vec<&'static ServiceModule>, ConfigError> {
    let Some(names) = names else {
        return Ok(all.iter().collect());
    };
    if names.iter().any(|name| name == "all") {
        return Ok(all.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|service| service.name == name)
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|service| service.name).collect();
                    config_error(format!(
                        "--services: unknown service `{name}`; known: {}",
                        known.join(", ")
                    ))
                })
        })
        .collect()
}

/// Hides the password of a URL like `scheme://user:password@host`.
pub fn mask_secrets(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl Settings {
    /// Creates the embedded database's directory and checks it is writable.
    pub fn prepare_data_dir(&self) -> Result<(), ConfigError> {
        let DatabaseAt::Sqlite(file) = &self.database else {
            return Ok(());
        };
        let dir = file
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let unwritable =
            |error: std::io::Error| config_error(format!("data dir {}: {error}", dir.display()));
        std::fs::create_dir_all(dir).map_err(unwritable)?;
        tempfile::tempfile_in(dir).map_err(unwritable)?;
        Ok(())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn render(&self) -> String {
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let role = match self.role {
            Role::All => "all",
            Role::Api => "api",
            Role::Workers => "workers",
        };
        let log_format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        [
            format!(
                "http = {}",
                list(self.http.iter().map(ToString::to_string).collect())
            ),
            format!("data = {:?}", self.data_dir.display().to_string()),
            format!("db = {:?}", self.database.describe()),
            format!("bus = {:?}", self.bus.describe()),
            format!(
                "services = {}",
                list(self.services.iter().map(|s| s.name.to_owned()).collect())
            ),
            format!("role = {role:?}"),
            format!("log_format = {log_format:?}"),
            format!("body_limit = {}", self.body_limit),
            format!("cors_origins = {}", list(self.cors_origins.clone())),
            format!(
                "request_timeout = \"{}\"",
                humantime::format_duration(self.request_timeout)
            ),
            format!(
                "log_retention = \"{}\"",
                humantime::format_duration(self.retention.log)
            ),
            format!(
                "inbox_retention = \"{}\"",
                humantime::format_duration(self.retention.inbox)
            ),
            format!("cache = {:?}", self.cache.describe()),
            format!(
                "cache_ttl = \"{}\"",
                humantime::format_duration(self.cache_ttl)
            ),
            format!("worker_batch = {}", self.workers.batch),
            format!(
                "worker_wait = \"{}\"",
                humantime::format_duration(self.workers.wait)
            ),
            format!("queue_limit = {}", self.workers.queue_limit),
            format!(
                "snapshot_every = {}",
                self.snapshots.interval().unwrap_or_default()
            ),
        ]
        .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SERVICES: &[ServiceModule] = &[
        ServiceModule {
            name: "alpha",
            migrations: &[],
            routes: |_| utoipa_axum::router::OpenApiRouter::new(),
            subscriptions: |_| Vec::new(),
            projections: Vec::new,
        },
        ServiceModule {
            name: "beta",
            migrations: &[],
            routes: |_| utoipa_axum::router::OpenApiRouter::new(),
            subscriptions: |_| Vec::new(),
            projections: Vec::new,
        },
    ];

    fn resolve(args: SettingsArgs) -> Result<Settings, ConfigError> {
        args.resolve(SERVICES)
    }

    #[test]
    fn defaults_need_nothing() {
        let settings = resolve(SettingsArgs::default()).expect("defaults");
        assert_eq!(
            settings.http,
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            settings.database,
            DatabaseAt::Sqlite(PathBuf::from("./data/conveyor.db"))
        );
        assert_eq!(settings.services.len(), 2);
        assert_eq!(settings.role, Role::All);
        assert_eq!(settings.body_limit, 1024 * 1024);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("conveyor.toml");
        std::fs::write(
            &file,
            "http = [\"127.0.0.1:9000\"]\nservices = [\"beta\"]\nrole = \"workers\"\n",
        )
        .unwrap();
        let settings = resolve(SettingsArgs {
            config: Some(file.clone()),
            http: vec!["127.0.0.1:9100".into(), "127.0.0.1:9101".into()],
            ..SettingsArgs::default()
        })
        .expect("valid");
        assert_eq!(settings.http.len(), 2);
        assert_eq!(settings.http[0].port(), 9100);
        assert_eq!(
            settings.services.iter().map(|s| s.name).collect::<Vec<_>>(),
            ["beta"]
        );
        assert_eq!(settings.role, Role::Workers);
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        let unknown = resolve(SettingsArgs {
            services: vec!["gamma".into()],
            ..Default::default()
        });
        assert!(unknown.unwrap_err().0.contains("unknown service `gamma`"));
        let addr = resolve(SettingsArgs {
            http: vec!["localhost".into()],
            ..Default::default()
        });
        assert!(addr.unwrap_err().0.contains("--http localhost"));
        let db = resolve(SettingsArgs {
            db: Some("oracle://u:hunter2@h/db".into()),
            ..Default::default()
        });
        let message = db.unwrap_err().0;
        assert!(
            message.contains("unsupported database `oracle`"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
        let server = resolve(SettingsArgs {
            db: Some("postgres://u:hunter2@h/db".into()),
            ..Default::default()
        })
        .expect("a PostgreSQL URL");
        assert_eq!(
            server.database,
            DatabaseAt::Server("postgres://u:hunter2@h/db".into())
        );
        assert!(!server.render().contains("hunter2"));
        let bus = resolve(SettingsArgs {
            bus: Some("kafka://x".into()),
            ..Default::default()
        });
        assert!(bus.unwrap_err().0.contains("--bus"));
        let partitions = resolve(SettingsArgs {
            bus: Some("nats://h?partitions=0".into()),
            services: vec!["alpha".into()],
            ..Default::default()
        });
        assert!(partitions.unwrap_err().0.contains("partitions=0"));
        let redis = resolve(SettingsArgs {
            bus: Some("redis://:hunter2@h:6379?partitions=8".into()),
            services: vec!["alpha".into()],
            ..Default::default()
        })
        .expect("a Redis bus");
        assert_eq!(
            redis.bus,
            BusAt::Redis("redis://:hunter2@h:6379?partitions=8".into())
        );
        assert!(!redis.render().contains("hunter2"));
        let missing = resolve(SettingsArgs {
            config: Some("/nonexistent/c.toml".into()),
            ..Default::default()
        });
        assert!(missing.unwrap_err().0.contains("cannot read"));
    }

    #[test]
    fn durations_are_read_and_checked() {
        let settings = resolve(SettingsArgs {
            request_timeout: Some("500ms".into()),
            log_retention: Some("1h".into()),
            inbox_retention: Some("2h".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(settings.request_timeout, Duration::from_millis(500));
        assert_eq!(settings.retention.log, Duration::from_secs(3600));
        assert!(settings.render().contains("inbox_retention = \"2h\""));
        let inverted = resolve(SettingsArgs {
            log_retention: Some("40d".into()),
            ..Default::default()
        });
        assert!(inverted.unwrap_err().0.contains("must be longer"));
        let garbage = resolve(SettingsArgs {
            request_timeout: Some("soon".into()),
            ..Default::default()
        });
        assert!(garbage.unwrap_err().0.contains("--request-timeout soon"));
    }

    #[test]
    fn cache_and_worker_settings_are_read_and_checked() {
        let defaults = resolve(SettingsArgs::default()).expect("defaults");
        assert_eq!(defaults.cache, CacheAt::Local);
        assert_eq!(defaults.cache_ttl, Duration::from_secs(10));
        assert_eq!(defaults.workers.batch, 256);
        let settings = resolve(SettingsArgs {
            cache: Some("redis://:hunter2@127.0.0.1:6379/1".into()),
            cache_ttl: Some("2s".into()),
            worker_batch: Some(50),
            worker_wait: Some("0".into()),
            queue_limit: Some(10),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            settings.cache,
            CacheAt::Redis("redis://:hunter2@127.0.0.1:6379/1".into())
        );
        assert!(!settings.render().contains("hunter2"));
        assert_eq!(settings.workers.batch, 50);
        assert_eq!(settings.workers.wait, Duration::ZERO);
        assert_eq!(settings.workers.queue_limit, 10);
        let memcached = resolve(SettingsArgs {
            cache: Some("memcached://h".into()),
            ..Default::default()
        });
        assert!(memcached.unwrap_err().0.contains("--cache memcached://h"));
        let huge = resolve(SettingsArgs {
            worker_batch: Some(5000),
            ..Default::default()
        });
        assert!(huge.unwrap_err().0.contains("--worker-batch 5000"));
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "htp = [\"x\"]\n").unwrap();
        let error = resolve(SettingsArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.0.contains("unknown field `htp`"), "{}", error.0);
    }

    #[test]
    fn sqlite_urls() {
        assert_eq!(
            sqlite_path("sqlite:data/x.db").unwrap(),
            PathBuf::from("data/x.db")
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/x.db").unwrap(),
            PathBuf::from("/tmp/x.db")
        );
        assert!(sqlite_path("sqlite:").is_err());
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask_secrets("amqp://guest:guest@localhost:5672"),
            "amqp://guest:***@localhost:5672"
        );
        assert_eq!(mask_secrets("sqlite:data/x.db"), "sqlite:data/x.db");
        assert_eq!(
            mask_secrets("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
