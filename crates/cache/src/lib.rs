//! A read cache with invalidation: in the process by default, or in Redis, shared by every
//! process that points at it.
//!
//! Invalidation bumps a generation rather than deleting keys. A lookup that misses hands
//! out a `Ticket` holding the generation it saw; a value stored with that ticket is never
//! served after a later invalidation, even when the read that produced it started before
//! the invalidation and stored after it. Every value also expires after the cache's TTL, so
//! an invalidation that never arrived (a Redis outage) costs at most that long.
//!
//! The cache never fails its caller: when Redis does not answer, a lookup is a miss and a
//! store is skipped, with a warning.

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The most values the in-process cache holds; past it, expired values go, then new ones
/// are not kept until some expire or an invalidation clears them.
const LOCAL_CAPACITY: usize = 4096;
/// How long a Redis command may take before the cache gives up on it.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use the Redis cache at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
}

/// A cache, scoped to one namespace (`Cache::scoped`): an invalidation clears its own
/// namespace only (not those scoped inside it). Cheap to clone; clones share the store.
#[derive(Clone)]
pub struct Cache {
    scope: Arc<str>,
    ttl: Duration,
    store: Store,
}

#[derive(Clone)]
enum Store {
    Local(Arc<Mutex<Local>>),
    Redis(ConnectionManager),
}

#[derive(Default)]
struct Local {
    generations: HashMap<Arc<str>, u64>,
    values: HashMap<(Arc<str>, String), LocalValue>,
}

struct LocalValue {
    generation: u64,
    expires: Instant,
    bytes: Bytes,
}

/// What a lookup found.
pub enum Lookup {
    Hit(Bytes),
    /// Not cached: store the value you compute with this ticket.
    Miss(Ticket),
}

