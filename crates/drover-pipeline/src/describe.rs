//! What a pipeline says about itself for `drover pipelines --describe NAME`: its params, the
//! columns it reads and writes with their units, and what its result's figures mean.
//!
//! A producer deciding what to publish should not have to read a pipeline's source; the
//! description lives next to the code that validates the params so the two change together.

use serde::Serialize;

/// A pipeline's self-description (see [`Pipeline::describe`](crate::Pipeline::describe)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Description {
    /// One line: what the pipeline is for (`drover pipelines` prints it after the name).
    pub summary: &'static str,
    /// The params a message may carry; any other is refused.
    pub params: Vec<Field>,
    /// Columns read from the input (empty: the pipeline reads no input, or any columns).
    pub input_columns: Vec<Field>,
    /// Columns of the written parts.
    pub output_columns: Vec<Field>,
    /// What the job's result (in the ledger and `_manifest.json`) holds.
    pub result: &'static str,
}

/// One param or column: its name, type (with unit), default, and meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Field {
    /// The name as written in the message or the file.
    pub name: &'static str,
    /// Type and unit, e.g. `i64 cents`, `string YYYY-MM`.
    pub kind: &'static str,
    /// The default when absent; `None` for a required param (and for columns).
    pub default: Option<&'static str>,
    /// What it means.
    pub meaning: &'static str,
}

impl Field {
    /// A field with no default (a required param, or a column).
    pub const fn new(name: &'static str, kind: &'static str, meaning: &'static str) -> Field {
        Field {
            name,
            kind,
            default: None,
            meaning,
        }
    }

    /// An optional param and its default.
    pub const fn optional(
        name: &'static str,
        kind: &'static str,
        default: &'static str,
        meaning: &'static str,
    ) -> Field {
        Field {
            name,
            kind,
            default: Some(default),
            meaning,
        }
    }
}

impl std::fmt::Display for Description {
    /// The text `drover pipelines --describe` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.summary)?;
        section(f, "params (unknown ones are refused)", &self.params, true)?;
        section(f, "input columns", &self.input_columns, false)?;
        section(f, "output columns", &self.output_columns, false)?;
        writeln!(f, "\nresult:\n  {}", self.result)
    }
}

fn section(
    f: &mut std::fmt::Formatter<'_>,
    title: &str,
    fields: &[Field],
    with_default: bool,
) -> std::fmt::Result {
    if fields.is_empty() {
        return Ok(());
    }
    writeln!(f, "\n{title}:")?;
    let width = fields.iter().map(|x| x.name.len()).max().unwrap_or(0);
    let kind_width = fields.iter().map(|x| x.kind.len()).max().unwrap_or(0);
    for x in fields {
        let default = match (with_default, x.default) {
            (false, _) => String::new(),
            (true, None) => " (required)".to_string(),
            (true, Some(d)) => format!(" (default: {d})"),
        };
        writeln!(
            f,
            "  {:width$}  {:kind_width$}  {}{default}",
            x.name, x.kind, x.meaning
        )?;
    }
    Ok(())
}
