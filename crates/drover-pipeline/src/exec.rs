//! The `exec` pipeline: each batch goes through a child process written in any language,
//! which speaks protocol v1 (documented for child authors in `docs/pipelines.md`).
//!
//! Params (unknown params are an error):
//!
//! | param | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `command` | array of strings, non-empty | required | argv of the child (`argv[0]` is looked up on `PATH`) |
//! | `input` | string | required | Parquet or CSV file read in batches |
//! | `env` | object of strings | `{}` | extra environment for the child |
//! | `batch_timeout_secs` | integer >= 1 | 300 | longest a batch may take, from its first input byte to its last output byte |
//!
//! The child is started once per attempt, on the attempt's first batch, with environment
//! `DROVER_PROTOCOL=1`, `DROVER_JOB_KEY`, `DROVER_ATTEMPT`, `DROVER_PARAMS` (the params as
//! JSON) plus `env`; it inherits the worker's environment except drover's own settings
//! (every `DROVER_*` variable and `DATABASE_URL*`, which carry credentials). For each batch
//! drover writes one complete Arrow IPC stream to its stdin and reads one complete Arrow IPC
//! stream (the batch's output, written as the batch's Parquet part like any pipeline's)
//! from its stdout. After the last batch of the input drover closes stdin and the child must
//! exit 0 with nothing more on stdout; that check belongs to the last batch, so a child that
//! fails there fails that batch and a retry redoes it.
//!
//! Failures: exit code 75 (`EX_TEMPFAIL`) is transient, any other non-zero exit permanent,
//! with the child's last stderr line as the message. A batch over `batch_timeout_secs`
//! kills the child (transient). Output that is not an Arrow IPC stream, a child that exits
//! 0 before answering a batch, or extra output, is a permanent protocol error naming the
//! batch. Every stderr line is logged with the job's key.
//!
//! Threads, so a misbehaving child can never block the worker: one writes the batch to
//! stdin, one reads the answer from stdout, one drains stderr (a child writing lots of
//! stderr would otherwise fill the pipe and stall); the batch waits on them with a
//! deadline. When a run stops early (cancel, drain, an error), dropping it closes stdin,
//! sends SIGTERM, and SIGKILLs the child after 5 s on a reaper thread.

use crate::{BatchContext, Input, JobSpec, ParamReader, Pipeline, PipelineError, Summary};
use polars::prelude::{
    CompatLevel, DataFrame, IpcStreamReader, IpcStreamWriter, SerReader, SerWriter,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `batch_timeout_secs` when the message does not say.
pub const DEFAULT_BATCH_TIMEOUT_SECS: u64 = 300;

/// Exit code with which a child says "try again later" (`EX_TEMPFAIL` from sysexits.h).
pub const EX_TEMPFAIL: i32 = 75;

/// Time a stopped run's child gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// Protocol version announced in `DROVER_PROTOCOL`.
pub const PROTOCOL_VERSION: &str = "1";

/// Environment variables drover sets for the child; `env` may not override them.
const PROTOCOL_VARS: [&str; 4] = [
    "DROVER_PROTOCOL",
    "DROVER_JOB_KEY",
    "DROVER_ATTEMPT",
    "DROVER_PARAMS",
];

/// Longest stderr line kept whole (longer ones are logged in pieces), so a child writing
/// without newlines cannot grow the worker's memory.
const MAX_STDERR_LINE: u64 = 4096;

/// After the child's stdout failed, how long to wait for it to exit, so a crash is reported
/// by its exit code and last stderr line rather than as a truncated stream.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The `exec` pipeline (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Exec;

/// Validated `exec` params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecParams {
    /// The child's argv; never empty.
    pub command: Vec<String>,
    /// Parquet or CSV input.
    pub input: PathBuf,
    /// Extra environment for the child.
    pub env: BTreeMap<String, String>,
    /// Longest a batch may take before the child is killed.
    pub batch_timeout: Duration,
    /// The params as JSON, passed to the child as `DROVER_PARAMS`.
    pub params_json: String,
}

/// The attempt's child, started on the attempt's first batch (the only place that knows the
/// key and attempt number) and finished on its last; dropping it stops a child still running.
#[derive(Default)]
pub struct ExecChild {
    state: Mutex<Option<Running>>,
}

impl std::fmt::Debug for ExecChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.as_ref().and_then(|r| r.child.as_ref().map(Child::id)));
        f.debug_struct("ExecChild").field("pid", &pid).finish()
    }
}

