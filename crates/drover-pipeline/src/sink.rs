//! The Parquet sink: part files and the manifest, each written to a hidden temporary name in
//! the job's directory, fsynced and renamed into place, so a replayed batch replaces its own
//! part atomically and a reader never sees a half-written file.

use crate::lineage::Fingerprint;
use crate::{BatchOutcome, PipelineError};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory name for an idempotency key: the key itself when it only uses
/// `[A-Za-z0-9._-]` (and is not hidden or a dot name), otherwise the key with every other
/// byte mapped to `_` plus `-` and 8 hex digits of its SHA-256, so two keys never share a
/// directory (`acme:2026-11` and `acme_2026-11` differ). Long keys are cut to stay well below
/// file-name limits, with the hash suffix keeping them apart.
pub fn key_path(key: &str) -> String {
    const MAX: usize = 120;
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let clean =
        !key.is_empty() && !key.starts_with('.') && key.len() <= MAX && key.chars().all(safe);
    if clean {
        return key.to_string();
    }
    let mut mapped: String = key
        .chars()
        .map(|c| if safe(c) { c } else { '_' })
        .take(MAX)
        .collect();
    if mapped.starts_with('.') {
        mapped.replace_range(0..1, "_");
    }
    let digest = Sha256::digest(key.as_bytes());
    format!("{mapped}-{}", &hex::encode(digest)[..8])
}

/// File name of batch `index`'s part.
pub(crate) fn part_name(index: u32) -> String {
    format!("part-{index:05}.parquet")
}

/// Name of the manifest `finish` writes next to the parts.
pub const MANIFEST: &str = "_manifest.json";

/// Output-side I/O failures are worth retrying (a full disk, a remount), whatever their
/// kind: the output location is the operator's, not the job's input.
fn out_io(what: &Path, e: io::Error) -> PipelineError {
    PipelineError::transient(format!("output {}: {e}", what.display()))
}

/// A writer that hashes everything it forwards, so a part's checksum costs no second read.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Option<Sha256>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A hidden temporary name next to `target`, unique per process and call, so two writers
/// racing on the same part (a lease takeover of a slow owner) never interleave bytes.
pub(crate) fn temp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.{}-{seq}.tmp", std::process::id()))
}

/// Writes `target` atomically: `write` fills a hidden temporary file in the same directory,
/// which is fsynced and renamed over `target`, then the directory is fsynced. Returns the
/// SHA-256 (hex) of the bytes written. The temporary file is removed on failure.
pub(crate) fn write_atomic<F>(target: &Path, write: F) -> Result<String, PipelineError>
where
    F: FnOnce(&mut dyn Write) -> Result<(), PipelineError>,
{
    write_atomic_impl(target, true, write)
}

/// [`write_atomic`] without the checksum (large generated inputs nobody needs a hash of).
pub(crate) fn write_atomic_unhashed<F>(target: &Path, write: F) -> Result<(), PipelineError>
where
    F: FnOnce(&mut dyn Write) -> Result<(), PipelineError>,
{
    write_atomic_impl(target, false, write).map(|_| ())
}

