//! Operations: `/metrics` and `/health` for the operator and the monitoring
//! system, and `saltpipe top` ([`top`]) for a person on the master.
//!
//! The figures are the atomic counters of [`crate::stats`], the same ones
//! `replay` prints and the tests assert. At each scrape they are copied into
//! a `metrics-exporter-prometheus` recorder that belongs to this listener
//! (a local recorder, not the process-global one, so several pipelines in
//! one test process never mix their numbers) and rendered in Prometheus'
//! text format. The hot path never touches a metrics registry.
//!
//! The listener binds 127.0.0.1:9273 by default: the figures name minions
//! and functions, which are nobody else's business; expose it on purpose.

use crate::config::ConfigError;
use crate::source::now_ms;
use crate::stats::Stats;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod top;

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and `/health`.
    pub enabled: bool,
    /// Where; loopback by default.
    pub listen: SocketAddr,
}

/// The default `[metrics] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9273";

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9273)),
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(
        "cannot listen on {addr} for /metrics: {source} (set [metrics] listen, or enabled = false)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {url}: {message}")]
    Scrape { url: String, message: String },
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

struct AppState {
    stats: Arc<Stats>,
    recorder: PrometheusRecorder,
}

/// Binds the listener (I/O) and serves until `shutdown`. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    cfg: &MetricsConfig,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), OpsError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| OpsError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| OpsError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let state = Arc::new(AppState {
        stats,
        recorder: PrometheusBuilder::new().build_recorder(),
    });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/health", axum::routing::get(health))
        .with_state(state);
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the /metrics listener stopped");
        }
    });
    tracing::info!(%addr, "serving /metrics and /health");
    Ok((addr, task))
}

async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    metrics::with_local_recorder(&st.recorder, || publish(&st.stats));
    let handle = st.recorder.handle();
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

/// `/health`: why the process is or is not doing its job.
pub fn health_of(stats: &Stats) -> (bool, serde_json::Value) {
    let mut reasons = Vec::new();
    let bus = stats.bus_connected();
    if stats.bus_expected.load(Relaxed) && !bus {
        reasons.push("not connected to the event bus".to_owned());
    }
    let running = stats.workers_running.load(Relaxed);
    let expected = stats.workers_expected.load(Relaxed);
    if running < expected {
        reasons.push(format!("{running} of {expected} workers running"));
    }
    let ok = reasons.is_empty();
    (
        ok,
        serde_json::json!({
            "status": if ok { "ok" } else { "unhealthy" },
            "reasons": reasons,
            "bus_connected": bus,
            "workers_running": running,
            "workers_expected": expected,
        }),
    )
}

