//! The ledger client: a handle on the metadata service and the bookies —
//! creates ledgers (a metadata record naming the ensemble and quorums),
//! stores their metadata by CAS, and talks to bookies. Reads are in
//! `read.rs`, recovery in `recovery.rs`, writes in `writer.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use magnetar_metadata::MetadataClient;
use magnetar_proto::ledger::{BookieRequest, BookieResponse};
use magnetar_proto::rpc::RpcClient;

use super::add_queue::AddQueues;
use super::error::LedgerError;
use super::meta::{Fragment, LedgerMetadata, LedgerState};
use super::placement::place;
use super::writer::{LedgerWriter, SHRUNK_ENSEMBLES};
use crate::registry::{ledger_key, BookieInfo, BOOKIES_PREFIX, LEDGER_ID_KEY};

/// How long a writer left with fewer bookies than its write quorum waits
/// for one to come back before it fails (its adds with it).
pub const BELOW_QUORUM_WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long a bookie may take to acknowledge an add before the writer
/// replaces it. A bookie killed without closing its connections answers
/// nothing; this bounds how long writes wait for it.
pub const DEFAULT_ADD_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a bookie that failed is asked last by reads.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct LedgerClient {
    pub(super) metadata: MetadataClient,
    pub(super) rpc: RpcClient,
    /// Per-bookie batching of adds, over `rpc` with the add timeout.
    pub(super) adds: AddQueues,
    /// Bookies that failed recently, and when.
    suspects: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// How long a writer below its write quorum waits for a bookie.
    pub(super) below_quorum_wait: Duration,
}

impl LedgerClient {
    pub fn new(metadata: MetadataClient, rpc: RpcClient) -> LedgerClient {
        let mut add_rpc = rpc.clone();
        add_rpc.timeout = DEFAULT_ADD_TIMEOUT;
        add_rpc.connect_timeout = DEFAULT_ADD_TIMEOUT.min(Duration::from_secs(1));
        LedgerClient {
            metadata,
            rpc,
            adds: AddQueues::new(add_rpc),
            suspects: Arc::default(),
            below_quorum_wait: BELOW_QUORUM_WAIT,
        }
    }

    /// Sets how long an add may wait for a bookie before it is replaced.
    /// How long a writer left with fewer bookies than its write quorum waits
    /// for one before failing (default [`BELOW_QUORUM_WAIT`]).
    pub fn with_below_quorum_wait(mut self, wait: Duration) -> LedgerClient {
        self.below_quorum_wait = wait;
        self
    }

    pub fn with_add_timeout(mut self, timeout: Duration) -> LedgerClient {
        self.adds.set_timeout(timeout);
        self
    }

    pub(super) async fn call(
        &self,
        bookie: &str,
        req: &BookieRequest,
    ) -> Result<BookieResponse, LedgerError> {
        Self::call_with(&self.rpc, bookie, req).await
    }

    pub(super) async fn call_with(
        rpc: &RpcClient,
        bookie: &str,
        req: &BookieRequest,
    ) -> Result<BookieResponse, LedgerError> {
        let addr: SocketAddr = magnetar_proto::resolve::socket_addr(bookie).ok_or_else(|| {
            LedgerError::Unreachable {
                bookie: bookie.into(),
                reason: "address does not resolve".into(),
            }
        })?;
        match rpc.call::<_, BookieResponse>(addr, req).await {
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

    /// A writable bookie to take over from one of `current`, on a rack the
    /// others of `current` do not cover when possible.
    pub(super) async fn place_replacement(
        &self,
        current: &[String],
    ) -> Result<String, LedgerError> {
        let have = self.place_replacements(current, &[], 1).await?;
        have.into_iter()
            .next()
            .ok_or(LedgerError::NotEnoughBookies { need: 1, have: 0 })
    }

    /// Up to `leaving.len()` writable bookies outside `current` to take over
    /// from `leaving` (members of `current`), on racks the staying members
    /// do not cover when possible; fewer when there are not enough spares.
    pub(super) async fn place_replacements(
        &self,
        current: &[String],
        leaving: &[String],
        n: usize,
    ) -> Result<Vec<String>, LedgerError> {
        let all = self.writable_bookies().await?;
        let used: BTreeSet<Option<String>> = all
            .iter()
            .filter(|b| current.contains(&b.addr) && !leaving.contains(&b.addr))
            .map(|b| b.rack.clone())
            .collect();
        let candidates: Vec<BookieInfo> = all
            .into_iter()
            .filter(|b| !current.contains(&b.addr) && !leaving.contains(&b.addr))
            .collect();
        let n = n.min(candidates.len());
        Ok(place(candidates, n, &used, now_ms() as usize).unwrap_or_default())
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

    /// A new ledger id: the revision of an unconditional write to the id
    /// key. Revisions are unique and grow, so ids do too, and concurrent
    /// creators never retry (a compare-and-set counter made n creators at
    /// once cost O(n²) attempts). Ids handed out by that older counter are
    /// all below the revision of any write made after them.
    async fn next_ledger_id(&self) -> Result<u64, LedgerError> {
        let res = self
            .metadata
            .txn(magnetar_metadata::Txn {
                compares: vec![],
                success: vec![magnetar_metadata::Op::Put {
                    key: LEDGER_ID_KEY.into(),
                    value: Vec::new(),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        Ok(res.revision)
    }

    pub async fn create(
        &self,
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        properties: BTreeMap<String, String>,
    ) -> Result<LedgerWriter, LedgerError> {
        let bookies = self.writable_bookies().await?;
        let have = bookies.len();
        // Fewer writable bookies than the ensemble asks for, but a write
        // quorum: the ledger is striped over those (the next one gets the
        // full width again once bookies are back).
        let width = super::placement::create_width(ensemble_size, write_quorum, have)
            .map_err(|(need, have)| LedgerError::NotEnoughBookies { need, have })?;
        if width < ensemble_size {
            SHRUNK_ENSEMBLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                ensemble_size,
                width,
                write_quorum,
                "only {width} writable bookies: the new ledger is striped over them"
            );
        }
        let ensemble = place(bookies, width, &BTreeSet::new(), now_ms() as usize)
            .ok_or(LedgerError::NotEnoughBookies { need: width, have })?;
        let ensemble_size = width;
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
        Ok(LedgerWriter::new(self.clone(), meta, 1))
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

    /// Stores `meta` if the record is still at `version`.
    pub(super) async fn store_metadata(
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

    /// Notes that `bookie` just failed: reads ask it last for a while.
    pub(super) fn suspect(&self, bookie: &str) {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bookie.to_string(), std::time::Instant::now());
    }

    pub(super) fn is_suspect(&self, bookie: &str) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bookie)
            .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
    }
}
