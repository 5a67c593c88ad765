//! Batch sources: what a pipeline reads, delivered `batch_size` rows at a time without ever
//! holding the whole input in memory.
//!
//! * Parquet: the footer is read once. Rows are decoded a window at a time (declared
//!   columns only; a window is [`DECODE_WINDOW_ROWS`] rows, or the batch size if larger,
//!   and never crosses a row group), each row exactly once, and the window is kept while
//!   batches are copied out of it; a batch that straddles a window is the tail of one
//!   followed by the head of the next. Decoding a window decompresses only the Parquet
//!   pages that hold its rows, so a file written as one huge row group (pyarrow's default
//!   is a million rows per group) costs no more memory than one of small groups: memory is
//!   bounded by one window plus a couple of batches, not by the file or its row groups.
//!   Batches skipped on resume never cause a decode: the first read starts at the resume
//!   position.
//! * CSV: one forward pass over a buffered file handle. Each batch's records are cut out of
//!   the stream (quote-aware, so a newline inside a quoted field does not split a record),
//!   prefixed with the header and parsed by polars with every column as a string; declared
//!   columns are then cast, so CSV and Parquet inputs yield the same dtypes.
//! * Postgres: a table read in key order, one keyset page per batch (`pg_source`).
//! * Synthetic: a fixed number of one-row batches, for pipelines without input (`noop`).

use crate::PipelineError;
use crate::lineage::Fingerprint;
use crate::pg_source::{PgInput, PgSource};
use polars::prelude::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};

/// What a pipeline reads: a Parquet or CSV file (chosen by extension) or a number of
/// synthetic batches, plus the columns it needs and their dtypes.
///
/// Declaring columns does three things: only those columns are read (Parquet projection;
/// extra columns in the file are ignored), every batch comes with exactly those dtypes
/// whichever format the file is (CSV values are parsed, narrower integers widened), and a
/// value that does not fit its dtype fails the job permanently with a message naming the
/// column, the value and the row (by [`Input::id_column`] when set). Declared columns that
/// are missing from the file are simply absent from the batch, so the pipeline can report
/// them in its own words. Without declared columns the file's columns come as stored (CSV:
/// all strings).
#[derive(Debug, Clone)]
pub struct Input {
    kind: InputKind,
    columns: Vec<(PlSmallStr, DataType)>,
    id_column: Option<PlSmallStr>,
}

#[derive(Debug, Clone)]
enum InputKind {
    Synthetic { batches: u32 },
    File(PathBuf),
    Postgres(PgInput),
}

impl Input {
    /// `batches` one-row batches with a single column `batch` (the batch index, i64): for
    /// pipelines that do their work without reading a file.
    pub fn synthetic(batches: u32) -> Self {
        Input {
            kind: InputKind::Synthetic { batches },
            columns: Vec::new(),
            id_column: None,
        }
    }

    /// A `.parquet` or `.csv` file (by extension, case-insensitive; CSV with a header row).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Input {
            kind: InputKind::File(path.into()),
            columns: Vec::new(),
            id_column: None,
        }
    }

    /// Rows of a Postgres table selected by `filter_eq`, read in `key` order one page per
    /// batch (keyset pagination). `key` must be an integer column, unique in the selection.
    pub fn postgres(url: &str, table: &str, key: &str) -> Self {
        Input {
            kind: InputKind::Postgres(PgInput {
                url: url.to_string(),
                table: table.to_string(),
                key: key.to_string(),
                filters: Vec::new(),
            }),
            columns: Vec::new(),
            id_column: None,
        }
    }

    /// For a Postgres input: only rows whose `column` (compared as text) equals `value`.
    pub fn filter_eq(mut self, column: &str, value: &str) -> Self {
        if let InputKind::Postgres(pg) = &mut self.kind {
            pg.filters.push((column.to_string(), value.to_string()));
        }
        self
    }

    /// Declares a column to read and the dtype every batch must have for it. Supported
    /// target dtypes: `Int64` (from any integer or from CSV text), `Float64` (from CSV text)
    /// and `String` (from text or any integer).
    pub fn column(mut self, name: &str, dtype: DataType) -> Self {
        self.columns.push((name.into(), dtype));
        self
    }

    /// Names the column that identifies a row in error messages (e.g. `employee_id`); it
    /// must also be declared with [`Input::column`].
    pub fn id_column(mut self, name: &str) -> Self {
        self.id_column = Some(name.into());
        self
    }

    /// The input file, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.kind {
            InputKind::File(p) => Some(p),
            InputKind::Synthetic { .. } | InputKind::Postgres(_) => None,
        }
    }
}

/// Which reader a path needs, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Parquet,
    Csv,
}

