//! The worker's resolved settings: what `drover worker` builds from its flags, the
//! environment, the `[worker]` table of the config file and defaults, and what a test or an
//! embedding binary builds directly.

use drover_core::RetryPolicy;
use drover_core::config::Connections;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Default jobs in flight per worker (AMQP prefetch).
pub const DEFAULT_PREFETCH: u16 = 8;
/// Default lease renewal period.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default time a draining worker gives running jobs to reach a batch boundary.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default attempts for jobs whose message and pipeline name none.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default root of pipeline output.
pub const DEFAULT_OUTPUT_ROOT: &str = "drover-output";
/// Default time a job may wait `queued`, while the work queue holds no ready message, before
/// its message is presumed lost and published again.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(60);
/// Default address of `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Everything [`run`](crate::run) needs besides the registry and the shutdown signal.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker and ledger URLs, namespace and queue settings.
    pub conns: Connections,
    /// Jobs in flight at once (AMQP `basic.qos` prefetch); at least 1.
    pub prefetch: u16,
    /// Lease renewal period; a lease older than two periods is taken over.
    pub heartbeat: Duration,
    /// How long a draining worker waits for running jobs to reach a batch boundary.
    pub grace: Duration,
    /// Root directory of pipeline output.
    pub output_root: PathBuf,
    /// Attempts for jobs whose message and pipeline name none.
    pub max_attempts: u32,
    /// This worker's id in leases and attempt history.
    pub worker_id: String,
    /// How often the retry relay sweeps the ledger for due retries.
    pub relay_interval: Duration,
    /// Delays between attempts.
    pub retry: RetryPolicy,
    /// How long a job may wait `queued` while `{ns}.jobs` holds no ready message before the
    /// rescuer publishes it again (its message was purged or dead-lettered).
    pub lost_after: Duration,
    /// What this worker prunes from the ledger, and how often (`None`: nothing).
    pub retention: Option<crate::Retention>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (`None`: not served; port 0
    /// picks a free port, logged at start-up).
    pub metrics_addr: Option<SocketAddr>,
    /// Concurrency limits by pipeline, enforced in the ledger (see `drover_ledger::Limits`).
    pub limits: std::collections::BTreeMap<String, drover_ledger::Limits>,
    /// A job is claimed only while this process's resident memory plus the job's estimate
    /// stays under this many bytes (`None` or 0: no limit; see `--memory-limit`).
    pub memory_limit: Option<u64>,
    /// Bytes per row of batch size that a job of the pipeline needs, set by the operator
    /// (over what the worker learns from batches).
    pub memory_per_row: std::collections::BTreeMap<String, u64>,
}

impl WorkerConfig {
    /// The defaults, against `conns`: what `drover worker` runs with when nothing is set,
    /// except that the HTTP port is off (tests and embedders opt in).
    pub fn new(conns: Connections) -> WorkerConfig {
        WorkerConfig {
            conns,
            prefetch: DEFAULT_PREFETCH,
            heartbeat: DEFAULT_HEARTBEAT,
            grace: DEFAULT_GRACE,
            output_root: PathBuf::from(DEFAULT_OUTPUT_ROOT),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            worker_id: default_worker_id(),
            relay_interval: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            lost_after: DEFAULT_LOST_AFTER,
            retention: None,
            metrics_addr: None,
            limits: Default::default(),
            memory_limit: None,
            memory_per_row: Default::default(),
        }
    }
}

/// `host-pid-random`: unique per process, readable in the ledger's lease columns.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{tag}", std::process::id())
}
