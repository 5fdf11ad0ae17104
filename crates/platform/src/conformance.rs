//! The transport conformance suite: the delivery contract of `Bus`, as tests every transport
//! runs unchanged. A transport's test crate implements `Fixture` and invokes
//! `conformance_suite!` with an expression that builds one fresh, isolated fixture.

use crate::bus::Bus;
use crate::db::{Database, Migration, UnitOfWork};
use crate::dead_letter;
use crate::envelope::Message;
use crate::handler::{ConsumerOptions, HandlerError, Incoming, Subscription};
use crate::retry::RetryPolicy;
use crate::sql::Backend;
use crate::sql_log::SqlLog;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fresh database and bus, shared by no other test.
pub trait Fixture: Send + Sync {
    fn db(&self) -> &Database;
    fn bus(&self) -> &dyn Bus;
    /// Forgets `group`'s acknowledgements, so every message is delivered to it again.
    fn rewind<'a>(&'a self, group: &'a str) -> BoxFuture<'a, ()>;
}

/// Generates one `#[tokio::test]` per contract clause for the fixture `$fixture` builds.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@tests $fixture;
            order_per_key, every_group_gets_every_message, consumers_of_a_group_split_the_work,
            failing_handler_is_retried_with_growing_delays,
            always_failing_handler_is_dead_lettered_and_the_group_continues,
            replay_delivers_a_dead_letter_again, unacknowledged_message_is_delivered_after_restart,
            inbox_turns_redelivery_into_a_no_op, a_dead_letter_is_not_handled_again_on_redelivery,
            stop_returns_while_a_backlog_remains, the_backlog_counts_what_a_group_has_not_handled);
    };
    (@tests $fixture:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $fixture.await;
                $crate::conformance::$name(&fixture).await;
            }
        )*
    };
}

/// The test message: `seq` counts up per key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub key: String,
    pub seq: u32,
}

impl Message for Ping {
    const NAME: &'static str = "conformance.Ping";
    const TOPIC: &'static str = "conformance.pings";

    fn key(&self) -> String {
        self.key.clone()
    }
}

/// Where handlers record what they handled, in their unit of work.
pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "conformance",
    version: 1,
    sqlite: "CREATE TABLE conformance_handled (
            row_id     INTEGER PRIMARY KEY AUTOINCREMENT,
            group_name TEXT NOT NULL,
            consumer   TEXT NOT NULL,
            message_id TEXT NOT NULL,
            \"key\"      TEXT NOT NULL,
            seq        INTEGER NOT NULL
          )",
    postgres: "CREATE TABLE conformance_handled (
            row_id     BIGSERIAL PRIMARY KEY,
            group_name TEXT NOT NULL,
            consumer   TEXT NOT NULL,
            message_id TEXT NOT NULL,
            \"key\"      TEXT NOT NULL,
            seq        BIGINT NOT NULL
          )",
    mysql: "CREATE TABLE IF NOT EXISTS conformance_handled (
            row_id     BIGINT AUTO_INCREMENT PRIMARY KEY,
            group_name VARCHAR(255) NOT NULL,
            consumer   VARCHAR(255) NOT NULL,
            message_id VARCHAR(64) NOT NULL,
            \"key\"      VARCHAR(255) NOT NULL,
            seq        BIGINT NOT NULL
          ) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
}];

/// The sql-log transport on a fresh database of its own.
pub struct SqlLogFixture {
    db: Database,
    bus: SqlLog,
    _place: crate::testing::Scratch,
}

impl SqlLogFixture {
    /// On a fresh SQLite file.
    pub async fn start() -> SqlLogFixture {
        SqlLogFixture::on(Backend::Sqlite).await
    }

    /// On a fresh database of `backend` (a server's: see `testing::Scratch`).
    pub async fn on(backend: Backend) -> SqlLogFixture {
        let place = crate::testing::Scratch::new(backend).await;
        let db = place.open().await;
        db.migrate(MIGRATIONS).await.expect("migrate");
        SqlLogFixture {
            bus: SqlLog::new(db.clone()),
            db,
            _place: place,
        }
    }
}

impl Fixture for SqlLogFixture {
    fn db(&self) -> &Database {
        &self.db
    }

