-- Run once by the postgres image when its data volume is first created
-- (/docker-entrypoint-initdb.d): the least-privilege logins of the worker (drover_w), a
-- producer (drover_p) and the dashboard (drover_d). The group roles are created here so the
-- logins can join them; `drover migrate --roles` (the compose `migrate` service) grants the
-- groups their privileges on the ledger. Demo passwords ("drover"): change each here and in
-- the matching deploy/secrets/*-database-url together (docs/security.md).
CREATE ROLE drover_worker NOLOGIN;
CREATE ROLE drover_producer NOLOGIN;
CREATE ROLE drover_dashboard NOLOGIN;
CREATE ROLE drover_w LOGIN PASSWORD 'drover' IN ROLE drover_worker;
CREATE ROLE drover_p LOGIN PASSWORD 'drover' IN ROLE drover_producer;
CREATE ROLE drover_d LOGIN PASSWORD 'drover' IN ROLE drover_dashboard;
