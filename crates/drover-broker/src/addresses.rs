//! Several addresses of one RabbitMQ cluster, and failing over between them.
//!
//! A worker given the address of every node (`DROVER_AMQP_URL=amqp://…@rabbit-1,amqp://…@rabbit-2`)
//! keeps working when the node it is connected to goes away: the queues are quorum queues
//! replicated on the other nodes, so it only has to reconnect to one of them. lapin connects
//! to one URL; this module tries the addresses in turn and remembers which one answered.

use crate::endpoint::Endpoint;
use crate::{Broker, BrokerError};
use drover_core::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tracing::{info, warn};

/// Separates the addresses in one `--amqp-url` / `DROVER_AMQP_URL` value (the configuration's
/// [`drover_core::config::AMQP_ADDRESS_SEPARATOR`]).
pub const ADDRESS_SEPARATOR: char = drover_core::config::AMQP_ADDRESS_SEPARATOR;

/// The AMQP URLs of a RabbitMQ cluster's nodes, in the order the operator gave them, and the
/// one to try first.
///
/// [`BrokerAddresses::connect`] tries the preferred node, then each following one (wrapping
/// around), and returns the first connection that opens; that node becomes the preferred
/// one. After losing a connection, [`BrokerAddresses::skip_current`] makes the next node the
/// preferred one, so a reconnect does not start by waiting on the node that just went away.
/// One pass over the list is one attempt: the caller backs off (with jitter) between passes.
///
/// Cloning shares the preference, so every connection a worker opens follows it.
#[derive(Clone)]
pub struct BrokerAddresses {
    urls: Arc<[SecretString]>,
    shown: Arc<[String]>,
    preferred: Arc<AtomicUsize>,
}

impl std::fmt::Debug for BrokerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAddresses")
            .field("nodes", &self.shown)
            .field("preferred", &self.preferred.load(Ordering::Relaxed))
            .finish()
    }
}

