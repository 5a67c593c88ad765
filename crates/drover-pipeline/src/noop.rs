//! The `noop` pipeline: no input, no output, configurable sleeps and injected failures. It
//! exists to exercise the daemon (retries, backoff, leases, cancellation, shutdown) without
//! data.
//!
//! Params (all optional; unknown params are an error):
//!
//! | param | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `sleep_ms` | u64 | 0 | sleep this long in every batch |
//! | `fail_attempts` | u32 | 0 | attempts `1..=N` fail on their first batch |
//! | `fail_kind` | `transient` \| `permanent` | `transient` | how injected failures are classified |
//! | `batches` | u32 >= 1 | 1 | number of batches (each counts one row) |
//!
//! Result: `{"rows": batches, "batches": batches}`.

use crate::{
    BatchContext, ErrorKind, Input, JobSpec, Output, ParamReader, Pipeline, PipelineError, Summary,
};
use polars::prelude::DataFrame;
use serde_json::{Value, json};
use std::time::Duration;

/// The `noop` pipeline (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

/// Validated `noop` params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoopParams {
    /// Sleep per batch.
    pub sleep: Duration,
    /// Attempts `1..=fail_attempts` fail on their first batch.
    pub fail_attempts: u32,
    /// Classification of injected failures.
    pub fail_kind: ErrorKind,
    /// Number of batches.
    pub batches: u32,
}

impl Pipeline for Noop {
    type Params = NoopParams;
    type Reference = ();

    fn name(&self) -> &'static str {
        "noop"
    }

    fn describe(&self) -> Option<crate::Description> {
        use crate::Field;
        Some(crate::Description {
            summary: "no input, no output: sleeps and injected failures, to try the daemon",
            params: vec![
                Field::optional(
                    "sleep_ms",
                    "u64 milliseconds",
                    "0",
                    "sleep this long in every batch",
                ),
                Field::optional(
                    "fail_attempts",
                    "u32",
                    "0",
                    "attempts 1..=N fail on their first batch",
                ),
                Field::optional(
                    "fail_kind",
                    "transient | permanent",
                    "transient",
                    "how injected failures are classified",
                ),
                Field::optional(
                    "batches",
                    "u32 >= 1",
                    "1",
                    "number of batches (each counts one row)",
                ),
            ],
            input_columns: Vec::new(),
            output_columns: Vec::new(),
            result: "{\"rows\": batches, \"batches\": batches}",
        })
    }

    fn validate(&self, params: &Value) -> Result<NoopParams, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let sleep_ms = r
            .optional_u64("sleep_ms", 0, 24 * 3600 * 1000)?
            .unwrap_or(0);
        let fail_attempts = r
            .optional_u64("fail_attempts", 0, u32::MAX as u64)?
            .unwrap_or(0) as u32;
        let fail_kind = match r.optional_str("fail_kind")? {
            None => ErrorKind::Transient,
            Some(s) => ErrorKind::parse(s).ok_or_else(|| {
                PipelineError::permanent(format!(
                    "noop: param \"fail_kind\": expected \"transient\" or \"permanent\", got \"{s}\""
                ))
            })?,
        };
        let batches = r.optional_u64("batches", 1, u32::MAX as u64)?.unwrap_or(1) as u32;
        r.finish()?;
        Ok(NoopParams {
            sleep: Duration::from_millis(sleep_ms),
            fail_attempts,
            fail_kind,
            batches,
        })
    }

    fn version(&self, _params: &NoopParams) -> String {
        "noop-1".to_string()
    }

    fn input(&self, params: &NoopParams, _spec: &JobSpec) -> Result<Input, PipelineError> {
        Ok(Input::synthetic(params.batches))
    }

    fn output(&self, _params: &NoopParams) -> Output {
        Output::None
    }

    fn load_reference(&self, _params: &NoopParams) -> Result<(), PipelineError> {
        Ok(())
    }

    fn transform(
        &self,
        params: &NoopParams,
        _reference: &(),
        _batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError> {
        if ctx.first_in_attempt && ctx.attempt <= params.fail_attempts {
            let msg = format!(
                "noop: injected {} failure on attempt {} of fail_attempts={}",
                params.fail_kind, ctx.attempt, params.fail_attempts
            );
            return Err(match params.fail_kind {
                ErrorKind::Transient => PipelineError::transient(msg),
                ErrorKind::Permanent => PipelineError::permanent(msg),
            });
        }
        if !params.sleep.is_zero() {
            std::thread::sleep(params.sleep);
        }
        Ok(None)
    }

    fn result(&self, totals: &Summary, batches: u32) -> Value {
        json!({"rows": totals.get("rows").copied().unwrap_or(0), "batches": batches})
    }
}
