//! `saltpipe top`: a live view of a running saltpipe, for the operator on
//! the master: is it keeping up (rates, backlog, age of the oldest event),
//! and is anything going wrong (errors, dead letters, failed actions)?
//!
//! It reads the same `/metrics` page Prometheus does, so it needs nothing
//! else from the daemon and works against `run`, `listen` and `work` alike.
//! The screen is redrawn with plain ANSI sequences (home, clear to end),
//! which every terminal and tmux understand; no full-screen library needed
//! for one table.

use super::OpsError;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// A series' labels, as (name, value) pairs.
type Labels = Vec<(String, String)>;

/// One scrape: `name` → (labels → value).
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    series: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    /// The value of the series with exactly these labels (order free).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.series.get(name)?.iter().find_map(|(l, v)| {
            (l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want)))
            .then_some(*v)
        })
    }

    /// Sum over all label sets of one metric.
    pub fn sum(&self, name: &str) -> f64 {
        self.series
            .get(name)
            .map(|v| v.iter().map(|(_, x)| x).sum())
            .unwrap_or(0.0)
    }

    /// Values of one metric by the value of one label.
    pub fn by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (l, v) in self.series.get(name).into_iter().flatten() {
            if let Some((_, lv)) = l.iter().find(|(k, _)| k == label) {
                *out.entry(lv.clone()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// Parses Prometheus text format (what our own exporter writes: no
/// timestamps, no escaped quotes in label values). Lines it cannot read are skipped.
pub fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.trim_end_matches('}');
                let labels = body
                    .split("\",")
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
                    })
                    .collect();
                (n, labels)
            }
            None => (series, vec![]),
        };
        s.series
            .entry(name.to_owned())
            .or_default()
            .push((labels, v));
    }
    s
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Scrape, OpsError> {
    // reqwest's messages name the URL: shown only redacted.
    let err = |e: reqwest::Error| OpsError::Scrape {
        url: crate::redact::url(url),
        message: e.without_url().to_string(),
    };
    let text = client
        .get(url)
        .send()
        .await
        .map_err(err)?
        .error_for_status()
        .map_err(err)?
        .text()
        .await
        .map_err(err)?;
    Ok(parse(&text))
}