fn write_atomic_impl<F>(target: &Path, hash: bool, write: F) -> Result<String, PipelineError>
where
    F: FnOnce(&mut dyn Write) -> Result<(), PipelineError>,
{
    let tmp = temp_name(target);
    let result = (|| {
        let file = File::create_new(&tmp).map_err(|e| out_io(&tmp, e))?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: hash.then(Sha256::new),
        };
        write(&mut w)?;
        w.flush().map_err(|e| out_io(&tmp, e))?;
        let file = w
            .inner
            .into_inner()
            .map_err(|e| out_io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| out_io(&tmp, e))?;
        fs::rename(&tmp, target).map_err(|e| out_io(target, e))?;
        if let Some(dir) = target.parent() {
            sync_dir(dir).map_err(|e| out_io(dir, e))?;
        }
        Ok(w.hasher
            .map(|h| hex::encode(h.finalize()))
            .unwrap_or_default())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename durable (POSIX: fsync the directory). A no-op where directories cannot be
/// opened as files.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let d = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(d)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Polars errors while writing output: I/O is transient (see [`out_io`]), anything else
/// (an unsupported dtype) permanent.
pub(crate) fn write_err(what: &Path, e: PolarsError) -> PipelineError {
    let kind = match &e {
        PolarsError::IO { .. } => drover_core::ErrorKind::Transient,
        _ => crate::error::polars_kind(&e),
    };
    PipelineError {
        kind,
        message: format!("output {}: {e}", what.display()),
    }
}

/// Compression of part files: Snappy, the codec every Parquet reader supports, at a fraction
/// of zstd's CPU; at one small part per batch, encoding is most of the writer's time.
const PART_COMPRESSION: ParquetCompression = ParquetCompression::Snappy;

/// Most rows in one row group of a part (polars' own default): a part from a huge batch is
/// still readable a row group at a time.
const PART_ROW_GROUP_ROWS: usize = 512 * 512;

/// Writes one batch's output as `dir/part-NNNNN.parquet`; returns its path and checksum.
pub(crate) fn write_part(
    dir: &Path,
    index: u32,
    df: &mut DataFrame,
) -> Result<(PathBuf, String), PipelineError> {
    let path = dir.join(part_name(index));
    // One chunk per column, so each slice `write_parquet` takes is exactly one row group.
    df.rechunk_mut();
    let sum = write_atomic(&path, |w| {
        write_parquet(w, df).map_err(|e| write_err(&path, e))
    })?;
    Ok((path, sum))
}

/// Writes single-chunk `df` as Parquet, one row group per `PART_ROW_GROUP_ROWS` rows.
/// Through the batched writer, not `ParquetWriter::finish`: `finish` regroups the chunks
/// itself, and that path initialises polars' shared 8 MiB zero buffer (an empty column per
/// chunk), a fixed cost in every worker's peak memory.
fn write_parquet(w: &mut dyn Write, df: &DataFrame) -> PolarsResult<()> {
    let mut writer = ParquetWriter::new(w)
        .with_compression(PART_COMPRESSION)
        // One thread per part: parts are already written beside each other and the next
        // batch's compute, and fanning columns out to the polars pool only adds wake-ups.
        .set_parallel(false)
        .batched(df.schema())?;
    for offset in (0..df.height()).step_by(PART_ROW_GROUP_ROWS) {
        writer.write_batch(&df.slice(offset as i64, PART_ROW_GROUP_ROWS))?;
    }
    writer.finish()?;
    Ok(())
}

/// One entry of `_manifest.json`'s `parts`: a batch's part and its lineage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestPart {
    /// The batch's index.
    pub index: u32,
    /// The part's file name, in the manifest's directory.
    pub file: String,
    /// First input row the batch read (it read `first_row..first_row + rows`).
    #[serde(default)]
    pub first_row: u64,
    /// Input rows in the batch.
    pub rows: u64,
    /// Rows in the part (`None` when not recorded).
    #[serde(default)]
    pub rows_out: Option<u64>,
    /// SHA-256 (hex) of the part's bytes.
    pub sha256: Option<String>,
    /// The part's size in bytes.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The attempt that wrote the part.
    #[serde(default)]
    pub attempt: Option<u32>,
}

/// `_manifest.json`: what a downstream reader needs to trust the output directory, and the
/// job's lineage (inputs with fingerprints, pipeline and version, params, result).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The job's idempotency key.
    pub key: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's version (see [`crate::Pipeline::version`]).
    #[serde(default)]
    pub pipeline_version: Option<String>,
    /// The job's params, passwords removed.
    #[serde(default)]
    pub params: serde_json::Value,
    /// The inputs' fingerprints, as the job's first attempt recorded them.
    #[serde(default)]
    pub inputs: Vec<Fingerprint>,
    /// Input rows: the sum of every batch's rows.
    pub rows: u64,
    /// Batches in the job.
    pub batches: u32,
    /// Every part, in batch order.
    pub parts: Vec<ManifestPart>,
    /// The job's result.
    pub summary: serde_json::Value,
}

/// The job-level fields of the manifest.
pub(crate) struct ManifestJob<'a> {
    pub key: &'a str,
    pub pipeline: &'a str,
    pub pipeline_version: &'a str,
    pub inputs: &'a [Fingerprint],
    pub params: serde_json::Value,
}

