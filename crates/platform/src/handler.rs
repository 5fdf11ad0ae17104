//! Message handlers and the subscriptions that group them.

use crate::db::{StoreError, UnitOfWork};
use crate::envelope::{Envelope, Message};
use crate::retry::RetryPolicy;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// Why a handler failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: a timeout, a busy database, a dependency that is down.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (a message that cannot be decoded or breaks a rule): dead-letter it now.
    #[error("{0}")]
    Permanent(String),
    /// Not the handler's failure: the store failed under it (a full disk, a busy file, a
    /// batch that did not commit) or the batch it ran in used up its time. Tried again with
    /// backoff until it can run, and never counted against the handler's attempts.
    #[error("{0}")]
    Infrastructure(String),
}

impl HandlerError {
    pub fn transient(error: impl std::fmt::Display) -> Self {
        HandlerError::Transient(error.to_string())
    }

    pub fn permanent(error: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(error.to_string())
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, HandlerError::Permanent(_))
    }

    /// Does this failure use up one of the handler's attempts?
    pub fn counts(&self) -> bool {
        !matches!(self, HandlerError::Infrastructure(_))
    }
}

/// A store error is the handler's own (transient) failure unless the store itself failed.
impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        if error.is_infrastructure() {
            HandlerError::Infrastructure(error.to_string())
        } else {
            HandlerError::transient(error)
        }
    }
}

impl From<crate::sql::Error> for HandlerError {
    fn from(error: crate::sql::Error) -> Self {
        StoreError::from(error).into()
    }
}

/// A delivered, decoded message.
#[derive(Debug)]
pub struct Incoming<M> {
    pub envelope: Arc<Envelope>,
    pub message: M,
}

/// A handler for messages of type `M`: runs inside the unit of work that also records the
/// message as handled, so its effects and the dedupe mark commit together. It runs on the
/// database's writer thread: database work only.
pub type HandlerFn<M> =
    dyn Fn(Incoming<M>, &mut UnitOfWork) -> Result<(), HandlerError> + Send + Sync;

/// A handler for several messages of type `M` at once, in log order: one call writes a
/// whole batch (a multi-row insert, say) in the unit of work that marks them all handled.
/// A failure fails them all; they are then delivered one at a time, each in a call of its
/// own, so that retries and dead letters find the one that fails.
pub type BatchHandlerFn<M> =
    dyn Fn(Vec<Incoming<M>>, &mut UnitOfWork) -> Result<(), HandlerError> + Send + Sync;

/// A type-erased handler: decodes the payloads, then calls the typed handler.
pub(crate) trait Route: Send + Sync {
    /// Handles `envelopes` (more than one only when the route `takes_batches`).
    fn handle(
        &self,
        envelopes: Vec<Arc<Envelope>>,
        uow: &mut UnitOfWork,
    ) -> Result<(), HandlerError>;

    /// Does one call take several messages?
    fn takes_batches(&self) -> bool;
}

enum Handler<M> {
    One(Box<HandlerFn<M>>),
    Batch(Box<BatchHandlerFn<M>>),
}

struct TypedRoute<M> {
    handler: Handler<M>,
    _message: PhantomData<fn() -> M>,
}

impl<M: Message> TypedRoute<M> {
    fn decode(envelope: Arc<Envelope>) -> Result<Incoming<M>, HandlerError> {
        let message =
            crate::envelope::decode::<M>(&envelope.name, envelope.revision(), &envelope.payload)
                .map_err(|error| {
                    HandlerError::permanent(format!("cannot decode {}: {error}", envelope.name))
                })?;
        Ok(Incoming { envelope, message })
    }
}

impl<M: Message> Route for TypedRoute<M> {
    fn handle(
        &self,
        envelopes: Vec<Arc<Envelope>>,
        uow: &mut UnitOfWork,
    ) -> Result<(), HandlerError> {
        match &self.handler {
            Handler::One(handler) => envelopes
                .into_iter()
                .try_for_each(|envelope| handler(Self::decode(envelope)?, uow)),
            Handler::Batch(handler) => {
                let batch = envelopes
                    .into_iter()
                    .map(Self::decode)
                    .collect::<Result<Vec<_>, _>>()?;
                handler(batch, uow)
            }
        }
    }

