-- Run once by the postgres image when its data volume is first created
-- (/docker-entrypoint-initdb.d): the worker's least-privilege login. The group role is created
-- here so the login can join it; `drover migrate --roles` (the compose `migrate` service)
-- grants the group its privileges on the ledger. Demo password: change it here and in
-- deploy/secrets/worker-database-url together (docs/security.md).
CREATE ROLE drover_worker NOLOGIN;
CREATE ROLE drover_w LOGIN PASSWORD 'drover' IN ROLE drover_worker;
