//! Layered configuration: flags, then environment, then an optional TOML file, then defaults.
//!
//! clap resolves flags and environment variables together (a flag wins over its variable);
//! whatever is still unset is taken from the TOML file, and finally from defaults that work
//! on a machine with local services, so a newcomer types nothing.

use crate::retry::RetryPolicy;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Default broker: a local RabbitMQ with its stock guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default ledger: a local Postgres with trust auth; the database is created if absent.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/drover";
/// Default namespace: queues `drover.jobs` and `drover.dead`.
pub const DEFAULT_NAMESPACE: &str = "drover";
/// Default `x-delivery-limit` of the work queue: deliveries of one message before the broker
/// dead-letters it (poison protection).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;
/// The config file read when `--config` / `DROVER_CONFIG` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "drover.toml";

/// Configuration errors, each naming the file or field at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}:\n{message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A `*_FILE` variable names a file that cannot be read (or holds no value).
    #[error("{var} {path}: {message}")]
    SecretFile {
        /// The variable (and flag) that named the file, e.g. `DATABASE_URL_FILE`.
        var: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// A setting that can be given directly (flag or variable) or as a file holding it, the way
/// Kubernetes secrets and systemd credentials are mounted: `DATABASE_URL` or
/// `DATABASE_URL_FILE`, `DROVER_AMQP_URL` or `DROVER_AMQP_URL_FILE`.
#[derive(Debug, Clone, Copy)]
pub struct SecretSetting {
    /// The direct form, as shown in messages: `--database-url / DATABASE_URL`.
    pub direct: &'static str,
    /// The file form, as shown in messages: `--database-url-file / DATABASE_URL_FILE`.
    pub file: &'static str,
}

/// `DATABASE_URL` and its file form.
pub const DATABASE_URL_SETTING: SecretSetting = SecretSetting {
    direct: "--database-url / DATABASE_URL",
    file: "--database-url-file / DATABASE_URL_FILE",
};

/// `DROVER_AMQP_URL` and its file form.
pub const AMQP_URL_SETTING: SecretSetting = SecretSetting {
    direct: "--amqp-url / DROVER_AMQP_URL",
    file: "--amqp-url-file / DROVER_AMQP_URL_FILE",
};

impl SecretSetting {
    /// The value given directly, else the content of `file` (one line; the trailing newline
    /// an editor or `echo` leaves is removed), else `None` (the config file or the default
    /// applies). Both given is an error: which one wins would be a guess. Errors name the
    /// setting and the path, never the content.
    pub fn resolve(
        &self,
        direct: Option<String>,
        file: Option<&Path>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(path) = file else {
            return Ok(direct);
        };
        if direct.is_some() {
            return Err(ConfigError::SecretFile {
                var: self.file,
                path: path.to_path_buf(),
                message: format!("{} is set too; set only one of the two", self.direct),
            });
        }
        let bad = |message: String| ConfigError::SecretFile {
            var: self.file,
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.trim().is_empty() {
            return Err(bad("the file is empty".into()));
        }
        if value.contains('\n') {
            return Err(bad(
                "the file has more than one line; it must hold the value alone".into(),
            ));
        }
        Ok(Some(value.to_string()))
    }
}

/// The TOML file's shape. Every field is optional; unknown fields are an error so a typo
/// does not silently fall back to a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub amqp_url: Option<String>,
    pub database_url: Option<String>,
    pub namespace: Option<String>,
    pub worker: WorkerFileConfig,
    pub retry: Option<RetryPolicy>,
    /// `[retention]`: what the workers prune from the ledger (absent: nothing).
    pub retention: Option<RetentionFileConfig>,
    /// `[limits.PIPELINE]`: concurrency limits per pipeline (absent: only the prefetch).
    pub limits: std::collections::BTreeMap<String, LimitsFileConfig>,
}

/// `[limits.PIPELINE]` table of the TOML file: at most `per_worker` jobs of the pipeline
/// running on one worker, `total` across all workers, `per_group` per value of the param
/// `group_by` (e.g. one running payroll per `client_id`). Every worker of a namespace must
/// have the same `total` and group limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsFileConfig {
    pub per_worker: Option<u32>,
    pub total: Option<u32>,
    pub group_by: Option<String>,
    pub per_group: Option<u32>,
}

/// `[retention]` table of the TOML file: finished jobs older than `older_than` (a duration
/// such as `30d`) in one of `states` are deleted from the ledger by the workers, with their
/// output files only when `delete_outputs` is true.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionFileConfig {
    pub older_than: Option<String>,
    pub states: Option<Vec<String>>,
    pub delete_outputs: bool,
    /// How often a worker prunes (a duration; default `1h`).
    pub every: Option<String>,
}

