//! One attempt of a claimed job: batches on the blocking pool, checkpoints committed while
//! later batches compute, then success, retry or death.

use crate::delivery::dead_letter;
use crate::shared::{DbStop, Disposition, Shared};
use drover_broker::Incoming;
use drover_ledger::{BatchRecord, ClaimedJob, Completion, FailOutcome, HeldEnd, IdentityRecord};
use drover_pipeline::{
    BatchOutcome, JobIdentity, JobRun, JobSpec, PipelineError, RecordedIdentity, Registry,
};
use serde_json::Value;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{Instrument, debug, error, info, info_span, warn};

/// The transient error of an attempt that ran past its `timeout_secs`.
fn timed_out(secs: u64, batch: u32) -> PipelineError {
    PipelineError::transient(format!(
        "timeout: the attempt ran longer than its timeout_secs = {secs} s (stopped at batch {batch})"
    ))
}

/// Moves a value into the blocking pool for CPU/disk work and back. A panic in the
/// pipeline becomes a transient error instead of taking the worker down.
pub(crate) async fn blocking<T: Send + 'static, R: Send + 'static>(
    value: T,
    f: impl FnOnce(&mut T) -> Result<R, PipelineError> + Send + 'static,
) -> Result<(T, R), PipelineError> {
    let joined = tokio::task::spawn_blocking(move || {
        let mut v = value;
        let r = f(&mut v);
        r.map(|r| (v, r))
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err(PipelineError::transient(format!(
            "pipeline panicked: {}",
            panic_text(e)
        )))
    })
}

pub(crate) fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into()),
        Err(e) => e.to_string(),
    }
}