    fn bus(&self) -> &dyn Bus {
        &self.bus
    }

    fn rewind<'a>(&'a self, group: &'a str) -> BoxFuture<'a, ()> {
        let group = group.to_owned();
        async move {
            self.db
                .write(move |uow| {
                    uow.conn().execute(
                        "UPDATE conveyor_partitions SET position = 0 WHERE group_name = ?",
                        [&group],
                    )?;
                    Ok::<_, crate::StoreError>(())
                })
                .await
                .expect("rewind");
        }
        .boxed()
    }
}

/// How a broker fixture makes a group (the second argument) read the fixture's topic from
/// its start again; the first is the fixture's database.
pub type Rewind = Box<dyn Fn(Database, String) -> BoxFuture<'static, ()> + Send + Sync>;

/// A broker transport on a fresh database of its own: the database's log relayed to the
/// broker, and consumers reading the broker.
pub struct BrokerFixture {
    db: Database,
    bus: crate::BrokerBus,
    _relay: crate::Consumer,
    rewind: Rewind,
    /// Runs when the fixture is dropped, with the groups that joined: the transport's own
    /// cleanup (its streams or queues, say).
    cleanup: Option<Cleanup>,
    _place: crate::testing::Scratch,
}

/// What a broker fixture runs when dropped, given the groups that joined.
pub type Cleanup = Box<dyn FnOnce(Vec<String>) + Send + Sync>;

impl BrokerFixture {
    /// `broker` on a fresh database of `backend`; `rewind` does what `Fixture::rewind`
    /// asks on the broker, and `cleanup` runs once the fixture is dropped.
    pub async fn on(
        backend: Backend,
        broker: Arc<dyn crate::Broker>,
        rewind: Rewind,
        cleanup: Cleanup,
    ) -> BrokerFixture {
        let place = crate::testing::Scratch::new(backend).await;
        let db = place.open().await;
        db.migrate(MIGRATIONS).await.expect("migrate");
        let bus = crate::BrokerBus::new(db.clone(), broker);
        let relay = bus.relay().await.expect("start the relay");
        BrokerFixture {
            db,
            bus,
            _relay: relay,
            rewind,
            cleanup: Some(cleanup),
            _place: place,
        }
    }
}

impl Fixture for BrokerFixture {
    fn db(&self) -> &Database {
        &self.db
    }

    fn bus(&self) -> &dyn Bus {
        &self.bus
    }

    fn rewind<'a>(&'a self, group: &'a str) -> BoxFuture<'a, ()> {
        (self.rewind)(self.db.clone(), group.to_owned())
    }
}

impl Drop for BrokerFixture {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        let db = self.db.clone();
        let groups = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(db.read(|conn| {
                Ok::<_, crate::StoreError>(conn.query_map(
                    "SELECT group_name FROM conveyor_groups",
                    (),
                    |row| row.get::<String>(0),
                )?)
            }))
        })
        .unwrap_or_default();
        cleanup(groups);
    }
}

/// Publishes every message of `topic` in `db`'s log to `broker` again, in order: how a
/// fixture rewinds a group on a broker whose queues keep nothing once acknowledged
/// (RabbitMQ). Every group reading the topic gets them again.
pub async fn republish(db: &Database, broker: &dyn crate::Broker, topic: &str) {
    let topic = topic.to_owned();
    let rows = db
        .read(move |conn| {
            Ok::<_, crate::StoreError>(conn.query_map(
                &format!(
                    "SELECT position, {} FROM conveyor_log WHERE topic = ? ORDER BY position",
                    crate::log::ENVELOPE_COLUMNS
                ),
                [&topic],
                |row| Ok((row.get::<i64>(0)?, crate::log::envelope_from_row(row, 1)?)),
            )?)
        })
        .await
        .expect("read the log");
    let publications: Vec<_> = rows
        .iter()
        .map(|(position, envelope)| {
            crate::broker::publication(envelope, *position, broker.partitions())
                .expect("a publication")
        })
        .collect();
    broker.publish(&publications).await.expect("republish");
}

