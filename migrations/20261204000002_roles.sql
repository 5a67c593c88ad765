-- Who submitted each job: the Postgres login (session_user) of the producer that recorded it,
-- through drover.enqueue, drover.record_jobs (drover publish, the clients) or a plain INSERT.
-- `drover migrate --roles` (crates/drover-ledger/src/roles.rs) lets a producer role read only
-- the jobs whose submitted_by is its own login (a row-level security policy on this column).
-- session_user, not current_user: inside those functions, once --roles makes them SECURITY
-- DEFINER, current_user is the schema's owner while session_user is still the producer.
--
-- Expand-only: one column with a default (existing rows get the login that runs this
-- migration). Workers built before it never read it.
ALTER TABLE drover.jobs ADD COLUMN IF NOT EXISTS submitted_by text NOT NULL DEFAULT session_user;