async fn health(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let (ok, body) = health_of(&st.stats);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

/// Copies every counter into the current (local) recorder: the plain
/// counters from their table in `src/stats.rs`, then the labelled families
/// and gauges.
fn publish(s: &Stats) {
    use metrics::{counter, describe_counter, describe_gauge, gauge};
    for c in s.counters() {
        describe_counter!(c.metric, c.help);
        match c.label {
            Some((k, v)) => counter!(c.metric, k => v).absolute(c.value),
            None => counter!(c.metric).absolute(c.value),
        }
    }
    describe_counter!(
        "saltpipe_events_dropped_total",
        "Events the rules dropped, by reason."
    );
    for r in crate::rules::DropReason::ALL {
        counter!("saltpipe_events_dropped_total", "reason" => r.as_str())
            .absolute(s.dropped[r.index()].load(Relaxed));
    }
    describe_gauge!(
        "saltpipe_bus_connected",
        "1 while connected to the event bus."
    );
    gauge!("saltpipe_bus_connected").set(if s.bus_connected() { 1.0 } else { 0.0 });
    let adjusted = crate::sink::rows::adjusted();
    describe_counter!(
        "saltpipe_values_adjusted_total",
        "Values changed so a good event fits its column instead of being refused: fun cut to 50 characters, NUL written as \\u0000 for PostgreSQL."
    );
    counter!("saltpipe_values_adjusted_total", "what" => "fun_truncated")
        .absolute(adjusted.fun_truncated);
    counter!("saltpipe_values_adjusted_total", "what" => "nul_escaped")
        .absolute(adjusted.nul_escaped);
    describe_counter!(
        "saltpipe_outcomes_total",
        "Returns written by their real outcome (ok, changed, failed: a failed state counts even where Salt said success), and no_return: targeted minions recorded as silent when the job's return window closed."
    );
    for o in crate::outcome::Outcome::ALL {
        counter!("saltpipe_outcomes_total", "outcome" => o.as_str())
            .absolute(s.outcomes[o.index()].load(Relaxed));
    }
    describe_gauge!(
        "saltpipe_queue_write_slowest_seconds",
        "The slowest transaction of the listener's queue writer so far."
    );
    gauge!("saltpipe_queue_write_slowest_seconds")
        .set(s.queue_write_slowest_us.load(Relaxed) as f64 / 1e6);
    describe_gauge!(
        "saltpipe_overflow_bytes",
        "Bytes of kept events in the listener's overflow file (the queue is behind), not yet read back into the queue."
    );
    gauge!("saltpipe_overflow_bytes").set(s.overflow_bytes.load(Relaxed) as f64);
    describe_gauge!(
        "saltpipe_overflow_peak_bytes",
        "The most the listener's overflow file has held since the start (source.overflow_limit is its limit)."
    );
    gauge!("saltpipe_overflow_peak_bytes").set(s.overflow_peak_bytes.load(Relaxed) as f64);
    describe_gauge!("saltpipe_workers_running", "Workers running.");
    gauge!("saltpipe_workers_running").set(s.workers_running.load(Relaxed) as f64);
    let now = now_ms();
    let oldest = s.oldest_unacked_ms.load(Relaxed);
    describe_gauge!(
        "saltpipe_oldest_unacked_age_seconds",
        "Age of the oldest event read but not yet written (0 when caught up)."
    );
    gauge!("saltpipe_oldest_unacked_age_seconds").set(age(now, oldest));
    describe_gauge!("saltpipe_queue_depth", "Events waiting in each queue.");
    for (q, d) in s
        .queue_depths
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        gauge!("saltpipe_queue_depth", "queue" => q.clone()).set(*d as f64);
    }
    describe_gauge!(
        "saltpipe_queue_oldest_age_seconds",
        "Age of the oldest event of each queue not yet written (0 when caught up)."
    );
    for (q, t) in s
        .queue_oldest_ms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        gauge!("saltpipe_queue_oldest_age_seconds", "queue" => q.clone()).set(age(now, *t));
    }
    describe_gauge!(
        "saltpipe_memory_bytes",
        "Event data held in memory now, by part of [memory] budget: listener (read, not yet queued), worker (batches gathered, converted, being written), actions (event copies waiting for an action)."
    );
    describe_gauge!(
        "saltpipe_memory_limit_bytes",
        "Each part's share of [memory] budget."
    );
    describe_gauge!(
        "saltpipe_memory_peak_bytes",
        "The most each part has held since the start."
    );
    describe_counter!(
        "saltpipe_memory_waits_total",
        "Times a stage found its part full: the worker waited before pulling more (the queue held the rest); the listener and the actions dropped instead, counted in their own counters."
    );
    let budget = s.budget();
    for name in crate::memory::PartName::ALL {
        let part = budget.part(name);
        let p = name.as_str();
        gauge!("saltpipe_memory_bytes", "part" => p).set(part.used() as f64);
        gauge!("saltpipe_memory_limit_bytes", "part" => p).set(part.limit() as f64);
        gauge!("saltpipe_memory_peak_bytes", "part" => p).set(part.peak() as f64);
        counter!("saltpipe_memory_waits_total", "part" => p).absolute(part.waits());
    }
    describe_counter!(
        "saltpipe_action_results_total",
        "Action outcomes by action: sent, failed, retried, dropped (queue full), rate_limited, deduplicated, given_up (not sent within the drain time at shutdown)."
    );
    for (name, a) in s.actions.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        for (outcome, v) in a.outcomes() {
            counter!("saltpipe_action_results_total", "action" => name.clone(), "outcome" => outcome).absolute(v);
        }
    }
}

