//! `drover schedules`: jobs that run on a cron expression or a fixed period.

use crate::cli::Context;
use anyhow::bail;
use clap::{ArgGroup, Args, Subcommand};
use drover_core::schedule::{self, CatchUp, KeyTemplate, Spec};
use drover_ledger::{NewSchedule, ScheduleView};
use serde_json::Value;
use std::process::ExitCode;

/// `drover schedules` subcommands.
#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  drover schedules add payroll-monthly --cron '0 6 1 * *' --pipeline payroll \\
      --param input=/data/payroll.parquet --key-template 'acme:{name}:{date}'
  drover schedules add refresh --every 10m --pipeline noop --key-template 'refresh:{slot}'
  drover schedules list
  drover schedules pause refresh

Every worker fires the due slots (leader-free): each slot fires exactly once however many
workers run, as a job enqueued with the key the template gives it, visible in `drover jobs
list` like any other. Times are UTC.")]
pub enum SchedulesCommand {
    /// Add a schedule.
    Add(AddArgs),
    /// List schedules with their next slot and last job.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (the jobs it enqueued stay).
    Remove {
        /// Schedule name.
        name: String,
    },
    /// Pause a schedule: no slot fires until it is resumed.
    Pause {
        /// Schedule name.
        name: String,
    },
    /// Resume a paused schedule from its next slot after now (slots that fell while it was
    /// paused do not fire).
    Resume {
        /// Schedule name.
        name: String,
    },
}

/// `drover schedules add` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("when").required(true).args(["cron", "every"])))]
pub struct AddArgs {
    /// Schedule name: 1-64 of [A-Za-z0-9_.-].
    name: String,
    /// Cron expression, UTC: 5 fields (minute hour day-of-month month day-of-week), 6 with
    /// seconds first, 7 with a year last, or @hourly/@daily/@weekly/@monthly/@yearly. Name
    /// the days of the week (MON-FRI): numbered days differ between cron dialects.
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
    /// A fixed period (30s, 10m, 1h, 1d). Slots are multiples of it since 1970-01-01 UTC:
    /// `--every 1h` fires on the hour, `--every 1d` at midnight UTC.
    #[arg(long, value_name = "DURATION")]
    every: Option<String>,
    /// The pipeline of the scheduled jobs.
    #[arg(long)]
    pipeline: String,
    /// A job param (repeatable): `name=value`; the value is read as JSON when it parses
    /// (numbers, true, null, quoted strings), else as a string.
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// Job params as one JSON object (merged under --param).
    #[arg(long, value_name = "JSON")]
    params_json: Option<String>,
    /// Rows per batch of the scheduled jobs [default: the pipeline's].
    #[arg(long, value_name = "N")]
    batch_size: Option<u32>,
    /// Idempotency key of each slot's job. Placeholders: {name} (the schedule's), {slot}
    /// (the slot's time, RFC 3339, e.g. 2026-12-01T06:00:00Z), {date} (its date,
    /// 2026-12-01). Must contain {slot}, or {date} for schedules that fire at most daily.
    #[arg(long, value_name = "TEMPLATE")]
    key_template: String,
    /// Slots missed while no worker ran: `none` skips them (a slot more than 60 s late is
    /// missed), `latest` fires the most recent one, `all` fires every one, oldest first.
    #[arg(long, value_name = "POLICY", default_value = "latest")]
    catch_up: String,
}

