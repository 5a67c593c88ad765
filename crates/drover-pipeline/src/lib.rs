//! drover-pipeline: the [`Pipeline`] trait, batch sources and the Parquet sink, and the
//! built-in `noop`, `payroll`, `sql` and `exec` (any-language child process) pipelines.
//!
//! Where a job is published (`drover publish`, `drover run`), [`Registry::validate`] and
//! then [`Registry::preflight`] (checks that read the input, such as `sql`'s query against
//! the input's columns) refuse it before anything is queued. The worker (and `drover run`)
//! then drive every job the same way:
//!
//! 1. [`Registry::validate`] when a message arrives (bad params are a permanent rejection);
//! 2. [`Registry::open`] with the number of batches already checkpointed in the ledger;
//! 3. [`JobRun::next_batch`] until it returns `Ok(None)`, checkpointing each
//!    [`BatchOutcome`];
//! 4. [`JobRun::finish`] with every checkpointed batch, which writes `_manifest.json` and
//!    returns the job's result JSON.
//!
//! Memory per job is bounded by the batch size: inputs are read in slices (see [`Input`]),
//! each batch's output is written to its own part file and dropped.

#![warn(missing_docs)]

mod contract;
mod describe;
mod error;
pub mod exec;
pub mod lineage;
pub mod noop;
mod params;
pub mod payroll;
mod pg_source;
mod sink;
mod source;
pub mod sql;
pub mod verify;

pub use contract::{OutputColumn, OutputSchema};
pub use describe::{Description, Field};
pub use drover_core::ErrorKind;
pub use error::PipelineError;
pub use lineage::{Fingerprint, JobIdentity, RecordedIdentity};
pub use params::ParamReader;
pub use payroll::generate_payroll;
pub use sink::{MANIFEST, Manifest, ManifestPart, key_path};
pub use source::Input;

use polars::prelude::DataFrame;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per batch when neither the message nor the pipeline says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 5000;

/// Batches whose frames a running job may hold in memory at once: the one being read and
/// transformed plus up to [`WRITE_AHEAD`] whose parts are being written. A worker sizing a
/// job's memory from one batch's frames multiplies by this.
pub const BATCHES_IN_MEMORY: u64 = WRITE_AHEAD as u64 + 1;

/// Additive per-batch figures (`rows`, `total_net`, ...): summed over batches into the
/// job's result, so they must be integers that add up.
pub type Summary = BTreeMap<String, i64>;

/// What the worker (or `drover run`) knows about a job when it opens it.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The idempotency key; names the output directory.
    pub key: String,
    /// Registered pipeline name.
    pub pipeline: String,
    /// The message's params (a JSON object).
    pub params: Value,
    /// Rows per batch from the message; `None` uses the pipeline's default.
    pub batch_size: Option<usize>,
    /// 1-based attempt number (lets pipelines such as `noop` inject failures per attempt).
    pub attempt: u32,
    /// Root under which `<pipeline>/<key path>/` output directories are created.
    pub output_root: PathBuf,
}

/// One completed batch: exactly what the ledger checkpoints, and its lineage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchOutcome {
    /// 0-based batch index.
    pub index: u32,
    /// 0-based input row of the batch's first row: it read input rows
    /// `first_row..first_row + rows`.
    #[serde(default)]
    pub first_row: u64,
    /// Input rows in the batch.
    pub rows: u64,
    /// Rows in the batch's output (`None` when it wrote none, or for batches checkpointed
    /// by a release that did not record it).
    #[serde(default)]
    pub rows_out: Option<u64>,
    /// The attempt that computed the batch and wrote its part.
    #[serde(default)]
    pub attempt: u32,
    /// Path of the part file (`None` for pipelines or batches without output).
    pub output: Option<String>,
    /// SHA-256 (hex) of the part file's bytes.
    pub checksum: Option<String>,
    /// Additive per-batch figures, e.g. `rows`, `total_net`.
    pub summary: Summary,
}

/// Where a pipeline's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The pipeline writes nothing (no part files, no manifest).
    None,
    /// One Parquet part per batch plus `_manifest.json`, under `dir` when given, else under
    /// `<output_root>/<pipeline>/<key path>/` (see [`key_path`]).
    Parquet {
        /// Directory replacing the default location (typically an `output` param).
        dir: Option<PathBuf>,
    },
}

