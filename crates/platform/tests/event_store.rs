//! The event store's conformance suite, on SQLite, PostgreSQL and MariaDB: optimistic
//! concurrency under 20 concurrent appends, atomic multi-event appends, the global order
//! of what was appended, and loading from a version.

#![allow(clippy::unwrap_used)]

mod common;

use common::scalar;
use platform::event_store::{self, EventStoreError, Recorded};
use platform::testing::Scratch;
use platform::{Database, Message, StoreError};
use serde::{Deserialize, Serialize};

on_every_backend!(
    of_twenty_concurrent_appends_at_one_version_exactly_one_wins,
    a_multi_event_append_is_all_or_nothing,
    appended_events_are_published_in_the_order_they_were_appended,
    a_stream_loads_from_any_version,
    an_event_store_made_before_revisions_is_upgraded_on_open,
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Happened {
    stream: String,
    n: u32,
}

impl Message for Happened {
    const NAME: &'static str = "tests.Happened";
    const TOPIC: &'static str = "tests.events";

    fn key(&self) -> String {
        self.stream.clone()
    }
}

fn happened(stream: &str, numbers: impl IntoIterator<Item = u32>) -> Vec<Happened> {
    numbers
        .into_iter()
        .map(|n| Happened {
            stream: stream.to_owned(),
            n,
        })
        .collect()
}

async fn append(
    db: &Database,
    stream: &'static str,
    expected: u64,
    events: Vec<Happened>,
) -> Result<u64, EventStoreError> {
    db.write(move |uow| event_store::append(uow, stream, expected, &events))
        .await
}

async fn load(db: &Database, stream: &'static str, after: u64) -> Vec<Recorded<Happened>> {
    db.read(move |conn| event_store::load(conn, stream, after))
        .await
        .unwrap()
}

async fn of_twenty_concurrent_appends_at_one_version_exactly_one_wins(scratch: Scratch) {
    let db = scratch.open().await;
    for version in 0..3u64 {
        let appends: Vec<_> = (0..20)
            .map(|n| {
                let db = db.clone();
                tokio::spawn(
                    async move { append(&db, "game", version, happened("game", [n])).await },
                )
            })
            .collect();
        let mut won = 0;
        for handle in appends {
            match handle.await.unwrap() {
                Ok(new_version) => {
                    assert_eq!(new_version, version + 1);
                    won += 1;
                }
                Err(EventStoreError::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, version);
                    assert_eq!(actual, version + 1);
                }
                Err(other) => panic!("neither won nor lost the race: {other}"),
            }
        }
        assert_eq!(won, 1, "at version {version}");
    }
    let versions: Vec<u64> = load(&db, "game", 0)
        .await
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let published: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!(published, 3, "only the winners' events are published");
    db.close().await;
}

async fn a_multi_event_append_is_all_or_nothing(scratch: Scratch) {
    let db = scratch.open().await;
    assert_eq!(append(&db, "s", 0, happened("s", 1..=3)).await.unwrap(), 3);
    // A stale append of several events writes none of them.
    let stale = append(&db, "s", 1, happened("s", 10..=11)).await;
    assert!(
        matches!(stale, Err(EventStoreError::Conflict { actual: 3, .. })),
        "{stale:?}"
    );
    // A unit that appends, then fails, leaves neither events nor messages.
    let failed: Result<(), StoreError> = db
        .write(|uow| {
            event_store::append(uow, "s", 3, &happened("s", [4, 5])).unwrap();
            Err(StoreError::Conflict(
                "the command failed after appending".into(),
            ))
        })
        .await;
    assert!(failed.is_err());
    let numbers: Vec<u32> = load(&db, "s", 0).await.iter().map(|r| r.event.n).collect();
    assert_eq!(numbers, [1, 2, 3]);
    let published: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!(published, 3);
    db.close().await;
}

async fn appended_events_are_published_in_the_order_they_were_appended(scratch: Scratch) {
    let db = scratch.open().await;
    let mut versions = std::collections::HashMap::new();
    for (nth, stream) in ["a", "b", "a", "c", "b", "a"].into_iter().enumerate() {
        let version = versions.entry(stream).or_insert(0u64);
        *version = append(&db, stream, *version, happened(stream, [nth as u32]))
            .await
            .unwrap();
    }
    let logged: Vec<(String, Vec<u8>)> = db
        .read(|conn| {
            Ok::<_, StoreError>(conn.query_map(
                "SELECT \"key\", payload FROM conveyor_log ORDER BY position",
                (),
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?)
        })
        .await
        .unwrap();
    let order: Vec<(String, u32)> = logged
        .iter()
        .map(|(key, payload)| {
            let event: Happened = serde_json::from_slice(payload).unwrap();
            (key.clone(), event.n)
        })
        .collect();
    let expected: Vec<(String, u32)> = ["a", "b", "a", "c", "b", "a"]
        .iter()
        .enumerate()
        .map(|(n, stream)| ((*stream).to_owned(), n as u32))
        .collect();
    assert_eq!(order, expected);
    db.close().await;
}

async fn a_stream_loads_from_any_version(scratch: Scratch) {
    let db = scratch.open().await;
    append(&db, "long", 0, happened("long", 1..=10))
        .await
        .unwrap();
    let tail = load(&db, "long", 7).await;
    assert_eq!(
        tail,
        (8..=10)
            .map(|n| Recorded {
                version: u64::from(n),
                event: Happened {
                    stream: "long".into(),
                    n,
                },
            })
            .collect::<Vec<_>>()
    );
    assert!(load(&db, "long", 10).await.is_empty());
    assert!(load(&db, "unknown", 0).await.is_empty());
    let version = db
        .read(|conn| event_store::version(conn, "long"))
        .await
        .unwrap();
    assert_eq!(version, 10);
    db.close().await;
}

/// A database whose `conveyor_events` an older build made, without `revision`, gets the
/// column when it is opened, and its events read as revision 1.
async fn an_event_store_made_before_revisions_is_upgraded_on_open(scratch: Scratch) {
    let old = |key: &str, payload: &str| {
        format!(
            "CREATE TABLE conveyor_events (stream_id {key} NOT NULL, version BIGINT NOT NULL, \
             name {key} NOT NULL, payload {payload} NOT NULL, recorded_at BIGINT NOT NULL, \
             PRIMARY KEY (stream_id, version)); \
             INSERT INTO conveyor_events VALUES ('s', 1, 'tests.Happened', \
               '{{\"stream\":\"s\",\"n\":1}}', 0)"
        )
    };
    match scratch.sqlite_path() {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(&old("TEXT", "BLOB"))
            .unwrap(),
        None => {
            let (key, payload) = match scratch.backend() {
                platform::Backend::Mysql => ("VARCHAR(255)", "LONGBLOB"),
                _ => ("TEXT", "BYTEA"),
            };
            let sql = old(key, payload);
            let scratch = &scratch;
            std::thread::scope(|scope| {
                scope
                    .spawn(|| scratch.connect().execute_batch(&sql).unwrap())
                    .join()
                    .unwrap()
            });
        }
    }
    let db = scratch.open().await;
    assert_eq!(append(&db, "s", 1, happened("s", [2])).await.unwrap(), 2);
    let numbers: Vec<u32> = load(&db, "s", 0).await.iter().map(|r| r.event.n).collect();
    assert_eq!(numbers, [1, 2]);
    db.close().await;
}
