//! `saltpipe web`: the pages an operator opens to see what ran, what
//! failed and who did not answer, read straight from the sink's tables.
//!
//! Why in the binary rather than a separate app (Alcali): it reads every
//! sink saltpipe writes (SQLite, MariaDB, PostgreSQL) with the same
//! bounded, parameterised, read-only queries ([`store`], [`data`]), it
//! ships nothing to install or fetch, and it uses saltpipe's own outcome
//! and no-return tables where they exist.
//!
//! Pages are server-rendered with compile-time-checked askama templates
//! (`templates/web/`), which escape every value; charts are inline SVG
//! ([`chart`]) with a CSV link; the one stylesheet is embedded. Every
//! response carries a strict Content-Security-Policy (no inline script or
//! style, nothing from another origin) and there is no state-changing
//! endpoint: only GET and HEAD are routed.

use askama::Template;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod chart;
pub mod config;
pub mod data;
pub mod fresh;
pub mod live;
pub mod states;
pub mod store;

pub use config::WebConfig;
use data::{Data, JobFilter};
use store::StoreError;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Sent with every response. `style-src 'self'` without 'unsafe-inline':
/// the SVG charts use classes, never `style=` attributes.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("assets/style.css");
const FAVICON: &str = include_str!("assets/favicon.svg");
const LIVE_JS: &str = include_str!("assets/live.js");

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen on {addr} for the web pages: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("web: {0}")]
    Config(String),
    #[error("web: the sink's database: {0}")]
    Store(#[from] StoreError),
}

struct App {
    data: Data,
    access: config::Access,
    /// The feed and counters of the process that ingests (`saltpipe run`);
    /// None for `saltpipe web`.
    live: Option<live::LiveFeed>,
    /// Ends the Live streams, so a graceful shutdown does not wait on them.
    shutdown: CancellationToken,
    /// The overview's costly reads, as snapshots (see [`fresh`]).
    latest: Arc<fresh::Fresh<Vec<data::Latest>>>,
    hourly: Arc<fresh::Fresh<Vec<(String, i64, i64)>>>,
}

/// A snapshot younger than this is shown as it is...
const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(10);
/// ...one younger than this while a new one is read behind it.
const SERVE_FOR: std::time::Duration = std::time::Duration::from_secs(300);

impl App {
    async fn latest(
        self: &Arc<App>,
    ) -> Result<(Arc<Vec<data::Latest>>, std::time::Duration), StoreError> {
        let app = self.clone();
        self.latest
            .get(move || {
                let app = app.clone();
                async move { app.data.latest(SystemTime::now()).await }
            })
            .await
    }

    async fn hourly(
        self: &Arc<App>,
    ) -> Result<(Arc<Vec<(String, i64, i64)>>, std::time::Duration), StoreError> {
        let app = self.clone();
        self.hourly
            .get(move || {
                let app = app.clone();
                async move { app.data.hourly(SystemTime::now()).await }
            })
            .await
    }
}

/// Opens the sink's database read-only, binds the listener (I/O) and
/// serves until `shutdown`. Returns the bound address and the task.
/// `live`: the feed of kept events and the counters of this process, when
/// it ingests too (`saltpipe run`): the Live page and the overview's
/// ingest figures.
pub async fn serve(
    cfg: &WebConfig,
    sink: &crate::sink::SinkConfig,
    live: Option<live::LiveFeed>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), WebError> {
    let access = cfg.access().map_err(WebError::Config)?;
    let store = store::open(sink, cfg.query_timeout).await?;
    let data = Data::new(store, cfg.stale_after).await?;
    if !data.outcomes {
        tracing::info!("no saltpipe_outcomes table: outcomes are derived from success");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WebError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let app = router(Arc::new(App {
        data,
        access,
        live,
        shutdown: shutdown.clone(),
        latest: Arc::new(fresh::Fresh::new(FRESH_FOR, SERVE_FOR)),
        hourly: Arc::new(fresh::Fresh::new(FRESH_FOR, SERVE_FOR)),
    }));
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the web listener stopped");
        }
    });
    tracing::info!(%addr, sink = %sink.url, "serving the web pages");
    Ok((addr, task))
}

