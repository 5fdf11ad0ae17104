//! A NATS restart in the middle of a stream of messages: publishing and consuming resume by
//! themselves, nothing is lost and nothing is handled twice. The test runs a NATS of its
//! own, so that it can stop and start it.

use std::sync::Arc;
use transport_nats::testing::OwnNats;
use transport_nats::NatsBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_stream_loses_nothing_and_handles_nothing_twice() {
    let mut nats = OwnNats::start();
    let broker = NatsBroker::connect(&nats.url()).await.expect("connect");
    platform::conformance::a_broker_restart_mid_stream_loses_nothing(Arc::new(broker), || {
        nats.restart()
    })
    .await;
}
