//! The ledger client: creates ledgers (a metadata record naming the ensemble
//! and quorums), writes with quorum counting, reads with digest checks,
//! closes, and fences + recovers ledgers whose writer went away.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::join_all;
use magnetar_metadata::{MetadataClient, MetadataError};
use magnetar_proto::ledger::{
    entry_digest, BookieErrorCode, BookieRequest, BookieResponse, MasterKey,
};
use magnetar_proto::rpc::RpcClient;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::server::{BookieInfo, BOOKIES_PREFIX};
use crate::write_state::{write_set, WriteState};

pub const LEDGERS_PREFIX: &str = "/ledgers/";
const LEDGER_ID_KEY: &str = "/ledger-ids/next";

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("not enough writable bookies: need {need}, have {have}")]
    NotEnoughBookies { need: usize, have: usize },
    #[error("bookie {bookie}: {code}")]
    Bookie {
        bookie: String,
        code: BookieErrorCode,
    },
    #[error("bookie {bookie} unreachable: {reason}")]
    Unreachable { bookie: String, reason: String },
    /// The add may or may not be stored; it was not confirmed.
    #[error("ledger {0} failed; outcome of pending adds unknown: {1}")]
    WriterFailed(u64, String),
    #[error("ledger {0} not found")]
    NoSuchLedger(u64),
    #[error("entry {1} of ledger {0} not readable: {2}")]
    Unreadable(u64, u64, String),
    #[error("ledger {0} is closed")]
    Closed(u64),
    #[error("concurrent metadata change on ledger {0}")]
    Conflict(u64),
}

