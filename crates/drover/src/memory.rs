//! `drover worker --memory-limit SIZE` and `--memory-per-row PIPELINE=SIZE` (and their
//! `[worker]` keys), parsed into bytes.

use anyhow::{anyhow, bail};
use bytesize::ByteSize;
use drover_pipeline::Registry;
use std::collections::BTreeMap;

/// A size such as `2GiB`, `512MiB`, `1.5GB`, `64 KiB` or plain bytes (`1048576`): IEC units
/// (KiB, MiB, GiB: powers of 1024) and SI units (KB, MB, GB: powers of 1000). `field` names
/// the setting in the error.
pub fn parse_size(field: &str, value: &str) -> anyhow::Result<u64> {
    let trimmed = value.trim();
    // ByteSize reads "-1" or "1e9" as units it does not know; say what is expected instead.
    match trimmed.parse::<ByteSize>() {
        Ok(b) if !trimmed.is_empty() => Ok(b.as_u64()),
        _ => bail!(
            "{field} {value:?}: not a size; expected a number of bytes with an optional unit, \
             e.g. 2GiB, 512MiB, 1.5GB or 1073741824"
        ),
    }
}

/// `--memory-limit` (over `[worker] memory_limit`): `None` for no limit (absent or 0).
pub fn limit(flag: Option<&str>, file: Option<&str>) -> anyhow::Result<Option<u64>> {
    let (field, value) = match (flag, file) {
        (Some(v), _) => ("--memory-limit", v),
        (None, Some(v)) => ("[worker] memory_limit", v),
        (None, None) => return Ok(None),
    };
    Ok(Some(parse_size(field, value)?).filter(|b| *b > 0))
}

/// `--memory-per-row PIPELINE=SIZE` flags over the `[worker] memory_per_row` table.
pub fn per_row(
    file: &BTreeMap<String, String>,
    flags: &[String],
    registry: &Registry,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (pipeline, size) in file {
        let at = format!("[worker] memory_per_row.{pipeline}");
        crate::limits::known(registry, pipeline, &at)?;
        out.insert(pipeline.clone(), positive(&at, size)?);
    }
    for flag in flags {
        let at = format!("--memory-per-row {flag:?}");
        let (pipeline, size) = flag
            .split_once('=')
            .ok_or_else(|| anyhow!("{at}: expected PIPELINE=SIZE, e.g. exec=4KiB"))?;
        crate::limits::known(registry, pipeline, &at)?;
        out.insert(pipeline.to_string(), positive(&at, size)?);
    }
    Ok(out)
}

fn positive(at: &str, size: &str) -> anyhow::Result<u64> {
    match parse_size(at, size)? {
        0 => bail!("{at}: must be more than 0 bytes"),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_iec_and_si_units_and_plain_bytes() {
        assert_eq!(parse_size("f", "2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("f", "512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("f", "1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("f", "1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("f", "64 KiB").unwrap(), 64 << 10);
        for bad in ["nonsense", "", "-1", "2 parsecs", "1e9"] {
            let e = parse_size("--memory-limit", bad).expect_err(bad);
            assert!(
                e.to_string()
                    .starts_with(&format!("--memory-limit {bad:?}: not a size")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_flag_wins_over_the_file_and_zero_means_none() {
        assert_eq!(limit(Some("1GiB"), Some("2GiB")).unwrap(), Some(1 << 30));
        assert_eq!(limit(None, Some("2GiB")).unwrap(), Some(2 << 30));
        assert_eq!(limit(Some("0"), None).unwrap(), None);
        assert_eq!(limit(None, None).unwrap(), None);
        let e = limit(None, Some("lots")).expect_err("bad file value");
        assert!(
            e.to_string().contains("[worker] memory_limit \"lots\""),
            "{e}"
        );
    }

    #[test]
    fn per_row_by_pipeline() {
        let r = Registry::builtin();
        let file = BTreeMap::from([("exec".to_string(), "8KiB".to_string())]);
        let got = per_row(&file, &["exec=4KiB".into(), "noop=1MiB".into()], &r).unwrap();
        assert_eq!(got["exec"], 4096);
        assert_eq!(got["noop"], 1 << 20);
        let e = per_row(&BTreeMap::new(), &["nope=1KiB".into()], &r).expect_err("unknown");
        assert!(e.to_string().contains("unknown pipeline \"nope\""), "{e}");
        let e = per_row(&BTreeMap::new(), &["noop".into()], &r).expect_err("no =");
        assert!(e.to_string().contains("PIPELINE=SIZE"), "{e}");
        let e = per_row(&BTreeMap::new(), &["noop=0".into()], &r).expect_err("zero");
        assert!(e.to_string().contains("more than 0"), "{e}");
    }
}
