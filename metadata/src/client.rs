//! `MetadataClient`: how brokers and bookies use the metadata service. It
//! knows every endpoint, follows the leader, retries, keeps leases alive and
//! resumes watches after reconnects.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_proto::metadata_api::{
    Compare, KeyValue, MetaError, MetaRequest, MetaResponse, Op, Status, Txn, TxnResult, WatchEvent,
};
use magnetar_proto::rpc::{read_msg, write_msg, RpcClient, RpcError};
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata service unreachable: {0}")]
    Unavailable(String),
    #[error("metadata service: {0}")]
    Server(MetaError),
    #[error("unexpected answer from the metadata service: {0}")]
    Protocol(String),
}

#[derive(Clone)]
pub struct MetadataClient {
    rpc: RpcClient,
    endpoints: Arc<Vec<SocketAddr>>,
    leader: Arc<Mutex<Option<SocketAddr>>>,
    /// How long a request keeps retrying before it reports the service unavailable.
    pub retry_for: Duration,
}

impl MetadataClient {
    pub fn new(rpc: RpcClient, endpoints: Vec<SocketAddr>) -> MetadataClient {
        MetadataClient {
            rpc,
            endpoints: Arc::new(endpoints),
            leader: Arc::default(),
            retry_for: Duration::from_secs(15),
        }
    }

    fn target(&self, attempt: usize) -> SocketAddr {
        if let Some(l) = *self.leader.lock().unwrap_or_else(|e| e.into_inner()) {
            return l;
        }
        self.endpoints[attempt % self.endpoints.len()]
    }

