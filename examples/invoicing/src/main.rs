use drover::{
    BatchContext, Input, JobSpec, OutputSchema, ParamReader, Pipeline, PipelineError, Registry,
    Summary,
};
use polars::prelude::*;
use serde_json::Value;

/// Invoice lines taxed at their region's rate (basis points), from a table loaded once per attempt.
struct Invoices;

struct Params {
    input: String,
    rates: String,
}

impl Pipeline for Invoices {
    type Params = Params;
    type Reference = LazyFrame;
    fn name(&self) -> &'static str {
        "invoices"
    }
    /// Bump with any change to how tax is computed: a job never resumes under another.
    fn version(&self, _: &Params) -> String {
        "invoices-1".into()
    }
    fn output_schema(&self, _: &Params) -> Option<OutputSchema> {
        Some(
            OutputSchema::new()
                .column("customer", DataType::String)
                .column("region", DataType::String)
                .column("cents", DataType::Int64)
                .column("rate_bp", DataType::Int64)
                .column("tax_cents", DataType::Int64),
        )
    }
    fn validate(&self, params: &Value) -> Result<Params, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let p = Params {
            input: r.required_str("input")?.into(),
            rates: r.required_str("rates")?.into(),
        };
        r.finish()?;
        Ok(p)
    }
    fn input(&self, p: &Params, _: &JobSpec) -> Result<Input, PipelineError> {
        Ok(Input::file(&p.input)
            .column("customer", DataType::String)
            .column("region", DataType::String)
            .column("cents", DataType::Int64))
    }
    fn load_reference(&self, p: &Params) -> Result<LazyFrame, PipelineError> {
        Ok(CsvReadOptions::default()
            .try_into_reader_with_file_path(Some(p.rates.as_str().into()))?
            .finish()?
            .lazy())
    }
    fn transform(
        &self,
        _: &Params,
        rates: &LazyFrame,
        batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError> {
        let out = batch
            .lazy()
            .join(
                rates.clone(),
                [col("region")],
                [col("region")],
                JoinArgs::new(JoinType::Left),
            )
            .with_column(
                (col("cents") * col("rate_bp") / lit(10_000i64))
                    .cast(DataType::Int64)
                    .alias("tax_cents"),
            )
            .collect()?;
        if let Some(i) = out
            .column("rate_bp")?
            .is_null()
            .iter()
            .position(|null| null == Some(true))
        {
            return Err(PipelineError::permanent(format!(
                "row {}: no tax rate for region {}",
                ctx.first_row + i as u64,
                out.column("region")?.get(i)?
            )));
        }
        Ok(Some(out))
    }
    fn summarise(&self, rows: u64, out: Option<&DataFrame>) -> Result<Summary, PipelineError> {
        let tax = match out {
            Some(df) => df.column("tax_cents")?.i64()?.sum().unwrap_or(0),
            None => 0,
        };
        Ok(Summary::from([
            ("rows".into(), rows as i64),
            ("tax_cents".into(), tax),
        ]))
    }
}

fn main() -> std::process::ExitCode {
    let mut registry = Registry::builtin();
    registry.register(Invoices);
    drover::main(registry)
}