pub(crate) async fn run_attempt(
    shared: &Arc<Shared>,
    job: &ClaimedJob,
    cancel: &AtomicBool,
    delivery: &Incoming,
) -> Disposition {
    // Debug, not info: at thousands of jobs per second one info line per job is what an
    // operator can afford (`job succeeded`, or the failure), and it halves the logging cost.
    debug!(max_attempts = job.max_attempts, "attempt started");
    let spec = JobSpec {
        key: job.key.clone(),
        pipeline: job.pipeline.clone(),
        params: job.params.clone(),
        batch_size: job.batch_size.map(|b| b as usize),
        attempt: job.attempt as u32,
        output_root: shared.config.output_root.clone(),
    };
    let resume = job.batches_done.max(0) as u32;
    // A resumed attempt checks the job's identity (pipeline version, input fingerprints)
    // against what the first attempt recorded, before it runs a batch.
    let recorded = if resume > 0 {
        match shared
            .db("identity", || shared.ledger.identity(job.id))
            .await
        {
            Ok((pipeline_version, inputs)) => Some(RecordedIdentity {
                pipeline_version,
                inputs,
            }),
            Err(stop) => return stopped(shared, job, stop).await,
        }
    } else {
        None
    };
    // Opened by the first hop to the blocking pool, taken by the one that finishes.
    let mut slot = Slot {
        spec: Some(spec),
        run: None,
        recorded,
        resume,
    };
    // The input's batch count, known once the first hop opened it.
    let mut total: Option<i32> = None;
    let mut next_index = resume;
    // This attempt's batches: checkpointed, or computed and not yet checkpointed.
    let mut cps = Checkpoints::new(shared, job);
    // The message's timeout_secs: past it, the attempt fails as a transient error.
    let deadline = job
        .timeout_secs
        .and_then(|t| u64::try_from(t).ok())
        .map(|t| {
            (
                tokio::time::Instant::now() + std::time::Duration::from_secs(t),
                t,
            )
        });
    let result: Option<Value> = loop {
        if cancel.load(Ordering::SeqCst) {
            if let Err(stop) = cps.settle().await {
                return stopped_at_checkpoint(shared, job, stop).await;
            }
            info!("cancelled by operator at a batch boundary");
            shared.metrics.job(&job.pipeline, "cancelled");
            return end_held(
                shared,
                job,
                HeldEnd::Cancelled,
                "cancelled by operator",
                Disposition::Ack,
            )
            .await;
        }
        if shared.is_draining() {
            // Keep the work done: the next attempt resumes after it.
            if let Err(stop) = cps.flush(false, total).await {
                return stopped_at_checkpoint(shared, job, stop).await;
            }
            info!("shutting down: releasing the job at a batch boundary");
            shared.metrics.job(&job.pipeline, "released");
            return end_held(shared, job, HeldEnd::Released, "", Disposition::Requeue).await;
        }
        if let Some((at, secs)) = deadline
            && tokio::time::Instant::now() >= at
        {
            if let Err(stop) = cps.settle().await {
                return stopped_at_checkpoint(shared, job, stop).await;
            }
            return failed(shared, job, timed_out(secs, next_index), delivery).await;
        }
        // Checkpoints lag by at most a few batches: while Postgres is away, the job pauses
        // instead of running on with nothing recorded (and its lease unrenewed).
        if cps.pending.len() >= MAX_UNCHECKPOINTED
            && let Err(stop) = cps.settle().await
        {
            return stopped_at_checkpoint(shared, job, stop).await;
        }
        // When this hop may reach the end of the input, it also finishes the job (one hop
        // fewer), given every batch's outcome: all are in memory unless earlier attempts
        // did some.
        let may_end = resume == 0 && total.is_none_or(|t| next_index as i32 + 1 >= t);
        let finish_with: Option<Vec<BatchOutcome>> = may_end.then(|| cps.all());
        let batch_span = info_span!("batch", index = next_index, rows = tracing::field::Empty);
        let sh = shared.clone();
        let mut compute = pin!(
            blocking(slot, move |s| s.hop(&sh.registry, resume, finish_with))
                .instrument(batch_span.clone())
        );
        // Checkpoint what is ready while the batch computes; a commit still running when
        // it is done carries on under the next one.
        let computed = loop {
            cps.start(total);
            // A batch past the deadline is abandoned: it runs on to its end on its blocking
            // thread, and any part it writes has the bytes a retry writes for that batch.
            let expired = async {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let too_late = || Err(timed_out(deadline.map_or(0, |d| d.1), next_index));
            let Some(commit) = cps.commit.as_mut() else {
                tokio::select! {
                    computed = &mut compute => break computed,
                    _ = expired => break too_late(),
                }
            };
            let committed = tokio::select! {
                computed = &mut compute => Err(computed),
                committed = commit => Ok(committed),
                _ = expired => Err(too_late()),
            };
            match committed {
                Err(computed) => break computed,
                Ok(Ok(cancel_requested)) => {
                    cps.committed();
                    if cancel_requested {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
                Ok(Err(stop)) => {
                    // No writer outlives its job: let the batch finish before giving up.
                    let _ = compute.await;
                    return stopped_at_checkpoint(shared, job, stop).await;
                }
            }
        };
        let hop = match computed {
            Ok((s, mut hop)) => {
                slot = s;
                total = hop.total;
                if let Some(id) = hop.identity.take() {
                    cps.identity = Some(identity_record(&id));
                }
                hop
            }
            Err(e) => {
                if let Err(stop) = cps.settle().await {
                    return stopped_at_checkpoint(shared, job, stop).await;
                }
                return failed(shared, job, e, delivery).await;
            }
        };
        if let Some(per_row) = hop.bytes_per_row {
            shared.memory.learn(&job.pipeline, per_row);
        }
        for b in hop.batches {
            next_index = b.index + 1;
            batch_span.record("rows", b.rows);
            batch_span.in_scope(|| debug!(batch = b.index, rows = b.rows, "batch done"));
            cps.computed(b);
        }
        if hop.exhausted {
            break hop.result;
        }
    };
    // The last batch is checkpointed with the job's success; any before it first.
    if let Err(stop) = cps.flush(true, total).await {
        return stopped_at_checkpoint(shared, job, stop).await;
    }
    // Recorded with the success when no checkpoint of this attempt carried it.
    let identity = (!cps.identity_recorded)
        .then(|| cps.identity.clone())
        .flatten();
    let (done_here, final_batch) = cps.into_parts();
    let result = match result {
        Some(r) => r,
        None => {
            // Earlier attempts did some batches: their outcomes come from the ledger.
            let mut batches = match gather_batches(shared, job, resume, done_here).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return failed(shared, job, e, delivery).await,
                Err(stop) => return stopped(shared, job, stop).await,
            };
            if let Some(b) = &final_batch {
                batches.retain(|x| x.index != b.index);
                batches.push(b.clone());
            }
            let finished = blocking(slot, move |s| match s.run.take() {
                Some(run) => run.finish(&batches),
                None => Err(PipelineError::transient("job run already finished")),
            })
            .await;
            match finished {
                Ok((_, v)) => v,
                Err(e) => return failed(shared, job, e, delivery).await,
            }
        }
    };
    let completion = Completion {
        final_batch: final_batch.as_ref().map(record_of),
        batches_total: total,
        identity,
        ..Completion::of(job, result.clone())
    };
    match shared
        .db("complete", || shared.group.complete(completion.clone()))
        .await
    {
        Ok(Ok(())) => {
            if let Some(b) = &final_batch {
                shared.metrics.batch(&job.pipeline, b.rows);
            }
            shared.metrics.job(&job.pipeline, "succeeded");
            info!(result = %result, "job succeeded");
            Disposition::Ack
        }
        Ok(Err(lost)) => {
            warn!(error = %lost, "finished, but the lease was lost; the new owner records the outcome");
            Disposition::Ack
        }
        Err(stop) => stopped(shared, job, stop).await,
    }
}

/// A job's run as it moves to the blocking pool and back: opened by the first hop, consumed
/// by the hop that finishes it.
pub(crate) struct Slot {
    spec: Option<JobSpec>,
    run: Option<JobRun>,
    /// What the job's first attempt recorded, checked once the job is open (resumed
    /// attempts only).
    recorded: Option<RecordedIdentity>,
    /// Batches checkpointed before this attempt.
    resume: u32,
}

/// What one hop to the blocking pool did.
#[derive(Default)]
pub(crate) struct Hop {
    /// Usually one batch; none at the end of the input.
    batches: Vec<BatchOutcome>,
    /// The input is exhausted.
    exhausted: bool,
    /// The job's result, when the hop also finished the job.
    result: Option<Value>,
    /// The input's batch count, when known.
    total: Option<i32>,
    /// The job's identity, from the hop that opened it.
    identity: Option<JobIdentity>,
    /// The most frame bytes per row a batch of this run took so far (for
    /// `--memory-limit` estimates).
    bytes_per_row: Option<u64>,
}

impl Slot {
    /// Opens the job if not yet open, runs its next batch and, when that was the last
    /// batch the input announced, confirms the input is exhausted and (given every batch's
    /// outcome in `finish_with`) finishes the job: a single-batch job takes one hop, not
    /// three, which matters when thousands of tiny jobs run per second.
    fn hop(
        &mut self,
        registry: &Registry,
        resume: u32,
        finish_with: Option<Vec<BatchOutcome>>,
    ) -> Result<Hop, PipelineError> {
        let mut identity = None;
        if self.run.is_none() {
            let spec = self
                .spec
                .take()
                .ok_or_else(|| PipelineError::transient("job run already finished"))?;
            let run = registry.open(&spec, resume)?;
            // Before any batch: a changed input or pipeline version must not be resumed.
            if let Some(recorded) = self.recorded.take() {
                run.identity()
                    .check_resume(&spec.key, self.resume, &recorded)?;
            }
            identity = Some(run.identity().clone());
            self.run = Some(run);
        }
        let Some(run) = self.run.as_mut() else {
            return Err(PipelineError::transient("job run already finished"));
        };
        let total = run.batches_total().map(|t| t as i32);
        let mut hop = Hop {
            total,
            identity,
            ..Hop::default()
        };
        loop {
            match run.next_batch()? {
                None => {
                    hop.exhausted = true;
                    break;
                }
                Some(b) => {
                    let last = is_last(&b, total);
                    hop.batches.push(b);
                    if !last {
                        break;
                    }
                }
            }
        }
        hop.bytes_per_row = run.bytes_per_row();
        if hop.exhausted
            && let Some(mut all) = finish_with
            && let Some(run) = self.run.take()
        {
            all.extend(hop.batches.iter().cloned());
            hop.result = Some(run.finish(&all)?);
        }
        Ok(hop)
    }
}

/// Every batch outcome of the job: this attempt's, plus earlier attempts' from the ledger
/// when it resumed.
pub(crate) async fn gather_batches(
    shared: &Shared,
    job: &ClaimedJob,
    resume: u32,
    done_here: Vec<BatchOutcome>,
) -> Result<Result<Vec<BatchOutcome>, PipelineError>, DbStop> {
    if resume == 0 {
        return Ok(Ok(done_here));
    }
    let records = shared
        .db("checkpoints", || shared.ledger.checkpoints(job.id))
        .await?;
    let mut by_index: std::collections::BTreeMap<u32, BatchOutcome> =
        std::collections::BTreeMap::new();
    for r in records {
        // A summary the ledger cannot give back would make the job's totals wrong: the job
        // fails rather than succeeding with them.
        let summary = match serde_json::from_value(r.summary.0) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Err(PipelineError::permanent(format!(
                    "checkpoint of batch {} has a summary that is not a map of integers ({e}); the job's totals cannot be computed",
                    r.batch_index
                ))));
            }
        };
        let (Ok(index), Ok(rows)) = (u32::try_from(r.batch_index), u64::try_from(r.rows)) else {
            return Ok(Err(PipelineError::permanent(format!(
                "checkpoint of batch {} records {} rows: not a valid batch",
                r.batch_index, r.rows
            ))));
        };
        by_index.insert(
            index,
            BatchOutcome {
                index,
                first_row: r.first_row.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                rows,
                rows_out: r.rows_out.and_then(|n| u64::try_from(n).ok()),
                attempt: r.attempt.and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
                output: r.output,
                checksum: r.checksum,
                summary,
            },
        );
    }
    by_index.extend(done_here.into_iter().map(|b| (b.index, b)));
    Ok(Ok(by_index.into_values().collect()))
}

