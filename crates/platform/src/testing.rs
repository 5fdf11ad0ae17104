//! Fresh databases for tests: a temporary SQLite file, or a database of its own on the
//! PostgreSQL or MySQL/MariaDB server the environment names, so that tests run in parallel.
//!
//! The servers are found at `CONVEYOR_TEST_POSTGRES` and `CONVEYOR_TEST_MYSQL` (URLs of a
//! user that may create databases), by default the loopback servers `scripts/services.sh`
//! starts. A server that does not answer fails the test: it is never skipped.

use crate::db::{Database, Outgoing};
use crate::envelope::{Envelope, Kind};
use crate::sql::{self, Backend, Conn, ServerUrl, TemporaryDatabase};
use std::path::PathBuf;

pub const POSTGRES_ENV: &str = "CONVEYOR_TEST_POSTGRES";
pub const MYSQL_ENV: &str = "CONVEYOR_TEST_MYSQL";
const POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/mysql";
/// Test databases are named with this prefix, so that leftovers can be found and dropped.
pub const PREFIX: &str = "conveyor_test_";

/// A port on loopback that nothing listens on (for a server a test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something listens on `port` (`up`) or nothing does (`!up`), up to
/// `limit`; `what` names the server in the panic that says it did not.
pub fn wait_for_port(port: u16, up: bool, what: &str, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() != up {
        let state = if up { "start" } else { "stop" };
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A database that exists for one test and is dropped after it.
pub struct Scratch {
    backend: Backend,
    url: String,
    dir: Option<tempfile::TempDir>,
    /// Dropped with the scratch, dropping the server's database.
    _server: Option<TemporaryDatabase>,
}

impl Scratch {
    pub async fn new(backend: Backend) -> Scratch {
        if backend == Backend::Sqlite {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("conveyor.db");
            return Scratch {
                backend,
                url: format!("sqlite:{}", path.display()),
                dir: Some(dir),
                _server: None,
            };
        }
        let (variable, default) = match backend {
            Backend::Postgres => (POSTGRES_ENV, POSTGRES_DEFAULT),
            _ => (MYSQL_ENV, MYSQL_DEFAULT),
        };
        let admin_url = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
        let database = tokio::task::spawn_blocking(move || {
            TemporaryDatabase::create(&admin_url, PREFIX).unwrap_or_else(|error| {
                panic!(
                    "the {backend} server at {variable} (default {default}) does not answer \
                     or refused a new database: {error}; start it with scripts/services.sh"
                )
            })
        })
        .await
        .expect("create a test database");
        Scratch {
            backend,
            url: database.url().to_owned(),
            dir: None,
            _server: Some(database),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `sqlite:PATH` or the server database's URL: what `--db` takes.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The SQLite file, for tests that look at it directly.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.path().join("conveyor.db"))
    }

    /// A connection of its own to the server database, as the platform sets one up; for
    /// tests that drive transactions by hand. Use it on a thread of its own, not a
    /// runtime's (see `sql::postgres`).
    pub fn connect(&self) -> Conn {
        ServerUrl::parse(&self.url)
            .expect("a server database")
            .connect()
            .expect("connect to the test database")
    }

    pub async fn open(&self) -> Database {
        match self.sqlite_path() {
            Some(path) => Database::open(&path).await,
            None => Database::connect(&self.url).await,
        }
        .expect("open the test database")
    }
}

/// Appends `count` messages to the log inside `conn`'s open transaction, numbered as a
/// server's appending batch numbers them (`log::append_numbered`); the last position.
pub fn append_numbered(conn: &Conn, count: usize) -> Result<Option<i64>, sql::Error> {
    let messages: Vec<Outgoing> = (0..count)
        .map(|seq| Outgoing {
            envelope: Envelope {
                id: uuid::Uuid::now_v7(),
                kind: Kind::Event,
                name: "test.Appended".to_owned(),
                topic: "test.appended".to_owned(),
                key: format!("key-{seq}"),
                payload: b"{}".to_vec(),
                headers: Default::default(),
                occurred_at: crate::envelope::now_millis(),
            },
            only_group: None,
        })
        .collect();
    crate::log::append_numbered(conn, &messages, None)
}
