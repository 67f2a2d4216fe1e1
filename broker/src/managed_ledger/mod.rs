//! A topic's storage: an ordered list of ledgers (the last one open for
//! writing) plus durable cursors. The list and the cursor-ledger pointers are
//! the only things kept in the metadata service, and they change only when a
//! ledger rolls, never per message. Cursor positions are entries of each
//! cursor's own ledger.
//!
//! It reaches the tiers below only through `store::LedgerStore` and
//! `store::MetaStore`, so it runs on the bookies or, in unit tests, in memory.

pub mod appender;
pub mod cache;
pub mod compacted;
pub mod cursor;
pub mod cursor_store;
pub mod ledger_list;
pub mod store;
pub mod trim;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use magnetar_bookie::{LedgerError, LedgerMetadata, LedgerState};
use magnetar_metadata::MetadataError;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use appender::AppendDone;
use cache::EntryCache;
use cursor::Position;
pub use ledger_list::{CompactedLedger, CursorPointer, DelayedBucket, LedgerInfo, MlInfo};
use store::{Handle, LedgerStore, MetaStore};

/// Most entries fetched together when a reader misses the caches (one
/// range read: a request or two per bookie).
const READ_AHEAD_ENTRIES: u64 = 256;
/// About how many bytes one read-ahead fetches: the entry count is sized
/// from the last read's mean entry size, so large entries come fewer at a
/// time.
const READ_AHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// Entries of the first read-ahead, before any entry size is known.
const READ_AHEAD_FIRST: u64 = 16;

/// How topics store their data: replication of their ledgers and when a
/// ledger rolls. The `[managed_ledger]` section of a broker's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagedLedgerConfig {
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub max_entries_per_ledger: u64,
    pub max_ledger_bytes: u64,
    pub max_ledger_age_ms: u64,
    /// A cursor ledger rolls after this many state entries.
    pub max_cursor_ledger_entries: u64,
    pub tail_cache_bytes: usize,
    /// Records a topic's delayed-delivery index holds in memory before it
    /// seals them into a bucket ledger (`topic::delayed`).
    pub delayed_index_memory_entries: usize,
}

