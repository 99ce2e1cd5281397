//! The optional HTTP listener (`[http] listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! - `/healthz`: 200 while the process serves requests (liveness).
//! - `/readyz`: 200 when the database answered the last claim, the broker is not in an outage,
//!   and the relay loop made progress recently; 503 with the reason otherwise.
//! - `/metrics`: Prometheus text format; the metric names are in [`crate::telemetry::metric`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What the relay reports about itself, read by `/readyz`.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// The last claim reached the database.
    database_ok: AtomicBool,
    /// The broker is not in an outage (last publish or probe succeeded).
    broker_ok: AtomicBool,
    /// Milliseconds since `started` of the last completed claim.
    last_progress_ms: AtomicU64,
    /// Readiness fails when no claim completed for this long.
    stall_after: Duration,
}

impl Health {
    pub(crate) fn new(poll_interval: Duration) -> Self {
        Self {
            started: Instant::now(),
            database_ok: AtomicBool::new(false),
            broker_ok: AtomicBool::new(true),
            last_progress_ms: AtomicU64::new(0),
            stall_after: (poll_interval * 3).max(Duration::from_secs(30)),
        }
    }

    pub(crate) fn database(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::Relaxed);
        if ok {
            let now = self.started.elapsed().as_millis() as u64;
            self.last_progress_ms.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn broker(&self, ok: bool) {
        self.broker_ok.store(ok, Ordering::Relaxed);
    }

    /// `Ok` when ready, otherwise the reason.
    pub(crate) fn readiness(&self) -> Result<(), &'static str> {
        if !self.database_ok.load(Ordering::Relaxed) {
            return Err("database unavailable");
        }
        if !self.broker_ok.load(Ordering::Relaxed) {
            return Err("broker unavailable");
        }
        let idle = self.started.elapsed().as_millis() as u64
            - self.last_progress_ms.load(Ordering::Relaxed);
        if Duration::from_millis(idle) > self.stall_after {
            return Err("relay loop stalled");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds `addr` (an error here is reported before the relay starts) and returns the server
/// future, which runs until `shutdown`.
pub(crate) async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "http listener started (/healthz, /readyz, /metrics)");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.run_upkeep();
    state.metrics.render()
}