/// What a pipeline's [`Pipeline::transform`] knows about the batch at hand.
#[derive(Debug, Clone)]
pub struct BatchContext {
    /// 0-based batch index within the job (stable across attempts).
    pub index: u32,
    /// 0-based input row of the batch's first row (for error messages).
    pub first_row: u64,
    /// 1-based attempt number.
    pub attempt: u32,
    /// True for the first batch this attempt runs (after any resumed batches).
    pub first_in_attempt: bool,
    /// The job's idempotency key.
    pub key: String,
    /// Batches in the whole input, when the source knows (files always do): lets a
    /// pipeline that holds a per-attempt resource (the `exec` child) finish it on the last
    /// batch, where a failure still fails that batch.
    pub batches_total: Option<u32>,
}

/// A pipeline: validate params, describe the input, load reference data once per job,
/// transform one batch, summarise it.
///
/// Implement this trait and [`Registry::register`] the value to add a pipeline; the worker,
/// the ledger and `drover run` need nothing else. The framework does the rest: it reads the
/// input in batches of `batch_size` rows (bounded memory, resumable after the last
/// checkpointed batch), writes each returned frame as an atomic Parquet part, records
/// checksums, sums the summaries and writes the manifest.
///
/// Rules that keep a pipeline safe to retry:
///
/// * [`validate`](Pipeline::validate) must not touch the filesystem or network: it also
///   runs where the job is published. Reject unknown params ([`ParamReader::finish`]).
/// * [`transform`](Pipeline::transform) must be deterministic for a given batch: a batch
///   replayed after a crash must produce the same part.
/// * Return [`PipelineError::permanent`] for anything that would fail the same way again
///   (invalid rows, bad params) and [`PipelineError::transient`] for anything that might not
///   (a lookup service timing out). `?` on polars and I/O errors classifies them for you.
/// * Summaries are additive integers: the job's result is their sum over all batches,
///   including batches done by earlier attempts.
///
/// # Example: a third pipeline
///
/// A pipeline that keeps employees of one state and reports how many it kept:
///
/// ```
/// use drover_pipeline::{
///     BatchContext, Input, JobSpec, ParamReader, Pipeline, PipelineError, Registry, Summary,
/// };
/// use polars::prelude::*;
/// use serde_json::{Value, json};
///
/// struct StateFilter;
///
/// struct Params {
///     input: String,
///     state: String,
/// }
///
/// impl Pipeline for StateFilter {
///     type Params = Params;
///     type Reference = ();
///
///     fn name(&self) -> &'static str {
///         "state_filter"
///     }
///
///     fn validate(&self, params: &Value) -> Result<Params, PipelineError> {
///         let mut r = ParamReader::new(self.name(), params)?;
///         let p = Params {
///             input: r.required_str("input")?.to_string(),
///             state: r.required_str("state")?.to_string(),
///         };
///         r.finish()?; // unknown params are an error
///         Ok(p)
///     }
///
///     fn input(&self, p: &Params, _spec: &JobSpec) -> Result<Input, PipelineError> {
///         Ok(Input::file(&p.input)
///             .column("employee_id", DataType::Int64)
///             .column("state", DataType::String)
///             .id_column("employee_id"))
///     }
///
///     fn load_reference(&self, _p: &Params) -> Result<(), PipelineError> {
///         Ok(())
///     }
///
///     fn transform(
///         &self,
///         p: &Params,
///         _reference: &(),
///         batch: DataFrame,
///         _ctx: &BatchContext,
///     ) -> Result<Option<DataFrame>, PipelineError> {
///         if batch.column("state").is_err() {
///             return Err(PipelineError::permanent("validation: column \"state\" is missing"));
///         }
///         let kept = batch
///             .lazy()
///             .filter(col("state").eq(lit(p.state.clone())))
///             .collect()?;
///         Ok(Some(kept))
///     }
///
///     fn summarise(
///         &self,
///         rows: u64,
///         output: Option<&DataFrame>,
///     ) -> Result<Summary, PipelineError> {
///         Ok(Summary::from([
///             ("rows".to_string(), rows as i64),
///             ("kept".to_string(), output.map_or(0, |df| df.height() as i64)),
///         ]))
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let input = dir.path().join("in.csv");
/// # std::fs::write(&input, "employee_id,state\n1,CA\n2,NY\n3,CA\n")?;
/// let mut registry = Registry::builtin();
/// registry.register(StateFilter);
/// let spec = JobSpec {
///     key: "ca-only".into(),
///     pipeline: "state_filter".into(),
///     params: json!({"input": input, "state": "CA"}),
///     batch_size: Some(2),
///     attempt: 1,
///     output_root: dir.path().join("out"),
/// };
/// registry.validate(&spec.pipeline, &spec.params)?;
/// let mut run = registry.open(&spec, 0)?;
/// let mut batches = Vec::new();
/// while let Some(batch) = run.next_batch()? {
///     batches.push(batch); // the worker checkpoints each one in the ledger here
/// }
/// let result = run.finish(&batches)?;
/// assert_eq!(result, json!({"rows": 3, "kept": 2}));
/// # Ok(())
/// # }
/// ```
pub trait Pipeline: Send + Sync + 'static {
    /// Validated, typed params (what [`validate`](Pipeline::validate) produces).
    type Params: Send + 'static;
    /// Reference data loaded once per job (tables, rates); `()` when there is none.
    type Reference: Send + 'static;

    /// The name producers put in a message's `pipeline` field.
    fn name(&self) -> &'static str;

    /// Rows per batch when the message does not say.
    fn default_batch_size(&self) -> usize {
        DEFAULT_BATCH_SIZE
    }

    /// Attempts before `dead` when the message does not say; `None` defers to the
    /// worker's configuration.
    fn default_max_attempts(&self) -> Option<u32> {
        None
    }

    /// The version of what the pipeline computes for these params. Recorded with the job at
    /// its first attempt; an attempt that would resume a job under another version is
    /// refused (the job fails permanently), so a deploy between two attempts never mixes
    /// two formulas in one output. Change it whenever a batch's output for the same input
    /// would change. The default, `"1"`, suits a pipeline that never changes its formula.
    fn version(&self, _params: &Self::Params) -> String {
        "1".to_string()
    }

    /// The columns every batch's output must have (names, dtypes, nullability, and no
    /// others). A batch whose output breaks it fails the attempt permanently, naming the
    /// batch and the column, before its part is written. `None` (the default) checks
    /// nothing.
    fn output_schema(&self, _params: &Self::Params) -> Option<OutputSchema> {
        None
    }

    /// Parses and checks params; a permanent error naming the param and the value when they
    /// are invalid. Pure: no filesystem or network access.
    fn validate(&self, params: &Value) -> Result<Self::Params, PipelineError>;

    /// Checks that need the input (a file's columns, say), run once where the job is
    /// published (`drover publish`, `drover run`) after [`validate`](Pipeline::validate),
    /// so a job that can only fail is refused before anything is queued. Separate from
    /// `validate`, which runs on every delivery and must stay pure. The default checks
    /// nothing.
    fn preflight(&self, _params: &Self::Params) -> Result<(), PipelineError> {
        Ok(())
    }

    /// Describes what to read (see [`Input`]).
    fn input(&self, params: &Self::Params, spec: &JobSpec) -> Result<Input, PipelineError>;

    /// Where output goes; the default is Parquet parts under the job's default directory.
    fn output(&self, _params: &Self::Params) -> Output {
        Output::Parquet { dir: None }
    }

    /// Loads reference data, once per job (per attempt), before the first batch.
    fn load_reference(&self, params: &Self::Params) -> Result<Self::Reference, PipelineError>;

    /// Validates and transforms one batch. `Some(frame)` is written as the batch's part;
    /// `None` means no output for this batch.
    fn transform(
        &self,
        params: &Self::Params,
        reference: &Self::Reference,
        batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError>;

    /// The batch's additive figures; `rows` is the number of input rows. The default
    /// reports `{"rows": rows}`.
    fn summarise(&self, rows: u64, _output: Option<&DataFrame>) -> Result<Summary, PipelineError> {
        Ok(Summary::from([("rows".to_string(), rows as i64)]))
    }

    /// [`summarise`](Pipeline::summarise) for pipelines whose figures depend on the params
    /// (`sql`'s `sum` columns); the runner calls this one. The default calls `summarise`.
    fn summarise_batch(
        &self,
        _params: &Self::Params,
        rows: u64,
        output: Option<&DataFrame>,
    ) -> Result<Summary, PipelineError> {
        self.summarise(rows, output)
    }

    /// Runs once after the last batch, before the manifest is written, with the job's
    /// output directory and its part files in batch order: for output built from every
    /// batch (`sql`'s `combine`). It must be idempotent (a retry after a crash here runs it
    /// again) and write its files atomically. The fields of a returned JSON object are added
    /// to the job's result (and so to the manifest's `summary`). The default does nothing.
    fn finalize(
        &self,
        _params: &Self::Params,
        _reference: &Self::Reference,
        _dir: &Path,
        _parts: &[PathBuf],
    ) -> Result<Option<Value>, PipelineError> {
        Ok(None)
    }

    /// The job's result JSON from the summed summaries; the default is the sums themselves.
    fn result(&self, totals: &Summary, _batches: u32) -> Value {
        serde_json::to_value(totals).unwrap_or(Value::Null)
    }

    /// Params, columns and result described for producers (`drover pipelines --describe`),
    /// so using a pipeline does not take reading its source. `None` (the default): the
    /// pipeline says nothing beyond its name.
    fn describe(&self) -> Option<Description> {
        None
    }
}