fn age(now: i64, then_ms: i64) -> f64 {
    if then_ms <= 0 {
        0.0
    } else {
        (now - then_ms).max(0) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_and_health_over_http() {
        let stats = Arc::new(Stats::default());
        stats.frames.store(44, Relaxed);
        stats.count_drop(crate::rules::DropReason::FindJob);
        stats.action("page").sent.store(3, Relaxed);
        stats.count_outcome(crate::outcome::Outcome::Failed, 2);
        stats.count_outcome(crate::outcome::Outcome::NoReturn, 1);
        stats.set_queue_depth("default", 7, 0);
        stats.redacted.store(5, Relaxed);
        for ms in [40, 250, 10] {
            crate::stats::events::QueueWritten {
                took: std::time::Duration::from_millis(ms),
            }
            .emit(&stats);
        }
        for on_disk in [3 << 20, 1 << 20] {
            crate::stats::events::OverflowSpilled { events: 4, on_disk }.emit(&stats);
        }
        stats.bus_expected.store(true, Relaxed);
        let budget = stats.install_budget(crate::memory::Budget::new(96 << 20, 32 << 20, false));
        let _held = budget.part(crate::memory::PartName::Worker).charge(5 << 20);
        let stop = CancellationToken::new();
        let cfg = MetricsConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        let (addr, task) = serve(&cfg, stats.clone(), stop.clone())
            .await
            .expect("serve");
        let base = format!("http://{addr}");
        crate::tls::install_ring();
        let client = reqwest::Client::new();
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        let m = top::parse(&text);
        assert_eq!(m.get("saltpipe_frames_total", &[]), Some(44.0), "{text}");
        assert_eq!(
            m.get("saltpipe_events_dropped_total", &[("reason", "find_job")]),
            Some(1.0)
        );
        // Process-wide counts (other tests may have raised them): present.
        for what in ["fun_truncated", "nul_escaped"] {
            assert!(
                m.get("saltpipe_values_adjusted_total", &[("what", what)])
                    .is_some_and(|v| v >= 0.0),
                "{what} in {text}"
            );
        }
        assert_eq!(
            m.get(
                "saltpipe_action_results_total",
                &[("action", "page"), ("outcome", "sent")]
            ),
            Some(3.0)
        );
        assert_eq!(
            m.get("saltpipe_queue_depth", &[("queue", "default")]),
            Some(7.0)
        );
        let memory = |name, part| m.get(name, &[("part", part)]);
        assert_eq!(memory("saltpipe_memory_bytes", "worker"), Some(5_242_880.0));
        assert_eq!(
            memory("saltpipe_memory_peak_bytes", "worker"),
            Some(5_242_880.0)
        );
        assert_eq!(
            memory("saltpipe_memory_limit_bytes", "listener"),
            Some(33_554_432.0)
        );
        assert_eq!(
            memory("saltpipe_memory_limit_bytes", "worker"),
            Some(67_108_864.0)
        );
        assert_eq!(memory("saltpipe_memory_bytes", "listener"), Some(0.0));
        for (o, want) in [
            ("failed", 2.0),
            ("no_return", 1.0),
            ("ok", 0.0),
            ("changed", 0.0),
        ] {
            assert_eq!(
                m.get("saltpipe_outcomes_total", &[("outcome", o)]),
                Some(want),
                "{o} in {text}"
            );
        }
        assert_eq!(m.get("saltpipe_redacted_values_total", &[]), Some(5.0));
        // The queue writer's transactions: how many, how long, the slowest.
        assert_eq!(m.get("saltpipe_queue_writes_total", &[]), Some(3.0));
        assert_eq!(
            m.get("saltpipe_queue_write_microseconds_total", &[]),
            Some(300_000.0)
        );
        assert_eq!(
            m.get("saltpipe_queue_write_slowest_seconds", &[]),
            Some(0.25)
        );
        // The overflow file: events moved there, what it holds, its peak.
        assert_eq!(
            m.get("saltpipe_events_overflow_spilled_total", &[]),
            Some(8.0)
        );
        assert_eq!(m.get("saltpipe_overflow_bytes", &[]), Some(1_048_576.0));
        assert_eq!(
            m.get("saltpipe_overflow_peak_bytes", &[]),
            Some(3_145_728.0)
        );
        let r = client
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 503, "no bus connection yet");
        let body: serde_json::Value = r.json().await.expect("json");
        assert!(
            body["reasons"][0]
                .as_str()
                .unwrap_or_default()
                .contains("bus"),
            "{body}"
        );
        stats.connects.store(1, Relaxed);
        let r = client
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);
        stats.workers_expected.store(2, Relaxed);
        stats.workers_running.store(1, Relaxed);
        let r = client
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 503);
        stop.cancel();
        task.await.expect("server");
    }
}
