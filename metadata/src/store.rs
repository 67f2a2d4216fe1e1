//! Raft log and state machine storage on disk.
//!
//! The log is one append-only file of `[u32 len][u32 crc32c][bincode entry]`
//! records, fsynced before openraft is told an append is durable; a torn tail
//! (crash mid-write) is cut off at open. Vote and purge marks are small files
//! replaced atomically. The state machine lives in memory and is persisted as
//! snapshots (written to a temp file, fsynced, renamed).

// openraft's storage traits fix the error type (StorageError, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use magnetar_proto::metadata_api::WatchEvent;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::{CommandResult, KvState};
use crate::TypeConfig;

type SErr = StorageError<u64>;

fn io_err(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write(AnyError::new(&e)).into()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `data` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_opt<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, SErr> {
    match std::fs::read(path) {
        Ok(b) => bincode::deserialize(&b)
            .map(Some)
            .map_err(|e| StorageIOError::read(AnyError::new(&*e)).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageIOError::read(AnyError::new(&e)).into()),
    }
}

fn encode_record(entry: &Entry<TypeConfig>, out: &mut Vec<u8>) -> Result<(), SErr> {
    let body = bincode::serialize(entry).map_err(|e| io_err(*e))?;
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Parses records until the first torn or corrupt one; returns the entries
/// and the length of the valid prefix.
fn parse_records(data: &[u8]) -> (Vec<Entry<TypeConfig>>, usize) {
    let mut entries = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > data.len() - pos - 8 {
            break;
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        match bincode::deserialize(body) {
            Ok(e) => entries.push(e),
            Err(_) => break,
        }
        pos += 8 + len;
    }
    (entries, pos)
}

struct LogInner {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
}

impl LogInner {
    fn rewrite(&mut self) -> Result<(), SErr> {
        let mut buf = Vec::new();
        for e in self.entries.values() {
            encode_record(e, &mut buf)?;
        }
        let path = self.dir.join("raft.log");
        write_atomic(&path, &buf).map_err(io_err)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err)?;
        Ok(())
    }
}

/// The Raft log on disk.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    pub fn open(dir: &Path) -> Result<LogStore, SErr> {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let path = dir.join("raft.log");
        let mut data = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(io_err)?;
        }
        let (list, valid) = parse_records(&data);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err)?;
        if valid < data.len() {
            tracing::warn!(path = %path.display(), valid, len = data.len(), "raft log has a torn tail; truncating");
            file.set_len(valid as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        let last_purged: Option<LogId<u64>> =
            read_opt::<Option<LogId<u64>>>(&dir.join("purged"))?.flatten();
        let mut entries = BTreeMap::new();
        for e in list {
            // A truncate is a rewrite, so later records always supersede earlier ones.
            if last_purged
                .map(|p| e.log_id.index > p.index)
                .unwrap_or(true)
            {
                entries.split_off(&e.log_id.index);
                entries.insert(e.log_id.index, e);
            }
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                file,
                entries,
                last_purged,
                vote: read_opt(&dir.join("vote"))?,
                committed: read_opt::<Option<LogId<u64>>>(&dir.join("committed"))?.flatten(),
            })),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        Ok(lock(&self.inner)
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let g = lock(&self.inner);
        let last = g
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(g.last_purged);
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        let mut g = lock(&self.inner);
        let b = bincode::serialize(vote).map_err(|e| io_err(*e))?;
        write_atomic(&g.dir.join("vote"), &b)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        g.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SErr> {
        let mut g = lock(&self.inner);
        // Not needed for safety (commit is re-learned from the leader); kept so
        // a restarted single node re-applies without waiting for an election.
        let b = bincode::serialize(&committed).map_err(|e| io_err(*e))?;
        write_atomic(&g.dir.join("committed"), &b).map_err(io_err)?;
        g.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SErr> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut g = lock(&self.inner);
        let mut buf = Vec::new();
        let mut list = Vec::new();
        for e in entries {
            encode_record(&e, &mut buf)?;
            list.push(e);
        }
        let res = g.file.write_all(&buf).and_then(|_| g.file.sync_data());
        if res.is_ok() {
            for e in list {
                g.entries.insert(e.log_id.index, e);
            }
        }
        let failed = res
            .as_ref()
            .err()
            .map(|e| std::io::Error::new(e.kind(), e.to_string()));
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(StorageIOError::write_logs(AnyError::new(&e)).into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let mut g = lock(&self.inner);
        g.entries.split_off(&log_id.index);
        g.rewrite()
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let mut g = lock(&self.inner);
        let b = bincode::serialize(&Some(log_id)).map_err(|e| io_err(*e))?;
        write_atomic(&g.dir.join("purged"), &b).map_err(io_err)?;
        g.last_purged = Some(log_id);
        let keep = g.entries.split_off(&(log_id.index + 1));
        g.entries = keep;
        g.rewrite()
    }
}

/// What a snapshot holds: the whole state machine.
#[derive(Serialize, Deserialize, Default)]
struct SmData {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    kv: KvState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// State shared by the state machine and the server's read path.
pub struct SmShared {
    dir: PathBuf,
    data: Mutex<SmData>,
    snapshot: Mutex<Option<StoredSnapshot>>,
    events: broadcast::Sender<WatchEvent>,
}

impl SmShared {
    /// Runs `f` on the current key-value state.
    pub fn read<R>(&self, f: impl FnOnce(&KvState) -> R) -> R {
        f(&lock(&self.data).kv)
    }

    /// Subscribes to live events and returns, atomically with it, the history
    /// events with revision ≥ `from`.
    pub fn subscribe(
        &self,
        from: u64,
    ) -> (broadcast::Receiver<WatchEvent>, Vec<WatchEvent>, u64, u64) {
        let g = lock(&self.data);
        let rx = self.events.subscribe();
        let past =
            g.kv.history
                .iter()
                .filter(|e| e.revision >= from)
                .cloned()
                .collect();
        (rx, past, g.kv.oldest_history_revision(), g.kv.revision)
    }

    pub fn last_applied(&self) -> u64 {
        lock(&self.data).last_applied.map(|l| l.index).unwrap_or(0)
    }
}

/// The Raft state machine.
#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<SmShared>,
}

impl StateMachine {
    pub fn open(dir: &Path) -> Result<StateMachine, SErr> {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let snapshot: Option<StoredSnapshot> = read_opt(&dir.join("snapshot"))?;
        let data = match &snapshot {
            Some(s) => bincode::deserialize(&s.data)
                .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&*e)))?,
            None => SmData::default(),
        };
        let (events, _) = broadcast::channel(16 * 1024);
        Ok(StateMachine {
            shared: Arc::new(SmShared {
                dir: dir.to_path_buf(),
                data: Mutex::new(data),
                snapshot: Mutex::new(snapshot),
                events,
            }),
        })
    }

    fn install(&self, stored: StoredSnapshot) -> Result<(), SErr> {
        let data: SmData = bincode::deserialize(&stored.data)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&*e)))?;
        let b = bincode::serialize(&stored).map_err(|e| io_err(*e))?;
        write_atomic(&self.shared.dir.join("snapshot"), &b).map_err(io_err)?;
        *lock(&self.shared.data) = data;
        *lock(&self.shared.snapshot) = Some(stored);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, meta) = {
            let g = lock(&self.shared.data);
            let data = bincode::serialize(&*g).map_err(|e| io_err(*e))?;
            let id = g
                .last_applied
                .map(|l| format!("{}-{}", l.leader_id, l.index))
                .unwrap_or_else(|| "0".into());
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
                snapshot_id: id,
            };
            (data, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let b = bincode::serialize(&stored).map_err(|e| io_err(*e))?;
        write_atomic(&self.shared.dir.join("snapshot"), &b).map_err(io_err)?;
        *lock(&self.shared.snapshot) = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), SErr> {
        let g = lock(&self.shared.data);
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut g = lock(&self.shared.data);
        let mut out = Vec::new();
        for e in entries {
            g.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(CommandResult::Ok),
                EntryPayload::Normal(cmd) => {
                    let (res, events) = g.kv.apply(&cmd);
                    for ev in events {
                        // No receivers is fine: nobody watches.
                        let _ = self.shared.events.send(ev);
                    }
                    out.push(res);
                }
                EntryPayload::Membership(m) => {
                    g.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(CommandResult::Ok);
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        self.install(StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(lock(&self.shared.snapshot).as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use magnetar_proto::metadata_api::{Op, Txn};
    use openraft::{CommittedLeaderId, Membership};

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    #[test]
    fn records_round_trip_and_torn_tail_is_cut() {
        let members = Membership::new(vec![[1u64].into_iter().collect()], None);
        let list = vec![
            entry(1, EntryPayload::Blank),
            entry(2, EntryPayload::Membership(members)),
            entry(3, EntryPayload::Normal(Command::LeaseGrant { ttl_ms: 5 })),
            entry(
                4,
                EntryPayload::Normal(Command::Txn(Txn {
                    compares: vec![],
                    success: vec![Op::Put {
                        key: "k".into(),
                        value: vec![1, 2],
                        lease: Some(1),
                    }],
                    failure: vec![Op::Get { key: "k".into() }],
                })),
            ),
            entry(
                5,
                EntryPayload::Normal(Command::LeaseExpire { ids: vec![1, 2] }),
            ),
        ];
        let mut buf = Vec::new();
        for e in &list {
            encode_record(e, &mut buf).unwrap();
        }
        let (got, valid) = parse_records(&buf);
        assert_eq!(got.len(), 5);
        assert_eq!(valid, buf.len());
        let (got, valid) = parse_records(&buf[..buf.len() - 3]);
        assert_eq!(got.len(), 4);
        assert!(valid < buf.len());
    }

    /// Builds a fresh log store and state machine in a temporary directory
    /// for openraft's storage conformance suite.
    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SErr> {
            let dir = tempfile::tempdir().map_err(io_err)?;
            let log = LogStore::open(dir.path())?;
            let sm = StateMachine::open(dir.path())?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }
}
