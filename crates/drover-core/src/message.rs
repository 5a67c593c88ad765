//! The job message contract, version 1.
//!
//! Any language can produce these messages, so the parser is strict about what it accepts
//! and precise about why it refuses: every rejection names the field and the value, and keeps
//! the idempotency key when one could be read so the ledger can record the rejection.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// The only contract version this build understands.
pub const CONTRACT_VERSION: u64 = 1;
/// Bodies above this size are refused before JSON parsing (poison protection).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Keys are stored, indexed and used in file paths; keep them reasonable.
pub const MAX_KEY_LEN: usize = 256;
/// Upper bound for a `batch_size` override.
pub const MAX_BATCH_SIZE: u64 = 10_000_000;
/// Upper bound for a `max_attempts` override.
pub const MAX_ATTEMPTS_LIMIT: u64 = 100;
/// Upper bound for `timeout_secs`: a week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// A job message as published to `{ns}.jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    /// Contract version, always [`CONTRACT_VERSION`].
    pub v: u64,
    /// Chosen by the producer: one business operation = one key.
    pub idempotency_key: String,
    /// Name of a pipeline registered in the worker.
    pub pipeline: String,
    /// Pipeline parameters (a JSON object).
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Rows per batch, overriding the pipeline default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Attempts before `dead`, overriding the pipeline and config defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Do not start the job before this time (RFC 3339). The worker that receives the
    /// message early records it in the ledger and acks it; the relay publishes the job again
    /// when it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// Longest an attempt may run, in seconds; past it the attempt fails as a transient
    /// error that says so (and is retried like any other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

/// Why a message body is not a valid contract-v1 job.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason}")]
pub struct ContractError {
    /// Human-readable reason naming the field and the value.
    pub reason: String,
    /// The idempotency key, when the body had a usable one.
    pub key: Option<String>,
    /// The pipeline name, when the body had one.
    pub pipeline: Option<String>,
}

impl ContractError {
    fn new(reason: impl Into<String>) -> Self {
        ContractError {
            reason: reason.into(),
            key: None,
            pipeline: None,
        }
    }
}

/// A JSON value as quoted in an error message (cut, with its size, when long).
fn show(v: &Value) -> String {
    crate::shown::value(v)
}

/// Checks an idempotency key: non-empty, bounded, no control characters.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.trim().is_empty() {
        return Err("field \"idempotency_key\": must not be empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "field \"idempotency_key\": {} bytes, at most {MAX_KEY_LEN} allowed",
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(format!(
            "field \"idempotency_key\": {key:?} contains control characters"
        ));
    }
    Ok(())
}

/// Checks a pipeline name's shape (not whether the worker knows it).
fn validate_pipeline_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "field \"pipeline\": {name:?} is not a pipeline name (1-64 of [A-Za-z0-9_.-])"
        ))
    }
}

fn optional_u32(obj: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u32>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n as u32)),
            _ => Err(format!(
                "field \"{field}\": expected an integer from 1 to {max}, got {}",
                show(v)
            )),
        },
    }
}

impl JobMessage {
    /// Builds a message, checking the same rules [`JobMessage::parse`] applies.
    pub fn new(
        idempotency_key: impl Into<String>,
        pipeline: impl Into<String>,
        params: Map<String, Value>,
        batch_size: Option<u32>,
        max_attempts: Option<u32>,
    ) -> Result<Self, ContractError> {
        let msg = JobMessage {
            v: CONTRACT_VERSION,
            idempotency_key: idempotency_key.into(),
            pipeline: pipeline.into(),
            params,
            batch_size,
            max_attempts,
            run_at: None,
            timeout_secs: None,
        };
        let body = serde_json::to_vec(&msg).map_err(|e| ContractError::new(e.to_string()))?;
        JobMessage::parse(&body)
    }

    /// The same message, not to start before `run_at` (`None`: as soon as possible).
    pub fn with_run_at(mut self, run_at: Option<DateTime<Utc>>) -> Self {
        self.run_at = run_at;
        self
    }

    /// The same message with an attempt timeout, checked like [`JobMessage::parse`] does.
    pub fn with_timeout_secs(mut self, secs: Option<u32>) -> Result<Self, ContractError> {
        if let Some(s) = secs
            && !(1..=MAX_TIMEOUT_SECS).contains(&u64::from(s))
        {
            return Err(ContractError::new(format!(
                "field \"timeout_secs\": expected an integer from 1 to {MAX_TIMEOUT_SECS}, got {s}"
            )));
        }
        self.timeout_secs = secs;
        Ok(self)
    }

