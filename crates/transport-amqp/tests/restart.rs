//! A RabbitMQ restart in the middle of a stream of messages: publishing and consuming
//! resume by themselves, nothing is lost and nothing is handled twice. The test runs a
//! RabbitMQ node of its own, so that it can stop and start it.

use std::sync::Arc;
use transport_amqp::testing::OwnRabbit;
use transport_amqp::AmqpBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_mid_stream_loses_nothing_and_handles_nothing_twice() {
    let mut rabbit = tokio::task::block_in_place(OwnRabbit::start);
    let broker = AmqpBroker::connect(&rabbit.url()).await.expect("connect");
    platform::conformance::a_broker_restart_mid_stream_loses_nothing(Arc::new(broker), || {
        rabbit.restart()
    })
    .await;
}