/// `.parquet` or `.csv` (case-insensitive), else `None`.
pub(crate) fn format_of(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => Some(Format::Parquet),
        "csv" => Some(Format::Csv),
        _ => None,
    }
}

/// An open input, positioned at the next batch.
pub(crate) struct Source {
    kind: SourceKind,
    columns: Vec<(PlSmallStr, DataType)>,
    id_column: Option<PlSmallStr>,
    batch_size: usize,
    /// Data rows consumed so far (including skipped batches): the next batch's first row.
    position: u64,
    label: String,
    /// The input's identity, taken as it was opened.
    fingerprint: Fingerprint,
}

enum SourceKind {
    Synthetic { next: u32, total: u32 },
    Parquet(ParquetSource),
    Csv(CsvSource),
    Postgres(PgSource),
}

struct ParquetSource {
    file: File,
    metadata: FileMetadataRef,
    total_rows: u64,
    /// Declared columns present in the file; `None` reads all.
    projection: Option<Vec<String>>,
    /// First input row of every row group, then the total: row group `i` holds rows
    /// `rg_starts[i]..rg_starts[i + 1]`.
    rg_starts: Vec<u64>,
    /// Rows per decoded window: `max(batch size, DECODE_WINDOW_ROWS)`.
    window_rows: usize,
    /// The most recently decoded window: its first input row and its rows, which the next
    /// batch most likely continues.
    current: Option<(u64, DataFrame)>,
    /// Windows decoded so far (each decode is the expensive part of a read).
    decoded: u32,
}

/// Rows decoded at a time from a Parquet file (fewer at the end of a row group). Large
/// enough that a window decompresses each page it touches about once (writers cut pages at
/// around 1 MiB, 131 072 i64 values), small enough to bound memory (~11 MiB for the
/// 15-column payroll input).
pub const DECODE_WINDOW_ROWS: usize = 65_536;

struct CsvSource {
    reader: BufReader<File>,
    header: Vec<u8>,
    batches_total: u32,
    done: bool,
}

/// Opening or reading the input file failed: NotFound / PermissionDenied are permanent,
/// anything else transient, and the message says which file.
fn input_io(label: &str, e: std::io::Error) -> PipelineError {
    PipelineError::from(e).context(format!("input {label}"))
}

