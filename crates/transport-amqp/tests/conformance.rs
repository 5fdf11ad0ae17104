//! The RabbitMQ transport against the transport conformance suite, unchanged: the relay
//! publishes the database's log to RabbitMQ (`CONVEYOR_TEST_AMQP`, default loopback,
//! guest), and consumers read it there, on SQLite and on PostgreSQL.

use futures::FutureExt;
use platform::conformance::{republish, BrokerFixture, Fixture, Ping};
use platform::dead_letter::DeadLettered;
use platform::{Backend, Broker, HandlerError, Incoming, Message, Subscription, UnitOfWork};
use std::sync::Arc;
use transport_amqp::AmqpBroker;

fn server() -> String {
    std::env::var("CONVEYOR_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Exchanges and queues in a namespace of the test's own, deleted after it. A queue keeps
/// nothing it delivered, so a rewind publishes the log again.
async fn fixture(backend: Backend) -> BrokerFixture {
    fixture_in(backend, &format!("test-{}", uuid::Uuid::now_v7().simple())).await
}

async fn fixture_in(backend: Backend, namespace: &str) -> BrokerFixture {
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
                            let _ = broker.delete_dead_letters().await;
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

/// What a group gives up on is kept in its database, and reaches RabbitMQ's dead-letter
/// exchange too, where a queue keeps it for RabbitMQ's own tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_group_gives_up_on_reaches_the_dead_letter_exchange() {
    let namespace = format!("test-{}", uuid::Uuid::now_v7().simple());
    let fixture = fixture_in(Backend::Sqlite, &namespace).await;
    let failing = Subscription::new("doomed").on(|_: Incoming<Ping>, _: &mut UnitOfWork| {
        Err::<(), _>(HandlerError::permanent("this message cannot be handled"))
    });
    let consumer = fixture.bus().subscribe(failing).await.expect("subscribe");
    fixture
        .db()
        .write(|uow| {
            uow.emit(&Ping {
                key: "k".into(),
                seq: 7,
            })
        })
        .await
        .expect("publish");
    let broker = AmqpBroker::connect(&format!("{}?namespace={namespace}", server()))
        .await
        .expect("connect");
    let queue = broker.dead_letters().queue;
    let announced = next_in(&queue).await;
    consumer.stop().await;
    let envelope = platform::broker::decode(&announced).expect("an envelope");
    assert_eq!(envelope.name, DeadLettered::NAME);
    let dead: DeadLettered = serde_json::from_slice(&envelope.payload).expect("a dead letter");
    assert_eq!(dead.group, "doomed");
    assert_eq!(dead.name, Ping::NAME);
    assert!(dead.error.contains("cannot be handled"), "{}", dead.error);
    assert!(dead.payload.contains("\"seq\":7"), "{}", dead.payload);
    let kept = platform::dead_letter::list(fixture.db(), None, 10)
        .await
        .expect("list");
    assert_eq!(kept.len(), 1, "the dead letter is kept in the database too");
}

/// The body of the next message in `queue`, waiting up to 20 s for one.
async fn next_in(queue: &str) -> Vec<u8> {
    let connection = lapin::Connection::connect(&server(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // The queue is declared with the exchange, on the relay's first dead letter, and a
        // get from a queue not declared yet closes its channel: a fresh one each time.
        let channel = connection.create_channel().await.expect("a channel");
        let got = channel
            .basic_get(queue, lapin::options::BasicGetOptions { no_ack: true })
            .await;
        if let Ok(Some(message)) = got {
            return message.delivery.data;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing reached {queue}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
