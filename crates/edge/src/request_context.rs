//! The context of a request, for everything it sets off: its id becomes the correlation and
//! causation id of the messages it emits, comes back on the response, and names the request
//! in the log when it fails.
//!
//! A tower layer rather than `axum::middleware::from_fn`, which boxes the rest of the stack
//! again on every request.

use crate::host::REQUEST_ID;
use crate::problem::InternalCause;
use axum::extract::Request;
use axum::response::Response;
use futures::future::BoxFuture;
use platform::context::{self, CausalContext};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Runs inside the layer that sets `x-request-id`, so every request has one here.
#[derive(Clone)]
pub struct RequestContextLayer;

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> RequestContext<S> {
        RequestContext { inner }
    }
}

#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
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
        Box::pin(async move {
            let mut response = handled.await?;
            if let Some(InternalCause(cause)) = response.extensions().get() {
                tracing::error!(status = response.status().as_u16(), %cause, "request failed");
            }
            if let Some(id) = id {
                response.headers_mut().entry(REQUEST_ID).or_insert(id);
            }
            Ok(response)
        })
    }
}
