//! Output contracts: the columns a pipeline promises in every part, checked on each batch's
//! output before its part is written (see [`Pipeline::output_schema`](crate::Pipeline::output_schema)).

use crate::PipelineError;
use polars::prelude::{DataFrame, DataType};

/// One promised column.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    /// Column name.
    pub name: String,
    /// Its exact dtype.
    pub dtype: DataType,
    /// Whether nulls are allowed.
    pub nullable: bool,
}

/// The columns of every part a pipeline writes, in order, and nothing else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputSchema {
    /// Promised columns.
    pub columns: Vec<OutputColumn>,
}

impl OutputSchema {
    /// An empty schema, to add columns to.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a column that must hold no nulls.
    pub fn column(mut self, name: &str, dtype: DataType) -> Self {
        self.columns.push(OutputColumn {
            name: name.to_string(),
            dtype,
            nullable: false,
        });
        self
    }

    /// Adds a column that may hold nulls.
    pub fn nullable(mut self, name: &str, dtype: DataType) -> Self {
        self.columns.push(OutputColumn {
            name: name.to_string(),
            dtype,
            nullable: true,
        });
        self
    }

    /// A permanent error naming `batch` and the first column that breaks the contract: a
    /// promised column missing, of another dtype, or with nulls where none are allowed, or
    /// a column that was not promised.
    pub fn check(&self, pipeline: &str, batch: u32, df: &DataFrame) -> Result<(), PipelineError> {
        let fail = |what: String| {
            Err(PipelineError::permanent(format!(
                "output contract: pipeline {pipeline}, batch {batch}: {what}; nothing was \
                 written for this batch"
            )))
        };
        for c in &self.columns {
            let Ok(col) = df.column(&c.name) else {
                return fail(format!("column \"{}\" is missing", c.name));
            };
            if *col.dtype() != c.dtype {
                return fail(format!(
                    "column \"{}\" is {}, the pipeline declares {}",
                    c.name,
                    col.dtype(),
                    c.dtype
                ));
            }
            let nulls = col.null_count();
            if !c.nullable && nulls > 0 {
                return fail(format!(
                    "column \"{}\" has {nulls} null values, the pipeline declares it not nullable",
                    c.name
                ));
            }
        }
        for name in df.get_column_names() {
            if !self.columns.iter().any(|c| c.name == name.as_str()) {
                return fail(format!(
                    "column \"{name}\" is not in the declared output schema"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    /// Passes batches through, declaring `batch` as a string column: every output breaks
    /// the contract (`batch` is i64).
    struct Mislabelled;

    impl crate::Pipeline for Mislabelled {
        type Params = ();
        type Reference = ();
        fn name(&self) -> &'static str {
            "mislabelled"
        }
        fn validate(&self, _: &serde_json::Value) -> Result<(), PipelineError> {
            Ok(())
        }
        fn input(&self, _: &(), _: &crate::JobSpec) -> Result<crate::Input, PipelineError> {
            Ok(crate::Input::synthetic(2))
        }
        fn load_reference(&self, _: &()) -> Result<(), PipelineError> {
            Ok(())
        }
        fn transform(
            &self,
            _: &(),
            _: &(),
            batch: DataFrame,
            _: &crate::BatchContext,
        ) -> Result<Option<DataFrame>, PipelineError> {
            Ok(Some(batch))
        }
        fn output_schema(&self, _: &()) -> Option<OutputSchema> {
            Some(OutputSchema::new().column("batch", DataType::String))
        }
    }

    #[test]
    fn a_batch_breaking_the_contract_fails_permanently_before_its_part_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut registry = crate::Registry::empty();
        registry.register(Mislabelled);
        let spec = crate::JobSpec {
            key: "contract-1".into(),
            pipeline: "mislabelled".into(),
            params: serde_json::json!({}),
            batch_size: None,
            attempt: 1,
            output_root: tmp.path().to_path_buf(),
        };
        let mut run = registry.open(&spec, 0).unwrap();
        let e = run.next_batch().unwrap_err();
        assert_eq!(e.kind, drover_core::ErrorKind::Permanent);
        assert!(
            e.message.contains("batch 0: column \"batch\" is i64"),
            "{}",
            e.message
        );
        let dir = tmp.path().join("mislabelled").join("contract-1");
        assert!(!dir.join("part-00000.parquet").exists(), "nothing written");
    }

    #[test]
    fn each_breach_names_the_batch_and_the_column() {
        let schema = OutputSchema::new()
            .column("id", DataType::Int64)
            .nullable("note", DataType::String);
        let ok = df!("id" => [1i64, 2], "note" => [Some("a"), None]).unwrap();
        schema.check("p", 0, &ok).unwrap();
        let cases = [
            (df!("note" => ["a"]).unwrap(), "column \"id\" is missing"),
            (
                df!("id" => [1i32], "note" => ["a"]).unwrap(),
                "column \"id\" is i32",
            ),
            (
                df!("id" => [Some(1i64), None], "note" => ["a", "b"]).unwrap(),
                "column \"id\" has 1 null values",
            ),
            (
                df!("id" => [1i64], "note" => ["a"], "x" => [1i64]).unwrap(),
                "column \"x\" is not in the declared output schema",
            ),
        ];
        for (df, want) in cases {
            let e = schema.check("p", 7, &df).unwrap_err();
            assert_eq!(e.kind, drover_core::ErrorKind::Permanent);
            assert!(e.message.contains("batch 7"), "{}", e.message);
            assert!(e.message.contains(want), "{want} not in {}", e.message);
        }
    }
}
