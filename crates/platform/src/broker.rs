//! The port a message broker implements, and what the platform builds on it: the outbox
//! relay and consumers that read the broker.
//!
//! Units of work still append to the database's log (`conveyor_log`): that is the outbox. A
//! **relay** reads it in position order, which is commit order on every backend, and
//! publishes each row to the broker, partitioned by key hash; it is a consumer group of the
//! log (`RELAY_GROUP`), so several processes relay at once, each its share of the
//! partitions, and the group's offsets are how far each partition has been published.
//! **Consumers** read one broker partition per lane, hand the messages to the same
//! dispatcher the sql-log uses (inbox, retries, dead letters), and acknowledge them to the
//! broker once their unit of work committed. A partition is read by one consumer of a group
//! at a time, under the same leases in the group's database as the sql-log's, so messages
//! with one key are handled in order.
//!
//! A transport crate implements `Broker` and `PartitionReader`; `BrokerBus` is its `Bus`.

use crate::bus::{Bus, BusError, Consumer};
use crate::db::Database;
use crate::dead_letter;
use crate::envelope::{header, key_hash, Envelope, Headers, Kind};
use crate::handler::{ConsumerOptions, Subscription};
use crate::log::Entry;
use crate::sql_log::{self, Lanes, Split};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The consumer group of the log that the relay is.
pub const RELAY_GROUP: &str = "conveyor.relay";
/// How long a read waits for messages before the lane looks at its stop again.
const READ_WAIT: Duration = Duration::from_millis(500);
/// Rows the relay publishes per batch.
const RELAY_BATCH: u16 = 256;

/// A broker that failed or could not be reached: always worth trying again.
#[derive(Debug, thiserror::Error)]
#[error("the broker failed: {0}")]
pub struct BrokerError(pub String);

impl BrokerError {
    pub fn new(error: impl std::fmt::Display) -> Self {
        BrokerError(error.to_string())
    }
}

/// Partitions per topic unless the bus URL says otherwise.
pub const DEFAULT_PARTITIONS: u32 = 4;
/// The prefix of the broker's names (streams, subjects) unless the bus URL says otherwise.
pub const DEFAULT_NAMESPACE: &str = "conveyor";

/// What a bus URL says beside the server: `?partitions=N` (every topic is split into N,
/// 1 to 1024) and `?namespace=NAME` (the prefix of the broker's names, so deployments can
/// share a server). Other parameters stay in `server`, for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUrl {
    pub server: String,
    pub partitions: u32,
    pub namespace: String,
}

impl BusUrl {
    pub fn parse(url: &str) -> Result<BusUrl, BrokerError> {
        let (server, query) = url.split_once('?').unwrap_or((url, ""));
        let mut parsed = BusUrl {
            server: server.to_owned(),
            partitions: DEFAULT_PARTITIONS,
            namespace: DEFAULT_NAMESPACE.to_owned(),
        };
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("partitions", value)) => {
                    parsed.partitions = value
                        .parse()
                        .ok()
                        .filter(|partitions| (1..=1024).contains(partitions))
                        .ok_or_else(|| {
                            BrokerError::new(format!(
                                "partitions={value}: must be a whole number from 1 to 1024"
                            ))
                        })?;
                }
                Some(("namespace", value)) => {
                    let valid = !value.is_empty()
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !valid {
                        return Err(BrokerError::new(format!(
                            "namespace={value}: must be letters, digits, '-' or '_'"
                        )));
                    }
                    parsed.namespace = value.to_owned();
                }
                _ => rest.push(pair),
            }
        }
        if !rest.is_empty() {
            parsed.server = format!("{}?{}", parsed.server, rest.join("&"));
        }
        Ok(parsed)
    }
}

/// What the raw-client baselines of `conveyor bench bus` do, the same for every broker:
/// `producers` tasks publish `messages` in all, `batch` at a time with the broker's confirms,
/// over `partitions` partitions, while one reader per partition reads and acknowledges them.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub messages: usize,
    pub batch: usize,
    pub producers: usize,
    pub partitions: u32,
}

impl Baseline {
    /// Batches each producer publishes.
    pub fn batches_per_producer(&self) -> usize {
        self.messages / self.batch.max(1) / self.producers.max(1)
    }

    /// Messages a run publishes in all: whole batches of every producer.
    pub fn expected(&self) -> usize {
        self.batches_per_producer() * self.batch * self.producers
    }

