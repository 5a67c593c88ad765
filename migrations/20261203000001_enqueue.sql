-- Producers in any language: drover.enqueue() records a job inside the caller's own
-- transaction, and the workers' relay publishes it once that transaction commits. Also the
-- comparison every producer path uses to tell "the same request again" (harmless) from "the
-- same key for another request" (a conflict).
--
-- Expand-only: two columns with defaults, one index, three functions. A worker built before
-- this migration still runs against it (it never reads the new columns); it just leaves
-- enqueued jobs to its 30 s orphan sweep instead of publishing them at once.

-- 'publish': recorded by a producer that publishes the message itself (drover publish, the
-- Rust and Python clients), so a row without a confirm is only re-published after a grace
-- period that protects the producer's own in-flight publish. 'enqueue': recorded by
-- drover.enqueue(); nobody else publishes it, so the relay does as soon as it is due.
ALTER TABLE drover.jobs ADD COLUMN origin text NOT NULL DEFAULT 'publish';
-- True when the request named no max_attempts and max_attempts holds a default; the
-- idempotency comparison needs to know what was asked for, not what was filled in.
ALTER TABLE drover.jobs ADD COLUMN max_attempts_default boolean NOT NULL DEFAULT false;

-- The relay's scan for jobs recorded but never published (enqueued, or a producer crashed
-- between ledger and broker). Small: rows leave it as soon as they are published.
CREATE INDEX jobs_unpublished_idx ON drover.jobs (created_at)
    WHERE state = 'queued' AND enqueued_at IS NULL;