/// What a batch's checkpoint records in the ledger.
pub(crate) fn record_of(b: &BatchOutcome) -> BatchRecord {
    BatchRecord {
        batch_index: b.index as i32,
        rows: b.rows as i64,
        first_row: i64::try_from(b.first_row).ok(),
        rows_out: b.rows_out.and_then(|n| i64::try_from(n).ok()),
        attempt: i32::try_from(b.attempt).ok(),
        output: b.output.clone(),
        checksum: b.checksum.clone(),
        summary: sqlx::types::Json(Value::Object(
            b.summary
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
        )),
    }
}

/// What the ledger records of a job's identity.
fn identity_record(id: &JobIdentity) -> IdentityRecord {
    IdentityRecord {
        pipeline_version: id.pipeline_version.clone(),
        inputs: serde_json::to_value(&id.inputs).unwrap_or(Value::Null),
    }
}

/// Whether `b` is the last batch the input announced (`total` batches).
pub(crate) fn is_last(b: &BatchOutcome, total: Option<i32>) -> bool {
    total.is_some_and(|t| b.index as i32 + 1 >= t)
}

/// Why a job stopped at a checkpoint.
pub(crate) enum CheckpointStop {
    /// Another worker or an operator took the job: stop and ack (already logged).
    Lost,
    Db(DbStop),
}

