//! The Redis Streams transport.
//!
//! Each partition of a topic is a stream, `<namespace>:<topic>:<partition>`; the relay
//! appends to it (`XADD`, a batch in one `MULTI`), and each consumer group of the platform
//! is a Redis consumer group on it, created reading from the stream's start. The platform
//! gives a partition to one consumer of a group at a time (its lease); that consumer first
//! claims what earlier owners read and did not acknowledge (`XAUTOCLAIM`), reads its own
//! pending entries, then new ones (`XREADGROUP … >`, blocking), and acknowledges (`XACK`)
//! after its unit of work committed. So messages with one key are handled in order, and an
//! entry whose consumer died is handled by the next owner. Retention trims each stream to
//! what is younger than the log's retention or not yet acknowledged by every group
//! (`XTRIM … MINID`).
//!
//! A reader has a connection of its own: a blocking read holds its connection.

pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

use futures::future::BoxFuture;
use futures::FutureExt;
use platform::broker::{BusUrl, Delivery, PartitionReader, Publication, ReaderSpec};
use platform::{Broker, BrokerError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use std::collections::HashMap;
use std::time::Duration;

/// The field of a stream entry that holds the envelope.
const FIELD: &str = "m";
/// How long a command may take, besides a blocking read's own wait.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Pending entries claimed per `XAUTOCLAIM`.
const CLAIM_COUNT: usize = 1000;

/// The Redis of `redis://HOST[:PORT][/DB][?partitions=N&namespace=NAME]`.
pub struct RedisBroker {
    client: redis::Client,
    publisher: ConnectionManager,
    namespace: String,
    partitions: u32,
}

impl RedisBroker {
    /// Connects; a server that does not answer is an error.
    pub async fn connect(url: &str) -> Result<RedisBroker, BrokerError> {
        let url = BusUrl::parse(url)?;
        let client = redis::Client::open(url.server.as_str()).map_err(BrokerError::new)?;
        let publisher = manager(&client, TIMEOUT).await?;
        Ok(RedisBroker {
            client,
            publisher,
            namespace: url.namespace,
            partitions: url.partitions,
        })
    }

    /// The stream of one partition of `topic`.
    pub fn stream(&self, topic: &str, partition: u32) -> String {
        format!("{}:{topic}:{partition}", self.namespace)
    }

    /// Deletes every stream of this broker's namespace (for tests and benches).
    pub async fn delete_namespace(&self) -> Result<(), BrokerError> {
        let mut conn = self.publisher.clone();
        let streams = self.streams(&mut conn).await?;
        if streams.is_empty() {
            return Ok(());
        }
        redis::cmd("DEL")
            .arg(streams)
            .query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::new)
    }

    /// Every stream of this broker's namespace (`SCAN`, which does not hold the server up as
    /// `KEYS` would).
    async fn streams(&self, conn: &mut ConnectionManager) -> Result<Vec<String>, BrokerError> {
        let mut streams = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.namespace))
                .arg("COUNT")
                .arg(500)
                .query_async(conn)
                .await
                .map_err(BrokerError::new)?;
            streams.extend(keys);
            if next == 0 {
                return Ok(streams);
            }
            cursor = next;
        }
    }

    /// Makes `group` read every partition of `topic` from the start again, as if it had
    /// acknowledged nothing (for tests of redelivery).
    pub async fn rewind(&self, group: &str, topic: &str) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for partition in 0..self.partitions {
            pipe.cmd("XGROUP")
                .arg("SETID")
                .arg(self.stream(topic, partition))
                .arg(group)
                .arg("0")
                .ignore();
        }
        let mut conn = self.publisher.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::new)
    }
}

async fn manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, BrokerError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(TIMEOUT)
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_max_delay(1000);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(BrokerError::new)
}