/// `[worker]` table of the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerFileConfig {
    pub prefetch: Option<u16>,
    pub heartbeat_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub output_root: Option<PathBuf>,
    pub max_attempts: Option<u32>,
    pub delivery_limit: Option<u32>,
    pub id: Option<String>,
    /// `--metrics-addr`: `host:port`, port 0 for a free port, or `"off"`.
    pub metrics_addr: Option<String>,
    /// `--lost-after-secs`: how long a queued job may wait without a ready message.
    pub lost_after_secs: Option<u64>,
    /// `--memory-limit`: a size such as `"2GiB"` (`"0"`: no limit).
    pub memory_limit: Option<String>,
    /// `--memory-per-row PIPELINE=SIZE`: bytes per row of batch size by pipeline.
    pub memory_per_row: std::collections::BTreeMap<String, String>,
}

impl FileConfig {
    /// Loads `explicit` if given (it must exist), else `drover.toml` in the current
    /// directory if present, else an empty config.
    pub fn load(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Ok(FileConfig::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path,
            // toml's message is several lines (the line, a caret under the column, the
            // reason); flattened it loses the caret's alignment, so it is kept as is.
            message: e.to_string().trim_end().to_string(),
        })
    }
}

/// Connection settings every command needs: one resolved value for each, so `publish`,
/// `worker` and every other command declare the same queues and reach the same ledger.
///
/// The URLs carry passwords: they are [`SecretString`]s, so `{:?}` prints `[REDACTED]`;
/// [`Connections::amqp_shown`] and [`Connections::database_shown`] give the redacted form for
/// messages, and `expose_secret()` the real one for connecting.
#[derive(Debug, Clone)]
pub struct Connections {
    /// RabbitMQ URL (`amqp://` or `amqps://`).
    pub amqp_url: SecretString,
    /// Postgres URL of the ledger.
    pub database_url: SecretString,
    /// Prefix of the queues and exchanges.
    pub namespace: String,
    /// `x-delivery-limit` of `{ns}.jobs`. Every command that declares the queue must agree
    /// on it (RabbitMQ refuses a redeclaration with other arguments).
    pub delivery_limit: u32,
}

impl Connections {
    /// Resolves flag/env values (already merged by clap) over the file over the defaults.
    pub fn resolve(
        amqp_url: Option<String>,
        database_url: Option<String>,
        namespace: Option<String>,
        file: &FileConfig,
    ) -> Result<Connections, ConfigError> {
        let amqp_url = amqp_url
            .or_else(|| file.amqp_url.clone())
            .unwrap_or_else(|| DEFAULT_AMQP_URL.into());
        let database_url = database_url
            .or_else(|| file.database_url.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        let c = Plain {
            amqp_url: &amqp_url,
            database_url: &database_url,
            namespace: namespace
                .or_else(|| file.namespace.clone())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        };
        if !(c.amqp_url.starts_with("amqp://") || c.amqp_url.starts_with("amqps://")) {
            return Err(ConfigError::Invalid {
                field: "amqp url (--amqp-url / DROVER_AMQP_URL)",
                message: format!(
                    "{:?} does not start with amqp:// or amqps://",
                    redact(c.amqp_url)
                ),
            });
        }
        if !(c.database_url.starts_with("postgres://")
            || c.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                field: "database url (--database-url / DATABASE_URL)",
                message: format!(
                    "{:?} does not start with postgres:// or postgresql://",
                    redact(c.database_url)
                ),
            });
        }
        let ns_ok = !c.namespace.is_empty()
            && c.namespace.len() <= 64
            && c.namespace
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.');
        if !ns_ok {
            return Err(ConfigError::Invalid {
                field: "namespace (--namespace / DROVER_NAMESPACE)",
                message: format!("{:?}: use 1-64 of [A-Za-z0-9._-]", c.namespace),
            });
        }
        check_amqp_addresses(c.amqp_url)?;
        let delivery_limit = file.worker.delivery_limit.unwrap_or(DEFAULT_DELIVERY_LIMIT);
        if delivery_limit == 0 {
            return Err(ConfigError::Invalid {
                field: "[worker] delivery_limit",
                message: "must be at least 1, got 0".into(),
            });
        }
        Ok(Connections {
            namespace: c.namespace,
            amqp_url: SecretString::from(amqp_url),
            database_url: SecretString::from(database_url),
            delivery_limit,
        })
    }

    /// The broker URL with its password replaced by `***`, for messages and logs (each
    /// address of a list, see [`Connections::amqp_urls`]).
    pub fn amqp_shown(&self) -> String {
        split_amqp_addresses(self.amqp_url.expose_secret())
            .map(redact)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The broker addresses: `amqp_url` may list the nodes of a RabbitMQ cluster separated by
    /// commas (`amqp://u:p@rabbit-1/%2f,amqp://u:p@rabbit-2/%2f`); connections go to the first
    /// that answers and fail over to the others. A single URL is a list of one.
    pub fn amqp_urls(&self) -> Vec<SecretString> {
        split_amqp_addresses(self.amqp_url.expose_secret())
            .map(|u| SecretString::from(u.to_string()))
            .collect()
    }

    /// The ledger URL with its password replaced by `***`, for messages and logs.
    pub fn database_shown(&self) -> String {
        redact(self.database_url.expose_secret())
    }
}

