//! `conveyor bench bus --bus URL`: messages from a unit of work to their handler through
//! Conveyor's outbox, relay and broker transport (on an embedded SQLite file), beside the
//! broker's own client doing the same work with no database, in the same run: the same
//! number of messages, producers, batch size, partitions and size of message, published
//! with the broker's confirms and acknowledged by one reader per partition. Both go through
//! the same broker, so they get its durability, which the report states: for the same
//! durability as Conveyor's commits, point it at a broker that syncs each write (Redis with
//! `appendfsync always`).

use super::progress;
use crate::config::BusAt;
use anyhow::Context;
use clap::Args;
use platform::broker::Baseline;
use platform::{
    Broker, BrokerBus, Bus, ConsumerOptions, Database, HandlerError, Incoming, Message,
    Subscription, UnitOfWork,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct BusBenchArgs {
    /// The broker: redis://…, nats://… or amqp://… (the bench uses names of its own there
    /// and deletes them after).
    #[arg(long, value_name = "URL")]
    pub bus: String,
    /// Messages per run (fewer measure the clients before they reach their pace).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Messages per unit of work, and per confirmed batch of the raw client.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
}

/// The bench's message: when it was sent, and padding to a typical event's size.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sent {
    key: String,
    sent_micros: u64,
    padding: String,
}

impl Message for Sent {
    const NAME: &'static str = "bench.Sent";
    const TOPIC: &'static str = "bench.sent";

    fn key(&self) -> String {
        self.key.clone()
    }
}

const PADDING: usize = 200;
const KEYS: usize = 64;

pub async fn bus(args: BusBenchArgs) -> anyhow::Result<()> {
    let kind = BusAt::parse(&args.bus).map_err(|error| anyhow::anyhow!(error.0))?;
    anyhow::ensure!(
        kind != BusAt::SqlLog,
        "--bus: name a broker (redis://, nats://, amqp://)"
    );
    anyhow::ensure!(
        args.batch > 0 && args.producers > 0 && args.messages >= args.batch * args.producers,
        "--messages must be at least --batch times --producers"
    );
    let namespace = format!("bench-{}", platform::uuid::Uuid::now_v7().simple());
    let separator = if args.bus.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}namespace={namespace}", args.bus);
    let bus = BusAt::parse(&url).map_err(|error| anyhow::anyhow!(error.0))?;
    let broker = crate::app::connect_broker(&bus)
        .await?
        .context("a broker bus")?;

    progress(&format!(
        "conveyor: {} messages, {} producers, units of {}, through the outbox, relay and {}",
        args.messages,
        args.producers,
        args.batch,
        bus.describe()
    ));
    let (elapsed, mut latencies, body_size) = conveyor_run(&args, broker.clone()).await?;
    let conveyor_rate = latencies.len() as f64 / elapsed.as_secs_f64();
    progress("raw client: the same work with the broker's own client and no database");
    let baseline = Baseline {
        messages: args.messages,
        batch: args.batch,
        producers: args.producers,
        partitions: broker.partitions(),
    };
    let (raw_elapsed, mut raw_latencies) = match &bus {
        BusAt::Redis(url) => transport_redis::baseline::run(url, baseline, body_size).await,
        BusAt::Nats(url) => transport_nats::baseline::run(url, baseline, body_size).await,
        BusAt::Amqp(url) => transport_amqp::baseline::run(url, baseline, body_size).await,
        BusAt::SqlLog => unreachable!("refused above"),
    }?;
    let raw_rate = raw_latencies.len() as f64 / raw_elapsed.as_secs_f64();
    let durability = match &bus {
        BusAt::Redis(url) => transport_redis::baseline::durability(url).await?,
        BusAt::Nats(_) => {
            "JetStream file storage, flushed by the server on its own schedule".into()
        }
        BusAt::Amqp(_) => "persistent messages on durable queues, confirmed once written".into(),
        BusAt::SqlLog => unreachable!("refused above"),
    };
    delete_namespace(&bus).await;

    println!(
        "{:<44} {:>12} {:>14} {:>8}  target",
        "measure", "conveyor", "raw client", "ratio"
    );
    super::row(
        "publish to handled (msg/s)",
        conveyor_rate,
        raw_rate,
        ">= 0.80",
    );
    for (label, quantile) in [("latency p50 (ms)", 0.50), ("latency p99 (ms)", 0.99)] {
        println!(
            "{label:<44} {:>12.2} {:>14.2}",
            percentile(&mut latencies, quantile),
            percentile(&mut raw_latencies, quantile)
        );
    }
    println!("broker durability (both sides): {durability}; conveyor also commits every unit and handled batch to its SQLite file, flushed to disk");
    Ok(())
}

