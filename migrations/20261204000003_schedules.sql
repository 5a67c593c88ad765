-- Schedules (`drover schedules ...`): one row per schedule. Every worker fires the due
-- ones, leader-free: a sweep locks due rows with FOR UPDATE SKIP LOCKED, enqueues each due
-- slot's job with drover.enqueue() (key from key_template) and advances next_slot in the
-- same transaction, so a slot fires exactly once however many workers run; the job's
-- idempotency key backs that up.
--
-- Expand-only (a new table and index): workers of the previous release ignore it.

CREATE TABLE IF NOT EXISTS drover.schedules (
    name          text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    cron          text,                           -- cron expression (UTC), or
    every_secs    bigint      CHECK (every_secs > 0),  -- a period, slots aligned on the epoch
    pipeline      text        NOT NULL,
    params        jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(params) = 'object'),
    batch_size    integer     CHECK (batch_size > 0),
    key_template  text        NOT NULL,
    catch_up      text        NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('none', 'latest', 'all')),
    paused        boolean     NOT NULL DEFAULT false,
    next_slot     timestamptz NOT NULL,           -- the first slot not fired yet
    last_slot     timestamptz,                    -- the last slot fired
    last_key      text,                           -- the key of its job
    last_error    text,                           -- why the last sweep could not enqueue a slot
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_secs IS NULL))
);

-- The workers' sweep: due, active schedules.
CREATE INDEX IF NOT EXISTS schedules_due_idx ON drover.schedules (next_slot) WHERE NOT paused;