/// A job's output directory: `dir` (a pipeline's own param) when given, else
/// `<root>/<pipeline>/<key path>/`, in one place so the runner and `output_dir` agree.
fn default_dir(dir: Option<PathBuf>, root: &Path, pipeline: &str, key: &str) -> PathBuf {
    dir.unwrap_or_else(|| root.join(pipeline).join(key_path(key)))
}

/// Object-safe view of a [`Pipeline`], so the registry can hold pipelines with different
/// associated types.
trait ErasedPipeline: Send + Sync {
    fn name(&self) -> &'static str;
    fn default_max_attempts(&self) -> Option<u32>;
    fn default_batch_size(&self) -> usize;
    fn describe(&self) -> Option<Description>;
    fn output_dir(&self, spec: &JobSpec) -> Result<Option<PathBuf>, PipelineError>;
    fn validate(&self, params: &Value) -> Result<(), PipelineError>;
    fn preflight(&self, params: &Value) -> Result<(), PipelineError>;
    fn open(self: Arc<Self>, spec: &JobSpec, resume_after: u32) -> Result<JobRun, PipelineError>;
}

impl<P: Pipeline> ErasedPipeline for P {
    fn name(&self) -> &'static str {
        Pipeline::name(self)
    }

    fn default_max_attempts(&self) -> Option<u32> {
        Pipeline::default_max_attempts(self)
    }

    fn default_batch_size(&self) -> usize {
        Pipeline::default_batch_size(self)
    }

    fn describe(&self) -> Option<Description> {
        Pipeline::describe(self)
    }

    fn output_dir(&self, spec: &JobSpec) -> Result<Option<PathBuf>, PipelineError> {
        let params = Pipeline::validate(self, &spec.params)?;
        Ok(match Pipeline::output(self, &params) {
            Output::None => None,
            Output::Parquet { dir } => {
                Some(default_dir(dir, &spec.output_root, self.name(), &spec.key))
            }
        })
    }

    fn validate(&self, params: &Value) -> Result<(), PipelineError> {
        Pipeline::validate(self, params).map(|_| ())
    }

    fn preflight(&self, params: &Value) -> Result<(), PipelineError> {
        Pipeline::preflight(self, &Pipeline::validate(self, params)?)
    }

    fn open(self: Arc<Self>, spec: &JobSpec, resume_after: u32) -> Result<JobRun, PipelineError> {
        let runner = Runner::open(self, spec, resume_after)?;
        Ok(JobRun {
            inner: Box::new(runner),
        })
    }
}

