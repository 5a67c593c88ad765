-- Lifecycle of a long-running service: the ledger, not the broker, re-drives work.
--
-- Expand-only (a nullable column, an index), so a worker of the previous release keeps
-- working against this schema during a rolling deploy.

-- Every worker's rescuer looks for running jobs whose heartbeat is stale, every heartbeat
-- period: only running rows are indexed.
CREATE INDEX IF NOT EXISTS jobs_running_heartbeat_idx
    ON drover.jobs (heartbeat_at) WHERE state = 'running';

-- The lost-message sweep and the relay's orphan sweep look at queued rows by age.
CREATE INDEX IF NOT EXISTS jobs_queued_idx
    ON drover.jobs (updated_at) WHERE state = 'queued';
