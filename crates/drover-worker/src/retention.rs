//! Retention: the `[retention]` loop every worker runs, and the deletion of a pruned job's
//! output files (also used by `drover prune --delete-outputs`).

use crate::shared::Shared;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// What the workers prune, resolved from the `[retention]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Finished jobs older than this (since `finished_at`) are deleted.
    pub older_than: Duration,
    /// Only jobs in these (terminal) states.
    pub states: Vec<String>,
    /// Also delete the part files and manifests of deleted jobs.
    pub delete_outputs: bool,
    /// How often a worker prunes.
    pub every: Duration,
}

/// Jobs deleted per statement.
pub const PRUNE_BATCH: i64 = 1000;

/// Prunes every `retention.every` until aborted. Every worker may run it: the statement
/// skips rows another worker is deleting.
pub(crate) async fn retention_loop(shared: Arc<Shared>, retention: Retention) {
    let mut tick = tokio::time::interval(retention.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut total = 0;
        loop {
            match shared
                .ledger
                .prune(retention.older_than, &retention.states, false, PRUNE_BATCH)
                .await
            {
                Ok(pruned) => {
                    total += pruned.len();
                    if retention.delete_outputs {
                        let parts: Vec<String> =
                            pruned.iter().flat_map(|p| p.outputs.clone()).collect();
                        delete_outputs(&parts);
                    }
                    if pruned.len() < PRUNE_BATCH as usize {
                        break;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "retention prune failed; next round retries");
                    break;
                }
            }
        }
        if total > 0 {
            info!(jobs = total, older_than_secs = retention.older_than.as_secs(),
                states = ?retention.states, delete_outputs = retention.delete_outputs,
                "retention: pruned finished jobs from the ledger");
        }
    }
}

/// Deletes part files, then each of their directories' `_manifest.json`, then the
/// directories left empty. Returns `(files deleted, files already absent)`; other errors
/// are logged and counted as neither.
pub fn delete_outputs(parts: &[String]) -> (usize, usize) {
    let (mut deleted, mut absent) = (0, 0);
    let mut dirs = BTreeSet::new();
    let mut remove = |p: &Path| match std::fs::remove_file(p) {
        Ok(()) => deleted += 1,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => absent += 1,
        Err(e) => warn!(path = %p.display(), error = %e, "could not delete an output file"),
    };
    for part in parts {
        let p = Path::new(part);
        remove(p);
        if let Some(dir) = p.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    for dir in &dirs {
        remove(&dir.join(drover_pipeline::MANIFEST));
        // Only an empty directory goes; anything else in it is not ours to delete.
        let _ = std::fs::remove_dir(dir);
    }
    (deleted, absent)
}