    fn takes_batches(&self) -> bool {
        matches!(self.handler, Handler::Batch(_))
    }
}

/// Tuning for one consumer group; the defaults suit most handlers.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Independent ordered lanes: messages with one key always share a lane. Fixed for the
    /// life of a group.
    pub partitions: u16,
    /// How long a consumer owns a partition without renewing it; a crashed consumer's
    /// partitions move to another after this long.
    pub lease: Duration,
    /// Messages read per query, and so the most handled in one unit of work.
    pub batch: u16,
    /// When a read brings fewer than `batch` messages, how long to wait for more before
    /// handling them: bigger batches for a little latency. Zero handles at once.
    pub linger: Duration,
    /// Whether a short read lingers at rest too. Without, it lingers only under load, while
    /// the writers run batches of several units: then the unit it makes would queue behind
    /// others anyway, and a fuller one saves the writer a unit. At rest (batches of one
    /// unit, or none) a message is handled at once.
    pub linger_at_rest: bool,
    pub retry: RetryPolicy,
    /// A handler still running after this long has its SQL interrupted, and its attempt
    /// counts as failed. Handlers run on the database's single writer, which renews leases
    /// too: the lease must be at least twice as long.
    pub handler_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            partitions: 4,
            lease: Duration::from_secs(10),
            batch: 64,
            linger: Duration::ZERO,
            linger_at_rest: true,
            retry: RetryPolicy::default(),
            handler_timeout: Duration::from_secs(4),
        }
    }
}

/// A consumer group and the handlers it runs, keyed by message name.
pub struct Subscription {
    pub(crate) group: String,
    pub(crate) topics: Vec<String>,
    pub(crate) routes: HashMap<&'static str, Arc<dyn Route>>,
    pub(crate) options: ConsumerOptions,
    /// Whether handled messages are marked in the inbox (see `idempotent`).
    pub(crate) inbox: bool,
}

impl Subscription {
    /// A group named `<service>.<purpose>`, e.g. `bookings.events`.
    pub fn new(group: impl Into<String>) -> Self {
        Subscription {
            group: group.into(),
            topics: Vec::new(),
            routes: HashMap::new(),
            options: ConsumerOptions::default(),
            inbox: true,
        }
    }

    /// Handles every `M` (each of `M::NAMES`) published on `M::TOPIC`.
    pub fn on<M, F>(self, handler: F) -> Self
    where
        M: Message,
        F: Fn(Incoming<M>, &mut UnitOfWork) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.route::<M>(Handler::One(Box::new(handler)))
    }

    /// Handles every `M` published on `M::TOPIC`, as many at once as a read of the log
    /// brings (up to `ConsumerOptions::batch`).
    pub fn on_batch<M, F>(self, handler: F) -> Self
    where
        M: Message,
        F: Fn(Vec<Incoming<M>>, &mut UnitOfWork) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.route::<M>(Handler::Batch(Box::new(handler)))
    }

    fn route<M: Message>(mut self, handler: Handler<M>) -> Self {
        if !self.topics.iter().any(|topic| topic == M::TOPIC) {
            self.topics.push(M::TOPIC.to_owned());
        }
        let route: Arc<dyn Route> = Arc::new(TypedRoute::<M> {
            handler,
            _message: PhantomData,
        });
        for name in M::NAMES {
            self.routes.insert(name, route.clone());
        }
        self
    }

    /// Declares the group's handlers idempotent by construction: a message's whole effect is
    /// keyed by an identity it carries (an insert that does nothing when its row exists), so
    /// a second handling changes nothing and the effect's own row is the dedupe mark. The
    /// group then writes no inbox marks, which would double the writes of a handler that
    /// inserts one row per message. Dead letters and their replay work as for any group.
    pub fn idempotent(mut self) -> Self {
        self.inbox = false;
        self
    }

    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    pub fn group(&self) -> &str {
        &self.group
    }
}
