//! [`ParamReader`]: strict reading of a job's JSON params, so every pipeline rejects bad or
//! unknown params the same way (a permanent error naming the param and the value).

use crate::PipelineError;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Reads typed params out of a job's `params` object and remembers which ones were used, so
/// [`ParamReader::finish`] can refuse unknown names (a typo such as `inptu` must fail the job
/// at validation, not be silently ignored).
pub struct ParamReader<'a> {
    pipeline: &'a str,
    map: &'a Map<String, Value>,
    seen: BTreeSet<&'static str>,
}

impl<'a> ParamReader<'a> {
    /// Starts reading `params`, which must be a JSON object (or null, meaning no params).
    pub fn new(pipeline: &'a str, params: &'a Value) -> Result<Self, PipelineError> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let map = match params {
            Value::Object(m) => m,
            Value::Null => EMPTY.get_or_init(Map::new),
            other => {
                return Err(PipelineError::permanent(format!(
                    "{pipeline}: params must be a JSON object, got {}",
                    drover_core::shown::value(other)
                )));
            }
        };
        Ok(ParamReader {
            pipeline,
            map,
            seen: BTreeSet::new(),
        })
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Value> {
        self.seen.insert(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn bad(&self, name: &str, expected: &str, got: &Value) -> PipelineError {
        PipelineError::permanent(format!(
            "{}: param \"{name}\": expected {expected}, got {}",
            self.pipeline,
            drover_core::shown::value(got)
        ))
    }

    /// An optional param as raw JSON (absent or null gives `None`), for shapes the typed
    /// readers do not cover (objects, arrays); the caller checks it and names the param.
    pub fn optional_json(&mut self, name: &'static str) -> Option<&'a Value> {
        self.get(name)
    }

    /// A required non-empty string.
    pub fn required_str(&mut self, name: &'static str) -> Result<&'a str, PipelineError> {
        match self.optional_str(name)? {
            Some(s) => Ok(s),
            None => Err(PipelineError::permanent(format!(
                "{}: param \"{name}\" is required",
                self.pipeline
            ))),
        }
    }

    /// An optional non-empty string (absent or null gives `None`).
    pub fn optional_str(&mut self, name: &'static str) -> Result<Option<&'a str>, PipelineError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(name, "a non-empty string", v)),
        }
    }

    /// An optional filesystem path (a non-empty string).
    pub fn optional_path(&mut self, name: &'static str) -> Result<Option<PathBuf>, PipelineError> {
        Ok(self.optional_str(name)?.map(PathBuf::from))
    }

    /// An optional unsigned integer within `min..=max` (absent gives `None`).
    pub fn optional_u64(
        &mut self,
        name: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, PipelineError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.bad(name, &format!("an integer in {min}..={max}"), v)),
            },
        }
    }

    /// An optional param of any JSON type (absent or null gives `None`), for params whose
    /// shape the pipeline checks itself (an argv array, an object of strings).
    pub fn optional_value(&mut self, name: &'static str) -> Option<&'a Value> {
        self.get(name)
    }

    /// Refuses any param that was not read: the error names every unknown one and lists the
    /// accepted names.
    pub fn finish(self) -> Result<(), PipelineError> {
        let unknown: Vec<String> = self
            .map
            .keys()
            .filter(|k| !self.seen.contains(k.as_str()))
            .map(|k| format!("\"{k}\""))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let known: Vec<&str> = self.seen.iter().copied().collect();
        Err(PipelineError::permanent(format!(
            "{}: unknown param{} {} (accepted: {})",
            self.pipeline,
            if unknown.len() == 1 { "" } else { "s" },
            unknown.join(", "),
            known.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_and_unknown() {
        let v = json!({"a": "x", "n": 3, "zz": 1, "yy": 2});
        let mut r = ParamReader::new("t", &v).unwrap();
        assert_eq!(r.required_str("a").unwrap(), "x");
        assert_eq!(r.optional_u64("n", 1, 5).unwrap(), Some(3));
        assert_eq!(r.optional_u64("m", 1, 5).unwrap(), None);
        let e = r.finish().unwrap_err();
        assert!(e.is_permanent());
        assert_eq!(
            e.message,
            "t: unknown params \"yy\", \"zz\" (accepted: a, m, n)"
        );

        let v = json!({"n": 0});
        let mut r = ParamReader::new("t", &v).unwrap();
        let e = r.optional_u64("n", 1, 5).unwrap_err();
        assert_eq!(
            e.message,
            "t: param \"n\": expected an integer in 1..=5, got 0"
        );
        assert!(ParamReader::new("t", &json!([1])).is_err());
        assert!(
            ParamReader::new("t", &Value::Null)
                .unwrap()
                .finish()
                .is_ok()
        );
    }
}
