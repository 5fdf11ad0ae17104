//! The cache on a real Redis server (`CONVEYOR_TEST_REDIS`, default loopback): two handles
//! stand for two processes sharing it.

use bytes::Bytes;
use cache::{Cache, Lookup};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

async fn redis(ttl: Duration) -> Cache {
    let url = std::env::var("CONVEYOR_TEST_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::redis(&url, ttl)
        .await
        .unwrap_or_else(|error| panic!("{error} (start it with scripts/services.sh redis)"));
    // A namespace per test, so that tests running at once do not see each other's values.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    cache.scoped(&format!("test-{}-{nanos}", std::process::id()))
}

async fn fetch(cache: &Cache, key: &str) -> Option<Bytes> {
    match cache.get(key).await {
        Lookup::Hit(bytes) => Some(bytes),
        Lookup::Miss(_) => None,
    }
}

#[tokio::test]
async fn one_process_stores_and_another_reads_until_an_invalidation() {
    let api = redis(Duration::from_secs(10)).await;
    let Lookup::Miss(ticket) = api.get("list").await else {
        panic!("a new namespace holds nothing");
    };
    api.put(ticket, "list", Bytes::from_static(b"[1,2]")).await;
    let other = api.clone();
    assert_eq!(fetch(&other, "list").await.as_deref(), Some(&b"[1,2]"[..]));
    other.invalidate().await;
    assert_eq!(fetch(&api, "list").await, None);
}

#[tokio::test]
async fn a_value_read_before_an_invalidation_is_never_served() {
    let cache = redis(Duration::from_secs(10)).await;
    let Lookup::Miss(ticket) = cache.get("list").await else {
        panic!("a new namespace holds nothing");
    };
    cache.invalidate().await;
    cache
        .put(ticket, "list", Bytes::from_static(b"stale"))
        .await;
    assert_eq!(fetch(&cache, "list").await, None);
}

#[tokio::test]
async fn values_expire_after_the_ttl() {
    let cache = redis(Duration::from_millis(50)).await;
    let Lookup::Miss(ticket) = cache.get("list").await else {
        panic!("a new namespace holds nothing");
    };
    cache.put(ticket, "list", Bytes::from_static(b"[1]")).await;
    assert!(fetch(&cache, "list").await.is_some());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(fetch(&cache, "list").await, None);
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_naming_it() {
    let error = Cache::redis("redis://127.0.0.1:1", Duration::from_secs(1))
        .await
        .expect_err("nothing listens on port 1");
    assert!(error.to_string().contains("redis://127.0.0.1:1"), "{error}");
}
