-- drover ledger, schema "drover". One row per idempotency key (jobs), one per attempt
-- (attempts), one per completed batch (checkpoints). The ledger is the source of truth for
-- a job's state; the broker only carries work.

CREATE SCHEMA IF NOT EXISTS drover;

CREATE TABLE drover.jobs (
    id               uuid        PRIMARY KEY,
    idempotency_key  text        NOT NULL UNIQUE,
    pipeline         text        NOT NULL,
    params           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    batch_size       integer     CHECK (batch_size > 0),
    state            text        NOT NULL CHECK (state IN
                         ('queued', 'running', 'retrying', 'succeeded', 'dead', 'rejected', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,   -- attempts started (claims)
    failures         integer     NOT NULL DEFAULT 0,   -- attempts that failed or were lost
    max_attempts     integer     NOT NULL CHECK (max_attempts > 0),
    run_at           timestamptz,                      -- when a retrying job is due
    enqueued_at      timestamptz,                      -- broker confirmed the message carrying it
    lease_owner      text,                             -- worker id holding a running job
    heartbeat_at     timestamptz,                      -- last lease renewal
    batches_done     integer     NOT NULL DEFAULT 0,
    batches_total    integer,
    rows_done        bigint      NOT NULL DEFAULT 0,
    result           jsonb,
    last_error       text,
    error_kind       text        CHECK (error_kind IN ('transient', 'permanent')),
    cancel_requested boolean     NOT NULL DEFAULT false,
    trace_id         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

CREATE INDEX jobs_state_idx ON drover.jobs (state, created_at);
CREATE INDEX jobs_pipeline_idx ON drover.jobs (pipeline, created_at);
-- The retry relay scans only due retries.
CREATE INDEX jobs_due_retries_idx ON drover.jobs (run_at) WHERE state = 'retrying';

CREATE TABLE drover.attempts (
    job_id      uuid        NOT NULL REFERENCES drover.jobs (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    worker      text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- running, succeeded, failed, dead, lost (owner vanished, taken over),
    -- interrupted (drained on shutdown), cancelled, rejected
    outcome     text        NOT NULL DEFAULT 'running',
    error       text,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE drover.checkpoints (
    job_id       uuid        NOT NULL REFERENCES drover.jobs (id) ON DELETE CASCADE,
    batch_index  integer     NOT NULL,
    rows         bigint      NOT NULL,
    output       text,
    checksum     text,
    summary      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    attempt      integer     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, batch_index)
);

-- Every state or progress change is announced on channel 'drover_jobs' with the key as
-- payload, so `drover jobs wait` wakes without polling.
CREATE FUNCTION drover.notify_job_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('drover_jobs', NEW.idempotency_key);
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_notify
    AFTER INSERT OR UPDATE OF state, batches_done ON drover.jobs
    FOR EACH ROW EXECUTE FUNCTION drover.notify_job_change();

-- A readable view for operators: one row per job with its duration and progress.
CREATE VIEW drover.job_overview AS
SELECT idempotency_key,
       pipeline,
       state,
       attempts,
       max_attempts,
       batches_done,
       batches_total,
       rows_done,
       error_kind,
       last_error,
       run_at,
       lease_owner,
       heartbeat_at,
       created_at,
       started_at,
       finished_at,
       finished_at - started_at AS duration,
       trace_id
FROM drover.jobs;
