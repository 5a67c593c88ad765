//! `drover verify`'s checks of one job's output against its ledger record: every part
//! re-hashed against the manifest and the ledger, and the row counts reconciled (input rows
//! = sum of batch rows = `rows_done`; rows per part as recorded).

use crate::BatchOutcome;
use crate::sink::{MANIFEST, Manifest, part_name};
use polars::prelude::{ParquetReader, SerReader};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::path::Path;

/// What the ledger holds about a job, for [`verify_job`].
#[derive(Debug, Clone)]
pub struct LedgerSide {
    /// `rows_done`.
    pub rows_done: u64,
    /// `batches_total`, when known.
    pub batches_total: Option<u32>,
    /// Every checkpointed batch.
    pub batches: Vec<BatchOutcome>,
}

/// One disagreement: the batch it concerns (`None` for the job as a whole) and what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The batch, when the disagreement is about one.
    pub batch: Option<u32>,
    /// What disagrees, with both values.
    pub what: String,
}

/// The outcome of verifying one job.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Batches checked.
    pub batches: u32,
    /// Parts re-hashed.
    pub parts: u32,
    /// Input rows accounted for.
    pub rows: u64,
    /// Every disagreement found, in batch order (job-wide ones first).
    pub mismatches: Vec<Mismatch>,
}

impl Verification {
    /// Whether everything agreed.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }

    /// The first batch that disagrees, if any batch does.
    pub fn first_bad_batch(&self) -> Option<u32> {
        self.mismatches.iter().filter_map(|m| m.batch).min()
    }

    fn job(&mut self, what: String) {
        self.mismatches.push(Mismatch { batch: None, what });
    }

    fn batch(&mut self, batch: u32, what: String) {
        self.mismatches.push(Mismatch {
            batch: Some(batch),
            what,
        });
    }
}

/// SHA-256 (hex) and size of a file's bytes.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let n = io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), n))
}

/// Verifies a job's ledger record and, when `dir` is given (a pipeline with output), its
/// output directory: the manifest must be there, every part must hash to what both the
/// manifest and the ledger recorded and hold the rows recorded, and the counts must agree.
pub fn verify_job(ledger: &LedgerSide, dir: Option<&Path>) -> Verification {
    let mut v = Verification::default();
    let mut batches = ledger.batches.clone();
    batches.sort_by_key(|b| b.index);
    v.batches = batches.len() as u32;
    let sum: u64 = batches.iter().map(|b| b.rows).sum();
    v.rows = sum;
    if sum != ledger.rows_done {
        v.job(format!(
            "the ledger's batches hold {sum} input rows but its rows_done is {}",
            ledger.rows_done
        ));
    }
    if let Some(t) = ledger.batches_total
        && t as usize != batches.len()
    {
        v.job(format!(
            "the input has {t} batches but the ledger checkpointed {}",
            batches.len()
        ));
    }
    // Batches are contiguous: 0..n, each starting where the one before ended.
    let mut next_row = 0u64;
    for (i, b) in batches.iter().enumerate() {
        if b.index as usize != i {
            v.batch(i as u32, format!("batch {i} is missing from the ledger"));
            break;
        }
        // `attempt` 0: a batch checkpointed by a release that recorded no lineage.
        if b.first_row != next_row && b.attempt > 0 {
            v.batch(
                b.index,
                format!(
                    "batch {} starts at input row {} in the ledger, expected {next_row} \
                     (after the batches before it)",
                    b.index, b.first_row
                ),
            );
        }
        next_row = b.first_row.max(next_row) + b.rows;
    }
    let Some(dir) = dir else {
        return v;
    };
    let manifest_path = dir.join(MANIFEST);
    let manifest: Manifest = match std::fs::read(&manifest_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            v.job(format!(
                "{}: cannot be read ({e}); the output is not complete",
                manifest_path.display()
            ));
            return v;
        }
    };
    if manifest.rows != ledger.rows_done {
        v.job(format!(
            "the manifest counts {} input rows, the ledger's rows_done is {}",
            manifest.rows, ledger.rows_done
        ));
    }
    if manifest.batches as usize != batches.len() {
        v.job(format!(
            "the manifest counts {} batches, the ledger checkpointed {}",
            manifest.batches,
            batches.len()
        ));
    }
    let listed: u64 = manifest.parts.iter().map(|p| p.rows).sum();
    if manifest.parts.len() == batches.len() && listed != manifest.rows {
        v.job(format!(
            "the manifest's parts hold {listed} input rows, its total says {}",
            manifest.rows
        ));
    }
    for b in &batches {
        let part = manifest.parts.iter().find(|p| p.index == b.index);
        let Some(part) = part else {
            if b.output.is_some() {
                v.batch(
                    b.index,
                    format!(
                        "batch {}: the ledger records a part, the manifest lists none",
                        b.index
                    ),
                );
            }
            continue;
        };
        let name = part_name(b.index);
        if part.file != name {
            v.batch(
                b.index,
                format!(
                    "batch {}: the manifest names file {}, expected {name}",
                    b.index, part.file
                ),
            );
            continue;
        }
        if part.rows != b.rows {
            v.batch(
                b.index,
                format!(
                    "batch {}: the manifest records {} input rows, the ledger {}",
                    b.index, part.rows, b.rows
                ),
            );
        }
        if part.sha256 != b.checksum {
            v.batch(
                b.index,
                format!(
                    "batch {}: the manifest records sha256 {}, the ledger {}",
                    b.index,
                    part.sha256.as_deref().unwrap_or("none"),
                    b.checksum.as_deref().unwrap_or("none")
                ),
            );
        }
        let path = dir.join(&part.file);
        v.parts += 1;
        match hash_file(&path) {
            Err(e) => v.batch(
                b.index,
                format!("batch {}: {}: {e}", b.index, path.display()),
            ),
            Ok((sum, bytes)) => {
                if Some(&sum) != part.sha256.as_ref() {
                    v.batch(
                        b.index,
                        format!(
                            "batch {}: {} hashes to sha256 {sum} ({bytes} bytes), the manifest \
                             records {}{}",
                            b.index,
                            path.display(),
                            part.sha256.as_deref().unwrap_or("none"),
                            part.bytes
                                .map(|n| format!(" ({n} bytes)"))
                                .unwrap_or_default()
                        ),
                    );
                    continue;
                }
                if let Some(expected) = part.rows_out.or(b.rows_out) {
                    match part_rows(&path) {
                        Ok(n) if n == expected => {}
                        Ok(n) => v.batch(
                            b.index,
                            format!(
                                "batch {}: {} holds {n} rows, {expected} recorded",
                                b.index,
                                path.display()
                            ),
                        ),
                        Err(e) => v.batch(
                            b.index,
                            format!("batch {}: {}: {e}", b.index, path.display()),
                        ),
                    }
                }
            }
        }
    }
    for p in &manifest.parts {
        if !batches.iter().any(|b| b.index == p.index) {
            v.batch(
                p.index,
                format!(
                    "batch {}: listed in the manifest, not in the ledger",
                    p.index
                ),
            );
        }
    }
    v.mismatches.sort_by_key(|m| m.batch.map_or(-1, i64::from));
    v
}

/// Rows in a Parquet part, from its footer.
fn part_rows(path: &Path) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut reader = <ParquetReader<File> as SerReader<File>>::new(file);
    let meta = reader.get_metadata().map_err(|e| e.to_string())?;
    Ok(meta.num_rows as u64)
}
