//! Batches the adds a ledger client sends to each bookie: every add to a
//! bookie goes through that bookie's queue, and a sender task packs what is
//! waiting into one [`BookieRequest::AddBatch`] — one QUIC stream and one
//! message for many entries, of any ledgers. Batches form by themselves under
//! load: at most [`BATCHES_IN_FLIGHT`] are outstanding per bookie, and adds
//! that arrive meanwhile wait for the next one. A lone add goes out at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use magnetar_proto::ledger::{
    AddRequest, BookieErrorCode, BookieRequest, BookieResponse, BATCH_BYTES, MAX_BATCH_ADDS,
};
use magnetar_proto::rpc::RpcClient;
use tokio::sync::{mpsc, Semaphore};

use super::LedgerError;

/// Batches outstanding to one bookie at once.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// The outcome of one add: `Ok` once the bookie stored it durably.
pub type AddOutcome = Result<(), LedgerError>;

/// What a sender attaches to an add to recognise its outcome.
pub type AddTag = (u64, usize);

/// Where outcomes go: the writer that queued the adds. A batch's outcomes
/// arrive one call per run of consecutive adds from the same sink, in the
/// order the adds were queued.
pub trait AddSink: Send + Sync {
    fn outcomes(self: Arc<Self>, bookie: &str, outcomes: Vec<(AddTag, AddOutcome)>);
}

struct Queued {
    add: AddRequest,
    tag: AddTag,
    sink: Arc<dyn AddSink>,
}

/// The per-bookie add queues of one ledger client (shared by its clones).
/// Sender tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct AddQueues {
    rpc: RpcClient,
    queues: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>>,
}

impl AddQueues {
    /// `rpc`'s timeout bounds each batch: a batch not answered within it
    /// fails all of its adds.
    pub fn new(rpc: RpcClient) -> AddQueues {
        AddQueues {
            rpc,
            queues: Arc::default(),
        }
    }

    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.rpc.timeout = timeout;
    }

    /// Queues `add` for `bookie`; `sink` gets its outcome with `tag`, from
    /// the task that received the bookie's answer (or at once, when the
    /// add cannot be queued).
    pub fn add(&self, bookie: &str, add: AddRequest, tag: AddTag, sink: Arc<dyn AddSink>) {
        let tx = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(bookie).filter(|tx| !tx.is_closed()) {
                Some(tx) => Ok(tx.clone()),
                None => self.start(bookie).inspect(|tx| {
                    queues.insert(bookie.to_string(), tx.clone());
                }),
            }
        };
        // Outcomes known here are delivered outside the lock.
        let err = match tx {
            Ok(tx) => match tx.send(Queued { add, tag, sink }) {
                Ok(()) => return,
                Err(mpsc::error::SendError(q)) => (
                    q.sink,
                    LedgerError::Unreachable {
                        bookie: bookie.into(),
                        reason: "add queue stopped".into(),
                    },
                ),
            },
            Err(e) => (sink, e),
        };
        err.0.outcomes(bookie, vec![(tag, Err(err.1))]);
    }

    fn start(&self, bookie: &str) -> Result<mpsc::UnboundedSender<Queued>, LedgerError> {
        let addr: SocketAddr = magnetar_proto::resolve::socket_addr(bookie).ok_or_else(|| {
            LedgerError::Unreachable {
                bookie: bookie.into(),
                reason: "address does not resolve".into(),
            }
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(self.rpc.clone(), bookie.to_string(), addr, rx));
        Ok(tx)
    }
}

async fn run(
    rpc: RpcClient,
    bookie: String,
    addr: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot lets the next batch fill up meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.add.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_ADDS && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    bytes += q.add.payload.len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        let (rpc, bookie) = (rpc.clone(), bookie.clone());
        tokio::spawn(async move {
            send_batch(&rpc, &bookie, addr, batch).await;
            drop(permit);
        });
    }
}

async fn send_batch(rpc: &RpcClient, bookie: &str, addr: SocketAddr, batch: Vec<Queued>) {
    let mut adds = Vec::with_capacity(batch.len());
    let mut tags = Vec::with_capacity(batch.len());
    for q in batch {
        adds.push(q.add);
        tags.push((q.tag, q.sink));
    }
    let n = adds.len();
    let failed = |reason: String| LedgerError::Unreachable {
        bookie: bookie.into(),
        reason,
    };
    let outcomes: Vec<AddOutcome> = match rpc
        .call::<_, BookieResponse>(addr, &BookieRequest::AddBatch(adds))
        .await
    {
        Ok(BookieResponse::AddedBatch(results)) if results.len() == n => results
            .into_iter()
            .map(|r| {
                r.map_err(|code: BookieErrorCode| LedgerError::Bookie {
                    bookie: bookie.into(),
                    code,
                })
            })
            .collect(),
        Ok(BookieResponse::Error(code)) => (0..n)
            .map(|_| {
                Err(LedgerError::Bookie {
                    bookie: bookie.into(),
                    code,
                })
            })
            .collect(),
        Ok(other) => {
            let reason = format!("unexpected answer to a batch of {n} adds: {other:?}");
            (0..n).map(|_| Err(failed(reason.clone()))).collect()
        }
        Err(e) => {
            let reason = e.to_string();
            (0..n).map(|_| Err(failed(reason.clone()))).collect()
        }
    };
    // One call per run of adds from the same sink (a writer's adds are
    // usually queued together).
    type Run = (Arc<dyn AddSink>, Vec<(AddTag, AddOutcome)>);
    let mut run: Option<Run> = None;
    for ((tag, sink), outcome) in tags.into_iter().zip(outcomes) {
        match &mut run {
            Some((s, list)) if Arc::ptr_eq(s, &sink) => list.push((tag, outcome)),
            _ => {
                if let Some((s, list)) = run.replace((sink, vec![(tag, outcome)])) {
                    s.outcomes(bookie, list);
                }
            }
        }
    }
    if let Some((s, list)) = run {
        s.outcomes(bookie, list);
    }
}
