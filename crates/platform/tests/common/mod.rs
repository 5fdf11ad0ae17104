//! Helpers of the platform's integration tests: a fresh database, SQL shortcuts, messages
//! and consumer options that fail fast.

#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use platform::conformance::{Ping, MIGRATIONS};
use platform::sql::FromValue;
use platform::{
    ConsumerOptions, Database, HandlerError, Incoming, RetryPolicy, StoreError, Subscription,
    UnitOfWork,
};
use std::time::{Duration, Instant};

/// Generates, for each `async fn name(scratch: Scratch)` named, one `#[tokio::test]` per
/// backend, in modules `sqlite`, `postgres` and `mariadb`, each on a fresh database.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::on_every_backend!(@backend sqlite, platform::Backend::Sqlite; $($name),*);
        $crate::on_every_backend!(@backend postgres, platform::Backend::Postgres; $($name),*);
        $crate::on_every_backend!(@backend mariadb, platform::Backend::Mysql; $($name),*);
    };
    (@backend $module:ident, $backend:expr; $($name:ident),*) => {
        mod $module {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(platform::testing::Scratch::new($backend).await).await;
            }
        )*}
    };
}

pub async fn open_at(dir: &tempfile::TempDir) -> Database {
    let db = Database::open(&dir.path().join("faults.db"))
        .await
        .expect("open");
    db.migrate(MIGRATIONS).await.expect("migrate");
    db
}

pub async fn open() -> (Database, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    (open_at(&dir).await, dir)
}

pub async fn scalar<T: FromValue + Send + 'static>(db: &Database, sql: &'static str) -> T {
    db.read(move |conn| Ok::<_, StoreError>(conn.scalar(sql, ())?))
        .await
        .expect(sql)
}

pub async fn execute(db: &Database, sql: &'static str) {
    db.write(move |uow| Ok::<_, StoreError>(uow.conn().execute_batch(sql)?))
        .await
        .expect(sql);
}

pub async fn publish(db: &Database, count: u32) {
    db.write(move |uow| {
        for seq in 0..count {
            uow.emit(&Ping {
                key: format!("key-{}", seq % 5),
                seq,
            })?;
        }
        Ok::<_, StoreError>(())
    })
    .await
    .expect("publish");
}

/// Few attempts, short delays: a store failure counted as an attempt dead-letters quickly.
pub fn impatient() -> ConsumerOptions {
    ConsumerOptions {
        lease: Duration::from_millis(600),
        handler_timeout: Duration::from_millis(300),
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
        },
        ..ConsumerOptions::default()
    }
}

/// A group whose handler records each ping, returning store errors as they come (`?`).
pub fn recording(group: &'static str) -> Subscription {
    Subscription::new(group).with_options(impatient()).on(
        move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| -> Result<(), HandlerError> {
            uow.conn().execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                 VALUES (?, 'c', ?, ?, ?)",
                (
                    group,
                    incoming.envelope.id.to_string(),
                    &incoming.message.key,
                    incoming.message.seq,
                ),
            )?;
            Ok(())
        },
    )
}

pub async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn handled(db: &Database) -> i64 {
    scalar(db, "SELECT COUNT(*) FROM conformance_handled").await
}

pub fn handling_pings(group: &'static str, partitions: u16) -> Subscription {
    Subscription::new(group)
        .with_options(ConsumerOptions {
            partitions,
            ..impatient()
        })
        .on(|_: Incoming<Ping>, _: &mut UnitOfWork| Ok(()))
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Pong {
    pub key: String,
}

impl platform::Message for Pong {
    const NAME: &'static str = "conformance.Pong";
    const TOPIC: &'static str = "conformance.pings";

    fn key(&self) -> String {
        self.key.clone()
    }
}
