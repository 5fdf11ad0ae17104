//! The NATS JetStream transport.
//!
//! Each topic is a stream, `<namespace>_<topic>` (dots made underscores), of the subjects
//! `<namespace>.<topic>.<partition>`. The relay publishes a batch without waiting between
//! messages, then waits for every acknowledgement (JetStream's confirm), each message with
//! its envelope id as `Nats-Msg-Id`, so the stream drops a republished duplicate within its
//! window. Each platform group reads each partition through a durable pull consumer,
//! `<group>-<partition>`, filtered to the partition's subject; the platform gives the
//! partition to one consumer of the group at a time (its lease).
//!
//! Taking a partition over, a reader recreates its durable consumer from the stream
//! sequence after the old one's acknowledgement floor: what the earlier owner received and
//! did not acknowledge comes first, in order, rather than after JetStream's acknowledgement
//! timeout. Acknowledgements are sent in order, one per batch (its last message, under
//! `AckPolicy::All`), so the floor is where the partition is. A reader keeps each
//! consumer's pull open, with the next messages on the way while the lane handles some.
//! Works with nats-server 2.9 (no account queries, no 2.10 consumer fields).

pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

use async_nats::jetstream::context::{self, ConsumerInfoErrorKind};
use async_nats::jetstream::{self, consumer, stream, ErrorCode};
use async_nats::{HeaderMap, Subject};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use platform::broker::{take_ready, BusUrl, Delivery, PartitionReader, Publication, ReaderSpec};
use platform::{Broker, BrokerError};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Messages each consumer pulls at a time, and keeps on the way.
const BATCH: usize = 256;
/// How long a received message may stay unacknowledged before JetStream sends it again:
/// longer than a handler's retries, so that only a reader that died leaves messages behind.
const ACK_WAIT: Duration = Duration::from_secs(300);

/// The JetStream of `nats://HOST[:PORT][?partitions=N&namespace=NAME]`.
pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    namespace: String,
    partitions: u32,
    /// Topics whose stream this process has made sure of.
    streams: Mutex<HashSet<String>>,
}

impl NatsBroker {
    /// Connects; a server that does not answer is an error. The client reconnects by itself
    /// afterwards.
    pub async fn connect(url: &str) -> Result<NatsBroker, BrokerError> {
        let url = BusUrl::parse(url)?;
        let client = async_nats::connect(url.server.as_str())
            .await
            .map_err(BrokerError::new)?;
        Ok(NatsBroker {
            jetstream: jetstream::new(client.clone()),
            client,
            namespace: url.namespace,
            partitions: url.partitions,
            streams: Mutex::default(),
        })
    }

    /// The stream of `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        format!("{}_{}", self.namespace, topic.replace('.', "_"))
    }

    fn subject(&self, topic: &str, partition: u32) -> String {
        format!("{}.{topic}.{partition}", self.namespace)
    }

    fn consumer_name(group: &str, partition: u32) -> String {
        format!("{}-{partition}", group.replace('.', "_"))
    }

    /// Creates `topic`'s stream unless this process already did.
    async fn stream(&self, topic: &str) -> Result<stream::Stream, BrokerError> {
        let stream = self
            .jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream_name(topic),
                subjects: vec![format!("{}.{topic}.*", self.namespace)],
                storage: stream::StorageType::File,
                ..stream::Config::default()
            })
            .await
            .map_err(BrokerError::new)?;
        if let Ok(mut known) = self.streams.lock() {
            known.insert(topic.to_owned());
        }
        Ok(stream)
    }

    fn knows(&self, topic: &str) -> bool {
        self.streams
            .lock()
            .map(|known| known.contains(topic))
            .unwrap_or(false)
    }

    /// Makes `group` read every partition of `topic` from the start again, as if it had
    /// acknowledged nothing (for tests of redelivery).
    pub async fn rewind(&self, group: &str, topic: &str) -> Result<(), BrokerError> {
        let stream = self.stream(topic).await?;
        for partition in 0..self.partitions {
            // A consumer that is not there has nothing to forget.
            let _ = stream
                .delete_consumer(&Self::consumer_name(group, partition))
                .await;
        }
        Ok(())
    }

    /// Deletes the streams of this broker's namespace (for tests).
    pub async fn delete_namespace(&self) -> Result<(), BrokerError> {
        let prefix = format!("{}_", self.namespace);
        let names: Vec<String> = self
            .jetstream
            .stream_names()
            .filter_map(|name| async move { name.ok() })
            .collect()
            .await;
        for name in names.into_iter().filter(|name| name.starts_with(&prefix)) {
            self.jetstream
                .delete_stream(&name)
                .await
                .map_err(BrokerError::new)?;
        }
        Ok(())
    }
}