    /// Waits for a run's producers, then its readers: the time since `started`, and every
    /// message's latency.
    pub async fn finish(
        started: std::time::Instant,
        producers: Vec<tokio::task::JoinHandle<Result<(), BrokerError>>>,
        readers: Vec<tokio::task::JoinHandle<Result<Vec<Duration>, BrokerError>>>,
    ) -> Result<(Duration, Vec<Duration>), BrokerError> {
        for producer in producers {
            producer.await.map_err(BrokerError::new)??;
        }
        let mut latencies = Vec::new();
        for reader in readers {
            latencies.extend(reader.await.map_err(BrokerError::new)??);
        }
        Ok((started.elapsed(), latencies))
    }

    /// A message body of `size` bytes (at least the clock's) carrying when it was sent.
    pub fn body(size: usize) -> Vec<u8> {
        let mut body = now_micros().to_le_bytes().to_vec();
        body.resize(size.max(16), b'.');
        body
    }

    /// How long ago a body of `body` was sent.
    pub fn latency(body: &[u8]) -> Duration {
        let sent = body
            .get(..16)
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
            .map_or(0, u128::from_le_bytes);
        Duration::from_micros(u64::try_from(now_micros().saturating_sub(sent)).unwrap_or(0))
    }
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// A message on its way to the broker.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: String,
    /// `key_hash(key) % partitions`: where the message's key is read in order.
    pub partition: u32,
    /// What identifies this publication, for brokers that drop a duplicate: the envelope's
    /// id, or for a replay (the same envelope again) the id and the replay's log position.
    pub dedupe_id: String,
    /// The envelope as `encode` wrote it; shared, so a client that takes its own copy of
    /// a body takes a reference.
    pub body: Bytes,
}

/// A message a reader received, numbered by the reader in the order it received them.
#[derive(Debug)]
pub struct Delivery {
    pub seq: u64,
    pub body: Bytes,
}

/// What a reader reads: one partition of `topics`, for `group`.
#[derive(Debug, Clone)]
pub struct ReaderSpec {
    pub group: String,
    /// This consumer, unique in its group.
    pub member: String,
    pub topics: Vec<String>,
    pub partition: u32,
}

/// A message broker.
pub trait Broker: Send + Sync + 'static {
    /// Into how many partitions every topic is split.
    fn partitions(&self) -> u32;

    /// Answers once the broker does (for readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Publishes `batch`, returning once the broker holds all of it (its confirms). Messages
    /// of one partition reach it in the batch's order.
    fn publish<'a>(&'a self, batch: &'a [Publication]) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Deletes what every group has acknowledged and is older than `older_than`, the rule the
    /// log's retention keeps; returns how many messages went. Nothing to do for a broker
    /// whose queues drop what they delivered (RabbitMQ), or that prunes by its own limits.
    fn prune(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, BrokerError>> {
        let _ = older_than;
        async { Ok(0) }.boxed()
    }

    /// Makes ready what `group` reads of `topics` before it first reads, so that it receives
    /// every message published from now on (a broker that keeps only what is routed to a
    /// queue needs the queues). Nothing to do for one that keeps its history.
    fn join(&self, group: &str, topics: &[String]) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = (group, topics);
        async { Ok(()) }.boxed()
    }

    /// How many messages of `topic` the broker holds for `group` that it has not
    /// acknowledged, over every partition: what waits to be delivered and what a reader
    /// holds. Nothing for a group that never joined where the broker keeps messages only
    /// for joined groups.
    fn lag<'a>(&'a self, group: &'a str, topic: &'a str)
        -> BoxFuture<'a, Result<i64, BrokerError>>;

    /// Opens the reader of one partition for a group. The caller holds the partition's lease:
    /// the reader first takes over what earlier owners received and did not acknowledge.
    fn open(
        &self,
        spec: ReaderSpec,
    ) -> BoxFuture<'_, Result<Box<dyn PartitionReader>, BrokerError>>;
}