/// The pipelines this binary knows, by name.
#[derive(Clone)]
pub struct Registry {
    pipelines: Vec<Arc<dyn ErasedPipeline>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Registry {
    /// An empty registry (tests, or binaries that want none of the built-ins).
    pub fn empty() -> Self {
        Registry {
            pipelines: Vec::new(),
        }
    }

    /// The pipelines shipped with drover: `noop`, `payroll`, `sql` and `exec`.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(noop::Noop);
        r.register(payroll::Payroll);
        r.register(sql::Sql);
        r.register(exec::Exec);
        r
    }

    /// Adds a pipeline, replacing any registered under the same name.
    pub fn register<P: Pipeline>(&mut self, p: P) {
        let name = Pipeline::name(&p);
        self.pipelines.retain(|q| q.name() != name);
        self.pipelines.push(Arc::new(p));
    }

    /// Registered names, in registration order (for `drover pipelines` and logs).
    pub fn names(&self) -> Vec<&'static str> {
        self.pipelines.iter().map(|p| p.name()).collect()
    }

    /// A pipeline's self-description (`None` if it gives none); an error naming the known
    /// pipelines if `name` is not one.
    pub fn describe(&self, name: &str) -> Result<Option<Description>, PipelineError> {
        Ok(self.require(name)?.describe())
    }

    /// Where a job's output goes (`None` for a pipeline that writes none): the pipeline's
    /// own directory param, else `<output_root>/<pipeline>/<key path>/`. Nothing is created;
    /// `jobs show` and `drover run` use it to say where the output is.
    pub fn output_dir(&self, spec: &JobSpec) -> Result<Option<PathBuf>, PipelineError> {
        self.require(&spec.pipeline)?.output_dir(spec)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn get(&self, name: &str) -> Option<&Arc<dyn ErasedPipeline>> {
        self.pipelines.iter().find(|p| p.name() == name)
    }

    fn require(&self, name: &str) -> Result<&Arc<dyn ErasedPipeline>, PipelineError> {
        self.get(name).ok_or_else(|| {
            PipelineError::permanent(format!(
                "unknown pipeline \"{name}\" (known: {})",
                self.names().join(", ")
            ))
        })
    }

    /// Permanent error naming the field and value when params are invalid, or the pipeline
    /// unknown. Pure: safe to call where the job is published.
    pub fn validate(&self, pipeline: &str, params: &Value) -> Result<(), PipelineError> {
        self.require(pipeline)?.validate(params)
    }

    /// [`validate`](Registry::validate), then the pipeline's publish-time checks
    /// ([`Pipeline::preflight`]), which may read the input. Call it where a job is published
    /// or run by hand, not on every delivery.
    pub fn preflight(&self, pipeline: &str, params: &Value) -> Result<(), PipelineError> {
        self.require(pipeline)?.preflight(params)
    }

    /// The pipeline's own attempt limit, if it has one (else the configuration's applies).
    pub fn default_max_attempts(&self, pipeline: &str) -> Option<u32> {
        self.get(pipeline).and_then(|p| p.default_max_attempts())
    }

    /// Rows per batch of a job of `pipeline` whose message names no `batch_size` (the
    /// built-in default for an unknown pipeline).
    pub fn default_batch_size(&self, pipeline: &str) -> usize {
        self.get(pipeline)
            .map_or(DEFAULT_BATCH_SIZE, |p| p.default_batch_size())
    }

    /// A job's attempt limit: the message's, then the pipeline's default, then `fallback`
    /// (the worker's or producer's configuration).
    pub fn max_attempts_for(&self, msg: &drover_core::JobMessage, fallback: u32) -> u32 {
        msg.max_attempts
            .or_else(|| self.default_max_attempts(&msg.pipeline))
            .unwrap_or(fallback)
    }

    /// Opens a job for running; `resume_after` = number of batches already checkpointed
    /// (indexes `0..resume_after` are skipped without being decoded).
    pub fn open(&self, spec: &JobSpec, resume_after: u32) -> Result<JobRun, PipelineError> {
        self.require(&spec.pipeline)?
            .clone()
            .open(spec, resume_after)
    }
}

