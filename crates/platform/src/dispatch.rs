//! The middleware every delivered message goes through, whatever the transport:
//! routing by name, a tracing span, the inbox check, retries with backoff, dead-lettering
//! and metrics.

use crate::context::CausalContext;
use crate::db::{Database, StoreError, UnitOfWork};
use crate::dead_letter;
use crate::dead_letter::Announce;
use crate::envelope::Envelope;
use crate::handler::{HandlerError, Route};
use crate::inbox;
use crate::retry::{self, RetryPolicy};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Metric names, labelled by `group` and `message`.
pub mod metric {
    pub const HANDLED: &str = "conveyor_handler_handled_total";
    pub const FAILED: &str = "conveyor_handler_failed_total";
    pub const RETRIED: &str = "conveyor_handler_retried_total";
    pub const DEAD_LETTERED: &str = "conveyor_handler_dead_lettered_total";
    pub const DURATION: &str = "conveyor_handler_duration_seconds";
    /// Labelled by `group` and `partition`: 0 when the partition has caught up with the log,
    /// else how far the log head is past its offset (an upper bound on its backlog).
    pub const CONSUMER_LAG: &str = "conveyor_consumer_lag";
    /// Labelled by `group`: messages handled by each batch that committed (histogram).
    pub const BATCH_MESSAGES: &str = "conveyor_handler_batch_messages";
    /// Labelled by `group`: time from handing a batch to the writer to its commit
    /// (histogram), the write latency of a worker.
    pub const BATCH_SECONDS: &str = "conveyor_handler_batch_seconds";
}

/// How long to wait before trying again to write a dead letter the database refused.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

pub(crate) enum Outcome {
    /// Handled, skipped as a duplicate, not for this group, or dead-lettered: acknowledge it.
    Done,
    /// Stopped while retrying: do not acknowledge, it will be delivered again.
    Stopped,
}

pub(crate) struct Dispatcher {
    pub db: Database,
    pub group: Arc<str>,
    pub routes: HashMap<&'static str, Arc<dyn Route>>,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    /// Mark handled messages in the inbox (false for an idempotent subscription).
    pub inbox: bool,
    /// Whether what the group gives up on is also published (`dead_letter::DeadLettered`).
    pub announce: Announce,
}

impl Dispatcher {
    /// Delivers one message, retrying it until it is handled or dead-lettered. `failed` is a
    /// first attempt that already failed (in a batch), counted against the attempts.
    pub async fn deliver(
        &self,
        envelope: Arc<Envelope>,
        failed: Option<HandlerError>,
        stop: &CancellationToken,
    ) -> Outcome {
        let Some(route) = self.routes.get(envelope.name.as_str()).cloned() else {
            return Outcome::Done;
        };
        let span = message_span(&self.group, &envelope);
        self.deliver_with_retries(route, envelope, failed, stop)
            .instrument(span)
            .await
    }

    /// Handles a whole batch in one unit of work that also runs `acknowledge`, the transport's
    /// acknowledgement. Any failure rolls all of it back: then deliver the messages one by
    /// one, with retries.
    pub async fn deliver_batch<A>(&self, batch: &[Arc<Envelope>], acknowledge: A) -> BatchOutcome
    where
        A: Fn(&mut UnitOfWork) -> Result<bool, StoreError> + Send + Sync + 'static,
    {
        let runs = runs(batch, &self.routes);
        // How many messages of each name, for the metrics: one update per name, not per
        // message, which in a batch of hundreds cost more than reading them.
        let mut names: Vec<(String, u64)> = Vec::new();
        for envelope in runs.iter().flat_map(|run| &run.envelopes) {
            match names.iter_mut().find(|(name, _)| *name == envelope.name) {
                Some((_, count)) => *count += 1,
                None => names.push((envelope.name.clone(), 1)),
            }
        }
        let handled: u64 = names.iter().map(|(_, count)| count).sum();
        let (group, inbox) = (self.group.clone(), self.inbox);
        let started = Instant::now();
        let timeout = self.timeout;
        let written = self
            .db
            .write(move |uow| {
                // The whole batch shares one handler's time: it holds the single writer. The
                // first handler has all of it, so only a later one is ever cut short by the
                // batch rather than by its own limit.
                let batch_ends = Instant::now() + timeout;
                let all = runs.iter().flat_map(|run| &run.envelopes);
                let mut claimed = claim(uow, &group, inbox, all).map_err(StoreError::from)?;
                for (nth, run) in runs.iter().enumerate() {
                    let span = message_span(&group, &run.envelopes[0]);
                    let _entered = span.enter();
                    let limit = TimeLimit {
                        per_handler: timeout,
                        batch_ends: (nth > 0).then_some(batch_ends),
                    };
                    handle_in(
                        run.route.as_ref(),
                        &run.envelopes,
                        claimed.as_mut(),
                        uow,
                        limit,
                    )
                    .map_err(|error| BatchError::Handler {
                        first: run.first,
                        count: run.envelopes.len(),
                        error,
                    })?;
                }
                // A consumer that lost the partition must not commit the effects either.
                if acknowledge(uow)? {
                    Ok(())
                } else {
                    Err(BatchError::NotOwned)
                }
            })
            .await;
        match written {
            Ok(()) => {
                let group = [("group", self.group.to_string())];
                metrics::histogram!(metric::BATCH_MESSAGES, &group).record(handled as f64);
                metrics::histogram!(metric::BATCH_SECONDS, &group).record(started.elapsed());
                let each = started.elapsed() / u32::try_from(handled.max(1)).unwrap_or(u32::MAX);
                for (name, count) in names {
                    let labels = [("group", self.group.to_string()), ("message", name)];
                    metrics::histogram!(metric::DURATION, &labels)
                        .record_many(each.as_secs_f64(), count as usize);
                    metrics::counter!(metric::HANDLED, &labels).increment(count);
                }
                BatchOutcome::Acknowledged
            }
            Err(BatchError::NotOwned) => BatchOutcome::NotOwned,
            Err(BatchError::Handler {
                first,
                count,
                error,
            }) => {
                // A call that took several messages failed for one of them, unknown which:
                // the failure is counted once they are handled one by one.
                if count == 1 && error.counts() {
                    metrics::counter!(metric::FAILED, "group" => self.group.to_string(), "message" => batch[first].name.clone())
                        .increment(1);
                }
                BatchOutcome::HandlerFailed {
                    first,
                    count,
                    error,
                }
            }
            Err(BatchError::Store(error)) => {
                tracing::warn!(%error, group = %self.group, "a batch failed to commit");
                BatchOutcome::StoreFailed(error)
            }
        }
    }

