//! The RabbitMQ (AMQP 0.9.1) transport.
//!
//! Each topic is a durable topic exchange, `<namespace>.<topic>`; the relay publishes a
//! message persistent, with its partition as the routing key and its dedupe id as the
//! message id, on a channel in confirm mode, and waits for every confirm of a batch. Each
//! platform group has a durable queue per topic and partition,
//! `<namespace>.<group>.<topic>.<partition>`, bound to its partition's routing key. The
//! platform gives a partition to one consumer of the group at a time (its lease), and that
//! consumer also holds the queue exclusively while it reads it, with a prefetch of a batch.
//! A queue hands back what a consumer that went away received and did not acknowledge, in
//! its place, so the next owner reads it first: order per key holds.
//!
//! A queue exists from the first time its group joins: messages published before then do
//! not reach that group (RabbitMQ drops what no queue is bound to). The connection is made
//! again after a failure, by the publisher and by every reader, each on its next call.

pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

use futures::future::BoxFuture;
use futures::stream::SelectAll;
use futures::FutureExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use platform::broker::{
    take_ready, within, BusUrl, Delivery, PartitionReader, Publication, ReaderSpec, BROKER_CALL,
};
use platform::dead_letter::DeadLettered;
use platform::{Broker, BrokerError, Message};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Persistent messages survive a broker restart (with durable queues).
const PERSISTENT: u8 = 2;
/// Unacknowledged deliveries a reader may hold: a little more than a lane's batch.
const PREFETCH: u16 = 512;

/// The RabbitMQ of `amqp://USER:PASSWORD@HOST[:PORT]/VHOST[?partitions=N&namespace=NAME]`.
pub struct AmqpBroker {
    connector: Arc<Connector>,
    namespace: String,
    partitions: u32,
    /// The publishing channel, in confirm mode; made again after a failure.
    publisher: Mutex<Option<Channel>>,
    /// Exchanges the publisher has declared.
    declared: Mutex<HashSet<String>>,
}

/// The shared connection, made again once it has failed.
struct Connector {
    server: String,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl Connector {
    /// Forgets the connection, so that the next channel comes with a new one.
    async fn forget(&self) {
        *self.connection.lock().await = None;
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut slot = self.connection.lock().await;
        let connection = match slot.as_ref() {
            Some(connection) if connection.status().connected() => connection.clone(),
            _ => {
                let connection = Arc::new(
                    Connection::connect(&self.server, ConnectionProperties::default())
                        .await
                        .map_err(BrokerError::new)?,
                );
                *slot = Some(connection.clone());
                connection
            }
        };
        match connection.create_channel().await {
            Ok(channel) => Ok(channel),
            Err(error) => {
                // A connection the broker dropped may not know it yet: make a new one next.
                *slot = None;
                Err(BrokerError::new(error))
            }
        }
    }
}

impl AmqpBroker {
    /// Connects; a server that does not answer is an error.
    pub async fn connect(url: &str) -> Result<AmqpBroker, BrokerError> {
        let url = BusUrl::parse(url)?;
        let connector = Arc::new(Connector {
            server: url.server,
            connection: Mutex::new(None),
        });
        let broker = AmqpBroker {
            connector,
            namespace: url.namespace,
            partitions: url.partitions,
            publisher: Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
        };
        broker.ping().await?;
        Ok(broker)
    }

    /// The messages ready in `queue`, none if it is not there. A passive declare of a queue
    /// that is not there closes its channel, so each has a channel of its own.
    async fn ready_in(&self, queue: &str) -> Result<i64, BrokerError> {
        let channel = self.connector.channel().await?;
        let declared = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => {
                channel
                    .close(200, "counted")
                    .await
                    .map_err(BrokerError::new)?;
                Ok(i64::from(queue.message_count()))
            }
            Err(error) if is_not_found(&error) => Ok(0),
            Err(error) => Err(BrokerError::new(error)),
        }
    }

    pub fn exchange(&self, topic: &str) -> String {
        format!("{}.{topic}", self.namespace)
    }

