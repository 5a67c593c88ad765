-- The dashboard (`drover dashboard`): the indexes its job list needs to answer a page in
-- well under 100 ms on a ledger of millions of jobs, and the audit log of its actions.
--
-- Expand-only: new indexes and a new table. Workers of an older release neither read nor
-- write any of it, so they run unchanged against this schema.

-- The job list pages with a keyset on (created_at, id), newest first, optionally filtered by
-- state and/or pipeline: each filter combination walks one index in order and stops after a
-- page. These supersede jobs_state_idx and jobs_pipeline_idx (same leading columns), which
-- are dropped so the workers' writes maintain no more indexes than needed.
CREATE INDEX IF NOT EXISTS jobs_created_idx ON drover.jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_state_created_idx ON drover.jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_pipeline_created_idx ON drover.jobs (pipeline, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_state_pipeline_created_idx
    ON drover.jobs (state, pipeline, created_at, id);
DROP INDEX IF EXISTS drover.jobs_state_idx;
DROP INDEX IF EXISTS drover.jobs_pipeline_idx;

-- Key search is a prefix search, answered in key order from a byte-order ("C" collation)
-- index: the prefix as a key range and the keyset `key > last` both use it whatever the
-- database's collation.
CREATE INDEX IF NOT EXISTS jobs_key_c_idx ON drover.jobs ((idempotency_key COLLATE "C"));

-- Throughput and failures over the last hour: jobs by finish time.
CREATE INDEX IF NOT EXISTS jobs_finished_idx ON drover.jobs (finished_at)
    WHERE finished_at IS NOT NULL;

-- Every action taken from the dashboard (retry, cancel, bulk retry of dead jobs): what,
-- when, from where, and on which jobs. Rows are only ever inserted.
CREATE TABLE IF NOT EXISTS drover.actions (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    action      text        NOT NULL CHECK (action IN ('retry', 'cancel', 'bulk_retry_dead')),
    keys        text[]      NOT NULL,             -- the jobs the action changed
    filter      jsonb,                             -- a bulk action's filter
    outcome     text        NOT NULL,              -- what happened, e.g. 'retrying', or the refusal
    via         text        NOT NULL CHECK (via IN ('session', 'bearer')),
    remote_addr text,
    user_agent  text
);
CREATE INDEX IF NOT EXISTS actions_at_idx ON drover.actions (at);
CREATE INDEX IF NOT EXISTS actions_keys_idx ON drover.actions USING gin (keys);
