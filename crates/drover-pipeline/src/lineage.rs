//! A job's identity for lineage: the pipeline's declared version and a fingerprint of each
//! input, taken when the job is opened. The worker records the first attempt's identity in
//! the ledger and compares a resuming attempt's with it before any batch runs, so two inputs
//! (or two versions of a formula) are never mixed into one output.
//!
//! What a fingerprint covers, per input kind (docs/output.md says the same to users):
//!
//! * **CSV file**: size, modification time and the SHA-256 of the whole content. Size and
//!   content decide; a new modification time over the same bytes is not a change.
//! * **Parquet file**: size, modification time and the SHA-256 of the footer (the file
//!   metadata: schema, row groups with their byte offsets, sizes and column statistics). The
//!   footer is a few KiB however large the file, and any rewrite of the data changes it in
//!   practice; since it is not the whole content, the modification time decides too.
//! * **Postgres table**: the table, the filters and the number of selected rows at open.
//!   Rows changed in place are not detected (that would take reading the whole selection);
//!   use an immutable table or a snapshot for jobs that must be resumable exactly.
//! * **synthetic**: the batch count.

use crate::PipelineError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// What a file fingerprint's hash covers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashScope {
    /// Every byte of the file.
    Content,
    /// The Parquet footer (file metadata) and its length field.
    ParquetFooter,
}

/// One input's identity, as recorded in the ledger (`drover.jobs.inputs`) and the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fingerprint {
    /// A `.csv` or `.parquet` file.
    File {
        /// The path as the params give it.
        path: String,
        /// Bytes.
        size: u64,
        /// Last modification, RFC 3339 (`None` where the filesystem keeps none).
        mtime: Option<String>,
        /// SHA-256 (hex) of what `scope` says.
        sha256: String,
        /// What the hash covers.
        scope: HashScope,
    },
    /// A Postgres table (see the module docs for what this does not cover).
    Postgres {
        /// Table and filters, with the URL's password removed.
        source: String,
        /// Rows selected when the job was opened.
        rows: u64,
    },
    /// Generated rows (no external input).
    Synthetic {
        /// Batches generated.
        batches: u32,
    },
}

impl Fingerprint {
    /// What names the input in messages.
    pub fn label(&self) -> String {
        match self {
            Fingerprint::File { path, .. } => path.clone(),
            Fingerprint::Postgres { source, .. } => source.clone(),
            Fingerprint::Synthetic { .. } => "synthetic input".to_string(),
        }
    }

    /// Whether `self` and `other` identify the same data (see the module docs: the hash and
    /// size for CSV, plus the modification time for Parquet's footer-only hash).
    pub fn same_as(&self, other: &Fingerprint) -> bool {
        match (self, other) {
            (
                Fingerprint::File {
                    size: s1,
                    mtime: m1,
                    sha256: h1,
                    scope: c1,
                    ..
                },
                Fingerprint::File {
                    size: s2,
                    mtime: m2,
                    sha256: h2,
                    scope: c2,
                    ..
                },
            ) => s1 == s2 && h1 == h2 && c1 == c2 && (*c1 == HashScope::Content || m1 == m2),
            (
                Fingerprint::Postgres {
                    source: a,
                    rows: r1,
                },
                Fingerprint::Postgres {
                    source: b,
                    rows: r2,
                },
            ) => a == b && r1 == r2,
            (Fingerprint::Synthetic { batches: a }, Fingerprint::Synthetic { batches: b }) => {
                a == b
            }
            _ => false,
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fingerprint::File {
                size,
                mtime,
                sha256,
                scope,
                ..
            } => {
                let what = match scope {
                    HashScope::Content => "sha256",
                    HashScope::ParquetFooter => "footer sha256",
                };
                write!(
                    f,
                    "size {size} B, mtime {}, {what} {sha256}",
                    mtime.as_deref().unwrap_or("unknown")
                )
            }
            Fingerprint::Postgres { rows, .. } => write!(f, "{rows} rows selected"),
            Fingerprint::Synthetic { batches } => write!(f, "{batches} batches"),
        }
    }
}

