//! A running process: the services of its settings, composed.

use crate::config::{BusAt, CacheAt, DatabaseAt, Role, Settings};
use anyhow::Context;
use cache::Cache;
use edge::{HttpOptions, ServiceContext, ServiceModule};
use platform::{BrokerBus, Bus, Consumer, Database, SqlLog};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for in-flight requests and handlers.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Every service this binary can run. Nothing else lists them.
pub static SERVICES: &[ServiceModule] = &[
    events::MODULE,
    bookings::MODULE,
    notes::MODULE,
    matches::MODULE,
    matches::QUERY_MODULE,
];

pub struct Application {
    settings: Settings,
    db: Database,
    transport: Transport,
    context: ServiceContext,
    listeners: Vec<TcpListener>,
    addresses: Vec<SocketAddr>,
}

impl Application {
    /// Opens and migrates the database and binds the HTTP listeners; serves nothing yet.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        // Metrics registered before the recorder exists would go nowhere.
        edge::metrics();
        let db = open_database(&settings).await?;
        let transport = Transport::open(&settings.bus, &db).await?;
        let context = ServiceContext {
            db: db.clone(),
            bus: transport.bus(),
            cache: open_cache(&settings).await?,
            workers: settings.workers.clone(),
            snapshots: settings.snapshots,
        };
        let mut listeners = Vec::new();
        let mut addresses = Vec::new();
        for address in &settings.http {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?;
            addresses.push(listener.local_addr()?);
            listeners.push(listener);
        }
        Ok(Application {
            settings,
            db,
            transport,
            context,
            listeners,
            addresses,
        })
    }

    /// The bound addresses (useful with port 0).
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Serves until `shutdown` is cancelled, then stops taking requests and messages, lets
    /// those in flight finish (up to `DRAIN_TIMEOUT`) and commits what is queued.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let background = CancellationToken::new();
        // Every role writes, so every process relays what it writes.
        let relay = self.transport.relay().await?;
        let mut consumers = if self.settings.role == Role::Api {
            self.transport
                .join_groups(&self.settings, &self.context)
                .await?;
            Vec::new()
        } else {
            let consumers =
                start_consumers(&self.settings, &self.context, &*self.context.bus).await?;
            // After the groups joined, so that retention knows what each of them reads.
            tokio::spawn(platform::retention::run(
                self.db.clone(),
                self.settings.retention,
                background.clone(),
            ));
            if let Some(broker) = self.transport.broker() {
                tokio::spawn(platform::retention::run_on_broker(
                    broker,
                    self.settings.retention,
                    background.clone(),
                ));
            }
            consumers
        };
        // Stopped last, so that it publishes what the consumers' last units emitted.
        consumers.extend(relay);
        let apis = if self.settings.role == Role::Workers {
            Vec::new()
        } else {
            self.settings
                .services
                .iter()
                .map(|service| (service.routes)(&self.context))
                .collect()
        };
        let options = HttpOptions {
            body_limit: self.settings.body_limit,
            cors_origins: self
                .settings
                .cors_origins
                .iter()
                .map(|origin| origin.parse())
                .collect::<Result<_, _>>()
                .context("a CORS origin is not a valid header value")?,
            request_timeout: self.settings.request_timeout,
            broker: self.transport.broker(),
        };
        let router = edge::router(apis, self.db.clone(), &options);
        let servers = TaskTracker::new();
        for listener in self.listeners {
            let (router, stop) = (router.clone(), shutdown.clone());
            servers.spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "HTTP server failed");
                }
            });
        }
        servers.close();
        tracing::info!(addresses = ?self.addresses, services = ?self.settings.services.iter().map(|s| s.name).collect::<Vec<_>>(), role = ?self.settings.role, "serving");
        tracing::info!(config = %self.settings.render(), "effective configuration");
        let failure = tokio::select! {
            () = shutdown.cancelled() => None,
            reason = self.db.failed() => Some(reason),
        };
        if let Some(reason) = &failure {
            tracing::error!(%reason, "the database cannot take writes; stopping so a restart recovers from what is on disk");
            shutdown.cancel();
        }
        background.cancel();
        tracing::info!("shutting down: draining requests and handlers");
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            servers.wait().await;
            for consumer in consumers {
                consumer.stop().await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("drain timed out; unfinished work will be redelivered");
        }
        self.db.close().await;
        if let Some(reason) = failure {
            anyhow::bail!("stopped because the database failed: {reason}");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the database and applies the selected services' migrations.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Database> {
    settings.prepare_data_dir()?;
    let db = match &settings.database {
        DatabaseAt::Sqlite(file) => Database::open(file).await?,
        DatabaseAt::Server(url) => Database::connect(url).await?,
    };
    for service in &settings.services {
        db.migrate(service.migrations)
            .await
            .with_context(|| format!("migrating {}", service.name))?;
    }
    Ok(db)
}

