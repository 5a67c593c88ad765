-- drover.mark_published no longer marks a job whose run_at is still ahead.
--
-- A worker that receives a delayed job early defers it: it keeps run_at in the ledger and
-- clears enqueued_at, so the relay publishes the job when it is due. When that deferral
-- committed before the producer's own mark_published (a fast worker, a slow confirm), the
-- producer set enqueued_at again, the relay never published the job, and it waited for the
-- lost-message sweep (a minute or more late). A message for a job that is not due yet proves
-- nothing about when it will run, so such jobs stay unmarked: the relay publishes them at
-- run_at. If the early message is still in the queue then, the job has two messages; the
-- claim is idempotent, so the second finds the job running or done and is dropped.
CREATE OR REPLACE FUNCTION drover.mark_published(ids uuid[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE drover.jobs SET enqueued_at = now() WHERE id IN
        (SELECT id FROM drover.jobs
         WHERE id = ANY(ids) AND enqueued_at IS NULL AND (run_at IS NULL OR run_at <= now())
         ORDER BY id FOR UPDATE SKIP LOCKED)
$$;
