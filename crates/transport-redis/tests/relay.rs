//! Two relays on one outbox (two processes of one service): they share the log's
//! partitions, so every row is published once, in order per key.

#![allow(clippy::unwrap_used)]

use platform::conformance::{Ping, MIGRATIONS};
use platform::testing::Scratch;
use platform::{Backend, BrokerBus, Message};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_redis::testing::OwnRedis;
use transport_redis::RedisBroker;

const KEYS: u32 = 20;

/// A stream entry as `XRANGE` gives it: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);
const PER_KEY: u32 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_every_row_once_in_order_per_key() {
    let redis = OwnRedis::start();
    let place = Scratch::new(Backend::Postgres).await;
    let db = place.open().await;
    db.migrate(MIGRATIONS).await.unwrap();
    let broker = Arc::new(RedisBroker::connect(&redis.url()).await.unwrap());
    // Two processes' buses on one database, each with its own connection to the broker.
    let first = BrokerBus::new(db.clone(), broker.clone());
    let second = BrokerBus::new(
        db.clone(),
        Arc::new(RedisBroker::connect(&redis.url()).await.unwrap()),
    );
    let _relays = (first.relay().await.unwrap(), second.relay().await.unwrap());
    // Each takes its share of the partitions (within a lease), then the rows come.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owners: i64 = db
            .read(|conn| {
                Ok::<_, platform::StoreError>(conn.scalar(
                    "SELECT COUNT(DISTINCT owner) FROM conveyor_partitions WHERE group_name = ?",
                    [platform::broker::RELAY_GROUP],
                )?)
            })
            .await
            .unwrap();
        if owners == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relays did not share the log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for seq in 0..PER_KEY {
        db.write(move |uow| {
            for key in 0..KEYS {
                uow.emit(&Ping {
                    key: format!("key-{key}"),
                    seq,
                })?;
            }
            Ok::<_, platform::StoreError>(())
        })
        .await
        .unwrap();
    }

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let streams: Vec<String> = (0..4)
        .map(|partition| broker.stream(Ping::TOPIC, partition))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let published = loop {
        let mut published: Vec<Ping> = Vec::new();
        for stream in &streams {
            let entries: Vec<Entry> = redis::cmd("XRANGE")
                .arg(stream)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            for (_, fields) in entries {
                let envelope = platform::broker::decode(&fields[0].1).unwrap();
                published.push(serde_json::from_slice(&envelope.payload).unwrap());
            }
        }
        if published.len() >= (KEYS * PER_KEY) as usize || Instant::now() > deadline {
            break published;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A double publication would show as a second copy, at once or a moment later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(published.len(), (KEYS * PER_KEY) as usize);
    let mut next: HashMap<String, u32> = HashMap::new();
    for ping in published {
        let expected = next.entry(ping.key.clone()).or_insert(0);
        assert_eq!(ping.seq, *expected, "{} out of order", ping.key);
        *expected += 1;
    }
}
