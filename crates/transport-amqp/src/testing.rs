//! A RabbitMQ node of a test's own, which it may stop and start (Debian's
//! `rabbitmq-server`, its database and logs in a directory of its own, so a restart keeps
//! its durable queues and persistent messages).

use platform::testing::{free_port, wait_for_port};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The node's start script, which runs as whoever starts it (`/usr/sbin`'s switches to the
/// `rabbitmq` user, which cannot write the test's directory).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A `rabbitmq-server` node on a port of its own.
pub struct OwnRabbit {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl OwnRabbit {
    pub fn start() -> OwnRabbit {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Below 45536: the node's distribution port is this one plus 20000.
        let port = loop {
            let port = free_port();
            if port < 45536 {
                break port;
            }
        };
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n"),
        )
        .expect("write the node's configuration");
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("write its plugins");
        let child = Self::spawn(dir.path(), port);
        OwnRabbit { dir, port, child }
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let child = Command::new(SERVER)
            .current_dir(dir)
            .env(
                "RABBITMQ_NODENAME",
                format!("conveyor-test-{port}@localhost"),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", (u32::from(port) + 20000).to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that a stop reaches the Erlang node under the script.
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server (install it with scripts/services.sh rabbitmq)");
        wait_for_port(port, true, "rabbitmq-server", Duration::from_secs(60));
        child
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node as an operator would (it closes its queues), and starts it again on
    /// the same port and files.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.dir.path(), self.port);
    }

    fn stop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        wait_for_port(self.port, false, "rabbitmq-server", Duration::from_secs(30));
        let _ = self.child.wait();
        // The Erlang node outlives the script by a moment; its port closing is the sign.
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.stop();
    }
}