    async fn deliver_with_retries(
        &self,
        route: Arc<dyn Route>,
        envelope: Arc<Envelope>,
        mut failed: Option<HandlerError>,
        stop: &CancellationToken,
    ) -> Outcome {
        let labels = [
            ("group", self.group.to_string()),
            ("message", envelope.name.clone()),
        ];
        let mut attempt = 1;
        let mut outages = 0;
        loop {
            let error = match failed.take() {
                Some(error) => error,
                None => {
                    let started = Instant::now();
                    let result = self.attempt(route.clone(), envelope.clone()).await;
                    metrics::histogram!(metric::DURATION, &labels).record(started.elapsed());
                    match result {
                        Ok(()) => {
                            metrics::counter!(metric::HANDLED, &labels).increment(1);
                            return Outcome::Done;
                        }
                        Err(error) => {
                            if error.counts() {
                                metrics::counter!(metric::FAILED, &labels).increment(1);
                            }
                            error
                        }
                    }
                }
            };
            if !error.counts() {
                outages += 1;
                let delay = retry::OUTAGE.delay(outages);
                tracing::warn!(%error, ?delay, "the store failed under the handler; will retry without counting an attempt");
                tokio::select! {
                    () = stop.cancelled() => return Outcome::Stopped,
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            outages = 0;
            if error.is_permanent() || attempt >= self.retry.max_attempts {
                tracing::error!(%error, attempt, "giving up: dead-lettering the message");
                return self.dead_letter(&envelope, &error, attempt, stop).await;
            }
            let delay = self.retry.delay(attempt);
            tracing::warn!(%error, attempt, ?delay, "handler failed; will retry");
            metrics::counter!(metric::RETRIED, &labels).increment(1);
            tokio::select! {
                () = stop.cancelled() => return Outcome::Stopped,
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// One try: inbox mark and handler in one unit of work.
    async fn attempt(
        &self,
        route: Arc<dyn Route>,
        envelope: Arc<Envelope>,
    ) -> Result<(), HandlerError> {
        let group = self.group.clone();
        let limit = TimeLimit {
            per_handler: self.timeout,
            batch_ends: None,
        };
        let (envelopes, inbox) = ([envelope], self.inbox);
        self.db
            .write(move |uow| {
                let mut claimed = claim(uow, &group, inbox, &envelopes)?;
                handle_in(route.as_ref(), &envelopes, claimed.as_mut(), uow, limit)
            })
            .await
    }

    async fn dead_letter(
        &self,
        envelope: &Arc<Envelope>,
        error: &HandlerError,
        attempts: u32,
        stop: &CancellationToken,
    ) -> Outcome {
        loop {
            let (group, message, error) = (self.group.clone(), envelope.clone(), error.to_string());
            let announce = self.announce;
            let recorded = self
                .db
                .write(move |uow| {
                    // The inbox mark keeps a redelivery of the message from running it
                    // again; replay removes it.
                    if inbox::claim(uow, &group, message.id)? {
                        dead_letter::record(uow, &group, &message, &error, attempts, announce)?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await;
            match recorded {
                Ok(()) => {
                    let labels = [
                        ("group", self.group.to_string()),
                        ("message", envelope.name.clone()),
                    ];
                    metrics::counter!(metric::DEAD_LETTERED, &labels).increment(1);
                    return Outcome::Done;
                }
                Err(error) => tracing::error!(%error, "cannot record the dead letter; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return Outcome::Stopped,
                () = tokio::time::sleep(DEAD_LETTER_RETRY) => {}
            }
        }
    }
}

/// Why a batch's unit of work did not commit.
enum BatchError {
    /// The handler call taking the `count` messages from `first` on failed.
    Handler {
        first: usize,
        count: usize,
        error: HandlerError,
    },
    /// The acknowledgement was refused: the partition has another owner now.
    NotOwned,
    Store(StoreError),
}

impl From<StoreError> for BatchError {
    fn from(error: StoreError) -> Self {
        BatchError::Store(error)
    }
}

/// The outcome of `deliver_batch`. In every case but the first, nothing committed.
pub(crate) enum BatchOutcome {
    /// Every message handled (or skipped) and the batch acknowledged, all in one commit.
    Acknowledged,
    /// The acknowledgement was refused: this consumer no longer owns the messages.
    NotOwned,
    /// The handler call taking the `count` messages from index `first` failed.
    HandlerFailed {
        first: usize,
        count: usize,
        error: HandlerError,
    },
    /// The unit of work failed otherwise: the store failed, or a handler panicked.
    StoreFailed(StoreError),
}

/// How long a handler may run: its own limit, cut short where its batch's time runs out.
#[derive(Clone, Copy)]
struct TimeLimit {
    per_handler: Duration,
    batch_ends: Option<Instant>,
}

fn message_span(group: &str, envelope: &Envelope) -> tracing::Span {
    tracing::info_span!(
        "handle",
        group = %group,
        message = %envelope.name,
        message_id = %envelope.id,
        correlation_id = envelope.correlation_id().unwrap_or_default(),
        causation_id = envelope.causation_id().unwrap_or_default(),
    )
}

/// Consecutive messages of a batch that one handler call takes: one message, or several
/// of a route that takes batches.
struct Run {
    route: Arc<dyn Route>,
    /// The batch index of its first message.
    first: usize,
    envelopes: Vec<Arc<Envelope>>,
}

/// Cuts a batch into runs, in order, leaving out the messages no route handles.
fn runs(batch: &[Arc<Envelope>], routes: &HashMap<&'static str, Arc<dyn Route>>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (index, envelope) in batch.iter().enumerate() {
        let Some(route) = routes.get(envelope.name.as_str()) else {
            continue;
        };
        match runs.last_mut() {
            Some(run) if route.takes_batches() && Arc::ptr_eq(&run.route, route) => {
                run.envelopes.push(envelope.clone());
            }
            _ => runs.push(Run {
                route: route.clone(),
                first: index,
                envelopes: vec![envelope.clone()],
            }),
        }
    }
    runs
}

/// Claims the messages in the inbox for `group`, all of a batch in one or two statements:
/// the ids not handled before. None when the group is idempotent (`inbox` false), which
/// handles every message.
fn claim<'a>(
    uow: &UnitOfWork,
    group: &str,
    inbox: bool,
    envelopes: impl IntoIterator<Item = &'a Arc<Envelope>>,
) -> Result<Option<HashSet<Uuid>>, crate::sql::Error> {
    if !inbox {
        return Ok(None);
    }
    let ids: Vec<Uuid> = envelopes.into_iter().map(|envelope| envelope.id).collect();
    inbox::claim_all(uow, group, &ids).map(Some)
}

/// Handles one run inside `uow`: the messages `claimed` (all of them when there is no
/// inbox), with the first as the cause of what the handler emits. The handler's time
/// limit counts from here, not from when the unit of work was queued.
fn handle_in(
    route: &dyn Route,
    envelopes: &[Arc<Envelope>],
    claimed: Option<&mut HashSet<Uuid>>,
    uow: &mut UnitOfWork,
    limit: TimeLimit,
) -> Result<(), HandlerError> {
    let fresh: Vec<Arc<Envelope>> = match claimed {
        // Each claimed id once: a replayed copy can share a read with its original.
        Some(claimed) => envelopes
            .iter()
            .filter(|envelope| claimed.remove(&envelope.id))
            .cloned()
            .collect(),
        None => envelopes.to_vec(),
    };
    let Some(cause) = fresh.first() else {
        tracing::debug!("already handled; skipping");
        return Ok(());
    };
    uow.set_context(CausalContext {
        correlation_id: Some(
            cause
                .correlation_id()
                .map_or_else(|| cause.id.to_string(), str::to_owned),
        ),
        causation_id: Some(cause.id.to_string()),
    });
    let timeout = limit.per_handler;
    let batch_left = limit
        .batch_ends
        .map(|end| end.saturating_duration_since(Instant::now()))
        .filter(|left| *left < timeout);
    match uow.within(batch_left.unwrap_or(timeout), |uow| {
        route.handle(fresh, uow)
    }) {
        (handled, false) => handled,
        (_, true) if batch_left.is_some() => Err(HandlerError::Infrastructure(format!(
            "its batch used up the time of one handler ({timeout:?}) first"
        ))),
        (_, true) => Err(HandlerError::transient(format!(
            "handler timed out after {timeout:?}"
        ))),
    }
}