    pub fn queue(&self, group: &str, topic: &str, partition: u32) -> String {
        format!("{}.{group}.{topic}.{partition}", self.namespace)
    }

    fn binding(&self, group: &str, topic: &str, partition: u32) -> Binding {
        Binding {
            exchange: self.exchange(topic),
            queue: self.queue(group, topic, partition),
            routing_key: partition.to_string(),
        }
    }

    /// The publishing channel, made (with a connection, if need be) when there is none.
    async fn publishing_channel(&self) -> Result<Channel, BrokerError> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|channel| channel.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connector.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::new)?;
        self.declared.lock().await.clear();
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// The dead-letter exchange, `<namespace>.conveyor.dead-letters` (the exchange of
    /// `DeadLettered::TOPIC`), and the queue of the same name that keeps whatever reaches
    /// it, every partition's, for RabbitMQ's own tools: no group reads it.
    pub fn dead_letters(&self) -> Binding {
        let exchange = self.exchange(DeadLettered::TOPIC);
        Binding {
            queue: exchange.clone(),
            exchange,
            routing_key: "#".to_owned(),
        }
    }

    /// Deletes the dead-letter exchange and its queue (for tests).
    pub async fn delete_dead_letters(&self) -> Result<(), BrokerError> {
        let channel = self.connector.channel().await?;
        let Binding {
            exchange, queue, ..
        } = self.dead_letters();
        channel
            .queue_delete(&queue, lapin::options::QueueDeleteOptions::default())
            .await
            .map_err(BrokerError::new)?;
        channel
            .exchange_delete(&exchange, lapin::options::ExchangeDeleteOptions::default())
            .await
            .map_err(BrokerError::new)?;
        let _ = channel.close(200, "done").await;
        Ok(())
    }

    /// Deletes the exchanges and queues of this broker's namespace for `group` and `topic`
    /// (for tests).
    pub async fn delete(&self, groups: &[&str], topic: &str) -> Result<(), BrokerError> {
        let channel = self.connector.channel().await?;
        for group in groups {
            for partition in 0..self.partitions {
                channel
                    .queue_delete(
                        &self.queue(group, topic, partition),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await
                    .map_err(BrokerError::new)?;
            }
        }
        channel
            .exchange_delete(
                &self.exchange(topic),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(BrokerError::new)?;
        let _ = channel.close(200, "done").await;
        Ok(())
    }
}

async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::new)
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(error)
        if *error.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Declares the binding's exchange and durable queue, and binds them.
async fn declare_queue(channel: &Channel, binding: &Binding) -> Result<(), BrokerError> {
    declare_exchange(channel, &binding.exchange).await?;
    channel
        .queue_declare(
            &binding.queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::new)?;
    channel
        .queue_bind(
            &binding.queue,
            &binding.exchange,
            &binding.routing_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::new)
}