impl Pipeline for Exec {
    type Params = ExecParams;
    type Reference = ExecChild;

    fn name(&self) -> &'static str {
        "exec"
    }

    fn validate(&self, params: &Value) -> Result<ExecParams, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let command = match r.optional_value("command") {
            None => {
                return Err(PipelineError::permanent(
                    "exec: param \"command\" is required (an argv array such as [\"python3\", \"child.py\"])",
                ));
            }
            Some(v) => command_of(v)?,
        };
        let input = PathBuf::from(r.required_str("input")?);
        let env = match r.optional_value("env") {
            None => BTreeMap::new(),
            Some(v) => env_of(v)?,
        };
        let secs = r
            .optional_u64("batch_timeout_secs", 1, 7 * 24 * 3600)?
            .unwrap_or(DEFAULT_BATCH_TIMEOUT_SECS);
        r.finish()?;
        Ok(ExecParams {
            command,
            input,
            env,
            batch_timeout: Duration::from_secs(secs),
            params_json: params.to_string(),
        })
    }

    /// The child's program is the formula: the version is a SHA-256 over the command's
    /// words and the content of every word that names a file (the script, typically), so
    /// an edited script between two attempts is a different version. A word that names no
    /// file (an interpreter found on PATH, a flag) counts by its text.
    fn version(&self, params: &ExecParams) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for word in &params.command {
            h.update(word.as_bytes());
            h.update([0]);
            let path = std::path::Path::new(word);
            if path.is_file()
                && let Ok((sum, _)) = crate::verify::hash_file(path)
            {
                h.update(sum.as_bytes());
            }
            h.update([0]);
        }
        format!("exec-{}", &hex::encode(h.finalize())[..16])
    }

    fn input(&self, params: &ExecParams, _spec: &JobSpec) -> Result<Input, PipelineError> {
        Ok(Input::file(&params.input))
    }

    fn load_reference(&self, _params: &ExecParams) -> Result<ExecChild, PipelineError> {
        Ok(ExecChild::default())
    }

    fn transform(
        &self,
        params: &ExecParams,
        child: &ExecChild,
        batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError> {
        let Some(total) = ctx.batches_total else {
            return Err(PipelineError::permanent(format!(
                "exec: batch {}: the input's batch count is unknown, so the child could not be told when it ends",
                ctx.index
            )));
        };
        let mut state = child
            .state
            .lock()
            .map_err(|_| PipelineError::transient("exec: the child's state was poisoned"))?;
        if state.is_none() {
            *state = Some(Running::start(params, ctx)?);
        }
        let Some(running) = state.as_mut() else {
            return Err(PipelineError::transient("exec: the child is not running"));
        };
        let out = running.batch(batch, ctx.index, params.batch_timeout)?;
        if ctx.index + 1 >= total {
            running.end(ctx.index, params.batch_timeout)?;
        }
        Ok(Some(out))
    }

    fn summarise(&self, rows: u64, output: Option<&DataFrame>) -> Result<Summary, PipelineError> {
        let out = output.map_or(0, |df| df.height());
        let count = |name: &str, n: u64| {
            i64::try_from(n).map_err(|_| {
                PipelineError::permanent(format!(
                    "exec: summary \"{name}\": {n} does not fit in i64"
                ))
            })
        };
        Ok(Summary::from([
            ("rows".to_string(), count("rows", rows)?),
            ("rows_out".to_string(), count("rows_out", out as u64)?),
        ]))
    }
}

/// `command`: a non-empty array of strings, the first non-empty, none containing NUL.
fn command_of(v: &Value) -> Result<Vec<String>, PipelineError> {
    let bad = |why: &str| {
        PipelineError::permanent(format!(
            "exec: param \"command\": expected a non-empty array of strings ({why}), got {v}"
        ))
    };
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut argv = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if s.contains('\0') => {
                return Err(bad(&format!("element {i} contains a NUL byte")));
            }
            Value::String(s) => argv.push(s.clone()),
            other => return Err(bad(&format!("element {i} is {other}, not a string"))),
        }
    }
    match argv.first() {
        None => Err(bad("it is empty")),
        Some(program) if program.trim().is_empty() => Err(bad("the program name is empty")),
        Some(_) => Ok(argv),
    }
}

