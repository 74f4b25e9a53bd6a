//! The batching writer: concurrent writes of one kind become one statement.
//!
//! What bounds a PostgreSQL store's write throughput is the commit (a WAL
//! flush) each statement costs. The writer task takes every write queued while
//! the previous batch committed (up to [`MAX_BATCH`]) and applies them together,
//! one statement per [`Batch::lane`], the lanes side by side. A lone write still
//! runs at once, alone.

use std::collections::HashSet;
use std::future::{poll_fn, Future};
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use tokio::sync::{mpsc, oneshot};

use super::error::{query_error, Reason, StoreError, StoreFuture};
use super::postgres::Postgres;

/// Most writes the writer task puts in one statement.
const MAX_BATCH: usize = 512;

/// A write that can share a statement with others of its lane.
pub(crate) trait Batch: Send + Sync + Sized + 'static {
    /// How the statement's returned rows name the writes that changed something.
    type Id: Eq + Hash + Send;

    /// How many lanes (statements) there are; [`lane`](Self::lane) is below it.
    const LANES: usize;

    /// Which statement applies this write.
    fn lane(&self) -> usize;

    /// What a write of `lane` is called in errors and logs.
    fn operation(lane: usize) -> &'static str;

    /// This write's identity, as the statement returns it when it changed something.
    fn id(&self) -> Self::Id;

    /// Applies `writes`, all of `lane`, as one statement; the ids of those
    /// that changed something.
    fn apply<'a>(
        postgres: &'a Postgres,
        lane: usize,
        writes: &'a [Self],
    ) -> StoreFuture<'a, HashSet<Self::Id>>;
}

/// A write and where its caller waits for the answer: true when it changed something.
struct Queued<W> {
    write: W,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// The queue to one batching writer task, started by the first write (inside
/// the caller's tokio runtime). The task ends when the writer is dropped.
pub(crate) struct Writer<W: Batch> {
    queue: OnceLock<mpsc::UnboundedSender<Queued<W>>>,
}

impl<W: Batch> Default for Writer<W> {
    fn default() -> Self {
        Self {
            queue: OnceLock::new(),
        }
    }
}

impl<W: Batch> Writer<W> {
    /// Queues `write` and waits for its answer: true when it changed something.
    pub(crate) async fn write(
        &self,
        postgres: &Arc<Postgres>,
        write: W,
    ) -> Result<bool, StoreError> {
        let operation = W::operation(write.lane());
        let stopped = || {
            query_error(
                operation,
                Reason(
                    "the store's writer task stopped (was its tokio runtime shut down?)".to_owned(),
                ),
            )
        };
        let queue = self.queue.get_or_init(|| {
            let (queue, receiver) = mpsc::unbounded_channel();
            tokio::spawn(run(Arc::clone(postgres), receiver));
            queue
        });
        let (reply, answer) = oneshot::channel();
        queue.send(Queued { write, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The writer task. Ends when its queue's sender, the [`Writer`], is dropped.
async fn run<W: Batch>(postgres: Arc<Postgres>, mut queue: mpsc::UnboundedReceiver<Queued<W>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut lanes: Vec<Vec<Queued<W>>> = (0..W::LANES).map(|_| Vec::new()).collect();
        for queued in batch.drain(..) {
            lanes[queued.write.lane().min(W::LANES - 1)].push(queued);
        }
        // Writes still waiting in one batch were concurrent, so any order is
        // one they could have had; running the lanes at once pipelines them.
        let mut pending: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = lanes
            .into_iter()
            .enumerate()
            .filter(|(_, writes)| !writes.is_empty())
            .map(|(lane, writes)| {
                Box::pin(apply(&postgres, lane, writes)) as Pin<Box<dyn Future<Output = ()> + Send>>
            })
            .collect();
        poll_fn(|context| {
            pending.retain_mut(|lane| lane.as_mut().poll(context).is_pending());
            if pending.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// Applies one lane's writes as one statement and answers each caller.
async fn apply<W: Batch>(postgres: &Postgres, lane: usize, queued: Vec<Queued<W>>) {
    let (writes, replies): (Vec<W>, Vec<_>) = queued
        .into_iter()
        .map(|queued| (queued.write, queued.reply))
        .unzip();
    match W::apply(postgres, lane, &writes).await {
        Ok(changed) => {
            // The same write twice in one batch changes once: the first
            // caller gets the answer, later ones see it already done.
            let mut seen = HashSet::new();
            for (write, reply) in writes.iter().zip(replies) {
                let id = write.id();
                let changed = changed.contains(&id) && seen.insert(id);
                // A caller that stopped waiting needs no answer.
                let _ = reply.send(Ok(changed));
            }
        }
        // A write the database rejects (say, a NUL in a group name) must
        // not fail its neighbours: try each alone.
        Err(error) if !error.is_retriable() && writes.len() > 1 => {
            for (write, reply) in writes.iter().zip(replies) {
                let result = W::apply(postgres, lane, std::slice::from_ref(write))
                    .await
                    .map(|changed| !changed.is_empty());
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