/// Starts a consumer of `subscription` on the fixture's bus.
async fn start(fixture: &impl Fixture, subscription: Subscription) -> crate::Consumer {
    fixture
        .bus()
        .subscribe(subscription)
        .await
        .expect("subscribe")
}

fn fast_options() -> ConsumerOptions {
    ConsumerOptions {
        partitions: 4,
        lease: Duration::from_millis(600),
        batch: 16,
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        },
        handler_timeout: Duration::from_millis(300),
        ..ConsumerOptions::default()
    }
}

async fn publish(db: &Database, pings: Vec<Ping>) {
    db.write(move |uow| {
        for ping in &pings {
            uow.emit(ping)?;
        }
        Ok::<_, crate::StoreError>(())
    })
    .await
    .expect("publish");
}

fn pings(keys: usize, per_key: u32) -> Vec<Ping> {
    (0..per_key)
        .flat_map(|seq| {
            (0..keys).map(move |k| Ping {
                key: format!("key-{k}"),
                seq,
            })
        })
        .collect()
}

fn record(
    uow: &UnitOfWork,
    group: &str,
    consumer: &str,
    incoming: &Incoming<Ping>,
) -> Result<(), HandlerError> {
    uow.conn().execute(
        "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
             VALUES (?, ?, ?, ?, ?)",
        (
            group,
            consumer,
            incoming.envelope.id.to_string(),
            &incoming.message.key,
            incoming.message.seq,
        ),
    )?;
    Ok(())
}

/// A subscription whose handler records every message as handled by `consumer`.
fn recording(group: &'static str, consumer: &'static str) -> Subscription {
    Subscription::new(group).with_options(fast_options()).on(
        move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            record(uow, group, consumer, &incoming)
        },
    )
}

#[derive(Debug)]
struct Handled {
    consumer: String,
    message_id: String,
    key: String,
    seq: i64,
}

async fn handled(db: &Database, group: &str) -> Vec<Handled> {
    let group = group.to_owned();
    db.read(move |conn| {
        let rows = conn.query_map(
            "SELECT consumer, message_id, \"key\", seq FROM conformance_handled \
             WHERE group_name = ? ORDER BY row_id",
            [&group],
            |row| {
                Ok(Handled {
                    consumer: row.get(0)?,
                    message_id: row.get(1)?,
                    key: row.get(2)?,
                    seq: row.get(3)?,
                })
            },
        )?;
        Ok::<_, crate::StoreError>(rows)
    })
    .await
    .expect("read handled")
}

/// Waits (up to 20 s) until `group` has handled `count` messages.
async fn wait_for_handled(db: &Database, group: &str, count: usize) -> Vec<Handled> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = handled(db, group).await;
        if rows.len() >= count || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn order_per_key(fixture: &impl Fixture) {
    let _consumer = start(fixture, recording("ordered", "only")).await;
    for chunk in pings(8, 25).chunks(10) {
        publish(fixture.db(), chunk.to_vec()).await;
    }
    let rows = wait_for_handled(fixture.db(), "ordered", 200).await;
    assert_eq!(rows.len(), 200);
    let mut next: HashMap<&str, i64> = HashMap::new();
    for row in &rows {
        let expected = next.entry(&row.key).or_insert(0);
        assert_eq!(row.seq, *expected, "key {} out of order", row.key);
        *expected += 1;
    }
}

pub async fn every_group_gets_every_message(fixture: &impl Fixture) {
    let _a = start(fixture, recording("group-a", "a")).await;
    let _b = start(fixture, recording("group-b", "b")).await;
    publish(fixture.db(), pings(5, 10)).await;
    for group in ["group-a", "group-b"] {
        let rows = wait_for_handled(fixture.db(), group, 50).await;
        assert_eq!(rows.len(), 50, "{group} got {} of 50", rows.len());
    }
}

