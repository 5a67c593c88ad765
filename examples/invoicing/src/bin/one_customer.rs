use drover::{BatchContext, Input, JobSpec, ParamReader, Pipeline, PipelineError, Registry};
use polars::prelude::*;
use serde_json::Value;

/// Keeps the invoice lines of one customer: `input` (CSV or Parquet) and `customer` params.
struct OneCustomer;

impl Pipeline for OneCustomer {
    type Params = (String, String);
    type Reference = ();
    fn name(&self) -> &'static str {
        "one_customer"
    }
    fn validate(&self, params: &Value) -> Result<Self::Params, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let p = (r.required_str("input")?.to_string(), r.required_str("customer")?.to_string());
        r.finish()?; // an unknown param is an error, not ignored
        Ok(p)
    }
    fn input(&self, p: &Self::Params, _: &JobSpec) -> Result<Input, PipelineError> {
        Ok(Input::file(&p.0).column("customer", DataType::String).column("cents", DataType::Int64))
    }
    fn load_reference(&self, _: &Self::Params) -> Result<(), PipelineError> {
        Ok(())
    }
    fn transform(&self, p: &Self::Params, _: &(), batch: DataFrame, _: &BatchContext) -> DataFrameResult {
        Ok(Some(batch.lazy().filter(col("customer").eq(lit(p.1.clone()))).collect()?))
    }
}

type DataFrameResult = Result<Option<DataFrame>, PipelineError>;

fn main() -> std::process::ExitCode {
    let mut registry = Registry::builtin();
    registry.register(OneCustomer);
    drover::main(registry)
}