/// `env`: an object whose values are strings; names must be usable as variable names and
/// must not replace the protocol's own variables.
fn env_of(v: &Value) -> Result<BTreeMap<String, String>, PipelineError> {
    let Value::Object(map) = v else {
        return Err(PipelineError::permanent(format!(
            "exec: param \"env\": expected an object of strings, got {v}"
        )));
    };
    let mut env = BTreeMap::new();
    for (name, value) in map {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(PipelineError::permanent(format!(
                "exec: param \"env\": invalid variable name \"{name}\" (empty, or contains '=' or NUL)"
            )));
        }
        if PROTOCOL_VARS.contains(&name.as_str()) {
            return Err(PipelineError::permanent(format!(
                "exec: param \"env\": \"{name}\" is set by drover (protocol v1) and cannot be overridden"
            )));
        }
        match value {
            Value::String(s) if !s.contains('\0') => {
                env.insert(name.clone(), s.clone());
            }
            other => {
                return Err(PipelineError::permanent(format!(
                    "exec: param \"env\": \"{name}\": expected a string, got {other}"
                )));
            }
        }
    }
    Ok(env)
}

/// Whether the worker's variable `name` is one of drover's own settings, which the child
/// must not inherit (they carry the broker's and the ledger's credentials).
fn is_drover_setting(name: &str) -> bool {
    name.starts_with("DROVER_") || name.starts_with("DATABASE_URL")
}

/// What the stdout thread read for one request.
enum Answer {
    /// One complete stream.
    Frame(DataFrame),
    /// stdout ended before a stream started: the child closed it (usually: exited).
    Eof,
    /// Not a valid or complete Arrow IPC stream.
    Invalid(String),
    /// After the last batch: bytes the child wrote beyond its last answer.
    Trailing(u64),
}

/// Requests to the stdout thread.
enum ReadRequest {
    /// Read one stream.
    Stream,
    /// Read to end of file and count what is left.
    Rest,
}

/// The last stderr line and whether stderr has ended, shared with the stderr thread.
#[derive(Default)]
struct StderrTail {
    last: Option<String>,
}

/// A started child and its three pipe threads.
struct Running {
    /// `None` only once `Drop` handed it to the reaper thread.
    child: Option<Child>,
    key: String,
    /// `argv[0]`, for messages.
    program: String,
    /// Batches to write to stdin; dropping it makes the stdin thread close stdin.
    to_stdin: Option<Sender<DataFrame>>,
    /// One result per batch written.
    written: Receiver<io::Result<()>>,
    to_stdout: Sender<ReadRequest>,
    answers: Receiver<Answer>,
    stderr_tail: Arc<Mutex<StderrTail>>,
    /// Disconnected once the stderr thread saw end of file.
    stderr_done: Receiver<()>,
    /// Set once the child has been waited for (its exit checked, or killed and reaped).
    exited: bool,
}

