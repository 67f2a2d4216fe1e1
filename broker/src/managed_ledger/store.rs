//! What a managed ledger needs from the tiers below it, as two traits:
//! `LedgerStore` (ledgers on the bookies) and `MetaStore` (its versioned
//! record in the metadata service). The bookie and metadata clients implement
//! them for real; `MemoryLedgers` and `MemoryMeta` implement them in memory
//! for unit tests of the managed ledger, with the same fencing and
//! compare-and-set rules.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_bookie::{LedgerClient, LedgerError, LedgerMetadata, LedgerState, LedgerWriter};
use magnetar_metadata::{MetadataClient, MetadataError};

/// One open ledger as its single writer sees it.
pub trait LedgerHandle: Send + Sync {
    fn ledger_id(&self) -> u64;
    /// Appends an entry; ids are assigned in call order. Resolves with the
    /// entry id once it is confirmed (durable on the ack quorum, with every
    /// earlier entry).
    fn add(&self, data: Bytes) -> BoxFuture<'static, Result<u64, LedgerError>>;
    fn lac(&self) -> i64;
    fn length_bytes(&self) -> u64;
    fn is_failed(&self) -> bool;
    fn metadata(&self) -> LedgerMetadata;
    /// Stops taking adds and, once none is pending, closes the ledger.
    fn close(&self) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>>;
}

pub type Handle = Arc<dyn LedgerHandle>;

/// Ledgers: create, recover (fence + close), read, delete.
pub trait LedgerStore: Send + Sync + 'static {
    fn create(
        &self,
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        properties: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Handle, LedgerError>>;
    /// Fences the ledger against its writer and closes it at the last entry
    /// that may have been confirmed; a closed ledger's metadata as it is.
    fn recover(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>>;
    fn delete(&self, ledger_id: u64) -> BoxFuture<'_, Result<(), LedgerError>>;
    fn metadata(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>>;
    fn read<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        entry_id: u64,
    ) -> BoxFuture<'a, Result<Bytes, LedgerError>>;
    /// Entries `first..=last`, one result per entry, in order.
    fn read_range<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        first: u64,
        last: u64,
    ) -> BoxFuture<'a, Vec<Result<Bytes, LedgerError>>>;
}

/// A record's value and version.
pub type Versioned = Option<(Vec<u8>, u64)>;

/// A versioned key-value record (version 0: absent).
pub trait MetaStore: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, MetadataError>>;
    /// Writes `value` if the key is at `version`; false if it is not.
    fn cas<'a>(
        &'a self,
        key: &'a str,
        version: u64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, MetadataError>>;
    /// Deletes the key if it is at `version`; false if it is not.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, MetadataError>>;
}

impl LedgerHandle for LedgerWriter {
    fn ledger_id(&self) -> u64 {
        LedgerWriter::ledger_id(self)
    }
    fn add(&self, data: Bytes) -> BoxFuture<'static, Result<u64, LedgerError>> {
        LedgerWriter::add(self, data).boxed()
    }
    fn lac(&self) -> i64 {
        LedgerWriter::lac(self)
    }
    fn length_bytes(&self) -> u64 {
        LedgerWriter::length_bytes(self)
    }
    fn is_failed(&self) -> bool {
        LedgerWriter::is_failed(self)
    }
    fn metadata(&self) -> LedgerMetadata {
        LedgerWriter::metadata(self)
    }
    fn close(&self) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        LedgerWriter::close(self).boxed()
    }
}

impl LedgerStore for LedgerClient {
    fn create(
        &self,
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        properties: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Handle, LedgerError>> {
        async move {
            let w = LedgerClient::create(self, ensemble_size, write_quorum, ack_quorum, properties)
                .await?;
            Ok(Arc::new(w) as Handle)
        }
        .boxed()
    }
    fn recover(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        LedgerClient::recover(self, ledger_id).boxed()
    }
    fn delete(&self, ledger_id: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        LedgerClient::delete(self, ledger_id).boxed()
    }
    fn metadata(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        async move { Ok(LedgerClient::metadata(self, ledger_id).await?.0) }.boxed()
    }
    fn read<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        entry_id: u64,
    ) -> BoxFuture<'a, Result<Bytes, LedgerError>> {
        LedgerClient::read(self, meta, entry_id).boxed()
    }
    fn read_range<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        first: u64,
        last: u64,
    ) -> BoxFuture<'a, Vec<Result<Bytes, LedgerError>>> {
        LedgerClient::read_range(self, meta, first, last).boxed()
    }
}

