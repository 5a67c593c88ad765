//! `[limits.PIPELINE]` tables and `drover worker --limit PIPELINE=N`, checked and resolved
//! into the worker's concurrency limits.

use anyhow::{anyhow, bail};
use drover_core::config::LimitsFileConfig;
use drover_ledger::Limits;
use drover_pipeline::Registry;
use std::collections::BTreeMap;

/// The limits by pipeline: the file's tables, each `--limit` flag over its `per_worker`.
/// Refuses an unknown pipeline, a limit of 0, and a group limit without its param (or the
/// other way round), naming the setting and the value.
pub fn resolve(
    file: &BTreeMap<String, LimitsFileConfig>,
    flags: &[String],
    registry: &Registry,
) -> anyhow::Result<BTreeMap<String, Limits>> {
    let mut out = BTreeMap::new();
    for (pipeline, t) in file {
        let at = format!("[limits.{pipeline}]");
        known(registry, pipeline, &at)?;
        for (name, v) in [
            ("per_worker", t.per_worker),
            ("total", t.total),
            ("per_group", t.per_group),
        ] {
            if v == Some(0) {
                bail!("{at} {name}: must be at least 1, got 0");
            }
        }
        let per_group = match (&t.group_by, t.per_group) {
            (Some(p), Some(n)) if !p.is_empty() => Some((p.clone(), n)),
            (Some(p), Some(_)) => bail!("{at} group_by: {p:?} is not a param name"),
            (Some(p), None) => bail!("{at} group_by = {p:?} needs per_group (e.g. per_group = 1)"),
            (None, Some(n)) => {
                bail!("{at} per_group = {n} needs group_by, the param whose values are the groups")
            }
            (None, None) => None,
        };
        out.insert(
            pipeline.clone(),
            Limits {
                per_worker: t.per_worker,
                total: t.total,
                per_group,
            },
        );
    }
    for flag in flags {
        let (pipeline, n) = flag
            .split_once('=')
            .ok_or_else(|| anyhow!("--limit {flag:?}: expected PIPELINE=N, e.g. payroll=2"))?;
        let n: u32 =
            n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                anyhow!("--limit {flag:?}: N must be a whole number of at least 1")
            })?;
        known(registry, pipeline, &format!("--limit {flag:?}"))?;
        out.entry(pipeline.to_string())
            .or_insert_with(Limits::default)
            .per_worker = Some(n);
    }
    Ok(out)
}

pub(crate) fn known(registry: &Registry, pipeline: &str, at: &str) -> anyhow::Result<()> {
    if registry.names().contains(&pipeline) {
        Ok(())
    } else {
        bail!(
            "{at}: unknown pipeline {pipeline:?} (this binary runs: {})",
            registry.names().join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        drover_pipeline::Registry::builtin()
    }

    #[test]
    fn file_tables_and_flags() {
        let mut file = BTreeMap::new();
        file.insert(
            "noop".to_string(),
            LimitsFileConfig {
                total: Some(4),
                group_by: Some("client_id".into()),
                per_group: Some(1),
                ..Default::default()
            },
        );
        let l = resolve(&file, &["noop=2".into()], &registry()).expect("limits");
        assert_eq!(
            l["noop"],
            Limits {
                per_worker: Some(2),
                total: Some(4),
                per_group: Some(("client_id".into(), 1)),
            }
        );
        let e = resolve(&BTreeMap::new(), &["nope=1".into()], &registry()).expect_err("unknown");
        assert!(e.to_string().contains("unknown pipeline \"nope\""), "{e}");
        let e = resolve(&BTreeMap::new(), &["noop=0".into()], &registry()).expect_err("zero");
        assert!(e.to_string().contains("--limit \"noop=0\""), "{e}");
        file.get_mut("noop").expect("noop").per_group = None;
        let e = resolve(&file, &[], &registry()).expect_err("group_by alone");
        assert!(e.to_string().contains("needs per_group"), "{e}");
    }
}