/// The delivery's fate when a checkpoint stopped the job: ack after a lost lease (the new
/// owner records the outcome), else give the job back.
pub(crate) async fn stopped_at_checkpoint(
    shared: &Shared,
    job: &ClaimedJob,
    stop: CheckpointStop,
) -> Disposition {
    match stop {
        CheckpointStop::Lost => Disposition::Ack,
        CheckpointStop::Db(stop) => stopped(shared, job, stop).await,
    }
}

/// Batches an attempt computes ahead of its last checkpoint before it waits for one.
pub(crate) const MAX_UNCHECKPOINTED: usize = 8;

/// A commit of checkpoints under way: whether cancellation was requested, or why the job
/// must stop.
pub(crate) type Commit<'a> =
    Pin<Box<dyn Future<Output = Result<bool, CheckpointStop>> + Send + 'a>>;

/// An attempt's batches and their checkpoints. The pipeline does not wait for them: a
/// batch computes while the ones before it commit, and batches completed during a commit
/// are checkpointed together by the next one, so a checkpoint costs neither wall time nor,
/// when Postgres is slower than the pipeline, a transaction per batch. The job's last
/// batch is held back for the statement that records the job's success.
pub(crate) struct Checkpoints<'a> {
    shared: &'a Shared,
    job: &'a ClaimedJob,
    /// Checkpointed by this attempt (earlier attempts' are read back at the end).
    done: Vec<BatchOutcome>,
    /// Computed, not yet checkpointed, in order; the first `in_flight` are in `commit`.
    pending: Vec<BatchOutcome>,
    in_flight: usize,
    commit: Option<Commit<'a>>,
    /// The job's identity as this attempt opened it, recorded with its first checkpoint.
    identity: Option<IdentityRecord>,
    /// A commit of this attempt recorded `identity`.
    identity_recorded: bool,
    /// The commit under way carries `identity`.
    identity_in_flight: bool,
}