/// A job's identity: the pipeline's version and its inputs' fingerprints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobIdentity {
    /// [`Pipeline::version`](crate::Pipeline::version) for the job's params.
    pub pipeline_version: String,
    /// One fingerprint per input, in a fixed order.
    pub inputs: Vec<Fingerprint>,
}

/// What the ledger recorded for a job at its first attempt (either part may be missing for
/// jobs started by a release that recorded none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordedIdentity {
    /// The recorded pipeline version.
    pub pipeline_version: Option<String>,
    /// The recorded `inputs` JSON (a list of [`Fingerprint`]).
    pub inputs: Option<serde_json::Value>,
}

impl JobIdentity {
    /// Refuses to resume job `key` (with `batches_done` batches checkpointed) when its
    /// pipeline version or an input differs from what its first attempt recorded: a
    /// permanent error naming the input (or version), both fingerprints and the way out.
    pub fn check_resume(
        &self,
        key: &str,
        batches_done: u32,
        recorded: &RecordedIdentity,
    ) -> Result<(), PipelineError> {
        let way_out = format!(
            "the job's {batches_done} checkpointed batches came from the first; to start over \
             run `drover jobs retry {key} --from-scratch` (discards its checkpoints and output \
             parts), or publish the job under a new key"
        );
        if let Some(v) = &recorded.pipeline_version
            && *v != self.pipeline_version
        {
            return Err(PipelineError::permanent(format!(
                "integrity: pipeline version changed since the job's first attempt: recorded \
                 \"{v}\", this worker runs \"{}\"; resuming would mix two versions in one \
                 output; {way_out}",
                self.pipeline_version
            )));
        }
        let Some(inputs) = &recorded.inputs else {
            return Ok(());
        };
        let before: Vec<Fingerprint> = serde_json::from_value(inputs.clone()).map_err(|e| {
            PipelineError::permanent(format!(
                "integrity: the input fingerprints recorded for the job cannot be read \
                     ({e}), so resuming cannot be proven safe; {way_out}"
            ))
        })?;
        if before.len() != self.inputs.len() {
            return Err(PipelineError::permanent(format!(
                "integrity: the job had {} inputs at its first attempt and has {} now; {way_out}",
                before.len(),
                self.inputs.len()
            )));
        }
        for (old, new) in before.iter().zip(&self.inputs) {
            if !old.same_as(new) {
                return Err(PipelineError::permanent(format!(
                    "integrity: input {} changed since the job's first attempt: recorded \
                     [{old}], now [{new}]; resuming would mix two inputs in one output; \
                     {way_out}",
                    new.label()
                )));
            }
        }
        Ok(())
    }
}

/// Bytes read at a time while hashing a whole file.
const HASH_CHUNK: usize = 1 << 20;