/// The generation a missed lookup saw.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.store {
            Store::Local(_) => "local",
            Store::Redis(_) => "redis",
        };
        f.debug_struct("Cache")
            .field("kind", &kind)
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Cache {
    /// A cache in this process's memory.
    pub fn local(ttl: Duration) -> Cache {
        Cache {
            scope: "".into(),
            ttl,
            store: Store::Local(Arc::default()),
        }
    }

    /// A cache in the Redis server at `url` (`redis://HOST[:PORT][/DB]`); it reconnects
    /// by itself after the server restarts.
    pub async fn redis(url: &str, ttl: Duration) -> Result<Cache, CacheError> {
        let failed = |source| CacheError::Redis {
            url: mask_password(url),
            source,
        };
        let client = redis::Client::open(url).map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let manager = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(failed)?;
        Ok(Cache {
            scope: "".into(),
            ttl,
            store: Store::Redis(manager),
        })
    }

    /// The same store, with a namespace of its own inside this one's.
    pub fn scoped(&self, scope: &str) -> Cache {
        Cache {
            scope: format!("{}{scope}/", self.scope).into(),
            ..self.clone()
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub async fn get(&self, key: &str) -> Lookup {
        match &self.store {
            Store::Local(local) => {
                let local = local.lock().unwrap_or_else(PoisonError::into_inner);
                let generation = local.generation(&self.scope);
                match local.values.get(&(self.scope.clone(), key.to_owned())) {
                    Some(value)
                        if value.generation == generation && value.expires > Instant::now() =>
                    {
                        Lookup::Hit(value.bytes.clone())
                    }
                    _ => Lookup::Miss(Ticket(generation)),
                }
            }
            Store::Redis(manager) => {
                let found: redis::RedisResult<(Option<u64>, Option<Vec<u8>>)> = redis::cmd("MGET")
                    .arg(self.generation_key())
                    .arg(self.value_key(key))
                    .query_async(&mut manager.clone())
                    .await;
                match found {
                    Ok((generation, value)) => {
                        let generation = generation.unwrap_or_default();
                        match value.as_deref().and_then(split_generation) {
                            Some((stored, bytes)) if stored == generation => {
                                Lookup::Hit(Bytes::copy_from_slice(bytes))
                            }
                            _ => Lookup::Miss(Ticket(generation)),
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the Redis cache did not answer; reading through");
                        // A generation nobody has: what is computed now is not stored.
                        Lookup::Miss(Ticket(u64::MAX))
                    }
                }
            }
        }
    }

    /// Keeps `bytes` under `key` for the TTL, unless the cache was invalidated since the
    /// lookup that gave `ticket`.
    pub async fn put(&self, ticket: Ticket, key: &str, bytes: Bytes) {
        match &self.store {
            Store::Local(local) => {
                let mut local = local.lock().unwrap_or_else(PoisonError::into_inner);
                if local.generation(&self.scope) != ticket.0 {
                    return;
                }
                let now = Instant::now();
                if local.values.len() >= LOCAL_CAPACITY {
                    local.values.retain(|_, value| value.expires > now);
                }
                if local.values.len() < LOCAL_CAPACITY {
                    let value = LocalValue {
                        generation: ticket.0,
                        expires: now + self.ttl,
                        bytes,
                    };
                    local
                        .values
                        .insert((self.scope.clone(), key.to_owned()), value);
                }
            }
            Store::Redis(manager) => {
                if ticket.0 == u64::MAX {
                    return;
                }
                let mut stored = format!("{}\n", ticket.0).into_bytes();
                stored.extend_from_slice(&bytes);
                let ttl = self.ttl.as_millis().max(1) as u64;
                let set: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(self.value_key(key))
                    .arg(stored)
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut manager.clone())
                    .await;
                if let Err(error) = set {
                    tracing::warn!(%error, "cannot store in the Redis cache");
                }
            }
        }
    }

    /// Makes every value stored so far in this namespace stale, in every process that
    /// shares the store.
    pub async fn invalidate(&self) {
        match &self.store {
            Store::Local(local) => {
                let mut local = local.lock().unwrap_or_else(PoisonError::into_inner);
                *local.generations.entry(self.scope.clone()).or_default() += 1;
                let scope = self.scope.clone();
                local.values.retain(|(owner, _), _| *owner != scope);
            }
            Store::Redis(manager) => {
                let bumped: redis::RedisResult<u64> = redis::cmd("INCR")
                    .arg(self.generation_key())
                    .query_async(&mut manager.clone())
                    .await;
                if let Err(error) = bumped {
                    tracing::warn!(%error, "cannot invalidate the Redis cache; its values expire within the TTL");
                }
            }
        }
    }

    fn generation_key(&self) -> String {
        format!("conveyor:cache:{}generation", self.scope)
    }

    fn value_key(&self, key: &str) -> String {
        format!("conveyor:cache:{}value:{key}", self.scope)
    }
}

impl Local {
    fn generation(&self, scope: &Arc<str>) -> u64 {
        self.generations.get(scope).copied().unwrap_or_default()
    }
}

/// A stored Redis value is its generation, a newline, then the bytes.
fn split_generation(stored: &[u8]) -> Option<(u64, &[u8])> {
    let newline = stored.iter().position(|byte| *byte == b'\n')?;
    let generation = std::str::from_utf8(&stored[..newline]).ok()?.parse().ok()?;
    Some((generation, &stored[newline + 1..]))
}

/// `url` with its password, if any, replaced by `***`, for messages.
fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(lookup: Lookup) -> Option<Bytes> {
        match lookup {
            Lookup::Hit(bytes) => Some(bytes),
            Lookup::Miss(_) => None,
        }
    }

    async fn ticket(cache: &Cache, key: &str) -> Ticket {
        match cache.get(key).await {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("{key} should not be cached"),
        }
    }

    #[tokio::test]
    async fn a_stored_value_is_served_until_invalidated() {
        let cache = Cache::local(Duration::from_secs(10)).scoped("notes");
        let before = ticket(&cache, "list").await;
        cache.put(before, "list", Bytes::from_static(b"[1]")).await;
        assert_eq!(hit(cache.get("list").await).as_deref(), Some(&b"[1]"[..]));
        cache.invalidate().await;
        assert!(hit(cache.get("list").await).is_none());
    }

    #[tokio::test]
    async fn a_value_read_before_an_invalidation_is_not_kept() {
        let cache = Cache::local(Duration::from_secs(10));
        let before = ticket(&cache, "list").await;
        cache.invalidate().await;
        cache.put(before, "list", Bytes::from_static(b"old")).await;
        assert!(hit(cache.get("list").await).is_none());
    }

    #[tokio::test]
    async fn values_expire_after_the_ttl() {
        let cache = Cache::local(Duration::from_millis(20));
        let before = ticket(&cache, "list").await;
        cache.put(before, "list", Bytes::from_static(b"[1]")).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(hit(cache.get("list").await).is_none());
    }

    #[tokio::test]
    async fn an_invalidation_clears_its_own_scope_only() {
        let cache = Cache::local(Duration::from_secs(10));
        let (notes, other) = (cache.scoped("notes"), cache.scoped("other"));
        let ticket_notes = ticket(&notes, "k").await;
        let ticket_other = ticket(&other, "k").await;
        notes.put(ticket_notes, "k", Bytes::from_static(b"n")).await;
        other.put(ticket_other, "k", Bytes::from_static(b"o")).await;
        notes.invalidate().await;
        assert!(hit(notes.get("k").await).is_none());
        assert_eq!(hit(other.get("k").await).as_deref(), Some(&b"o"[..]));
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(mask_password("redis://127.0.0.1"), "redis://127.0.0.1");
    }
}