-- A JSON value for an error message: cut to 80 characters, with its size when cut, so a
-- huge param cannot flood a log line.
CREATE FUNCTION drover.show_value(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN v IS NULL THEN '(absent)'
        WHEN length(v::text) <= 80 THEN v::text
        ELSE left(v::text, 80) || '… (' || octet_length(v::text) || ' bytes)'
    END
$$;

-- What differs between the job stored under a key and a new request for the same key, as
-- text for an error message (`params (period: "2026-11" vs "2026-12")`), or NULL when the
-- request is the same: same pipeline, same params (as JSON values, key order ignored), same
-- batch_size, same max_attempts (NULL = "not given"). run_at is not compared: a producer
-- that retries a request usually recomputes it, and it does not change what the job does.
CREATE FUNCTION drover.request_diff(
    j drover.jobs,
    p_pipeline text,
    p_params jsonb,
    p_batch_size integer,
    p_max_attempts integer
) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    parts text[] := '{}';
    param_parts text[] := '{}';
    k text;
BEGIN
    IF j.pipeline IS DISTINCT FROM p_pipeline THEN
        parts := parts || format('pipeline (%s vs %s)', to_jsonb(j.pipeline), to_jsonb(p_pipeline));
    END IF;
    IF j.params IS DISTINCT FROM p_params THEN
        FOR k IN
            SELECT key FROM (
                SELECT jsonb_object_keys(j.params) AS key
                UNION SELECT jsonb_object_keys(p_params)
            ) keys ORDER BY key
        LOOP
            IF (j.params -> k) IS DISTINCT FROM (p_params -> k) THEN
                param_parts := param_parts || format('%s: %s vs %s', k,
                    drover.show_value(j.params -> k), drover.show_value(p_params -> k));
            END IF;
        END LOOP;
        parts := parts || format('params (%s)', array_to_string(param_parts, ', '));
    END IF;
    IF j.batch_size IS DISTINCT FROM p_batch_size THEN
        parts := parts || format('batch_size (%s vs %s)',
            coalesce(j.batch_size::text, 'not given'), coalesce(p_batch_size::text, 'not given'));
    END IF;
    IF (CASE WHEN j.max_attempts_default THEN NULL ELSE j.max_attempts END)
        IS DISTINCT FROM p_max_attempts THEN
        parts := parts || format('max_attempts (%s vs %s)',
            CASE WHEN j.max_attempts_default THEN 'not given' ELSE j.max_attempts::text END,
            coalesce(p_max_attempts::text, 'not given'));
    END IF;
    IF cardinality(parts) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN array_to_string(parts, ', ');
END;
$$;

-- Enqueue a job inside the caller's transaction. Returns true when the key is new, false
-- when the same request was enqueued or published before (nothing new happens). Raises
-- invalid_parameter_value (22023) naming the field and the value for bad input, and
-- unique_violation (23505, constraint drover_idempotency_conflict) when the key exists for
-- a different request. Committed: a worker publishes it within a second (NOTIFY on
-- 'drover_enqueue', with the relay's periodic sweep as fallback), or when one starts, or
-- when the broker is back. Rolled back: never published. run_at delays the publish until
-- then. The pipeline name is checked by the worker: an unknown one ends `rejected`.
--
-- The limits are the message contract's (crates/drover-core/src/message.rs): key 1-256
-- bytes without control characters, pipeline 1-64 of [A-Za-z0-9_.-], params an object,
-- batch_size 1-10000000, max_attempts 1-100, the whole message at most 1 MiB. A job that
-- names no max_attempts stores 5 until the relay that publishes it resolves the pipeline's
-- default or the worker's setting.
CREATE FUNCTION drover.enqueue(
    key text,
    pipeline text,
    params jsonb DEFAULT '{}',
    batch_size integer DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    run_at timestamptz DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    existing drover.jobs;
    diff text;
    shown_key text := to_jsonb(key)::text;
BEGIN
    IF key IS NULL OR btrim(key) = '' THEN
        RAISE EXCEPTION 'field "idempotency_key": must not be empty'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'idempotency_key';
    END IF;
    IF octet_length(key) > 256 THEN
        RAISE EXCEPTION 'field "idempotency_key": % bytes, at most 256 allowed', octet_length(key)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'idempotency_key';
    END IF;
    IF key ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'field "idempotency_key": % contains control characters', shown_key
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'idempotency_key';
    END IF;
    IF pipeline IS NULL OR pipeline !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'field "pipeline": % is not a pipeline name (1-64 of [A-Za-z0-9_.-])',
            coalesce(to_jsonb(pipeline)::text, 'null')
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'pipeline';
    END IF;
    IF params IS NULL THEN
        params := '{}'::jsonb;
    END IF;
    IF jsonb_typeof(params) <> 'object' THEN
        RAISE EXCEPTION 'field "params": expected a JSON object, got %', drover.show_value(params)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'params';
    END IF;
    IF octet_length(params::text) + octet_length(key) + 200 > 1048576 THEN
        RAISE EXCEPTION 'field "params": % bytes, the message would exceed the 1048576-byte limit',
            octet_length(params::text)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'params';
    END IF;
    IF batch_size IS NOT NULL AND (batch_size < 1 OR batch_size > 10000000) THEN
        RAISE EXCEPTION 'field "batch_size": expected an integer from 1 to 10000000, got %', batch_size
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'batch_size';
    END IF;
    IF max_attempts IS NOT NULL AND (max_attempts < 1 OR max_attempts > 100) THEN
        RAISE EXCEPTION 'field "max_attempts": expected an integer from 1 to 100, got %', max_attempts
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'max_attempts';
    END IF;

    INSERT INTO drover.jobs AS j (id, idempotency_key, pipeline, params, batch_size,
                                  max_attempts, max_attempts_default, state, run_at, origin)
    VALUES (gen_random_uuid(), enqueue.key, enqueue.pipeline, enqueue.params,
            enqueue.batch_size, coalesce(enqueue.max_attempts, 5),
            enqueue.max_attempts IS NULL, 'queued', enqueue.run_at, 'enqueue')
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF FOUND THEN
        PERFORM pg_notify('drover_enqueue', key);
        RETURN true;
    END IF;

    SELECT * INTO existing FROM drover.jobs j WHERE j.idempotency_key = enqueue.key;
    IF NOT FOUND THEN
        -- Another transaction holds the key and this one's snapshot cannot see it
        -- (REPEATABLE READ or SERIALIZABLE): the caller retries, as for any such conflict.
        RAISE EXCEPTION '%: being enqueued by a concurrent transaction; retry', key
            USING ERRCODE = 'serialization_failure';
    END IF;
    diff := drover.request_diff(existing, enqueue.pipeline, enqueue.params,
                                enqueue.batch_size, enqueue.max_attempts);
    IF diff IS NOT NULL THEN
        RAISE EXCEPTION '%: already exists (%) with different %; nothing enqueued',
            key, existing.state, diff
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'drover_idempotency_conflict',
                  DETAIL = diff;
    END IF;
    RETURN false;
END;
$$;

-- The producer side of `drover publish` and the clients' publish: records jobs as `queued`
-- (origin 'publish') before their messages go to the broker, in one statement. Keys that
-- exist already are left alone. One row per input, in input order: whether it was inserted,
-- the stored id and state, whether its message was ever confirmed, and what differs from the
-- stored request (NULL when it is the same). `max_attempts` is the limit to store (NULL:
-- 5, the worker's default), `max_attempts_given` whether the request named it (a producer
-- may fill in a pipeline's default, which is not part of the request).
CREATE FUNCTION drover.record_jobs(
    ids uuid[],
    keys text[],
    pipelines text[],
    params jsonb[],
    batch_sizes integer[],
    max_attempts integer[],
    max_attempts_given boolean[],
    trace_ids text[]
) RETURNS TABLE (idempotency_key text, inserted boolean, id uuid, state text,
                 enqueued boolean, differs text)
LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(ids, keys, pipelines, params, batch_sizes, max_attempts,
                             max_attempts_given, trace_ids)
            WITH ORDINALITY AS t(id, key, pipeline, params, batch_size, max_attempts, given,
                                 trace_id, ord)
    ), ins AS (
        INSERT INTO drover.jobs (id, idempotency_key, pipeline, params, batch_size,
                                 max_attempts, max_attempts_default, trace_id, state, origin)
        SELECT id, key, pipeline, params, batch_size, coalesce(max_attempts, 5),
               NOT given, trace_id, 'queued', 'publish'
        FROM input ORDER BY ord
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING drover.jobs.idempotency_key
    )
    SELECT i.key,
           ins.idempotency_key IS NOT NULL,
           coalesce(j.id, i.id),
           coalesce(j.state, 'queued'),
           j.enqueued_at IS NOT NULL,
           CASE WHEN ins.idempotency_key IS NULL AND j.id IS NOT NULL
                THEN drover.request_diff(j, i.pipeline, i.params, i.batch_size,
                                         CASE WHEN i.given THEN i.max_attempts END)
           END
    FROM input i
    LEFT JOIN ins ON ins.idempotency_key = i.key
    LEFT JOIN drover.jobs j ON j.idempotency_key = i.key
    ORDER BY i.ord
$$;

-- After the broker confirmed their messages: notes it on the jobs (enqueued_at), so the
-- relay never re-publishes them. Rows a worker is claiming at this instant are skipped, not
-- waited for: a claim records enqueued_at itself (holding the message proves it).
CREATE FUNCTION drover.mark_published(ids uuid[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE drover.jobs SET enqueued_at = now() WHERE id IN
        (SELECT id FROM drover.jobs WHERE id = ANY(ids) AND enqueued_at IS NULL
         ORDER BY id FOR UPDATE SKIP LOCKED)
$$;

COMMENT ON FUNCTION drover.enqueue(text, text, jsonb, integer, integer, timestamptz) IS
    'Enqueue a job in the caller''s transaction; true when the key is new. See docs/producers.md.';
