//! Group commit: one task owns the store's writes on the request path and commits whatever
//! has queued up in one transaction, so a busy portal pays one disk sync per batch instead of
//! one per grant or flow.
//!
//! Each caller waits for its own write to be durable before it answers anyone: batching
//! changes throughput, never what a caller may assume after `submit` returns `Ok`.

use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, StoreError, Write};

/// The most writes one transaction takes; a larger backlog is committed in several.
const MAX_BATCH: usize = 1024;

/// A handle on the writer task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    queue: mpsc::UnboundedSender<Queued>,
    /// How long each batch's commit took (`fz_portal_store_commit_seconds`).
    commits: Histogram,
}

type Queued = (Vec<Write>, oneshot::Sender<Result<(), StoreError>>);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the portal is shutting down")]
    Closed,
}

impl Writer {
    /// Starts the writer task on the current runtime. It ends when every handle is dropped.
    pub fn start(store: Store) -> Writer {
        let (queue, incoming) = mpsc::unbounded_channel();
        let commits = crate::metrics::commit_histogram();
        tokio::spawn(run(store, incoming, commits.clone()));
        Writer { queue, commits }
    }

    /// The histogram of its commits' durations, for the metrics' registry.
    pub fn commits(&self) -> Histogram {
        self.commits.clone()
    }

    /// Writes these together (all or none); the future is ready once they are committed.
    ///
    /// The writes join the queue when this is called, not when the future is first polled:
    /// writes submitted one after the other are committed in that order, which is what lets
    /// the broker count a denial on the row of an identical one submitted just before.
    pub fn submit(
        &self,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<(), WriteError>> + Send + use<> {
        let (done, answer) = oneshot::channel();
        let queued = self.queue.send((writes, done));
        async move {
            queued.map_err(|_| WriteError::Closed)?;
            answer
                .await
                .map_err(|_| WriteError::Closed)?
                .map_err(WriteError::Store)
        }
    }
}

async fn run(store: Store, mut incoming: mpsc::UnboundedReceiver<Queued>, commits: Histogram) {
    let mut batch: Vec<Queued> = Vec::new();
    while let Some(first) = incoming.recv().await {
        batch.push(first);
        let mut size = batch.iter().map(|(w, _)| w.len()).sum::<usize>();
        while size < MAX_BATCH {
            match incoming.try_recv() {
                Ok(next) => {
                    size += next.0.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let writes: Vec<Write> = batch.iter().flat_map(|(w, _)| w.iter().cloned()).collect();
        let started = Instant::now();
        let applied = store.apply(&writes).await;
        commits.observe(started.elapsed().as_secs_f64());
        match applied {
            Ok(()) => {
                for (_, done) in batch.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            // One bad write must not fail its neighbours: commit each caller's writes alone,
            // so only the caller whose write is bad hears of it.
            Err(_) => {
                for (writes, done) in batch.drain(..) {
                    let _ = done.send(store.apply(&writes).await);
                }
            }
        }
    }
}