/// Draws one screen from two scrapes `dt` apart (the first has no rates).
pub fn render(url: &str, now: &Scrape, before: Option<(&Scrape, f64)>) -> String {
    let rate = |name: &str| -> String {
        match before {
            Some((b, dt)) if dt > 0.0 => {
                format!("{:>10.1}/s", (now.sum(name) - b.sum(name)).max(0.0) / dt)
            }
            _ => format!("{:>12}", "-"),
        }
    };
    let mut o = String::new();
    let connected = now.sum("saltpipe_bus_connected") > 0.0;
    let _ = writeln!(
        o,
        "saltpipe top  {url}  bus: {}  workers: {}",
        if connected {
            "connected"
        } else {
            "NOT connected"
        },
        now.sum("saltpipe_workers_running")
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<26}{:>14}{:>12}", "", "total", "rate");
    for (label, name) in [
        ("read (events)", "saltpipe_frames_total"),
        ("kept", "saltpipe_events_kept_total"),
        ("dropped by rules", "saltpipe_events_dropped_total"),
        ("queued", "saltpipe_queue_pushed_total"),
        ("  via the spool", "saltpipe_queue_spooled_total"),
        ("written (acked)", "saltpipe_events_acked_total"),
        ("batches", "saltpipe_batches_total"),
    ] {
        let _ = writeln!(o, "{label:<26}{:>14}{}", now.sum(name), rate(name));
    }
    let batches = now.sum("saltpipe_batches_total");
    if batches > 0.0 {
        let _ = writeln!(
            o,
            "{:<26}{:>14.1}   sink latency {:.1} ms/batch",
            "mean batch size",
            now.sum("saltpipe_batch_events_sum") / batches,
            now.sum("saltpipe_sink_latency_microseconds_total") / batches / 1000.0
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "backlog");
    let depth = now.by("saltpipe_queue_depth", "queue");
    let ages = now.by("saltpipe_queue_oldest_age_seconds", "queue");
    if depth.is_empty() {
        let _ = writeln!(o, "  (no worker in this process)");
    }
    for (q, d) in &depth {
        let _ = writeln!(
            o,
            "  queue {q:<18}{d:>10} waiting   oldest {:.1}s",
            ages.get(q).copied().unwrap_or(0.0)
        );
    }
    // Kept events the listener holds on disk while the queue is behind.
    if now
        .get("saltpipe_overflow_peak_bytes", &[])
        .is_some_and(|p| p > 0.0)
    {
        let _ = writeln!(
            o,
            "  overflow file {:>12.1} MB held   peak {:.1} MB   {} events moved there",
            now.sum("saltpipe_overflow_bytes") / 1e6,
            now.sum("saltpipe_overflow_peak_bytes") / 1e6,
            now.sum("saltpipe_events_overflow_spilled_total")
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "errors");
    for (label, name) in [
        ("bus disconnects", "saltpipe_bus_disconnects_total"),
        ("malformed frames", "saltpipe_frames_malformed_total"),
        ("oversized frames", "saltpipe_frames_oversized_total"),
        (
            "queue overflow drops",
            "saltpipe_events_overflow_dropped_total",
        ),
        ("queue write errors", "saltpipe_queue_errors_total"),
        ("sink retries", "saltpipe_sink_retries_total"),
        ("sink errors", "saltpipe_sink_errors_total"),
        ("dead letters", "saltpipe_dead_letters_total"),
    ] {
        let _ = writeln!(o, "  {label:<24}{:>14}{}", now.sum(name), rate(name));
    }
    let actions = now.series.get("saltpipe_action_results_total");
    if let Some(series) = actions {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "actions {:<18}{:>8}{:>8}{:>8}{:>8}{:>8}{:>8}",
            "", "sent", "failed", "retried", "dropped", "limited", "dedup"
        );
        let mut names: Vec<&str> = series
            .iter()
            .filter_map(|(l, _)| {
                l.iter()
                    .find(|(k, _)| k == "action")
                    .map(|(_, v)| v.as_str())
            })
            .collect();
        names.dedup();
        for a in names {
            let g = |outcome: &str| {
                now.get(
                    "saltpipe_action_results_total",
                    &[("action", a), ("outcome", outcome)],
                )
                .unwrap_or(0.0)
            };
            let _ = writeln!(
                o,
                "  {a:<24}{:>8}{:>8}{:>8}{:>8}{:>8}{:>8}",
                g("sent"),
                g("failed"),
                g("retried"),
                g("dropped"),
                g("rate_limited"),
                g("deduplicated")
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Ctrl-C to quit");
    o
}

/// Runs the live view until Ctrl-C (or `count` screens, for scripts).
pub async fn run(url: &str, interval: Duration, count: Option<u64>) -> Result<(), OpsError> {
    crate::tls::install_ring();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| OpsError::Scrape {
            url: crate::redact::url(url),
            message: e.without_url().to_string(),
        })?;
    // A metrics URL may carry basic-auth credentials: drawn only redacted.
    let shown_url = crate::redact::url(url);
    let mut previous: Option<(Scrape, Instant)> = None;
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    loop {
        let screen = match fetch(&client, url).await {
            Ok(now) => {
                let t = Instant::now();
                let s = render(
                    &shown_url,
                    &now,
                    previous
                        .as_ref()
                        .map(|(p, pt)| (p, t.duration_since(*pt).as_secs_f64())),
                );
                previous = Some((now, t));
                s
            }
            Err(e) => format!(
                "saltpipe top  {shown_url}\n\n{e}\n\nretrying every {}s\n",
                interval.as_secs_f64()
            ),
        };
        // Home, draw, clear what is left of the old screen.
        let frame = screen.replace('\n', "\x1b[K\n");
        if let Err(e) = write!(out, "\x1b[H{frame}\x1b[J").and_then(|()| out.flush()) {
            // `saltpipe top --count N | head`: nobody reads any more, which
            // ends the view as Ctrl-C does, not as a failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_exporter_output() {
        let s = parse(
            "# HELP x y\n# TYPE saltpipe_frames_total counter\nsaltpipe_frames_total 12\n\
             saltpipe_events_dropped_total{reason=\"find_job\"} 3\n\
             saltpipe_events_dropped_total{reason=\"auth\"} 2\n\
             saltpipe_action_results_total{action=\"a\",outcome=\"sent\"} 5\n",
        );
        assert_eq!(s.get("saltpipe_frames_total", &[]), Some(12.0));
        assert_eq!(s.sum("saltpipe_events_dropped_total"), 5.0);
        assert_eq!(
            s.get(
                "saltpipe_action_results_total",
                &[("outcome", "sent"), ("action", "a")]
            ),
            Some(5.0)
        );
        let screen = render("u", &s, Some((&Scrape::default(), 2.0)));
        assert!(screen.contains("6.0/s"), "{screen}");
        assert!(!screen.contains("overflow file"), "{screen}");
        let s = parse(
            "saltpipe_overflow_bytes 2000000
saltpipe_overflow_peak_bytes 5000000
             saltpipe_events_overflow_spilled_total 40
",
        );
        let screen = render("u", &s, None);
        assert!(
            screen.contains(
                "overflow file          2.0 MB held   peak 5.0 MB   40 events moved there"
            ),
            "{screen}"
        );
    }
}