impl BrokerAddresses {
    /// Parses one address or several separated by commas (blanks around them are ignored).
    ///
    /// Every address must be a valid `amqp://` or `amqps://` URL; an error names its position
    /// and never its text (it may hold a password).
    pub fn parse(list: &str) -> Result<BrokerAddresses, BrokerError> {
        let pieces: Vec<&str> = drover_core::config::split_amqp_addresses(list).collect();
        let count = pieces.len();
        let mut urls = Vec::with_capacity(count);
        let mut shown = Vec::with_capacity(count);
        for (i, url) in pieces.into_iter().enumerate() {
            let position = if count > 1 {
                format!("address {} of {count}", i + 1)
            } else {
                "address".to_string()
            };
            if url.is_empty() {
                return Err(BrokerError::InvalidUrl {
                    url: position,
                    reason: "it is empty (two commas in a row, or a comma at an end?)".into(),
                });
            }
            let endpoint = Endpoint::parse(url).map_err(|reason| BrokerError::InvalidUrl {
                url: format!("{position} ({})", crate::redact_url(url)),
                reason,
            })?;
            urls.push(SecretString::from(url.to_string()));
            shown.push(endpoint.to_string());
        }
        Ok(BrokerAddresses {
            urls: urls.into(),
            shown: shown.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The same nodes with every URL rewritten by `f` (e.g. to add a query parameter); the
    /// preference is shared with `self`.
    pub fn map_urls(&self, f: impl Fn(&str) -> String) -> BrokerAddresses {
        BrokerAddresses {
            urls: self
                .urls
                .iter()
                .map(|u| SecretString::from(f(u.expose_secret())))
                .collect(),
            shown: self.shown.clone(),
            preferred: self.preferred.clone(),
        }
    }

    /// How many nodes there are (at least 1).
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Always false: a list has at least one address (kept for the `len` convention).
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Every node as `host:port (vhost …)`, comma-separated, without credentials.
    pub fn shown(&self) -> String {
        self.shown.join(", ")
    }

    /// The node tried first by the next [`BrokerAddresses::connect`], as `host:port (vhost …)`.
    pub fn preferred(&self) -> &str {
        &self.shown[self.preferred.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Makes the node after the preferred one the first to try: called after the connection
    /// to the preferred node was lost, so the reconnect starts with a node that is likely up.
    /// A no-op with a single address.
    pub fn skip_current(&self) {
        let n = self.urls.len();
        let _ = self
            .preferred
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some((p + 1) % n));
    }

    /// Connects to the first node that answers, starting with the preferred one, each within
    /// [`crate::CONNECT_TIMEOUT`]; that node becomes the preferred one.
    ///
    /// With several nodes, each refusal is logged (`broker node did not answer; trying the
    /// next`) and the connection names its node (`on broker node`, with `node` = its position
    /// in the list). When none answers, the error lists every node's reason.
    pub async fn connect(&self, connection_name: &str) -> Result<Broker, BrokerError> {
        let n = self.urls.len();
        if n == 1 {
            return Broker::connect(self.urls[0].expose_secret(), connection_name).await;
        }
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::with_capacity(n);
        for step in 0..n {
            let i = (start + step) % n;
            match Broker::connect(self.urls[i].expose_secret(), connection_name).await {
                Ok(broker) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    info!(
                        endpoint = %self.shown[i],
                        node = i + 1,
                        nodes = n,
                        connection_name,
                        "on broker node"
                    );
                    return Ok(broker);
                }
                // A bad URL stays bad: say so rather than hiding it among refusals.
                Err(e @ BrokerError::InvalidUrl { .. }) => return Err(e),
                Err(e) => {
                    warn!(
                        endpoint = %self.shown[i],
                        node = i + 1,
                        nodes = n,
                        error = %e,
                        "broker node did not answer; trying the next"
                    );
                    failures.push(format!("{}: {}", self.shown[i], connect_detail(&e)));
                }
            }
        }
        Err(BrokerError::Connect {
            endpoint: format!("any of its {n} nodes"),
            detail: failures.join("; "),
        })
    }
}

/// The reason of a failed connect without the `cannot connect to … at ENDPOINT` prefix,
/// since the caller names the endpoint itself.
fn connect_detail(e: &BrokerError) -> String {
    match e {
        BrokerError::Connect { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_list_and_shows_no_password() {
        let a = BrokerAddresses::parse(
            "amqp://u:hunter2@r1:5672/%2f, amqp://u:hunter2@r2:5673/%2f,amqps://u:p@r3/prod",
        )
        .expect("valid list");
        assert_eq!(a.len(), 3);
        assert_eq!(
            a.shown(),
            "r1:5672 (vhost /), r2:5673 (vhost /), r3:5671 (vhost prod, TLS)"
        );
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(a.preferred(), "r1:5672 (vhost /)");
        a.skip_current();
        assert_eq!(a.preferred(), "r2:5673 (vhost /)");
        a.skip_current();
        a.skip_current();
        assert_eq!(a.preferred(), "r1:5672 (vhost /)");
    }

    #[test]
    fn bad_entries_are_named_by_position_not_text() {
        let e = BrokerAddresses::parse("amqp://h1,,amqp://h3").unwrap_err();
        assert!(e.to_string().contains("address 2 of 3"), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = BrokerAddresses::parse("amqp://h1,http://u:hunter2@h2").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("address 2 of 2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(e.kind(), drover_core::ErrorKind::Permanent);
        assert!(BrokerAddresses::parse("amqp://only").is_ok());
    }

    #[test]
    fn map_urls_keeps_nodes_and_preference() {
        let a = BrokerAddresses::parse("amqp://h1,amqp://h2").expect("valid");
        let b = a.map_urls(|u| format!("{u}?heartbeat=5"));
        a.skip_current();
        assert_eq!(b.preferred(), "h2:5672 (vhost /)");
        assert_eq!(b.urls[0].expose_secret(), "amqp://h1?heartbeat=5");
    }

    #[tokio::test]
    async fn none_answering_lists_every_node() {
        // Two ports nobody listens on: bind them, then free them.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr").port()
            })
            .collect();
        let list = format!(
            "amqp://g:s3cret-pw@127.0.0.1:{}/%2f,amqp://g:s3cret-pw@127.0.0.1:{}/%2f",
            ports[0], ports[1]
        );
        let a = BrokerAddresses::parse(&list).expect("valid");
        let e = a.connect("t").await.expect_err("nothing listens");
        let text = e.to_string();
        assert!(text.contains("any of its 2 nodes"), "{text}");
        for p in &ports {
            assert!(text.contains(&format!("127.0.0.1:{p} (vhost /)")), "{text}");
        }
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert_eq!(e.kind(), drover_core::ErrorKind::Transient);
    }
}
