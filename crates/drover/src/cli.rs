//! Command-line interface: the clap definitions and the dispatch to each subcommand.

use crate::logging::LogFormat;
use clap::{Args, Parser, Subcommand};
use drover_core::ExposeSecret;
use drover_core::config::{AMQP_URL_SETTING, Connections, DATABASE_URL_SETTING, FileConfig};
use drover_ledger::Ledger;
use drover_pipeline::Registry;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const ABOUT: &str = "Durable RabbitMQ + Postgres worker daemon for batched polars jobs.";
const LONG_ABOUT: &str = "\
Durable RabbitMQ + Postgres worker daemon for batched polars jobs.

Producers publish job messages (contract v1, JSON) to the queue {ns}.jobs; `drover worker`
consumes them with a bounded prefetch, runs each job's pipeline over its input in fixed-size
batches, and keeps an idempotency-keyed ledger in Postgres (schema `drover`).

Configuration comes from flags, then environment variables, then a TOML file (--config, or
./drover.toml when present), then defaults that work with local services:
  DROVER_AMQP_URL   amqp://guest:guest@127.0.0.1:5672/%2f  (a cluster: its nodes' URLs,
                    comma-separated; workers fail over between them)
  DATABASE_URL      postgres://postgres@127.0.0.1:5432/drover  (created if absent)
  DROVER_NAMESPACE  drover  (queues drover.jobs and drover.dead)
The URLs carry passwords: give them as files instead (DROVER_AMQP_URL_FILE,
DATABASE_URL_FILE: a Kubernetes secret or systemd credential). TLS: postgres://…?sslmode=
verify-full&sslrootcert=FILE, amqps://…?cacertfile=FILE[&certfile=FILE&keyfile=FILE].
Least-privilege Postgres roles: drover migrate --roles (see docs/security.md).

Quick start:
  drover migrate
  drover worker &
  drover publish --pipeline noop --key hello-1
  drover jobs wait hello-1";

/// The `drover` command line.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts. Listed under their own heading so a subcommand's
/// `--help` shows its own flags first and these apart, instead of mixed in.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options (see drover --help)")]
pub struct GlobalArgs {
    /// RabbitMQ URL (amqp:// or amqps://). For a cluster, every node's URL separated by
    /// commas (amqp://u:p@rabbit-1/%2f,amqp://u:p@rabbit-2/%2f): commands connect to the first
    /// that answers, and a worker that loses its node fails over to the next one (a comma in
    /// a password is written %2C).
    #[arg(
        long,
        env = "DROVER_AMQP_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub amqp_url: Option<String>,
    /// Postgres URL of the ledger database.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// File holding the RabbitMQ URL (a mounted secret), instead of --amqp-url.
    #[arg(long, env = "DROVER_AMQP_URL_FILE", global = true, value_name = "FILE")]
    pub amqp_url_file: Option<PathBuf>,
    /// File holding the Postgres URL (a mounted secret), instead of --database-url.
    #[arg(long, env = "DATABASE_URL_FILE", global = true, value_name = "FILE")]
    pub database_url_file: Option<PathBuf>,
    /// Namespace: prefixes the queues ({ns}.jobs, {ns}.dead) [default: drover].
    #[arg(long, env = "DROVER_NAMESPACE", global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// TOML config file [default: ./drover.toml if it exists].
    #[arg(long, env = "DROVER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format [default: text on a terminal, json otherwise]. Filter with DROVER_LOG.
    #[arg(long, env = "DROVER_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// More log detail (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the ledger database if absent and apply migrations (idempotent; safe to run
    /// from several replicas at once); `--roles` also sets up least-privilege Postgres roles.
    Migrate(crate::migrate::MigrateArgs),
    /// Publish jobs: record each as `queued` in the ledger, then publish its message with
    /// publisher confirms. A key that exists already is not published again; if it exists
    /// for a different request (pipeline, params, options) that is a conflict (exit 1).
    // The usage line is fixed: clap's own repeats every flag already given (the global
    // ones from the environment too), which made --database-url look required.
    #[command(
        override_usage = "drover publish [OPTIONS] --pipeline <PIPELINE> --key <KEY>\n       drover publish [OPTIONS] --file <FILE>"
    )]
    Publish(crate::publish::PublishArgs),
    /// Run the worker daemon in the foreground (SIGTERM/SIGINT drain it and exit 0).
    Worker(crate::daemon::WorkerArgs),
    /// Inspect and steer jobs in the ledger.
    #[command(subcommand)]
    Jobs(crate::jobs::JobsCommand),
    /// Run a pipeline in-process, without broker or ledger, and print its summary.
    Run(crate::run::RunArgs),
    /// Jobs on a cron expression or a fixed period: add, list, remove, pause, resume.
    #[command(subcommand)]
    Schedules(crate::schedules::SchedulesCommand),
    /// Delete finished jobs older than a duration from the ledger (outputs only when asked).
    Prune(crate::prune::PruneArgs),
    /// Compare the ledger with the broker: stale leases, jobs without a message, overdue
    /// retries; `--fix` re-drives and publishes them.
    Doctor(crate::doctor::DoctorArgs),
    /// Counts by state and pipeline, and p50/p95 durations over a window, from the ledger.
    Stats(crate::jobs::StatsArgs),
    /// List the pipelines this binary knows, one line each; `--describe NAME` for one
    /// pipeline's params, columns and units, and result.
    Pipelines(crate::pipelines::PipelinesArgs),
    /// Serve the web dashboard: overview, jobs, job detail (live), retry/cancel with the
    /// admin token, JSON under /api/.
    Dashboard(crate::dashboard::DashboardArgs),
    /// Which part holds input row N of a job (`--row N`), or the job's whole lineage.
    Lineage(crate::lineage::LineageArgs),
    /// Re-hash jobs' output parts against their manifest and the ledger and reconcile row
    /// counts; names the first batch that disagrees and exits 1 on any mismatch.
    Verify(crate::lineage::VerifyArgs),
    /// Demo helpers.
    #[command(subcommand)]
    Demo(crate::demo::DemoCommand),
}

