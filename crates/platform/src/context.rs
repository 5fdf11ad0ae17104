//! The causal context of the work in progress: which request or message caused it.
//!
//! The edge sets it per HTTP request, the dispatcher per delivered message; a unit of work
//! stamps it on every message it emits. A task-local keeps it out of every use-case signature.

use std::future::Future;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CausalContext {
    /// The id shared by everything one outside request set off.
    pub correlation_id: Option<String>,
    /// The id of the message (or request) that directly caused this work.
    pub causation_id: Option<String>,
}

tokio::task_local! {
    static CURRENT: CausalContext;
}

/// Runs `future` with `context` as the current causal context.
pub async fn scope<F: Future>(context: CausalContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

/// The current causal context, or an empty one outside any scope.
pub fn current() -> CausalContext {
    CURRENT.try_with(Clone::clone).unwrap_or_default()
}
