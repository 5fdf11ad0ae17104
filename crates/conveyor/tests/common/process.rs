//! Helpers for tests that drive the real `conveyor` binary as child processes.

use platform::testing::Scratch;
use platform::Backend;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_conveyor");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::start_on(data, None)
    }

    /// `conveyor serve` with its data in `data`, on the server database `db` if given.
    pub fn start_on(data: &Path, db: Option<&str>) -> Server {
        Server::start_with(data, db, &[])
    }

    /// `start_on` with `extra` flags. A port picked free can be taken before the server
    /// binds it (by another test's server picking the same one): the server then exits, and
    /// it starts again on another port.
    pub fn start_with(data: &Path, db: Option<&str>, extra: &[&str]) -> Server {
        for _ in 0..3 {
            let port = free_port();
            let mut command = Command::new(BINARY);
            command
                .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
                .arg(data)
                .env("RUST_LOG", "warn")
                .stderr(Stdio::inherit());
            if let Some(db) = db {
                command.args(["--db", db]);
            }
            command.args(extra);
            if let Some(server) = Server::try_spawn(command, port) {
                return server;
            }
        }
        panic!("conveyor exited three times before it was ready");
    }

    /// Runs `command`, which starts `conveyor serve` on `port`, and waits until it is ready.
    pub fn spawn(command: Command, port: u16) -> Server {
        Server::try_spawn(command, port).expect("conveyor exited before it was ready")
    }

    /// `spawn`, or None if the process exits before it is ready.
    fn try_spawn(mut command: Command, port: u16) -> Option<Server> {
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .expect("start conveyor");
        let base = format!("http://127.0.0.1:{port}");
        let mut server = Server { child, base };
        server.until_ready(port).then_some(server)
    }

    /// Waits until this process answers ready on `port`: false if it exits first. Another
    /// test's server on the same port may answer sooner, so the port's listening socket must
    /// be this process's own.
    fn until_ready(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().expect("poll conveyor").is_some() {
                return false;
            }
            if let Ok(200) = reqwest::blocking_get(&format!("{}/health/ready", self.base)) {
                if listens_on(self.child.id(), port) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("conveyor did not become ready");
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`: the socket's inode
/// in the kernel's table of TCP sockets is one of the process's open files.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    const LISTEN: &str = "0A";
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() > 9 && fields[1] == local && fields[3] == LISTEN)
        .map(|fields| format!("socket:[{}]", fields[9]))
        .collect();
    let Ok(files) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    files.flatten().any(|file| {
        std::fs::read_link(file.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
    })
}

/// A tiny blocking HTTP client over the async one, for tests that drive processes.
pub mod reqwest {
    pub fn blocking_get(url: &str) -> Result<u16, ::reqwest::Error> {
        runtime().block_on(async { Ok(::reqwest::get(url).await?.status().as_u16()) })
    }

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }
}

/// A fresh database of `backend`, and the `--db` to give for it (none for SQLite, which
/// lives in the data directory).
pub fn database(backend: Backend) -> (Scratch, Option<String>) {
    let scratch = reqwest::runtime().block_on(Scratch::new(backend));
    let db = (backend != Backend::Sqlite).then(|| scratch.url().to_owned());
    (scratch, db)
}

/// The database a test's servers used: the scratch database, or the data directory's file.
pub async fn scratch_database(scratch: &Scratch, data: &Path) -> platform::Database {
    match scratch.backend() {
        Backend::Sqlite => platform::Database::open(&data.join("conveyor.db"))
            .await
            .unwrap(),
        _ => scratch.open().await,
    }
}
