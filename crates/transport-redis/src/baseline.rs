//! The raw-client baseline of `conveyor bench bus`: `XADD`s in one `MULTI` per batch, and a
//! reader per partition stream (`XREADGROUP … BLOCK`, `XACK`), with no database at all.

use platform::broker::{Baseline, BusUrl};
use platform::BrokerError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How durable the Redis of `url` makes a write (its `appendonly` and `appendfsync`): the
/// raw client's messages are as durable as that, Conveyor's also commit to its database.
pub async fn durability(url: &str) -> Result<String, BrokerError> {
    let server = BusUrl::parse(url)?.server;
    let client = redis::Client::open(server.as_str()).map_err(BrokerError::new)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(BrokerError::new)?;
    let mut settings = Vec::new();
    for setting in ["appendonly", "appendfsync"] {
        let (name, value): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg(setting)
            .query_async(&mut conn)
            .await
            .map_err(BrokerError::new)?;
        settings.push(format!("{name} {value}"));
    }
    Ok(settings.join(", "))
}

/// Runs the baseline against the Redis of `url`, in streams of its own that it deletes
/// after; returns how long it took and every message's latency.
pub async fn run(
    url: &str,
    baseline: Baseline,
    body_size: usize,
) -> Result<(Duration, Vec<Duration>), BrokerError> {
    let server = BusUrl::parse(url)?.server;
    let client = redis::Client::open(server.as_str()).map_err(BrokerError::new)?;
    let namespace = format!("conveyor-bench-raw-{}", platform::uuid::Uuid::now_v7());
    let streams: Vec<String> = (0..baseline.partitions)
        .map(|partition| format!("{namespace}:{partition}"))
        .collect();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(BrokerError::new)?;
    for stream in &streams {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg("raw")
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::new)?;
    }
    let received = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for stream in streams.clone() {
        let (client, received) = (client.clone(), received.clone());
        readers.push(tokio::spawn(async move {
            read(client, stream, baseline, received).await
        }));
    }
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..baseline.producers {
        let (mut conn, streams) = (conn.clone(), streams.clone());
        producers.push(tokio::spawn(async move {
            let batches = baseline.batches_per_producer();
            for n in 0..batches {
                let mut pipe = redis::pipe();
                pipe.atomic();
                let stream = &streams[(producer + n) % streams.len()];
                for _ in 0..baseline.batch {
                    pipe.cmd("XADD")
                        .arg(stream)
                        .arg("*")
                        .arg("m")
                        .arg(Baseline::body(body_size))
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(BrokerError::new)?;
            }
            Ok::<_, BrokerError>(())
        }));
    }
    let (elapsed, latencies) = Baseline::finish(started, producers, readers).await?;
    redis::cmd("DEL")
        .arg(&streams)
        .query_async::<()>(&mut conn)
        .await
        .map_err(BrokerError::new)?;
    Ok((elapsed, latencies))
}

async fn read(
    client: redis::Client,
    stream: String,
    baseline: Baseline,
    received: Arc<AtomicUsize>,
) -> Result<Vec<Duration>, BrokerError> {
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(BrokerError::new)?;
    let expected = baseline.expected();
    let mut latencies = Vec::new();
    while received.load(Ordering::SeqCst) < expected {
        let options = redis::streams::StreamReadOptions::default()
            .group("raw", "reader")
            .count(baseline.batch)
            .block(100);
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .map_err(BrokerError::new)?;
        let Some(reply) = reply else { continue };
        let mut ids = Vec::new();
        for entry in reply.keys.into_iter().flat_map(|key| key.ids) {
            if let Some(body) = entry
                .map
                .get("m")
                .and_then(|value| redis::from_redis_value::<Vec<u8>>(value).ok())
            {
                latencies.push(Baseline::latency(&body));
            }
            ids.push(entry.id);
        }
        if ids.is_empty() {
            continue;
        }
        received.fetch_add(ids.len(), Ordering::SeqCst);
        redis::cmd("XACK")
            .arg(&stream)
            .arg("raw")
            .arg(ids)
            .query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::new)?;
    }
    Ok(latencies)
}
