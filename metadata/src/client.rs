//! `MetadataClient`: how brokers and bookies use the metadata service. It
//! knows every endpoint, follows the leader, retries, keeps leases alive and
//! resumes watches after reconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_proto::metadata_api::{
    Compare, KeyValue, MetaError, MetaRequest, MetaResponse, Op, RequestId, Status, Txn, TxnResult,
    WatchEvent,
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
    /// Which endpoint to try next when no leader is known; moves on after
    /// every failure so a dead node is not tried first every time.
    next_endpoint: Arc<AtomicUsize>,
    /// When each endpoint last failed; one that failed within
    /// `SUSPECT_FOR` is tried only when all others did too.
    failed_at: Arc<Mutex<std::collections::HashMap<SocketAddr, std::time::Instant>>>,
    /// Identifies this client's transactions so a retried one applies once.
    client_id: u64,
    next_seq: Arc<AtomicU64>,
    /// How long a request keeps retrying before it reports the service unavailable.
    pub retry_for: Duration,
}

impl MetadataClient {
    /// A client of the nodes at `endpoints`. Each attempt gets one second
    /// (half for the handshake): a node that died without closing its
    /// connections must not hold a request longer than a failover takes;
    /// the request then goes on to the next node.
    pub fn new(mut rpc: RpcClient, endpoints: Vec<SocketAddr>) -> MetadataClient {
        rpc.timeout = Duration::from_secs(1);
        rpc.connect_timeout = Duration::from_millis(500);
        MetadataClient {
            rpc,
            endpoints: Arc::new(endpoints),
            leader: Arc::default(),
            next_endpoint: Arc::default(),
            failed_at: Arc::default(),
            client_id: rand::random(),
            next_seq: Arc::new(AtomicU64::new(1)),
            retry_for: Duration::from_secs(15),
        }
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    fn target(&self) -> SocketAddr {
        if let Some(l) = *self.leader.lock().unwrap_or_else(|e| e.into_inner()) {
            return l;
        }
        let n = self.endpoints.len();
        let start = self.next_endpoint.load(Ordering::Relaxed);
        // The next endpoint that did not fail just now, if any.
        let failed = self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        (0..n)
            .map(|k| self.endpoints[(start + k) % n])
            .find(|a| failed.get(a).is_none_or(|t| t.elapsed() > SUSPECT_FOR))
            .unwrap_or(self.endpoints[start % n])
    }

    /// `addr` failed: forget it as leader, avoid it for a moment, and move
    /// on to the next endpoint.
    fn failed(&self, addr: SocketAddr) {
        self.set_leader(None);
        self.failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, std::time::Instant::now());
        let i = self.next_endpoint.load(Ordering::Relaxed);
        if self.endpoints[i % self.endpoints.len()] == addr {
            let _ = self.next_endpoint.compare_exchange(
                i,
                i.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn set_leader(&self, l: Option<SocketAddr>) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = l;
    }

    /// Sends a request to the leader (any node forwards it there), following
    /// redirects and retrying on transport errors and while no leader can
    /// answer. Transactions go as `TxnOnce`, so a retried one applies once;
    /// lease grants and revokes are safe to repeat (a repeated grant leaves
    /// an unused lease that expires).
    pub async fn request(&self, req: &MetaRequest) -> Result<MetaResponse, MetadataError> {
        if self.endpoints.is_empty() {
            return Err(MetadataError::Unavailable("no endpoints configured".into()));
        }
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut last_err;
        loop {
            let addr = self.target();
            match self.rpc.call::<_, MetaResponse>(addr, req).await {
                Ok(MetaResponse::Error(MetaError::NotLeader { leader })) => {
                    let l = leader
                        .and_then(|l| magnetar_proto::resolve::socket_addr(&l))
                        .filter(|l| *l != addr);
                    last_err = format!("{addr} is not the leader");
                    if l.is_none() {
                        self.failed(addr);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else {
                        self.set_leader(l);
                    }
                }
                Ok(MetaResponse::Error(MetaError::Unavailable(why))) => {
                    last_err = format!("{addr}: {why}");
                    self.failed(addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(MetaResponse::Error(e)) => return Err(MetadataError::Server(e)),
                Ok(MetaResponse::Forwarded { leader, response }) => {
                    self.set_leader(magnetar_proto::resolve::socket_addr(&leader));
                    return match *response {
                        MetaResponse::Error(e) => Err(MetadataError::Server(e)),
                        r => Ok(r),
                    };
                }
                Ok(r) => {
                    self.set_leader(Some(addr));
                    return Ok(r);
                }
                Err(e) => {
                    last_err = format!("{addr}: {e}");
                    self.failed(addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tracing::debug!(attempt = %last_err, "metadata request retried");
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

    /// Keys under `prefix` in key order; `limit` 0 means all. Read a page
    /// at a time (`RangePage`), so a range of any size can be listed. Each
    /// page is linearizable, the whole is not one snapshot: a key present
    /// throughout the listing is in it; one created or deleted meanwhile
    /// may or may not be.
    pub async fn range(&self, prefix: &str, limit: u32) -> Result<Vec<KeyValue>, MetadataError> {
        self.range_pages(prefix, limit, false).await
    }

    /// The names of the keys under `prefix`, in order (as [`Self::range`],
    /// without the values: for listings that need only the names).
    pub async fn range_keys(&self, prefix: &str) -> Result<Vec<String>, MetadataError> {
        let kvs = self.range_pages(prefix, 0, true).await?;
        Ok(kvs.into_iter().map(|kv| kv.key).collect())
    }

    async fn range_pages(
        &self,
        prefix: &str,
        limit: u32,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, MetadataError> {
        let mut out: Vec<KeyValue> = Vec::new();
        loop {
            let req = MetaRequest::RangePage {
                prefix: prefix.into(),
                after: out.last().map(|kv| kv.key.clone()),
                limit: if limit == 0 {
                    0
                } else {
                    limit.saturating_sub(out.len() as u32)
                },
                keys_only,
            };
            match self.request(&req).await? {
                MetaResponse::RangePage { kvs, more } => {
                    let progress = !kvs.is_empty();
                    out.extend(kvs);
                    let full = limit != 0 && out.len() >= limit as usize;
                    if !more || !progress || full {
                        return Ok(out);
                    }
                }
                r => return Err(MetadataError::Protocol(format!("{r:?}"))),
            }
        }
    }

    /// Runs a transaction. Retries after a lost answer are de-duplicated by
    /// the service: the transaction applies at most once.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, MetadataError> {
        let request = RequestId {
            client: self.client_id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        match self.request(&MetaRequest::TxnOnce { request, txn }).await? {
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

    /// The status one node reports of itself, without retries.
    pub async fn status_of(&self, addr: SocketAddr) -> Result<Status, MetadataError> {
        match self
            .rpc
            .call::<_, MetaResponse>(addr, &MetaRequest::Status)
            .await
        {
            Ok(MetaResponse::Status(s)) => Ok(s),
            Ok(r) => Err(MetadataError::Protocol(format!("{r:?}"))),
            Err(e) => Err(MetadataError::Unavailable(format!("{addr}: {e}"))),
        }
    }

    /// Adds a node to the cluster (learner, then voter once caught up).
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<(), MetadataError> {
        // The leader answers once the new node caught up: allow for a
        // snapshot transfer.
        let mut slow = self.clone();
        slow.rpc.timeout = Duration::from_secs(120);
        slow.retry_for = Duration::from_secs(120);
        slow.request(&MetaRequest::AddNode {
            id,
            addr: addr.into(),
        })
        .await
        .map(|_| ())
    }

    pub async fn remove_node(&self, id: u64) -> Result<(), MetadataError> {
        let mut slow = self.clone();
        slow.rpc.timeout = Duration::from_secs(30);
        slow.request(&MetaRequest::RemoveNode { id })
            .await
            .map(|_| ())
    }

    /// Grants a lease and keeps it alive until dropped or revoked. The lease
    /// reports itself lost when a keep-alive is refused or none succeeded for
    /// a whole TTL — its holder must then stop acting on it.
    pub async fn grant_lease(&self, ttl_ms: u64) -> Result<Lease, MetadataError> {
        // The service starts the TTL when it grants (or renews) the lease,
        // which is after we asked: our send time plus the TTL is an instant
        // before which it cannot expire.
        let asked = tokio::time::Instant::now();
        let id = match self.request(&MetaRequest::LeaseGrant { ttl_ms }).await? {
            MetaResponse::Lease { id, .. } => id,
            r => return Err(MetadataError::Protocol(format!("{r:?}"))),
        };
        let ttl = Duration::from_millis(ttl_ms);
        let (lost_tx, lost_rx) = watch::channel(false);
        let (expiry_tx, expiry_rx) = watch::channel(asked + ttl);
        let me = self.clone();
        let task = tokio::spawn(async move {
            let every = Duration::from_millis((ttl_ms / 4).max(50));
            let mut last_ok = tokio::time::Instant::now();
            let mut quick = me.clone();
            quick.retry_for = every;
            loop {
                tokio::time::sleep(every).await;
                let sent = tokio::time::Instant::now();
                match quick.request(&MetaRequest::LeaseKeepAlive { id }).await {
                    Ok(_) => {
                        last_ok = tokio::time::Instant::now();
                        expiry_tx.send_replace(sent + ttl);
                    }
                    Err(MetadataError::Server(MetaError::LeaseNotFound(_))) => {
                        tracing::warn!(lease = id, "lease is gone");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed");
                        if last_ok.elapsed() >= ttl {
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
            safe_until: expiry_rx,
            task,
            client: self.clone(),
        })
    }

    /// Revokes a lease by id (its ephemeral keys go with it): for a holder
    /// known to be gone. Revoking a lease that no longer exists is not an
    /// error.
    pub async fn revoke_lease(&self, id: u64) -> Result<(), MetadataError> {
        match self.request(&MetaRequest::LeaseRevoke { id }).await {
            Ok(_) | Err(MetadataError::Server(MetaError::LeaseNotFound(_))) => Ok(()),
            Err(e) => Err(e),
        }
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
                // Any node serves watches (from its applied state, in revision order).
                let addr = me.target();
                match me.watch_once(addr, &prefix, &mut pos, &tx).await {
                    Ok(()) => return,
                    Err(RpcError::Decode(e)) if e.starts_with(FATAL) => {
                        // The events we would need are gone (the watcher must
                        // re-read the state), or the service refuses the
                        // watch. Ending the stream tells the watcher so.
                        tracing::warn!(prefix, revision = pos.revision, error = %e, "watch ended");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "watch interrupted; resuming");
                        me.failed(addr);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        WatchStream { rx, task }
    }

    async fn watch_once(
        &self,
        addr: SocketAddr,
        prefix: &str,
        pos: &mut WatchPosition,
        tx: &mpsc::Sender<WatchEvent>,
    ) -> Result<(), RpcError> {
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
                    return Err(RpcError::Decode(format!("{FATAL}: {e}")));
                }
                Some(MetaResponse::Error(e @ MetaError::Limit(_))) => {
                    return Err(RpcError::Decode(format!("{FATAL}: {e}")));
                }
                Some(MetaResponse::Error(e)) => return Err(RpcError::Decode(e.to_string())),
                Some(other) => return Err(RpcError::Decode(format!("unexpected {other:?}"))),
            }
        }
    }
}

/// How long an endpoint that failed is avoided.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Marks a watch error after which resuming cannot help.
const FATAL: &str = "cannot resume";

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
    /// Before this instant the service cannot have expired the lease (the
    /// send time of the last successful grant or keep-alive plus the TTL).
    /// A holder that must stop acting before another can take over stops
    /// somewhat before it.
    pub safe_until: watch::Receiver<tokio::time::Instant>,
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