/// Object-safe view of a running job (hides the pipeline's associated types).
trait BatchRunner: Send {
    fn batch_size(&self) -> usize;
    fn identity(&self) -> &JobIdentity;
    fn batches_total(&self) -> Option<u32>;
    fn bytes_per_row(&self) -> Option<u64>;
    fn next_batch(&mut self) -> Result<Option<BatchOutcome>, PipelineError>;
    fn finish(self: Box<Self>, batches: &[BatchOutcome]) -> Result<Value, PipelineError>;
}

/// A job being run batch by batch. `Send`: the worker moves it into `spawn_blocking` for
/// each batch.
pub struct JobRun {
    inner: Box<dyn BatchRunner>,
}

impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRun")
            .field("batch_size", &self.batch_size())
            .field("batches_total", &self.batches_total())
            .finish()
    }
}

impl JobRun {
    /// Rows per batch for this job.
    pub fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    /// The job's identity as this open saw it: the pipeline's version and its inputs'
    /// fingerprints. The worker records it at the first attempt and, before a resumed
    /// attempt runs a batch, checks it with [`JobIdentity::check_resume`].
    pub fn identity(&self) -> &JobIdentity {
        self.inner.identity()
    }

    /// Batches in the whole job (including resumed ones), when the source can tell: Parquet
    /// from its footer, CSV by a scan of record boundaries at open, `noop` from its params.
    pub fn batches_total(&self) -> Option<u32> {
        self.inner.batches_total()
    }