/// Separates the addresses in one `--amqp-url` / `DROVER_AMQP_URL` value. A comma inside a
/// password must be percent-encoded (`%2C`), as any reserved character in a URL.
pub const AMQP_ADDRESS_SEPARATOR: char = ',';

/// The addresses of an `amqp_url` that lists several nodes, separated by
/// [`AMQP_ADDRESS_SEPARATOR`] (blanks around them ignored).
pub fn split_amqp_addresses(list: &str) -> impl Iterator<Item = &str> {
    list.split(AMQP_ADDRESS_SEPARATOR).map(str::trim)
}

/// Every address of a list must be an AMQP URL; errors name its position, never its text.
fn check_amqp_addresses(list: &str) -> Result<(), ConfigError> {
    let count = split_amqp_addresses(list).count();
    for (i, url) in split_amqp_addresses(list).enumerate() {
        let which = if count > 1 {
            format!("address {} of {count}", i + 1)
        } else {
            "the address".to_string()
        };
        if url.is_empty() {
            return Err(ConfigError::Invalid {
                field: "amqp url (--amqp-url / DROVER_AMQP_URL)",
                message: format!(
                    "{which} is empty; separate the addresses of a cluster's nodes with single commas"
                ),
            });
        }
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::Invalid {
                field: "amqp url (--amqp-url / DROVER_AMQP_URL)",
                message: format!(
                    "{which}, {:?}, does not start with amqp:// or amqps://",
                    redact(url)
                ),
            });
        }
    }
    Ok(())
}

/// The values checked by [`Connections::resolve`] before they are wrapped.
struct Plain<'a> {
    amqp_url: &'a str,
    database_url: &'a str,
    namespace: String,
}

/// Param names whose values are secrets whatever their shape; shown as `***`.
const SECRET_PARAM_NAMES: [&str; 5] = ["password", "secret", "token", "api_key", "credentials"];

