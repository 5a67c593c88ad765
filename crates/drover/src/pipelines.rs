//! `drover pipelines`: the pipelines this binary knows, each with its one-line summary, and
//! `--describe NAME` for one pipeline's params, columns (with units) and result.

use crate::cli::Context;
use clap::Args;
use std::process::ExitCode;

/// `drover pipelines` arguments.
#[derive(Debug, Args)]
pub struct PipelinesArgs {
    /// Describe one pipeline: params with types and defaults, input and output columns with
    /// their units, and what its result holds.
    #[arg(long, value_name = "NAME")]
    describe: Option<String>,
    /// Print as JSON (with --describe).
    #[arg(long, requires = "describe")]
    json: bool,
}

/// `drover pipelines`.
pub fn run(ctx: &Context, args: PipelinesArgs) -> anyhow::Result<ExitCode> {
    let Some(name) = args.describe else {
        let names = ctx.registry.names();
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        for name in names {
            match ctx.registry.describe(name)? {
                Some(d) => println!("{name:width$}  {}", d.summary),
                None => println!("{name}"),
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    match ctx.registry.describe(&name)? {
        Some(d) if args.json => println!("{}", serde_json::to_string_pretty(&d)?),
        Some(d) => print!("{name}: {d}"),
        None => println!("{name}: this pipeline gives no description"),
    }
    Ok(ExitCode::SUCCESS)
}
