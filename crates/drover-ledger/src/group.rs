//! Group commit for the worker's hot path: claims and completions of many in-flight jobs
//! share one statement, so one Postgres commit (one WAL flush) covers many jobs.
//!
//! Each kind of write has a task that takes whatever requests are waiting (up to
//! `max_batch`), runs them as one set-based statement ([`Ledger::claim_ready`],
//! [`Ledger::complete_many`]) and answers each caller. Nothing waits on a timer: while one
//! statement runs, the next requests queue up, so an idle worker writes a single job at
//! once (no added latency) and a busy one writes dozens per commit.

use crate::transitions::{ClaimedJob, Completion, LeaseLost};
use crate::{Ledger, LedgerError};
use std::future::Future;
use tokio::sync::{mpsc, oneshot};

type Reply<R> = oneshot::Sender<Result<R, LedgerError>>;

/// Batches a worker's claims and completions. Cheap to clone; the tasks stop when the last
/// clone is dropped.
#[derive(Clone, Debug)]
pub struct Group {
    claims: mpsc::Sender<(String, Reply<Option<ClaimedJob>>)>,
    completes: mpsc::Sender<(Completion, Reply<Result<(), LeaseLost>>)>,
}

impl Group {
    /// Starts the batching tasks (on the current tokio runtime) for `worker`'s writes.
    pub fn new(ledger: Ledger, worker: String, max_batch: usize) -> Group {
        let max_batch = max_batch.max(1);
        let (l, w) = (ledger.clone(), worker.clone());
        let claims = spawn_batcher(max_batch, move |keys: Vec<String>| {
            let (l, w) = (l.clone(), w.clone());
            async move { l.claim_ready(&w, &keys).await }
        });
        let completes = spawn_batcher(max_batch, move |items: Vec<Completion>| {
            let (l, w) = (ledger.clone(), worker.clone());
            async move { l.complete_many(&w, &items).await }
        });
        Group { claims, completes }
    }

    /// [`Ledger::claim_ready`] for one key, grouped with other callers' keys.
    pub async fn claim_ready(&self, key: String) -> Result<Option<ClaimedJob>, LedgerError> {
        call(&self.claims, key).await
    }

    /// [`Ledger::complete_many`] for one job, grouped with other callers' completions.
    pub async fn complete(&self, c: Completion) -> Result<Result<(), LeaseLost>, LedgerError> {
        call(&self.completes, c).await
    }
}

async fn call<Q, R>(tx: &mpsc::Sender<(Q, Reply<R>)>, req: Q) -> Result<R, LedgerError> {
    let (reply, rx) = oneshot::channel();
    tx.send((req, reply))
        .await
        .map_err(|_| LedgerError::Grouped {
            message: "the ledger write batcher has stopped".into(),
            connection: false,
        })?;
    rx.await.unwrap_or_else(|_| {
        Err(LedgerError::Grouped {
            message: "the ledger write batcher dropped the request".into(),
            connection: false,
        })
    })
}

/// Spawns a task that runs `flush` over every batch of waiting requests and answers each
/// request with its element of the result (which `flush` returns in request order).
fn spawn_batcher<Q, R, F, Fut>(max_batch: usize, flush: F) -> mpsc::Sender<(Q, Reply<R>)>
where
    Q: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<Q>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<R>, LedgerError>> + Send,
{
    let (tx, mut rx) = mpsc::channel::<(Q, Reply<R>)>(max_batch * 2);
    tokio::spawn(async move {
        let mut waiting = Vec::with_capacity(max_batch);
        while rx.recv_many(&mut waiting, max_batch).await > 0 {
            let (reqs, replies): (Vec<Q>, Vec<Reply<R>>) = waiting.drain(..).unzip();
            match flush(reqs).await {
                Ok(results) => {
                    for (r, reply) in results.into_iter().zip(replies) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    let connection = e.is_connection();
                    let message = drover_core::error::error_chain(&e);
                    for reply in replies {
                        let _ = reply.send(Err(LedgerError::Grouped {
                            message: message.clone(),
                            connection,
                        }));
                    }
                }
            }
        }
    });
    tx
}
