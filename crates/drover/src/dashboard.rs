//! `drover dashboard`: serves the web dashboard (`drover-dashboard`) over the configured
//! ledger and broker until SIGTERM or SIGINT.

use crate::cli::Context;
use anyhow::Context as _;
use clap::Args;
use drover_broker::Topology;
use drover_core::SecretString;
use drover_dashboard::{DEFAULT_ADDR, DashboardConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `drover dashboard` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Pages: / (overview), /jobs (filter, search, page), /jobs/KEY (detail, live while running).
JSON: /api/overview, /api/jobs, /api/jobs/KEY; actions POST /api/jobs/KEY/retry|cancel and
/api/bulk/retry-dead with `Authorization: Bearer TOKEN`.

Without an admin token the dashboard is read-only. With one, log in from the browser
(session cookie, CSRF-protected forms) to retry, cancel and bulk-retry; every action is
recorded in the ledger table drover.actions. Prefer DROVER_DASHBOARD_TOKEN_FILE or the
environment to --admin-token: a flag is visible to every user in the process list.")]
pub struct DashboardArgs {
    /// Address to listen on. The default is loopback only; to expose the dashboard, put it
    /// behind a TLS-terminating proxy.
    #[arg(long, env = "DROVER_DASHBOARD_ADDR", value_name = "ADDR", default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Admin token enabling actions (retry, cancel). Absent: read-only.
    #[arg(
        long,
        env = "DROVER_DASHBOARD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    admin_token: Option<String>,
    /// File holding the admin token (its first line; surrounding whitespace is ignored).
    #[arg(long, env = "DROVER_DASHBOARD_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// A worker whose newest heartbeat is older than this is shown as stale [default: 30].
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stale_after_secs: u64,
}

fn admin_token(args: &DashboardArgs) -> anyhow::Result<Option<SecretString>> {
    if let Some(t) = &args.admin_token {
        anyhow::ensure!(
            !t.trim().is_empty(),
            "--admin-token / DROVER_DASHBOARD_TOKEN is empty; unset it for a read-only dashboard"
        );
        return Ok(Some(SecretString::from(t.trim().to_string())));
    }
    let Some(path) = &args.admin_token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "--admin-token-file / DROVER_DASHBOARD_TOKEN_FILE {}",
            path.display()
        )
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "--admin-token-file / DROVER_DASHBOARD_TOKEN_FILE {}: the file's first line is empty",
        path.display()
    );
    Ok(Some(SecretString::from(token)))
}

/// `drover dashboard`.
pub async fn run(ctx: &Context, args: DashboardArgs) -> anyhow::Result<ExitCode> {
    let token = admin_token(&args)?;
    let read_only = token.is_none();
    let config = DashboardConfig {
        database_url: ctx.conns.database_url.clone(),
        amqp_url: ctx.conns.amqp_url.clone(),
        topology: Topology::for_connections(&ctx.conns),
        admin_token: token,
        stale_after: Duration::from_secs(args.stale_after_secs),
    };
    let ledger = ctx.conns.database_shown();
    drover_dashboard::run(
        config,
        args.addr,
        |bound| {
            let mode = if read_only {
                "read-only (no admin token)"
            } else {
                "admin token set: log in to act on jobs"
            };
            // stdout, so scripts and people both see where to go.
            println!("drover dashboard: http://{bound}/  ({mode}; ledger {ledger})");
            tracing::info!(addr = %bound, read_only, "dashboard listening");
        },
        crate::daemon::wait_for_signal(),
    )
    .await
    .context("drover dashboard")?;
    Ok(ExitCode::SUCCESS)
}