impl Broker for NatsBroker {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.client.flush().await.map_err(BrokerError::new) }.boxed()
    }

    fn publish<'a>(&'a self, batch: &'a [Publication]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            for publication in batch {
                if !self.knows(&publication.topic) {
                    self.stream(&publication.topic).await?;
                }
            }
            let mut confirms = Vec::with_capacity(batch.len());
            // A batch goes to a few subjects: each is spelled once.
            let mut subjects: HashMap<(&str, u32), Subject> = HashMap::new();
            for publication in batch {
                let mut headers = HeaderMap::new();
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    publication.dedupe_id.as_str(),
                );
                let subject = subjects
                    .entry((&publication.topic, publication.partition))
                    .or_insert_with(|| {
                        Subject::from(self.subject(&publication.topic, publication.partition))
                    })
                    .clone();
                let confirm = self
                    .jetstream
                    .publish_with_headers(subject, headers, publication.body.clone())
                    .await
                    .map_err(BrokerError::new)?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                confirm.await.map_err(BrokerError::new)?;
            }
            Ok(())
        }
        .boxed()
    }

    fn lag<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BrokerError>> {
        async move {
            let stream = match self.jetstream.get_stream(self.stream_name(topic)).await {
                Ok(stream) => stream,
                Err(error) if is_stream_not_found(&error) => return Ok(0),
                Err(error) => return Err(BrokerError::new(error)),
            };
            let mut lag = 0;
            for partition in 0..self.partitions {
                let consumer = Self::consumer_name(group, partition);
                lag += match stream.consumer_info(&consumer).await {
                    Ok(info) => {
                        i64::try_from(info.num_pending).unwrap_or(i64::MAX)
                            + i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX)
                    }
                    // No reader has opened the partition yet: its first reads from the start.
                    Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                        messages_on(&stream, &self.subject(topic, partition)).await?
                    }
                    Err(error) => return Err(BrokerError::new(error)),
                };
            }
            Ok(lag)
        }
        .boxed()
    }

    fn open(
        &self,
        spec: ReaderSpec,
    ) -> BoxFuture<'_, Result<Box<dyn PartitionReader>, BrokerError>> {
        async move {
            let mut partitions = Vec::with_capacity(spec.topics.len());
            for topic in &spec.topics {
                partitions.push(Partition {
                    stream: self.stream(topic).await?,
                    consumer_name: Self::consumer_name(&spec.group, spec.partition),
                    subject: self.subject(topic, spec.partition),
                });
            }
            let mut reader = NatsReader {
                partitions,
                messages: SelectAll::new(),
                next_seq: 1,
                unacknowledged: HashMap::new(),
            };
            reader.take_over().await?;
            Ok(Box::new(reader) as Box<dyn PartitionReader>)
        }
        .boxed()
    }
}

