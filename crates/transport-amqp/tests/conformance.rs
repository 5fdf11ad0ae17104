//! The RabbitMQ transport against the transport conformance suite, unchanged: the relay
//! publishes the database's log to RabbitMQ (`CONVEYOR_TEST_AMQP`, default loopback,
//! guest), and consumers read it there, on SQLite and on PostgreSQL.

use futures::FutureExt;
use platform::conformance::{republish, BrokerFixture, Ping};
use platform::{Backend, Broker, Message};
use std::sync::Arc;
use transport_amqp::AmqpBroker;

fn server() -> String {
    std::env::var("CONVEYOR_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Exchanges and queues in a namespace of the test's own, deleted after it. A queue keeps
/// nothing it delivered, so a rewind publishes the log again.
async fn fixture(backend: Backend) -> BrokerFixture {
    let namespace = format!("test-{}", uuid::Uuid::now_v7().simple());
    let url = format!("{}?namespace={namespace}", server());
    let broker = AmqpBroker::connect(&url)
        .await
        .unwrap_or_else(|error| panic!("{error} (start it with scripts/services.sh rabbitmq)"));
    let broker = Arc::new(broker);
    let rewinding = broker.clone();
    BrokerFixture::on(
        backend,
        broker,
        Box::new(move |db, _group| {
            let broker = rewinding.clone();
            async move { republish(&db, broker.as_ref() as &dyn Broker, Ping::TOPIC).await }.boxed()
        }),
        Box::new(move |groups| {
            // Dropped inside the test's runtime, which cannot be blocked on: a thread and a
            // runtime of its own delete what the test declared.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        if let Ok(broker) = AmqpBroker::connect(&url).await {
                            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
                            let _ = broker.delete(&groups, Ping::TOPIC).await;
                        }
                    });
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

mod postgres {
    platform::conformance_suite!(super::fixture(platform::Backend::Postgres));
}
