//! The HTTP host: composes the registered services' routes with the platform's own
//! (health, metrics, OpenAPI) and the layers every request goes through.

use crate::cors;
use crate::problem::Problem;
use crate::request_context::{RequestContextLayer, RouteMetrics};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cache::Cache;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use platform::{Bus, Database, Migration, Projection, Snapshots, SqlLog, Subscription};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub const REQUEST_ID: &str = "x-request-id";

/// What a service contributes to a process. The binary lists the services; nothing else does.
pub struct ServiceModule {
    /// The name used in `--services`.
    pub name: &'static str,
    pub migrations: &'static [Migration],
    /// Its HTTP API, documented for the OpenAPI document.
    pub routes: fn(&ServiceContext) -> OpenApiRouter,
    /// Its consumer groups.
    pub subscriptions: fn(&ServiceContext) -> Vec<Subscription>,
    /// Its read models kept from the event store (each a consumer group too), which
    /// `conveyor projections` lists and rebuilds.
    pub projections: fn() -> Vec<Projection>,
}

/// What the process gives each of its services.
#[derive(Clone)]
pub struct ServiceContext {
    pub db: Database,
    /// The process's bus (`--bus`): the sql-log or a broker, for what a service asks of
    /// it besides its subscriptions (how much waits for a group).
    pub bus: Arc<dyn Bus>,
    /// The read cache (`--cache`): in the process, or shared in Redis. A service takes a
    /// namespace of its own with `Cache::scoped`.
    pub cache: Cache,
    pub workers: WorkerOptions,
    /// How often event-sourced services snapshot a stream (`--snapshot-every`).
    pub snapshots: Snapshots,
}

/// How a service's workers take their queue (the notes service's, today).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Most messages one batch handles (`--worker-batch`).
    pub batch: u16,
    /// How long a batch waits to fill (`--worker-wait`).
    pub wait: Duration,
    /// Past this many queued messages the API refuses new work with 503 (`--queue-limit`).
    pub queue_limit: u64,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            batch: 256,
            wait: Duration::from_millis(10),
            queue_limit: 100_000,
        }
    }
}

/// Snapshots every this many events: a long Go game loads from one snapshot and a short tail.
pub const DEFAULT_SNAPSHOTS: Snapshots = Snapshots::every(100);

impl ServiceContext {
    /// The defaults of `conveyor serve` on `db`: the sql-log, an in-process cache with a
    /// 10 s TTL.
    pub fn new(db: Database) -> ServiceContext {
        ServiceContext {
            bus: Arc::new(SqlLog::new(db.clone())),
            db,
            cache: Cache::local(Duration::from_secs(10)),
            workers: WorkerOptions::default(),
            snapshots: DEFAULT_SNAPSHOTS,
        }
    }
}