impl Running {
    fn start(params: &ExecParams, ctx: &BatchContext) -> Result<Running, PipelineError> {
        let program = params.command[0].clone();
        let mut cmd = Command::new(&program);
        cmd.args(&params.command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C meant for the worker must not kill the child
            // mid-batch; the worker stops it itself (close stdin, SIGTERM, SIGKILL).
            .process_group(0);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_none_or(is_drover_setting) {
                cmd.env_remove(&name);
            }
        }
        cmd.envs(&params.env)
            .env("DROVER_PROTOCOL", PROTOCOL_VERSION)
            .env("DROVER_JOB_KEY", &ctx.key)
            .env("DROVER_ATTEMPT", ctx.attempt.to_string())
            .env("DROVER_PARAMS", &params.params_json);
        let mut child = cmd.spawn().map_err(|e| {
            let msg = format!(
                "exec: batch {}: param \"command\": cannot start {:?}: {e}",
                ctx.index, params.command
            );
            match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                    PipelineError::permanent(msg)
                }
                _ => PipelineError::transient(msg),
            }
        })?;
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PipelineError::transient(
                "exec: the child's pipes were not set up",
            ));
        };
        let pid = child.id();
        tracing::info!(key = %ctx.key, attempt = ctx.attempt, pid, command = ?params.command, "exec child started");
        let (to_stdin, stdin_rx) = mpsc::channel::<DataFrame>();
        let (written_tx, written) = mpsc::channel();
        let (to_stdout, stdout_rx) = mpsc::channel::<ReadRequest>();
        let (answers_tx, answers) = mpsc::channel();
        let stderr_tail = Arc::new(Mutex::new(StderrTail::default()));
        let (stderr_done_tx, stderr_done) = mpsc::channel::<()>();
        let started = (|| -> io::Result<()> {
            std::thread::Builder::new()
                .name(format!("exec-stdin-{pid}"))
                .spawn(move || write_batches(stdin, stdin_rx, written_tx))?;
            std::thread::Builder::new()
                .name(format!("exec-stdout-{pid}"))
                .spawn(move || read_answers(stdout, stdout_rx, answers_tx))?;
            let (tail, key) = (stderr_tail.clone(), ctx.key.clone());
            std::thread::Builder::new()
                .name(format!("exec-stderr-{pid}"))
                .spawn(move || {
                    drain_stderr(stderr, &key, pid, &tail);
                    drop(stderr_done_tx);
                })?;
            Ok(())
        })();
        let mut running = Running {
            child: Some(child),
            key: ctx.key.clone(),
            program,
            to_stdin: Some(to_stdin),
            written,
            to_stdout,
            answers,
            stderr_tail,
            stderr_done,
            exited: false,
        };
        if let Err(e) = started {
            running.kill();
            return Err(PipelineError::transient(format!(
                "exec: starting the child's pipe threads: {e}"
            )));
        }
        Ok(running)
    }

    /// Sends batch `index` and waits, until `timeout`, for its answer.
    fn batch(
        &mut self,
        batch: DataFrame,
        index: u32,
        timeout: Duration,
    ) -> Result<DataFrame, PipelineError> {
        let deadline = Instant::now() + timeout;
        // Ask for the answer first: a child may stream its output while it reads its input,
        // and would stall on a full stdout pipe if nobody read it.
        if self.to_stdout.send(ReadRequest::Stream).is_err() {
            return Err(self.broken(index, "its stdout reader stopped"));
        }
        let sent = self.to_stdin.as_ref().map(|tx| tx.send(batch).is_ok());
        if sent != Some(true) {
            return Err(self.broken(index, "its stdin writer stopped"));
        }
        let answer = match self.answers.recv_timeout(left(deadline)) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => return Err(self.timed_out(index, timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(self.broken(index, "its stdout reader stopped"));
            }
        };
        let frame = match answer {
            Answer::Frame(df) => df,
            Answer::Eof => {
                return Err(self.failed(index, "closed stdout without answering the batch"));
            }
            Answer::Invalid(e) => {
                return Err(self.failed(
                    index,
                    &format!(
                        "answered with something that is not an Arrow IPC stream: {e} (logs belong on stderr)"
                    ),
                ));
            }
            Answer::Trailing(_) => return Err(self.broken(index, "its stdout reader is confused")),
        };
        // The answer is complete, so the input was most likely read in full; a child that
        // answered without reading it would leave the writer blocked until the deadline.
        match self.written.recv_timeout(left(deadline)) {
            Ok(Ok(())) => Ok(frame),
            Ok(Err(e)) => Err(self.failed(index, &format!("did not read its input ({e})"))),
            Err(RecvTimeoutError::Timeout) => Err(self.timed_out(index, timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.broken(index, "its stdin writer stopped"))
            }
        }
    }

    /// After the last batch (`index`): closes stdin, waits for the child to exit, and checks
    /// it exited 0 with nothing more on stdout.
    fn end(&mut self, index: u32, timeout: Duration) -> Result<(), PipelineError> {
        let deadline = Instant::now() + timeout;
        self.to_stdin = None;
        let status = match self.wait_until(deadline) {
            Some(status) => status,
            None => {
                self.kill();
                return Err(PipelineError::transient(format!(
                    "exec: batch {index}: {} did not exit within batch_timeout_secs={} after its stdin was closed (the last batch); child killed",
                    self.program,
                    timeout.as_secs()
                )));
            }
        };
        if !status.success() {
            return Err(self.exit_error(index, status));
        }
        let trailing = self
            .to_stdout
            .send(ReadRequest::Rest)
            .ok()
            .and_then(|()| self.answers.recv_timeout(left(deadline)).ok());
        match trailing {
            Some(Answer::Trailing(0)) => Ok(()),
            Some(Answer::Trailing(n)) => Err(PipelineError::permanent(format!(
                "exec: batch {index}: {} wrote {n} bytes after its answer to the last batch (protocol v1: exactly one Arrow IPC stream per batch)",
                self.program
            ))),
            _ => Err(PipelineError::transient(format!(
                "exec: batch {index}: {} exited 0 but its stdout did not end within batch_timeout_secs={} (a process it started still holds it?)",
                self.program,
                timeout.as_secs()
            ))),
        }
    }

    /// The batch failed on the child's side: let the child exit (so its exit code and last
    /// stderr line explain it), or kill it, and describe the failure.
    fn failed(&mut self, index: u32, what: &str) -> PipelineError {
        self.to_stdin = None;
        match self.wait_until(Instant::now() + EXIT_GRACE) {
            Some(status) if !status.success() => self.exit_error(index, status),
            Some(_) => PipelineError::permanent(format!(
                "exec: batch {index}: {} {what}, then exited 0 (protocol v1: one Arrow IPC stream on stdout per batch, before the next batch is sent)",
                self.program
            )),
            None => {
                self.kill();
                PipelineError::permanent(format!(
                    "exec: batch {index}: {} {what}; child killed",
                    self.program
                ))
            }
        }
    }

    /// A pipe thread is gone (it cannot be restarted): stop the child.
    fn broken(&mut self, index: u32, what: &str) -> PipelineError {
        self.failed(index, &format!("cannot be talked to: {what}"))
    }

    fn timed_out(&mut self, index: u32, timeout: Duration) -> PipelineError {
        self.kill();
        PipelineError::transient(format!(
            "exec: batch {index}: {} did not answer within batch_timeout_secs={}; child killed",
            self.program,
            timeout.as_secs()
        ))
    }

    /// Classifies a non-zero exit: 75 transient, other codes permanent; a kill by SIGKILL,
    /// SIGTERM or SIGINT came from outside the child (the OOM killer, an operator) and is
    /// transient, other signals (SIGSEGV, SIGABRT) are crashes and permanent.
    fn exit_error(&mut self, index: u32, status: ExitStatus) -> PipelineError {
        let last = self.last_stderr_line();
        let (transient, how) = match (status.code(), status.signal()) {
            (Some(code), _) => (code == EX_TEMPFAIL, format!("exited with code {code}")),
            (None, Some(sig)) => (
                matches!(sig, libc::SIGKILL | libc::SIGTERM | libc::SIGINT),
                format!("was killed by signal {sig}"),
            ),
            (None, None) => (false, format!("ended with {status}")),
        };
        let msg = format!(
            "{last} (exec: batch {index}: {} {how})",
            self.program,
            last = last.as_deref().unwrap_or("(no stderr output)")
        );
        if transient {
            PipelineError::transient(msg)
        } else {
            PipelineError::permanent(msg)
        }
    }

    /// The child's last non-empty stderr line, once its stderr has ended (bounded: a
    /// process the child started may keep the pipe open).
    fn last_stderr_line(&self) -> Option<String> {
        let _ = self.stderr_done.recv_timeout(EXIT_GRACE);
        self.stderr_tail.lock().ok().and_then(|t| t.last.clone())
    }

    /// Waits for the child's exit until `deadline`; `None` if it is still running.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = true;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    // std offers no exit event to wait on with a deadline; poll briefly.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// SIGKILL and reap (a killed child exits at once).
    fn kill(&mut self) {
        self.to_stdin = None;
        if !self.exited
            && let Some(child) = self.child.as_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
            self.exited = true;
        }
    }
}