impl<'a> Checkpoints<'a> {
    fn new(shared: &'a Shared, job: &'a ClaimedJob) -> Self {
        Checkpoints {
            shared,
            job,
            done: Vec::new(),
            pending: Vec::new(),
            in_flight: 0,
            commit: None,
            identity: None,
            identity_recorded: false,
            identity_in_flight: false,
        }
    }

    /// Every batch of this attempt, checkpointed or not.
    fn all(&self) -> Vec<BatchOutcome> {
        self.done.iter().chain(&self.pending).cloned().collect()
    }

    fn computed(&mut self, b: BatchOutcome) {
        self.pending.push(b);
    }

    /// Starts committing the pending batches, except the input's announced last one, unless
    /// a commit is already under way.
    fn start(&mut self, total: Option<i32>) {
        let held = usize::from(self.pending.last().is_some_and(|b| is_last(b, total)));
        self.start_first(self.pending.len() - held, total);
    }

    fn start_first(&mut self, n: usize, total: Option<i32>) {
        if self.commit.is_some() || n == 0 {
            return;
        }
        self.in_flight = n;
        let records: Vec<BatchRecord> = self.pending[..n].iter().map(record_of).collect();
        let (shared, job) = (self.shared, self.job);
        let identity = if self.identity_recorded {
            None
        } else {
            self.identity.clone()
        };
        self.identity_in_flight = identity.is_some();
        self.commit = Some(Box::pin(checkpoint(shared, job, records, total, identity)));
    }

    /// The commit under way succeeded.
    fn committed(&mut self) {
        self.commit = None;
        self.identity_recorded |= self.identity_in_flight;
        self.done.extend(self.pending.drain(..self.in_flight));
        self.in_flight = 0;
    }

    /// Waits for the commit under way, if any.
    async fn settle(&mut self) -> Result<(), CheckpointStop> {
        if let Some(commit) = self.commit.as_mut() {
            commit.await?;
            self.committed();
        }
        Ok(())
    }

    /// Checkpoints every pending batch, or all but the last with `keep_last`.
    async fn flush(&mut self, keep_last: bool, total: Option<i32>) -> Result<(), CheckpointStop> {
        self.settle().await?;
        let n = self.pending.len().saturating_sub(usize::from(keep_last));
        self.start_first(n, total);
        self.settle().await
    }