pub async fn consumers_of_a_group_split_the_work(fixture: &impl Fixture) {
    let _one = start(fixture, recording("shared", "one")).await;
    let _two = start(fixture, recording("shared", "two")).await;
    // Give the second consumer time to take its share before the work arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(fixture.db(), pings(40, 5)).await;
    let rows = wait_for_handled(fixture.db(), "shared", 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows_after = handled(fixture.db(), "shared").await;
    assert_eq!(rows.len(), 200);
    assert_eq!(rows_after.len(), 200, "a message was handled twice");
    let mut ids: Vec<_> = rows.iter().map(|row| row.message_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    for consumer in ["one", "two"] {
        let share = rows.iter().filter(|row| row.consumer == consumer).count();
        assert!(share > 0, "consumer {consumer} got no work");
    }
}

pub async fn failing_handler_is_retried_with_growing_delays(fixture: &impl Fixture) {
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = attempts.clone();
    let subscription = Subscription::new("flaky").with_options(fast_options()).on(
        move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            let attempt = {
                let mut seen = seen.lock().expect("lock");
                seen.push(Instant::now());
                seen.len()
            };
            if attempt <= 2 {
                return Err(HandlerError::transient(format!("failure {attempt}")));
            }
            record(uow, "flaky", "only", &incoming)
        },
    );
    let _consumer = start(fixture, subscription).await;
    publish(fixture.db(), pings(1, 1)).await;
    let rows = wait_for_handled(fixture.db(), "flaky", 1).await;
    assert_eq!(rows.len(), 1);
    let times = attempts.lock().expect("lock").clone();
    assert_eq!(times.len(), 3);
    let (first_gap, second_gap) = (times[1] - times[0], times[2] - times[1]);
    assert!(first_gap >= Duration::from_millis(75), "{first_gap:?}");
    assert!(second_gap > first_gap, "{first_gap:?} then {second_gap:?}");
    assert!(dead_letter::list(fixture.db(), Some("flaky"), 10)
        .await
        .expect("list")
        .is_empty());
}

/// A subscription failing every `Ping` with seq 0 while `failing` is set.
fn poisoned(failing: Arc<AtomicBool>, calls: Arc<AtomicU32>) -> Subscription {
    Subscription::new("poisoned")
        .with_options(fast_options())
        .on(move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            if incoming.message.seq == 0 {
                calls.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("poison"));
                }
            }
            record(uow, "poisoned", "only", &incoming)
        })
}

pub async fn always_failing_handler_is_dead_lettered_and_the_group_continues(
    fixture: &impl Fixture,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let _consumer = fixture
        .bus()
        .subscribe(poisoned(Arc::new(AtomicBool::new(true)), calls.clone()))
        .await
        .expect("subscribe");
    // seq 0 fails; seq 1 and 2 share its key, so they can only be handled if the group moves on.
    publish(fixture.db(), pings(1, 3)).await;
    let rows = wait_for_handled(fixture.db(), "poisoned", 2).await;
    assert_eq!(
        rows.iter().map(|row| row.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "attempts before dead-lettering"
    );
    let letters = dead_letter::list(fixture.db(), Some("poisoned"), 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    assert!(letters[0].error.contains("poison"), "{}", letters[0].error);
    let envelope = letters[0]
        .envelope
        .as_ref()
        .expect("a decodable dead letter");
    let ping: Ping = serde_json::from_slice(&envelope.payload).expect("payload");
    assert_eq!(ping.seq, 0);
}

pub async fn replay_delivers_a_dead_letter_again(fixture: &impl Fixture) {
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let _consumer = start(fixture, poisoned(failing.clone(), calls)).await;
    let _bystander = start(fixture, recording("bystander", "b")).await;
    publish(fixture.db(), pings(1, 2)).await;
    wait_for_handled(fixture.db(), "poisoned", 1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let letters = dead_letter::list(fixture.db(), Some("poisoned"), 10)
            .await
            .expect("list");
        if !letters.is_empty() || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(letters.len(), 1);

    failing.store(false, Ordering::SeqCst);
    assert!(dead_letter::replay(fixture.db(), letters[0].id)
        .await
        .expect("replay"));
    let rows = wait_for_handled(fixture.db(), "poisoned", 2).await;
    assert_eq!(
        rows.iter().map(|row| row.seq).collect::<Vec<_>>(),
        vec![1, 0]
    );
    assert!(dead_letter::list(fixture.db(), None, 10)
        .await
        .expect("list")
        .is_empty());
    assert!(!dead_letter::replay(fixture.db(), letters[0].id)
        .await
        .expect("replay"));
    // The replay went to the failed group only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handled(fixture.db(), "bystander").await.len(), 2);
}

pub async fn unacknowledged_message_is_delivered_after_restart(fixture: &impl Fixture) {
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = started.clone();
    // The first consumer fails the message and is dropped (a crash) while waiting to retry.
    let stuck = Subscription::new("restarted")
        .with_options(ConsumerOptions {
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_secs(60),
                max_delay: Duration::from_secs(60),
            },
            ..fast_options()
        })
        .on(move |_incoming: Incoming<Ping>, _uow: &mut UnitOfWork| {
            signal.notify_one();
            Err(HandlerError::transient("crashing"))
        });
    let consumer = start(fixture, stuck).await;
    publish(fixture.db(), pings(1, 1)).await;
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the message reached the first consumer");
    drop(consumer);

    let _restarted = start(fixture, recording("restarted", "second")).await;
    let rows = wait_for_handled(fixture.db(), "restarted", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].consumer, "second");
}

pub async fn inbox_turns_redelivery_into_a_no_op(fixture: &impl Fixture) {
    let consumer = start(fixture, recording("deduped", "first")).await;
    publish(fixture.db(), pings(3, 2)).await;
    assert_eq!(wait_for_handled(fixture.db(), "deduped", 6).await.len(), 6);
    consumer.stop().await;

    fixture.rewind("deduped").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let watcher = Subscription::new("deduped")
        .with_options(fast_options())
        .on(move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            counted.fetch_add(1, Ordering::SeqCst);
            record(uow, "deduped", "second", &incoming)
        });
    let _second = start(fixture, watcher).await;
    // A fresh message behind the redelivered ones shows when they have all gone through.
    publish(
        fixture.db(),
        vec![Ping {
            key: "key-0".into(),
            seq: 2,
        }],
    )
    .await;
    let rows = wait_for_handled(fixture.db(), "deduped", 7).await;
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[6].consumer, "second");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "redelivered messages reached the handler"
    );
}

