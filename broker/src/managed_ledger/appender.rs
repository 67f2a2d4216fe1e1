//! The managed ledger's appender: one task per topic that takes entries from
//! a bounded queue in order, adds them to the open ledger (rolling it when
//! due), and completes them in order as the ledger confirms them. A send
//! crosses the connection's read task, this task and the connection's
//! writer task — no task per entry. While a roll runs, earlier entries keep
//! completing; new ones wait.

use std::sync::Weak;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use magnetar_bookie::LedgerError;
use tokio::sync::{mpsc, oneshot};

use super::cursor::Position;
use super::ledger_list::{should_roll, OpenLedger};
use super::store::Handle;
use super::{ManagedLedger, MlError};

/// Entries waiting for the appender, per topic: a publisher awaits room.
pub const APPEND_QUEUE_ENTRIES: usize = 1024;
/// Adds the appender keeps in flight on the ledger, per topic.
pub const MAX_ADDS_IN_FLIGHT: usize = 8192;

/// Called once with an entry's outcome, in the order entries were queued.
pub type AppendDone = Box<dyn FnOnce(Result<Position, MlError>) + Send>;

pub enum Request {
    Append {
        data: Bytes,
        done: AppendDone,
    },
    /// Completes what is queued before it, closes the open ledger, and
    /// refuses everything after it.
    Close {
        reply: oneshot::Sender<Result<(), MlError>>,
    },
    /// Completes what is queued before it, records the termination and
    /// refuses every later append.
    Terminate {
        reply: oneshot::Sender<Result<Position, MlError>>,
    },
}

type Added = (Result<u64, LedgerError>, u64, Bytes, AppendDone);

/// The open ledger, owned by this task alone (readers see a copy of the
/// handle through `ManagedLedger::current`).
struct Open {
    writer: Option<Handle>,
    opened_at: Instant,
}

impl Open {
    fn needs_roll(&self, ml: &ManagedLedger) -> bool {
        let open = self.writer.as_ref().map(|w| OpenLedger {
            entries: (w.lac() + 1) as u64,
            size_bytes: w.length_bytes(),
            age: self.opened_at.elapsed(),
            failed: w.is_failed(),
        });
        should_roll(open, &ml.cfg)
    }
}

pub async fn run(me: Weak<ManagedLedger>, writer: Handle, mut queue: mpsc::Receiver<Request>) {
    let mut open = Open {
        writer: Some(writer),
        opened_at: Instant::now(),
    };
    let mut inflight: FuturesOrdered<BoxFuture<'static, Added>> = FuturesOrdered::new();
    let mut rolling: Option<BoxFuture<'static, Result<Handle, MlError>>> = None;
    // The entry that asked for the roll, added once it is done.
    let mut waiting: Option<(Bytes, AppendDone)> = None;
    loop {
        let can_take = rolling.is_none() && inflight.len() < MAX_ADDS_IN_FLIGHT;
        tokio::select! {
            Some((res, ledger_id, data, done)) = inflight.next(), if !inflight.is_empty() => {
                let Some(ml) = me.upgrade() else { return };
                ml.completed(res, ledger_id, data, done);
            }
            rolled = async {
                match rolling.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if rolling.is_some() => {
                rolling = None;
                let Some(ml) = me.upgrade() else { return };
                let Some((data, done)) = waiting.take() else { continue };
                match rolled {
                    Ok(w) => {
                        open = Open { writer: Some(w), opened_at: Instant::now() };
                        start(&ml, &open, data, done, &mut inflight);
                    }
                    Err(e) => {
                        tracing::warn!(topic = %ml.name, error = %e, "rolling the ledger failed");
                        open.writer = None;
                        done(Err(e));
                    }
                }
            }
            req = queue.recv(), if can_take => {
                let Some(ml) = me.upgrade() else { return };
                match req {
                    None => return,
                    Some(Request::Append { data, done }) => {
                        if ml.terminated().is_some() {
                            done(Err(MlError::Terminated(ml.name.clone())));
                        } else if let Err(e) = ml.check_writable() {
                            done(Err(e));
                        } else if open.needs_roll(&ml) {
                            let old = open.writer.take();
                            let m = ml.clone();
                            rolling = Some(async move { m.roll(old).await }.boxed());
                            waiting = Some((data, done));
                        } else {
                            start(&ml, &open, data, done, &mut inflight);
                        }
                    }
                    Some(Request::Terminate { reply }) => {
                        while let Some((res, ledger_id, data, done)) = inflight.next().await {
                            ml.completed(res, ledger_id, data, done);
                        }
                        let res = match ml.check_writable() {
                            Ok(()) => ml.record_termination().await,
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(res);
                    }
                    Some(Request::Close { reply }) => {
                        while let Some((res, ledger_id, data, done)) = inflight.next().await {
                            ml.completed(res, ledger_id, data, done);
                        }
                        let res = ml.close_open(open.writer.take()).await;
                        let _ = reply.send(res);
                        queue.close();
                        while let Some(req) = queue.recv().await {
                            refuse(req);
                        }
                        return;
                    }
                }
            }
        }
    }
}

fn start(
    ml: &ManagedLedger,
    open: &Open,
    data: Bytes,
    done: AppendDone,
    inflight: &mut FuturesOrdered<BoxFuture<'static, Added>>,
) {
    let Some(w) = open.writer.as_ref() else {
        done(Err(MlError::Closed(ml.name.clone())));
        return;
    };
    let ledger_id = w.ledger_id();
    let add = w.add(data.clone());
    inflight.push_back(async move { (add.await, ledger_id, data, done) }.boxed());
}

/// Answers a request that came after the managed ledger closed.
pub fn refuse(req: Request) {
    match req {
        Request::Append { done, .. } => done(Err(MlError::Closed(String::new()))),
        Request::Close { reply } => {
            let _ = reply.send(Ok(()));
        }
        Request::Terminate { reply } => {
            let _ = reply.send(Err(MlError::Closed(String::new())));
        }
    }
}
