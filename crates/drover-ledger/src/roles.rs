//! Least-privilege Postgres roles for the ledger: `drover migrate --roles`.
//!
//! Three group roles (NOLOGIN; a deployment grants them to its login roles):
//!
//! * **worker**: reads and writes the ledger's rows (`SELECT, INSERT, UPDATE, DELETE` on every
//!   table of schema `drover`, the sequences, every function), but no DDL: it cannot create,
//!   alter or drop anything, so only `drover migrate` (run as the schema's owner) changes
//!   the schema.
//! * **producer**: only `drover.enqueue`, `drover.record_jobs` and `drover.mark_published`
//!   (what `drover publish`, the clients and `drover.enqueue` use, made `SECURITY DEFINER`
//!   here so they write as the owner), and `SELECT` on `drover.jobs` narrowed by a row-level
//!   security policy to the rows whose `submitted_by` is its own login. No other table, no
//!   direct `INSERT`, `UPDATE` or `DELETE`: a producer cannot change a job's state.
//! * **dashboard**: `SELECT` on the ledger; with `dashboard_actions` also the columns the
//!   retry and cancel actions update and `INSERT` on `drover.actions` (the audit trail).
//!
//! Everything is idempotent and re-applied on every run (functions a later migration
//! replaces lose `SECURITY DEFINER` and their grants, so deployments run `--roles` with every
//! migration). Role names are cluster-wide in Postgres; the privileges are per database.

use crate::{Ledger, LedgerError};

/// The three group roles' names (defaults `drover_worker`, `drover_producer`,
/// `drover_dashboard`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleNames {
    /// Ledger DML, no DDL.
    pub worker: String,
    /// `drover.enqueue` and its own jobs.
    pub producer: String,
    /// Read-only (plus the actions when asked).
    pub dashboard: String,
}

impl Default for RoleNames {
    fn default() -> Self {
        RoleNames {
            worker: "drover_worker".into(),
            producer: "drover_producer".into(),
            dashboard: "drover_dashboard".into(),
        }
    }
}

/// What [`Ledger::apply_roles`] sets up.
#[derive(Debug, Clone, Default)]
pub struct RoleGrants {
    /// The group roles, created NOLOGIN when absent.
    pub names: RoleNames,
    /// Let the dashboard role retry and cancel jobs (give it when the dashboard has an admin
    /// token).
    pub dashboard_actions: bool,
}

/// The columns the dashboard's retry and cancel update (`Ledger::redrive`,
/// `Ledger::request_cancel`).
const DASHBOARD_ACTION_COLUMNS: &str = "state, run_at, cancel_requested, last_error, error_kind, \
     max_attempts, finished_at, updated_at";

/// The functions a producer calls, with their signatures (for `ALTER FUNCTION` and `GRANT`).
const PRODUCER_FUNCTIONS: [&str; 3] = [
    "drover.enqueue(text, text, jsonb, integer, integer, timestamptz)",
    "drover.record_jobs(uuid[], text[], text[], jsonb[], integer[], integer[], boolean[], text[])",
    "drover.mark_published(uuid[])",
];

/// Checks a role name and returns it double-quoted for SQL. Lower-case letters, digits and
/// `_`, starting with a letter or `_`, at most 63 bytes (Postgres' identifier limit), so the
/// name is the same quoted or not.
pub fn quote_role(field: &'static str, name: &str) -> Result<String, LedgerError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_");
    if ok {
        Ok(format!("\"{name}\""))
    } else {
        Err(LedgerError::Invalid {
            field,
            message: format!(
                "{name:?} is not a usable role name: use 1-63 of [a-z0-9_], starting with a \
                 letter or '_', not starting with 'pg_'"
            ),
        })
    }
}

