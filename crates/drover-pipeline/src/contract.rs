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
