//! The Redis Streams transport against the transport conformance suite, unchanged: the
//! relay publishes the database's log to Redis (`CONVEYOR_TEST_REDIS`, default loopback),
//! and consumers read it there, on SQLite and on PostgreSQL.

use futures::FutureExt;
use platform::conformance::{BrokerFixture, Ping};
use platform::{Backend, Message};
use std::sync::Arc;
use transport_redis::RedisBroker;

fn server() -> String {
    std::env::var("CONVEYOR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Streams in a namespace of the test's own, deleted after it.
async fn fixture(backend: Backend) -> BrokerFixture {
    let namespace = format!("conveyor-test-{}", uuid::Uuid::now_v7());
    let broker = RedisBroker::connect(&format!("{}?namespace={namespace}", server()))
        .await
        .unwrap_or_else(|error| panic!("{error} (start it with scripts/services.sh redis)"));
    let broker = Arc::new(broker);
    let rewinding = broker.clone();
    BrokerFixture::on(
        backend,
        broker,
        Box::new(move |_db, group| {
            let broker = rewinding.clone();
            async move { broker.rewind(&group, Ping::TOPIC).await.expect("rewind") }.boxed()
        }),
        Box::new(move |_groups| delete_namespace(&namespace)),
    )
    .await
}

fn delete_namespace(namespace: &str) {
    let Ok(client) = redis::Client::open(server()) else {
        return;
    };
    if let Ok(mut conn) = client.get_connection() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

mod sqlite {
    platform::conformance_suite!(super::fixture(platform::Backend::Sqlite));
}

mod postgres {
    platform::conformance_suite!(super::fixture(platform::Backend::Postgres));
}