/// Fingerprints an open input file: the whole content for CSV, the footer for Parquet.
/// Reads with positioned reads (`pread`), so the handle's offset is untouched and a source
/// opened on the same handle (the same inode: a file replaced meanwhile cannot slip in) can
/// read it at the same time, as the CSV source's record scan does while this runs on a
/// thread of its own.
pub(crate) fn file_fingerprint(
    file: &File,
    parquet: bool,
    label: &str,
) -> Result<Fingerprint, PipelineError> {
    let io_err = |e: io::Error| PipelineError::from(e).context(format!("input {label}"));
    let meta = file.metadata().map_err(io_err)?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339());
    let mut hasher = Sha256::new();
    let scope = if parquet {
        // The last 8 bytes are the footer's length (u32 LE) and "PAR1"; the footer precedes
        // them.
        if size < 12 {
            return Err(PipelineError::permanent(format!(
                "input {label}: {size} bytes is too short for a Parquet file"
            )));
        }
        let mut tail = [0u8; 8];
        file.read_exact_at(&mut tail, size - 8).map_err(io_err)?;
        let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        if &tail[4..] != b"PAR1" || len + 8 > size {
            return Err(PipelineError::permanent(format!(
                "input {label}: not a Parquet file (no valid footer)"
            )));
        }
        let mut footer = vec![0u8; len as usize];
        file.read_exact_at(&mut footer, size - 8 - len)
            .map_err(io_err)?;
        hasher.update(&footer);
        hasher.update(tail);
        HashScope::ParquetFooter
    } else {
        let mut buf = vec![0u8; HASH_CHUNK];
        let mut at = 0u64;
        loop {
            let n = file.read_at(&mut buf, at).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        if at != size {
            return Err(PipelineError::transient(format!(
                "input {label}: the file changed size while it was fingerprinted ({size} then {at} bytes)"
            )));
        }
        HashScope::Content
    };
    Ok(Fingerprint::File {
        path: label.to_string(),
        size,
        mtime,
        sha256: hex::encode(hasher.finalize()),
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, mtime: &str, sha: &str, scope: HashScope) -> Fingerprint {
        Fingerprint::File {
            path: "in.parquet".into(),
            size,
            mtime: Some(mtime.into()),
            sha256: sha.into(),
            scope,
        }
    }

    #[test]
    fn csv_identity_is_content_parquet_adds_mtime() {
        let a = file(10, "t1", "aa", HashScope::Content);
        assert!(a.same_as(&file(10, "t2", "aa", HashScope::Content)));
        assert!(!a.same_as(&file(10, "t1", "bb", HashScope::Content)));
        assert!(!a.same_as(&file(11, "t1", "aa", HashScope::Content)));
        let p = file(10, "t1", "aa", HashScope::ParquetFooter);
        assert!(p.same_as(&p.clone()));
        assert!(!p.same_as(&file(10, "t2", "aa", HashScope::ParquetFooter)));
    }

    #[test]
    fn a_changed_input_names_both_fingerprints_and_the_way_out() {
        let now = JobIdentity {
            pipeline_version: "1".into(),
            inputs: vec![file(10, "t2", "bb", HashScope::Content)],
        };
        let recorded = RecordedIdentity {
            pipeline_version: Some("1".into()),
            inputs: Some(
                serde_json::to_value(vec![file(10, "t1", "aa", HashScope::Content)]).unwrap(),
            ),
        };
        let e = now.check_resume("k-1", 3, &recorded).unwrap_err();
        assert_eq!(e.kind, drover_core::ErrorKind::Permanent);
        for part in [
            "input in.parquet",
            "sha256 aa",
            "sha256 bb",
            "--from-scratch",
            "k-1",
        ] {
            assert!(e.message.contains(part), "{part} not in {}", e.message);
        }
        let bumped = RecordedIdentity {
            pipeline_version: Some("0".into()),
            inputs: None,
        };
        let e = now.check_resume("k-1", 3, &bumped).unwrap_err();
        assert!(
            e.message.contains("recorded \"0\", this worker runs \"1\""),
            "{}",
            e.message
        );
        assert!(
            now.check_resume("k-1", 3, &RecordedIdentity::default())
                .is_ok()
        );
    }

    #[test]
    fn parquet_fingerprint_hashes_the_footer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.parquet");
        std::fs::write(&path, b"PAR1....footer\x06\x00\x00\x00PAR1").unwrap();
        let f = file_fingerprint(&File::open(&path).unwrap(), true, "x").unwrap();
        let Fingerprint::File { size, scope, .. } = &f else {
            panic!("{f:?}")
        };
        assert_eq!((*size, *scope), (22, HashScope::ParquetFooter));
        std::fs::write(&path, b"not parquet").unwrap();
        assert!(file_fingerprint(&File::open(&path).unwrap(), true, "x").is_err());
    }
}