/// A reader of one partition, owned by one lane.
pub trait PartitionReader: Send {
    /// Waits up to `wait` for messages, and returns up to `max` of them, oldest first
    /// (none if none came).
    fn read(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>>;

    /// Acknowledges the deliveries numbered `seqs`, whose effects have committed.
    fn ack<'a>(&'a mut self, seqs: &'a [u64]) -> BoxFuture<'a, Result<(), BrokerError>>;
}

/// Up to `max` items of a reader's `stream` of received messages: waits up to `wait` for
/// the first (returning none if it does not come), then takes what has come already. A
/// stream that ended (the broker cancelled the consumer) is an error.
pub async fn take_ready<S>(
    stream: &mut S,
    max: usize,
    wait: Duration,
) -> Result<Vec<S::Item>, BrokerError>
where
    S: futures::Stream + Unpin,
{
    let ended = || BrokerError::new("the broker ended the consumer");
    let mut taken = Vec::new();
    if !wait.is_zero() {
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Ok(taken),
            Ok(Some(item)) => taken.push(item),
            Ok(None) => return Err(ended()),
        }
    }
    while taken.len() < max {
        match stream.next().now_or_never() {
            None => break,
            Some(Some(item)) => taken.push(item),
            Some(None) => return Err(ended()),
        }
    }
    Ok(taken)
}

/// The envelope as it crosses a broker: JSON, with the payload (JSON itself) inline.
#[derive(Deserialize)]
struct Wire {
    id: Uuid,
    kind: String,
    name: String,
    topic: String,
    key: String,
    headers: Box<serde_json::value::RawValue>,
    occurred_at: i64,
    payload: Box<serde_json::value::RawValue>,
}

/// `Wire` but its headers and payload, borrowed from the envelope, as `encode` writes it.
#[derive(Serialize)]
struct WireHead<'a> {
    id: Uuid,
    kind: &'a str,
    name: &'a str,
    topic: &'a str,
    key: &'a str,
    occurred_at: i64,
}

/// Encodes an envelope for a broker. Its payload is the JSON `UnitOfWork::emit` wrote, and
/// goes in as it is: parsing it again on its way out cost a full parse per message on the
/// relay's CPU. `decode` parses it, and a consumer dead-letters what does not. Headers read
/// from the log go in as the text they were stored as, too.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, BrokerError> {
    let head = WireHead {
        id: envelope.id,
        kind: envelope.kind.as_str(),
        name: &envelope.name,
        topic: &envelope.topic,
        key: &envelope.key,
        occurred_at: envelope.occurred_at,
    };
    let headers = envelope.headers.to_json().map_err(BrokerError::new)?;
    let mut body = Vec::with_capacity(256 + headers.len() + envelope.payload.len());
    serde_json::to_writer(&mut body, &head).map_err(BrokerError::new)?;
    // The head is a JSON object: its closing brace is its last byte.
    body.pop();
    body.extend_from_slice(b",\"headers\":");
    body.extend_from_slice(headers.as_bytes());
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(&envelope.payload);
    body.push(b'}');
    Ok(body)
}

/// Decodes what `encode` wrote.
pub fn decode(body: &[u8]) -> Result<Envelope, String> {
    let wire: Wire = serde_json::from_slice(body).map_err(|error| error.to_string())?;
    Ok(Envelope {
        id: wire.id,
        kind: Kind::parse(&wire.kind).ok_or_else(|| format!("unknown kind {}", wire.kind))?,
        name: wire.name,
        topic: wire.topic,
        key: wire.key,
        payload: wire.payload.get().as_bytes().to_vec(),
        headers: Headers::from_json(wire.headers.get().to_owned())
            .map_err(|error| format!("headers: {error}"))?,
        occurred_at: wire.occurred_at,
    })
}

/// The publication of the log row at `position`.
pub(crate) fn publication(
    envelope: &Envelope,
    position: i64,
    partitions: u32,
) -> Result<Publication, BrokerError> {
    let partition = key_hash(&envelope.key) % i64::from(partitions.max(1));
    let dedupe_id = match envelope.header(header::ONLY_GROUP) {
        Some(_) => format!("{}@{position}", envelope.id),
        None => envelope.id.to_string(),
    };
    Ok(Publication {
        topic: envelope.topic.clone(),
        partition: u32::try_from(partition).unwrap_or_default(),
        dedupe_id,
        body: Bytes::from(encode(envelope)?),
    })
}

/// What one consumer group sees of a delivery: its message, one it skips (another name, or
/// a replay for another group), or why it does not decode.
fn entry(body: &[u8], group: &str, names: &[&str]) -> Entry {
    match decode(body) {
        Ok(mut envelope) => {
            let only = envelope.headers.remove(header::ONLY_GROUP);
            if only.is_some_and(|only| only != group) || !names.contains(&envelope.name.as_str()) {
                Entry::Skipped
            } else {
                Entry::Message(envelope)
            }
        }
        Err(error) => Entry::Corrupt(error),
    }
}

