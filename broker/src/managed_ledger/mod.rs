//! A topic's storage: an ordered list of ledgers (the last one open for
//! writing) plus durable cursors. The list and the cursor-ledger pointers are
//! the only things kept in the metadata store, and they change only when a
//! ledger rolls, never per message. Cursor positions are entries of each
//! cursor's own ledger.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_bookie::{LedgerClient, LedgerError, LedgerMetadata, LedgerState, LedgerWriter};
use magnetar_metadata::MetadataClient;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub mod cursor;

use cursor::{CursorState, Position};

pub use crate::keys::MANAGED_LEDGERS_PREFIX;

/// Most entries fetched together when a reader misses the caches (one
/// range read: a request or two per bookie).
const READ_AHEAD_ENTRIES: u64 = 256;
/// About how many bytes one read-ahead fetches: the entry count is sized
/// from the last read's mean entry size, so large entries come fewer at a
/// time.
const READ_AHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// Entries of the first read-ahead, before any entry size is known.
const READ_AHEAD_FIRST: u64 = 16;
/// Read-ahead entries kept per topic (the oldest go first).
const READ_AHEAD_CACHE_ENTRIES: usize = 4096;

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MlError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("managed ledger {0} was changed by another owner")]
    Fenced(String),
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

impl From<magnetar_metadata::MetadataError> for MlError {
    fn from(e: magnetar_metadata::MetadataError) -> Self {
        MlError::Metadata(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerInfo {
    pub ledger_id: u64,
    pub entries: u64,
    pub size_bytes: u64,
    pub closed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorPointer {
    pub cursor_ledger: Option<u64>,
    /// Mark-delete when the pointer was written (used if the ledger is empty).
    pub mark_delete: Position,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlInfo {
    pub ledgers: Vec<LedgerInfo>,
    pub cursors: BTreeMap<String, CursorPointer>,
}

impl MlInfo {
    /// Records a ledger's final size once it is closed.
    fn mark_closed(&mut self, meta: &LedgerMetadata) {
        if let Some(l) = self
            .ledgers
            .iter_mut()
            .find(|l| l.ledger_id == meta.ledger_id)
        {
            l.entries = (meta.last_entry_id + 1) as u64;
            l.size_bytes = meta.length_bytes;
            l.closed = true;
        }
    }
}

struct WriteSide {
    info: MlInfo,
    version: u64,
    writer: Option<LedgerWriter>,
    opened_at: Instant,
}

struct CursorLedger {
    writer: Option<LedgerWriter>,
    entries: u64,
}

#[derive(Default)]
struct TailCache {
    entries: BTreeMap<Position, Bytes>,
    order: VecDeque<Position>,
    bytes: usize,
}

pub struct ManagedLedger {
    pub name: String,
    cfg: ManagedLedgerConfig,
    lc: LedgerClient,
    md: MetadataClient,
    write: tokio::sync::Mutex<WriteSide>,
    /// Ledger list for readers, with the open ledger's count kept current.
    view: RwLock<Vec<LedgerInfo>>,
    current: RwLock<Option<LedgerWriter>>,
    last_confirmed: watch::Sender<Position>,
    cache: Mutex<TailCache>,
    /// Entries read ahead from the bookies for catch-up readers.
    read_ahead: Mutex<BTreeMap<Position, Bytes>>,
    /// Mean payload size of the last read-ahead (0: none yet).
    read_ahead_entry_bytes: std::sync::atomic::AtomicU64,
    ledger_meta: Mutex<HashMap<u64, LedgerMetadata>>,
    cursor_ledgers: tokio::sync::Mutex<HashMap<String, CursorLedger>>,
    appends: mpsc::UnboundedSender<(Bytes, oneshot::Sender<Result<Position, MlError>>)>,
    /// Durable mark-delete position of every cursor, for trimming.
    mark_deletes: Mutex<HashMap<String, Position>>,
}

impl ManagedLedger {
    fn key(name: &str) -> String {
        format!("{MANAGED_LEDGERS_PREFIX}{name}")
    }

    /// Opens a managed ledger: recovers (fences and closes) the ledger the
    /// previous owner was writing, then starts a new one.
    pub async fn open(
        name: &str,
        cfg: ManagedLedgerConfig,
        lc: LedgerClient,
        md: MetadataClient,
    ) -> Result<Arc<ManagedLedger>, MlError> {
        let key = Self::key(name);
        let (mut info, version) = match md.get(&key).await? {
            Some(kv) => (
                serde_json::from_slice::<MlInfo>(&kv.value)
                    .map_err(|e| MlError::Corrupt(e.to_string()))?,
                kv.version,
            ),
            None => (MlInfo::default(), 0),
        };
        let mut dropped = Vec::new();
        let open: Vec<u64> = info
            .ledgers
            .iter()
            .filter(|l| !l.closed)
            .map(|l| l.ledger_id)
            .collect();
        for id in open {
            info.mark_closed(&lc.recover(id).await?);
        }
        info.ledgers.retain(|l| {
            if l.entries == 0 {
                dropped.push(l.ledger_id);
            }
            l.entries > 0
        });
        let first = info.ledgers.first().map(|l| l.ledger_id);
        let (appends, queue) = mpsc::unbounded_channel();
        let ml = Arc::new(ManagedLedger {
            name: name.to_string(),
            cfg,
            lc,
            md,
            write: tokio::sync::Mutex::new(WriteSide {
                info: info.clone(),
                version,
                writer: None,
                opened_at: Instant::now(),
            }),
            view: RwLock::new(info.ledgers.clone()),
            current: RwLock::new(None),
            last_confirmed: watch::channel(Position::new(first.unwrap_or(0), -1)).0,
            cache: Mutex::default(),
            read_ahead: Mutex::default(),
            read_ahead_entry_bytes: Default::default(),
            ledger_meta: Mutex::default(),
            cursor_ledgers: tokio::sync::Mutex::default(),
            appends,
            mark_deletes: Mutex::default(),
        });
        tokio::spawn(Self::appender(Arc::downgrade(&ml), queue));
        {
            let mut w = ml.write.lock().await;
            ml.roll(&mut w).await?;
        }
        let last = ml.compute_last_confirmed();
        ml.last_confirmed.send_replace(last);
        for id in dropped {
            if let Err(e) = ml.lc.delete(id).await {
                tracing::warn!(ledger_id = id, error = %e, "could not delete empty ledger");
            }
        }
        tracing::info!(topic = name, ledgers = ?ml.view.read().unwrap_or_else(|e| e.into_inner()).iter().map(|l| l.ledger_id).collect::<Vec<_>>(), "managed ledger open");
        Ok(ml)
    }

    async fn store_info(&self, w: &mut WriteSide) -> Result<(), MlError> {
        let value = serde_json::to_vec(&w.info).map_err(|e| MlError::Corrupt(e.to_string()))?;
        if !self
            .md
            .cas(&Self::key(&self.name), w.version, value, None)
            .await?
        {
            return Err(MlError::Fenced(self.name.clone()));
        }
        w.version += 1;
        Ok(())
    }

    /// A new ledger with this topic's quorums, labelled with what it holds.
    async fn create_ledger(&self, role: &str, owner: String) -> Result<LedgerWriter, MlError> {
        let props = BTreeMap::from([(role.to_string(), owner)]);
        let c = &self.cfg;
        Ok(self
            .lc
            .create(c.ensemble_size, c.write_quorum, c.ack_quorum, props)
            .await?)
    }

    /// Closes the current ledger (recovering it if its writer failed) and opens a new one.
    async fn roll(&self, w: &mut WriteSide) -> Result<(), MlError> {
        if let Some(old) = w.writer.take() {
            let meta = match old.close().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(ledger_id = old.ledger_id(), error = %e, "closing failed; recovering the ledger");
                    self.lc.recover(old.ledger_id()).await?
                }
            };
            w.info.mark_closed(&meta);
            self.ledger_meta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(meta.ledger_id, meta);
        }
        let writer = self
            .create_ledger("managed-ledger", self.name.clone())
            .await?;
        let empty_closed: Vec<u64> = w
            .info
            .ledgers
            .iter()
            .filter(|l| l.closed && l.entries == 0)
            .map(|l| l.ledger_id)
            .collect();
        w.info.ledgers.retain(|l| !(l.closed && l.entries == 0));
        w.info.ledgers.push(LedgerInfo {
            ledger_id: writer.ledger_id(),
            entries: 0,
            size_bytes: 0,
            closed: false,
        });
        // On failure the new, unused ledger is left to be found empty later.
        self.store_info(w).await?;
        for id in empty_closed {
            let _ = self.lc.delete(id).await;
        }
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = w.info.ledgers.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(writer.clone());
        w.writer = Some(writer);
        w.opened_at = Instant::now();
        Ok(())
    }

    fn needs_roll(&self, w: &WriteSide) -> bool {
        match &w.writer {
            None => true,
            Some(wr) => {
                let entries = (wr.lac() + 1) as u64;
                wr.is_failed()
                    || entries >= self.cfg.max_entries_per_ledger
                    || wr.length_bytes() >= self.cfg.max_ledger_bytes
                    || (entries > 0
                        && w.opened_at.elapsed()
                            >= Duration::from_millis(self.cfg.max_ledger_age_ms))
            }
        }
    }

    /// Queues one entry for appending and returns at once; the receiver
    /// resolves when the entry is durable on the ack quorum. Entries queued in
    /// order are stored in that order, so a producer can pipeline.
    pub fn append(&self, data: Bytes) -> oneshot::Receiver<Result<Position, MlError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, tx))) = self.appends.send((data, tx)) {
            let _ = tx.send(Err(MlError::Corrupt("managed ledger closed".into())));
        }
        rx
    }

    async fn appender(
        me: std::sync::Weak<ManagedLedger>,
        mut queue: mpsc::UnboundedReceiver<(Bytes, oneshot::Sender<Result<Position, MlError>>)>,
    ) {
        while let Some((data, reply)) = queue.recv().await {
            let Some(ml) = me.upgrade() else { return };
            let started = {
                let mut w = ml.write.lock().await;
                let rolled = if ml.needs_roll(&w) {
                    ml.roll(&mut w).await
                } else {
                    Ok(())
                };
                match (rolled, w.writer.as_ref()) {
                    (Ok(()), Some(wr)) => Ok((wr.ledger_id(), wr.add(data.clone()))),
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Err(MlError::Corrupt("no open ledger".into())),
                }
            };
            match started {
                Ok((ledger_id, fut)) => {
                    let ml = ml.clone();
                    tokio::spawn(async move {
                        let res = match fut.await {
                            Ok(entry) => {
                                let pos = Position::new(ledger_id, entry as i64);
                                ml.cache_put(pos, data);
                                ml.last_confirmed.send_if_modified(|cur| {
                                    let newer = pos > *cur;
                                    if newer {
                                        *cur = pos;
                                    }
                                    newer
                                });
                                Ok(pos)
                            }
                            Err(e) => Err(MlError::Ledger(e)),
                        };
                        let _ = reply.send(res);
                    });
                }
                Err(e) => {
                    tracing::warn!(topic = %ml.name, error = %e, "append failed");
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    fn cache_put(&self, pos: Position, data: Bytes) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.bytes += data.len();
        c.entries.insert(pos, data);
        c.order.push_back(pos);
        while c.bytes > self.cfg.tail_cache_bytes {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(d) = c.entries.remove(&old) {
                c.bytes -= d.len();
            }
        }
    }

    fn count(&self, l: &LedgerInfo) -> u64 {
        if l.closed {
            return l.entries;
        }
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Some(w) if w.ledger_id() == l.ledger_id => (w.lac() + 1) as u64,
            _ => l.entries,
        }
    }

    fn compute_last_confirmed(&self) -> Position {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
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
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        Position::new(view.first().map(|l| l.ledger_id).unwrap_or(0), -1)
    }

    /// The first existing entry at or after `p`, if it exists (confirmed).
    pub fn at_or_after(&self, p: Position) -> Option<Position> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
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

    async fn meta_for(&self, ledger_id: u64) -> Result<LedgerMetadata, MlError> {
        if let Some(m) = self
            .ledger_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ledger_id)
        {
            return Ok(m.clone());
        }
        if let Some(w) = &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            if w.ledger_id() == ledger_id {
                return Ok(w.metadata());
            }
        }
        let (m, _) = self.lc.metadata(ledger_id).await?;
        if m.state == magnetar_bookie::LedgerState::Closed {
            self.ledger_meta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ledger_id, m.clone());
        }
        Ok(m)
    }

    /// Reads a confirmed entry: from the tail cache, else from the bookies.
    pub async fn read(&self, p: Position) -> Result<Bytes, MlError> {
        if let Some(d) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(&p)
        {
            return Ok(d.clone());
        }
        if let Some(d) = self
            .read_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p)
        {
            return Ok(d);
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
        let mean = self
            .read_ahead_entry_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let count = match mean {
            0 => READ_AHEAD_FIRST,
            m => (READ_AHEAD_BYTES / m).clamp(1, READ_AHEAD_ENTRIES),
        };
        let last = (first + count - 1).min(last_in_ledger.max(p.entry_id) as u64);
        let got = self.lc.read_range(&meta, first, last).await;
        let (n, bytes) = got
            .iter()
            .flatten()
            .fold((0u64, 0u64), |(n, b), d| (n + 1, b + d.len() as u64));
        if let Some(mean) = bytes.checked_div(n) {
            self.read_ahead_entry_bytes
                .store(mean.max(1), std::sync::atomic::Ordering::Relaxed);
        }
        let mut got = got.into_iter();
        let data = got.next().ok_or_else(|| {
            MlError::Ledger(LedgerError::Unreadable(
                p.ledger_id,
                first,
                "no read issued".into(),
            ))
        })??;
        let mut ra = self.read_ahead.lock().unwrap_or_else(|e| e.into_inner());
        for (e, r) in (first + 1..).zip(got) {
            if let Ok(d) = r {
                ra.insert(Position::new(p.ledger_id, e as i64), d);
            }
        }
        while ra.len() > READ_AHEAD_CACHE_ENTRIES {
            ra.pop_first();
        }
        Ok(data)
    }

    /// Names and positions of the durable cursors, restored from their ledgers.
    pub async fn open_cursors(&self) -> Result<Vec<(String, CursorState)>, MlError> {
        let pointers = self.write.lock().await.info.cursors.clone();
        let mut out = Vec::new();
        for (name, ptr) in pointers {
            let mut state = CursorState::new(ptr.mark_delete);
            if let Some(id) = ptr.cursor_ledger {
                match self.lc.recover(id).await {
                    Ok(meta) if meta.last_entry_id >= 0 => {
                        let data = self.lc.read(&meta, meta.last_entry_id as u64).await?;
                        state = serde_json::from_slice(&data)
                            .map_err(|e| MlError::Corrupt(format!("cursor {name}: {e}")))?;
                    }
                    Ok(_) => {}
                    Err(LedgerError::NoSuchLedger(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.mark_deletes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), state.mark_delete);
            out.push((name, state));
        }
        Ok(out)
    }

    /// Persists a cursor's state as an entry of its cursor ledger, rolling
    /// that ledger (and touching metadata) only every so many entries.
    pub async fn persist_cursor(&self, name: &str, state: &CursorState) -> Result<(), MlError> {
        let data =
            Bytes::from(serde_json::to_vec(state).map_err(|e| MlError::Corrupt(e.to_string()))?);
        let mut cls = self.cursor_ledgers.lock().await;
        let res = self.persist_cursor_inner(&mut cls, name, state, data).await;
        if res.is_ok() {
            self.mark_deletes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), state.mark_delete);
        }
        res
    }

    async fn persist_cursor_inner(
        &self,
        cls: &mut HashMap<String, CursorLedger>,
        name: &str,
        state: &CursorState,
        data: Bytes,
    ) -> Result<(), MlError> {
        let cl = cls.entry(name.to_string()).or_insert(CursorLedger {
            writer: None,
            entries: 0,
        });
        let usable = cl.writer.as_ref().is_some_and(|w| !w.is_failed())
            && cl.entries < self.cfg.max_cursor_ledger_entries;
        if usable {
            if let Some(w) = &cl.writer {
                if w.add(data.clone()).await.is_ok() {
                    cl.entries += 1;
                    return Ok(());
                }
            }
        }
        // New cursor ledger: write the state first, then point metadata at it.
        let writer = self
            .create_ledger("cursor", format!("{}/{name}", self.name))
            .await?;
        writer.add(data).await?;
        let old = {
            let mut w = self.write.lock().await;
            let old = w.info.cursors.get(name).and_then(|p| p.cursor_ledger);
            w.info.cursors.insert(
                name.to_string(),
                CursorPointer {
                    cursor_ledger: Some(writer.ledger_id()),
                    mark_delete: state.mark_delete,
                },
            );
            self.store_info(&mut w).await?;
            old
        };
        if let Some(old_writer) = cl.writer.take() {
            let _ = old_writer.close().await;
        }
        if let Some(id) = old {
            let _ = self.lc.delete(id).await;
        }
        cl.writer = Some(writer);
        cl.entries = 1;
        Ok(())
    }

    pub async fn delete_cursor(&self, name: &str) -> Result<(), MlError> {
        self.mark_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let old = {
            let mut w = self.write.lock().await;
            let old = w.info.cursors.remove(name).and_then(|p| p.cursor_ledger);
            self.store_info(&mut w).await?;
            old
        };
        if let Some(cl) = self.cursor_ledgers.lock().await.remove(name) {
            if let Some(w) = cl.writer {
                let _ = w.close().await;
            }
        }
        if let Some(id) = old {
            let _ = self.lc.delete(id).await;
        }
        Ok(())
    }

    /// Deletes closed ledgers every cursor has moved past. With no cursors
    /// nothing is deleted (data is retained until a subscription consumes it).
    pub async fn trim(&self) -> Result<(), MlError> {
        let deleted = {
            let mut w = self.write.lock().await;
            let slowest = {
                let md = self.mark_deletes.lock().unwrap_or_else(|e| e.into_inner());
                // Every cursor must have a known durable position to trim at all.
                if w.info.cursors.is_empty() || !w.info.cursors.keys().all(|k| md.contains_key(k)) {
                    return Ok(());
                }
                w.info
                    .cursors
                    .keys()
                    .filter_map(|k| md.get(k).copied())
                    .min()
            };
            let Some(slowest) = slowest else {
                return Ok(());
            };
            let before = w.info.ledgers.len();
            let mut deleted = Vec::new();
            w.info.ledgers.retain(|l| {
                let consumed = l.closed
                    && (l.ledger_id < slowest.ledger_id
                        || (l.ledger_id == slowest.ledger_id
                            && slowest.entry_id + 1 >= l.entries as i64));
                if consumed {
                    deleted.push(l.ledger_id);
                }
                !consumed
            });
            if w.info.ledgers.len() != before {
                self.store_info(&mut w).await?;
                *self.view.write().unwrap_or_else(|e| e.into_inner()) = w.info.ledgers.clone();
            }
            deleted
        };
        for id in deleted {
            tracing::debug!(topic = %self.name, ledger_id = id, "deleting consumed ledger");
            self.ledger_meta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            if let Err(e) = self.lc.delete(id).await {
                tracing::warn!(ledger_id = id, error = %e, "could not delete consumed ledger");
            }
        }
        Ok(())
    }

    pub fn ledger_ids(&self) -> Vec<u64> {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| l.ledger_id)
            .collect()
    }

    /// Closes the open ledger cleanly (on shutdown or unload).
    pub async fn close(&self) -> Result<(), MlError> {
        let mut w = self.write.lock().await;
        if let Some(wr) = w.writer.take() {
            let meta = wr.close().await?;
            w.info.mark_closed(&meta);
            self.store_info(&mut w).await?;
        }
        Ok(())
    }

    /// The first entry whose publish time is at or after `publish_time_ms`
    /// (a scan; entries are read from cache or bookies).
    pub async fn find_by_publish_time(&self, publish_time_ms: u64) -> Result<Position, MlError> {
        let mut p = self.before_first();
        let last = self.last_confirmed();
        while let Some(n) = self.next_after(p) {
            if n > last {
                break;
            }
            let data = self.read(n).await?;
            if let Ok(md) = magnetar_proto::Payload::peek_metadata(&data) {
                if md.publish_time >= publish_time_ms {
                    return Ok(n);
                }
            }
            p = n;
        }
        Ok(last.bump())
    }
}