impl MetaStore for MetadataClient {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, MetadataError>> {
        async move {
            Ok(MetadataClient::get(self, key)
                .await?
                .map(|kv| (kv.value, kv.version)))
        }
        .boxed()
    }
    fn cas<'a>(
        &'a self,
        key: &'a str,
        version: u64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, MetadataError>> {
        MetadataClient::cas(self, key, version, value, None).boxed()
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, MetadataError>> {
        async move {
            let res = self
                .txn(magnetar_metadata::Txn {
                    compares: vec![magnetar_metadata::Compare {
                        key: key.to_string(),
                        version,
                    }],
                    success: vec![magnetar_metadata::Op::Delete {
                        key: key.to_string(),
                    }],
                    failure: vec![],
                })
                .await?;
            Ok(res.succeeded)
        }
        .boxed()
    }
}

// ---- in memory, for unit tests ----

struct MemLedger {
    meta: LedgerMetadata,
    entries: Vec<Bytes>,
    /// Fenced by a recovery: its writer's adds fail from now on.
    fenced: bool,
}

/// Ledgers in memory with the bookies' rules: one writer, adds confirmed in
/// order, recovery fences the writer out and closes the ledger.
#[derive(Default)]
pub struct MemoryLedgers {
    inner: Mutex<(u64, HashMap<u64, MemLedger>)>,
}

impl MemoryLedgers {
    pub fn new() -> Arc<MemoryLedgers> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, MemLedger>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ids of the ledgers that exist.
    pub fn ledger_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().1.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Bytes stored over all ledgers.
    pub fn stored_bytes(&self) -> u64 {
        self.lock()
            .1
            .values()
            .flat_map(|l| l.entries.iter())
            .map(|e| e.len() as u64)
            .sum()
    }
}

struct MemHandle {
    store: Arc<MemoryLedgers>,
    ledger_id: u64,
    closed: Mutex<bool>,
}

impl MemHandle {
    fn with<T>(&self, f: impl FnOnce(&mut MemLedger) -> T) -> Result<T, LedgerError> {
        let mut g = self.store.lock();
        g.1.get_mut(&self.ledger_id)
            .map(f)
            .ok_or(LedgerError::NoSuchLedger(self.ledger_id))
    }
}

impl LedgerHandle for MemHandle {
    fn ledger_id(&self) -> u64 {
        self.ledger_id
    }
    fn add(&self, data: Bytes) -> BoxFuture<'static, Result<u64, LedgerError>> {
        let closed = *self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.ledger_id;
        let res = self.with(|l| {
            if l.fenced {
                Err(LedgerError::WriterFailed(id, "ledger fenced".into()))
            } else if closed || l.meta.state == LedgerState::Closed {
                Err(LedgerError::Closed(id))
            } else {
                l.meta.length_bytes += data.len() as u64;
                l.entries.push(data);
                l.meta.last_entry_id = l.entries.len() as i64 - 1;
                Ok(l.meta.last_entry_id as u64)
            }
        });
        futures::future::ready(res.and_then(|r| r)).boxed()
    }
    fn lac(&self) -> i64 {
        self.with(|l| l.meta.last_entry_id).unwrap_or(-1)
    }
    fn length_bytes(&self) -> u64 {
        self.with(|l| l.meta.length_bytes).unwrap_or(0)
    }
    fn is_failed(&self) -> bool {
        self.with(|l| l.fenced).unwrap_or(true)
    }
    fn metadata(&self) -> LedgerMetadata {
        self.with(|l| l.meta.clone())
            .unwrap_or_else(|_| empty_meta(self.ledger_id))
    }
    fn close(&self) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        let id = self.ledger_id;
        let res = self.with(|l| {
            if l.fenced {
                return Err(LedgerError::WriterFailed(id, "ledger fenced".into()));
            }
            l.meta.state = LedgerState::Closed;
            Ok(l.meta.clone())
        });
        futures::future::ready(res.and_then(|r| r)).boxed()
    }
}

