//! Settling deliveries in batches: one `basic.ack` with `multiple` for a run of deliveries.
//!
//! Every ack, nack and reject of a consumer's deliveries goes through one task per channel
//! (the [`Settler`]), which sends a nack, and waits for it to be sent, before any ack that
//! could cover its delivery (lapin sends each settlement from a future of its own, so two
//! settlements asked for one after the other may leave in either order). Acks asked for
//! while the task was busy are collected; the longest run of consecutive delivery tags that
//! starts just above the highest tag already settled (RabbitMQ numbers a channel's
//! deliveries 1, 2, 3, ...) is acked with one `basic.ack(tag, multiple = true)`, which on a
//! quorum queue is also one `settle` command in its log instead of one per message. Acks
//! above a gap (a delivery still being decided) are sent one by one at once: nothing waits
//! for a batch, so an ack leaves as soon as the task runs, as it did before batching.
//!
//! A caller's `ack().await` returns once its frame (or the `multiple` frame covering it) was
//! handed to the connection, with that frame's outcome.

use futures_util::future::join_all;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, Error as LapinError};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::{mpsc, oneshot};

/// The most requests taken from the queue in one pass.
const MAX_PASS: usize = 4096;

/// What to do with a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Nack { requeue: bool },
}

/// Outcome of a settlement: `Ok(true)` sent, `Ok(false)` the channel is closed (or the
/// acker already used), `Err` lapin's error.
pub(crate) type Settled = Result<bool, LapinError>;

struct Request {
    tag: u64,
    acker: Acker,
    what: Settle,
    reply: oneshot::Sender<Settled>,
}

/// Handle to a channel's settling task. Cheap to clone; the task ends when the last clone
/// is dropped.
#[derive(Clone, Debug)]
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<Request>,
}

impl Settler {
    /// Starts the settling task for one channel (on the current tokio runtime).
    pub(crate) fn spawn() -> Settler {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        Settler { tx }
    }

    /// Settles delivery `tag` (through its `acker`) and waits until the frame is sent.
    pub(crate) async fn settle(&self, tag: u64, acker: &Acker, what: Settle) -> Settled {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            tag,
            acker: acker.clone(),
            what,
            reply,
        };
        if self.tx.send(req).is_err() {
            // The task is gone (its runtime is shutting down): settle directly.
            return direct(acker, what, false).await;
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Ok(false),
        }
    }
}

async fn direct(acker: &Acker, what: Settle, multiple: bool) -> Settled {
    match what {
        Settle::Ack => acker.ack(BasicAckOptions { multiple }).await,
        Settle::Nack { requeue } => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue,
                })
                .await
        }
    }
}

/// Which tags are settled: all up to `floor`, and those in `above`.
#[derive(Debug, Default)]
struct Ledger {
    floor: u64,
    above: BTreeSet<u64>,
}

impl Ledger {
    /// Takes from `pending` the run of acks that, with the tags already settled, follows
    /// `floor` without a gap; returns them in order and moves `floor` past the run.
    fn take_run<V>(&mut self, pending: &mut BTreeMap<u64, V>) -> Vec<(u64, V)> {
        let mut run = Vec::new();
        loop {
            let next = self.floor + 1;
            if let Some(v) = pending.remove(&next) {
                run.push((next, v));
            } else if !self.above.remove(&next) {
                break;
            }
            self.floor = next;
        }
        run
    }

    fn settled(&mut self, tag: u64) {
        if tag > self.floor {
            self.above.insert(tag);
        }
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut ledger = Ledger::default();
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_PASS).await > 0 {
        // Let the tasks woken with these (one group claim answers many) ask too.
        tokio::task::yield_now().await;
        while batch.len() < MAX_PASS {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Nacks first, each sent before any ack: a `multiple` ack must not cover a delivery
        // meant to be nacked. Rare (shutdown, a job that could not start).
        let mut acks: BTreeMap<u64, (Acker, oneshot::Sender<Settled>)> = BTreeMap::new();
        for req in batch.drain(..) {
            match req.what {
                Settle::Ack => {
                    acks.insert(req.tag, (req.acker, req.reply));
                }
                Settle::Nack { .. } => {
                    let r = direct(&req.acker, req.what, false).await;
                    ledger.settled(req.tag);
                    let _ = req.reply.send(r);
                }
            }
        }
        // Then the run (one frame) and the acks above a gap (one each), concurrently: they
        // cover distinct deliveries, the run's all below the gap.
        let mut frames = Vec::new();
        let mut replies: Vec<Vec<oneshot::Sender<Settled>>> = Vec::new();
        let run = ledger.take_run(&mut acks);
        if let Some((_, (last, _))) = run.last() {
            frames.push((last.clone(), Settle::Ack, run.len() > 1));
            replies.push(run.into_iter().map(|(_, (_, reply))| reply).collect());
        }
        for (tag, (acker, reply)) in acks {
            ledger.settled(tag);
            frames.push((acker, Settle::Ack, false));
            replies.push(vec![reply]);
        }
        let sent = join_all(
            frames
                .iter()
                .map(|(acker, what, multiple)| direct(acker, *what, *multiple)),
        )
        .await;
        for (r, replies) in sent.into_iter().zip(replies) {
            for reply in replies {
                let _ = reply.send(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(tags: &[u64]) -> BTreeMap<u64, ()> {
        tags.iter().map(|t| (*t, ())).collect()
    }

    fn tags(run: Vec<(u64, ())>) -> Vec<u64> {
        run.into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn a_run_starts_just_above_the_floor() {
        let mut l = Ledger::default();
        let mut p = pending(&[1, 2, 3, 5]);
        assert_eq!(tags(l.take_run(&mut p)), vec![1, 2, 3]);
        assert_eq!(l.floor, 3);
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn a_gap_at_the_floor_gives_no_run() {
        let mut l = Ledger::default();
        let mut p = pending(&[2, 3]);
        assert!(l.take_run(&mut p).is_empty());
        assert_eq!(l.floor, 0);
        assert_eq!(
            p.len(),
            2,
            "acks above a gap are left to be sent one by one"
        );
    }

    #[test]
    fn settled_tags_close_gaps_and_are_forgotten() {
        let mut l = Ledger::default();
        // 2 was nacked, 4 acked alone (above the gap at 1 back then).
        l.settled(2);
        l.settled(4);
        let mut p = pending(&[1, 3, 5, 7]);
        assert_eq!(tags(l.take_run(&mut p)), vec![1, 3, 5]);
        assert_eq!(l.floor, 5);
        assert!(
            l.above.is_empty(),
            "tags at or under the floor are not kept"
        );
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![7]);
        // Settling a tag under the floor again changes nothing.
        l.settled(3);
        assert!(l.above.is_empty());
    }
}
