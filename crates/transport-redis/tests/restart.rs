//! A Redis restart in the middle of a stream of messages: publishing and consuming resume
//! by themselves, nothing is lost and nothing is handled twice. The test runs a Redis of
//! its own (Debian's `redis-server`, appending every write to its file and syncing it), so
//! that it can stop and start it.

use std::sync::Arc;
use transport_redis::testing::OwnRedis;
use transport_redis::RedisBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing_and_handles_nothing_twice() {
    let mut redis = OwnRedis::start();
    let broker = RedisBroker::connect(&redis.url()).await.expect("connect");
    platform::conformance::a_broker_restart_mid_stream_loses_nothing(Arc::new(broker), || {
        redis.restart()
    })
    .await;
}