impl Source {
    /// Opens `input`, skipping the first `skip_batches` batches (already checkpointed by an
    /// earlier attempt) without materialising them.
    pub(crate) fn open(
        input: &Input,
        batch_size: usize,
        skip_batches: u32,
    ) -> Result<Self, PipelineError> {
        let skip_rows = skip_batches as u64 * batch_size as u64;
        let mut fingerprint = None;
        let (kind, label) = match &input.kind {
            InputKind::Synthetic { batches } => (
                SourceKind::Synthetic {
                    next: skip_batches.min(*batches),
                    total: *batches,
                },
                "synthetic".to_string(),
            ),
            InputKind::File(path) => {
                let label = path.display().to_string();
                let format = format_of(path).ok_or_else(|| {
                    PipelineError::permanent(format!(
                        "input {label}: expected a .parquet or .csv file"
                    ))
                })?;
                let file = File::open(path).map_err(|e| input_io(&label, e))?;
                // What the fingerprint took, and how long the open waited for it.
                let (took, waited);
                let (kind, f) = match format {
                    Format::Parquet => {
                        // The footer: a few KiB, read before the source reads it again.
                        let started = std::time::Instant::now();
                        let f = crate::lineage::file_fingerprint(&file, true, &label)?;
                        (took, waited) = (started.elapsed(), started.elapsed());
                        let kind = SourceKind::Parquet(ParquetSource::open(
                            file,
                            &input.columns,
                            batch_size.max(DECODE_WINDOW_ROWS),
                            &label,
                        )?);
                        (kind, f)
                    }
                    Format::Csv => {
                        // The whole file is hashed on a thread of its own while the source
                        // scans it for record boundaries, so the hash adds little wall time.
                        let clone = file.try_clone().map_err(|e| input_io(&label, e))?;
                        let l = label.clone();
                        let hashing = std::thread::Builder::new()
                            .name("drover-fingerprint".into())
                            .spawn(move || {
                                let started = std::time::Instant::now();
                                crate::lineage::file_fingerprint(&clone, false, &l)
                                    .map(|f| (f, started.elapsed()))
                            })
                            .map_err(|e| input_io(&label, e))?;
                        let opened = CsvSource::open(file, path, batch_size, skip_rows, &label);
                        let join = std::time::Instant::now();
                        let (f, t) = hashing.join().unwrap_or_else(|_| {
                            Err(PipelineError::transient(format!(
                                "input {label}: fingerprinting panicked"
                            )))
                        })?;
                        (took, waited) = (t, join.elapsed());
                        (SourceKind::Csv(opened?), f)
                    }
                };
                // bench/lineage.sh reads this line to measure what fingerprinting costs.
                tracing::debug!(
                    input = %label,
                    fingerprint_us = took.as_micros() as u64,
                    waited_us = waited.as_micros() as u64,
                    "input fingerprinted"
                );
                fingerprint = Some(f);
                (kind, label)
            }
            InputKind::Postgres(pg) => {
                let label = format!(
                    "postgres table {} of {}",
                    pg.table,
                    drover_core::config::redact(&pg.url)
                );
                if input.columns.is_empty() {
                    return Err(PipelineError::permanent(format!(
                        "input {label}: a Postgres input needs declared columns"
                    )));
                }
                let src = PgSource::open(pg, &input.columns, skip_rows, &label)?;
                (SourceKind::Postgres(src), label)
            }
        };
        let fingerprint = match (fingerprint, &kind) {
            (Some(f), _) => f,
            (None, SourceKind::Synthetic { total, .. }) => {
                Fingerprint::Synthetic { batches: *total }
            }
            (None, SourceKind::Postgres(p)) => Fingerprint::Postgres {
                source: match &input.kind {
                    InputKind::Postgres(pg) => {
                        let filters: Vec<String> = pg
                            .filters
                            .iter()
                            .map(|(c, v)| format!("{c} = {v:?}"))
                            .collect();
                        if filters.is_empty() {
                            label.clone()
                        } else {
                            format!("{label} where {}", filters.join(" and "))
                        }
                    }
                    _ => label.clone(),
                },
                rows: p.total_rows(),
            },
            (None, _) => {
                return Err(PipelineError::permanent(format!(
                    "input {label}: no fingerprint was taken"
                )));
            }
        };
        let position = match &kind {
            SourceKind::Synthetic { next, .. } => *next as u64,
            SourceKind::Parquet(p) => skip_rows.min(p.total_rows),
            SourceKind::Csv(_) => skip_rows,
            SourceKind::Postgres(p) => skip_rows.min(p.total_rows()),
        };
        Ok(Source {
            kind,
            columns: input.columns.clone(),
            id_column: input.id_column.clone(),
            batch_size,
            position,
            label,
            fingerprint,
        })
    }

    /// The input's identity as opened (see [`crate::lineage`]).
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Number of batches in the whole input (including skipped ones), when known.
    pub(crate) fn batches_total(&self) -> Option<u32> {
        let per = self.batch_size as u64;
        match &self.kind {
            SourceKind::Synthetic { total, .. } => Some(*total),
            SourceKind::Parquet(p) => u32::try_from(p.total_rows.div_ceil(per)).ok(),
            SourceKind::Csv(c) => Some(c.batches_total),
            SourceKind::Postgres(p) => u32::try_from(p.total_rows().div_ceil(per)).ok(),
        }
    }

    /// The next batch and the 0-based input row of its first row, or `None` at the end.
    pub(crate) fn next_batch(&mut self) -> Result<Option<(u64, DataFrame)>, PipelineError> {
        let first_row = self.position;
        let df = match &mut self.kind {
            SourceKind::Synthetic { next, total } => {
                if *next >= *total {
                    return Ok(None);
                }
                let df = DataFrame::new(1, vec![Column::new("batch".into(), [*next as i64])])?;
                *next += 1;
                self.position += 1;
                return Ok(Some((first_row, df)));
            }
            SourceKind::Parquet(p) => {
                if first_row >= p.total_rows {
                    return Ok(None);
                }
                let len = (p.total_rows - first_row).min(self.batch_size as u64) as usize;
                p.read(first_row, len)
                    .map_err(|e| PipelineError::from(e).context(format!("input {}", self.label)))?
            }
            SourceKind::Csv(c) => match c.read(self.batch_size, &self.label)? {
                Some(df) => df,
                None => return Ok(None),
            },
            SourceKind::Postgres(p) => match p.read(self.batch_size, &self.label)? {
                Some(df) => df,
                None => return Ok(None),
            },
        };
        self.position += df.height() as u64;
        let df = normalize(df, &self.columns, self.id_column.as_ref(), first_row)?;
        Ok(Some((first_row, df)))
    }
}

