//! A Redis restart in the middle of a stream of messages: publishing and consuming resume
//! by themselves, nothing is lost and nothing is handled twice. The test runs a Redis of
//! its own (Debian's `redis-server`, appending every write to its file and syncing it), so
//! that it can stop and start it.

#![allow(clippy::unwrap_used)]

use platform::conformance::{Ping, MIGRATIONS};
use platform::testing::Scratch;
use platform::{
    Backend, BrokerBus, Bus, ConsumerOptions, Database, HandlerError, Incoming, Subscription,
    UnitOfWork,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_redis::testing::OwnRedis;
use transport_redis::RedisBroker;

const MESSAGES: u32 = 1000;
const KEYS: u32 = 10;

fn recording() -> Subscription {
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

/// Every handled message: its id, key and seq, in the order handled.
async fn handled(db: &Database) -> Vec<(String, String, i64)> {
    db.read(|conn| {
        Ok::<_, platform::StoreError>(conn.query_map(
            "SELECT message_id, \"key\", seq FROM conformance_handled ORDER BY row_id",
            (),
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing_and_handles_nothing_twice() {
    let mut redis = OwnRedis::start();
    let place = Scratch::new(Backend::Sqlite).await;
    let db = place.open().await;
    db.migrate(MIGRATIONS).await.unwrap();
    let broker = Arc::new(RedisBroker::connect(&redis.url()).await.unwrap());
    let bus = BrokerBus::new(db.clone(), broker);
    let _relay = bus.relay().await.unwrap();
    let _consumer = bus.subscribe(recording()).await.unwrap();

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
                    Ok::<_, platform::StoreError>(())
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Mid-stream: once some, not all, have gone through.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled(&db).await.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "nothing went through before the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(|| redis.restart());
    publishing.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = handled(&db).await;
        if rows.len() >= MESSAGES as usize || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A moment more, for a second handling to show if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows_after = handled(&db).await;
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