    /// The most in-memory bytes per input row any batch of this run took so far: the batch's
    /// frame as read plus the frame it produced (polars' `estimated_size`), divided by its
    /// rows. `None` before a batch with rows. Frames only: buffers inside the pipeline (a
    /// child process of `exec`, polars' scratch space) are not counted.
    pub fn bytes_per_row(&self) -> Option<u64> {
        self.inner.bytes_per_row()
    }

    /// Reads, transforms and writes the next batch; `Ok(None)` when the input is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<BatchOutcome>, PipelineError> {
        self.inner.next_batch()
    }

    /// Merges every batch's summary (from this and earlier attempts, as recorded in the
    /// ledger) into the job's result JSON, and writes `_manifest.json` when the pipeline has
    /// output. `batches` must be exactly the job's batches `0..n` (any order) after
    /// [`next_batch`](JobRun::next_batch) returned `Ok(None)`.
    pub fn finish(self, batches: &[BatchOutcome]) -> Result<Value, PipelineError> {
        self.inner.finish(batches)
    }
}

/// The generic runner behind [`JobRun`].
struct Runner<P: Pipeline> {
    pipeline: Arc<P>,
    params: P::Params,
    reference: P::Reference,
    source: source::Source,
    /// The pipeline's version and the input's fingerprint, taken at open.
    identity: JobIdentity,
    /// The message's params, for the manifest.
    params_json: Value,
    /// The pipeline's output contract, checked on every batch before its part is written.
    schema: Option<OutputSchema>,
    /// Output directory, created at open; `None` when the pipeline writes nothing.
    out_dir: Option<PathBuf>,
    key: String,
    attempt: u32,
    batch_size: usize,
    resume_after: u32,
    /// Index of the next batch `next_batch` returns.
    next_index: u32,
    exhausted: bool,
    /// Batches read and transformed, oldest first, whose parts are being written on helper
    /// threads (at most [`WRITE_AHEAD`]); see `Runner::advance`.
    writing: VecDeque<Writing>,
    /// The source has no batch after the last one in `writing`.
    source_done: bool,
    /// Reading or transforming the batch after the last one in `writing` failed: returned
    /// once the batches before it are.
    prepare_failed: Option<PipelineError>,
    /// Most frame bytes per input row of a batch so far (see [`JobRun::bytes_per_row`]).
    bytes_per_row: Option<u64>,
    /// Set by the first error: the source may already be past the failed batch, so every
    /// later call returns the same error instead of a batch under the wrong index.
    failed: Option<PipelineError>,
}

/// Parts written at once, each on its own thread, while the runner's thread reads and
/// transforms the next batch. Encoding, hashing and the two fsyncs of a part take longer than
/// computing a batch, so one writer at a time would leave a core idle and the job paced by
/// fsync latency. Memory stays a constant number of batches.
const WRITE_AHEAD: usize = 3;

/// A batch whose part is being written.
struct Writing {
    index: u32,
    first_row: u64,
    rows: u64,
    rows_out: Option<u64>,
    summary: Summary,
    /// `None` when the batch has no output.
    part: Option<std::thread::JoinHandle<Result<(PathBuf, String), PipelineError>>>,
}

/// One batch read, transformed and summarised, its part not yet written.
struct Prepared {
    first_row: u64,
    rows: u64,
    rows_out: Option<u64>,
    out: Option<DataFrame>,
    summary: Summary,
}

