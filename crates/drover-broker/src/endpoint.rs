//! Where a broker lives, said without its credentials.
//!
//! Every log line and error message that names the broker goes through [`redact_url`], so the
//! password in `DROVER_AMQP_URL` can never leak into logs, panics or terminal output.

use std::fmt;

/// The parts of an AMQP URL that are safe to show: scheme (TLS or not), host, port, vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) vhost: String,
}

impl Endpoint {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?query]` the way lapin does
    /// (no path means vhost `/`, an empty path means vhost ``), without ever putting a piece
    /// of the URL into the error text (it may contain the password).
    pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "expected amqp://host:port/vhost or amqps://…".to_string())?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            _ => return Err("the scheme must be amqp:// or amqps://".to_string()),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        // The password may itself contain '@' (unescaped); the host follows the last one.
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (h, after) = bracketed
                .split_once(']')
                .ok_or_else(|| "unterminated IPv6 address (missing ']')".to_string())?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| "unexpected text after the IPv6 address".to_string())?,
                ),
            };
            (format!("[{h}]"), port)
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (host_port.to_string(), None),
            }
        };
        let default_port = if tls { 5671 } else { 5672 };
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| "the port is not a number between 0 and 65535".to_string())?,
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            percent_decode(&host).ok_or_else(|| "the host is not valid UTF-8".to_string())?
        };
        let path = tail.split(['?', '#']).next().unwrap_or("");
        let vhost = match path.strip_prefix('/') {
            None => "/".to_string(),
            Some(v) => percent_decode(v)
                .ok_or_else(|| "the vhost is not valid percent-encoded UTF-8".to_string())?,
        };
        Ok(Endpoint {
            tls,
            host,
            port,
            vhost,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} (vhost {}", self.host, self.port, self.vhost)?;
        if self.tls {
            f.write_str(", TLS")?;
        }
        f.write_str(")")
    }
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Says where an AMQP URL points without its credentials, for logs and error messages:
/// `127.0.0.1:5672 (vhost /)`, or `host:5671 (vhost prod, TLS)` for `amqps://`.
///
/// Operators need to see which broker a worker talks to; they must never see its password.
/// A URL that cannot be parsed yields `<unparseable AMQP URL>` rather than echoing it, since
/// the unparseable text may well contain the password. A list of a cluster's addresses
/// (comma-separated, see [`crate::BrokerAddresses`]) is shown address by address, joined by
/// `, `.
pub fn redact_url(url: &str) -> String {
    if url.contains(crate::ADDRESS_SEPARATOR) {
        return drover_core::config::split_amqp_addresses(url)
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(", ");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    match Endpoint::parse(url) {
        Ok(e) => e.to_string(),
        Err(_) => "<unparseable AMQP URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "127.0.0.1:5672 (vhost /)"
        );
        assert_eq!(
            redact_url("amqps://u:p@ss@rabbit.example:5671/prod?heartbeat=10"),
            "rabbit.example:5671 (vhost prod, TLS)"
        );
    }

    #[test]
    fn defaults_follow_lapin() {
        assert_eq!(redact_url("amqp://localhost"), "localhost:5672 (vhost /)");
        assert_eq!(redact_url("amqp://localhost/"), "localhost:5672 (vhost )");
        assert_eq!(redact_url("amqps://h"), "h:5671 (vhost /, TLS)");
        assert_eq!(redact_url("amqp://[::1]:5673/v"), "[::1]:5673 (vhost v)");
        assert_eq!(redact_url("amqp://"), "localhost:5672 (vhost /)");
    }

    #[test]
    fn lists_are_shown_node_by_node() {
        assert_eq!(
            redact_url("amqp://g:pw1@r1:5731/%2f, amqp://g:pw1@r2:5732/%2f"),
            "r1:5731 (vhost /), r2:5732 (vhost /)"
        );
        assert_eq!(
            redact_url("amqp://r1,http://u:hunter2@x"),
            "r1:5672 (vhost /), <unparseable AMQP URL>"
        );
    }

    #[test]
    fn never_echoes_bad_urls() {
        for bad in [
            "http://guest:hunter2@h/",
            "guest:hunter2@h",
            "amqp://u:hunter2/x@h",
            "amqp://u:pw@h:hunter2",
            "amqp://u:pw@h/%zz",
        ] {
            let r = redact_url(bad);
            assert!(!r.contains("hunter2"), "{bad} -> {r}");
            assert_eq!(r, "<unparseable AMQP URL>", "{bad}");
        }
    }
}