impl Default for ManagedLedgerConfig {
    fn default() -> Self {
        ManagedLedgerConfig {
            ensemble_size: 1,
            write_quorum: 1,
            ack_quorum: 1,
            max_entries_per_ledger: 50_000,
            max_ledger_bytes: 1 << 30,
            max_ledger_age_ms: 4 * 3600 * 1000,
            max_cursor_ledger_entries: 10_000,
            tail_cache_bytes: 64 << 20,
            delayed_index_memory_entries: 50_000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MlError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("metadata: {0}")]
    Metadata(Arc<MetadataError>),
    #[error("managed ledger {0} was changed by another owner")]
    Fenced(String),
    #[error("corrupt state of {0}: {1}")]
    Corrupt(String, String),
    #[error("managed ledger {0} is closed")]
    Closed(String),
    /// The topic was terminated: nothing is added to it any more.
    #[error("topic {0} is terminated")]
    Terminated(String),
    /// The broker may not write: its ownership of the topic is not assured.
    #[error("managed ledger {0} is not writable here: ownership lease not valid")]
    NotWritable(String),
}

impl From<MetadataError> for MlError {
    fn from(e: MetadataError) -> Self {
        MlError::Metadata(Arc::new(e))
    }
}

/// Whether this broker may write right now (its ownership lease is valid).
pub type WriteGate = Arc<dyn Fn() -> bool + Send + Sync>;

/// What a managed ledger runs on.
#[derive(Clone)]
pub struct Stores {
    pub ledgers: Arc<dyn LedgerStore>,
    pub meta: Arc<dyn MetaStore>,
    pub gate: WriteGate,
}

impl Stores {
    pub fn new(ledgers: Arc<dyn LedgerStore>, meta: Arc<dyn MetaStore>) -> Stores {
        Stores {
            ledgers,
            meta,
            gate: Arc::new(|| true),
        }
    }
}

/// The record in the metadata service and its version (for CAS).
struct WriteSide {
    info: MlInfo,
    version: u64,
}

pub struct ManagedLedger {
    pub name: String,
    cfg: ManagedLedgerConfig,
    store: Arc<dyn LedgerStore>,
    meta: Arc<dyn MetaStore>,
    gate: WriteGate,
    write: tokio::sync::Mutex<WriteSide>,
    /// Ledger list for readers, with the open ledger's count kept current.
    view: RwLock<Vec<LedgerInfo>>,
    current: RwLock<Option<Handle>>,
    last_confirmed: watch::Sender<Position>,
    cache: EntryCache,
    /// Mean payload size of the last read-ahead (0: none yet).
    read_ahead_entry_bytes: AtomicU64,
    /// The next read-ahead, fetched in the background once a reader is
    /// half way through the last one.
    prefetch: Mutex<Prefetch>,
    /// Told when a background read-ahead is in the cache.
    prefetched: tokio::sync::Notify,
    me: std::sync::Weak<ManagedLedger>,
    ledger_meta: Mutex<HashMap<u64, LedgerMetadata>>,
    cursor_ledgers: tokio::sync::Mutex<HashMap<String, cursor_store::CursorLedger>>,
    /// Payload bytes confirmed in the open ledger.
    open_bytes: AtomicU64,
    /// The last entry of a terminated topic.
    terminated: RwLock<Option<Position>>,
    /// The retention policy in force (`None`: none set).
    retention: RwLock<Option<trim::Retention>>,
    appends: mpsc::Sender<appender::Request>,
    /// Durable mark-delete position of every cursor, for trimming.
    mark_deletes: Mutex<HashMap<String, Position>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the next background read-ahead starts, and when it is due.
#[derive(Debug, Default)]
struct Prefetch {
    next: Option<Position>,
    /// A read at or past it starts the next read-ahead.
    trigger: Position,
    last_in_ledger: i64,
    /// Entries of the read-ahead under way (0: none).
    running: u64,
}

impl Prefetch {
    /// Entries `first..=last` of a ledger whose last entry is
    /// `last_in_ledger` were read, `count` asked: the next stretch starts
    /// after them, due when a reader is half way through these.
    fn read(&mut self, ledger_id: u64, first: u64, last: u64, count: u64, last_in_ledger: i64) {
        self.next = (last < last_in_ledger.max(0) as u64)
            .then(|| Position::new(ledger_id, last as i64 + 1));
        self.trigger = Position::new(ledger_id, (first + count / 2) as i64);
        self.last_in_ledger = last_in_ledger;
    }

    /// Whether the read-ahead under way will bring `p`.
    fn brings(&self, p: Position) -> bool {
        self.running > 0
            && self.next.is_some_and(|n| {
                n.ledger_id == p.ledger_id
                    && p >= n
                    && ((p.entry_id - n.entry_id) as u64) < self.running
            })
    }
}

impl ManagedLedger {
    fn key(&self) -> String {
        crate::keys::managed_ledger(&self.name)
    }