impl<P: Pipeline> Runner<P> {
    fn open(pipeline: Arc<P>, spec: &JobSpec, resume_after: u32) -> Result<Self, PipelineError> {
        let name = pipeline.name();
        let params = pipeline.validate(&spec.params)?;
        let batch_size = spec
            .batch_size
            .unwrap_or_else(|| pipeline.default_batch_size());
        if batch_size == 0 {
            return Err(PipelineError::permanent(
                "batch_size: must be at least 1, got 0",
            ));
        }
        let input = pipeline.input(&params, spec)?;
        // Input and reference first: a job that cannot read its input leaves no directory.
        let source = source::Source::open(&input, batch_size, resume_after)?;
        let identity = JobIdentity {
            pipeline_version: pipeline.version(&params),
            inputs: vec![source.fingerprint().clone()],
        };
        let schema = pipeline.output_schema(&params);
        let reference = pipeline.load_reference(&params)?;
        let out_dir = match pipeline.output(&params) {
            Output::None => None,
            Output::Parquet { dir } => {
                let dir = default_dir(dir, &spec.output_root, name, &spec.key);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    PipelineError::transient(format!("output {}: {e}", dir.display()))
                })?;
                Some(std::fs::canonicalize(&dir).unwrap_or(dir))
            }
        };
        Ok(Runner {
            pipeline,
            params,
            reference,
            source,
            identity,
            params_json: spec.params.clone(),
            schema,
            out_dir,
            key: spec.key.clone(),
            attempt: spec.attempt,
            batch_size,
            resume_after,
            next_index: resume_after,
            exhausted: false,
            writing: VecDeque::new(),
            source_done: false,
            prepare_failed: None,
            bytes_per_row: None,
            failed: None,
        })
    }

    /// Reads, transforms and summarises the batch that will get index `index`.
    fn prepare(&mut self, index: u32) -> Result<Option<Prepared>, PipelineError> {
        let Some((first_row, batch)) = self.source.next_batch()? else {
            return Ok(None);
        };
        let ctx = BatchContext {
            index,
            first_row,
            attempt: self.attempt,
            first_in_attempt: index == self.resume_after,
            key: self.key.clone(),
            batches_total: self.source.batches_total(),
        };
        let rows = batch.height() as u64;
        let in_bytes = batch.estimated_size() as u64;
        let out = self
            .pipeline
            .transform(&self.params, &self.reference, batch, &ctx)?;
        if rows > 0 {
            let out_bytes = out.as_ref().map_or(0, |df| df.estimated_size() as u64);
            let per_row = (in_bytes + out_bytes).div_ceil(rows);
            self.bytes_per_row = Some(self.bytes_per_row.map_or(per_row, |b| b.max(per_row)));
        }
        if let (Some(schema), Some(df)) = (&self.schema, &out) {
            schema.check(self.pipeline.name(), index, df)?;
        }
        let rows_out = out.as_ref().map(|df| df.height() as u64);
        let summary = self
            .pipeline
            .summarise_batch(&self.params, rows, out.as_ref())?;
        if out.is_some() && self.out_dir.is_none() {
            return Err(PipelineError::permanent(format!(
                "pipeline {} returned output for batch {index} but declares Output::None",
                self.pipeline.name()
            )));
        }
        Ok(Some(Prepared {
            first_row,
            rows,
            rows_out,
            out,
            summary,
        }))
    }

    /// The next batch, its part written and durable (the caller checkpoints it next), or
    /// `None` at the end of the input.
    ///
    /// Keeps up to [`WRITE_AHEAD`] parts being written on helper threads: each call reads
    /// and transforms batches on this thread until that many are in flight, then waits for
    /// the oldest. An error reading or transforming a batch stops the read-ahead and is
    /// returned after the batches before it, so batches come back in order and an error
    /// surfaces when its batch is asked for.
    fn advance(&mut self) -> Result<Option<BatchOutcome>, PipelineError> {
        // Without output there is nothing to overlap: read one batch at a time.
        let ahead = if self.out_dir.is_some() {
            WRITE_AHEAD
        } else {
            1
        };
        while self.writing.len() < ahead && !self.source_done && self.prepare_failed.is_none() {
            let index = self.next_index + self.writing.len() as u32;
            match self.prepare(index) {
                Ok(None) => self.source_done = true,
                Ok(Some(Prepared {
                    first_row,
                    rows,
                    rows_out,
                    out,
                    summary,
                })) => {
                    let part = match (out, self.out_dir.clone()) {
                        (Some(mut df), Some(dir)) => Some(
                            std::thread::Builder::new()
                                .name(format!("drover-part-{index}"))
                                .spawn(move || sink::write_part(&dir, index, &mut df))
                                .map_err(|e| {
                                    PipelineError::transient(format!(
                                        "output: starting the writer of batch {index}: {e}"
                                    ))
                                })?,
                        ),
                        _ => None,
                    };
                    self.writing.push_back(Writing {
                        index,
                        first_row,
                        rows,
                        rows_out,
                        summary,
                        part,
                    });
                }
                Err(e) => self.prepare_failed = Some(e),
            }
        }
        let Some(w) = self.writing.pop_front() else {
            return match self.prepare_failed.take() {
                Some(e) => Err(e),
                None => {
                    self.exhausted = true;
                    Ok(None)
                }
            };
        };
        let (output, checksum) = match w.part {
            Some(handle) => {
                let (path, sum) = handle.join().unwrap_or_else(|_| {
                    Err(PipelineError::permanent(format!(
                        "output: writing the part of batch {} panicked",
                        w.index
                    )))
                })?;
                (Some(path.display().to_string()), Some(sum))
            }
            None => (None, None),
        };
        self.next_index += 1;
        Ok(Some(BatchOutcome {
            index: w.index,
            first_row: w.first_row,
            rows: w.rows,
            rows_out: w.rows_out,
            attempt: self.attempt,
            output,
            checksum,
            summary: w.summary,
        }))
    }
}