impl Ledger {
    /// Creates the group roles when absent and grants them exactly what their part needs
    /// (see the module's documentation). Run as the owner of schema `drover` (the role that
    /// ran `drover migrate`) with `CREATEROLE` (or as a superuser). One transaction.
    pub async fn apply_roles(&self, g: &RoleGrants) -> Result<(), LedgerError> {
        let worker = quote_role("--worker-role", &g.names.worker)?;
        let producer = quote_role("--producer-role", &g.names.producer)?;
        let dashboard = quote_role("--dashboard-role", &g.names.dashboard)?;
        let mut statements: Vec<String> = Vec::new();
        for (name, quoted) in [
            (&g.names.worker, &worker),
            (&g.names.producer, &producer),
            (&g.names.dashboard, &dashboard),
        ] {
            // Concurrent runs (another database of the same cluster) may create it between
            // the check and the CREATE; that is as good as creating it.
            statements.push(format!(
                "DO $$ BEGIN \
                   IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{name}') THEN \
                     CREATE ROLE {quoted} NOLOGIN; \
                   END IF; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
                 END $$"
            ));
        }
        // Start from nothing, so a run after a narrower choice (no dashboard actions) takes
        // privileges away again.
        for role in [&worker, &producer, &dashboard] {
            statements.push(format!(
                "REVOKE ALL ON ALL TABLES IN SCHEMA drover FROM {role}"
            ));
            statements.push(format!(
                "REVOKE ALL ON ALL SEQUENCES IN SCHEMA drover FROM {role}"
            ));
            statements.push(format!(
                "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA drover FROM {role}"
            ));
            statements.push(format!("REVOKE ALL ON SCHEMA drover FROM {role}"));
            statements.push(format!("GRANT USAGE ON SCHEMA drover TO {role}"));
        }

        // Worker: rows, not schema.
        statements.push(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA drover TO {worker}"
        ));
        statements.push(format!(
            "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA drover TO {worker}"
        ));
        statements.push(format!(
            "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA drover TO {worker}"
        ));

        // Producer: the three functions, as the owner; not callable by everyone any more.
        for f in PRODUCER_FUNCTIONS {
            statements.push(format!(
                "ALTER FUNCTION {f} SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
            ));
            statements.push(format!("REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC"));
            statements.push(format!(
                "GRANT EXECUTE ON FUNCTION {f} TO {producer}, {worker}"
            ));
        }
        // The helpers the definer functions call run as the owner too; the producer needs
        // nothing on them. `SELECT` on jobs, narrowed to its own rows below.
        statements.push(format!("GRANT SELECT ON drover.jobs TO {producer}"));

        // Dashboard: read-only, plus the two actions when asked.
        statements.push(format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA drover TO {dashboard}"
        ));
        if g.dashboard_actions {
            statements.push(format!(
                "GRANT UPDATE ({DASHBOARD_ACTION_COLUMNS}) ON drover.jobs TO {dashboard}"
            ));
            statements.push(format!("GRANT INSERT ON drover.actions TO {dashboard}"));
            statements.push(format!(
                "GRANT USAGE ON SEQUENCE drover.actions_id_seq TO {dashboard}"
            ));
        }

        // Row-level security on jobs: everyone keeps every row (privileges still decide
        // what they may do) except members of the producer role, who see their own. The
        // owner (and so the SECURITY DEFINER functions) is not subject to it.
        statements.push("ALTER TABLE drover.jobs ENABLE ROW LEVEL SECURITY".into());
        statements.push("DROP POLICY IF EXISTS drover_all_rows ON drover.jobs".into());
        statements.push(
            "CREATE POLICY drover_all_rows ON drover.jobs TO PUBLIC USING (true) WITH CHECK (true)"
                .into(),
        );
        statements.push("DROP POLICY IF EXISTS drover_producer_own ON drover.jobs".into());
        statements.push(format!(
            "CREATE POLICY drover_producer_own ON drover.jobs AS RESTRICTIVE FOR SELECT \
             TO {producer} USING (submitted_by = session_user)"
        ));

        let mut tx = self.pool().begin().await?;
        for s in statements {
            sqlx::query(sqlx::AssertSqlSafe(s))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_checked() {
        assert_eq!(
            quote_role("--worker-role", "drover_worker").unwrap(),
            "\"drover_worker\""
        );
        for bad in ["", "Worker", "a-b", "x\"; DROP", "pg_monitor", "1abc"] {
            let e = quote_role("--worker-role", bad).unwrap_err().to_string();
            assert!(e.contains("--worker-role"), "{e}");
        }
    }
}