impl Broker for RedisBroker {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let mut conn = self.publisher.clone();
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(BrokerError::new)
        }
        .boxed()
    }

    fn join(&self, group: &str, topics: &[String]) -> BoxFuture<'_, Result<(), BrokerError>> {
        let streams: Vec<String> = topics
            .iter()
            .flat_map(|topic| (0..self.partitions).map(move |partition| (topic, partition)))
            .map(|(topic, partition)| self.stream(topic, partition))
            .collect();
        let group = group.to_owned();
        async move {
            let mut conn = self.publisher.clone();
            for stream in &streams {
                create_group(&mut conn, stream, &group).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn prune(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, BrokerError>> {
        async move {
            let mut conn = self.publisher.clone();
            let streams = self.streams(&mut conn).await?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let cutoff = now.saturating_sub(older_than).as_millis();
            let mut pruned = 0;
            for stream in streams {
                let keep_from = keep_from(&mut conn, &stream, cutoff).await?;
                let trimmed: u64 = redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg(keep_from.to_string())
                    .query_async(&mut conn)
                    .await
                    .map_err(BrokerError::new)?;
                pruned += trimmed;
            }
            Ok(pruned)
        }
        .boxed()
    }

    fn lag<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BrokerError>> {
        async move {
            let mut conn = self.publisher.clone();
            let mut lag = 0;
            for partition in 0..self.partitions {
                lag += stream_lag(&mut conn, &self.stream(topic, partition), group).await?;
            }
            Ok(lag)
        }
        .boxed()
    }

    fn publish<'a>(&'a self, batch: &'a [Publication]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            if batch.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for publication in batch {
                pipe.cmd("XADD")
                    .arg(self.stream(&publication.topic, publication.partition))
                    .arg("*")
                    .arg(FIELD)
                    .arg(publication.body.as_ref())
                    .ignore();
            }
            let mut conn = self.publisher.clone();
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(BrokerError::new)
        }
        .boxed()
    }

    fn open(
        &self,
        spec: ReaderSpec,
    ) -> BoxFuture<'_, Result<Box<dyn PartitionReader>, BrokerError>> {
        async move {
            let streams: Vec<String> = spec
                .topics
                .iter()
                .map(|topic| self.stream(topic, spec.partition))
                .collect();
            // Longer than any blocking read it sends.
            let mut conn = manager(&self.client, TIMEOUT * 2).await?;
            for stream in &streams {
                create_group(&mut conn, stream, &spec.group).await?;
                claim_pending(&mut conn, stream, &spec.group, &spec.member).await?;
            }
            let history = streams.iter().map(|_| Some("0".to_owned())).collect();
            Ok(Box::new(RedisReader {
                conn,
                group: spec.group,
                member: spec.member,
                streams,
                history,
                next_seq: 1,
                unacknowledged: HashMap::new(),
            }) as Box<dyn PartitionReader>)
        }
        .boxed()
    }
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EntryId(u128, u64);

impl EntryId {
    fn parse(id: &str) -> Option<EntryId> {
        let (millis, seq) = id.split_once('-')?;
        Some(EntryId(millis.parse().ok()?, seq.parse().ok()?))
    }

    /// The first id after this one.
    fn next(self) -> EntryId {
        EntryId(self.0, self.1 + 1)
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The oldest entry of `stream` to keep: those before the cutoff (ms since the epoch) go,
/// unless a group has not acknowledged them yet (its oldest pending entry, or what it has
/// not been delivered). The log's retention rule, on a stream.
async fn keep_from(
    conn: &mut ConnectionManager,
    stream: &str,
    cutoff: u128,
) -> Result<EntryId, BrokerError> {
    let groups = groups_of(conn, stream).await?;
    let mut keep = EntryId(cutoff, 0);
    for group in groups {
        let text = |field: &str| {
            group
                .get(field)
                .and_then(|value| redis::from_redis_value::<String>(value).ok())
        };
        let (Some(name), Some(delivered)) = (text("name"), text("last-delivered-id")) else {
            continue;
        };
        let mut floor = EntryId::parse(&delivered).map_or(EntryId(0, 0), EntryId::next);
        let (count, oldest, _, _): (u64, Option<String>, Option<String>, redis::Value) =
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(&name)
                .query_async(conn)
                .await
                .map_err(BrokerError::new)?;
        if count > 0 {
            if let Some(oldest) = oldest.as_deref().and_then(EntryId::parse) {
                floor = floor.min(oldest);
            }
        }
        keep = keep.min(floor);
    }
    Ok(keep)
}

/// Creates the consumer group on `stream` (and the stream), reading from its start; one that
/// exists is left as it is.
async fn create_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<(), BrokerError> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        created => created.map_err(BrokerError::new),
    }
}

/// Takes over every entry of `stream` that the group's consumers read and did not
/// acknowledge: the partition's earlier owners', which died or gave it up.
async fn claim_pending(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
    member: &str,
) -> Result<(), BrokerError> {
    let mut cursor = "0-0".to_owned();
    loop {
        let (next, _claimed, _deleted): (String, Vec<String>, redis::Value) =
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(group)
                .arg(member)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(CLAIM_COUNT)
                .arg("JUSTID")
                .query_async(conn)
                .await
                .map_err(BrokerError::new)?;
        if next == "0-0" {
            return Ok(());
        }
        cursor = next;
    }
}

struct RedisReader {
    conn: ConnectionManager,
    group: String,
    member: String,
    streams: Vec<String>,
    /// Per stream: the last pending entry read again while the reader still works through
    /// what it claimed (`None` once it has, and reads new entries).
    history: Vec<Option<String>>,
    next_seq: u64,
    /// The stream (by index) and entry id of each delivery not acknowledged yet.
    unacknowledged: HashMap<u64, (usize, String)>,
}

