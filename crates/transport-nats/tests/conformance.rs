//! The NATS JetStream transport against the transport conformance suite, unchanged: the
//! relay publishes the database's log to JetStream (`CONVEYOR_TEST_NATS`, default loopback),
//! and consumers read it there, on SQLite and on MariaDB.

use futures::FutureExt;
use platform::conformance::{BrokerFixture, Ping};
use platform::{Backend, Message};
use std::sync::Arc;
use transport_nats::NatsBroker;

fn server() -> String {
    std::env::var("CONVEYOR_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Streams in a namespace of the test's own, deleted after it.
async fn fixture(backend: Backend) -> BrokerFixture {
    let namespace = format!("test{}", uuid::Uuid::now_v7().simple());
    let broker = NatsBroker::connect(&format!("{}?namespace={namespace}", server()))
        .await
        .unwrap_or_else(|error| panic!("{error} (start it with scripts/services.sh nats)"));
    let broker = Arc::new(broker);
    let (rewinding, cleaning) = (broker.clone(), broker.clone());
    BrokerFixture::on(
        backend,
        broker,
        Box::new(move |_db, group| {
            let broker = rewinding.clone();
            async move { broker.rewind(&group, Ping::TOPIC).await.expect("rewind") }.boxed()
        }),
        Box::new(move |_groups| {
            // Dropped inside the test's runtime, which cannot be blocked on: a thread and a
            // runtime of its own delete the streams.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    let _ = runtime.block_on(cleaning.delete_namespace());
                }
            })
            .join();
        }),
    )
    .await
}

mod sqlite {
    platform::conformance_suite!(super::fixture(platform::Backend::Sqlite));
}

mod mariadb {
    platform::conformance_suite!(super::fixture(platform::Backend::Mysql));
}