    /// The checkpointed batches and the one left pending (after `flush(true, ..)`).
    fn into_parts(mut self) -> (Vec<BatchOutcome>, Option<BatchOutcome>) {
        let last = self.pending.pop();
        (self.done, last)
    }
}

/// Checkpoints consecutive batches in one transaction (renewing the lease); returns whether
/// cancellation was requested.
pub(crate) async fn checkpoint(
    shared: &Shared,
    job: &ClaimedJob,
    records: Vec<BatchRecord>,
    total: Option<i32>,
    identity: Option<IdentityRecord>,
) -> Result<bool, CheckpointStop> {
    let worker = shared.config.worker_id.as_str();
    match shared
        .db("checkpoint", || {
            shared
                .ledger
                .checkpoint_batches_with(job, worker, &records, total, identity.as_ref())
        })
        .await
    {
        Ok(Ok(cancel_requested)) => {
            for r in &records {
                shared.metrics.batch(&job.pipeline, r.rows as u64);
            }
            Ok(cancel_requested)
        }
        Ok(Err(lost)) => {
            let batch = records.first().map(|r| r.batch_index);
            warn!(error = %lost, batch, "stopping: lease lost");
            Err(CheckpointStop::Lost)
        }
        Err(stop) => Err(CheckpointStop::Db(stop)),
    }
}

/// A ledger call was abandoned mid-job (shutdown during a Postgres outage, or a query error):
/// give the delivery back; the lease expires or the release below frees the job.
pub(crate) async fn stopped(shared: &Shared, job: &ClaimedJob, stop: DbStop) -> Disposition {
    if let DbStop::Failed(e) = &stop {
        error!(error = %e, "ledger error mid-job; requeueing");
    }
    let _ = shared
        .ledger
        .finish_held(job, &shared.config.worker_id, HeldEnd::Released, "")
        .await;
    Disposition::Requeue
}

pub(crate) async fn end_held(
    shared: &Shared,
    job: &ClaimedJob,
    end: HeldEnd,
    note: &str,
    d: Disposition,
) -> Disposition {
    match shared
        .db("finish_held", || {
            shared
                .ledger
                .finish_held(job, &shared.config.worker_id, end, note)
        })
        .await
    {
        Ok(_) => d,
        Err(stop) => stopped(shared, job, stop).await,
    }
}

/// Records a failed attempt and copies dead jobs to the dead-letter queue.
pub(crate) async fn failed(
    shared: &Shared,
    job: &ClaimedJob,
    e: PipelineError,
    delivery: &Incoming,
) -> Disposition {
    let kind = e.kind;
    let text = e.message.clone();
    let outcome = shared
        .db("fail", || {
            shared.ledger.fail(
                job,
                &shared.config.worker_id,
                kind,
                &text,
                &shared.config.retry,
            )
        })
        .await;
    match outcome {
        Ok(FailOutcome::Retrying {
            run_at,
            delay,
            envelope,
        }) => {
            shared.metrics.job(&job.pipeline, "retried");
            warn!(error_kind = %kind, error = %text, retry_in_ms = delay.as_millis() as u64, envelope_ms = envelope.as_millis() as u64, run_at = %run_at, "attempt failed; retry scheduled");
            Disposition::Ack
        }
        Ok(FailOutcome::Dead { reason }) => {
            shared.metrics.job(&job.pipeline, "dead");
            error!(error_kind = %kind, error = %text, "job dead: {reason}");
            dead_letter(
                shared,
                &delivery.body,
                delivery.message_id.as_deref(),
                Some(&job.key),
                &reason,
            )
            .await;
            Disposition::Ack
        }
        Ok(FailOutcome::LeaseLost) => {
            warn!(error = %text, "attempt failed after the lease was lost; not recorded");
            Disposition::Ack
        }
        Err(stop) => stopped(shared, job, stop).await,
    }
}