fn router(app: Arc<App>) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/", get(overview))
        .route("/jobs", get(jobs))
        .route("/job/{jid}", get(job))
        .route("/minion/{id}", get(minion))
        .route("/search", get(search))
        .route("/live", get(live_page))
        .route("/live/events", get(live_events))
        .route("/data/hourly.csv", get(hourly_csv))
        .route("/data/minion/{id}/timeline.csv", get(timeline_csv))
        .route("/assets/style.css", get(style))
        .route("/assets/favicon.svg", get(favicon))
        .route("/assets/live.js", get(live_js))
        .route("/favicon.ico", get(favicon))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Access control and the security headers, for every response.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut resp = match &app.access {
        config::Access::Header(expected)
            if !req
                .headers()
                .get(header::AUTHORIZATION)
                .is_some_and(|v| same(v.as_bytes(), expected.as_bytes())) =>
        {
            let mut r = (StatusCode::UNAUTHORIZED, "authentication required").into_response();
            if expected.starts_with("Basic ") {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"saltpipe\", charset=\"UTF-8\""),
                );
            }
            r
        }
        _ => next.run(req).await,
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// Compares a credential in time independent of where it differs.
fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// All but RFC 3986's unreserved characters.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

fn query(req: &axum::http::Uri) -> HashMap<String, String> {
    url::form_urlencoded::parse(req.query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A page, or the error page.
fn page<T: Template>(t: Result<T, StoreError>) -> Response {
    match t {
        Ok(t) => match t.render() {
            Ok(html) => Html(html).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "web page query failed");
            let status = match e {
                StoreError::Retriable(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, &e.to_string())
        }
    }
}

#[derive(Template)]
#[template(path = "web/error.html")]
struct ErrorPage<'a> {
    status: String,
    message: &'a str,
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = ErrorPage {
        status: status.to_string(),
        message,
    }
    .render()
    .unwrap_or_else(|_| status.to_string());
    (status, Html(body)).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "No such page.")
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        FAVICON,
    )
        .into_response()
}

async fn live_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        LIVE_JS,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "web/live.html")]
struct LivePage {
    available: bool,
    max_rows: usize,
}

/// Rows the Live page keeps on screen.
const LIVE_ROWS: usize = 500;

async fn live_page(State(app): State<Arc<App>>) -> Response {
    page(Ok(LivePage {
        available: app.live.is_some(),
        max_rows: LIVE_ROWS,
    }))
}

