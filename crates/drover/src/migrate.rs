//! `drover migrate`: creates the ledger database if absent, applies the migrations and, with
//! `--roles`, sets up the least-privilege Postgres roles (see docs/security.md).

use crate::cli::Context;
use anyhow::Context as _;
use clap::Args;
use drover_broker::{BrokerAddresses, Topology};
use drover_core::ExposeSecret;
use drover_ledger::{RoleGrants, RoleNames};
use std::process::ExitCode;

/// `drover migrate` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Run it as the role that owns (or will own) schema drover. With --roles it also creates the
three group roles (NOLOGIN) when absent and grants each exactly what its part needs:
  worker     SELECT/INSERT/UPDATE/DELETE on the ledger's tables, its functions; no DDL
  producer   drover.enqueue, drover.record_jobs, drover.mark_published (SECURITY DEFINER)
             and SELECT on drover.jobs narrowed to the rows it submitted (row-level security)
  dashboard  SELECT on the ledger; with --dashboard-actions also retry and cancel
Then give them to login roles, e.g.:
  CREATE ROLE payroll_api LOGIN PASSWORD '...' IN ROLE drover_producer;
With --broker it declares the RabbitMQ queues and exchanges too, the poison queue included
(needs the configure permission; least-privilege workers and producers only check they
exist).
Re-run `drover migrate --roles` with every upgrade: it is idempotent and re-applies grants to
what later migrations create. Needs CREATEROLE (or a superuser) the first time.")]
pub struct MigrateArgs {
    /// Also create the worker, producer and dashboard roles and grant their privileges.
    #[arg(long)]
    roles: bool,
    /// Name of the worker group role.
    #[arg(
        long,
        value_name = "ROLE",
        default_value = "drover_worker",
        requires = "roles"
    )]
    worker_role: String,
    /// Name of the producer group role.
    #[arg(
        long,
        value_name = "ROLE",
        default_value = "drover_producer",
        requires = "roles"
    )]
    producer_role: String,
    /// Name of the dashboard group role.
    #[arg(
        long,
        value_name = "ROLE",
        default_value = "drover_dashboard",
        requires = "roles"
    )]
    dashboard_role: String,
    /// Let the dashboard role retry and cancel jobs (when the dashboard has an admin token).
    #[arg(long, requires = "roles")]
    dashboard_actions: bool,
    /// Also declare the namespace's RabbitMQ exchanges and queues, with an account that has
    /// the configure permission, so workers and producers without it find them.
    #[arg(long)]
    broker: bool,
}

/// `drover migrate`.
pub async fn run(ctx: &Context, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let ledger = ctx.ledger(true, 2).await?;
    ledger.migrate().await.context("drover migrate")?;
    println!("ledger migrated: {}", ctx.conns.database_shown());
    if args.roles {
        let grants = RoleGrants {
            names: RoleNames {
                worker: args.worker_role,
                producer: args.producer_role,
                dashboard: args.dashboard_role,
            },
            dashboard_actions: args.dashboard_actions,
        };
        ledger
            .apply_roles(&grants)
            .await
            .context("drover migrate --roles")?;
        println!(
            "roles granted: worker {}, producer {}, dashboard {}{}",
            grants.names.worker,
            grants.names.producer,
            grants.names.dashboard,
            if grants.dashboard_actions {
                " (with retry and cancel)"
            } else {
                " (read-only)"
            }
        );
    }
    ledger.close().await;
    if args.broker {
        let broker = BrokerAddresses::parse(ctx.conns.amqp_url.expose_secret())?
            .connect("drover-migrate")
            .await?;
        let topo = Topology::for_connections(&ctx.conns);
        broker.declare(&topo).await?;
        broker.declare_poison(&topo).await?;
        println!("broker topology declared: {}", broker.endpoint());
        broker.close().await?;
    }
    Ok(ExitCode::SUCCESS)
}