/// Runs a `drover schedules` subcommand.
pub async fn run(ctx: &Context, cmd: SchedulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SchedulesCommand::Add(args) => add(ctx, args).await,
        SchedulesCommand::List { json } => {
            let ledger = ctx.migrated_ledger(2).await?;
            let mut list = ledger.schedules().await?;
            // Params are shown with credentials in URLs redacted, as `jobs show` does.
            for s in &mut list {
                s.params.0 = drover_core::config::redact_params(&s.params.0);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        SchedulesCommand::Remove { name } => {
            let ledger = ctx.migrated_ledger(2).await?;
            if !ledger.remove_schedule(&name).await? {
                bail!("no schedule named {name:?} (see `drover schedules list`)");
            }
            println!("schedule {name} removed (the jobs it enqueued stay)");
            Ok(ExitCode::SUCCESS)
        }
        SchedulesCommand::Pause { name } => {
            let ledger = ctx.migrated_ledger(2).await?;
            if !ledger.pause_schedule(&name).await? {
                bail!("no schedule named {name:?} (see `drover schedules list`)");
            }
            println!("schedule {name} paused");
            Ok(ExitCode::SUCCESS)
        }
        SchedulesCommand::Resume { name } => {
            let ledger = ctx.migrated_ledger(2).await?;
            let Some(s) = ledger.schedule(&name).await? else {
                bail!("no schedule named {name:?} (see `drover schedules list`)");
            };
            let spec = Spec::stored(s.cron.as_deref(), s.every_secs)?;
            let next = spec.next_after(ledger.now().await?)?;
            ledger.resume_schedule(&name, next).await?;
            println!("schedule {name} resumed; next slot {}", next.to_rfc3339());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn add(ctx: &Context, args: AddArgs) -> anyhow::Result<ExitCode> {
    schedule::check_name(&args.name)?;
    let spec = match (&args.cron, &args.every) {
        (Some(c), None) => Spec::cron(c)?,
        (None, Some(e)) => Spec::every(e)?,
        _ => bail!("give exactly one of --cron and --every"),
    };
    let catch_up: CatchUp = args.catch_up.parse()?;
    let template = KeyTemplate::parse(&args.key_template)?;
    let params = crate::publish::params_from_flags(args.params_json.as_deref(), &args.params)?;
    let batch_size = match args.batch_size {
        None => None,
        Some(b) if (1..=10_000_000).contains(&b) => Some(b as i32),
        Some(b) => bail!("--batch-size {b}: expected an integer from 1 to 10000000"),
    };
    // The same checks a publish makes: the pipeline exists here and accepts the params.
    ctx.registry
        .preflight(&args.pipeline, &Value::Object(params.clone()))
        .map_err(|e| anyhow::anyhow!("--pipeline {:?} / --param: {e}", args.pipeline))?;
    let ledger = ctx.migrated_ledger(2).await?;
    let now = ledger.now().await?;
    template.check_distinct(&args.name, &spec, now)?;
    let next_slot = spec.next_after(now)?;
    ledger
        .add_schedule(&NewSchedule {
            name: args.name.clone(),
            spec: spec.clone(),
            pipeline: args.pipeline.clone(),
            params,
            batch_size,
            key_template: template.clone(),
            catch_up,
            next_slot,
        })
        .await?;
    println!(
        "schedule {} added: {spec}, pipeline {}, catch-up {catch_up}; first slot {} (job key {})",
        args.name,
        args.pipeline,
        next_slot.to_rfc3339(),
        template.render(&args.name, next_slot)
    );
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &[ScheduleView]) {
    if list.is_empty() {
        println!("no schedules (add one with `drover schedules add`)");
        return;
    }
    println!(
        "{:<24} {:<22} {:<14} {:<8} {:<8} {:<20} LAST JOB",
        "NAME", "WHEN", "PIPELINE", "CATCH-UP", "STATE", "NEXT SLOT (UTC)"
    );
    for s in list {
        let when = match (&s.cron, s.every_secs) {
            (Some(c), _) => format!("cron {c}"),
            (None, Some(secs)) => format!(
                "every {}",
                humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()))
            ),
            (None, None) => "?".into(),
        };
        let state = if s.paused { "paused" } else { "active" };
        let last = match (&s.last_key, &s.last_error) {
            (_, Some(e)) => format!("error: {e}"),
            (Some(k), None) => k.clone(),
            (None, None) => "-".into(),
        };
        println!(
            "{:<24} {:<22} {:<14} {:<8} {:<8} {:<20} {}",
            s.name,
            when,
            s.pipeline,
            s.catch_up,
            state,
            s.next_slot.format("%Y-%m-%d %H:%M:%S"),
            last
        );
    }
}