/// A transport over a broker: consumers read it, and `relay` publishes the database's log
/// to it.
pub struct BrokerBus {
    db: Database,
    broker: Arc<dyn Broker>,
}

impl BrokerBus {
    pub fn new(db: Database, broker: Arc<dyn Broker>) -> Self {
        BrokerBus { db, broker }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Makes the broker keep for `subscription`'s group what is published from now on,
    /// before any member reads: a process that sends a group work it does not consume
    /// itself (an API process, whose workers run elsewhere) joins it, or a broker that keeps
    /// messages only for joined groups (RabbitMQ) would drop what it sent.
    pub async fn join(&self, subscription: &Subscription) -> Result<(), BusError> {
        within(
            BROKER_CALL,
            self.broker.join(&subscription.group, &subscription.topics),
        )
        .await?;
        Ok(())
    }

    /// Starts this process's relay of the log to the broker; it runs until stopped. Every
    /// process that writes should run one: relays share the log's partitions.
    pub async fn relay(&self) -> Result<Consumer, BusError> {
        let options = ConsumerOptions {
            partitions: u16::try_from(self.broker.partitions()).unwrap_or(u16::MAX),
            batch: RELAY_BATCH,
            ..ConsumerOptions::default()
        };
        sql_log::start(
            &self.db,
            Subscription::new(RELAY_GROUP).with_options(options),
            Lanes::Relay(self.broker.clone()),
        )
        .await
    }
}

impl Bus for BrokerBus {
    fn subscribe(&self, subscription: Subscription) -> BoxFuture<'_, Result<Consumer, BusError>> {
        async move {
            // The broker's topics are split when published: every group reads that split.
            let mut subscription = subscription;
            subscription.options.partitions =
                u16::try_from(self.broker.partitions()).unwrap_or(u16::MAX);
            self.join(&subscription).await?;
            sql_log::start(&self.db, subscription, Lanes::Broker(self.broker.clone())).await
        }
        .boxed()
    }

    /// What the broker holds for `group`, and what the relay has yet to publish for it.
    /// The relay publishes a batch before it records its offset, so for a moment a message
    /// is both published and behind the offset. Read the other way round, every message
    /// in that moment at the first read, or published between the two, counted twice (a
    /// notes API refused a save with its queue at the limit, not past it). In this order
    /// only one published before the first read and recorded after the second counts
    /// twice, and one published and recorded between the two is missed: the estimate errs
    /// toward the shorter queue.
    fn backlog<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BusError>> {
        async move {
            let unacknowledged = within(BROKER_CALL, self.broker.lag(group, topic)).await?;
            let unpublished = sql_log::rows_behind(&self.db, RELAY_GROUP, group, topic).await?;
            Ok(unpublished + unacknowledged)
        }
        .boxed()
    }
}

/// Reads one broker partition in order and delivers it as the sql-log's lanes deliver the
/// log: a batch and its (fencing) acknowledgement in one unit of work, then the broker's
/// acknowledgement. Stops when cancelled or when the lease is lost.
pub(crate) async fn run_lane(
    shared: Arc<sql_log::Shared>,
    broker: Arc<dyn Broker>,
    partition: i64,
    stop: CancellationToken,
) {
    let spec = ReaderSpec {
        group: shared.group.to_string(),
        member: shared.member.clone(),
        topics: shared.topics.to_vec(),
        partition: u32::try_from(partition).unwrap_or_default(),
    };
    let mut outages = Outages::new(&shared.group, partition);
    while !stop.is_cancelled() {
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = within(BROKER_CALL, broker.open(spec.clone())) => opened,
        };
        let failure = match opened {
            Ok(reader) => {
                match read_partition(&shared, partition, reader, &mut outages, &stop).await {
                    Some(failure) => failure,
                    None => return,
                }
            }
            Err(error) => error,
        };
        // The reader and what it held go: a fresh one takes over what was not acknowledged.
        if outages
            .wait(
                &stop,
                &failure,
                "the broker failed; opening the partition again",
            )
            .await
        {
            return;
        }
    }
}

/// How long a call to the broker may take (a read: besides its own wait) before it is given
/// up: a connection the broker dropped may not know it for a while.
pub const BROKER_CALL: Duration = Duration::from_secs(10);

/// `call`, or an error once `limit` has passed.
pub async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(BrokerError::new(format!("no answer within {limit:?}"))))
}

