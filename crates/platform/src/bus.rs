//! The bus port: how a process starts consuming. Publishing is not here: services emit
//! messages through their unit of work (the outbox), and only a committed message is ever
//! delivered.

use crate::db::StoreError;
use crate::handler::Subscription;
use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A statement that failed is the store's failure.
impl From<crate::sql::Error> for BusError {
    fn from(error: crate::sql::Error) -> Self {
        BusError::Store(error.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(
        "consumer group {group} has {existing} partitions; it cannot be opened with {requested}"
    )]
    PartitionMismatch {
        group: String,
        existing: i64,
        requested: i64,
    },
    #[error(
        "consumer group {group} runs elsewhere with {live}, and this process would run it with \
         {requested}: a member that lacks a handler would acknowledge those messages unhandled. \
         Stop the group's other members first, or give the new handlers a group of their own"
    )]
    SubscriptionMismatch {
        group: String,
        live: String,
        requested: String,
    },
    #[error("subscription {0} handles no messages")]
    Empty(String),
    #[error("consumer group {group}: the lease ({lease:?}) must be at least twice the handler timeout ({handler_timeout:?})")]
    LeaseTooShort {
        group: String,
        lease: std::time::Duration,
        handler_timeout: std::time::Duration,
    },
}

/// A message transport.
///
/// Contract (checked by `conformance`): every consumer group receives every message of its
/// topics at least once; consumers of one group share the work; messages with one key reach
/// a group in publication order; a message is acknowledged only after its handler's unit of
/// work committed; a failing handler is retried with backoff and then dead-lettered, and the
/// group moves on.
pub trait Bus: Send + Sync + 'static {
    /// Starts one consumer of `subscription`'s group; it runs until stopped.
    fn subscribe(&self, subscription: Subscription) -> BoxFuture<'_, Result<Consumer, BusError>>;

    /// How many messages of `topic` wait for `group`: committed and not yet handled by it,
    /// wherever they wait (the log; on a broker, the outbox and then the broker).
    fn backlog<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i64, BusError>>;
}

/// A running consumer. Dropping it aborts it at once, like a crash: messages in flight are
/// not acknowledged and will be delivered again.
pub struct Consumer {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Consumer {
    pub(crate) fn new(stop: CancellationToken, task: JoinHandle<()>) -> Self {
        Consumer {
            stop,
            task: Some(task),
        }
    }

    /// Stops taking messages, lets the message in hand finish, and hands its share of the
    /// group back.
    pub async fn stop(mut self) {
        self.stop.cancel();
        // The handle stays in `self` while awaited: if this future is dropped (a drain timeout),
        // `Drop` aborts the task instead of leaving it running.
        if let Some(task) = self.task.as_mut() {
            let _ = task.await;
        }
        self.task = None;
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