impl std::fmt::Debug for ServiceModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceModule")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Edge settings.
#[derive(Clone)]
pub struct HttpOptions {
    /// Largest request body accepted; larger ones get 413.
    pub body_limit: usize,
    /// Origins browsers may call from; empty means any.
    pub cors_origins: Vec<HeaderValue>,
    /// A request still running after this long is answered 503.
    pub request_timeout: Duration,
    /// The message broker, when the bus is one: readiness asks it too.
    pub broker: Option<std::sync::Arc<dyn platform::Broker>>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            body_limit: 1024 * 1024,
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(30),
            broker: None,
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
                    &seconds,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_seats".to_owned()),
                        &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 50.0, 100.0],
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_units".to_owned()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_messages".to_owned()),
                        &[
                            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
                        ],
                    )
                });
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::warn!(%error, "metrics recorder not installed; /metrics stays empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// The platform's own routes, beside the services' documented ones.
const PLATFORM_ROUTES: [&str; 4] = ["/health/live", "/health/ready", "/metrics", "/openapi.json"];

/// The longest the readiness probe waits for a commit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The log's newest position (gauge): with the consumers' lag, how far behind they are.
pub const LOG_HEAD: &str = "conveyor_log_head";

#[derive(Clone)]
struct HostState {
    db: Database,
    broker: Option<std::sync::Arc<dyn platform::Broker>>,
    /// Short enough that readiness answers with its own cause before the request timeout.
    probe_timeout: Duration,
    metrics: PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
    openapi: std::sync::Arc<OpenApi>,
}

/// The router of a process: the given services' routes plus health, metrics and OpenAPI.
pub fn router(apis: Vec<OpenApiRouter>, db: Database, options: &HttpOptions) -> Router {
    let mut combined = OpenApiRouter::with_openapi(base_openapi());
    for api in apis {
        combined = combined.merge(api);
    }
    let (services, mut openapi) = combined.split_for_parts();
    crate::openapi::document_problems(&mut openapi);
    let route_metrics = RouteMetrics::register(
        openapi
            .paths
            .paths
            .keys()
            .map(String::as_str)
            .chain(PLATFORM_ROUTES),
    );
    let process = metrics_process::Collector::default();
    process.describe();
    process.collect();
    metrics::gauge!(LOG_HEAD).set(*db.head().borrow() as f64);
    let state = HostState {
        db,
        broker: options.broker.clone(),
        probe_timeout: PROBE_TIMEOUT.min(options.request_timeout / 2),
        metrics: metrics(),
        process: std::sync::Arc::new(process),
        openapi: std::sync::Arc::new(openapi),
    };
    let platform_routes = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi_json))
        .with_state(state);
    let request_id = HeaderName::from_static(REQUEST_ID);
    services
        .merge(platform_routes)
        .merge(crate::docs::routes())
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        // One layer made of all of them: each `Router::layer` call would box every route
        // again, and a request would clone one box per layer.
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(|_panic| {
                    tracing::error!("a request handler panicked");
                    Problem::internal("a request handler panicked").into_response()
                }))
                .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        // One line per request only when asked for (RUST_LOG=debug): at the
                        // default level it cost a sixth of GET throughput, and the disk.
                        .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
                        .make_span_with(|request: &Request| {
                            let id = request
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|value| value.to_str().ok())
                                .unwrap_or_default();
                            tracing::debug_span!("request", method = %request.method(), uri = %request.uri(), request_id = id)
                        }),
                )
                .layer(RequestContextLayer {
                    timeout: options.request_timeout,
                    metrics: std::sync::Arc::new(route_metrics),
                })
                .layer(cors::layer(&options.cors_origins))
                .layer(axum::extract::DefaultBodyLimit::max(options.body_limit))
                ,
        )
}

fn base_openapi() -> OpenApi {
    let mut openapi = OpenApi::default();
    openapi.info.title = "Conveyor".to_owned();
    openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    openapi.info.description = Some("The HTTP APIs of the services this process runs.".to_owned());
    openapi
}

/// Ready while the database commits (the probe goes through the writer to the file) and
/// the broker, if the bus is one, answers.
async fn ready(State(state): State<HostState>) -> Response {
    if let Err(error) = state.db.probe(state.probe_timeout).await {
        tracing::warn!(%error, "not ready: the database cannot commit");
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database cannot commit: {error}"),
        )
        .into_response();
    }
    if let Some(broker) = &state.broker {
        let answered = tokio::time::timeout(state.probe_timeout, broker.ping()).await;
        let failure = match answered {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!(
                "it did not answer within {:?}",
                state.probe_timeout
            )),
        };
        if let Some(failure) = failure {
            tracing::warn!(%failure, "not ready: the broker does not answer");
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker does not answer: {failure}"),
            )
            .into_response();
        }
    }
    "ready".into_response()
}

async fn render_metrics(State(state): State<HostState>) -> impl IntoResponse {
    state.process.collect();
    metrics::gauge!(LOG_HEAD).set(*state.db.head().borrow() as f64);
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn openapi_json(State(state): State<HostState>) -> Json<OpenApi> {
    Json((*state.openapi).clone())
}