    fn set_leader(&self, l: Option<SocketAddr>) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = l;
    }

    /// Sends a request to the leader, following redirects and retrying on
    /// transport errors. Writes are retried too: callers make them safe to
    /// repeat with version compares.
    pub async fn request(&self, req: &MetaRequest) -> Result<MetaResponse, MetadataError> {
        if self.endpoints.is_empty() {
            return Err(MetadataError::Unavailable("no endpoints configured".into()));
        }
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut attempt = 0;
        let mut last_err;
        loop {
            let addr = self.target(attempt);
            match self.rpc.call::<_, MetaResponse>(addr, req).await {
                Ok(MetaResponse::Error(MetaError::NotLeader { leader })) => {
                    let l = leader.and_then(|l| l.parse().ok()).filter(|l| *l != addr);
                    last_err = format!("{addr} is not the leader");
                    self.set_leader(l);
                    if l.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Ok(MetaResponse::Error(e)) => return Err(MetadataError::Server(e)),
                Ok(r) => {
                    self.set_leader(Some(addr));
                    return Ok(r);
                }
                Err(e) => {
                    last_err = format!("{addr}: {e}");
                    self.set_leader(None);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            attempt += 1;
            if tokio::time::Instant::now() >= deadline {
                return Err(MetadataError::Unavailable(last_err));
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetadataError> {
        match self.request(&MetaRequest::Get { key: key.into() }).await? {
            MetaResponse::Get(v) => Ok(v),
            r => Err(MetadataError::Protocol(format!("{r:?}"))),
        }
    }

    /// Keys under `prefix` in key order; `limit` 0 means all.
    pub async fn range(&self, prefix: &str, limit: u32) -> Result<Vec<KeyValue>, MetadataError> {
        match self
            .request(&MetaRequest::Range {
                prefix: prefix.into(),
                limit,
            })
            .await?
        {
            MetaResponse::Range(v) => Ok(v),
            r => Err(MetadataError::Protocol(format!("{r:?}"))),
        }
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, MetadataError> {
        match self.request(&MetaRequest::Txn(txn)).await? {
            MetaResponse::Txn(r) => Ok(r),
            r => Err(MetadataError::Protocol(format!("{r:?}"))),
        }
    }

    /// Unconditional put; returns the new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, MetadataError> {
        let r = self
            .txn(Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: key.into(),
                    value,
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.revision)
    }

    /// Puts `value` if the key's version is `expected` (0: absent). Returns
    /// whether it applied.
    pub async fn cas(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        lease: Option<u64>,
    ) -> Result<bool, MetadataError> {
        let r = self
            .txn(Txn {
                compares: vec![Compare {
                    key: key.into(),
                    version: expected,
                }],
                success: vec![Op::Put {
                    key: key.into(),
                    value,
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    pub async fn delete(&self, key: &str) -> Result<bool, MetadataError> {
        let r = self
            .txn(Txn {
                compares: vec![],
                success: vec![Op::Delete { key: key.into() }],
                failure: vec![],
            })
            .await?;
        Ok(matches!(
            r.results.first(),
            Some(magnetar_proto::metadata_api::OpResult::Delete { prev: Some(_) })
        ))
    }

    pub async fn status(&self) -> Result<Status, MetadataError> {
        match self.request(&MetaRequest::Status).await? {
            MetaResponse::Status(s) => Ok(s),
            r => Err(MetadataError::Protocol(format!("{r:?}"))),
        }
    }

    /// Grants a lease and keeps it alive until dropped or revoked. The lease
    /// reports itself lost when a keep-alive is refused or none succeeded for
    /// a whole TTL — its holder must then stop acting on it.
    pub async fn grant_lease(&self, ttl_ms: u64) -> Result<Lease, MetadataError> {
        let id = match self.request(&MetaRequest::LeaseGrant { ttl_ms }).await? {
            MetaResponse::Lease { id, .. } => id,
            r => return Err(MetadataError::Protocol(format!("{r:?}"))),
        };
        let (lost_tx, lost_rx) = watch::channel(false);
        let me = self.clone();
        let task = tokio::spawn(async move {
            let every = Duration::from_millis((ttl_ms / 4).max(50));
            let mut last_ok = tokio::time::Instant::now();
            let mut quick = me.clone();
            quick.retry_for = every;
            loop {
                tokio::time::sleep(every).await;
                match quick.request(&MetaRequest::LeaseKeepAlive { id }).await {
                    Ok(_) => last_ok = tokio::time::Instant::now(),
                    Err(MetadataError::Server(MetaError::LeaseNotFound(_))) => {
                        tracing::warn!(lease = id, "lease is gone");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed");
                        if last_ok.elapsed() >= Duration::from_millis(ttl_ms) {
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
        Ok(Lease {
            id,
            ttl_ms,
            lost: lost_rx,
            task,
            client: self.clone(),
        })
    }

    /// Every change under `prefix` from `start_revision` on (0: from now),
    /// in revision order, resumed transparently after reconnects.
    pub fn watch(&self, prefix: &str, start_revision: u64) -> WatchStream {
        let (tx, rx) = mpsc::channel(1024);
        let me = self.clone();
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let mut pos = WatchPosition {
                revision: start_revision,
                seen: 0,
            };
            loop {
                match me.watch_once(&prefix, &mut pos, &tx).await {
                    Ok(()) => return,
                    Err(RpcError::Decode(e)) if e.starts_with(COMPACTED) => {
                        // The events we would need are gone; the watcher must
                        // re-read the state. Ending the stream tells it so.
                        tracing::warn!(prefix, revision = pos.revision, error = %e, "watch cannot resume");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "watch interrupted; resuming");
                        me.set_leader(None);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        WatchStream { rx, task }
    }

    async fn watch_once(
        &self,
        prefix: &str,
        pos: &mut WatchPosition,
        tx: &mpsc::Sender<WatchEvent>,
    ) -> Result<(), RpcError> {
        let addr = self.target(0);
        let (mut send, mut recv) = self.rpc.open(addr).await?;
        write_msg(
            &mut send,
            &MetaRequest::Watch {
                prefix: prefix.into(),
                start_revision: pos.revision,
            },
        )
        .await?;
        let _ = send.finish();
        // Events of `pos.revision` this stream repeats from an earlier one.
        let mut repeat = pos.seen;
        loop {
            match read_msg::<MetaResponse>(&mut recv).await? {
                None => return Err(RpcError::Closed),
                Some(MetaResponse::WatchStarted { revision }) => {
                    if pos.revision == 0 {
                        *pos = WatchPosition {
                            revision: revision + 1,
                            seen: 0,
                        };
                    }
                }
                Some(MetaResponse::Event(ev)) => {
                    if ev.revision < pos.revision {
                        continue;
                    }
                    if ev.revision == pos.revision && repeat > 0 {
                        repeat -= 1;
                        continue;
                    }
                    if ev.revision == pos.revision {
                        pos.seen += 1;
                    } else {
                        *pos = WatchPosition {
                            revision: ev.revision,
                            seen: 1,
                        };
                    }
                    if tx.send(ev).await.is_err() {
                        return Ok(());
                    }
                }
                Some(MetaResponse::Error(e @ MetaError::Compacted(oldest))) if oldest > 0 => {
                    return Err(RpcError::Decode(format!("{COMPACTED}: {e}")));
                }
                Some(MetaResponse::Error(e)) => return Err(RpcError::Decode(e.to_string())),
                Some(other) => return Err(RpcError::Decode(format!("unexpected {other:?}"))),
            }
        }
    }
}

const COMPACTED: &str = "compacted";

/// Where a watch stands: every event before `revision` was delivered, and
/// the first `seen` events of `revision` (one revision may change many keys).
#[derive(Debug, Clone, Copy)]
struct WatchPosition {
    revision: u64,
    seen: usize,
}

/// A granted lease, kept alive in the background.
pub struct Lease {
    pub id: u64,
    pub ttl_ms: u64,
    /// Turns true when the lease is (or may be) lost.
    pub lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    client: MetadataClient,
}

impl Lease {
    pub async fn revoke(self) -> Result<(), MetadataError> {
        self.task.abort();
        self.client
            .request(&MetaRequest::LeaseRevoke { id: self.id })
            .await
            .map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct WatchStream {
    rx: mpsc::Receiver<WatchEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchStream {
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