/// Reads the partition through `reader` and delivers what it reads, until stopped or the
/// lease is lost (`None`), or until the broker fails (the failure).
async fn read_partition(
    shared: &Arc<sql_log::Shared>,
    partition: i64,
    mut reader: Box<dyn PartitionReader>,
    outages: &mut Outages<'_>,
    stop: &CancellationToken,
) -> Option<BrokerError> {
    let mut waiting: VecDeque<Delivery> = VecDeque::new();
    let batch = usize::try_from(shared.batch).unwrap_or(1).max(1);
    while !stop.is_cancelled() {
        if waiting.len() < batch {
            // Waits for messages only when it has none in hand.
            let wait = if waiting.is_empty() {
                READ_WAIT
            } else {
                Duration::ZERO
            };
            let read = tokio::select! {
                () = stop.cancelled() => return None,
                read = within(wait + BROKER_CALL, reader.read(batch - waiting.len(), wait)) => read,
            };
            match read {
                Ok(delivered) => waiting.extend(delivered),
                Err(error) => return Some(error),
            }
        }
        if waiting.is_empty() {
            continue;
        }
        match deliver_front(shared, partition, &waiting, batch, stop).await {
            Ok(done) => {
                outages.clear();
                let done = u64::try_from(done).unwrap_or_default();
                let mut seqs = Vec::new();
                while let Some(delivery) = waiting.pop_front_if(|delivery| delivery.seq <= done) {
                    seqs.push(delivery.seq);
                }
                // Handled and committed: a lost acknowledgement means a redelivery, which
                // the inbox makes a no-op.
                if let Err(error) = within(BROKER_CALL, reader.ack(&seqs)).await {
                    return Some(error);
                }
            }
            Err(sql_log::LaneEnd::Outage(error)) => {
                if outages.wait(stop, &error, "will try the batch again").await {
                    return None;
                }
            }
            Err(sql_log::LaneEnd::NotOwned) => {
                tracing::info!(group = %shared.group, partition, "partition lease lost");
                return None;
            }
            Err(sql_log::LaneEnd::Stopped) => return None,
        }
    }
    None
}

/// Delivers up to `batch` of the deliveries in hand, from the front, as a sql-log lane
/// delivers rows (a delivery that does not decode goes alone, to the dead letters). Returns
/// the seq up to which they are done.
async fn deliver_front(
    shared: &Arc<sql_log::Shared>,
    partition: i64,
    waiting: &VecDeque<Delivery>,
    batch: usize,
    stop: &CancellationToken,
) -> Result<i64, sql_log::LaneEnd> {
    let entries: Vec<(i64, Entry)> = waiting
        .iter()
        .take(batch)
        .map(|delivery| {
            let seq = i64::try_from(delivery.seq).unwrap_or(i64::MAX);
            (seq, entry(&delivery.body, &shared.group, &shared.names))
        })
        .collect();
    match sql_log::split_at_corrupt(entries) {
        Split::Corrupt { at, error } => {
            let body = waiting.front().map(|delivery| delivery.body.clone());
            dead_letter_undecodable(
                shared,
                partition,
                at,
                body.map(Vec::from).unwrap_or_default(),
                error,
            )
            .await
        }
        Split::Messages(entries) => sql_log::deliver(shared, partition, 0, entries, stop).await,
    }
}

/// The failures of a lane in a row, and the growing pause after each.
struct Outages<'a> {
    group: &'a str,
    partition: i64,
    count: u32,
}

impl<'a> Outages<'a> {
    fn new(group: &'a str, partition: i64) -> Self {
        Outages {
            group,
            partition,
            count: 0,
        }
    }

    /// Logs the failure and waits out its pause; true when stopped meanwhile.
    async fn wait(
        &mut self,
        stop: &CancellationToken,
        error: &(dyn std::fmt::Display + Sync),
        what: &str,
    ) -> bool {
        self.count += 1;
        let delay = crate::retry::OUTAGE.delay(self.count);
        tracing::warn!(%error, group = %self.group, partition = self.partition, ?delay, "{what}");
        sql_log::pause(stop, delay).await
    }

    fn clear(&mut self) {
        self.count = 0;
    }
}

