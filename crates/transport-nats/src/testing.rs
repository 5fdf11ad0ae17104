//! A NATS server of a test's own, which it may stop and start (Debian's `nats-server` with
//! JetStream, its store in a directory of its own, so a restart keeps what it had).

use platform::testing::{free_port, wait_for_port};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `nats-server -js` on a port of its own.
pub struct OwnNats {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl OwnNats {
    pub fn start() -> OwnNats {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let child = Self::spawn(&dir, port);
        OwnNats { dir, port, child }
    }

    fn spawn(dir: &tempfile::TempDir, port: u16) -> Child {
        let child = Command::new("nats-server")
            .args([
                "--addr",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--jetstream",
            ])
            .arg("--store_dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (install it with scripts/services.sh nats)");
        wait_for_port(port, true, "nats-server", Duration::from_secs(10));
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server as an operator would (it closes its store), and starts it again on
    /// the same port and store.
    pub fn restart(&mut self) {
        let stopped = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(stopped.success());
        self.child.wait().expect("nats-server exits");
        self.child = Self::spawn(&self.dir, self.port);
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