pub async fn a_dead_letter_is_not_handled_again_on_redelivery(fixture: &impl Fixture) {
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = fixture
        .bus()
        .subscribe(poisoned(Arc::new(AtomicBool::new(true)), calls.clone()))
        .await
        .expect("subscribe");
    publish(fixture.db(), pings(1, 2)).await;
    wait_for_handled(fixture.db(), "poisoned", 1).await;
    consumer.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        dead_letter::list(fixture.db(), None, 10)
            .await
            .expect("list")
            .len(),
        1
    );

    fixture.rewind("poisoned").await;
    let _again = fixture
        .bus()
        .subscribe(poisoned(Arc::new(AtomicBool::new(true)), calls.clone()))
        .await
        .expect("subscribe");
    publish(
        fixture.db(),
        vec![Ping {
            key: "key-0".into(),
            seq: 2,
        }],
    )
    .await;
    let rows = wait_for_handled(fixture.db(), "poisoned", 2).await;
    assert_eq!(
        rows.iter().map(|row| row.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the dead letter ran again");
    assert_eq!(
        dead_letter::list(fixture.db(), None, 10)
            .await
            .expect("list")
            .len(),
        1
    );
}

pub async fn stop_returns_while_a_backlog_remains(fixture: &impl Fixture) {
    let slow = Subscription::new("backlogged")
        .with_options(fast_options())
        .on(|incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            std::thread::sleep(Duration::from_millis(2));
            record(uow, "backlogged", "only", &incoming)
        });
    let consumer = start(fixture, slow).await;
    // About ten seconds of work.
    publish(fixture.db(), pings(50, 100)).await;
    wait_for_handled(fixture.db(), "backlogged", 1).await;
    tokio::time::timeout(Duration::from_secs(5), consumer.stop())
        .await
        .expect("stop waited for the backlog");
    let handled = handled(fixture.db(), "backlogged").await.len();
    assert!(
        handled < 5000,
        "the whole backlog was worked off before stopping"
    );
}