impl From<MetadataError> for LedgerError {
    fn from(e: MetadataError) -> Self {
        LedgerError::Metadata(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerState {
    Open,
    InRecovery,
    Closed,
}

/// Entries from `first_entry` on are stored on `bookies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub first_entry: u64,
    pub bookies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMetadata {
    pub ledger_id: u64,
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub fragments: Vec<Fragment>,
    pub state: LedgerState,
    /// Last entry of a closed ledger (-1: empty).
    pub last_entry_id: i64,
    pub length_bytes: u64,
    pub master_key: MasterKey,
    pub created_ms: u64,
    pub properties: BTreeMap<String, String>,
}

impl LedgerMetadata {
    pub fn fragment_for(&self, entry_id: u64) -> Option<&Fragment> {
        self.fragments
            .iter()
            .rev()
            .find(|f| f.first_entry <= entry_id)
    }

    /// Bookies holding `entry_id`, in write-set order.
    pub fn bookies_for(&self, entry_id: u64) -> Vec<String> {
        match self.fragment_for(entry_id) {
            Some(f) => write_set(self.ensemble_size, self.write_quorum, entry_id)
                .into_iter()
                .map(|i| f.bookies[i].clone())
                .collect(),
            None => Vec::new(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ledger_key(id: u64) -> String {
    format!("{LEDGERS_PREFIX}{id:020}")
}

#[derive(Clone)]
pub struct LedgerClient {
    metadata: MetadataClient,
    rpc: RpcClient,
}

impl LedgerClient {
    pub fn new(metadata: MetadataClient, rpc: RpcClient) -> LedgerClient {
        LedgerClient { metadata, rpc }
    }

    async fn call(&self, bookie: &str, req: &BookieRequest) -> Result<BookieResponse, LedgerError> {
        let addr: SocketAddr = bookie.parse().map_err(|_| LedgerError::Unreachable {
            bookie: bookie.into(),
            reason: "bad address".into(),
        })?;
        match self.rpc.call::<_, BookieResponse>(addr, req).await {
            Ok(BookieResponse::Error(code)) => Err(LedgerError::Bookie {
                bookie: bookie.into(),
                code,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(LedgerError::Unreachable {
                bookie: bookie.into(),
                reason: e.to_string(),
            }),
        }
    }

    /// Registered bookies that accept writes.
    pub async fn writable_bookies(&self) -> Result<Vec<BookieInfo>, LedgerError> {
        let kvs = self.metadata.range(BOOKIES_PREFIX, 0).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<BookieInfo>(&kv.value).ok())
            .filter(|b| b.writable)
            .collect())
    }

    async fn next_ledger_id(&self) -> Result<u64, LedgerError> {
        loop {
            let cur = self.metadata.get(LEDGER_ID_KEY).await?;
            let (version, next) = match &cur {
                Some(kv) => (
                    kv.version,
                    std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(1),
                ),
                None => (0, 1),
            };
            if self
                .metadata
                .cas(
                    LEDGER_ID_KEY,
                    version,
                    (next + 1).to_string().into_bytes(),
                    None,
                )
                .await?
            {
                return Ok(next);
            }
        }
    }

    pub async fn create(
        &self,
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        properties: BTreeMap<String, String>,
    ) -> Result<LedgerWriter, LedgerError> {
        let mut bookies = self.writable_bookies().await?;
        if bookies.len() < ensemble_size {
            return Err(LedgerError::NotEnoughBookies {
                need: ensemble_size,
                have: bookies.len(),
            });
        }
        // Spread over bookies: start from a position that moves with time.
        let start = (now_ms() as usize) % bookies.len();
        bookies.rotate_left(start);
        let ensemble: Vec<String> = bookies
            .into_iter()
            .take(ensemble_size)
            .map(|b| b.addr)
            .collect();
        let ledger_id = self.next_ledger_id().await?;
        let mut master_key = [0u8; 16];
        master_key[..8].copy_from_slice(&ledger_id.to_be_bytes());
        master_key[8..].copy_from_slice(&(now_ms() ^ std::process::id() as u64).to_be_bytes());
        let meta = LedgerMetadata {
            ledger_id,
            ensemble_size,
            write_quorum,
            ack_quorum,
            fragments: vec![Fragment {
                first_entry: 0,
                bookies: ensemble,
            }],
            state: LedgerState::Open,
            last_entry_id: -1,
            length_bytes: 0,
            master_key,
            created_ms: now_ms(),
            properties,
        };
        let value = serde_json::to_vec(&meta).map_err(|e| LedgerError::Metadata(e.to_string()))?;
        if !self
            .metadata
            .cas(&ledger_key(ledger_id), 0, value, None)
            .await?
        {
            return Err(LedgerError::Conflict(ledger_id));
        }
        tracing::debug!(ledger_id, ensemble = ?meta.fragments[0].bookies, "ledger created");
        Ok(LedgerWriter::new(self.clone(), meta))
    }

    /// The ledger's metadata and its version (for CAS).
    pub async fn metadata(&self, ledger_id: u64) -> Result<(LedgerMetadata, u64), LedgerError> {
        let kv = self
            .metadata
            .get(&ledger_key(ledger_id))
            .await?
            .ok_or(LedgerError::NoSuchLedger(ledger_id))?;
        let meta =
            serde_json::from_slice(&kv.value).map_err(|e| LedgerError::Metadata(e.to_string()))?;
        Ok((meta, kv.version))
    }

    async fn store_metadata(
        &self,
        meta: &LedgerMetadata,
        version: u64,
    ) -> Result<bool, LedgerError> {
        let value = serde_json::to_vec(meta).map_err(|e| LedgerError::Metadata(e.to_string()))?;
        Ok(self
            .metadata
            .cas(&ledger_key(meta.ledger_id), version, value, None)
            .await?)
    }

    pub async fn delete(&self, ledger_id: u64) -> Result<(), LedgerError> {
        self.metadata.delete(&ledger_key(ledger_id)).await?;
        Ok(())
    }

    /// Reads one entry from any bookie of its write set, checking its digest.
    pub async fn read(&self, meta: &LedgerMetadata, entry_id: u64) -> Result<Bytes, LedgerError> {
        let mut errors = Vec::new();
        for bookie in meta.bookies_for(entry_id) {
            match self
                .call(
                    &bookie,
                    &BookieRequest::Read {
                        ledger_id: meta.ledger_id,
                        entry_id,
                    },
                )
                .await
            {
                Ok(BookieResponse::Entry {
                    ledger_id,
                    entry_id: e,
                    lac,
                    payload,
                    digest,
                }) => {
                    if ledger_id == meta.ledger_id
                        && e == entry_id
                        && entry_digest(ledger_id, e, lac, &payload) == digest
                    {
                        return Ok(payload);
                    }
                    tracing::error!(
                        bookie,
                        ledger_id,
                        entry_id,
                        "entry from bookie fails its digest; trying another replica"
                    );
                    errors.push(format!("{bookie}: bad digest"));
                }
                Ok(other) => errors.push(format!("{bookie}: unexpected {other:?}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(LedgerError::Unreadable(
            meta.ledger_id,
            entry_id,
            errors.join("; "),
        ))
    }

    /// Fences the ledger so its writer can no longer add, finds the last
    /// entry that may have been confirmed, re-replicates it, and closes the
    /// ledger there. Safe to run concurrently: all runs agree on the end.
    pub async fn recover(&self, ledger_id: u64) -> Result<LedgerMetadata, LedgerError> {
        loop {
            let (mut meta, version) = self.metadata(ledger_id).await?;
            if meta.state == LedgerState::Closed {
                return Ok(meta);
            }
            if meta.state == LedgerState::Open {
                meta.state = LedgerState::InRecovery;
                if !self.store_metadata(&meta, version).await? {
                    continue;
                }
                return self.finish_recovery(meta, version + 1).await;
            }
            return self.finish_recovery(meta, version).await;
        }
    }

    async fn finish_recovery(
        &self,
        mut meta: LedgerMetadata,
        version: u64,
    ) -> Result<LedgerMetadata, LedgerError> {
        let id = meta.ledger_id;
        let last = meta
            .fragments
            .last()
            .cloned()
            .ok_or(LedgerError::Metadata("ledger without fragments".into()))?;
        let fence = BookieRequest::Fence {
            ledger_id: id,
            master_key: meta.master_key,
        };
        let fences = join_all(last.bookies.iter().map(|b| self.call(b, &fence))).await;
        let mut lac = -1i64;
        let mut fenced = 0;
        for (b, r) in last.bookies.iter().zip(&fences) {
            match r {
                Ok(BookieResponse::Lac { lac: l, .. }) => {
                    fenced += 1;
                    lac = lac.max(*l);
                }
                other => {
                    tracing::warn!(bookie = %b, ledger_id = id, result = ?other, "fence failed")
                }
            }
        }
        // With at most Qa-1 bookies unfenced, no write set can gather Qa acks any more.
        let need = meta.ensemble_size - meta.ack_quorum + 1;
        if fenced < need {
            return Err(LedgerError::WriterFailed(
                id,
                format!("fenced {fenced} bookies, need {need}"),
            ));
        }
        let mut entry = (lac + 1).max(last.first_entry as i64) as u64;
        let mut length = 0u64;
        loop {
            let set = meta.bookies_for(entry);
            let read = BookieRequest::Read {
                ledger_id: id,
                entry_id: entry,
            };
            let reads = join_all(set.iter().map(|b| self.call(b, &read))).await;
            let mut found = None;
            let mut missing = 0;
            for r in reads {
                match r {
                    Ok(BookieResponse::Entry {
                        lac: l,
                        payload,
                        digest,
                        ..
                    }) if entry_digest(id, entry, l, &payload) == digest => {
                        found = Some((l, payload, digest));
                    }
                    Err(LedgerError::Bookie {
                        code: BookieErrorCode::NoSuchEntry | BookieErrorCode::NoSuchLedger,
                        ..
                    }) => missing += 1,
                    _ => {}
                }
            }
            match found {
                Some((l, payload, digest)) => {
                    // Re-replicate to the whole write set so the end is durable at Qw.
                    length += payload.len() as u64;
                    let add = BookieRequest::Add {
                        ledger_id: id,
                        entry_id: entry,
                        master_key: meta.master_key,
                        lac: l,
                        payload,
                        digest,
                        recovery: true,
                    };
                    let acks = join_all(set.iter().map(|b| self.call(b, &add)))
                        .await
                        .into_iter()
                        .filter(|r| r.is_ok())
                        .count();
                    if acks < meta.ack_quorum {
                        return Err(LedgerError::WriterFailed(
                            id,
                            format!("re-replication of entry {entry} reached {acks} bookies"),
                        ));
                    }
                    entry += 1;
                }
                None if missing > meta.write_quorum - meta.ack_quorum => break,
                None => {
                    return Err(LedgerError::Unreadable(
                        id,
                        entry,
                        "too few bookies answered during recovery".into(),
                    ))
                }
            }
        }
        meta.state = LedgerState::Closed;
        meta.last_entry_id = entry as i64 - 1;
        meta.length_bytes += length;
        if !self.store_metadata(&meta, version).await? {
            let (now, _) = self.metadata(id).await?;
            if now.state == LedgerState::Closed {
                return Ok(now);
            }
            return Err(LedgerError::Conflict(id));
        }
        tracing::info!(
            ledger_id = id,
            last_entry_id = meta.last_entry_id,
            "ledger recovered and closed"
        );
        Ok(meta)
    }
}

type AddResult = Result<u64, LedgerError>;

struct WriterInner {
    state: WriteState,
    waiting: HashMap<u64, oneshot::Sender<AddResult>>,
    failed: Option<LedgerError>,
    closed: bool,
    length_bytes: u64,
}

/// The single writer of one ledger.
#[derive(Clone)]
pub struct LedgerWriter {
    client: LedgerClient,
    meta: Arc<LedgerMetadata>,
    inner: Arc<Mutex<WriterInner>>,
    /// Woken when nothing is pending any more, or the writer failed.
    settled: Arc<tokio::sync::Notify>,
}

impl LedgerWriter {
    fn new(client: LedgerClient, meta: LedgerMetadata) -> LedgerWriter {
        let state = WriteState::new(meta.ensemble_size, meta.write_quorum, meta.ack_quorum, 0);
        LedgerWriter {
            client,
            meta: Arc::new(meta),
            inner: Arc::new(Mutex::new(WriterInner {
                state,
                waiting: HashMap::new(),
                failed: None,
                closed: false,
                length_bytes: 0,
            })),
            settled: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ledger_id(&self) -> u64 {
        self.meta.ledger_id
    }

    pub fn metadata(&self) -> &LedgerMetadata {
        &self.meta
    }

    pub fn lac(&self) -> i64 {
        self.lock().state.lac()
    }

    pub fn length_bytes(&self) -> u64 {
        self.lock().length_bytes
    }

    /// Appends an entry. The id is assigned when this is called (so calls
    /// made in order get ids in order); the future resolves once the entry is
    /// confirmed, i.e. durable on Qa bookies along with every earlier entry.
    pub fn add(&self, payload: Bytes) -> impl Future<Output = AddResult> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let mut g = self.lock();
        let ready = if let Some(e) = &g.failed {
            Some(Err(e.clone()))
        } else if g.closed {
            Some(Err(LedgerError::Closed(self.meta.ledger_id)))
        } else {
            None
        };
        if let Some(r) = ready {
            drop(g);
            let _ = tx.send(r);
        } else {
            let entry_id = g.state.assign();
            let lac = g.state.lac();
            let positions = g.state.write_set(entry_id);
            g.length_bytes += payload.len() as u64;
            g.waiting.insert(entry_id, tx);
            drop(g);
            let digest = entry_digest(self.meta.ledger_id, entry_id, lac, &payload);
            let fragment = self.meta.fragments.last().cloned();
            for pos in positions {
                let me = self.clone();
                let bookie = fragment
                    .as_ref()
                    .map(|f| f.bookies[pos].clone())
                    .unwrap_or_default();
                let req = BookieRequest::Add {
                    ledger_id: self.meta.ledger_id,
                    entry_id,
                    master_key: self.meta.master_key,
                    lac,
                    payload: payload.clone(),
                    digest,
                    recovery: false,
                };
                tokio::spawn(async move {
                    match me.client.call(&bookie, &req).await {
                        Ok(BookieResponse::Added { .. }) => me.acked(entry_id, pos),
                        Ok(other) => me.fail(format!("{bookie}: unexpected {other:?}")),
                        Err(e) => me.fail(e.to_string()),
                    }
                });
            }
        }
        async move {
            rx.await
                .unwrap_or_else(|_| Err(LedgerError::WriterFailed(0, "writer dropped".into())))
        }
    }

    fn acked(&self, entry_id: u64, pos: usize) {
        let mut g = self.lock();
        let confirmed = g.state.on_ack(entry_id, pos);
        let senders: Vec<_> = confirmed
            .into_iter()
            .filter_map(|e| g.waiting.remove(&e).map(|s| (e, s)))
            .collect();
        let settled = g.state.pending() == 0;
        drop(g);
        if settled {
            self.settled.notify_waiters();
        }
        for (e, s) in senders {
            let _ = s.send(Ok(e));
        }
    }

    /// A bookie failed: every add not yet confirmed has an unknown outcome.
    /// (Replacing the bookie and going on — ensemble change — is not done
    /// here yet; the owner rolls to a new ledger instead.)
    fn fail(&self, reason: String) {
        let mut g = self.lock();
        let err = LedgerError::WriterFailed(self.meta.ledger_id, reason);
        if g.failed.is_none() {
            tracing::warn!(ledger_id = self.meta.ledger_id, error = %err, "ledger writer failed");
            g.failed = Some(err.clone());
        }
        let waiting: Vec<_> = g.waiting.drain().collect();
        drop(g);
        self.settled.notify_waiters();
        for (_, s) in waiting {
            let _ = s.send(Err(err.clone()));
        }
    }

    pub fn is_failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Stops accepting adds and, once nothing is pending, closes the ledger at
    /// its LAC. A failed writer's ledger is left for recovery to close.
    pub async fn close(&self) -> Result<LedgerMetadata, LedgerError> {
        self.lock().closed = true;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Register before looking, so a wake-up in between is not missed.
            settled.as_mut().enable();
            {
                let g = self.lock();
                if let Some(e) = &g.failed {
                    return Err(e.clone());
                }
                if g.state.pending() == 0 {
                    break;
                }
            }
            settled.await;
        }
        let (lac, length) = {
            let g = self.lock();
            (g.state.lac(), g.length_bytes)
        };
        let (mut meta, version) = self.client.metadata(self.meta.ledger_id).await?;
        if meta.state != LedgerState::Open {
            return Err(LedgerError::Conflict(meta.ledger_id));
        }
        meta.state = LedgerState::Closed;
        meta.last_entry_id = lac;
        meta.length_bytes = length;
        if !self.client.store_metadata(&meta, version).await? {
            return Err(LedgerError::Conflict(meta.ledger_id));
        }
        Ok(meta)
    }
}