impl<P: Pipeline> Drop for Runner<P> {
    /// A job that stops early (error, cancellation, shutdown) waits for the parts still
    /// being written, so no writer outlives its job and none is cut off mid-file.
    fn drop(&mut self) {
        for w in self.writing.drain(..) {
            if let Some(handle) = w.part {
                let _ = handle.join();
            }
        }
    }
}

impl<P: Pipeline> BatchRunner for Runner<P> {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn identity(&self) -> &JobIdentity {
        &self.identity
    }

    fn batches_total(&self) -> Option<u32> {
        self.source.batches_total()
    }

    fn bytes_per_row(&self) -> Option<u64> {
        self.bytes_per_row
    }

    fn next_batch(&mut self) -> Result<Option<BatchOutcome>, PipelineError> {
        if let Some(e) = &self.failed {
            return Err(PipelineError {
                kind: e.kind,
                message: e.message.clone(),
            });
        }
        if self.exhausted {
            return Ok(None);
        }
        self.advance().inspect_err(|e| {
            self.failed = Some(PipelineError {
                kind: e.kind,
                message: e.message.clone(),
            });
        })
    }

    fn finish(self: Box<Self>, batches: &[BatchOutcome]) -> Result<Value, PipelineError> {
        if !self.exhausted {
            return Err(PipelineError::permanent(
                "finish called before the input was exhausted",
            ));
        }
        let mut sorted: Vec<BatchOutcome> = batches.to_vec();
        sorted.sort_by_key(|b| b.index);
        for (i, b) in sorted.iter().enumerate() {
            if b.index as usize != i {
                return Err(PipelineError::permanent(format!(
                    "recorded batches are not 0..{}: expected batch {i}, found {}",
                    sorted.len(),
                    b.index
                )));
            }
        }
        if sorted.len() != self.next_index as usize {
            return Err(PipelineError::permanent(format!(
                "{} batches recorded but the input has {} (did the input change between attempts?)",
                sorted.len(),
                self.next_index
            )));
        }
        let mut totals = Summary::new();
        for b in &sorted {
            for (k, v) in &b.summary {
                let t = totals.entry(k.clone()).or_insert(0);
                *t = t.checked_add(*v).ok_or_else(|| {
                    PipelineError::permanent(format!("summary \"{k}\" overflows i64"))
                })?;
            }
        }
        let mut result = self.pipeline.result(&totals, sorted.len() as u32);
        if let Some(dir) = &self.out_dir {
            let parts: Vec<PathBuf> = sorted
                .iter()
                .filter(|b| b.output.is_some())
                .map(|b| dir.join(sink::part_name(b.index)))
                .collect();
            let extra = self
                .pipeline
                .finalize(&self.params, &self.reference, dir, &parts)?;
            if let (Some(Value::Object(extra)), Value::Object(result)) = (extra, &mut result) {
                result.extend(extra);
            }
            let job = sink::ManifestJob {
                key: &self.key,
                pipeline: self.pipeline.name(),
                pipeline_version: &self.identity.pipeline_version,
                inputs: &self.identity.inputs,
                params: drover_core::config::redact_params(&self.params_json),
            };
            sink::write_manifest(dir, &job, &sorted, &result)?;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests;
