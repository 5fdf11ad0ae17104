//! A Redis server of a test's own, which it may stop and start (Debian's `redis-server`,
//! appending every write to its file and syncing it, so a restart keeps what it had).

use platform::testing::{free_port, wait_for_port};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` on a port of its own, its data in a directory of its own.
pub struct OwnRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let child = Self::spawn(&dir, port);
        OwnRedis { dir, port, child }
    }

    fn spawn(dir: &tempfile::TempDir, port: u16) -> Child {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (install it with scripts/services.sh redis)");
        wait_for_port(port, true, "redis-server", Duration::from_secs(10));
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server and starts it again on the same files.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    /// Starts the stopped server again on its port and files.
    pub fn resume(&mut self) {
        self.child = Self::spawn(&self.dir, self.port);
    }

    /// Stops the server as an operator would: it writes what it has, then exits.
    pub fn stop(&mut self) {
        let stopped = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(stopped.success());
        self.child.wait().expect("redis-server exits");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
