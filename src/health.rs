//! The optional HTTP listener (`[http] listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! - `/healthz`: liveness. 200 unless the relay loop is wedged: a claim or a batch has been
//!   outstanding for longer than anything the relay does may take ([`Health::wedged_after`]:
//!   `relay.lease_duration` + `database.statement_timeout` + 35 s). Broker and database outages
//!   never fail it: restarting the process would not end them.
//! - `/readyz`: 200 when the database answered the last claim, the broker is not in an outage,
//!   and the relay loop made progress recently; 503 with the reason otherwise. It describes the
//!   relay's dependencies, for alerting and dashboards; a sidecar must not be wired to its pod's
//!   readiness with it (README, "Operating it").
//! - `/metrics`: Prometheus text format; the metric names are in [`crate::telemetry::metric`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// `[http]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the listener serving `/healthz`, `/readyz` and `/metrics`, e.g. `0.0.0.0:9187`.
    #[cfg_attr(test, schemars(with = "String"))]
    pub listen: SocketAddr,
}

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
    /// Milliseconds since `started` at which the oldest claim or batch still outstanding began;
    /// `u64::MAX` when none is.
    oldest_work_ms: AtomicU64,
    /// Liveness fails when a claim or batch has been outstanding for this long.
    wedged_after: Duration,
    /// Why the broker is unavailable (the first error of the outage), for `/readyz`.
    broker_error: Mutex<Option<String>>,
}

impl Health {
    /// `wedged_after`: see [`Health::wedged_after`].
    pub(crate) fn new(poll_interval: Duration, wedged_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            database_ok: AtomicBool::new(false),
            broker_ok: AtomicBool::new(true),
            last_progress_ms: AtomicU64::new(0),
            stall_after: (poll_interval * 3).max(Duration::from_secs(30)),
            oldest_work_ms: AtomicU64::new(u64::MAX),
            wedged_after,
            broker_error: Mutex::new(None),
        }
    }

    /// How long a claim or batch may be outstanding before the process counts as wedged: a
    /// batch may spend up to its lease publishing and retrying its settlement, and each
    /// database statement is bounded client-side by `statement_timeout` + 5 s; 30 s more for
    /// scheduling. Nothing the relay does legitimately takes longer.
    pub(crate) fn wedged_after(lease_duration: Duration, statement_timeout: Duration) -> Duration {
        lease_duration + statement_timeout + Duration::from_secs(35)
    }

    /// Records when the oldest claim or batch still outstanding began (`None`: nothing is).
    pub(crate) fn oldest_work(&self, since: Option<Instant>) {
        let ms = since.map_or(u64::MAX, |t| {
            t.saturating_duration_since(self.started).as_millis() as u64
        });
        self.oldest_work_ms.store(ms, Ordering::Relaxed);
    }

    /// `Ok` while the relay loop is not wedged, otherwise why.
    pub(crate) fn liveness(&self) -> Result<(), String> {
        let oldest = self.oldest_work_ms.load(Ordering::Relaxed);
        if oldest == u64::MAX {
            return Ok(());
        }
        let now = self.started.elapsed().as_millis() as u64;
        let outstanding = Duration::from_millis(now.saturating_sub(oldest));
        if outstanding > self.wedged_after {
            return Err(format!(
                "relay loop wedged: work outstanding for {} s (bound {} s)",
                outstanding.as_secs(),
                self.wedged_after.as_secs()
            ));
        }
        Ok(())
    }

    pub(crate) fn database(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::Relaxed);
        if ok {
            let now = self.started.elapsed().as_millis() as u64;
            self.last_progress_ms.store(now, Ordering::Relaxed);
        }
    }

    /// The loop made progress without touching the database (an inbox waiting for messages).
    pub(crate) fn progress(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_progress_ms.store(now, Ordering::Relaxed);
    }

    /// The broker is back (`None`), or unavailable with this error.
    pub(crate) fn broker(&self, error: Option<&str>) {
        self.broker_ok.store(error.is_none(), Ordering::Relaxed);
        let mut current = self.broker_error.lock().expect("health lock poisoned");
        match error {
            None => *current = None,
            Some(error) => {
                current.get_or_insert_with(|| error.to_owned());
            }
        }
    }

    /// `Ok` when ready, otherwise the reason.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if !self.database_ok.load(Ordering::Relaxed) {
            return Err("database unavailable".to_owned());
        }
        if !self.broker_ok.load(Ordering::Relaxed) {
            let error = self.broker_error.lock().expect("health lock poisoned");
            return Err(match error.as_deref() {
                Some(error) => format!("broker unavailable: {error}"),
                None => "broker unavailable".to_owned(),
            });
        }
        let idle = (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed));
        if Duration::from_millis(idle) > self.stall_after {
            return Err("relay loop stalled".to_owned());
        }
        Ok(())
    }
}