/// The Conveyor side: producers emit in units of work on a fresh SQLite file, the relay
/// publishes, a consumer group handles. Returns the time to the last handled message, every
/// latency, and the size of a message on the wire (for the raw client's messages).
async fn conveyor_run(
    args: &BusBenchArgs,
    broker: Arc<dyn Broker>,
) -> anyhow::Result<(Duration, Vec<Duration>, usize)> {
    let dir = tempfile::tempdir()?;
    let db = Database::open(&dir.path().join("bench.db")).await?;
    let bus = BrokerBus::new(db.clone(), broker);
    let relay = bus.relay().await?;
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let (recorded, counted) = (latencies.clone(), handled.clone());
    let consumer = bus
        .subscribe(
            Subscription::new("bench.handled")
                .with_options(ConsumerOptions {
                    batch: 256,
                    ..ConsumerOptions::default()
                })
                .on(move |incoming: Incoming<Sent>, _uow: &mut UnitOfWork| {
                    let sent = Duration::from_micros(incoming.message.sent_micros);
                    let now = Duration::from_micros(
                        u64::try_from(platform::broker::now_micros()).unwrap_or(u64::MAX),
                    );
                    if let Ok(mut recorded) = recorded.lock() {
                        recorded.push(now.saturating_sub(sent));
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(())
                }),
        )
        .await?;
    let units = args.messages / args.batch / args.producers;
    let expected = units * args.batch * args.producers;
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..args.producers {
        let (db, batch) = (db.clone(), args.batch);
        producers.push(tokio::spawn(async move {
            for unit in 0..units {
                db.write(move |uow| {
                    for n in 0..batch {
                        uow.emit(&sent(producer * 7919 + unit * batch + n))?;
                    }
                    Ok::<_, platform::StoreError>(())
                })
                .await?;
            }
            Ok::<_, platform::StoreError>(())
        }));
    }
    for producer in producers {
        producer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while handled.load(Ordering::SeqCst) < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "messages were not all handled in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    consumer.stop().await;
    relay.stop().await;
    db.close().await;
    let body_size = platform::broker::encode(&sample_envelope()?)?.len();
    let latencies = std::mem::take(&mut *latencies.lock().map_err(|_| anyhow::anyhow!("lock"))?);
    Ok((elapsed, latencies, body_size))
}

fn sent(n: usize) -> Sent {
    Sent {
        key: format!("key-{}", n % KEYS),
        sent_micros: u64::try_from(platform::broker::now_micros()).unwrap_or(u64::MAX),
        padding: ".".repeat(PADDING),
    }
}

/// An envelope like those the bench sends, for its size on the wire.
fn sample_envelope() -> anyhow::Result<platform::Envelope> {
    Ok(platform::Envelope {
        id: platform::uuid::Uuid::now_v7(),
        kind: platform::Kind::Event,
        name: Sent::NAME.to_owned(),
        topic: Sent::TOPIC.to_owned(),
        key: "key-0".to_owned(),
        payload: serde_json::to_vec(&sent(0))?,
        headers: [
            ("content-type", "application/json".to_owned()),
            ("correlation-id", platform::uuid::Uuid::now_v7().to_string()),
        ]
        .into_iter()
        .collect(),
        occurred_at: 0,
    })
}

/// Deletes what the bench made on the broker (Redis streams hold nothing on disk here).
async fn delete_namespace(bus: &BusAt) {
    let deleted = match bus {
        BusAt::Nats(url) => match transport_nats::NatsBroker::connect(url).await {
            Ok(nats) => nats.delete_namespace().await,
            Err(error) => Err(error),
        },
        BusAt::Amqp(url) => match transport_amqp::AmqpBroker::connect(url).await {
            Ok(rabbit) => rabbit.delete(&["bench.handled"], Sent::TOPIC).await,
            Err(error) => Err(error),
        },
        BusAt::Redis(url) => match transport_redis::RedisBroker::connect(url).await {
            Ok(redis) => redis.delete_namespace().await,
            Err(error) => Err(error),
        },
        BusAt::SqlLog => Ok(()),
    };
    if let Err(error) = deleted {
        eprintln!("bench: could not delete the bench's names on the broker: {error}");
    }
}

/// The `quantile` of `samples`, in milliseconds.
fn percentile(samples: &mut [Duration], quantile: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let index = ((samples.len() - 1) as f64 * quantile).round() as usize;
    samples[index].as_secs_f64() * 1e3
}
