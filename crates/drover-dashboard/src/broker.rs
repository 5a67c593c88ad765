//! Queue depth and consumers, asked of RabbitMQ the AMQP way (passive declare), so the
//! dashboard needs no management plugin. One connection, opened on first use and reopened
//! after it is lost; a broker that does not answer is shown as such, never an error page.

use drover_broker::{Broker, BrokerAddresses, Topology};
use drover_core::{ExposeSecret, SecretString};
use serde::Serialize;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long the overview waits for the broker before showing it as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One queue as the overview shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub name: String,
    /// False when the queue has not been declared yet (no worker or producer ran).
    pub exists: bool,
    pub messages: u32,
    pub consumers: u32,
}

/// The broker's answer, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerStatus {
    pub endpoint: String,
    pub queues: Vec<QueueInfo>,
    pub error: Option<String>,
}

pub struct BrokerProbe {
    url: SecretString,
    topology: Topology,
    conn: Mutex<Option<Broker>>,
}

impl BrokerProbe {
    pub fn new(url: SecretString, topology: Topology) -> BrokerProbe {
        BrokerProbe {
            url,
            topology,
            conn: Mutex::new(None),
        }
    }

    /// `{ns}.jobs` and `{ns}.dead`: messages ready and consumers.
    pub async fn status(&self) -> BrokerStatus {
        let endpoint = drover_broker::redact_url(self.url.expose_secret());
        match tokio::time::timeout(PROBE_TIMEOUT, self.queues()).await {
            Ok(Ok(queues)) => BrokerStatus {
                endpoint,
                queues,
                error: None,
            },
            Ok(Err(e)) => BrokerStatus {
                endpoint,
                queues: Vec::new(),
                error: Some(crate::error::error_chain(&e)),
            },
            Err(_) => BrokerStatus {
                endpoint,
                queues: Vec::new(),
                error: Some(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
            },
        }
    }

    async fn queues(&self) -> Result<Vec<QueueInfo>, drover_broker::BrokerError> {
        let mut guard = self.conn.lock().await;
        let broker = match guard.take() {
            Some(b) if b.is_connected() => b,
            _ => {
                BrokerAddresses::parse(self.url.expose_secret())?
                    .connect("drover dashboard")
                    .await?
            }
        };
        let mut out = Vec::new();
        for name in [self.topology.jobs_queue(), self.topology.dead_queue()] {
            // On an error the connection is dropped, so the next call reconnects.
            let stats = broker.queue_depth_if_exists(&name).await?;
            out.push(match stats {
                Some(s) => QueueInfo {
                    name,
                    exists: true,
                    messages: s.ready,
                    consumers: s.consumers,
                },
                None => QueueInfo {
                    name,
                    exists: false,
                    messages: 0,
                    consumers: 0,
                },
            });
        }
        *guard = Some(broker);
        Ok(out)
    }
}
