//! The replicated key-value state: versioned keys, a global revision, leases
//! and ephemeral keys. Plain data, no I/O: the Raft state machine applies
//! committed commands to it, and tests drive it directly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use magnetar_proto::metadata_api::{
    EventKind, KeyValue, Op, OpResult, RequestId, Txn, TxnResult, WatchEvent,
};
use serde::{Deserialize, Serialize};

/// Commands that travel through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Txn(Txn),
    /// A transaction a client may send more than once (it retries after a
    /// transport error without knowing whether the first try applied): the
    /// first copy applies, later copies get the first copy's result.
    TxnOnce {
        request: RequestId,
        txn: Txn,
    },
    LeaseGrant {
        ttl_ms: u64,
    },
    LeaseRevoke {
        id: u64,
    },
    /// Proposed by the leader for leases it saw go unrenewed for their TTL.
    LeaseExpire {
        ids: Vec<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Txn(TxnResult),
    Lease { id: u64, ttl_ms: u64 },
    LeaseNotFound(u64),
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ttl_ms: u64,
    pub keys: BTreeSet<String>,
}

/// How many applied requests are remembered for de-duplication. A client
/// retries within its retry window (seconds); the bound keeps the state
/// machine's memory fixed while covering that window at tens of thousands
/// of writes per second.
pub const REMEMBERED_REQUESTS: usize = 50_000;

/// Bounded history of recent events, for watches that resume.
pub const WATCH_HISTORY_EVENTS: usize = 100_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvState {
    pub kv: BTreeMap<String, KeyValue>,
    pub revision: u64,
    pub leases: BTreeMap<u64, Lease>,
    pub next_lease_id: u64,
    #[serde(skip)]
    pub history: VecDeque<WatchEvent>,
    /// Results of recent `TxnOnce` requests, and their order for eviction.
    pub applied_requests: BTreeMap<RequestId, TxnResult>,
    pub applied_order: VecDeque<RequestId>,
}