    /// Opens a managed ledger: recovers (fences and closes) the ledger the
    /// previous owner was writing, then starts a new one.
    pub async fn open(
        name: &str,
        cfg: ManagedLedgerConfig,
        stores: Stores,
    ) -> Result<Arc<ManagedLedger>, MlError> {
        let key = crate::keys::managed_ledger(name);
        let corrupt = |e: serde_json::Error| MlError::Corrupt(name.to_string(), e.to_string());
        let (mut info, version) = match stores.meta.get(&key).await? {
            Some((value, version)) => (
                serde_json::from_slice::<MlInfo>(&value).map_err(corrupt)?,
                version,
            ),
            None => (MlInfo::default(), 0),
        };
        let open: Vec<u64> = info
            .ledgers
            .iter()
            .filter(|l| !l.closed)
            .map(|l| l.ledger_id)
            .collect();
        for id in open {
            match stores.ledgers.recover(id).await {
                Ok(meta) => info.mark_closed(&meta),
                // Created and recorded, but its metadata never written or
                // already deleted: it holds nothing.
                Err(LedgerError::NoSuchLedger(_)) => info.ledgers.retain(|l| l.ledger_id != id),
                Err(e) => return Err(e.into()),
            }
        }
        let dropped = info.drop_empty_closed();
        let first = info.ledgers.first().map(|l| l.ledger_id);
        let (appends, queue) = mpsc::channel(appender::APPEND_QUEUE_ENTRIES);
        let ml = Arc::new_cyclic(|me| ManagedLedger {
            me: me.clone(),
            prefetch: Mutex::default(),
            prefetched: tokio::sync::Notify::new(),
            name: name.to_string(),
            cfg: cfg.clone(),
            store: stores.ledgers,
            meta: stores.meta,
            gate: stores.gate,
            write: tokio::sync::Mutex::new(WriteSide {
                info: info.clone(),
                version,
            }),
            view: RwLock::new(info.ledgers.clone()),
            current: RwLock::new(None),
            last_confirmed: watch::channel(Position::new(first.unwrap_or(0), -1)).0,
            cache: EntryCache::new(cfg.tail_cache_bytes),
            read_ahead_entry_bytes: Default::default(),
            ledger_meta: Mutex::default(),
            cursor_ledgers: tokio::sync::Mutex::default(),
            open_bytes: AtomicU64::new(0),
            terminated: RwLock::new(info.terminated),
            retention: RwLock::new(None),
            appends,
            mark_deletes: Mutex::default(),
        });
        let writer = ml.roll(None).await?;
        tokio::spawn(appender::run(Arc::downgrade(&ml), writer, queue));
        let last = ml.compute_last_confirmed();
        ml.last_confirmed.send_replace(last);
        for id in dropped {
            if let Err(e) = ml.store.delete(id).await {
                tracing::warn!(ledger_id = id, error = %e, "could not delete empty ledger");
            }
        }
        tracing::info!(topic = name, ledgers = ?ml.ledger_ids(), "managed ledger open");
        Ok(ml)
    }

    async fn store_info(&self, w: &mut WriteSide) -> Result<(), MlError> {
        let value = serde_json::to_vec(&w.info)
            .map_err(|e| MlError::Corrupt(self.name.clone(), e.to_string()))?;
        if !self.meta.cas(&self.key(), w.version, value).await? {
            return Err(MlError::Fenced(self.name.clone()));
        }
        w.version += 1;
        Ok(())
    }

    /// A new ledger with this topic's quorums, labelled with what it holds.
    async fn create_ledger(&self, role: &str, owner: String) -> Result<Handle, MlError> {
        let props = BTreeMap::from([(role.to_string(), owner)]);
        let c = &self.cfg;
        Ok(self
            .store
            .create(c.ensemble_size, c.write_quorum, c.ack_quorum, props)
            .await?)
    }

    fn check_writable(&self) -> Result<(), MlError> {
        if (self.gate)() {
            Ok(())
        } else {
            Err(MlError::NotWritable(self.name.clone()))
        }
    }

    /// Closes `old` (recovering it if its writer failed) and opens a new
    /// ledger, recorded in the ledger list by CAS.
    async fn roll(&self, old: Option<Handle>) -> Result<Handle, MlError> {
        let closed = match old {
            Some(old) => Some(match old.close().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(ledger_id = old.ledger_id(), error = %e, "closing failed; recovering the ledger");
                    self.store.recover(old.ledger_id()).await?
                }
            }),
            None => None,
        };
        self.check_writable()?;
        let writer = self
            .create_ledger("managed-ledger", self.name.clone())
            .await?;
        let mut w = self.write.lock().await;
        if let Some(meta) = &closed {
            w.info.mark_closed(meta);
            lock(&self.ledger_meta).insert(meta.ledger_id, meta.clone());
        }
        let empty = w.info.drop_empty_closed();
        w.info.ledgers.push(LedgerInfo {
            ledger_id: writer.ledger_id(),
            entries: 0,
            size_bytes: 0,
            closed: false,
            closed_at_ms: 0,
        });
        // On failure the new, unused ledger is left to be found empty later.
        self.store_info(&mut w).await?;
        *write(&self.view) = w.info.ledgers.clone();
        *write(&self.current) = Some(writer.clone());
        self.open_bytes.store(0, Ordering::Relaxed);
        drop(w);
        for id in empty {
            let _ = self.store.delete(id).await;
        }
        Ok(writer)
    }

    /// Closes the open ledger (unload, shutdown). The ledger list still
    /// names it open: the next owner finds it closed when it recovers it (a
    /// metadata read), which saves a write here, on the unload's path.
    async fn close_open(&self, writer: Option<Handle>) -> Result<(), MlError> {
        let Some(wr) = writer else { return Ok(()) };
        let meta = wr.close().await?;
        lock(&self.ledger_meta).insert(meta.ledger_id, meta);
        Ok(())
    }