/// Checks that every part a batch recorded is present, writes `_manifest.json` atomically,
/// and removes leftovers of earlier attempts (hidden temporary files, and parts numbered
/// beyond the job's batch count) so the directory holds exactly what the manifest lists.
pub(crate) fn write_manifest(
    dir: &Path,
    job: &ManifestJob<'_>,
    batches: &[BatchOutcome],
    summary: &serde_json::Value,
) -> Result<PathBuf, PipelineError> {
    let mut parts = Vec::new();
    for b in batches {
        let Some(output) = &b.output else { continue };
        let name = part_name(b.index);
        let path = dir.join(&name);
        let meta = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => {
                return Err(PipelineError::permanent(format!(
                    "output {}: part of batch {} is missing (recorded as {output})",
                    path.display(),
                    b.index
                )));
            }
        };
        parts.push(ManifestPart {
            index: b.index,
            file: name,
            first_row: b.first_row,
            rows: b.rows,
            rows_out: b.rows_out,
            sha256: b.checksum.clone(),
            bytes: Some(meta.len()),
            attempt: (b.attempt > 0).then_some(b.attempt),
        });
    }
    let manifest = Manifest {
        key: job.key.to_string(),
        pipeline: job.pipeline.to_string(),
        pipeline_version: Some(job.pipeline_version.to_string()),
        params: job.params.clone(),
        inputs: job.inputs.to_vec(),
        rows: batches.iter().map(|b| b.rows).sum(),
        batches: batches.len() as u32,
        parts,
        summary: summary.clone(),
    };
    let path = dir.join(MANIFEST);
    write_atomic(&path, |w| {
        serde_json::to_writer_pretty(&mut *w, &manifest)
            .map_err(|e| PipelineError::transient(format!("writing manifest: {e}")))?;
        w.write_all(b"\n")
            .map_err(|e| PipelineError::transient(format!("writing manifest: {e}")))
    })?;
    clean_leftovers(dir, batches.len() as u32);
    Ok(path)
}

/// Best effort: a leftover we cannot delete does not fail a finished job.
fn clean_leftovers(dir: &Path, batches: u32) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Hidden temporaries of `temp_name`: parts, the manifest, `sql`'s combined file.
        let stale_temp = name.starts_with('.') && name.ends_with(".tmp");
        let stale_part = name
            .strip_prefix("part-")
            .and_then(|s| s.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= batches);
        if stale_temp || stale_part {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_are_safe_and_distinct() {
        assert_eq!(key_path("acme-2026.11_x"), "acme-2026.11_x");
        let a = key_path("acme:2026-11");
        let b = key_path("acme_2026-11");
        assert!(a.starts_with("acme_2026-11-") && a.len() == "acme_2026-11-".len() + 8);
        assert_ne!(a, b);
        for k in ["", ".", "..", ".hidden", "a/../../b", "é"] {
            let p = key_path(k);
            assert!(
                !p.starts_with('.') && !p.contains('/') && !p.is_empty(),
                "{k:?} -> {p:?}"
            );
        }
        assert!(key_path(&"k".repeat(300)).len() < 140);
    }

    #[test]
    fn atomic_write_replaces_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.bin");
        let sum = write_atomic(&target, |w| Ok(w.write_all(b"abc")?)).unwrap();
        assert_eq!(
            sum,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        write_atomic(&target, |w| Ok(w.write_all(b"second")?)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"second");
        let e = write_atomic(&target, |_| Err(PipelineError::transient("boom"))).unwrap_err();
        assert_eq!(e.message, "boom");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "temporary files are cleaned up");
    }

    /// A part holds every row once, in order, whatever chunks the batch arrived in, in row
    /// groups of at most `PART_ROW_GROUP_ROWS` (and none for an empty batch).
    #[test]
    fn parts_hold_every_row_in_bounded_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 2 * PART_ROW_GROUP_ROWS + 3;
        let piece = |from: usize, to: usize| {
            let ids: Vec<i64> = (from as i64..to as i64).collect();
            let names: Vec<String> = ids.iter().map(|i| format!("e{i}")).collect();
            df!("id" => ids, "name" => names).unwrap()
        };
        // Three chunks of uneven length, as a batch straddling decode windows arrives.
        let mut df = piece(0, 10);
        df.vstack_mut(&piece(10, PART_ROW_GROUP_ROWS + 1)).unwrap();
        df.vstack_mut(&piece(PART_ROW_GROUP_ROWS + 1, rows))
            .unwrap();
        assert_eq!(df.first_col_n_chunks(), 3);
        let expected = df.clone();
        let (path, sum) = write_part(dir.path(), 7, &mut df).unwrap();
        assert_eq!(path, dir.path().join("part-00007.parquet"));
        assert_eq!(sum.len(), 64);

        let mut file = File::open(&path).unwrap();
        let mut reader = ParquetReader::new(&mut file);
        let groups: Vec<usize> = reader
            .get_metadata()
            .unwrap()
            .row_groups
            .iter()
            .map(|rg| rg.num_rows())
            .collect();
        assert_eq!(groups, [PART_ROW_GROUP_ROWS, PART_ROW_GROUP_ROWS, 3]);
        let back = reader.finish().unwrap();
        assert!(back.equals(&expected), "rows differ after the round trip");

        let mut empty = piece(0, 0);
        let (path, _) = write_part(dir.path(), 8, &mut empty).unwrap();
        let back = ParquetReader::new(File::open(&path).unwrap())
            .finish()
            .unwrap();
        assert_eq!((back.height(), back.width()), (0, 2));
    }
}