impl Drop for Running {
    /// A run dropped with its child still running (cancel, drain, an error elsewhere):
    /// close stdin, SIGTERM, and SIGKILL after [`TERM_GRACE`]. The wait happens on a reaper
    /// thread, since the worker may drop the run on an async task.
    fn drop(&mut self) {
        self.to_stdin = None;
        let Some(child) = self.child.as_mut().filter(|_| !self.exited) else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        terminate(pid);
        tracing::info!(key = %self.key, pid, "exec child stopped early: stdin closed, SIGTERM sent");
        let key = self.key.clone();
        let Some(child) = self.child.take() else {
            return;
        };
        let reap = move || {
            let mut child = child;
            let deadline = Instant::now() + TERM_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => break,
                }
            }
            tracing::warn!(key = %key, pid, "exec child ignored SIGTERM for 5 s: SIGKILL");
            let _ = child.kill();
            let _ = child.wait();
        };
        if std::thread::Builder::new()
            .name(format!("exec-reap-{pid}"))
            .spawn(reap)
            .is_err()
        {
            tracing::warn!(
                pid,
                "exec: no reaper thread; the child is left to exit on SIGTERM"
            );
        }
    }
}

/// Sends SIGTERM to `pid` (std only offers SIGKILL).
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory; `pid` is our own child,
    // not yet reaped, so the number cannot have been reused by another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Time left until `deadline` (zero once past).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The stdin thread: writes each batch as one complete Arrow IPC stream (uncompressed, the