    /// Parses and validates a message body.
    ///
    /// Never panics, whatever the bytes; the error keeps the key and pipeline when they
    /// could be read, so the ledger can record a rejection against the right job.
    pub fn parse(body: &[u8]) -> Result<JobMessage, ContractError> {
        if body.is_empty() {
            return Err(ContractError::new("body: empty message"));
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(ContractError::new(format!(
                "body: {} bytes, larger than the {MAX_BODY_BYTES}-byte limit",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            ContractError::new(format!(
                "body: not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ContractError::new(format!("body: not JSON ({e})")))?;
        let Value::Object(obj) = value else {
            return Err(ContractError::new(format!(
                "body: expected a JSON object, got {}",
                show(&value)
            )));
        };

        // Read what identifies the job first, so later errors can carry it.
        let key = match obj.get("idempotency_key") {
            Some(Value::String(k)) => Some(k.clone()),
            _ => None,
        };
        let pipeline = match obj.get("pipeline") {
            Some(Value::String(p)) => Some(p.clone()),
            _ => None,
        };
        let usable_key = key.clone().filter(|k| validate_key(k).is_ok());
        let fail = |reason: String| ContractError {
            reason,
            key: usable_key.clone(),
            pipeline: pipeline.clone(),
        };

        match obj.get("v") {
            Some(v) if v.as_u64() == Some(CONTRACT_VERSION) => {}
            Some(v) => {
                return Err(fail(format!(
                    "field \"v\": unsupported contract version {}, this worker speaks {CONTRACT_VERSION}",
                    show(v)
                )));
            }
            None => return Err(fail("field \"v\": missing".into())),
        }
        let key = match obj.get("idempotency_key") {
            Some(Value::String(k)) => {
                validate_key(k).map_err(&fail)?;
                k.clone()
            }
            Some(other) => {
                return Err(fail(format!(
                    "field \"idempotency_key\": expected a string, got {}",
                    show(other)
                )));
            }
            None => return Err(fail("field \"idempotency_key\": missing".into())),
        };
        let pipeline_name = match obj.get("pipeline") {
            Some(Value::String(p)) => {
                validate_pipeline_name(p).map_err(&fail)?;
                p.clone()
            }
            Some(other) => {
                return Err(fail(format!(
                    "field \"pipeline\": expected a string, got {}",
                    show(other)
                )));
            }
            None => return Err(fail("field \"pipeline\": missing".into())),
        };
        let params = match obj.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(fail(format!(
                    "field \"params\": expected a JSON object, got {}",
                    show(other)
                )));
            }
        };
        let batch_size = optional_u32(&obj, "batch_size", MAX_BATCH_SIZE).map_err(&fail)?;
        let max_attempts = optional_u32(&obj, "max_attempts", MAX_ATTEMPTS_LIMIT).map_err(&fail)?;
        let timeout_secs = optional_u32(&obj, "timeout_secs", MAX_TIMEOUT_SECS).map_err(&fail)?;
        let run_at = match obj.get("run_at") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|e| {
                        fail(format!(
                            "field \"run_at\": expected an RFC 3339 time such as \
                             2026-12-03T09:30:00Z, got {} ({e})",
                            show(&Value::String(t.clone()))
                        ))
                    })?
                    .with_timezone(&Utc),
            ),
            Some(other) => {
                return Err(fail(format!(
                    "field \"run_at\": expected an RFC 3339 time string, got {}",
                    show(other)
                )));
            }
        };
        const KNOWN: [&str; 8] = [
            "v",
            "idempotency_key",
            "pipeline",
            "params",
            "batch_size",
            "max_attempts",
            "run_at",
            "timeout_secs",
        ];
        if let Some(extra) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(fail(format!(
                "field {extra:?}: not part of contract v{CONTRACT_VERSION}"
            )));
        }
        Ok(JobMessage {
            v: CONTRACT_VERSION,
            idempotency_key: key,
            pipeline: pipeline_name,
            params,
            batch_size,
            max_attempts,
            run_at,
            timeout_secs,
        })
    }