/// The read cache of the settings, its keys scoped by the database (deployments sharing a
/// Redis keep apart, processes sharing a database share); a Redis that does not answer
/// stops the start.
async fn open_cache(settings: &Settings) -> anyhow::Result<Cache> {
    let cache = match &settings.cache {
        CacheAt::Local => Cache::local(settings.cache_ttl),
        CacheAt::Redis(url) => Cache::redis(url, settings.cache_ttl).await?,
    };
    Ok(cache.scoped(&settings.database.describe()))
}

/// The broker `bus` names, connected (none for the sql-log); one that does not answer is an
/// error.
pub async fn connect_broker(bus: &BusAt) -> anyhow::Result<Option<Arc<dyn platform::Broker>>> {
    let connected: Result<Arc<dyn platform::Broker>, platform::BrokerError> = match bus {
        BusAt::SqlLog => return Ok(None),
        BusAt::Redis(url) => transport_redis::RedisBroker::connect(url)
            .await
            .map(|broker| Arc::new(broker) as _),
        BusAt::Nats(url) => transport_nats::NatsBroker::connect(url)
            .await
            .map(|broker| Arc::new(broker) as _),
        BusAt::Amqp(url) => transport_amqp::AmqpBroker::connect(url)
            .await
            .map(|broker| Arc::new(broker) as _),
    };
    let broker =
        connected.with_context(|| format!("connecting to the bus at {}", bus.describe()))?;
    Ok(Some(broker))
}

/// The transport of `--bus`.
enum Transport {
    SqlLog(Arc<SqlLog>),
    /// A broker, fed by the relay of the database's log.
    Broker(Arc<BrokerBus>),
}

impl Transport {
    /// Connects to the broker, if the settings name one; one that does not answer stops
    /// the start.
    async fn open(bus: &BusAt, db: &Database) -> anyhow::Result<Transport> {
        Ok(match connect_broker(bus).await? {
            None => Transport::SqlLog(Arc::new(SqlLog::new(db.clone()))),
            Some(broker) => Transport::Broker(Arc::new(BrokerBus::new(db.clone(), broker))),
        })
    }

    fn broker(&self) -> Option<Arc<dyn platform::Broker>> {
        match self {
            Transport::SqlLog(_) => None,
            Transport::Broker(bus) => Some(bus.broker().clone()),
        }
    }

    fn bus(&self) -> Arc<dyn Bus> {
        match self {
            Transport::SqlLog(bus) => bus.clone(),
            Transport::Broker(bus) => bus.clone(),
        }
    }

    /// Makes the broker keep what is sent to the groups of `settings`' services before any
    /// of their consumers ran (see `BrokerBus::join`); nothing to do on the sql-log.
    async fn join_groups(
        &self,
        settings: &Settings,
        context: &ServiceContext,
    ) -> anyhow::Result<()> {
        let Transport::Broker(bus) = self else {
            return Ok(());
        };
        for service in &settings.services {
            for subscription in (service.subscriptions)(context) {
                bus.join(&subscription)
                    .await
                    .with_context(|| format!("joining {} on the broker", subscription.group()))?;
            }
        }
        Ok(())
    }

    /// Starts relaying the log to the broker (nothing to do on the sql-log).
    async fn relay(&self) -> anyhow::Result<Option<Consumer>> {
        match self {
            Transport::SqlLog(_) => Ok(None),
            Transport::Broker(bus) => Ok(Some(
                bus.relay().await.context("starting the outbox relay")?,
            )),
        }
    }
}

async fn start_consumers(
    settings: &Settings,
    context: &ServiceContext,
    bus: &dyn Bus,
) -> anyhow::Result<Vec<Consumer>> {
    let mut consumers = Vec::new();
    for service in &settings.services {
        let mut subscriptions = (service.subscriptions)(context);
        for projection in (service.projections)() {
            projection
                .register(&context.db)
                .await
                .with_context(|| format!("registering projection {}", projection.name()))?;
            subscriptions.push(projection.subscription());
        }
        for subscription in subscriptions {
            let group = subscription.group().to_owned();
            let consumer = bus
                .subscribe(subscription)
                .await
                .with_context(|| format!("subscribing {group}"))?;
            consumers.push(consumer);
        }
    }
    Ok(consumers)
}