/// oldest compatibility level: plain and large strings rather than string views, which every
/// Arrow implementation reads). Ends, closing stdin, when the sender is dropped.
fn write_batches(stdin: ChildStdin, batches: Receiver<DataFrame>, written: Sender<io::Result<()>>) {
    let mut out = BufWriter::with_capacity(1 << 16, stdin);
    for mut df in batches {
        let r = IpcStreamWriter::new(&mut out)
            .with_compat_level(CompatLevel::oldest())
            .finish(&mut df)
            .map_err(io::Error::other)
            .and_then(|()| out.flush());
        let failed = r.is_err();
        if written.send(r).is_err() || failed {
            return;
        }
    }
}

/// The stdout thread: reads one stream per request, so the child's answers are matched to
/// batches one for one.
fn read_answers(stdout: ChildStdout, requests: Receiver<ReadRequest>, answers: Sender<Answer>) {
    let mut input = BufReader::with_capacity(1 << 16, stdout);
    for request in requests {
        let answer = match request {
            ReadRequest::Stream => read_stream(&mut input),
            ReadRequest::Rest => match io::copy(&mut input, &mut io::sink()) {
                Ok(n) => Answer::Trailing(n),
                Err(e) => Answer::Invalid(e.to_string()),
            },
        };
        let stop = matches!(answer, Answer::Eof | Answer::Invalid(_));
        if answers.send(answer).is_err() || stop {
            return;
        }
    }
}

/// Longest schema message accepted at the start of an answer: a sanity bound, so text
/// printed to stdout by mistake is reported at once instead of read as a huge length.
const MAX_SCHEMA_BYTES: i32 = 16 << 20;

/// One complete stream from the child's stdout: schema, record batches, end-of-stream
/// marker. End of file before the marker is an incomplete answer.
fn read_stream(input: &mut BufReader<ChildStdout>) -> Answer {
    match input.fill_buf() {
        Ok([]) => return Answer::Eof,
        Ok(_) => {}
        Err(e) => return Answer::Invalid(e.to_string()),
    }
    // Every current Arrow writer starts a message with the continuation marker, then the
    // metadata length; check both before trusting the length.
    let mut head = [0u8; 8];
    if let Err(e) = input.read_exact(&mut head) {
        return Answer::Invalid(format!("the answer ended after a few bytes ({e})"));
    }
    let len = i32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if head[..4] != [0xff; 4] || !(1..=MAX_SCHEMA_BYTES).contains(&len) {
        return Answer::Invalid(format!(
            "it starts with b\"{}\", not an Arrow IPC continuation marker and schema length",
            head.escape_ascii()
        ));
    }
    let mut stream = ForwardOnly {
        inner: io::Cursor::new(head).chain(input),
        pos: 0,
        eof: false,
    };
    match IpcStreamReader::new(&mut stream).finish() {
        Ok(_) if stream.eof => Answer::Invalid(
            "the stream ended without its end-of-stream marker (the child closed stdout mid-answer)"
                .into(),
        ),
        Ok(df) => Answer::Frame(df),
        Err(e) => Answer::Invalid(e.to_string()),
    }
}

/// A pipe as the forward-only `Read + Seek` polars' IPC stream reader needs: it asks for its
/// position and skips ahead, which reading and discarding does on a pipe. Remembers whether
/// the pipe hit end of file, which the reader itself treats as a normal end of stream.
struct ForwardOnly<R> {
    inner: R,
    pos: u64,
    eof: bool,
}

impl<R: Read> Read for ForwardOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> Seek for ForwardOnly<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) if p >= self.pos => p,
            SeekFrom::Current(d) if d >= 0 => self.pos + d.unsigned_abs(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the child's stdout is a pipe and can only be read forward",
                ));
            }
        };
        let skip = target - self.pos;
        let skipped = io::copy(&mut self.by_ref().take(skip), &mut io::sink())?;
        if skipped < skip {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(self.pos)
    }
}

/// The stderr thread: logs every line with the job's key and keeps the last non-empty one
/// (the error message if the child fails). Runs until the child's stderr ends.
fn drain_stderr(stderr: ChildStderr, key: &str, pid: u32, tail: &Mutex<StderrTail>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_STDERR_LINE)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        tracing::info!(key = %key, pid, line = %line, "exec child stderr");
        if !line.trim().is_empty()
            && let Ok(mut t) = tail.lock()
        {
            t.last = Some(line.to_string());
        }
    }
}

#[cfg(test)]
mod tests;
