-- Lifecycle of a long-running service: the ledger, not the broker, re-drives work.
--
-- Expand-only (a nullable column, an index), so a worker of the previous release keeps
-- working against this schema during a rolling deploy.

-- Every worker's rescuer looks for running jobs whose heartbeat is stale, every heartbeat
-- period: only running rows are indexed.
CREATE INDEX IF NOT EXISTS jobs_running_heartbeat_idx
    ON drover.jobs (heartbeat_at) WHERE state = 'running';

-- Longest an attempt may run (message field timeout_secs), kept so a re-published message
-- (retry, rescue, delayed job) carries it again.
ALTER TABLE drover.jobs ADD COLUMN IF NOT EXISTS timeout_secs integer
    CHECK (timeout_secs > 0);

-- Delayed jobs (message field run_at) wait as `queued` with a future run_at and no message
-- (enqueued_at NULL); the relay publishes them when due.
CREATE INDEX IF NOT EXISTS jobs_scheduled_idx ON drover.jobs (run_at)
    WHERE state = 'queued' AND run_at IS NOT NULL;

-- The lost-message sweep and the relay's orphan sweep look at queued rows by age.
CREATE INDEX IF NOT EXISTS jobs_queued_idx
    ON drover.jobs (updated_at) WHERE state = 'queued';
