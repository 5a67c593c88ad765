//! Secrets out of params before they reach a page or the API: values under secret-looking
//! names are replaced, and passwords inside URLs are masked wherever they appear.

use serde_json::Value;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Parts of a param name that mark its value as secret (matched case-insensitively, anywhere
/// in the name: `db_password`, `apiKey`, `AUTH_TOKEN`, `private-key` ...).
const SECRET_NAME_PARTS: [&str; 10] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "auth",
    "cookie",
    "signature",
];

/// Whether a param named `name` holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|p| lower.contains(p))
}

/// A copy of `params` fit to show: every value under a secret-looking name (at any depth)
/// becomes `"[redacted]"`, and every string holding a URL with a password has it masked
/// (`postgres://user:***@host/db`). Producers put secrets in params; operators read pages.
pub fn redact_params(params: &Value) -> Value {
    match params {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_secret_name(k) && !v.is_null() {
                        Value::String(REDACTED.into())
                    } else {
                        redact_params(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact_params).collect()),
        Value::String(s) => Value::String(redact_urls(s)),
        other => other.clone(),
    }
}

/// Masks the password of every `scheme://user:password@host` in `text` (also inside longer
/// text such as an error message or a command line).
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push_str(":***");
                        out.push_str(&authority[at..]);
                    }
                    None => out.push_str(authority),
                }
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_names_are_redacted_at_any_depth() {
        let p = json!({
            "client_id": "acme",
            "db_password": "hunter2",
            "apiKey": "k-123",
            "nested": {"AUTH_TOKEN": "t", "list": [{"secret": 1}, "plain"]},
            "token": null
        });
        let r = redact_params(&p);
        assert_eq!(r["client_id"], "acme");
        assert_eq!(r["db_password"], REDACTED);
        assert_eq!(r["apiKey"], REDACTED);
        assert_eq!(r["nested"]["AUTH_TOKEN"], REDACTED);
        assert_eq!(r["nested"]["list"][0]["secret"], REDACTED);
        assert_eq!(r["nested"]["list"][1], "plain");
        assert_eq!(r["token"], Value::Null);
        assert!(!r.to_string().contains("hunter2"));
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_urls("postgres://app:s3cret@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_urls("copy from s3://u:p@w@bucket/k and amqp://guest@h/"),
            "copy from s3://u:***@bucket/k and amqp://guest@h/"
        );
        assert_eq!(
            redact_urls("https://example.com/a@b"),
            "https://example.com/a@b"
        );
        assert_eq!(redact_urls("no url"), "no url");
        let r = redact_params(&json!({"input": "https://user:pw@host/file.parquet"}));
        assert_eq!(r["input"], "https://user:***@host/file.parquet");
    }
}