/// The Live feed as server-sent events: `message` with a summary as JSON,
/// `lagged` with how many this page lost by falling behind. Ends with the
/// server's shutdown.
async fn live_events(State(app): State<Arc<App>>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Some(feed) = &app.live else {
        return error(
            StatusCode::NOT_FOUND,
            "Live is unavailable: this process does not read the event bus (saltpipe web).",
        );
    };
    let Some(watcher) = feed.watch() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many Live pages are open; close one and reload.",
        );
    };
    let stop = app.shutdown.clone();
    let stream = futures_util::stream::unfold((watcher, stop), |(mut w, stop)| async move {
        let seen = tokio::select! {
            _ = stop.cancelled() => None,
            s = w.next() => s,
        }?;
        let event = match seen {
            live::Seen::Event(s) => Event::default().json_data(&*s).ok()?,
            live::Seen::Skipped(n) => Event::default().event("lagged").data(n.to_string()),
        };
        Some((Ok::<_, std::convert::Infallible>(event), (w, stop)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn minion_href(m: &str) -> String {
    format!("/minion/{}", enc(m))
}

fn job_href(jid: &str, minion: Option<&str>) -> String {
    match minion {
        Some(m) => format!("/job/{}?minion={}", enc(jid), enc(m)),
        None => format!("/job/{}", enc(jid)),
    }
}

struct LatestView {
    minion: String,
    minion_href: String,
    outcome: String,
    job_href: String,
    when: String,
    fun: String,
}

#[derive(Template)]
#[template(path = "web/overview.html")]
struct OverviewPage {
    /// How old the minion figures and the chart are.
    as_of: String,
    derived: bool,
    total: usize,
    /// (outcome, label, count)
    counts: Vec<(&'static str, &'static str, usize)>,
    chart: chart::Chart,
    /// (function, failures, link)
    failed_funs: Vec<(String, i64, String)>,
    /// (state, failures, search link)
    failed_states: Vec<(String, i64, String)>,
    /// (outcome, heading, minions, truncated)
    groups: Vec<(&'static str, &'static str, Vec<LatestView>, bool)>,
    /// This process's ingest figures (`saltpipe run`); empty for `saltpipe web`.
    ingest: Vec<(&'static str, &'static str, u64)>,
}

/// The overview's ingest figures from the in-process counters: (id, label, value).
fn ingest_figures(s: &crate::stats::Snapshot) -> Vec<(&'static str, &'static str, u64)> {
    vec![
        ("frames", "events read from the bus", s.frames),
        ("kept", "kept by the rules", s.kept),
        ("dropped", "dropped by the rules", s.dropped.values().sum()),
        ("acked", "written (acknowledged)", s.acked),
        ("returns", "returns written", s.returns_written),
        (
            "overflow-spilled",
            "held on disk while the queue was behind",
            s.overflow_spilled,
        ),
        (
            "overflow",
            "lost: queue could not keep up",
            s.overflow_dropped,
        ),
        (
            "queue-errors",
            "queue write errors (retried)",
            s.queue_errors,
        ),
        ("sink-retries", "batch writes retried", s.sink_retries),
        ("dead-letters", "dead letters", s.dead_letters),
        ("disconnects", "bus disconnects", s.disconnects),
        (
            "live-skipped",
            "Live summaries skipped (pages behind)",
            s.web_live_dropped,
        ),
    ]
}

/// Minions listed per group on the overview at most.
const GROUP_ROWS: usize = 200;

const GROUPS: [(&str, &str); 5] = [
    ("failed", "failed"),
    ("no_return", "no return"),
    ("stale", "stale"),
    ("changed", "changed"),
    ("ok", "ok"),
];

async fn overview(State(app): State<Arc<App>>) -> Response {
    page(overview_page(&app).await)
}

async fn overview_page(app: &Arc<App>) -> Result<OverviewPage, StoreError> {
    let ((latest, age), (failed_funs, failed_states), (hourly, _)) = tokio::try_join!(
        app.latest(),
        app.data.failures(SystemTime::now()),
        app.hourly()
    )?;
    let o = data::Overview {
        latest: latest.to_vec(),
        failed_funs,
        failed_states,
        hourly: hourly.to_vec(),
    };
    let counts = GROUPS
        .iter()
        .map(|(k, label)| {
            (
                *k,
                *label,
                o.latest.iter().filter(|l| l.outcome == *k).count(),
            )
        })
        .collect();
    let groups = GROUPS
        .iter()
        .take(3)
        .map(|(k, label)| {
            let all: Vec<&data::Latest> = o.latest.iter().filter(|l| l.outcome == *k).collect();
            let truncated = all.len() > GROUP_ROWS;
            let rows = all
                .into_iter()
                .take(GROUP_ROWS)
                .map(|l| LatestView {
                    minion: l.minion.clone(),
                    minion_href: minion_href(&l.minion),
                    outcome: l.outcome.clone(),
                    job_href: job_href(&l.jid, Some(&l.minion)),
                    when: data::jid_time(&l.jid),
                    fun: l.fun.clone(),
                })
                .collect();
            (*k, *label, rows, truncated)
        })
        .collect();
    Ok(OverviewPage {
        as_of: format!("{} s", age.as_secs()),
        derived: !app.data.outcomes,
        total: o.latest.len(),
        counts,
        chart: chart::hourly(&o.hourly, "/data/hourly.csv"),
        failed_funs: o
            .failed_funs
            .into_iter()
            .map(|(f, n)| {
                let href = format!("/jobs?fun={}&outcome=failed", enc(&f));
                (f, n, href)
            })
            .collect(),
        failed_states: o
            .failed_states
            .into_iter()
            .map(|(s, n)| {
                let id = s.split(" (").next().unwrap_or_default();
                let href = format!("/search?q={}&days=1", enc(id));
                (s, n, href)
            })
            .collect(),
        groups,
        ingest: app
            .live
            .as_ref()
            .map(|l| ingest_figures(&l.stats().snapshot()))
            .unwrap_or_default(),
    })
}

async fn hourly_csv(State(app): State<Arc<App>>) -> Response {
    match app.hourly().await {
        Ok((hourly, _)) => {
            let mut csv = String::from("hour,jobs,returns\n");
            for (h, j, r) in hourly.iter() {
                csv.push_str(&format!("{},{j},{r}\n", chart_hour(h)));
            }
            csv_response(csv)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

fn chart_hour(h: &str) -> String {
    if h.len() >= 10 {
        format!("{}-{}-{}T{}:00", &h[0..4], &h[4..6], &h[6..8], &h[8..10])
    } else {
        h.to_owned()
    }
}

/// A CSV cell: quoted, with formula-starting characters neutralised
/// (a spreadsheet must not run a minion id as a formula).
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn csv_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response()
}

struct JobView {
    jid: String,
    href: String,
    when: String,
    fun: String,
    target: String,
    user: String,
    counts: [i64; 4],
}

#[derive(Template)]
#[template(path = "web/jobs.html")]
struct JobsPage {
    f: JobFilter,
    outcomes: [&'static str; 4],
    rows: Vec<JobView>,
    next_href: String,
    first_href: String,
}

async fn jobs(State(app): State<Arc<App>>, uri: axum::http::Uri) -> Response {
    let q = query(&uri);
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let f = JobFilter {
        fun: get("fun"),
        target: get("target"),
        user: get("user"),
        minion: get("minion"),
        outcome: get("outcome"),
        from: get("from"),
        to: get("to"),
        before: get("before"),
    };
    page(jobs_page(&app, f).await)
}

fn filter_query(f: &JobFilter, before: &str) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("fun", &f.fun),
        ("target", &f.target),
        ("user", &f.user),
        ("minion", &f.minion),
        ("outcome", &f.outcome),
        ("from", &f.from),
        ("to", &f.to),
    ] {
        if !v.is_empty() {
            s.append_pair(k, v);
        }
    }
    if !before.is_empty() {
        s.append_pair("before", before);
    }
    s.finish()
}

async fn jobs_page(app: &App, f: JobFilter) -> Result<JobsPage, StoreError> {
    let (rows, more) = app.data.jobs(&f).await?;
    let next_href = match (more, rows.last()) {
        (true, Some(last)) => format!("/jobs?{}", filter_query(&f, &last.jid)),
        _ => String::new(),
    };
    let first_href = if f.before.is_empty() {
        String::new()
    } else {
        format!("/jobs?{}", filter_query(&f, ""))
    };
    Ok(JobsPage {
        outcomes: data::OUTCOMES,
        rows: rows
            .into_iter()
            .map(|r| JobView {
                href: job_href(&r.jid, None),
                when: data::jid_time(&r.jid),
                jid: r.jid,
                fun: r.fun,
                target: r.target,
                user: r.user,
                counts: r.counts,
            })
            .collect(),
        next_href,
        first_href,
        f,
    })
}

struct ResultView {
    minion: String,
    href: String,
    minion_href: String,
    fun: String,
    outcome: String,
    total: String,
    failed: String,
    changed: String,
    duration: String,
    selected: bool,
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(String::new, |v| v.to_string())
}

fn duration_ms(v: Option<i64>) -> String {
    v.map_or_else(String::new, |ms| {
        if ms < 10_000 {
            format!("{ms} ms")
        } else {
            format!("{:.1} s", ms as f64 / 1000.0)
        }
    })
}

#[derive(Template)]
#[template(path = "web/job.html")]
struct JobPage {
    jid: String,
    found: bool,
    when: String,
    fun: String,
    target: String,
    tgt_type: String,
    user: String,
    args: String,
    results: Vec<ResultView>,
    no_return: Vec<(String, String)>,
    detail: Option<data::ReturnDetail>,
}

async fn job(
    State(app): State<Arc<App>>,
    Path(jid): Path<String>,
    uri: axum::http::Uri,
) -> Response {
    let q = query(&uri);
    page(job_page(&app, jid, q.get("minion").cloned()).await)
}

fn load_text(load: Option<&serde_json::Value>, key: &str) -> String {
    match load.and_then(|l| l.get(key)) {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

async fn job_page(app: &App, jid: String, minion: Option<String>) -> Result<JobPage, StoreError> {
    let job = app.data.job(&jid).await?;
    // The minion asked for, else the first one (failures sort first).
    let chosen = minion.or_else(|| job.results.first().map(|r| r.minion.clone()));
    let detail = match &chosen {
        Some(m) => app.data.detail(&jid, m).await?,
        None => None,
    };
    let l = job.load.as_ref();
    let args = match l.and_then(|l| l.get("arg")) {
        Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
        None => String::new(),
    };
    Ok(JobPage {
        found: job.load.is_some(),
        when: data::jid_time(&jid),
        fun: load_text(l, "fun"),
        target: load_text(l, "tgt"),
        tgt_type: load_text(l, "tgt_type"),
        user: load_text(l, "user"),
        args,
        results: job
            .results
            .iter()
            .map(|r| ResultView {
                href: job_href(&jid, Some(&r.minion)),
                minion_href: minion_href(&r.minion),
                selected: chosen.as_deref() == Some(r.minion.as_str()),
                minion: r.minion.clone(),
                fun: r.fun.clone(),
                outcome: r.outcome.clone(),
                total: opt(r.states_total),
                failed: opt(r.states_failed),
                changed: opt(r.states_changed),
                duration: duration_ms(r.duration_ms),
            })
            .collect(),
        no_return: job
            .no_return
            .iter()
            .map(|m| (m.clone(), minion_href(m)))
            .collect(),
        detail,
        jid,
    })
}

struct HistoryView {
    jid: String,
    href: String,
    when: String,
    fun: String,
    outcome: String,
    total: String,
    failed: String,
    changed: String,
}

#[derive(Template)]
#[template(path = "web/minion.html")]
struct MinionPage {
    id: String,
    timeline: chart::Chart,
    rows: Vec<HistoryView>,
    next_href: String,
    highstate: Option<data::ReturnDetail>,
}

/// Jobs in a minion's timeline chart.
const TIMELINE: usize = 60;

async fn minion(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Response {
    let q = query(&uri);
    page(minion_page(&app, id, q.get("before").cloned().unwrap_or_default()).await)
}

async fn minion_page(app: &App, id: String, before: String) -> Result<MinionPage, StoreError> {
    let (h, recent, highstate) = tokio::try_join!(
        app.data.history(&id, &before, data::PAGE),
        app.data.history(&id, "", TIMELINE),
        app.data.last_highstate(&id)
    )?;
    let items: Vec<(String, String, String)> = recent
        .rows
        .iter()
        .map(|r| {
            (
                r.jid.clone(),
                r.result.outcome.clone(),
                format!(
                    "{} {} {}",
                    data::jid_time(&r.jid),
                    r.result.fun,
                    r.result.outcome
                ),
            )
        })
        .collect();
    let next_href = match (h.more, h.rows.last()) {
        (true, Some(last)) => format!("/minion/{}?before={}", enc(&id), enc(&last.jid)),
        _ => String::new(),
    };
    Ok(MinionPage {
        timeline: chart::timeline(
            &items,
            &enc(&id),
            &format!("/data/minion/{}/timeline.csv", enc(&id)),
        ),
        rows: h
            .rows
            .iter()
            .map(|r| HistoryView {
                href: job_href(&r.jid, Some(&id)),
                when: data::jid_time(&r.jid),
                jid: r.jid.clone(),
                fun: r.result.fun.clone(),
                outcome: r.result.outcome.clone(),
                total: opt(r.result.states_total),
                failed: opt(r.result.states_failed),
                changed: opt(r.result.states_changed),
            })
            .collect(),
        next_href,
        highstate,
        id,
    })
}

async fn timeline_csv(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.data.history(&id, "", TIMELINE).await {
        Ok(h) => {
            let mut csv = String::from("jid,time,function,outcome\n");
            for r in h.rows {
                csv.push_str(&format!(
                    "{},{},{},{}\n",
                    csv_cell(&r.jid),
                    csv_cell(&data::jid_time(&r.jid)),
                    csv_cell(&r.result.fun),
                    csv_cell(&r.result.outcome)
                ));
            }
            csv_response(csv)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Template)]
#[template(path = "web/search.html")]
struct SearchPage {
    q: String,
    days: u64,
    /// How many returns the text search reads at most, as shown.
    text_scan: &'static str,
    jid_href: String,
    /// (minion, link)
    minions: Vec<(String, String)>,
    /// (function, returns, link)
    funs: Vec<(String, i64, String)>,
    /// (jid, minion, function, link)
    returns: Vec<(String, String, String, String)>,
}

async fn search(State(app): State<Arc<App>>, uri: axum::http::Uri) -> Response {
    let q = query(&uri);
    let text = q.get("q").map(|s| s.trim().to_owned()).unwrap_or_default();
    let days = q
        .get("days")
        .and_then(|d| d.parse::<u64>().ok())
        .filter(|d| [1, 7, 30].contains(d))
        .unwrap_or(7);
    page(search_page(&app, text, days).await)
}

const _: () = assert!(data::TEXT_SCAN == 10_000, "update SearchPage::text_scan");

async fn search_page(app: &Arc<App>, q: String, days: u64) -> Result<SearchPage, StoreError> {
    let is_jid = q.len() == 20 && q.bytes().all(|b| b.is_ascii_digit());
    let hits = if q.is_empty() || q.len() > 200 {
        data::Hits::default()
    } else {
        let since = data::jid_at(SystemTime::now() - std::time::Duration::from_secs(days * 86_400));
        let (mut hits, (latest, _)) = tokio::try_join!(app.data.search(&q, &since), app.latest())?;
        hits.minions = data::minions_like(&q, latest.iter().map(|l| l.minion.as_str()));
        hits
    };
    Ok(SearchPage {
        jid_href: if is_jid {
            job_href(&q, None)
        } else {
            String::new()
        },
        minions: hits
            .minions
            .into_iter()
            .map(|m| {
                let h = minion_href(&m);
                (m, h)
            })
            .collect(),
        funs: hits
            .funs
            .into_iter()
            .map(|(f, n)| {
                let h = format!("/jobs?fun={}", enc(&f));
                (f, n, h)
            })
            .collect(),
        returns: hits
            .returns
            .into_iter()
            .map(|(j, m, f)| {
                let h = job_href(&j, Some(&m));
                (j, m, f, h)
            })
            .collect(),
        q,
        days,
        text_scan: "10,000",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell("a\"b"), "\"a\"\"b\"");
        assert_eq!(csv_cell("=HYPERLINK()"), "\"'=HYPERLINK()\"");
    }

    #[test]
    fn credentials_compare() {
        assert!(same(b"Bearer x", b"Bearer x"));
        assert!(!same(b"Bearer x", b"Bearer y"));
    }

    #[test]
    fn pages_escape_what_they_show() {
        let p = ErrorPage {
            status: "500".into(),
            message: "<script>alert(1)</script>",
        };
        let html = p.render().expect("render");
        assert!(
            html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"));
    }
}
