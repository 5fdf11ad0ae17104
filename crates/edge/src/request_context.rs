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
use metrics::{Counter, Histogram};
use platform::context::{self, CausalContext};
use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

/// The longest request id carried into the messages a request emits.
const MAX_CORRELATION_ID: usize = 200;

/// HTTP metric names, labelled by `route` (the matched template, or `unmatched`) and
/// `status` (its class: `2xx`, `4xx`, ...).
pub mod metric {
    pub const REQUESTS: &str = "http_requests_total";
    pub const DURATION: &str = "http_request_duration_seconds";
    /// The route label of a request no route matched.
    pub const UNMATCHED: &str = "unmatched";
    pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
}

/// The HTTP series of every known route, registered (at zero) when the router is built, so
/// that a dashboard sees a route before its first request and a request only looks its
/// handles up: building a labelled key took two allocations and a registry lookup each.
pub struct RouteMetrics {
    routes: HashMap<String, Series>,
}

/// One route's series, by status class.
struct Series {
    requests: [Counter; 5],
    durations: [Histogram; 5],
}

impl Series {
    fn register(route: &str) -> Series {
        let labels = |class: &str| [("route", route.to_owned()), ("status", class.to_owned())];
        let series = Series {
            requests: metric::STATUS_CLASSES
                .map(|class| metrics::counter!(metric::REQUESTS, &labels(class))),
            durations: metric::STATUS_CLASSES
                .map(|class| metrics::histogram!(metric::DURATION, &labels(class))),
        };
        for counter in &series.requests {
            counter.increment(0);
        }
        series
    }
}

impl RouteMetrics {
    /// Registers `routes` (templates as axum matches them) and `metric::UNMATCHED`.
    pub fn register<'a>(routes: impl IntoIterator<Item = &'a str>) -> Self {
        let routes = routes
            .into_iter()
            .chain([metric::UNMATCHED])
            .map(|route| (route.to_owned(), Series::register(route)))
            .collect();
        RouteMetrics { routes }
    }

    fn record(&self, route: &str, status: StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let record = |series: &Series| {
            series.requests[class].increment(1);
            series.durations[class].record(elapsed);
        };
        match self.routes.get(route) {
            Some(series) => record(series),
            // A route the document does not list (the docs page's assets, say).
            None => record(&Series::register(route)),
        }
    }
}

/// Runs inside the layer that sets `x-request-id`, so every request has one here.
#[derive(Clone)]
pub struct RequestContextLayer {
    /// A request still running after this long is answered 503.
    pub timeout: Duration,
    pub metrics: Arc<RouteMetrics>,
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> RequestContext<S> {
        RequestContext {
            inner,
            timeout: self.timeout,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
    timeout: Duration,
    metrics: Arc<RouteMetrics>,
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
        let route = request.extensions().get::<MatchedPath>().cloned();
        let id = request.headers().get(REQUEST_ID).cloned();
        // A client's id becomes the messages' correlation id, stored with each: a long one
        // is not carried into them.
        let text = id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .filter(|id| id.len() <= MAX_CORRELATION_ID)
            .map(str::to_owned);
        let causal = CausalContext {
            correlation_id: text.clone(),
            causation_id: text,
        };
        let handled = context::scope(causal, self.inner.call(request));
        let (timeout, metrics) = (self.timeout, self.metrics.clone());
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
            let route = route
                .as_ref()
                .map_or(metric::UNMATCHED, MatchedPath::as_str);
            metrics.record(route, response.status(), started.elapsed());
            if let Some(InternalCause(cause)) = response.extensions().get() {
                // The request's span is at DEBUG: the error names the request itself.
                let request_id = id.as_ref().and_then(|id| id.to_str().ok());
                tracing::error!(status = response.status().as_u16(), %cause, route, request_id, "request failed");
            }
            if let Some(id) = id {
                response.headers_mut().entry(REQUEST_ID).or_insert(id);
            }
            Ok(response)
        })
    }
}
