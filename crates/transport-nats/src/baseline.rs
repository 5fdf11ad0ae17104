//! The raw-client baseline of `conveyor bench bus`: JetStream publishes awaited a batch at a
//! time, and a durable pull consumer per partition subject fetching and acknowledging, with
//! no database at all. Each publish carries a `Nats-Msg-Id`, as the transport's do: the
//! stream's duplicate detection is part of the work the transport is asked to do.

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use platform::broker::{Baseline, BusUrl};
use platform::BrokerError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs the baseline against the NATS of `url`, on a stream of its own that it deletes
/// after; returns how long it took and every message's latency.
pub async fn run(
    url: &str,
    baseline: Baseline,
    body_size: usize,
) -> Result<(Duration, Vec<Duration>), BrokerError> {
    let server = BusUrl::parse(url)?.server;
    let client = async_nats::connect(server.as_str())
        .await
        .map_err(BrokerError::new)?;
    let context = jetstream::new(client);
    let name = format!("bench_raw_{}", platform::uuid::Uuid::now_v7().simple());
    let stream = context
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.*")],
            storage: stream::StorageType::File,
            ..stream::Config::default()
        })
        .await
        .map_err(BrokerError::new)?;
    let expected = baseline.expected();
    let received = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for partition in 0..baseline.partitions {
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("raw-{partition}")),
                filter_subject: format!("{name}.{partition}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ..consumer::pull::Config::default()
            })
            .await
            .map_err(BrokerError::new)?;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while received.load(Ordering::SeqCst) < expected {
                let mut messages = consumer
                    .batch()
                    .max_messages(baseline.batch)
                    .expires(Duration::from_millis(100))
                    .messages()
                    .await
                    .map_err(BrokerError::new)?;
                while let Some(message) = messages.next().await {
                    let message = message.map_err(BrokerError::new)?;
                    latencies.push(Baseline::latency(&message.payload));
                    message.ack().await.map_err(BrokerError::new)?;
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok::<_, BrokerError>(latencies)
        }));
    }
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..baseline.producers {
        let (context, name) = (context.clone(), name.clone());
        producers.push(tokio::spawn(async move {
            let batches = baseline.batches_per_producer();
            let partitions = usize::try_from(baseline.partitions).unwrap_or(1);
            for n in 0..batches {
                let subject = format!("{name}.{}", (producer + n) % partitions);
                let mut confirms = Vec::with_capacity(baseline.batch);
                for _ in 0..baseline.batch {
                    let mut headers = HeaderMap::new();
                    let id = platform::uuid::Uuid::now_v7().to_string();
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                    confirms.push(
                        context
                            .publish_with_headers(
                                subject.clone(),
                                headers,
                                Baseline::body(body_size).into(),
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
    context
        .delete_stream(&name)
        .await
        .map_err(BrokerError::new)?;
    Ok((elapsed, latencies))
}
