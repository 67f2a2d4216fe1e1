//! The ledger client: creates ledgers (a metadata record naming the ensemble
//! and quorums), writes with quorum counting, reads with digest checks,
//! closes, and fences + recovers ledgers whose writer went away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::join_all;
use magnetar_metadata::{MetadataClient, MetadataError};
use magnetar_proto::ledger::{
    entry_digest, AddRequest, BookieErrorCode, BookieRequest, BookieResponse, MasterKey,
    RangeEntry, MAX_RANGE_BYTES,
};
use magnetar_proto::rpc::RpcClient;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::add_queue::{AddOutcome, AddQueues, AddSink, AddTag};
use crate::server::{BookieInfo, BOOKIES_PREFIX};
use crate::write_state::{write_set, WriteState};

pub const LEDGERS_PREFIX: &str = "/ledgers/";

/// How long a writer left with fewer bookies than its write quorum waits
/// for one to come back before it fails (its adds with it).
pub const BELOW_QUORUM_WAIT: Duration = Duration::from_secs(10);

/// Ledgers created, and fragments started, on fewer bookies than their
/// ensemble size (no spare bookie was writable), since the process started.
pub static SHRUNK_ENSEMBLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
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

    /// Entries from `first_entry` on go to `bookies`: a new fragment, or the
    /// last one rewritten when it starts there too (nothing written to it yet).
    pub fn start_fragment(&mut self, first_entry: u64, bookies: Vec<String>) {
        match self.fragments.last_mut() {
            Some(f) if f.first_entry == first_entry => f.bookies = bookies,
            _ => self.fragments.push(Fragment {
                first_entry,
                bookies,
            }),
        }
    }

    /// How many bookies the entries of `entry_id`'s fragment are striped
    /// over: its bookie count. That is the ledger's ensemble size, except
    /// in a fragment a writer shrank because no spare bookie was left.
    pub fn width_at(&self, entry_id: u64) -> usize {
        self.fragment_for(entry_id)
            .map(|f| f.bookies.len())
            .unwrap_or(self.ensemble_size)
            .max(1)
    }

    /// Bookies holding `entry_id`, in write-set order.
    pub fn bookies_for(&self, entry_id: u64) -> Vec<String> {
        match self.fragment_for(entry_id) {
            Some(f) => write_set(
                f.bookies.len().max(1),
                self.write_quorum.min(f.bookies.len().max(1)),
                entry_id,
            )
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

/// How long a bookie may take to acknowledge an add before the writer
/// replaces it. A bookie killed without closing its connections answers
/// nothing; this bounds how long writes wait for it.
pub const DEFAULT_ADD_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a read waits for one replica before asking the next as well.
pub const SPECULATIVE_READ_DELAY: Duration = Duration::from_millis(50);

/// Single-entry reads in flight at once when a range read falls back to
/// reading entry by entry.
pub const READ_AHEAD_PARALLEL: usize = 16;

/// A range read asks a bookie for this many entries of one stripe at a
/// time (one `ReadRange` request; fewer when their payloads pass
/// [`MAX_RANGE_BYTES`]).
const RANGE_STRIPE_ENTRIES: u64 = 256;
/// How long a range read waits for one bookie's answer before asking the
/// next of the write set as well (an answer carries up to 1 MiB, some of
/// it from disk: longer than a single read's delay).
pub const SPECULATIVE_RANGE_READ_DELAY: Duration = Duration::from_millis(200);
/// Stretches of [`RANGE_STRIPE_ENTRIES`] × E entries a range read has in
/// flight at once (read-ahead).
const RANGE_CHUNKS_IN_FLIGHT: usize = 4;

/// Recovery reads the ledger's tail this many entries at a time at first,
/// then as many as fit [`RECOVERY_WINDOW_BYTES`] (at most
/// [`RECOVERY_WINDOW_MAX`]).
const RECOVERY_WINDOW_FIRST: usize = 16;
const RECOVERY_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
const RECOVERY_WINDOW_MAX: usize = 256;

/// One tail entry as recovery finds it.
enum TailRead {
    /// On some bookie, with a good digest: the add to re-replicate.
    Found(AddRequest),
    /// Missing on too many bookies to have been confirmed: the tail ends.
    Missing,
    /// Neither: too few bookies answered.
    Unknown,
}

/// How long a bookie that failed is asked last by reads.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct LedgerClient {
    metadata: MetadataClient,
    rpc: RpcClient,
    /// Per-bookie batching of adds, over `rpc` with the add timeout.
    adds: AddQueues,
    /// Bookies that failed recently, and when.
    suspects: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// How long a writer below its write quorum waits for a bookie.
    below_quorum_wait: Duration,
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

    pub(crate) async fn call(
        &self,
        bookie: &str,
        req: &BookieRequest,
    ) -> Result<BookieResponse, LedgerError> {
        Self::call_with(&self.rpc, bookie, req).await
    }

    async fn call_with(
        rpc: &RpcClient,
        bookie: &str,
        req: &BookieRequest,
    ) -> Result<BookieResponse, LedgerError> {
        let addr: SocketAddr = bookie.parse().map_err(|_| LedgerError::Unreachable {
            bookie: bookie.into(),
            reason: "bad address".into(),
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
    pub(crate) async fn place_replacement(
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
    pub(crate) async fn place_replacements(
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
        Ok(place(candidates, n, &used).unwrap_or_default())
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
        let width = crate::ensemble::create_width(ensemble_size, write_quorum, have)
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
        let ensemble = place(bookies, width, &BTreeSet::new())
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
    pub(crate) async fn store_metadata(
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

    /// Reads one entry from a bookie of its write set, checking its digest.
    /// Bookies that failed recently are asked last; when one does not answer
    /// within [`SPECULATIVE_READ_DELAY`], the next is asked too and the
    /// first good answer wins. A corrupt copy is reported and skipped.
    pub async fn read(&self, meta: &LedgerMetadata, entry_id: u64) -> Result<Bytes, LedgerError> {
        let mut order = meta.bookies_for(entry_id);
        order.sort_by_key(|b| self.is_suspect(b));
        let req = BookieRequest::Read {
            ledger_id: meta.ledger_id,
            entry_id,
        };
        let launch = |b: String| {
            let req = &req;
            async move { (self.call(&b, req).await, b) }
        };
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        let mut errors = Vec::new();
        loop {
            // Nothing in flight (start, or every asked replica failed): ask the next.
            if inflight.is_empty() {
                match order.get(next) {
                    Some(b) => {
                        inflight.push(launch(b.clone()));
                        next += 1;
                    }
                    None => break,
                }
            }
            let delay = tokio::time::sleep(SPECULATIVE_READ_DELAY);
            tokio::select! {
                Some((r, bookie)) = futures::StreamExt::next(&mut inflight) => {
                    match r {
                        Ok(BookieResponse::Entry { ledger_id, entry_id: e, lac, payload, digest }) => {
                            if ledger_id == meta.ledger_id
                                && e == entry_id
                                && entry_digest(ledger_id, e, lac, &payload) == digest
                            {
                                return Ok(payload);
                            }
                            tracing::error!(bookie, ledger_id, entry_id, "entry from bookie fails its digest; trying another replica");
                            errors.push(format!("{bookie}: bad digest"));
                        }
                        Ok(other) => errors.push(format!("{bookie}: unexpected {other:?}")),
                        Err(e) => {
                            if matches!(e, LedgerError::Unreachable { .. }) {
                                self.suspect(&bookie);
                            }
                            errors.push(e.to_string());
                        }
                    }
                }
                _ = delay, if next < order.len() => {
                    inflight.push(launch(order[next].clone()));
                    next += 1;
                }
            }
        }
        Err(LedgerError::Unreadable(
            meta.ledger_id,
            entry_id,
            errors.join("; "),
        ))
    }

    /// For readers tailing an open ledger: waits until some bookie of the
    /// current ensemble knows a LAC above `previous` (or `timeout`), and
    /// returns the highest LAC known then. Entries up to it are readable.
    pub async fn wait_for_lac(
        &self,
        meta: &LedgerMetadata,
        previous: i64,
        timeout: Duration,
    ) -> Result<i64, LedgerError> {
        use futures::StreamExt;
        let bookies = meta
            .fragments
            .last()
            .map(|f| f.bookies.clone())
            .unwrap_or_default();
        let req = BookieRequest::ReadLacLongPoll {
            ledger_id: meta.ledger_id,
            previous_lac: previous,
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut rpc = self.rpc.clone();
        rpc.timeout = timeout + Duration::from_secs(2);
        let mut polls: futures::stream::FuturesUnordered<_> = bookies
            .iter()
            .map(|b| Self::call_with(&rpc, b, &req))
            .collect();
        let mut best = previous;
        let mut answered = 0;
        while let Some(r) = polls.next().await {
            if let Ok(BookieResponse::Lac { lac, .. }) = r {
                answered += 1;
                best = best.max(lac);
                if lac > previous {
                    return Ok(best);
                }
            }
        }
        if answered == 0 {
            return Err(LedgerError::Unreadable(
                meta.ledger_id,
                (previous + 1).max(0) as u64,
                "no bookie answered the LAC poll".into(),
            ));
        }
        Ok(best)
    }

    /// Reads entries `first..=last`, for catch-up readers; one result per
    /// entry, in order. The range is read in stretches of
    /// [`RANGE_STRIPE_ENTRIES`] × E entries ([`RANGE_CHUNKS_IN_FLIGHT`] at
    /// once), each with one `ReadRange` request per stripe — the entries
    /// whose ids are equal mod E, which share a write set — to its first
    /// bookie not suspected of failing: a request carries hundreds of
    /// entries instead of one. What a bookie does not return (it failed,
    /// answered short, or sent a copy that fails its digest) is read entry
    /// by entry as [`LedgerClient::read`] does, from any replica.
    pub async fn read_range(
        &self,
        meta: &LedgerMetadata,
        first: u64,
        last: u64,
    ) -> Vec<Result<Bytes, LedgerError>> {
        use futures::StreamExt;
        let e = (meta.ensemble_size as u64).max(1);
        let mut chunks = Vec::new();
        let mut at = first;
        while at <= last {
            // Within one fragment: a stripe's write set is then the same
            // for all its entries.
            let fragment_end = meta
                .fragments
                .iter()
                .find(|f| f.first_entry > at)
                .map(|f| f.first_entry - 1)
                .unwrap_or(u64::MAX);
            let end = last
                .min(fragment_end)
                .min(at.saturating_add(RANGE_STRIPE_ENTRIES * e - 1));
            chunks.push((at, end));
            match end.checked_add(1) {
                Some(next) => at = next,
                None => break,
            }
        }
        futures::stream::iter(chunks)
            .map(|(a, b)| self.read_chunk(meta, a, b))
            .buffered(RANGE_CHUNKS_IN_FLIGHT)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    /// Entries `first..=last` of one fragment: a `ReadRange` per stripe,
    /// then entry by entry for what those did not bring.
    async fn read_chunk(
        &self,
        meta: &LedgerMetadata,
        first: u64,
        last: u64,
    ) -> Vec<Result<Bytes, LedgerError>> {
        use futures::StreamExt;
        let step = meta.width_at(first) as u64;
        let n = (last - first + 1) as usize;
        let mut got: Vec<Option<Bytes>> = vec![None; n];
        let stripes = (first..=last).take(step as usize);
        for (start, entries) in
            join_all(stripes.map(|s| self.read_stripe(meta, s, last, step))).await
        {
            for (k, payload) in entries.into_iter().enumerate() {
                got[(start - first) as usize + k * step as usize] = Some(payload);
            }
        }
        let missing: Vec<usize> = (0..n).filter(|i| got[*i].is_none()).collect();
        let filled: Vec<Result<Bytes, LedgerError>> = futures::stream::iter(missing)
            .map(|i| self.read(meta, first + i as u64))
            .buffered(READ_AHEAD_PARALLEL)
            .collect()
            .await;
        // The gaps, in order, take the single reads, in the same order.
        let mut filled = filled.into_iter();
        got.into_iter()
            .map(|g| match g {
                Some(payload) => Ok(payload),
                None => filled.next().unwrap_or_else(|| {
                    Err(LedgerError::Unreadable(
                        meta.ledger_id,
                        first,
                        "lost read".into(),
                    ))
                }),
            })
            .collect()
    }

    /// Entries `start`, `start + step`, … up to `last` from the first
    /// bookie of their write set not suspected of failing, in as many
    /// `ReadRange` requests as it takes: the payloads of the first entries
    /// of the stripe that came back, in order, with good digests (maybe
    /// none). Returns `start` with them.
    async fn read_stripe(
        &self,
        meta: &LedgerMetadata,
        start: u64,
        last: u64,
        step: u64,
    ) -> (u64, Vec<Bytes>) {
        let mut got = Vec::new();
        let mut order = meta.bookies_for(start);
        order.sort_by_key(|b| self.is_suspect(b));
        let mut next = start;
        while next <= last {
            let entries = self
                .range_read(meta.ledger_id, &order, next, last, step)
                .await;
            if entries.is_empty() {
                break; // no progress: the rest entry by entry
            }
            let n = entries.len() as u64;
            got.extend(entries.into_iter().map(|e| e.payload));
            match n.checked_mul(step).and_then(|d| next.checked_add(d)) {
                Some(after) => next = after,
                None => break,
            }
        }
        (start, got)
    }

    /// One `ReadRange` for entries `first`, `first + step`, … up to `last`,
    /// from the bookies of `order` (see [`Self::range_call`]): the entries
    /// of the answer that follow in sequence from `first` with good digests
    /// — maybe none (a spoilt copy is reported and ends them).
    pub(crate) async fn range_read(
        &self,
        ledger_id: u64,
        order: &[String],
        first: u64,
        last: u64,
        step: u64,
    ) -> Vec<RangeEntry> {
        let req = BookieRequest::ReadRange {
            ledger_id,
            first,
            last,
            step,
            max_bytes: MAX_RANGE_BYTES,
        };
        let Some((entries, bookie)) = self.range_call(ledger_id, order, &req).await else {
            return Vec::new();
        };
        let mut good = Vec::with_capacity(entries.len());
        let mut expect = Some(first);
        for re in entries {
            if expect != Some(re.entry_id) || re.entry_id > last {
                break;
            }
            if entry_digest(ledger_id, re.entry_id, re.lac, &re.payload) != re.digest {
                tracing::error!(
                    bookie = %bookie,
                    ledger_id,
                    entry_id = re.entry_id,
                    "entry from bookie fails its digest; trying another replica"
                );
                break;
            }
            expect = re.entry_id.checked_add(step);
            good.push(re);
        }
        good
    }

    /// Sends a `ReadRange` to the first bookie of `order`, and to the next
    /// as well each time [`SPECULATIVE_RANGE_READ_DELAY`] passes with no
    /// answer (a stalled bookie would otherwise hold a catch-up reader for
    /// the whole RPC timeout); the first answer with entries wins, with the
    /// bookie that sent it. `None` when every bookie failed or had none.
    async fn range_call(
        &self,
        ledger_id: u64,
        order: &[String],
        req: &BookieRequest,
    ) -> Option<(Vec<RangeEntry>, String)> {
        let launch = |b: &String| {
            let b = b.clone();
            async move { (self.call(&b, req).await, b) }
        };
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        loop {
            if inflight.is_empty() {
                inflight.push(launch(order.get(next)?));
                next += 1;
            }
            let delay = tokio::time::sleep(SPECULATIVE_RANGE_READ_DELAY);
            tokio::select! {
                Some((r, bookie)) = futures::StreamExt::next(&mut inflight) => match r {
                    Ok(BookieResponse::Entries { ledger_id: l, entries })
                        if l == ledger_id && !entries.is_empty() =>
                    {
                        return Some((entries, bookie));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if matches!(e, LedgerError::Unreachable { .. }) {
                            self.suspect(&bookie);
                        }
                    }
                },
                _ = delay, if next < order.len() => {
                    inflight.push(launch(&order[next]));
                    next += 1;
                }
            }
        }
    }

    /// Notes that `bookie` just failed: reads ask it last for a while.
    fn suspect(&self, bookie: &str) {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bookie.to_string(), std::time::Instant::now());
    }

    fn is_suspect(&self, bookie: &str) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bookie)
            .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
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
            match self.finish_recovery(meta, version).await {
                // Another recovery changed the metadata (replaced a bookie,
                // or closed it): start over from what it stored.
                Err(LedgerError::Conflict(_)) => continue,
                r => return r,
            }
        }
    }

    /// Reads entry `e` of the ledger's tail from every bookie of `set`
    /// (its write set, less the unreachable) for recovery: found with a
    /// good digest on any; or missing on more than `tolerance` (Qw - Qa) of
    /// them, so it cannot have been confirmed; or neither.
    async fn read_tail_entry(
        &self,
        ledger_id: u64,
        master_key: MasterKey,
        e: u64,
        set: Vec<String>,
        tolerance: usize,
    ) -> TailRead {
        let read = BookieRequest::Read {
            ledger_id,
            entry_id: e,
        };
        let reads = join_all(set.iter().map(|b| self.call(b, &read))).await;
        let mut missing = 0;
        for r in reads {
            match r {
                Ok(BookieResponse::Entry {
                    lac,
                    payload,
                    digest,
                    ..
                }) if entry_digest(ledger_id, e, lac, &payload) == digest => {
                    return TailRead::Found(AddRequest {
                        ledger_id,
                        entry_id: e,
                        master_key,
                        lac,
                        payload,
                        digest,
                        recovery: true,
                    });
                }
                Err(LedgerError::Bookie {
                    code: BookieErrorCode::NoSuchEntry | BookieErrorCode::NoSuchLedger,
                    ..
                }) => missing += 1,
                _ => {}
            }
        }
        if missing > tolerance {
            TailRead::Missing
        } else {
            TailRead::Unknown
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
        let need = last.bookies.len().saturating_sub(meta.ack_quorum) + 1;
        if fenced < need {
            return Err(LedgerError::WriterFailed(
                id,
                format!("fenced {fenced} bookies, need {need}"),
            ));
        }
        let mut entry = (lac + 1).max(last.first_entry as i64) as u64;
        // Entries are looked for on the last fragment as the writer left
        // it; bookies of it that are unreachable are replaced first (a new
        // fragment from `entry`, stored by CAS) so the tail can be
        // re-replicated to a full write quorum.
        let found_on = meta.clone();
        let mut version = version;
        let unreachable: Vec<String> = last
            .bookies
            .iter()
            .zip(&fences)
            .filter(|(_, r)| matches!(r, Err(LedgerError::Unreachable { .. })))
            .map(|(b, _)| b.clone())
            .collect();
        if !unreachable.is_empty() {
            let new = self
                .place_replacements(&last.bookies, &unreachable, unreachable.len())
                .await
                .unwrap_or_default();
            if new.len() < unreachable.len() {
                tracing::warn!(
                    ledger_id = id,
                    "recovery: not enough bookies to replace every unreachable one"
                );
            }
            let (ensemble, _) = swap_bookies(&last.bookies, &unreachable, &new);
            if ensemble != last.bookies {
                meta.start_fragment(entry, ensemble);
                if !self.store_metadata(&meta, version).await? {
                    return Err(LedgerError::Conflict(id));
                }
                version += 1;
                tracing::info!(ledger_id = id, replaced = ?unreachable, first_entry = entry, "recovery replaced unreachable bookies");
            }
        }
        let mut length = 0u64;
        // Bookies that did not answer the fence are not asked again: each
        // attempt would cost a connection timeout per entry.
        let alive = |b: &String| !unreachable.contains(b);
        // A writer with many adds in flight leaves the bookies' LAC that
        // far behind its last entry: the tail is read a window of entries
        // at a time (all reads at once), and re-replicated the same way —
        // one entry at a time cost two round trips per entry.
        let mut window = RECOVERY_WINDOW_FIRST;
        let tolerance = meta.write_quorum - meta.ack_quorum;
        loop {
            let ids: Vec<u64> = (entry..entry + window as u64).collect();
            let reads = join_all(ids.iter().map(|&e| {
                let set: Vec<String> = found_on.bookies_for(e).into_iter().filter(alive).collect();
                self.read_tail_entry(id, meta.master_key, e, set, tolerance)
            }))
            .await;
            // The tail ends at the first entry missing on enough bookies
            // that it cannot have been confirmed.
            let mut found = Vec::new();
            let mut ended = false;
            for (e, r) in ids.iter().zip(reads) {
                match r {
                    TailRead::Found(add) => found.push(add),
                    TailRead::Missing => {
                        ended = true;
                        break;
                    }
                    TailRead::Unknown => {
                        return Err(LedgerError::Unreadable(
                            id,
                            *e,
                            "too few bookies answered during recovery".into(),
                        ))
                    }
                }
            }
            // Re-replicate to the whole write set so the end is durable at Qw.
            let bytes: u64 = found.iter().map(|a| a.payload.len() as u64).sum();
            let acks = join_all(found.into_iter().map(|add| {
                let targets: Vec<String> = meta
                    .bookies_for(add.entry_id)
                    .into_iter()
                    .filter(alive)
                    .collect();
                async move {
                    let add = BookieRequest::Add(add);
                    join_all(targets.iter().map(|b| self.call(b, &add)))
                        .await
                        .into_iter()
                        .filter(|r| r.is_ok())
                        .count()
                }
            }))
            .await;
            for (i, n) in acks.iter().enumerate() {
                if *n < meta.ack_quorum {
                    return Err(LedgerError::WriterFailed(
                        id,
                        format!(
                            "re-replication of entry {} reached {n} bookies",
                            entry + i as u64
                        ),
                    ));
                }
            }
            length += bytes;
            entry += acks.len() as u64;
            if ended {
                break;
            }
            // As many entries as fit the byte budget, judged by these.
            let per_entry = (bytes / acks.len().max(1) as u64).max(1);
            window = ((RECOVERY_WINDOW_BYTES / per_entry) as usize).clamp(1, RECOVERY_WINDOW_MAX);
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

/// An entry sent but not yet confirmed, kept to resend after an ensemble
/// change, with its adder waiting for the outcome (until the writer fails).
struct Unconfirmed {
    payload: Bytes,
    lac: i64,
    digest: u32,
    done: Option<oneshot::Sender<AddResult>>,
}

struct WriterInner {
    /// Entries pending confirmation, each with its `Unconfirmed`.
    state: WriteState<Unconfirmed>,
    /// The ledger's metadata as last stored, and its version for CAS.
    meta: LedgerMetadata,
    version: u64,
    /// Bookies of the current ensemble that failed and await replacement.
    failed_bookies: BTreeSet<String>,
    changing: bool,
    failed: Option<LedgerError>,
    closed: bool,
    length_bytes: u64,
    /// Since when fewer than a write quorum of bookies were left (kept
    /// across ensemble-change rounds: the retried bookie fails again).
    short_since: Option<std::time::Instant>,
}

impl WriterInner {
    /// Every unconfirmed entry whose write set includes one of `positions`,
    /// as (entry, position, bookie, request) to send again — none once the
    /// writer failed (its adders were answered; the entries stay pending
    /// only so that late acks still move the LAC).
    fn resend_to(&self, positions: &[usize]) -> Vec<(u64, usize, String, AddRequest)> {
        let mut out = Vec::new();
        if self.failed.is_some() {
            return out;
        }
        for (id, e) in self.state.pending_entries() {
            for pos in self.state.write_set(id) {
                if positions.contains(&pos) {
                    out.push((
                        id,
                        pos,
                        self.ensemble()[pos].clone(),
                        self.add_request(id, e),
                    ));
                }
            }
        }
        out
    }

    fn ensemble(&self) -> &[String] {
        self.meta
            .fragments
            .last()
            .map(|f| f.bookies.as_slice())
            .unwrap_or(&[])
    }

    fn add_request(&self, entry_id: u64, e: &Unconfirmed) -> AddRequest {
        AddRequest {
            ledger_id: self.meta.ledger_id,
            entry_id,
            master_key: self.meta.master_key,
            lac: e.lac,
            payload: e.payload.clone(),
            digest: e.digest,
            recovery: false,
        }
    }
}

/// The single writer of one ledger. When a bookie fails or times out, the
/// writer replaces it (ensemble change): a new fragment from the first
/// unconfirmed entry, stored by CAS on the ledger's metadata, and every
/// unconfirmed entry resent to the replacement — nothing lost or reordered.
/// Fencing (another writer recovering the ledger) stops it for good.
/// A handle: clones share one writer (one reference count).
#[derive(Clone)]
pub struct LedgerWriter {
    core: Arc<WriterCore>,
}

pub struct WriterCore {
    client: LedgerClient,
    ledger_id: u64,
    inner: Mutex<WriterInner>,
    /// Woken when nothing is pending any more, or the writer failed.
    settled: tokio::sync::Notify,
}

impl std::ops::Deref for LedgerWriter {
    type Target = WriterCore;
    fn deref(&self) -> &WriterCore {
        &self.core
    }
}

/// Bookies' answers come back a batch at a time: acks are counted under one
/// hold of the writer's lock, and a failure is handled once per batch.
impl AddSink for WriterCore {
    fn outcomes(self: Arc<Self>, bookie: &str, outcomes: Vec<(AddTag, AddOutcome)>) {
        let me = LedgerWriter { core: self };
        let mut acks = Vec::with_capacity(outcomes.len());
        let (mut fenced, mut failure) = (false, None);
        for ((entry_id, pos), outcome) in outcomes {
            match outcome {
                Ok(()) => acks.push((entry_id, pos)),
                Err(LedgerError::Bookie {
                    code: BookieErrorCode::Fenced,
                    ..
                }) => fenced = true,
                Err(e) => failure = Some(e),
            }
        }
        me.acked(&acks, bookie);
        // Fenced wins over any other failure in the batch: the writer stops.
        if fenced {
            me.fail(format!(
                "{bookie}: ledger fenced (another writer is recovering it)"
            ));
        } else if let Some(e) = failure {
            me.bookie_failed(bookie, e.to_string());
        }
    }
}

impl LedgerWriter {
    fn new(client: LedgerClient, meta: LedgerMetadata, version: u64) -> LedgerWriter {
        let state = WriteState::new(meta.ensemble_size, meta.write_quorum, meta.ack_quorum, 0);
        let core = WriterCore {
            client,
            ledger_id: meta.ledger_id,
            inner: Mutex::new(WriterInner {
                state,
                meta,
                version,
                failed_bookies: BTreeSet::new(),
                changing: false,
                failed: None,
                closed: false,
                length_bytes: 0,
                short_since: None,
            }),
            settled: Default::default(),
        };
        LedgerWriter {
            core: Arc::new(core),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ledger_id(&self) -> u64 {
        self.ledger_id
    }

    /// The ledger's metadata as this writer last stored it.
    pub fn metadata(&self) -> LedgerMetadata {
        self.lock().meta.clone()
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
            Some(Err(LedgerError::Closed(self.ledger_id)))
        } else {
            None
        };
        if let Some(r) = ready {
            drop(g);
            let _ = tx.send(r);
        } else {
            let entry_id = g.state.next_entry();
            let lac = g.state.lac();
            g.length_bytes += payload.len() as u64;
            let digest = entry_digest(self.ledger_id, entry_id, lac, &payload);
            let e = Unconfirmed {
                payload,
                lac,
                digest,
                done: Some(tx),
            };
            let req = g.add_request(entry_id, &e);
            // A bookie awaiting replacement gets the entry after the change.
            let targets: Vec<(usize, String)> = g
                .state
                .write_set(entry_id)
                .map(|pos| (pos, g.ensemble()[pos].clone()))
                .filter(|(_, b)| !g.failed_bookies.contains(b))
                .collect();
            g.state.assign(e);
            drop(g);
            for (pos, bookie) in targets {
                self.send(entry_id, pos, &bookie, req.clone());
            }
        }
        async move {
            rx.await
                .unwrap_or_else(|_| Err(LedgerError::WriterFailed(0, "writer dropped".into())))
        }
    }

    fn send(&self, entry_id: u64, pos: usize, bookie: &str, req: AddRequest) {
        let sink: Arc<dyn AddSink> = self.core.clone();
        self.client.adds.add(bookie, req, (entry_id, pos), sink);
    }

    /// `bookie` stored these (entry, position) adds.
    fn acked(&self, acks: &[(u64, usize)], bookie: &str) {
        if acks.is_empty() {
            return;
        }
        let mut g = self.lock();
        if g.failed_bookies.contains(bookie) {
            return;
        }
        let mut confirmed = Vec::new();
        for &(entry_id, pos) in acks {
            // An ack from a bookie that was replaced (or is being replaced)
            // does not count: the entry's replica must be on the new ensemble.
            if g.ensemble().get(pos).map(String::as_str) != Some(bookie) {
                continue;
            }
            g.state.on_ack(entry_id, pos, &mut confirmed);
        }
        if !confirmed.is_empty() && g.failed_bookies.is_empty() {
            // Writes go on: a later shortage counts its wait afresh.
            g.short_since = None;
        }
        let settled = g.state.pending() == 0;
        drop(g);
        if settled {
            self.settled.notify_waiters();
        }
        for (e, u) in confirmed {
            if let Some(done) = u.done {
                let _ = done.send(Ok(e));
            }
        }
    }

    /// A bookie of the ensemble failed an add or timed out: replace it.
    fn bookie_failed(&self, bookie: &str, reason: String) {
        let mut g = self.lock();
        if g.failed.is_some() || !g.ensemble().iter().any(|b| b == bookie) {
            return; // already replaced, or the writer is done
        }
        self.client.suspect(bookie);
        if g.failed_bookies.insert(bookie.to_string()) {
            tracing::warn!(
                ledger_id = self.ledger_id,
                bookie,
                reason,
                "bookie failed; changing the ensemble"
            );
        }
        if !g.changing {
            g.changing = true;
            let me = self.clone();
            tokio::spawn(async move { me.change_ensemble().await });
        }
    }

    /// Replaces every failed bookie, one CAS per round, until none is left.
    async fn change_ensemble(&self) {
        loop {
            let (failed, mut meta, version, first_entry) = {
                let g = self.lock();
                if g.failed.is_some() {
                    return;
                }
                let failed: Vec<String> = g.failed_bookies.iter().cloned().collect();
                if failed.is_empty() {
                    drop(g);
                    self.lock().changing = false;
                    return;
                }
                (
                    failed,
                    g.meta.clone(),
                    g.version,
                    (g.state.lac() + 1) as u64,
                )
            };
            let current: Vec<String> = meta
                .fragments
                .last()
                .map(|f| f.bookies.clone())
                .unwrap_or_default();
            // Replace as many as there are spares; with too few, shrink
            // the fragment while a write quorum is left; below that, retry.
            let replacements = match self
                .client
                .place_replacements(&current, &failed, failed.len())
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    self.fail(format!("ensemble change: {e}"));
                    return;
                }
            };
            let qw = meta.write_quorum;
            match crate::ensemble::plan(&current, &failed, &replacements, qw) {
                crate::ensemble::Change::Swap { .. } => {}
                crate::ensemble::Change::Shrink { ensemble } => {
                    if !self
                        .shrink(meta, version, first_entry, &failed, ensemble)
                        .await
                    {
                        return;
                    }
                    self.lock().short_since = None;
                    continue;
                }
                crate::ensemble::Change::Short { have, need } => {
                    let since = *self
                        .lock()
                        .short_since
                        .get_or_insert_with(std::time::Instant::now);
                    let wait = self.client.below_quorum_wait;
                    if since.elapsed() >= wait {
                        self.fail(format!(
                            "not enough writable bookies: need {need} for the write quorum, have {have} (waited {:.1} s)",
                            wait.as_secs_f64()
                        ));
                        return;
                    }
                    // Keep the ensemble and retry the failed bookies after
                    // a pause: one may come back; adds wait meanwhile.
                    tracing::warn!(
                        ledger_id = self.ledger_id,
                        failed = ?failed,
                        have,
                        need,
                        "fewer writable bookies than the write quorum; retrying the failed ones"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let resend = {
                        let mut g = self.lock();
                        for b in &failed {
                            g.failed_bookies.remove(b);
                        }
                        let positions: Vec<usize> = failed
                            .iter()
                            .filter_map(|b| g.ensemble().iter().position(|x| x == b))
                            .collect();
                        g.resend_to(&positions)
                    };
                    for (id, pos, bookie, req) in resend {
                        self.send(id, pos, &bookie, req);
                    }
                    continue;
                }
            }
            let failed: Vec<String> = failed.into_iter().take(replacements.len()).collect();
            let (ensemble, replaced) = swap_bookies(&current, &failed, &replacements);
            meta.start_fragment(first_entry, ensemble.clone());
            match self.client.store_metadata(&meta, version).await {
                Ok(true) => {}
                Ok(false) => {
                    // Only recovery changes an open ledger's metadata behind
                    // its writer: stop.
                    self.fail("ensemble change: ledger metadata changed (being recovered)".into());
                    return;
                }
                Err(e) => {
                    self.fail(format!("ensemble change: {e}"));
                    return;
                }
            }
            tracing::info!(
                ledger_id = self.ledger_id,
                first_entry,
                replaced = ?failed,
                ensemble = ?ensemble,
                "ensemble changed"
            );
            let resend: Vec<(u64, usize, String, AddRequest)> = {
                let mut g = self.lock();
                g.meta = meta;
                g.version = version + 1;
                g.short_since = None;
                for old in &failed {
                    g.failed_bookies.remove(old);
                }
                for pos in &replaced {
                    g.state.forget_position(*pos);
                }
                g.resend_to(&replaced)
            };
            for (id, pos, bookie, req) in resend {
                self.send(id, pos, &bookie, req);
            }
        }
    }

    /// Starts a narrower fragment at `first_entry` on `ensemble` (no spare
    /// bookie was left to replace `failed`): stored by CAS, then every
    /// unconfirmed entry goes again to its write set over the new width.
    /// False if the writer failed.
    async fn shrink(
        &self,
        mut meta: LedgerMetadata,
        version: u64,
        first_entry: u64,
        failed: &[String],
        ensemble: Vec<String>,
    ) -> bool {
        let width = ensemble.len();
        meta.start_fragment(first_entry, ensemble.clone());
        match self.client.store_metadata(&meta, version).await {
            Ok(true) => {}
            Ok(false) => {
                self.fail("ensemble change: ledger metadata changed (being recovered)".into());
                return false;
            }
            Err(e) => {
                self.fail(format!("ensemble change: {e}"));
                return false;
            }
        }
        SHRUNK_ENSEMBLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            ledger_id = self.ledger_id,
            first_entry,
            failed = ?failed,
            ensemble = ?ensemble,
            "no spare bookie: the ensemble shrank to the bookies left"
        );
        let resend: Vec<(u64, usize, String, AddRequest)> = {
            let mut g = self.lock();
            g.meta = meta;
            g.version = version + 1;
            for old in failed {
                g.failed_bookies.remove(old);
            }
            g.state.reshape(width);
            let all: Vec<usize> = (0..width).collect();
            g.resend_to(&all)
        };
        for (id, pos, bookie, req) in resend {
            self.send(id, pos, &bookie, req);
        }
        true
    }

    /// The writer cannot go on: every add not yet confirmed has an unknown
    /// outcome (it may be stored; it was never reported as confirmed).
    fn fail(&self, reason: String) {
        let mut g = self.lock();
        let err = LedgerError::WriterFailed(self.ledger_id, reason);
        if g.failed.is_none() {
            tracing::warn!(ledger_id = self.ledger_id, error = %err, "ledger writer failed");
            g.failed = Some(err.clone());
        }
        let waiting: Vec<_> = g
            .state
            .pending_values_mut()
            .filter_map(|u| u.done.take())
            .collect();
        drop(g);
        self.settled.notify_waiters();
        for done in waiting {
            let _ = done.send(Err(err.clone()));
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
        let (mut meta, version, lac, length) = {
            let g = self.lock();
            (g.meta.clone(), g.version, g.state.lac(), g.length_bytes)
        };
        meta.state = LedgerState::Closed;
        meta.last_entry_id = lac;
        meta.length_bytes = length;
        if !self.client.store_metadata(&meta, version).await? {
            return Err(LedgerError::Conflict(meta.ledger_id));
        }
        self.lock().meta = meta.clone();
        Ok(meta)
    }
}

/// `ensemble` with `old[i]` replaced by `new[i]` (pairs beyond the shorter
/// list are left alone); also the positions that changed.
fn swap_bookies(ensemble: &[String], old: &[String], new: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut out = ensemble.to_vec();
    let mut changed = Vec::new();
    for (o, n) in old.iter().zip(new) {
        if let Some(pos) = out.iter().position(|b| b == o) {
            out[pos] = n.clone();
            changed.push(pos);
        }
    }
    (out, changed)
}

/// Chooses `n` bookies from `candidates`, spreading over racks: first one
/// per rack not in `used_racks`, then any. `None` when there are too few.
fn place(
    mut candidates: Vec<BookieInfo>,
    n: usize,
    used_racks: &BTreeSet<Option<String>>,
) -> Option<Vec<String>> {
    if candidates.len() < n {
        return None;
    }
    // Start from a position that moves with time, so load spreads.
    let start = (now_ms() as usize) % candidates.len().max(1);
    candidates.rotate_left(start);
    let mut racks = used_racks.clone();
    let mut chosen: Vec<String> = Vec::with_capacity(n);
    for b in &candidates {
        if chosen.len() < n && b.rack.is_some() && racks.insert(b.rack.clone()) {
            chosen.push(b.addr.clone());
        }
    }
    for b in &candidates {
        if chosen.len() < n && !chosen.contains(&b.addr) {
            chosen.push(b.addr.clone());
        }
    }
    Some(chosen)
}