/// Everything a subcommand may need from the layered configuration.
pub struct Context {
    /// Broker, ledger, namespace and queue settings, resolved once for every command.
    pub conns: Connections,
    /// The TOML file's other tables (`[worker]`, `[retry]`).
    pub file: FileConfig,
    /// The pipelines this binary runs and validates.
    pub registry: Registry,
}

impl Context {
    /// Connects to the ledger (bounded by a 10 s timeout), creating the database if asked.
    pub async fn ledger(
        &self,
        create_database: bool,
        max_connections: u32,
    ) -> anyhow::Result<Ledger> {
        let ledger = Ledger::connect(
            self.conns.database_url.expose_secret(),
            create_database,
            max_connections,
            Duration::from_secs(10),
        )
        .await?;
        Ok(ledger)
    }

    /// Connects to the ledger and checks it has been migrated.
    pub async fn migrated_ledger(&self, max_connections: u32) -> anyhow::Result<Ledger> {
        let ledger = self.ledger(false, max_connections).await?;
        ledger.check_schema().await?;
        Ok(ledger)
    }
}

/// Resolves the configuration and runs the chosen subcommand.
pub async fn dispatch(cli: Cli, registry: Registry) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    let file = FileConfig::load(g.config.as_deref())?;
    let amqp_url = AMQP_URL_SETTING.resolve(g.amqp_url, g.amqp_url_file.as_deref())?;
    let database_url =
        DATABASE_URL_SETTING.resolve(g.database_url, g.database_url_file.as_deref())?;
    let conns = Connections::resolve(amqp_url, database_url, g.namespace, &file)?;
    let ctx = Context {
        conns,
        file,
        registry,
    };
    match cli.command {
        Command::Migrate(args) => crate::migrate::run(&ctx, args).await,
        Command::Publish(args) => crate::publish::run(&ctx, args).await,
        Command::Worker(args) => crate::daemon::run(&ctx, args).await,
        Command::Jobs(cmd) => crate::jobs::run(&ctx, cmd).await,
        Command::Run(args) => crate::run::run(&ctx, args).await,
        Command::Prune(args) => crate::prune::run(&ctx, args).await,
        Command::Schedules(cmd) => crate::schedules::run(&ctx, cmd).await,
        Command::Doctor(args) => crate::doctor::run(&ctx, args).await,
        Command::Stats(args) => crate::jobs::stats(&ctx, args).await,
        Command::Pipelines(args) => crate::pipelines::run(&ctx, args),
        Command::Lineage(args) => crate::lineage::lineage(&ctx, args).await,
        Command::Verify(args) => crate::lineage::verify(&ctx, args).await,
        Command::Demo(cmd) => crate::demo::run(cmd).await,
        Command::Dashboard(args) => crate::dashboard::run(&ctx, args).await,
    }
}