impl ParquetSource {
    fn open(
        mut file: File,
        columns: &[(PlSmallStr, DataType)],
        window_rows: usize,
        label: &str,
    ) -> Result<Self, PipelineError> {
        let mut reader = ParquetReader::new(&mut file);
        let metadata = reader
            .get_metadata()
            .map_err(|e| PipelineError::from(e).context(format!("input {label}")))?
            .clone();
        let schema = reader
            .schema()
            .map_err(|e| PipelineError::from(e).context(format!("input {label}")))?;
        let projection = if columns.is_empty() {
            None
        } else {
            Some(
                columns
                    .iter()
                    .filter(|(name, _)| schema.contains(name))
                    .map(|(name, _)| name.to_string())
                    .collect(),
            )
        };
        let rg_starts = row_group_starts(metadata.row_groups.iter().map(|rg| rg.num_rows()));
        let total_rows = rg_starts.last().copied().unwrap_or(0);
        if total_rows != metadata.num_rows as u64 {
            return Err(PipelineError::permanent(format!(
                "input {label}: corrupt Parquet footer: row groups hold {total_rows} rows, \
                 the file says {}",
                metadata.num_rows
            )));
        }
        Ok(ParquetSource {
            total_rows,
            file,
            metadata,
            projection,
            rg_starts,
            window_rows: window_rows.max(1),
            current: None,
            decoded: 0,
        })
    }

    /// Rows `offset..offset+len` (within the file): copies of the decoded windows that
    /// overlap them, decoding each window only when the read first reaches it.
    fn read(&mut self, offset: u64, len: usize) -> PolarsResult<DataFrame> {
        let end = offset + len as u64;
        let mut out: Option<DataFrame> = None;
        for (rg, from, to) in row_group_spans(&self.rg_starts, offset, end) {
            let mut from = from;
            while from < to {
                let (start, frame) = self.window(rg, from)?;
                let stop = to.min(start + frame.height() as u64);
                let (a, b) = ((from - start) as IdxSize, (stop - start) as IdxSize);
                // Copied out rather than sliced: a zero-copy slice would keep the whole
                // window alive for as long as any frame derived from the batch (its output
                // passes input columns through), so two windows would be held at a boundary.
                let part = frame.take(&IdxCa::from_vec(PlSmallStr::EMPTY, (a..b).collect()))?;
                match &mut out {
                    None => out = Some(part),
                    Some(df) => {
                        df.vstack_mut_owned(part)?;
                    }
                }
                from = stop;
            }
        }
        match out {
            Some(df) => Ok(df),
            None => polars_bail!(OutOfBounds: "rows {offset}..{end} are past the end of the file"),
        }
    }

    /// The decoded window of row group `rg` holding input row `row` (projected columns
    /// only): the current one if it does, else `window_rows` rows from `row` on, cut at the
    /// end of the group. Returns the window's first input row and its frame.
    fn window(&mut self, rg: usize, row: u64) -> PolarsResult<(u64, &DataFrame)> {
        let held = self
            .current
            .as_ref()
            .is_some_and(|(start, df)| (*start..*start + df.height() as u64).contains(&row));
        if !held {
            // Drop the previous window before decoding the next, so two are never held here.
            self.current = None;
            let (rg_start, rg_end) = (self.rg_starts[rg], self.rg_starts[rg + 1]);
            let len = (rg_end - row).min(self.window_rows as u64) as usize;
            // A footer with only this row group, and a slice of it: polars reads just the
            // pages holding those rows, without visiting the other groups. One thread:
            // decoding happens once per window, and a second decoding thread only adds
            // memory.
            let mut single = (*self.metadata).clone();
            single.row_groups = self
                .metadata
                .row_groups
                .get(rg)
                .cloned()
                .into_iter()
                .collect();
            single.num_rows = (rg_end - rg_start) as usize;
            single.max_row_group_height = single.num_rows;
            let mut reader = ParquetReader::new(&mut self.file)
                .with_columns(self.projection.clone())
                .with_slice(Some(((row - rg_start) as usize, len)))
                .read_parallel(ParallelStrategy::None);
            reader.set_metadata(Arc::new(single));
            let df = reader.finish()?;
            if df.height() != len {
                polars_bail!(ComputeError: "rows {row}..{} of row group {rg} decoded to {} rows",
                    row + len as u64, df.height());
            }
            self.decoded += 1;
            self.current = Some((row, df));
        }
        match &self.current {
            Some((start, df)) => Ok((*start, df)),
            None => polars_bail!(ComputeError: "row {row} was not decoded"),
        }
    }
}

/// Prefix sums of row-group heights: the first row of each group, then the total.
fn row_group_starts(heights: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut starts = vec![0u64];
    let mut total = 0u64;
    for h in heights {
        total += h as u64;
        starts.push(total);
    }
    starts
}