    /// An add finished: a confirmed entry is cached and becomes visible to
    /// readers, then its publisher is told.
    fn completed(
        &self,
        res: Result<u64, LedgerError>,
        ledger_id: u64,
        data: Bytes,
        done: AppendDone,
    ) {
        match res {
            Ok(entry) => {
                let pos = Position::new(ledger_id, entry as i64);
                self.open_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.cache.put_tail(pos, data);
                self.last_confirmed.send_if_modified(|cur| {
                    let newer = pos > *cur;
                    if newer {
                        *cur = pos;
                    }
                    newer
                });
                done(Ok(pos));
            }
            Err(e) => done(Err(MlError::Ledger(e))),
        }
    }

    /// Queues one entry, waiting while the queue is full (back-pressure on
    /// the publisher). `done` is called with its position once the entry is
    /// durable on the ack quorum; entries queued in order are stored and
    /// completed in that order.
    pub async fn append(&self, data: Bytes, done: AppendDone) {
        if let Err(mpsc::error::SendError(req)) = self
            .appends
            .send(appender::Request::Append { data, done })
            .await
        {
            appender::refuse(req);
        }
    }

    /// `append`, waiting for the outcome.
    pub async fn append_wait(&self, data: Bytes) -> Result<Position, MlError> {
        let (tx, rx) = oneshot::channel();
        self.append(
            data,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
        rx.await
            .unwrap_or_else(|_| Err(MlError::Closed(self.name.clone())))
    }

    /// Terminates the topic: entries queued before are stored, later ones
    /// are refused, and the last entry's position is recorded (it is the
    /// answer).
    pub async fn terminate(&self) -> Result<Position, MlError> {
        let (reply, rx) = oneshot::channel();
        self.appends
            .send(appender::Request::Terminate { reply })
            .await
            .map_err(|_| MlError::Closed(self.name.clone()))?;
        rx.await
            .unwrap_or_else(|_| Err(MlError::Closed(self.name.clone())))
    }

    /// The topic epoch of exclusive producers.
    pub async fn producer_epoch(&self) -> u64 {
        self.write.lock().await.info.producer_epoch
    }

    /// Records a new topic epoch (by CAS: a newer owner's record wins).
    pub async fn set_producer_epoch(&self, epoch: u64) -> Result<(), MlError> {
        let mut w = self.write.lock().await;
        let previous = w.info.producer_epoch;
        w.info.producer_epoch = epoch;
        if let Err(e) = self.store_info(&mut w).await {
            w.info.producer_epoch = previous;
            return Err(e);
        }
        Ok(())
    }

    /// The last entry of a terminated topic; `None` while it takes entries.
    pub fn terminated(&self) -> Option<Position> {
        *read(&self.terminated)
    }

    /// Records the termination at the last confirmed entry (the appender
    /// calls this once every earlier add completed).
    async fn record_termination(&self) -> Result<Position, MlError> {
        if let Some(p) = self.terminated() {
            return Ok(p);
        }
        let last = self.last_confirmed();
        let mut w = self.write.lock().await;
        w.info.terminated = Some(last);
        if let Err(e) = self.store_info(&mut w).await {
            w.info.terminated = None;
            return Err(e);
        }
        *write(&self.terminated) = Some(last);
        tracing::info!(topic = %self.name, last = ?last, "topic terminated");
        Ok(last)
    }

    /// Completes every queued entry, closes the open ledger cleanly and
    /// refuses later appends (unload, shutdown).
    pub async fn close(&self) -> Result<(), MlError> {
        let (reply, rx) = oneshot::channel();
        if self
            .appends
            .send(appender::Request::Close { reply })
            .await
            .is_err()
        {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    fn count(&self, l: &LedgerInfo) -> u64 {
        if l.closed {
            return l.entries;
        }
        match &*read(&self.current) {
            Some(w) if w.ledger_id() == l.ledger_id => (w.lac() + 1) as u64,
            _ => l.entries,
        }
    }

    fn compute_last_confirmed(&self) -> Position {
        let view = read(&self.view);
        for l in view.iter().rev() {
            let n = self.count(l);
            if n > 0 {
                return Position::new(l.ledger_id, n as i64 - 1);
            }
        }
        Position::new(view.first().map(|l| l.ledger_id).unwrap_or(0), -1)
    }

    pub fn last_confirmed(&self) -> Position {
        *self.last_confirmed.borrow()
    }

    pub fn subscribe_appends(&self) -> watch::Receiver<Position> {
        self.last_confirmed.subscribe()
    }

    /// The position before the first entry the topic still holds.
    pub fn before_first(&self) -> Position {
        let view = read(&self.view);
        Position::new(view.first().map(|l| l.ledger_id).unwrap_or(0), -1)
    }

    /// The first existing entry at or after `p`, if it exists (confirmed).
    pub fn at_or_after(&self, p: Position) -> Option<Position> {
        let view = read(&self.view);
        for l in view.iter().filter(|l| l.ledger_id >= p.ledger_id) {
            let n = self.count(l) as i64;
            let e = if l.ledger_id == p.ledger_id {
                p.entry_id.max(0)
            } else {
                0
            };
            if e < n {
                return Some(Position::new(l.ledger_id, e));
            }
        }
        None
    }

    /// The first existing entry after `p`.
    pub fn next_after(&self, p: Position) -> Option<Position> {
        self.at_or_after(p.bump())
    }

    /// Entries stored (over every ledger still held).
    pub fn entries(&self) -> u64 {
        read(&self.view).iter().map(|l| self.count(l)).sum()
    }

    /// The slowest durable subscription (cursors named `pulsar.…` are the
    /// broker's own) and its mark-delete position.
    pub fn slowest_subscription(&self) -> Option<(String, Position)> {
        lock(&self.mark_deletes)
            .iter()
            .filter(|(n, _)| !n.starts_with("pulsar."))
            .min_by_key(|(_, p)| **p)
            .map(|(n, p)| (n.clone(), *p))
    }

    /// Every durable subscription's mark-delete position.
    pub fn subscription_positions(&self) -> Vec<(String, Position)> {
        lock(&self.mark_deletes)
            .iter()
            .filter(|(n, _)| !n.starts_with("pulsar."))
            .map(|(n, p)| (n.clone(), *p))
            .collect()
    }

    /// Estimated bytes stored after `p`: the ledgers after its ledger, and
    /// its ledger's share (entries taken as equal in size).
    pub fn bytes_after(&self, p: Position) -> u64 {
        let open_bytes = self.open_bytes.load(Ordering::Relaxed);
        read(&self.view)
            .iter()
            .filter(|l| l.ledger_id >= p.ledger_id)
            .map(|l| {
                let size = if l.closed { l.size_bytes } else { open_bytes };
                if l.ledger_id != p.ledger_id {
                    return size;
                }
                let n = self.count(l);
                let left = n.saturating_sub((p.entry_id + 1).max(0) as u64);
                if n == 0 {
                    0
                } else {
                    ((size as u128 * left as u128) / n as u128) as u64
                }
            })
            .sum()
    }

    /// Confirmed entries after `p`.
    pub fn entries_after(&self, p: Position) -> u64 {
        read(&self.view)
            .iter()
            .filter(|l| l.ledger_id >= p.ledger_id)
            .map(|l| {
                let n = self.count(l);
                if l.ledger_id == p.ledger_id {
                    n.saturating_sub((p.entry_id + 1).max(0) as u64)
                } else {
                    n
                }
            })
            .sum()
    }

    /// Bytes stored: closed ledgers' sizes plus what the open one took.
    pub fn size_bytes(&self) -> u64 {
        let closed: u64 = read(&self.view)
            .iter()
            .filter(|l| l.closed)
            .map(|l| l.size_bytes)
            .sum();
        closed + self.open_bytes.load(Ordering::Relaxed)
    }

    async fn meta_for(&self, ledger_id: u64) -> Result<LedgerMetadata, MlError> {
        if let Some(m) = lock(&self.ledger_meta).get(&ledger_id) {
            return Ok(m.clone());
        }
        if let Some(w) = &*read(&self.current) {
            if w.ledger_id() == ledger_id {
                return Ok(w.metadata());
            }
        }
        let m = self.store.metadata(ledger_id).await?;
        if m.state == LedgerState::Closed {
            lock(&self.ledger_meta).insert(ledger_id, m.clone());
        }
        Ok(m)
    }

    /// Reads a confirmed entry: from the caches, else from the bookies.
    pub async fn read(&self, p: Position) -> Result<Bytes, MlError> {
        if let Some(d) = self.cache.get(p) {
            self.maybe_prefetch(p);
            return Ok(d);
        }
        // The read-ahead under way brings it: wait for that rather than
        // read the same stretch twice.
        let done = self.prefetched.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if lock(&self.prefetch).brings(p) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), done).await;
            if let Some(d) = self.cache.get(p) {
                self.maybe_prefetch(p);
                return Ok(d);
            }
        }
        let meta = self.meta_for(p.ledger_id).await?;
        // A miss is usually a catch-up reader: fetch the next entries of the
        // ledger along with this one, several reads in flight at once.
        let first = p.entry_id as u64;
        let last_in_ledger = if meta.state == LedgerState::Closed {
            meta.last_entry_id
        } else {
            let lc = self.last_confirmed();
            if lc.ledger_id == p.ledger_id {
                lc.entry_id
            } else {
                p.entry_id
            }
        };
        let count = self.read_ahead_count();
        let last = (first + count - 1).min(last_in_ledger.max(p.entry_id) as u64);
        let got = self.store.read_range(&meta, first, last).await;
        let (n, bytes) = got
            .iter()
            .flatten()
            .fold((0u64, 0u64), |(n, b), d| (n + 1, b + d.len() as u64));
        if let Some(mean) = bytes.checked_div(n) {
            self.read_ahead_entry_bytes
                .store(mean.max(1), Ordering::Relaxed);
        }
        let mut got = got.into_iter();
        let data = got.next().ok_or_else(|| {
            MlError::Ledger(LedgerError::Unreadable(
                p.ledger_id,
                first,
                "no read issued".into(),
            ))
        })??;
        self.keep_read_ahead(p.ledger_id, first + 1, got);
        lock(&self.prefetch).read(p.ledger_id, first, last, count, last_in_ledger);
        Ok(data)
    }