impl Broker for AmqpBroker {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let channel = self.connector.channel().await?;
            channel.close(200, "ping").await.map_err(BrokerError::new)
        }
        .boxed()
    }

    fn publish<'a>(&'a self, batch: &'a [Publication]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let channel = self.publishing_channel().await?;
            let published = async {
                for publication in batch {
                    let exchange = self.exchange(&publication.topic);
                    let mut declared = self.declared.lock().await;
                    if !declared.contains(&exchange) {
                        declare_exchange(&channel, &exchange).await?;
                        if publication.topic == DeadLettered::TOPIC {
                            declare_queue(&channel, &self.dead_letters()).await?;
                        }
                        declared.insert(exchange);
                    }
                }
                let mut confirms = Vec::with_capacity(batch.len());
                for publication in batch {
                    let properties = BasicProperties::default()
                        .with_delivery_mode(PERSISTENT)
                        .with_message_id(publication.dedupe_id.as_str().into());
                    let confirm = channel
                        .basic_publish(
                            &self.exchange(&publication.topic),
                            &publication.partition.to_string(),
                            BasicPublishOptions::default(),
                            &publication.body,
                            properties,
                        )
                        .await
                        .map_err(BrokerError::new)?;
                    confirms.push(confirm);
                }
                for confirm in confirms {
                    match confirm.await.map_err(BrokerError::new)? {
                        Confirmation::Nack(_) => {
                            return Err(BrokerError::new("the broker refused a message"))
                        }
                        Confirmation::Ack(_) | Confirmation::NotRequested => {}
                    }
                }
                Ok(())
            };
            let result = within(BROKER_CALL, published).await;
            if result.is_err() {
                // The channel, even the connection, may be gone without knowing it yet: the
                // next batch opens new ones.
                *self.publisher.lock().await = None;
                self.connector.forget().await;
            }
            result
        }
        .boxed()
    }

    fn join(&self, group: &str, topics: &[String]) -> BoxFuture<'_, Result<(), BrokerError>> {
        let bindings: Vec<Binding> = topics
            .iter()
            .flat_map(|topic| (0..self.partitions).map(move |partition| (topic, partition)))
            .map(|(topic, partition)| self.binding(group, topic, partition))
            .collect();
        async move {
            let channel = self.connector.channel().await?;
            for binding in &bindings {
                declare_queue(&channel, binding).await?;
            }
            channel.close(200, "joined").await.map_err(BrokerError::new)
        }
        .boxed()
    }

    /// The messages ready in the group's queues; those a reader holds unacknowledged (at
    /// most its prefetch per partition) are not counted, as RabbitMQ does not report them
    /// on a declare. A queue not declared yet holds nothing for the group.
    fn lag<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BrokerError>> {
        async move {
            let mut lag = 0;
            for partition in 0..self.partitions {
                lag += self.ready_in(&self.queue(group, topic, partition)).await?;
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
            let queues = spec
                .topics
                .iter()
                .map(|topic| self.binding(&spec.group, topic, spec.partition))
                .collect();
            let reader = AmqpReader::consume(&self.connector, &spec.member, queues).await;
            if reader.is_err() {
                self.connector.forget().await;
            }
            Ok(Box::new(reader?) as Box<dyn PartitionReader>)
        }
        .boxed()
    }
}

/// A group's queue of one topic and partition.
/// A queue, the exchange it is bound to, and the routing key it is bound with.
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

struct AmqpReader {
    channel: Channel,
    deliveries: SelectAll<lapin::Consumer>,
    next_seq: u64,
    unacknowledged: HashMap<u64, lapin::acker::Acker>,
}

impl AmqpReader {
    /// Opens a channel, declares and binds the queues, and consumes them exclusively.
    async fn consume(
        connector: &Connector,
        member: &str,
        queues: Vec<Binding>,
    ) -> Result<AmqpReader, BrokerError> {
        let channel = connector.channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(BrokerError::new)?;
        let mut deliveries = SelectAll::new();
        for binding in &queues {
            declare_queue(&channel, binding).await?;
            let consumer = channel
                .basic_consume(
                    &binding.queue,
                    &format!("{member}-{}", binding.queue),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::new)?;
            deliveries.push(consumer);
        }
        Ok(AmqpReader {
            channel,
            deliveries,
            next_seq: 1,
            unacknowledged: HashMap::new(),
        })
    }

    fn delivered(&mut self, delivery: lapin::message::Delivery) -> Delivery {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacknowledged.insert(seq, delivery.acker);
        Delivery {
            seq,
            body: delivery.data.into(),
        }
    }
}

/// What the channel held unacknowledged goes back to its queues, in place, for the next
/// reader. Closed from a task of its own: a reader is dropped where it cannot wait.
impl Drop for AmqpReader {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.close(200, "reader closed").await;
            });
        }
    }
}

impl PartitionReader for AmqpReader {
    fn read(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            let received = take_ready(&mut self.deliveries, max, wait).await?;
            received
                .into_iter()
                .map(|delivery| Ok(self.delivered(delivery.map_err(BrokerError::new)?)))
                .collect()
        }
        .boxed()
    }

    fn ack<'a>(&'a mut self, seqs: &'a [u64]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            for seq in seqs {
                if let Some(acker) = self.unacknowledged.remove(seq) {
                    acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(BrokerError::new)?;
                }
            }
            Ok(())
        }
        .boxed()
    }
}