/// The pieces of rows `offset..end` by row group: `(row group, from, to)` with input row
/// numbers, in order, skipping empty row groups. `starts` is [`row_group_starts`]'s output.
fn row_group_spans(starts: &[u64], offset: u64, end: u64) -> Vec<(usize, u64, u64)> {
    let total = starts.last().copied().unwrap_or(0);
    let end = end.min(total);
    let mut spans = Vec::new();
    let mut pos = offset;
    while pos < end {
        // The last group starting at or before `pos` (empty groups share their start with
        // the next one, so they are never chosen).
        let rg = starts.partition_point(|&s| s <= pos) - 1;
        let to = end.min(starts[rg + 1]);
        spans.push((rg, pos, to));
        pos = to;
    }
    spans
}

/// Splits a CSV byte stream into records: a newline ends a record unless it is inside a
/// quoted field; lines holding nothing but `\r` are skipped (polars would skip them too, and
/// counting them would make batch boundaries depend on blank lines).
#[derive(Default)]
struct RecordScanner {
    in_quotes: bool,
    has_content: bool,
}

impl RecordScanner {
    /// Consumes up to `want` records from `reader`, appending their bytes (each ending in
    /// `\n`) to `out` when given. Returns how many records were consumed; fewer than `want`
    /// means the end of the file.
    fn take(
        &mut self,
        reader: &mut impl BufRead,
        want: u64,
        mut out: Option<&mut Vec<u8>>,
    ) -> std::io::Result<u64> {
        let mut count = 0u64;
        let mut record_start = out.as_ref().map_or(0, |o| o.len());
        while count < want {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                // End of file: a last record without a trailing newline still counts.
                if self.has_content {
                    count += 1;
                    if let Some(o) = out.as_deref_mut() {
                        o.push(b'\n');
                    }
                } else if let Some(o) = out.as_deref_mut() {
                    o.truncate(record_start);
                }
                self.has_content = false;
                self.in_quotes = false;
                break;
            }
            let mut consumed = buf.len();
            let mut seg_start = 0;
            for (i, &b) in buf.iter().enumerate() {
                match b {
                    b'"' => {
                        self.in_quotes = !self.in_quotes;
                        self.has_content = true;
                    }
                    b'\n' if !self.in_quotes => {
                        if let Some(o) = out.as_deref_mut() {
                            o.extend_from_slice(&buf[seg_start..=i]);
                            seg_start = i + 1;
                            if !self.has_content {
                                o.truncate(record_start);
                            }
                            record_start = o.len();
                        }
                        if self.has_content {
                            count += 1;
                        }
                        self.has_content = false;
                        if count == want {
                            consumed = i + 1;
                            break;
                        }
                    }
                    b'\r' => {}
                    _ => self.has_content = true,
                }
            }
            if let Some(o) = out.as_deref_mut()
                && seg_start < consumed
            {
                o.extend_from_slice(&buf[seg_start..consumed]);
            }
            reader.consume(consumed);
        }
        Ok(count)
    }
}

/// Read buffer for CSV input: large enough for fast scanning, small enough to be noise.
const CSV_BUFFER: usize = 256 * 1024;

impl CsvSource {
    fn open(
        file: File,
        path: &Path,
        batch_size: usize,
        skip_rows: u64,
        label: &str,
    ) -> Result<Self, PipelineError> {
        let mut reader = BufReader::with_capacity(CSV_BUFFER, file);
        let mut scanner = RecordScanner::default();
        let mut header = Vec::new();
        let got = scanner
            .take(&mut reader, 1, Some(&mut header))
            .map_err(|e| input_io(label, e))?;
        if got == 0 {
            return Err(PipelineError::permanent(format!(
                "input {label}: empty CSV file (no header row)"
            )));
        }
        // Spreadsheet exports often start with a UTF-8 byte order mark; it is not part of
        // the first column's name.
        if header.starts_with(b"\xEF\xBB\xBF") {
            header.drain(..3);
        }
        // Count the data records once with a second handle (a sequential scan, no parsing),
        // so progress can show batches done / total.
        let total_rows = {
            let f = File::open(path).map_err(|e| input_io(label, e))?;
            let mut counter = BufReader::with_capacity(CSV_BUFFER, f);
            let mut s = RecordScanner::default();
            s.take(&mut counter, 1, None)
                .and_then(|_| s.take(&mut counter, u64::MAX, None))
                .map_err(|e| input_io(label, e))?
        };
        let batches_total =
            u32::try_from(total_rows.div_ceil(batch_size as u64)).map_err(|_| {
                PipelineError::permanent(format!(
                    "input {label}: {total_rows} rows is more than 2^32 batches of {batch_size}"
                ))
            })?;
        let skipped = scanner
            .take(&mut reader, skip_rows, None)
            .map_err(|e| input_io(label, e))?;
        Ok(CsvSource {
            reader,
            header,
            batches_total,
            done: skipped < skip_rows,
        })
    }