    /// Entries a read-ahead fetches: about `READ_AHEAD_BYTES` of them at
    /// the last mean size.
    fn read_ahead_count(&self) -> u64 {
        match self.read_ahead_entry_bytes.load(Ordering::Relaxed) {
            0 => READ_AHEAD_FIRST,
            m => (READ_AHEAD_BYTES / m).clamp(1, READ_AHEAD_ENTRIES),
        }
    }

    /// Puts entries `first..` of a ledger, as read, in the read-ahead cache.
    fn keep_read_ahead(
        &self,
        ledger_id: u64,
        first: u64,
        got: impl IntoIterator<Item = Result<Bytes, LedgerError>>,
    ) {
        self.cache.put_read_ahead(
            (first..)
                .zip(got)
                .filter_map(|(e, r)| Some((Position::new(ledger_id, e as i64), r.ok()?))),
        );
    }

    /// A reader served from the read-ahead is half way through it: the next
    /// stretch of the ledger is fetched meanwhile, so reading and
    /// dispatching overlap instead of taking turns.
    fn maybe_prefetch(&self, p: Position) {
        let (start, count, last_in_ledger) = {
            let mut pf = lock(&self.prefetch);
            // Only for a reader inside the stretch before it.
            let Some(next) = pf
                .next
                .filter(|n| pf.running == 0 && p >= pf.trigger && p < *n)
            else {
                return;
            };
            if next.ledger_id != p.ledger_id {
                return;
            }
            let count = self.read_ahead_count();
            pf.running = count;
            (next, count, pf.last_in_ledger)
        };
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let first = start.entry_id as u64;
            let last = (first + count - 1).min(last_in_ledger.max(start.entry_id) as u64);
            let read = match me.meta_for(start.ledger_id).await {
                Ok(meta) => Some(me.store.read_range(&meta, first, last).await),
                Err(_) => None,
            };
            {
                let mut pf = lock(&me.prefetch);
                pf.running = 0;
                // Unless another reader moved the read-ahead on meanwhile.
                if let Some(got) = read.filter(|_| pf.next == Some(start)) {
                    let complete = got.iter().all(|r| r.is_ok());
                    me.keep_read_ahead(start.ledger_id, first, got);
                    // After a failed read the next reader reads for itself.
                    let last_in_ledger = if complete { last_in_ledger } else { -1 };
                    pf.read(start.ledger_id, first, last, count, last_in_ledger);
                }
            }
            me.prefetched.notify_waiters();
        });
    }

    /// The retention policy in force (`None`: none set).
    pub fn set_retention(&self, r: Option<trim::Retention>) {
        *write(&self.retention) = r;
    }

    /// Deletes closed ledgers no cursor needs and retention does not keep,
    /// by Pulsar's rule (`trim::expired_ledgers`). Without a retention
    /// policy nothing consumed is kept, as Pulsar's default (0, 0): the
    /// ledgers every cursor moved past go — and with no cursor at all,
    /// every closed ledger (no subscription needs it).
    pub async fn trim(&self) -> Result<(), MlError> {
        let retention = *read(&self.retention);
        let deleted = {
            let mut w = self.write.lock().await;
            let (all_known, slowest) = {
                let md = lock(&self.mark_deletes);
                let all_known = w.info.cursors.keys().all(|k| md.contains_key(k));
                let slowest = w
                    .info
                    .cursors
                    .keys()
                    .filter_map(|k| md.get(k).copied())
                    .min();
                (all_known, slowest)
            };
            // Every cursor must have a known durable position to trim at all.
            if !all_known {
                return Ok(());
            }
            let deleted = trim::expired_ledgers(
                &w.info.ledgers,
                slowest,
                retention.unwrap_or(trim::Retention::NONE),
                ledger_list::now_ms(),
            );
            if !deleted.is_empty() {
                let previous = w.info.ledgers.clone();
                w.info.ledgers.retain(|l| !deleted.contains(&l.ledger_id));
                if let Err(e) = self.store_info(&mut w).await {
                    w.info.ledgers = previous;
                    return Err(e);
                }
                *write(&self.view) = w.info.ledgers.clone();
            }
            deleted
        };
        for id in deleted {
            tracing::debug!(topic = %self.name, ledger_id = id, "deleting consumed ledger");
            lock(&self.ledger_meta).remove(&id);
            if let Err(e) = self.store.delete(id).await {
                tracing::warn!(ledger_id = id, error = %e, "could not delete consumed ledger");
            }
        }
        Ok(())
    }

    /// Deletes the topic's storage after `close`: its record (by CAS — a
    /// newer owner's change wins), then its data and cursor ledgers.
    pub async fn delete_all(&self) -> Result<(), MlError> {
        let (ledgers, cursor_ledgers) = {
            let w = self.write.lock().await;
            if !self.meta.delete(&self.key(), w.version).await? {
                return Err(MlError::Fenced(self.name.clone()));
            }
            let cursors: Vec<u64> = w
                .info
                .cursors
                .values()
                .filter_map(|c| c.cursor_ledger)
                .chain(w.info.delayed_buckets.iter().map(|b| b.ledger_id))
                .collect();
            (self.ledger_ids(), cursors)
        };
        for id in ledgers.into_iter().chain(cursor_ledgers) {
            if let Err(e) = self.store.delete(id).await {
                tracing::warn!(topic = %self.name, ledger_id = id, error = %e, "could not delete a ledger of a deleted topic");
            }
        }
        tracing::info!(topic = %self.name, "managed ledger deleted");
        Ok(())
    }

    /// A new ledger beside the topic's (the compacted view), written with
    /// `entries` in order, up to 1,000 adds in flight; closed on return.
    pub async fn write_side_ledger(
        &self,
        role: &str,
        entries: impl IntoIterator<Item = Bytes>,
    ) -> Result<(u64, u64), MlError> {
        use futures::stream::{FuturesOrdered, StreamExt};
        self.check_writable()?;
        let w = self.create_ledger(role, self.name.clone()).await?;
        let mut inflight = FuturesOrdered::new();
        let mut written = 0u64;
        for e in entries {
            inflight.push_back(w.add(e));
            if inflight.len() >= 1_000 {
                if let Some(r) = inflight.next().await {
                    r?;
                    written += 1;
                }
            }
        }
        while let Some(r) = inflight.next().await {
            r?;
            written += 1;
        }
        w.close().await?;
        Ok((w.ledger_id(), written))
    }

    /// Entries `first..=last` of a ledger beside the topic's.
    pub async fn read_side_ledger(
        &self,
        ledger_id: u64,
        first: u64,
        last: u64,
    ) -> Result<Vec<Bytes>, MlError> {
        let meta = self.meta_for(ledger_id).await?;
        let mut out = Vec::new();
        for r in self.store.read_range(&meta, first, last).await {
            out.push(r?);
        }
        Ok(out)
    }

    pub async fn delete_side_ledger(&self, ledger_id: u64) {
        lock(&self.ledger_meta).remove(&ledger_id);
        if let Err(e) = self.store.delete(ledger_id).await {
            tracing::warn!(topic = %self.name, ledger_id, error = %e, "could not delete a replaced side ledger");
        }
    }

    pub fn config(&self) -> &ManagedLedgerConfig {
        &self.cfg
    }

    /// The delayed-delivery index's spilled buckets in the record.
    pub async fn delayed_buckets(&self) -> Vec<DelayedBucket> {
        self.write.lock().await.info.delayed_buckets.clone()
    }

    /// Adds (`add`) or removes (`remove`, by ledger id) delayed-index
    /// buckets in the record, by CAS.
    pub async fn change_delayed_buckets(
        &self,
        add: Option<DelayedBucket>,
        remove: Option<u64>,
    ) -> Result<(), MlError> {
        let mut w = self.write.lock().await;
        let previous = w.info.delayed_buckets.clone();
        w.info
            .delayed_buckets
            .retain(|b| Some(b.ledger_id) != remove);
        w.info.delayed_buckets.extend(add);
        if let Err(e) = self.store_info(&mut w).await {
            w.info.delayed_buckets = previous;
            return Err(e);
        }
        Ok(())
    }

    /// The compacted view in the record.
    pub async fn compacted(&self) -> Option<CompactedLedger> {
        self.write.lock().await.info.compacted
    }

    /// Records a new compacted view (by CAS); the one it replaces.
    pub async fn set_compacted(
        &self,
        c: CompactedLedger,
    ) -> Result<Option<CompactedLedger>, MlError> {
        let mut w = self.write.lock().await;
        let previous = w.info.compacted.replace(c);
        if let Err(e) = self.store_info(&mut w).await {
            w.info.compacted = previous;
            return Err(e);
        }
        Ok(previous)
    }

    /// The ledgers held, with the open one's current entry count.
    pub fn ledgers(&self) -> Vec<LedgerInfo> {
        read(&self.view)
            .iter()
            .map(|l| LedgerInfo {
                entries: self.count(l),
                size_bytes: if l.closed {
                    l.size_bytes
                } else {
                    self.open_bytes.load(Ordering::Relaxed)
                },
                ..l.clone()
            })
            .collect()
    }

    pub fn ledger_ids(&self) -> Vec<u64> {
        read(&self.view).iter().map(|l| l.ledger_id).collect()
    }

    /// The first entry whose publish time is at or after `publish_time_ms`,
    /// or the position after the last when there is none: a binary search
    /// over the entries (publish times grow along a topic; like Pulsar's
    /// search it assumes so), reading about log2(entries) of them.
    pub async fn find_by_publish_time(&self, publish_time_ms: u64) -> Result<Position, MlError> {
        let last = self.last_confirmed();
        let spans: Vec<(u64, u64)> = read(&self.view)
            .iter()
            .map(|l| (l.ledger_id, self.count(l)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let total: u64 = spans.iter().map(|(_, n)| n).sum();
        let nth = |mut i: u64| -> Position {
            for (ledger_id, n) in &spans {
                if i < *n {
                    return Position::new(*ledger_id, i as i64);
                }
                i -= n;
            }
            last.bump()
        };
        let (mut lo, mut hi) = (0u64, total);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let p = nth(mid);
            if p > last {
                hi = mid;
                continue;
            }
            let data = self.read(p).await?;
            // An entry that does not parse counts as old.
            let t = magnetar_proto::Payload::peek_metadata(&data).map_or(0, |md| md.publish_time);
            if t >= publish_time_ms {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(if lo < total && nth(lo) <= last {
            nth(lo)
        } else {
            last.bump()
        })
    }
}

#[cfg(test)]
mod tests;