impl RedisReader {
    /// `XREADGROUP` of `streams` after `ids`, blocking up to `wait` if it is not zero.
    async fn read_streams(
        &mut self,
        streams: &[String],
        ids: &[String],
        max: usize,
        wait: Duration,
    ) -> Result<StreamReadReply, BrokerError> {
        let mut options = StreamReadOptions::default()
            .group(&self.group, &self.member)
            .count(max);
        if !wait.is_zero() {
            options = options.block(usize::try_from(wait.as_millis()).unwrap_or(usize::MAX));
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(streams)
            .arg(ids)
            .query_async(&mut self.conn)
            .await
            .map_err(BrokerError::new)?;
        Ok(reply.unwrap_or_default())
    }

    fn index_of(&self, key: &str) -> Option<usize> {
        self.streams.iter().position(|stream| stream == key)
    }

    fn delivery(&mut self, index: usize, entry: StreamId) -> Delivery {
        let seq = self.next_seq;
        self.next_seq += 1;
        // An entry trimmed away while pending comes back without its fields: an empty body
        // that does not decode, dead-lettered rather than lost without a trace.
        let body = entry
            .map
            .get(FIELD)
            .and_then(|value| redis::from_redis_value::<Vec<u8>>(value).ok())
            .unwrap_or_default();
        self.unacknowledged.insert(seq, (index, entry.id));
        Delivery {
            seq,
            body: body.into(),
        }
    }

    /// The deliveries of a read's reply, in the order it gave them.
    fn deliveries(&mut self, reply: StreamReadReply) -> Vec<Delivery> {
        let mut delivered = Vec::new();
        for key in reply.keys {
            if let Some(index) = self.index_of(&key.key) {
                for entry in key.ids {
                    delivered.push(self.delivery(index, entry));
                }
            }
        }
        delivered
    }

    /// Reads the next pending entries of the streams still in their history; a stream whose
    /// read comes back empty has none left.
    async fn read_history(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let (streams, ids): (Vec<String>, Vec<String>) = self
            .streams
            .iter()
            .zip(&self.history)
            .filter_map(|(stream, after)| Some((stream.clone(), after.clone()?)))
            .unzip();
        let reply = self
            .read_streams(&streams, &ids, max, Duration::ZERO)
            .await?;
        for (index, after) in self.history.iter_mut().enumerate() {
            if after.is_none() {
                continue;
            }
            let last = reply
                .keys
                .iter()
                .find(|key| key.key == self.streams[index])
                .and_then(|key| key.ids.last());
            *after = last.map(|entry| entry.id.clone());
        }
        Ok(self.deliveries(reply))
    }
}

impl PartitionReader for RedisReader {
    fn read(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            if self.history.iter().any(Option::is_some) {
                let delivered = self.read_history(max).await?;
                if !delivered.is_empty() {
                    return Ok(delivered);
                }
            }
            let ids = vec![">".to_owned(); self.streams.len()];
            let streams = self.streams.clone();
            let reply = self.read_streams(&streams, &ids, max, wait).await?;
            Ok(self.deliveries(reply))
        }
        .boxed()
    }

    fn ack<'a>(&'a mut self, seqs: &'a [u64]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let mut by_stream: HashMap<usize, Vec<String>> = HashMap::new();
            for seq in seqs {
                if let Some((index, id)) = self.unacknowledged.remove(seq) {
                    by_stream.entry(index).or_default().push(id);
                }
            }
            if by_stream.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for (index, ids) in by_stream {
                pipe.cmd("XACK")
                    .arg(&self.streams[index])
                    .arg(&self.group)
                    .arg(ids)
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.conn)
                .await
                .map_err(BrokerError::new)
        }
        .boxed()
    }
}

/// What `group` has not acknowledged of `stream`: the entries not yet delivered to it
/// (Redis's `lag`; the whole stream when Redis cannot tell, or before the group is made,
/// as it then reads from the start) and those delivered and pending.
async fn stream_lag(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<i64, BrokerError> {
    let length: i64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(BrokerError::new)?;
    if length == 0 {
        return Ok(0);
    }
    let groups = groups_of(conn, stream).await?;
    let Some(info) = groups.iter().find(|info| {
        info.get("name")
            .and_then(|name| redis::from_redis_value::<String>(name).ok())
            .is_some_and(|name| name == group)
    }) else {
        return Ok(length);
    };
    let number = |field: &str| {
        info.get(field)
            .and_then(|value| redis::from_redis_value::<i64>(value).ok())
    };
    let undelivered = number("lag").unwrap_or(length);
    Ok((undelivered + number("pending").unwrap_or_default()).min(length))
}

/// `XINFO GROUPS` of `stream`: each group's fields by name.
async fn groups_of(
    conn: &mut ConnectionManager,
    stream: &str,
) -> Result<Vec<HashMap<String, redis::Value>>, BrokerError> {
    redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(BrokerError::new)
}
