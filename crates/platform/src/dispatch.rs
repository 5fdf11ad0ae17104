//! The middleware every delivered message goes through, whatever the transport:
//! routing by name, a tracing span, the inbox check, retries with backoff, dead-lettering
//! and metrics.

use crate::context::{self, CausalContext};
use crate::db::Database;
use crate::dead_letter;
use crate::envelope::Envelope;
use crate::handler::{HandlerError, Route};
use crate::inbox;
use crate::retry::RetryPolicy;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
}

impl Dispatcher {
    pub async fn deliver(&self, envelope: Envelope, stop: &CancellationToken) -> Outcome {
        let Some(route) = self.routes.get(envelope.name.as_str()).cloned() else {
            return Outcome::Done;
        };
        let span = tracing::info_span!(
            "handle",
            group = %self.group,
            message = %envelope.name,
            message_id = %envelope.id,
            correlation_id = envelope.correlation_id().unwrap_or_default(),
            causation_id = envelope.causation_id().unwrap_or_default(),
        );
        self.deliver_with_retries(route, Arc::new(envelope), stop)
            .instrument(span)
            .await
    }

    async fn deliver_with_retries(
        &self,
        route: Arc<dyn Route>,
        envelope: Arc<Envelope>,
        stop: &CancellationToken,
    ) -> Outcome {
        let labels = [
            ("group", self.group.to_string()),
            ("message", envelope.name.clone()),
        ];
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let result = self.attempt(route.clone(), envelope.clone()).await;
            metrics::histogram!(metric::DURATION, &labels).record(started.elapsed());
            let error = match result {
                Ok(()) => {
                    metrics::counter!(metric::HANDLED, &labels).increment(1);
                    return Outcome::Done;
                }
                Err(error) => error,
            };
            metrics::counter!(metric::FAILED, &labels).increment(1);
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

    /// One try: inbox check, handler and inbox mark in one unit of work.
    async fn attempt(
        &self,
        route: Arc<dyn Route>,
        envelope: Arc<Envelope>,
    ) -> Result<(), HandlerError> {
        let group = self.group.clone();
        let causal = CausalContext {
            correlation_id: Some(
                envelope
                    .correlation_id()
                    .map_or_else(|| envelope.id.to_string(), str::to_owned),
            ),
            causation_id: Some(envelope.id.to_string()),
        };
        let write = self.db.write(move |uow| {
            async move {
                let id = envelope.id;
                if inbox::seen(uow, &group, id).await.map_err(store)? {
                    tracing::debug!("already handled; skipping");
                    return Ok(());
                }
                route.handle(envelope, uow).await?;
                inbox::mark(uow, &group, id).await.map_err(store)
            }
            .boxed()
        });
        match tokio::time::timeout(self.timeout, context::scope(causal, write)).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::transient(format!(
                "handler timed out after {:?}",
                self.timeout
            ))),
        }
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
            let recorded = self
                .db
                .write(move |uow| {
                    async move {
                        dead_letter::record(uow, &group, &message, &error, attempts).await
                    }
                    .boxed()
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

fn store(error: sqlx::Error) -> HandlerError {
    HandlerError::transient(error)
}
