//! The metrics server (upstream's `metricsBindAddress`, :10249) and the
//! health server (upstream's `healthzBindAddress`, :10256).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::health::{HealthAnswer, HealthState};
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// Produces the JSON served on `/debug/state`.
pub type DebugState = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct MetricsApp {
    metrics: Metrics,
    debug_state: DebugState,
}

/// The metrics server's routes: `/metrics`, `/debug/state`, `/proxyMode`, and
/// `/healthz` + `/livez` answering a plain "ok" (upstream installs the
/// generic component ping there, not the proxy health checks).
pub fn metrics_router(metrics: Metrics, debug_state: DebugState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/debug/state", get(debug_state_handler))
        .route("/proxyMode", get(proxy_mode_handler))
        .route("/healthz", get(ping))
        .route("/livez", get(ping))
        .with_state(MetricsApp {
            metrics,
            debug_state,
        })
}

/// Serves [`metrics_router`] on `listener` until `shutdown` resolves.
pub async fn serve_metrics<F>(
    listener: TcpListener,
    metrics: Metrics,
    debug_state: DebugState,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics");
    }
    axum::serve(listener, metrics_router(metrics, debug_state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(app): State<MetricsApp>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let metrics = app.metrics;
    // Reads /proc; keep it off the async workers.
    let encoded = tokio::task::spawn_blocking(move || {
        if wants_openmetrics {
            (OPENMETRICS_CONTENT_TYPE, metrics.encode_openmetrics())
        } else {
            (TEXT_CONTENT_TYPE, metrics.encode())
        }
    })
    .await;
    match encoded {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn debug_state_handler(State(app): State<MetricsApp>) -> Response {
    // The closure may take locks or walk large state.
    let f = app.debug_state;
    match tokio::task::spawn_blocking(move || f()).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "debug state closure panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn proxy_mode_handler(State(app): State<MetricsApp>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        app.metrics.mode().to_string(),
    )
        .into_response()
}

async fn ping() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok").into_response()
}

#[derive(Clone)]
struct HealthApp {
    health: HealthState,
    metrics: Metrics,
}

/// The health server's routes: `/healthz` and `/livez` with upstream's
/// status codes and JSON, counted in `kubeproxy_proxy_{healthz,livez}_total`.
pub fn healthz_router(health: HealthState, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(healthz_handler))
        .route("/livez", get(livez_handler))
        .with_state(HealthApp { health, metrics })
}

/// Serves [`healthz_router`] on `listener` until `shutdown` resolves.
pub async fn serve_healthz<F>(
    listener: TcpListener,
    health: HealthState,
    metrics: Metrics,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving healthz");
    }
    axum::serve(listener, healthz_router(health, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz_handler(State(app): State<HealthApp>) -> Response {
    let answer = app.health.healthz();
    app.metrics.healthz_answered(answer.code);
    health_response(&answer)
}

async fn livez_handler(State(app): State<HealthApp>) -> Response {
    let answer = app.health.livez();
    app.metrics.livez_answered(answer.code);
    health_response(&answer)
}

fn health_response(answer: &HealthAnswer) -> Response {
    let status = if answer.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, answer.json(), &[])
}

pub(crate) fn json_response(
    status: StatusCode,
    body: String,
    extra: &[(&'static str, HeaderValue)],
) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    for (name, value) in extra {
        h.insert(*name, value.clone());
    }
    resp
}
