//! The Redis Streams transport against the transport conformance suite, unchanged: the
//! relay publishes the database's log to Redis (`CONVEYOR_TEST_REDIS`, default loopback),
//! and consumers read it there, on SQLite and on PostgreSQL.

use futures::future::BoxFuture;
use futures::FutureExt;
use platform::conformance::{Fixture, Ping, MIGRATIONS};
use platform::testing::Scratch;
use platform::{Backend, BrokerBus, Bus, Consumer, Database, Message};
use std::sync::Arc;
use transport_redis::RedisBroker;

struct RedisFixture {
    db: Database,
    bus: BrokerBus,
    broker: Arc<RedisBroker>,
    _relay: Consumer,
    namespace: String,
    _place: Scratch,
}

fn server() -> String {
    std::env::var("CONVEYOR_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

impl RedisFixture {
    async fn on(backend: Backend) -> RedisFixture {
        let place = Scratch::new(backend).await;
        let db = place.open().await;
        db.migrate(MIGRATIONS).await.expect("migrate");
        // Streams of their own, so that tests running at once do not see each other's.
        let namespace = format!("conveyor-test-{}", uuid::Uuid::now_v7());
        let broker = RedisBroker::connect(&format!("{}?namespace={namespace}", server()))
            .await
            .unwrap_or_else(|error| panic!("{error} (start it with scripts/services.sh redis)"));
        let broker = Arc::new(broker);
        let bus = BrokerBus::new(db.clone(), broker.clone());
        let relay = bus.relay().await.expect("start the relay");
        RedisFixture {
            db,
            bus,
            broker,
            _relay: relay,
            namespace,
            _place: place,
        }
    }
}

impl Fixture for RedisFixture {
    fn db(&self) -> &Database {
        &self.db
    }

    fn bus(&self) -> &dyn Bus {
        &self.bus
    }

    fn rewind<'a>(&'a self, group: &'a str) -> BoxFuture<'a, ()> {
        async move {
            self.broker
                .rewind(group, Ping::TOPIC)
                .await
                .expect("rewind");
        }
        .boxed()
    }
}

impl Drop for RedisFixture {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(server()) else {
            return;
        };
        if let Ok(mut conn) = client.get_connection() {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.namespace))
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        }
    }
}

mod sqlite {
    platform::conformance_suite!(super::RedisFixture::on(platform::Backend::Sqlite));
}

mod postgres {
    platform::conformance_suite!(super::RedisFixture::on(platform::Backend::Postgres));
}