/// The health of each direction the process runs (`outbox`, `inbox`), by name.
pub(crate) type Directions = Vec<(&'static str, Arc<Health>)>;

#[derive(Clone)]
struct AppState {
    health: Arc<Directions>,
    metrics: PrometheusHandle,
}

/// `Ok` when every direction is, otherwise each failing one's reason, prefixed with its name
/// when the process runs more than one.
fn combined(
    directions: &Directions,
    check: impl Fn(&Health) -> Result<(), String>,
) -> Result<(), String> {
    let failures: Vec<String> = directions
        .iter()
        .filter_map(|(name, health)| {
            check(health).err().map(|reason| {
                if directions.len() > 1 {
                    format!("{name}: {reason}")
                } else {
                    reason
                }
            })
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Binds `addr` (an error here is reported before the relay starts) and returns the server
/// future, which runs until `shutdown`.
pub(crate) async fn serve(
    addr: SocketAddr,
    health: Directions,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "http listener started (/healthz, /readyz, /metrics)");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            health: Arc::new(health),
            metrics,
        });
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match combined(&state.health, Health::liveness) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match combined(&state.health, Health::readiness) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_only_when_work_is_outstanding_past_the_bound() {
        let mut health = Health::new(Duration::from_secs(1), Duration::from_millis(50));
        // as if the process had started a second ago
        health.started = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        assert!(health.liveness().is_ok(), "nothing outstanding");
        health.oldest_work(Some(Instant::now()));
        assert!(health.liveness().is_ok(), "within the bound");
        health.oldest_work(Instant::now().checked_sub(Duration::from_millis(200)));
        let reason = health.liveness().unwrap_err();
        assert!(reason.contains("wedged"), "{reason}");
        health.oldest_work(None);
        assert!(health.liveness().is_ok(), "the work ended");
    }

    #[test]
    fn with_both_directions_each_failure_names_its_direction() {
        let outbox = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60)));
        let inbox = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60)));
        outbox.database(true);
        inbox.database(true);
        let both: Directions = vec![
            ("outbox", Arc::clone(&outbox)),
            ("inbox", Arc::clone(&inbox)),
        ];
        assert!(combined(&both, Health::readiness).is_ok());
        inbox.broker(Some("connection refused"));
        let reason = combined(&both, Health::readiness).unwrap_err();
        assert_eq!(reason, "inbox: broker unavailable: connection refused");
        let one: Directions = vec![("inbox", inbox)];
        let reason = combined(&one, Health::readiness).unwrap_err();
        assert_eq!(reason, "broker unavailable: connection refused");
    }

    #[test]
    fn readiness_names_the_broker_error_of_the_outage() {
        let health = Health::new(Duration::from_secs(1), Duration::from_secs(60));
        health.database(true);
        health.broker(Some("ACCESS_REFUSED - Login was refused"));
        health.broker(Some("a later error"));
        let reason = health.readiness().unwrap_err();
        assert!(reason.contains("ACCESS_REFUSED"), "{reason}");
        health.broker(None);
        assert!(health.readiness().is_ok());
    }
}