fn empty_meta(ledger_id: u64) -> LedgerMetadata {
    LedgerMetadata {
        ledger_id,
        ensemble_size: 1,
        write_quorum: 1,
        ack_quorum: 1,
        fragments: Vec::new(),
        state: LedgerState::Open,
        last_entry_id: -1,
        length_bytes: 0,
        master_key: [0; 16],
        created_ms: 0,
        properties: BTreeMap::new(),
    }
}

impl LedgerStore for Arc<MemoryLedgers> {
    fn create(
        &self,
        _e: usize,
        _qw: usize,
        _qa: usize,
        properties: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Handle, LedgerError>> {
        let mut g = self.lock();
        g.0 += 1;
        let ledger_id = g.0;
        let mut meta = empty_meta(ledger_id);
        meta.properties = properties;
        g.1.insert(
            ledger_id,
            MemLedger {
                meta,
                entries: Vec::new(),
                fenced: false,
            },
        );
        drop(g);
        let h: Handle = Arc::new(MemHandle {
            store: self.clone(),
            ledger_id,
            closed: Mutex::new(false),
        });
        futures::future::ready(Ok(h)).boxed()
    }
    fn recover(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        let res = match self.lock().1.get_mut(&ledger_id) {
            Some(l) => {
                if l.meta.state != LedgerState::Closed {
                    l.fenced = true;
                    l.meta.state = LedgerState::Closed;
                }
                Ok(l.meta.clone())
            }
            None => Err(LedgerError::NoSuchLedger(ledger_id)),
        };
        futures::future::ready(res).boxed()
    }
    fn delete(&self, ledger_id: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.lock().1.remove(&ledger_id);
        futures::future::ready(Ok(())).boxed()
    }
    fn metadata(&self, ledger_id: u64) -> BoxFuture<'_, Result<LedgerMetadata, LedgerError>> {
        let res = self
            .lock()
            .1
            .get(&ledger_id)
            .map(|l| l.meta.clone())
            .ok_or(LedgerError::NoSuchLedger(ledger_id));
        futures::future::ready(res).boxed()
    }
    fn read<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        entry_id: u64,
    ) -> BoxFuture<'a, Result<Bytes, LedgerError>> {
        let id = meta.ledger_id;
        let res = match self.lock().1.get(&id) {
            Some(l) => l
                .entries
                .get(entry_id as usize)
                .cloned()
                .ok_or_else(|| LedgerError::Unreadable(id, entry_id, "no such entry".into())),
            None => Err(LedgerError::NoSuchLedger(id)),
        };
        futures::future::ready(res).boxed()
    }
    fn read_range<'a>(
        &'a self,
        meta: &'a LedgerMetadata,
        first: u64,
        last: u64,
    ) -> BoxFuture<'a, Vec<Result<Bytes, LedgerError>>> {
        async move {
            let mut out = Vec::new();
            for e in first..=last {
                out.push(self.read(meta, e).await);
            }
            out
        }
        .boxed()
    }
}

/// Versioned keys in memory, with the metadata service's CAS rule.
#[derive(Default)]
pub struct MemoryMeta {
    keys: Mutex<HashMap<String, (Vec<u8>, u64)>>,
}

impl MemoryMeta {
    pub fn new() -> Arc<MemoryMeta> {
        Arc::default()
    }
}

impl MetaStore for Arc<MemoryMeta> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, MetadataError>> {
        let v = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        futures::future::ready(Ok(v)).boxed()
    }
    fn cas<'a>(
        &'a self,
        key: &'a str,
        version: u64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, MetadataError>> {
        let mut g = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let current = g.get(key).map(|(_, v)| *v).unwrap_or(0);
        let ok = current == version;
        if ok {
            g.insert(key.to_string(), (value, version + 1));
        }
        futures::future::ready(Ok(ok)).boxed()
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, MetadataError>> {
        let mut g = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let ok = g.get(key).is_some_and(|(_, v)| *v == version);
        if ok {
            g.remove(key);
        }
        futures::future::ready(Ok(ok)).boxed()
    }
}
