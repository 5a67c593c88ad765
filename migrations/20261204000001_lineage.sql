-- Lineage and end-to-end integrity (issue 19).
--
-- Expand-only (nullable columns), so a worker of the previous release keeps working against
-- this schema during a rolling deploy: it simply records no lineage.

-- The job's identity as its first attempt saw it: the pipeline's declared version and a
-- fingerprint of every input (see docs/output.md). A resuming attempt compares its own with
-- these before it runs a batch; a difference fails the job permanently.
ALTER TABLE drover.jobs ADD COLUMN IF NOT EXISTS pipeline_version text;
ALTER TABLE drover.jobs ADD COLUMN IF NOT EXISTS inputs jsonb;

-- Per batch: the first input row it read (it read rows first_row .. first_row + rows) and
-- the rows its output holds. `attempt` (already there) is the attempt that wrote the part.
ALTER TABLE drover.checkpoints ADD COLUMN IF NOT EXISTS first_row bigint;
ALTER TABLE drover.checkpoints ADD COLUMN IF NOT EXISTS rows_out bigint;

-- `drover verify --since T` picks finished jobs by finish time.
CREATE INDEX IF NOT EXISTS jobs_finished_idx ON drover.jobs (finished_at)
    WHERE finished_at IS NOT NULL;