fn is_stream_not_found(error: &context::GetStreamError) -> bool {
    matches!(error.kind(), context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// How many messages `stream` holds on `subject`.
async fn messages_on(stream: &stream::Stream, subject: &str) -> Result<i64, BrokerError> {
    let mut subjects = stream
        .info_with_subjects(subject)
        .await
        .map_err(BrokerError::new)?;
    let mut count = 0;
    while let Some(entry) = subjects.next().await {
        let (_, messages) = entry.map_err(BrokerError::new)?;
        count += i64::try_from(messages).unwrap_or(i64::MAX);
    }
    Ok(count)
}

/// One partition of one of a group's topics.
struct Partition {
    stream: stream::Stream,
    consumer_name: String,
    subject: String,
}

/// The durable consumer `name` of `subject`, made afresh from after its acknowledgement
/// floor: what its earlier owner received and did not acknowledge is delivered again, first.
async fn take_over(
    stream: &stream::Stream,
    name: &str,
    subject: String,
) -> Result<consumer::PullConsumer, BrokerError> {
    let deliver_policy = match stream.consumer_info(name).await {
        Ok(info) => {
            stream
                .delete_consumer(name)
                .await
                .map_err(BrokerError::new)?;
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: info.ack_floor.stream_sequence + 1,
            }
        }
        Err(_) => consumer::DeliverPolicy::All,
    };
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subject,
            deliver_policy,
            // A reader acknowledges in order, so acknowledging the last message of a batch
            // acknowledges the batch: one acknowledgement instead of one per message.
            ack_policy: consumer::AckPolicy::All,
            ack_wait: ACK_WAIT,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(BrokerError::new)
}

/// What a reader receives: the consumer (by index) and the message, or why it failed.
type Received = (
    usize,
    Result<jetstream::Message, consumer::pull::MessagesError>,
);

struct NatsReader {
    partitions: Vec<Partition>,
    /// The partitions' consumers' messages, as they come: each consumer keeps a pull open
    /// and its next batch on the way while the lane handles one.
    messages: SelectAll<BoxStream<'static, Received>>,
    next_seq: u64,
    /// Each delivery not acknowledged yet, and the consumer (by index) it came from.
    unacknowledged: HashMap<u64, (usize, jetstream::Message)>,
}

impl NatsReader {
    /// Makes the partitions' consumers afresh from their acknowledgement floors and starts
    /// their message streams.
    async fn take_over(&mut self) -> Result<(), BrokerError> {
        let mut messages = SelectAll::new();
        for (index, partition) in self.partitions.iter().enumerate() {
            let consumer = take_over(
                &partition.stream,
                &partition.consumer_name,
                partition.subject.clone(),
            )
            .await?;
            let stream = consumer
                .stream()
                .max_messages_per_batch(BATCH)
                .messages()
                .await
                .map_err(BrokerError::new)?;
            messages.push(stream.map(move |message| (index, message)).boxed());
        }
        self.messages = messages;
        Ok(())
    }

    fn delivered(&mut self, (consumer, message): Received) -> Result<Delivery, BrokerError> {
        let message = message.map_err(BrokerError::new)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let delivery = Delivery {
            seq,
            body: message.payload.clone(),
        };
        self.unacknowledged.insert(seq, (consumer, message));
        Ok(delivery)
    }
}

impl PartitionReader for NatsReader {
    fn read(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            let received = take_ready(&mut self.messages, max, wait).await?;
            received
                .into_iter()
                .map(|received| self.delivered(received))
                .collect()
        }
        .boxed()
    }

    fn ack<'a>(&'a mut self, seqs: &'a [u64]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            // The newest of each consumer's acknowledges the ones before it.
            let mut newest: HashMap<usize, (u64, jetstream::Message)> = HashMap::new();
            for seq in seqs {
                if let Some((consumer, message)) = self.unacknowledged.remove(seq) {
                    let replaces = newest
                        .get(&consumer)
                        .is_none_or(|(newest_seq, _)| newest_seq < seq);
                    if replaces {
                        newest.insert(consumer, (*seq, message));
                    }
                }
            }
            for (_, message) in newest.into_values() {
                message.ack().await.map_err(BrokerError::new)?;
            }
            Ok(())
        }
        .boxed()
    }
}