    fn read(&mut self, batch_size: usize, label: &str) -> Result<Option<DataFrame>, PipelineError> {
        if self.done {
            return Ok(None);
        }
        let mut bytes = self.header.clone();
        let got = RecordScanner::default()
            .take(&mut self.reader, batch_size as u64, Some(&mut bytes))
            .map_err(|e| input_io(label, e))?;
        if got < batch_size as u64 {
            self.done = true;
        }
        if got == 0 {
            return Ok(None);
        }
        let df = CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .with_n_threads(Some(1))
            .into_reader_with_file_handle(Cursor::new(bytes))
            .finish()
            .map_err(|e| PipelineError::from(e).context(format!("input {label}")))?;
        Ok(Some(df))
    }
}

/// Projects a raw batch onto the declared columns and casts each to its declared dtype.
fn normalize(
    df: DataFrame,
    columns: &[(PlSmallStr, DataType)],
    id_column: Option<&PlSmallStr>,
    first_row: u64,
) -> Result<DataFrame, PipelineError> {
    if columns.is_empty() {
        return Ok(df);
    }
    let height = df.height();
    // The id column first, so cast errors in other columns can name the row by its id.
    let ids: Option<Column> = match id_column.and_then(|id| {
        columns
            .iter()
            .find(|(n, _)| n == id)
            .and_then(|(n, t)| df.column(n).ok().map(|c| (c, t)))
    }) {
        Some((c, dtype)) => Some(cast_column(c, dtype, None, first_row)?),
        None => None,
    };
    let row_id = ids
        .as_ref()
        .map(|c| (id_column.map_or("", |s| s.as_str()), c));
    let mut out = Vec::with_capacity(columns.len());
    for (name, dtype) in columns {
        if Some(name) == id_column
            && let Some(c) = &ids
        {
            out.push(c.clone());
            continue;
        }
        if let Ok(c) = df.column(name) {
            out.push(cast_column(c, dtype, row_id, first_row)?);
        }
    }
    Ok(DataFrame::new(height, out)?)
}

/// Describes row `idx` of a batch for an error message: `employee_id 1042` when the id
/// column has a value there, else `input row N` (1-based data row, header excluded).
pub(crate) fn describe_row(ids: Option<(&str, &Column)>, idx: usize, first_row: u64) -> String {
    if let Some((name, col)) = ids
        && let Ok(v) = col.get(idx)
        && !v.is_null()
    {
        let shown = match v.get_str() {
            Some(s) => s.to_string(),
            None => v.to_string(),
        };
        return format!("{name} {shown}");
    }
    format!("input row {}", first_row + idx as u64 + 1)
}

fn dtype_name(d: &DataType) -> String {
    match d {
        DataType::Int64 => "i64".into(),
        DataType::String => "string".into(),
        DataType::Float64 => "f64".into(),
        other => other.to_string(),
    }
}

