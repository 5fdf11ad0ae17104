//! Retention on Redis Streams: the log's rule, on each stream. What every group has
//! acknowledged goes once it is older than the retention; what a group has not yet read
//! stays, however old.

use futures::FutureExt;
use platform::conformance::{Ping, MIGRATIONS};
use platform::testing::Scratch;
use platform::{
    Backend, Broker, BrokerBus, Bus, Consumer, Database, HandlerError, Incoming, Message,
    Subscription, UnitOfWork,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_redis::RedisBroker;

fn counting(group: &'static str) -> Subscription {
    Subscription::new(group).on(move |incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
        uow.conn().execute(
            "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
             VALUES (?, 'only', ?, ?, ?)",
            (
                group,
                incoming.envelope.id.to_string(),
                &incoming.message.key,
                incoming.message.seq,
            ),
        )?;
        Ok::<_, HandlerError>(())
    })
}

async fn wait_for_handled(db: &Database, group: &'static str, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let handled: i64 = db
            .read(move |conn| {
                Ok::<_, platform::StoreError>(conn.scalar(
                    "SELECT COUNT(*) FROM conformance_handled WHERE group_name = ?",
                    [group],
                )?)
            })
            .await
            .expect("count");
        if handled >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group} handled {handled} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Entries left in the topic's streams.
async fn stream_lengths(broker: &RedisBroker, server: &str) -> u64 {
    let client = redis::Client::open(server).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut total = 0;
    for partition in 0..broker.partitions() {
        let length: u64 = redis::cmd("XLEN")
            .arg(broker.stream(Ping::TOPIC, partition))
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        total += length;
    }
    total
}

/// A bus on Redis (streams of the test's own) over a fresh SQLite file.
struct Setup {
    server: String,
    broker: Arc<RedisBroker>,
    _place: Scratch,
    db: Database,
    bus: BrokerBus,
}

impl Setup {
    async fn new() -> Setup {
        let server = std::env::var("CONVEYOR_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let namespace = format!("conveyor-test-{}", uuid::Uuid::now_v7());
        let broker = Arc::new(
            RedisBroker::connect(&format!("{server}?namespace={namespace}"))
                .await
                .expect("connect"),
        );
        let place = Scratch::new(Backend::Sqlite).await;
        let db = place.open().await;
        db.migrate(MIGRATIONS).await.expect("migrate");
        let bus = BrokerBus::new(db.clone(), broker.clone());
        Setup {
            server,
            broker,
            _place: place,
            db,
            bus,
        }
    }
}

async fn start(bus: &BrokerBus, group: &'static str) -> Consumer {
    bus.subscribe(counting(group)).await.expect("subscribe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_every_group_acknowledged_goes_once_old_and_nothing_else() {
    let Setup {
        server,
        broker,
        _place,
        db,
        bus,
    } = Setup::new().await;
    let _relay = bus.relay().await.expect("relay");
    // A group that joined and has read nothing yet.
    start(&bus, "laggard").await.stop().await;
    let _reader = start(&bus, "reader").await;

    db.write(|uow| {
        for seq in 0..40 {
            uow.emit(&Ping {
                key: format!("key-{}", seq % 8),
                seq,
            })?;
        }
        Ok::<_, platform::StoreError>(())
    })
    .await
    .expect("publish");
    wait_for_handled(&db, "reader", 40).await;

    let prune = |older_than| {
        broker
            .prune(older_than)
            .map(|pruned| pruned.expect("prune"))
    };
    assert_eq!(
        prune(Duration::ZERO).await,
        0,
        "the laggard's messages went"
    );
    assert_eq!(stream_lengths(&broker, &server).await, 40);

    let _laggard = start(&bus, "laggard").await;
    wait_for_handled(&db, "laggard", 40).await;
    // Acknowledged after the commit: a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        prune(Duration::from_secs(3600)).await,
        0,
        "young messages went"
    );
    assert_eq!(prune(Duration::ZERO).await, 40);
    assert_eq!(stream_lengths(&broker, &server).await, 0);
    broker.delete_namespace().await.expect("clean up");
}

/// Rows of the log that were published, and rows that were not, on a bus whose relay stopped
/// before the second lot: the log's retention takes only the published ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_what_the_relay_has_not_published() {
    let Setup {
        server,
        broker,
        _place,
        db,
        bus,
    } = Setup::new().await;
    let publish = |count: u32| {
        db.write(move |uow| {
            for seq in 0..count {
                uow.emit(&Ping {
                    key: format!("key-{seq}"),
                    seq,
                })?;
            }
            Ok::<_, platform::StoreError>(())
        })
    };
    let relay = bus.relay().await.expect("relay");
    publish(10).await.expect("publish");
    let deadline = Instant::now() + Duration::from_secs(20);
    while stream_lengths(&broker, &server).await < 10 {
        assert!(Instant::now() < deadline, "the relay did not publish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await;
    publish(5).await.expect("publish");
    // Older than the retention (zero) by a clear millisecond.
    tokio::time::sleep(Duration::from_millis(10)).await;

    let retention = platform::retention::Retention {
        log: Duration::ZERO,
        inbox: Duration::from_secs(3600),
    };
    let pruned = platform::retention::prune(&db, retention)
        .await
        .expect("prune");
    assert_eq!(pruned.log_rows, 10);
    let left: i64 = db
        .read(|conn| {
            Ok::<_, platform::StoreError>(conn.scalar("SELECT COUNT(*) FROM conveyor_log", ())?)
        })
        .await
        .expect("count");
    assert_eq!(left, 5, "a row the relay had not published went");
    broker.delete_namespace().await.expect("clean up");
}
