//! The context of a request, for everything it sets off: its id becomes the correlation and
//! causation id of the messages it emits, comes back on the response, and names the request
//! in the log when it fails. It also bounds the request's time (a stuck database must not
//! hold clients forever) and records it in the HTTP metrics.
//!
//! A tower layer rather than `axum::middleware::from_fn`, which boxes the rest of the stack
//! again on every request.

use crate::host::REQUEST_ID;
use crate::problem::{InternalCause, Problem};
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::StatusCode;
use platform::context::{self, CausalContext};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

/// HTTP metric names, labelled by `route` (the matched template, or `unmatched`) and
/// `status` (its class: `2xx`, `4xx`, ...).
pub mod metric {
    pub const REQUESTS: &str = "http_requests_total";
    pub const DURATION: &str = "http_request_duration_seconds";
    /// The route label of a request no route matched.
    pub const UNMATCHED: &str = "unmatched";
    pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
}

/// Runs inside the layer that sets `x-request-id`, so every request has one here.
#[derive(Clone)]
pub struct RequestContextLayer {
    /// A request still running after this long is answered 503.
    pub timeout: Duration,
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> RequestContext<S> {
        RequestContext {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for RequestContext<S>
where
    S: Service<Request, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let route = request.extensions().get::<MatchedPath>().map_or_else(
            || metric::UNMATCHED.to_owned(),
            |path| path.as_str().to_owned(),
        );
        let id = request.headers().get(REQUEST_ID).cloned();
        let text = id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .map(str::to_owned);
        let causal = CausalContext {
            correlation_id: text.clone(),
            causation_id: text,
        };
        let handled = context::scope(causal, self.inner.call(request));
        let timeout = self.timeout;
        Box::pin(async move {
            let mut response = match tokio::time::timeout(timeout, handled).await {
                Ok(response) => response?,
                // What the request started may still finish: a write queued before the
                // deadline commits, and its caller no longer hears of it.
                Err(_) => Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the request did not finish within {timeout:?}; try again later"),
                )
                .into_response(),
            };
            let status = metric::STATUS_CLASSES
                [usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1];
            let labels = [("route", route), ("status", status.to_owned())];
            metrics::counter!(metric::REQUESTS, &labels).increment(1);
            metrics::histogram!(metric::DURATION, &labels).record(started.elapsed());
            if let Some(InternalCause(cause)) = response.extensions().get() {
                // The request's span is at DEBUG: the error names the request itself.
                let request_id = id.as_ref().and_then(|id| id.to_str().ok());
                tracing::error!(status = response.status().as_u16(), %cause, route = %labels[0].1, request_id, "request failed");
            }
            if let Some(id) = id {
                response.headers_mut().entry(REQUEST_ID).or_insert(id);
            }
            Ok(response)
        })
    }
}
