//! The raw-client baseline of `conveyor bench bus`: persistent messages published with
//! confirms awaited a batch at a time, and a consumer per partition queue acknowledging
//! each, with no database at all.

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use platform::broker::{Baseline, BusUrl};
use platform::BrokerError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs the baseline against the RabbitMQ of `url`, on an exchange and queues of its own
/// that it deletes after; returns how long it took and every message's latency.
pub async fn run(
    url: &str,
    baseline: Baseline,
    body_size: usize,
) -> Result<(Duration, Vec<Duration>), BrokerError> {
    let server = BusUrl::parse(url)?.server;
    let connection = Connection::connect(&server, ConnectionProperties::default())
        .await
        .map_err(BrokerError::new)?;
    let setup = connection
        .create_channel()
        .await
        .map_err(BrokerError::new)?;
    let exchange = format!("bench-raw-{}", platform::uuid::Uuid::now_v7().simple());
    let expected = baseline.expected();
    let received = Arc::new(AtomicUsize::new(0));
    let mut queues = Vec::new();
    let mut readers = Vec::new();
    for partition in 0..baseline.partitions {
        let queue = format!("{exchange}.{partition}");
        crate::declare_queue(
            &setup,
            &crate::Binding {
                exchange: exchange.clone(),
                queue: queue.clone(),
                routing_key: partition.to_string(),
            },
        )
        .await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::new)?;
        channel
            .basic_qos(512, BasicQosOptions::default())
            .await
            .map_err(BrokerError::new)?;
        let mut consumer = channel
            .basic_consume(
                &queue,
                "raw",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::new)?;
        queues.push(queue);
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while received.load(Ordering::SeqCst) < expected {
                let Ok(Some(delivery)) =
                    tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
                else {
                    continue;
                };
                let delivery = delivery.map_err(BrokerError::new)?;
                latencies.push(Baseline::latency(&delivery.data));
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BrokerError::new)?;
                received.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, BrokerError>(latencies)
        }));
    }
    let connection = Arc::new(connection);
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..baseline.producers {
        let (connection, exchange) = (connection.clone(), exchange.clone());
        producers.push(tokio::spawn(async move {
            let channel = connection
                .create_channel()
                .await
                .map_err(BrokerError::new)?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(BrokerError::new)?;
            let batches = baseline.batches_per_producer();
            let partitions = usize::try_from(baseline.partitions).unwrap_or(1);
            for n in 0..batches {
                let routing_key = ((producer + n) % partitions).to_string();
                let mut confirms = Vec::with_capacity(baseline.batch);
                for _ in 0..baseline.batch {
                    confirms.push(
                        channel
                            .basic_publish(
                                &exchange,
                                &routing_key,
                                BasicPublishOptions::default(),
                                &Baseline::body(body_size),
                                BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                            .map_err(BrokerError::new)?,
                    );
                }
                for confirm in confirms {
                    confirm.await.map_err(BrokerError::new)?;
                }
            }
            Ok::<_, BrokerError>(())
        }));
    }
    let (elapsed, latencies) = Baseline::finish(started, producers, readers).await?;
    for queue in &queues {
        setup
            .queue_delete(queue, QueueDeleteOptions::default())
            .await
            .map_err(BrokerError::new)?;
    }
    setup
        .exchange_delete(&exchange, ExchangeDeleteOptions::default())
        .await
        .map_err(BrokerError::new)?;
    Ok((elapsed, latencies))
}