/// A job's params as they may be shown (`jobs show`, logs, the dashboard): every string that
/// is a URL with a password has it replaced by `***` (a Postgres input URL carries one), and
/// the value of any field whose name contains `password`, `secret`, `token`, `api_key` or
/// `credentials` is replaced whole. The ledger keeps the real params, since the worker
/// needs them to connect; only what is displayed is redacted.
pub fn redact_params(params: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match params {
        Value::String(s) if s.contains("://") => Value::String(redact(s)),
        Value::Array(items) => Value::Array(items.iter().map(redact_params).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, v)| {
                    let lower = name.to_ascii_lowercase();
                    let secret = SECRET_PARAM_NAMES.iter().any(|s| lower.contains(s));
                    let shown = if secret && !v.is_null() {
                        Value::String("***".into())
                    } else {
                        redact_params(v)
                    };
                    (name.clone(), shown)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Hides the password of a `scheme://user:password@host/...` URL for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file: FileConfig = toml::from_str(
            "namespace = \"fromfile\"\ndatabase_url = \"postgres://db/x\"\n[worker]\nprefetch = 3\n",
        )
        .unwrap();
        let c = Connections::resolve(None, Some("postgres://flag/y".into()), None, &file).unwrap();
        assert_eq!(c.database_url.expose_secret(), "postgres://flag/y");
        assert_eq!(c.namespace, "fromfile");
        assert_eq!(c.amqp_url.expose_secret(), DEFAULT_AMQP_URL);
        assert_eq!(c.delivery_limit, DEFAULT_DELIVERY_LIMIT);
        assert_eq!(file.worker.prefetch, Some(3));
    }

    #[test]
    fn bad_values_name_the_field() {
        let f = FileConfig::default();
        let e = Connections::resolve(Some("http://x".into()), None, None, &f).unwrap_err();
        assert!(e.to_string().contains("DROVER_AMQP_URL"), "{e}");
        let e = Connections::resolve(None, Some("mysql://x".into()), None, &f).unwrap_err();
        assert!(e.to_string().contains("DATABASE_URL"), "{e}");
        let e = Connections::resolve(None, None, Some("a b".into()), &f).unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
        let e = toml::from_str::<FileConfig>("prefetc = 1").unwrap_err();
        assert!(e.to_string().contains("prefetc"));
    }

    #[test]
    fn debug_never_shows_a_password() {
        let c = Connections::resolve(
            Some("amqp://u:hunter2@h:5672/%2f".into()),
            Some("postgres://u:hunter3@h/db".into()),
            None,
            &FileConfig::default(),
        )
        .unwrap();
        let shown = format!("{c:?} {} {}", c.amqp_shown(), c.database_shown());
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("u:***@h/db"), "{shown}");
    }

    #[test]
    fn worker_table_takes_every_worker_setting() {
        let file: FileConfig = toml::from_str(
            "[worker]\nmemory_limit = \"2GiB\"\nmemory_per_row = { exec = \"4KiB\" }\n",
        )
        .unwrap();
        assert_eq!(file.worker.memory_limit.as_deref(), Some("2GiB"));
        assert_eq!(file.worker.memory_per_row["exec"], "4KiB");
        let file: FileConfig =
            toml::from_str("[worker]\nmetrics_addr = \"127.0.0.1:0\"\nlost_after_secs = 9\n")
                .unwrap();
        assert_eq!(file.worker.metrics_addr.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(file.worker.lost_after_secs, Some(9));
    }

    #[test]
    fn parse_errors_keep_their_lines() {
        let dir = std::env::temp_dir().join(format!("drover-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "namespace = \"a\"\n[worker]\nprefetch = \"x\"\n").unwrap();
        let e = FileConfig::load(Some(&path)).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.lines().count() >= 3, "{e}");
        assert!(e.contains("prefetch = \"x\""), "{e}");
    }

    #[test]
    fn delivery_limit_comes_from_the_worker_table() {
        let file: FileConfig = toml::from_str("[worker]\ndelivery_limit = 3\n").unwrap();
        let c = Connections::resolve(None, None, None, &file).unwrap();
        assert_eq!(c.delivery_limit, 3);
        let file: FileConfig = toml::from_str("[worker]\ndelivery_limit = 0\n").unwrap();
        let e = Connections::resolve(None, None, None, &file).unwrap_err();
        assert!(e.to_string().contains("delivery_limit"), "{e}");
    }

    #[test]
    fn params_never_show_a_password() {
        let params = serde_json::json!({
            "input": "postgres://app:hunter2@db:5432/payroll",
            "nested": [{"url": "postgresql://u:pw@h/d"}],
            "api_token": "abc",
            "client_id": "acme",
        });
        let shown = redact_params(&params).to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://app:***@db:5432/payroll"),
            "{shown}"
        );
        assert!(shown.contains("acme"), "{shown}");
    }

    #[test]
    fn secret_files_are_read_trimmed_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-url");
        std::fs::write(&path, "postgres://u:hunter2@h/db\n").unwrap();
        let got = DATABASE_URL_SETTING.resolve(None, Some(&path)).unwrap();
        assert_eq!(got.as_deref(), Some("postgres://u:hunter2@h/db"));
        assert_eq!(
            DATABASE_URL_SETTING
                .resolve(Some("postgres://x/y".into()), None)
                .unwrap()
                .as_deref(),
            Some("postgres://x/y")
        );

        let e = DATABASE_URL_SETTING
            .resolve(Some("postgres://x/y".into()), Some(&path))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DATABASE_URL_FILE") && e.contains("set only one"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");

        let missing = dir.path().join("absent");
        let e = AMQP_URL_SETTING
            .resolve(None, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("DROVER_AMQP_URL_FILE"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");

        std::fs::write(&path, "\n").unwrap();
        let e = AMQP_URL_SETTING.resolve(None, Some(&path)).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::write(&path, "amqp://a\namqp://b\n").unwrap();
        let e = AMQP_URL_SETTING.resolve(None, Some(&path)).unwrap_err();
        assert!(e.to_string().contains("more than one line"), "{e}");
    }

    #[test]
    fn several_broker_addresses() {
        let list = "amqp://u:hunter2@r1:5731/%2f, amqp://u:hunter2@r2:5732/%2f";
        let c =
            Connections::resolve(Some(list.into()), None, None, &FileConfig::default()).unwrap();
        let urls: Vec<String> = c
            .amqp_urls()
            .iter()
            .map(|u| u.expose_secret().to_string())
            .collect();
        assert_eq!(
            urls,
            [
                "amqp://u:hunter2@r1:5731/%2f",
                "amqp://u:hunter2@r2:5732/%2f"
            ]
        );
        assert_eq!(
            c.amqp_shown(),
            "amqp://u:***@r1:5731/%2f,amqp://u:***@r2:5732/%2f"
        );
        let f = FileConfig::default();
        let e = Connections::resolve(Some("amqp://r1,,amqp://r3".into()), None, None, &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("address 2 of 3 is empty"), "{e}");
        let e = Connections::resolve(Some("amqp://r1,http://u:pw@r2".into()), None, None, &f)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("address 2 of 2") && e.contains("DROVER_AMQP_URL"),
            "{e}"
        );
        assert!(!e.contains(":pw@"), "{e}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(
            redact("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
    }
}