/// Casts one column to its declared dtype without losing information: text is parsed (a
/// value that does not parse is an error naming it), integers are widened or turned into
/// text, anything else (e.g. floats for an integer column) is refused.
fn cast_column(
    c: &Column,
    dtype: &DataType,
    ids: Option<(&str, &Column)>,
    first_row: u64,
) -> Result<Column, PipelineError> {
    let from = c.dtype();
    if from == dtype {
        return Ok(c.clone());
    }
    let name = c.name().as_str();
    let refuse = || {
        PipelineError::permanent(format!(
            "validation: column \"{name}\": expected {}, got a column of dtype {}",
            dtype_name(dtype),
            dtype_name(from)
        ))
    };
    match (from, dtype) {
        (DataType::Null, _) => Ok(c.cast(dtype)?),
        (DataType::String, _) if dtype.is_integer() || dtype.is_float() => {
            let cast = c.cast(dtype)?;
            if cast.null_count() != c.null_count() {
                let lost = c.is_not_null() & cast.is_null();
                if let Some(idx) = lost.iter().position(|v| v == Some(true)) {
                    let raw = c.str()?.get(idx).unwrap_or_default();
                    return Err(PipelineError::permanent(format!(
                        "validation: column \"{name}\": expected {}, got \"{raw}\" for {}",
                        dtype_name(dtype),
                        describe_row(ids, idx, first_row)
                    )));
                }
            }
            Ok(cast)
        }
        (f, DataType::String) if f.is_integer() => Ok(c.cast(dtype)?),
        (f, t) if f.is_integer() && t.is_integer() => c.strict_cast(dtype).map_err(|_| {
            PipelineError::permanent(format!(
                "validation: column \"{name}\": values do not fit {}",
                dtype_name(dtype)
            ))
        }),
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &str, want: u64) -> (u64, String, String) {
        let mut r = BufReader::with_capacity(4, input.as_bytes());
        let mut s = RecordScanner::default();
        let mut out = Vec::new();
        let n = s.take(&mut r, want, Some(&mut out)).unwrap();
        let mut rest = Vec::new();
        s.take(&mut r, u64::MAX, Some(&mut rest)).unwrap();
        (
            n,
            String::from_utf8(out).unwrap(),
            String::from_utf8(rest).unwrap(),
        )
    }

    #[test]
    fn scanner_quotes_blank_lines_and_eof() {
        let (n, out, rest) = records("a,b\n\"x\ny\",2\n\n3,4\r\n5,6", 2);
        assert_eq!(n, 2);
        assert_eq!(out, "a,b\n\"x\ny\",2\n");
        assert_eq!(rest, "3,4\r\n5,6\n");
        let (n, out, _) = records("\n\n", 5);
        assert_eq!((n, out.as_str()), (0, ""));
    }

    #[test]
    fn row_group_spans_cut_at_boundaries() {
        // Groups of 4, 0 (empty), 3 and 5 rows.
        let starts = row_group_starts([4usize, 0, 3, 5].into_iter());
        assert_eq!(starts, vec![0, 4, 4, 7, 12]);
        assert_eq!(row_group_spans(&starts, 0, 3), vec![(0, 0, 3)]);
        // Straddles group 0 and (skipping the empty group 1) group 2.
        assert_eq!(row_group_spans(&starts, 3, 6), vec![(0, 3, 4), (2, 4, 6)]);
        // Spans three groups.
        assert_eq!(
            row_group_spans(&starts, 2, 10),
            vec![(0, 2, 4), (2, 4, 7), (3, 7, 10)]
        );
        // A last short batch stops at the end of the file.
        assert_eq!(row_group_spans(&starts, 10, 15), vec![(3, 10, 12)]);
        assert!(row_group_spans(&starts, 12, 20).is_empty());
        assert!(row_group_spans(&[0], 0, 5).is_empty());
    }

    /// A Parquet file of `rows` rows (`id` = row number, `name` = its text, plus a column
    /// nobody declares) in row groups of `group` rows.
    fn grouped_parquet(dir: &Path, rows: i64, group: usize) -> PathBuf {
        let path = dir.join(format!("g{rows}-{group}.parquet"));
        let ids: Vec<i64> = (0..rows).collect();
        let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
        let mut df = DataFrame::new(
            rows as usize,
            vec![
                Column::new("id".into(), ids.clone()),
                Column::new("extra".into(), ids),
                Column::new("name".into(), names),
            ],
        )
        .unwrap();
        ParquetWriter::new(File::create(&path).unwrap())
            .with_row_group_size(Some(group))
            .finish(&mut df)
            .unwrap();
        path
    }

    fn declared(path: &Path) -> Input {
        Input::file(path)
            .column("id", DataType::Int64)
            .column("name", DataType::String)
    }

    /// Every batch of `src` as (first row, ids, names).
    fn drain(src: &mut Source) -> Vec<(u64, Vec<i64>, Vec<String>)> {
        let mut out = Vec::new();
        while let Some((first, df)) = src.next_batch().unwrap() {
            assert_eq!(df.get_column_names(), ["id", "name"]);
            let ids = df.column("id").unwrap().i64().unwrap();
            let names = df.column("name").unwrap().str().unwrap();
            out.push((
                first,
                ids.into_no_null_iter().collect(),
                names
                    .iter()
                    .map(|v| v.unwrap_or_default().to_string())
                    .collect(),
            ));
        }
        out
    }

    fn decoded(src: &Source) -> u32 {
        match &src.kind {
            SourceKind::Parquet(p) => p.decoded,
            _ => panic!("not a parquet source"),
        }
    }

    #[test]
    fn parquet_batches_straddle_row_groups_and_decode_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = grouped_parquet(dir.path(), 28, 7);
        let md = ParquetReader::new(File::open(&path).unwrap())
            .get_metadata()
            .unwrap()
            .clone();
        let heights: Vec<usize> = md.row_groups.iter().map(|rg| rg.num_rows()).collect();
        assert_eq!(heights, [7, 7, 7, 7]);
        for batch in [1, 3, 5, 7, 10, 28, 50] {
            let mut src = Source::open(&declared(&path), batch, 0).unwrap();
            assert_eq!(src.batches_total(), Some(28usize.div_ceil(batch) as u32));
            let got = drain(&mut src);
            assert_eq!(got.len(), 28usize.div_ceil(batch), "batch {batch}");
            for (k, (first, ids, names)) in got.iter().enumerate() {
                let start = (k * batch) as i64;
                let end = (start + batch as i64).min(28);
                assert_eq!(*first, start as u64, "batch {batch}");
                assert_eq!(*ids, (start..end).collect::<Vec<_>>(), "batch {batch}");
                let want: Vec<String> = (start..end).map(|i| format!("n{i}")).collect();
                assert_eq!(*names, want, "batch {batch}");
            }
            assert_eq!(
                decoded(&src),
                4,
                "each row group decoded once (batch {batch})"
            );
            assert!(src.next_batch().unwrap().is_none());
        }
    }

    #[test]
    fn parquet_decodes_a_large_row_group_a_window_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        // One row group of 28 rows, as pyarrow writes a file of fewer than a million rows.
        let path = grouped_parquet(dir.path(), 28, 28);
        for (batch, window, windows) in [(5, 8, 4), (3, 28, 1), (10, 7, 4), (1, 1, 28)] {
            let mut src = Source::open(&declared(&path), batch, 0).unwrap();
            match &mut src.kind {
                SourceKind::Parquet(p) => {
                    assert_eq!(p.window_rows, DECODE_WINDOW_ROWS, "the production window");
                    p.window_rows = window;
                }
                _ => panic!("not a parquet source"),
            }
            let got = drain(&mut src);
            let ids: Vec<i64> = got.iter().flat_map(|(_, ids, _)| ids.clone()).collect();
            assert_eq!(
                ids,
                (0..28).collect::<Vec<_>>(),
                "batch {batch}, window {window}"
            );
            assert!(got.iter().all(|(first, ids, names)| {
                ids.len() <= batch
                    && ids.first() == Some(&(*first as i64))
                    && names.iter().zip(ids).all(|(n, i)| *n == format!("n{i}"))
            }));
            assert_eq!(
                decoded(&src),
                windows,
                "each window decoded once (batch {batch}, window {window})"
            );
            // Held: one window, never the group.
            if let SourceKind::Parquet(p) = &src.kind {
                let held = p.current.as_ref().map_or(0, |(_, df)| df.height());
                assert!(held <= window, "holds {held} rows, window {window}");
            }
        }
    }

    #[test]
    fn parquet_resume_skips_without_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = grouped_parquet(dir.path(), 28, 7);
        // Batches of 5, 3 already done: resume at row 15, inside the third row group
        // (rows 14..21); the first two groups are never decoded.
        let mut src = Source::open(&declared(&path), 5, 3).unwrap();
        assert_eq!(decoded(&src), 0);
        let got = drain(&mut src);
        assert_eq!(
            got.iter()
                .map(|(f, ids, _)| (*f, ids.len()))
                .collect::<Vec<_>>(),
            [(15, 5), (20, 5), (25, 3)]
        );
        assert_eq!(got[0].1, (15..20).collect::<Vec<_>>());
        assert_eq!(
            got[1].1,
            (20..25).collect::<Vec<_>>(),
            "straddles groups 3 and 4"
        );
        assert_eq!(got[2].1, [25, 26, 27], "last short batch");
        assert_eq!(decoded(&src), 2);
        // Resuming past the end reads nothing and decodes nothing.
        let mut src = Source::open(&declared(&path), 5, 9).unwrap();
        assert!(src.next_batch().unwrap().is_none());
        assert_eq!(decoded(&src), 0);
    }

    #[test]
    fn cast_errors_name_value_and_row() {
        let df = DataFrame::new(
            2,
            vec![
                Column::new("id".into(), ["7", "8"]),
                Column::new("amt".into(), ["12", "1.5"]),
                Column::new("f".into(), [1.0f64, 2.0]),
            ],
        )
        .unwrap();
        let cols = vec![
            ("id".into(), DataType::Int64),
            ("amt".into(), DataType::Int64),
        ];
        let id = PlSmallStr::from("id");
        let e = normalize(df.clone(), &cols, Some(&id), 10).unwrap_err();
        assert_eq!(
            e.message,
            "validation: column \"amt\": expected i64, got \"1.5\" for id 8"
        );
        let e = normalize(df.clone(), &cols, None, 10).unwrap_err();
        assert!(e.message.ends_with("for input row 12"), "{}", e.message);
        let e = normalize(df, &[("f".into(), DataType::Int64)], None, 0).unwrap_err();
        assert_eq!(
            e.message,
            "validation: column \"f\": expected i64, got a column of dtype f64"
        );
    }
}