/// `Bus::backlog` counts what was committed for a group and not handled by it yet, wherever
/// it waits (the log, the outbox, the broker), and nothing once the group caught up.
pub async fn the_backlog_counts_what_a_group_has_not_handled(fixture: &impl Fixture) {
    // The group joins (a broker that keeps messages only for joined groups starts keeping
    // them), then stops: what follows waits for it.
    start(fixture, recording("counted", "only"))
        .await
        .stop()
        .await;
    publish(fixture.db(), pings(8, 5)).await;
    wait_for_backlog(fixture, "counted", 40).await;
    let consumer = start(fixture, recording("counted", "only")).await;
    assert_eq!(
        wait_for_handled(fixture.db(), "counted", 40).await.len(),
        40
    );
    wait_for_backlog(fixture, "counted", 0).await;
    consumer.stop().await;
}

/// Waits (up to 20 s) until `group`'s backlog is `expected`; fails with the last count.
async fn wait_for_backlog(fixture: &impl Fixture, group: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let backlog = fixture
            .bus()
            .backlog(group, Ping::TOPIC)
            .await
            .expect("backlog");
        if backlog == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group}'s backlog is {backlog}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages, and keys among them, of `a_broker_restart_mid_stream_loses_nothing`.
const MESSAGES: u32 = 1000;
const KEYS: u32 = 10;

fn recording_restarted() -> Subscription {
    Subscription::new("restarted")
        .with_options(ConsumerOptions {
            lease: Duration::from_secs(2),
            handler_timeout: Duration::from_millis(500),
            ..ConsumerOptions::default()
        })
        .on(|incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            uow.conn().execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                 VALUES ('restarted', 'only', ?, ?, ?)",
                (
                    incoming.envelope.id.to_string(),
                    &incoming.message.key,
                    incoming.message.seq,
                ),
            )?;
            Ok::<_, HandlerError>(())
        })
}

/// Every message `recording_restarted` handled: its id, key and seq, in the order handled.
async fn handled_in_order(db: &Database) -> Vec<(String, String, i64)> {
    db.read(|conn| {
        Ok::<_, crate::StoreError>(conn.query_map(
            "SELECT message_id, \"key\", seq FROM conformance_handled ORDER BY row_id",
            (),
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?)
    })
    .await
    .expect("read what was handled")
}

/// A restart of the broker in the middle of a stream of 1 000 messages: publishing and
/// consuming resume by themselves, nothing is lost, nothing is handled twice, and order per
/// key holds. `restart` stops the broker and starts it again on its data; it blocks.
pub async fn a_broker_restart_mid_stream_loses_nothing(
    broker: Arc<dyn crate::Broker>,
    restart: impl FnOnce(),
) {
    let place = crate::testing::Scratch::new(Backend::Sqlite).await;
    let db = place.open().await;
    db.migrate(MIGRATIONS).await.expect("migrate");
    let bus = crate::BrokerBus::new(db.clone(), broker);
    let _relay = bus.relay().await.expect("start the relay");
    let _consumer = bus
        .subscribe(recording_restarted())
        .await
        .expect("subscribe");

    let publishing = {
        let db = db.clone();
        tokio::spawn(async move {
            for unit in 0..MESSAGES / KEYS {
                db.write(move |uow| {
                    for key in 0..KEYS {
                        uow.emit(&Ping {
                            key: format!("key-{key}"),
                            seq: unit,
                        })?;
                    }
                    Ok::<_, crate::StoreError>(())
                })
                .await
                .expect("publish");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Mid-stream: once some, not all, have gone through.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled_in_order(&db).await.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "nothing went through before the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(restart);
    publishing.await.expect("the publishing task");

    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = handled_in_order(&db).await;
        if rows.len() >= MESSAGES as usize || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A moment more, for a second handling to show if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows_after = handled_in_order(&db).await;
    assert_eq!(rows.len(), MESSAGES as usize, "messages lost");
    assert_eq!(
        rows_after.len(),
        MESSAGES as usize,
        "a message was handled twice"
    );
    let distinct: HashSet<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(distinct.len(), MESSAGES as usize);
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (_, key, seq) in &rows {
        let expected = next.entry(key).or_insert(0);
        assert_eq!(*seq, *expected, "{key} out of order");
        *expected += 1;
    }
}