    /// The canonical JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        // Serialising plain strings, maps and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Parses a `--param name=value` argument. The value is JSON when it parses as JSON
/// (numbers, booleans, quoted strings, objects), otherwise it is taken as a plain string.
pub fn parse_param(arg: &str) -> Result<(String, Value), String> {
    let Some((name, raw)) = arg.split_once('=') else {
        return Err(format!(
            "--param {}: expected name=value",
            crate::shown::text(&format!("{arg:?}"))
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "--param {}: the name before '=' is empty",
            crate::shown::text(&format!("{arg:?}"))
        ));
    }
    let value = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.into()));
    Ok((name.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<JobMessage, ContractError> {
        JobMessage::parse(s.as_bytes())
    }

    #[test]
    fn run_at_and_timeout_are_checked_and_round_trip() {
        let m = parse(
            r#"{"v":1,"idempotency_key":"k","pipeline":"noop",
                "run_at":"2026-12-03T10:00:00+01:00","timeout_secs":30}"#,
        )
        .unwrap();
        assert_eq!(
            m.run_at.map(|t| t.to_rfc3339()),
            Some("2026-12-03T09:00:00+00:00".to_string())
        );
        assert_eq!(m.timeout_secs, Some(30));
        assert_eq!(JobMessage::parse(&m.to_body()).unwrap(), m);
        let e = parse(r#"{"v":1,"idempotency_key":"k","pipeline":"noop","run_at":"tomorrow"}"#)
            .unwrap_err();
        assert!(
            e.reason.contains("field \"run_at\"") && e.reason.contains("tomorrow"),
            "{e}"
        );
        assert_eq!(e.key.as_deref(), Some("k"));
        let e = parse(r#"{"v":1,"idempotency_key":"k","pipeline":"noop","timeout_secs":0}"#)
            .unwrap_err();
        assert!(e.reason.contains("field \"timeout_secs\""), "{e}");
    }

    #[test]
    fn accepts_the_design_example() {
        let m = parse(
            r#"{ "v": 1, "idempotency_key": "acme:2026-11", "pipeline": "payroll",
                 "params": { "client_id": "acme", "period": "2026-11", "input": "x.parquet" },
                 "batch_size": 5000, "max_attempts": 5 }"#,
        )
        .unwrap();
        assert_eq!(m.idempotency_key, "acme:2026-11");
        assert_eq!(m.batch_size, Some(5000));
        assert_eq!(m.max_attempts, Some(5));
        assert_eq!(m.params["client_id"], "acme");
        assert_eq!(JobMessage::parse(&m.to_body()).unwrap(), m);
    }

    #[test]
    fn rejects_garbage_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\xff\xfe\x00", "not UTF-8"),
            (b"{not json", "not JSON"),
            (b"[1,2]", "expected a JSON object"),
            (
                br#"{"idempotency_key":"k","pipeline":"noop"}"#,
                "\"v\": missing",
            ),
            (
                br#"{"v":2,"idempotency_key":"k","pipeline":"noop"}"#,
                "unsupported contract version 2",
            ),
            (
                br#"{"v":1,"pipeline":"noop"}"#,
                "\"idempotency_key\": missing",
            ),
            (
                br#"{"v":1,"idempotency_key":"","pipeline":"noop"}"#,
                "must not be empty",
            ),
            (br#"{"v":1,"idempotency_key":"k"}"#, "\"pipeline\": missing"),
            (
                br#"{"v":1,"idempotency_key":"k","pipeline":"no op"}"#,
                "not a pipeline name",
            ),
            (
                br#"{"v":1,"idempotency_key":"k","pipeline":"noop","params":[1]}"#,
                "\"params\": expected a JSON object",
            ),
            (
                br#"{"v":1,"idempotency_key":"k","pipeline":"noop","batch_size":0}"#,
                "\"batch_size\": expected an integer from 1",
            ),
            (
                br#"{"v":1,"idempotency_key":"k","pipeline":"noop","max_attempts":"5"}"#,
                "\"max_attempts\"",
            ),
            (
                br#"{"v":1,"idempotency_key":"k","pipeline":"noop","colour":"red"}"#,
                "field \"colour\"",
            ),
        ];
        for (body, want) in cases {
            let err = JobMessage::parse(body).unwrap_err();
            assert!(
                err.reason.contains(want),
                "{:?}: {} lacks {want}",
                body,
                err.reason
            );
        }
    }

    #[test]
    fn keeps_the_key_when_usable() {
        let err = parse(r#"{"v":7,"idempotency_key":"k1","pipeline":"noop"}"#).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("k1"));
        assert_eq!(err.pipeline.as_deref(), Some("noop"));
        let err = parse(r#"{"v":7,"idempotency_key":""}"#).unwrap_err();
        assert_eq!(err.key, None);
    }

    #[test]
    fn refuses_huge_bodies_before_parsing() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(
            JobMessage::parse(&body)
                .unwrap_err()
                .reason
                .contains("limit")
        );
    }

    #[test]
    fn params_parse_as_json_or_string() {
        assert_eq!(parse_param("n=5").unwrap(), ("n".into(), Value::from(5)));
        assert_eq!(
            parse_param("p=2026-11").unwrap(),
            ("p".into(), Value::from("2026-11"))
        );
        assert_eq!(
            parse_param("s=\"5\"").unwrap(),
            ("s".into(), Value::from("5"))
        );
        assert!(parse_param("novalue").is_err());
        assert!(parse_param("=x").is_err());
    }
}
