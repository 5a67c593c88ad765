//! Values quoted in messages, cut to a readable length.
//!
//! Errors and logs quote the value at fault so the reader sees what was wrong; a param may be
//! a megabyte of inline data, and quoting it whole makes a log line of that size (and an
//! error nobody can read). Every place that quotes a caller's value goes through here, so
//! the limit is one number and the cut always says how big the value was.

use serde_json::Value;

/// Characters of a value kept in a message; the rest is replaced by `… (SIZE)`.
pub const SHOWN_CHARS: usize = 200;

/// `s` as it may appear in a message: whole when short, else its first [`SHOWN_CHARS`]
/// characters followed by `… (900 KB)` (the size of the whole text).
pub fn text(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({})", &s[..cut], size(s.len())),
    }
}

/// A JSON value as it may appear in a message (its JSON text, cut by [`text`]).
pub fn value(v: &Value) -> String {
    text(&v.to_string())
}

/// A byte count for humans: `812 B`, `900 KB`, `1.8 MB` (powers of 1000, as sizes of
/// text are usually read).
pub fn size(bytes: usize) -> String {
    match bytes {
        b if b < 1_000 => format!("{b} B"),
        b if b < 1_000_000 => format!("{} KB", b / 1_000),
        b => format!("{:.1} MB", b as f64 / 1_000_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_whole_long_ones_cut_with_their_size() {
        assert_eq!(text("abc"), "abc");
        let big = "é".repeat(450_000); // 900 KB of two-byte characters
        let t = text(&big);
        assert!(t.ends_with("… (900 KB)"), "{}", &t[t.len() - 20..]);
        assert_eq!(
            t.chars().count(),
            SHOWN_CHARS + "… (900 KB)".chars().count()
        );
        assert_eq!(
            value(&Value::String("x".repeat(2_000_000))).len(),
            SHOWN_CHARS + "… (2.0 MB)".len()
        );
        assert_eq!(size(812), "812 B");
    }
}
