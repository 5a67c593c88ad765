//! The job list's filters as they travel in URLs: parsed from the query string (every
//! error names the parameter and the value), and written back into links.

use crate::error::WebError;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use drover_ledger::{Cursor, ListQuery, MAX_PAGE};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// The states a job can be in, in lifecycle order (the overview's columns).
pub const STATES: [&str; 7] = [
    "queued",
    "running",
    "retrying",
    "succeeded",
    "dead",
    "rejected",
    "cancelled",
];

/// Page size when none is asked for.
pub const DEFAULT_LIMIT: i64 = 50;

/// Characters left alone in a path segment or a query value.
const SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` percent-encoded for a path segment or query value (keys may hold `/`, `?`, `#` ...).
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, SAFE).to_string()
}

/// The list's query string, as received (every field optional, empty means absent).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ListParams {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Key prefix.
    #[serde(default)]
    pub q: Option<String>,
    /// Created at or after (RFC 3339, `YYYY-MM-DDTHH:MM` in UTC, or `YYYY-MM-DD`).
    #[serde(default)]
    pub since: Option<String>,
    /// Created before (same forms).
    #[serde(default)]
    pub until: Option<String>,
    /// The page cursor from the previous page's "next" link.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<String>,
}

fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl ListParams {
    /// The ledger query these parameters ask for.
    pub fn to_query(&self) -> Result<ListQuery, WebError> {
        let state = match present(&self.state) {
            None => None,
            Some(s) if STATES.contains(&s) => Some(s.to_string()),
            Some(s) => {
                return Err(WebError::bad_request(format!(
                    "state: {s:?} is not one of {}",
                    STATES.join(", ")
                )));
            }
        };
        let limit = match present(&self.limit) {
            None => DEFAULT_LIMIT,
            Some(l) => match l.parse::<i64>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(WebError::bad_request(format!(
                        "limit: {l:?} is not a number within 1..={MAX_PAGE}"
                    )));
                }
            },
        };
        let after = present(&self.after)
            .map(Cursor::decode)
            .transpose()
            .map_err(|e| WebError::bad_request(e.to_string()))?;
        Ok(ListQuery {
            state,
            pipeline: present(&self.pipeline).map(str::to_string),
            // A prefix is taken as typed (leading spaces may be part of a key).
            key_prefix: self.q.clone().filter(|q| !q.is_empty()),
            since: present(&self.since)
                .map(|v| parse_time("since", v))
                .transpose()?,
            until: present(&self.until)
                .map(|v| parse_time("until", v))
                .transpose()?,
            after,
            limit,
        })
    }

    /// These filters (without the cursor) as a query string, for links and forms.
    pub fn filter_query(&self) -> String {
        let mut parts = Vec::new();
        for (name, v) in [
            ("state", &self.state),
            ("pipeline", &self.pipeline),
            ("since", &self.since),
            ("until", &self.until),
            ("limit", &self.limit),
        ] {
            if let Some(v) = present(v) {
                parts.push(format!("{name}={}", encode(v)));
            }
        }
        if let Some(q) = self.q.as_deref().filter(|q| !q.is_empty()) {
            parts.push(format!("q={}", encode(q)));
        }
        parts.join("&")
    }
}

/// Parses a time filter; the error names the parameter and the value.
pub fn parse_time(field: &str, v: &str) -> Result<DateTime<Utc>, WebError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(v, fmt) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    Err(WebError::bad_request(format!(
        "{field}: {v:?} is not a time (RFC 3339, YYYY-MM-DDTHH:MM in UTC, or YYYY-MM-DD)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_names_bad_values() {
        let p = ListParams {
            state: Some("dead".into()),
            pipeline: Some("".into()),
            q: Some("acme:".into()),
            since: Some("2026-12-01".into()),
            until: Some("2026-12-02T10:30".into()),
            ..ListParams::default()
        };
        let q = p.to_query().unwrap();
        assert_eq!(q.state.as_deref(), Some("dead"));
        assert_eq!(q.pipeline, None);
        assert_eq!(q.key_prefix.as_deref(), Some("acme:"));
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.until.unwrap().to_rfc3339(), "2026-12-02T10:30:00+00:00");
        assert_eq!(
            p.filter_query(),
            "state=dead&since=2026-12-01&until=2026-12-02T10%3A30&q=acme%3A"
        );
        let bad = ListParams {
            state: Some("<b>".into()),
            ..ListParams::default()
        };
        assert!(
            bad.to_query()
                .unwrap_err()
                .message
                .contains("state: \"<b>\"")
        );
        let bad = ListParams {
            since: Some("yesterday".into()),
            ..ListParams::default()
        };
        assert!(
            bad.to_query()
                .unwrap_err()
                .message
                .starts_with("since: \"yesterday\"")
        );
        let bad = ListParams {
            limit: Some("9999".into()),
            ..ListParams::default()
        };
        assert!(bad.to_query().unwrap_err().message.starts_with("limit:"));
    }

    #[test]
    fn encodes_keys_for_urls() {
        assert_eq!(encode("a/b c?#<x>"), "a%2Fb%20c%3F%23%3Cx%3E");
        assert_eq!(encode("acme:2026-11"), "acme%3A2026-11");
    }
}