impl KvState {
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kv.get(key)
    }

    /// A page of the keys under `prefix` after `after` (exclusive): up to
    /// `limit` keys, stopping once keys and values reach `budget` bytes
    /// (one key at least); and whether more keys follow.
    pub fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keys_only: bool,
        budget: usize,
    ) -> (Vec<KeyValue>, bool) {
        use std::ops::Bound;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut it = self
            .kv
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some((k, v)) = it.peek() {
            if out.len() >= limit.max(1) || (!out.is_empty() && bytes >= budget) {
                break;
            }
            let mut kv = (*v).clone();
            if keys_only {
                kv.value = Vec::new();
            }
            bytes += k.len() + kv.value.len();
            out.push(kv);
            it.next();
        }
        (out, it.peek().is_some())
    }

    /// Oldest revision still in the watch history (events at or after it can be replayed).
    pub fn oldest_history_revision(&self) -> u64 {
        self.history
            .front()
            .map(|e| e.revision)
            .unwrap_or(self.revision + 1)
    }

    fn record(&mut self, events: &mut Vec<WatchEvent>, ev: WatchEvent) {
        self.history.push_back(ev.clone());
        while self.history.len() > WATCH_HISTORY_EVENTS {
            self.history.pop_front();
        }
        events.push(ev);
    }

    fn put(
        &mut self,
        rev: u64,
        key: String,
        value: Vec<u8>,
        lease: Option<u64>,
        events: &mut Vec<WatchEvent>,
    ) -> OpResult {
        let prev = self.kv.get(&key).cloned();
        if let Some(old) = prev.as_ref().and_then(|p| p.lease) {
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(&key);
            }
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.clone());
        }
        let kv = KeyValue {
            key: key.clone(),
            value,
            create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(rev),
            mod_revision: rev,
            version: prev.as_ref().map(|p| p.version).unwrap_or(0) + 1,
            lease,
        };
        self.kv.insert(key, kv.clone());
        self.record(
            events,
            WatchEvent {
                revision: rev,
                kind: EventKind::Put,
                kv,
            },
        );
        OpResult::Put { prev }
    }

    fn delete(&mut self, rev: u64, key: &str, events: &mut Vec<WatchEvent>) -> OpResult {
        let prev = self.kv.remove(key);
        if let Some(p) = &prev {
            if let Some(l) = p.lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            let mut kv = p.clone();
            kv.mod_revision = rev;
            self.record(
                events,
                WatchEvent {
                    revision: rev,
                    kind: EventKind::Delete,
                    kv,
                },
            );
        }
        OpResult::Delete { prev }
    }

    fn drop_lease(&mut self, id: u64, rev: u64, events: &mut Vec<WatchEvent>) -> bool {
        match self.leases.remove(&id) {
            Some(lease) => {
                for key in lease.keys {
                    // Keys re-bound to another lease were removed from this set already.
                    self.delete(rev, &key, events);
                }
                true
            }
            None => false,
        }
    }

    /// Applies one committed command. Every change in it shares one new
    /// revision; the events it produced are returned for watchers.
    pub fn apply(&mut self, cmd: &Command) -> (CommandResult, Vec<WatchEvent>) {
        let mut events = Vec::new();
        let rev = self.revision + 1;
        let result = match cmd {
            Command::TxnOnce { request, txn } => {
                if let Some(done) = self.applied_requests.get(request) {
                    return (CommandResult::Txn(done.clone()), events);
                }
                let (result, events) = self.apply(&Command::Txn(txn.clone()));
                if let CommandResult::Txn(r) = &result {
                    self.applied_requests.insert(*request, r.clone());
                    self.applied_order.push_back(*request);
                    while self.applied_order.len() > REMEMBERED_REQUESTS {
                        if let Some(old) = self.applied_order.pop_front() {
                            self.applied_requests.remove(&old);
                        }
                    }
                }
                return (result, events);
            }
            Command::Txn(txn) => {
                let ok = txn
                    .compares
                    .iter()
                    .all(|c| self.kv.get(&c.key).map(|kv| kv.version).unwrap_or(0) == c.version);
                let ops = if ok { &txn.success } else { &txn.failure };
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(match op {
                        Op::Put { key, value, lease } => {
                            // A put on an unknown lease would make a key nobody can expire.
                            let lease = lease.filter(|id| self.leases.contains_key(id));
                            self.put(rev, key.clone(), value.clone(), lease, &mut events)
                        }
                        Op::Delete { key } => self.delete(rev, key, &mut events),
                        Op::Get { key } => OpResult::Get(self.kv.get(key).cloned()),
                    });
                }
                if !events.is_empty() {
                    self.revision = rev;
                }
                CommandResult::Txn(TxnResult {
                    succeeded: ok,
                    revision: self.revision,
                    results,
                })
            }
            Command::LeaseGrant { ttl_ms } => {
                self.next_lease_id += 1;
                let id = self.next_lease_id;
                self.leases.insert(
                    id,
                    Lease {
                        ttl_ms: *ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                CommandResult::Lease {
                    id,
                    ttl_ms: *ttl_ms,
                }
            }
            Command::LeaseRevoke { id } => {
                if self.drop_lease(*id, rev, &mut events) {
                    CommandResult::Ok
                } else {
                    CommandResult::LeaseNotFound(*id)
                }
            }
            Command::LeaseExpire { ids } => {
                for id in ids {
                    self.drop_lease(*id, rev, &mut events);
                }
                CommandResult::Ok
            }
        };
        if !events.is_empty() {
            self.revision = rev;
        }
        (result, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_proto::metadata_api::Compare;

    fn put(key: &str, v: &str, lease: Option<u64>) -> Op {
        Op::Put {
            key: key.into(),
            value: v.as_bytes().to_vec(),
            lease,
        }
    }

    fn cas(key: &str, version: u64, op: Op) -> Command {
        Command::Txn(Txn {
            compares: vec![Compare {
                key: key.into(),
                version,
            }],
            success: vec![op],
            failure: vec![],
        })
    }

    #[test]
    fn cas_versions_and_revisions() {
        let mut s = KvState::default();
        let (r, ev) = s.apply(&cas("a", 0, put("a", "1", None)));
        assert!(matches!(
            r,
            CommandResult::Txn(TxnResult {
                succeeded: true,
                revision: 1,
                ..
            })
        ));
        assert_eq!(ev.len(), 1);
        // A second create-if-absent fails and changes nothing.
        let (r, ev) = s.apply(&cas("a", 0, put("a", "2", None)));
        assert!(matches!(
            r,
            CommandResult::Txn(TxnResult {
                succeeded: false,
                revision: 1,
                ..
            })
        ));
        assert!(ev.is_empty());
        let (r, _) = s.apply(&cas("a", 1, put("a", "2", None)));
        assert!(matches!(
            r,
            CommandResult::Txn(TxnResult {
                succeeded: true,
                revision: 2,
                ..
            })
        ));
        let kv = s.get("a").unwrap();
        assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 1, 2));
        assert_eq!(kv.value, b"2");
    }

    #[test]
    fn lease_expiry_deletes_keys_at_one_revision() {
        let mut s = KvState::default();
        let (r, _) = s.apply(&Command::LeaseGrant { ttl_ms: 1000 });
        let CommandResult::Lease { id, .. } = r else {
            panic!("no lease")
        };
        s.apply(&Command::Txn(Txn {
            compares: vec![],
            success: vec![put("e/1", "x", Some(id)), put("e/2", "y", Some(id))],
            failure: vec![],
        }));
        s.apply(&cas("p", 0, put("p", "z", None)));
        let (_, ev) = s.apply(&Command::LeaseExpire { ids: vec![id] });
        assert_eq!(ev.len(), 2);
        assert!(ev
            .iter()
            .all(|e| e.kind == EventKind::Delete && e.revision == 3));
        assert!(s.get("e/1").is_none() && s.get("p").is_some());
        assert_eq!(
            s.apply(&Command::LeaseRevoke { id }).0,
            CommandResult::LeaseNotFound(id)
        );
    }

    #[test]
    fn range_by_prefix_with_limit() {
        let mut s = KvState::default();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            s.apply(&cas(k, 0, put(k, "v", None)));
        }
        let range = |prefix: &str, limit| s.range_page(prefix, None, limit, false, usize::MAX).0;
        assert_eq!(range("a/", 10).len(), 3);
        assert_eq!(range("a/", 2).len(), 2);
        assert_eq!(range("c/", 2).len(), 0);
    }

    #[test]
    fn a_range_comes_in_pages_cut_by_count_and_bytes() {
        let mut s = KvState::default();
        for k in ["a", "a/1", "a/2", "a/3", "a/4", "b/1"] {
            s.apply(&cas(k, 0, put(k, "0123456789", None)));
        }
        let keys = |(kvs, more): (Vec<KeyValue>, bool)| {
            let v: Vec<String> = kvs.into_iter().map(|kv| kv.key).collect();
            (v, more)
        };
        let ks = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            keys(s.range_page("a/", None, 2, false, 1 << 20)),
            (ks(&["a/1", "a/2"]), true)
        );
        assert_eq!(
            keys(s.range_page("a/", Some("a/2"), 2, false, 1 << 20)),
            (ks(&["a/3", "a/4"]), false)
        );
        // 13 bytes a key with its value: a 20-byte budget takes two (the
        // second passes it), a 1-byte budget one.
        assert_eq!(
            keys(s.range_page("a/", None, 10, false, 20)),
            (ks(&["a/1", "a/2"]), true)
        );
        assert_eq!(
            keys(s.range_page("a/", None, 10, false, 1)),
            (ks(&["a/1"]), true)
        );
        // Keys only: no values, so no bytes of them counted.
        let (kvs, more) = s.range_page("a/", None, 10, true, 20);
        assert!(kvs.iter().all(|kv| kv.value.is_empty()) && kvs.len() == 4 && !more);
        // `after` before the prefix starts at the prefix; past it, nothing.
        assert_eq!(
            keys(s.range_page("a/", Some("a"), 1, false, 1 << 20)),
            (ks(&["a/1"]), true)
        );
        assert_eq!(
            keys(s.range_page("a/", Some("a/9"), 10, false, 1 << 20)),
            (ks(&[]), false)
        );
    }

    #[test]
    fn a_retried_request_applies_once() {
        let mut s = KvState::default();
        let request = RequestId { client: 7, seq: 1 };
        let once = |v: &str| Command::TxnOnce {
            request,
            txn: Txn {
                compares: vec![],
                success: vec![put("k", v, None)],
                failure: vec![],
            },
        };
        let (first, ev) = s.apply(&once("a"));
        assert_eq!(ev.len(), 1);
        let (again, ev) = s.apply(&once("a"));
        assert!(ev.is_empty(), "a repeat must change nothing");
        assert_eq!(first, again, "a repeat gets the first result");
        assert_eq!(s.get("k").map(|kv| kv.version), Some(1));
        // A new request from the same client applies.
        s.apply(&Command::TxnOnce {
            request: RequestId { client: 7, seq: 2 },
            txn: Txn {
                compares: vec![],
                success: vec![put("k", "b", None)],
                failure: vec![],
            },
        });
        assert_eq!(s.get("k").map(|kv| kv.version), Some(2));
    }
}
