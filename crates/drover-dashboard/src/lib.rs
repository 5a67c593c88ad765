//! drover-dashboard: the web UI and JSON API over the ledger and the broker.
//!
//! Server-rendered HTML (minijinja templates embedded with `include_str!`, auto-escaped), one
//! small plain-JavaScript file for the live parts (server-sent events), no front-end
//! toolchain. Everything a producer supplied — keys, params, errors, pipeline names — reaches
//! a page only through an escaping template; scripts are served as files so the
//! Content-Security-Policy forbids inline ones.
//!
//! * Reads: `GET /` (overview), `GET /jobs` (filtered, keyset-paged list), `GET /jobs/{key}`
//!   (detail, live while running via `GET /jobs/{key}/events`), and the same under `/api/`.
//! * Actions: retry, cancel, bulk retry of dead jobs, only with the admin token (a login form
//!   sets a session cookie; scripts send `Authorization: Bearer`), each recorded in
//!   `drover.actions`. Without a token the dashboard is read-only.
//!
//! The actions are the ledger's operator transitions ([`drover_ledger::Ledger::redrive`],
//! [`drover_ledger::Ledger::request_cancel`]), the same ones `drover jobs retry/cancel` use.

mod actions;
mod api;
mod auth;
mod broker;
mod chart;
mod error;
mod filters;
mod live;
mod pages;
mod redact;
mod templates;

pub use error::DashboardError;
pub use redact::redact_params;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::routing::{get, post};
use drover_broker::Topology;
use drover_core::{ExposeSecret, SecretString};
use drover_ledger::Ledger;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The default address: loopback only, so a dashboard is never exposed by accident.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// What the dashboard needs to run.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// The ledger (read, plus the operator transitions and `drover.actions` when an admin
    /// token is set).
    pub database_url: SecretString,
    /// The broker, asked for queue depth and consumers by passive declare.
    pub amqp_url: SecretString,
    /// The namespace's queues.
    pub topology: Topology,
    /// The admin token; `None` makes the dashboard read-only.
    pub admin_token: Option<SecretString>,
    /// A worker whose newest heartbeat is older than this is shown as stale.
    pub stale_after: Duration,
}

/// State shared by every request.
pub(crate) struct App {
    pub ledger: Ledger,
    pub broker: broker::BrokerProbe,
    pub auth: auth::Auth,
    pub templates: templates::Templates,
    pub live: live::Live,
    pub stale_after: Duration,
}

pub(crate) type AppState = Arc<App>;

/// A running dashboard's router, built from a connected ledger. Tests and embedders serve it
/// on a listener of their own with [`serve_router`].
pub async fn router(config: DashboardConfig) -> Result<Router, DashboardError> {
    let ledger = Ledger::connect(
        config.database_url.expose_secret(),
        false,
        8,
        Duration::from_secs(10),
    )
    .await?;
    ledger.check_dashboard_schema().await?;
    let live = live::Live::start(ledger.clone());
    let app = Arc::new(App {
        ledger,
        broker: broker::BrokerProbe::new(config.amqp_url, config.topology),
        auth: auth::Auth::new(config.admin_token),
        templates: templates::Templates::new()?,
        live,
        stale_after: config.stale_after,
    });
    Ok(routes(app))
}

fn routes(app: AppState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{key}", get(pages::job))
        .route("/jobs/{key}/events", get(live::job_events))
        .route("/jobs/{key}/retry", post(pages::retry))
        .route("/jobs/{key}/cancel", post(pages::cancel))
        .route("/bulk/retry-dead", post(pages::bulk_retry_dead))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/static/dashboard.js", get(pages::script))
        .route("/static/dashboard.css", get(pages::stylesheet))
        .route("/api/overview", get(api::overview))
        .route("/api/jobs", get(api::jobs))
        .route("/api/jobs/{key}", get(api::job))
        .route("/api/jobs/{key}/retry", post(api::retry))
        .route("/api/jobs/{key}/cancel", post(api::cancel))
        .route("/api/bulk/retry-dead", post(api::bulk_retry_dead))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// The Content-Security-Policy of every response: scripts and styles only from our own
/// files (no inline script can run, whatever a producer managed to put in a page), no
/// framing, forms only to ourselves.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
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
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// Serves `router` on `listener` until `shutdown` resolves, with each client's address
/// available to the handlers (it is recorded with every action).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(DashboardError::Serve)
}

/// Binds `addr`, then serves the dashboard until `shutdown` resolves. `on_ready` is called
/// with the bound address (the port is known even when `addr` asked for port 0) before the
/// first request is accepted.
pub async fn run(
    config: DashboardConfig,
    addr: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    let router = router(config).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DashboardError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DashboardError::Bind { addr, source })?;
    on_ready(bound);
    serve_router(listener, router, shutdown).await
}