/// Dead-letters a delivery that does not decode, as received, and checks the lease in the
/// same unit of work; the lane then acknowledges it to the broker and moves on.
async fn dead_letter_undecodable(
    shared: &Arc<sql_log::Shared>,
    partition: i64,
    seq: i64,
    body: Vec<u8>,
    error: String,
) -> Result<i64, sql_log::LaneEnd> {
    tracing::error!(group = %shared.group, partition, %error, "a message from the broker does not decode; dead-lettering it");
    let group = shared.group.clone();
    let fence = sql_log::acknowledge(shared.clone(), partition, seq);
    let written = shared
        .dispatcher
        .db
        .write(move |uow| {
            dead_letter::record_undecodable(uow, &group, &body, &error)?;
            fence(uow)
        })
        .await;
    match written {
        Ok(true) => {
            metrics::counter!(crate::metric::DEAD_LETTERED, "group" => shared.group.to_string(), "message" => "(undecodable)")
                .increment(1);
            Ok(seq)
        }
        Ok(false) => Err(sql_log::LaneEnd::NotOwned),
        Err(error) => Err(sql_log::LaneEnd::Outage(error.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            kind: Kind::Command,
            name: "notes.SaveNote".into(),
            topic: "notes.commands".into(),
            key: "k".into(),
            payload: br#"{"content":"a \"quoted\" note"}"#.to_vec(),
            headers: [("correlation-id", "c")].into_iter().collect(),
            occurred_at: 42,
        }
    }

    #[test]
    fn an_envelope_crosses_the_wire_unchanged() {
        let sent = envelope();
        let body = encode(&sent).expect("encode");
        assert_eq!(decode(&body).expect("decode"), sent);
    }

    #[test]
    fn headers_read_from_the_log_cross_the_wire_as_they_were_stored() {
        let mut sent = envelope();
        let stored = r#"{"correlation-id":"c","revision":"2"}"#;
        sent.headers = Headers::from_json(stored.to_owned()).expect("headers");
        let body = encode(&sent).expect("encode");
        let text = std::str::from_utf8(&body).expect("UTF-8");
        assert!(text.contains(&format!(r#""headers":{stored}"#)), "{text}");
        let received = decode(&body).expect("decode");
        assert_eq!(received, sent);
        assert_eq!(received.revision(), 2);
    }

    #[test]
    fn a_replay_reaches_only_its_group() {
        let mut replayed = envelope();
        replayed.headers.insert(header::ONLY_GROUP, "notes.workers");
        let body = encode(&replayed).expect("encode");
        let names = ["notes.SaveNote"];
        assert!(matches!(entry(&body, "other", &names), Entry::Skipped));
        let Entry::Message(delivered) = entry(&body, "notes.workers", &names) else {
            panic!("the group the replay is for skipped it");
        };
        assert_eq!(delivered.header(header::ONLY_GROUP), None);
    }

    #[test]
    fn the_url_names_partitions_and_namespace_and_keeps_the_rest() {
        let url = BusUrl::parse("redis://127.0.0.1:6379/2?partitions=8&protocol=resp3&namespace=x")
            .expect("parse");
        assert_eq!(
            url,
            BusUrl {
                server: "redis://127.0.0.1:6379/2?protocol=resp3".into(),
                partitions: 8,
                namespace: "x".into(),
            }
        );
        let plain = BusUrl::parse("nats://127.0.0.1").expect("parse");
        assert_eq!(plain.partitions, DEFAULT_PARTITIONS);
        assert_eq!(plain.namespace, DEFAULT_NAMESPACE);
        for bad in [
            "redis://h?partitions=0",
            "redis://h?partitions=lots",
            "nats://h?namespace=a.b",
            "nats://h?namespace=",
        ] {
            assert!(BusUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_replay_is_not_a_duplicate_of_its_original_but_a_republished_row_is() {
        let original = envelope();
        let mut replayed = original.clone();
        replayed.headers.insert(header::ONLY_GROUP, "notes.workers");
        let id = |envelope: &Envelope, position| {
            publication(envelope, position, 4)
                .expect("publication")
                .dedupe_id
        };
        assert_eq!(id(&original, 7), id(&original, 7));
        assert_ne!(id(&original, 7), id(&replayed, 9));
        assert_ne!(id(&replayed, 9), id(&replayed, 12));
    }

    #[test]
    fn a_body_that_does_not_decode_is_corrupt() {
        assert!(matches!(entry(b"not json", "g", &["x"]), Entry::Corrupt(_)));
    }

    #[test]
    fn a_payload_that_is_not_json_crosses_but_does_not_decode() {
        let mut broken = envelope();
        broken.payload = b"{\"content\":".to_vec();
        let body = encode(&broken).expect("encode");
        assert!(matches!(
            entry(&body, "g", &["notes.SaveNote"]),
            Entry::Corrupt(_)
        ));
    }
}
