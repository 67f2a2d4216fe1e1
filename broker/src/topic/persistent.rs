//! A loaded persistent topic: its managed ledger, its producers and its
//! subscriptions. Publishing goes through `publish`; unloading closes the
//! storage first, then tells every client where to go.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use magnetar_proto::commands::Assigned;
use magnetar_proto::pulsar::ServerError;
use magnetar_proto::{Payload, TopicName};
use tokio::sync::oneshot;

use super::compaction::{self, CompactedView, Status as CompactionStatus};
use super::dedup::{self, Check, Dedup};
use super::delayed;
use super::policies::{over_quota, to_evict, Effective};
use super::producers::{self, AccessMode, Admit, ProducerRef, Producers};
use crate::managed_ledger::cursor::{CursorState, Position};
use crate::managed_ledger::ledger_list::now_ms as ledger_now_ms;
use crate::managed_ledger::CompactedLedger;
use crate::managed_ledger::{AppendDone, ManagedLedger, ManagedLedgerConfig, MlError, Stores};
use crate::ownership::namespaces::{BacklogPolicy, BacklogQuota};
use crate::subscription::delayed_index::DelayedIndex;
use crate::subscription::{
    self, ClientLink, ConsumerConn, DeadLetterRule, DeadLetterSink, OutCounters, SubContext,
    SubEvent, SubPolicy, SubStats, SubscriptionHandle,
};
use crate::BrokerError;

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    Earliest,
    Latest,
}

/// A producer asking to join a topic.
pub struct ProducerRequest {
    pub conn_id: u64,
    pub producer_id: u64,
    pub name: String,
    pub link: Arc<dyn ClientLink>,
    pub mode: AccessMode,
    /// The topic epoch an exclusive producer had before (reconnecting).
    pub epoch: Option<u64>,
}

/// How a producer joined.
#[derive(Debug)]
pub enum Joined {
    /// Added; an exclusive producer with its topic epoch.
    Ready { epoch: Option<u64> },
    /// Queued for exclusive access: ask again once this fires (an error:
    /// the topic closed).
    Waiting(oneshot::Receiver<()>),
}

pub struct Topic {
    pub name: TopicName,
    pub ml: Arc<ManagedLedger>,
    producers: Mutex<Producers>,
    subs: tokio::sync::Mutex<HashMap<String, SubscriptionHandle>>,
    /// Set once unloading started: no new producers or subscriptions.
    closing: AtomicBool,
    pub stats: TopicStats,
    dedup: Arc<DedupCell>,
    /// The policies in force.
    policies: Mutex<Effective>,
    /// The id of the next message of a non-persistent topic.
    live_seq: AtomicU64,
    /// The compacted view its `read_compacted` subscriptions read.
    compacted: Arc<std::sync::RwLock<Option<Arc<CompactedView>>>>,
    compaction: Mutex<CompactionStatus>,
    /// What the subscriptions act on, as it changes.
    sub_policy: tokio::sync::watch::Sender<SubPolicy>,
    sink: Option<Arc<dyn DeadLetterSink>>,
    /// The delayed-delivery index its subscriptions share.
    delayed: Arc<DelayedIndex>,
}

/// The part of the policies a subscription acts on.
fn sub_policy(p: &Effective) -> SubPolicy {
    SubPolicy {
        dead_letter: p.dead_letter.as_ref().map(|d| DeadLetterRule {
            max_redeliver_count: d.max_redeliver_count,
            topic: d.dead_letter_topic.clone(),
        }),
        redelivery_backoff: p.redelivery_backoff,
    }
}

/// The topic's deduplication state (`None`: off), reachable from the
/// completions of its appends.
struct DedupCell {
    state: Mutex<Option<Dedup>>,
    ml: Arc<ManagedLedger>,
    /// A snapshot is being written (one at a time, so none overtakes a newer).
    snapshotting: AtomicBool,
}

impl DedupCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Dedup>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A deduplicated append finished: the state learns it, duplicates
    /// waiting on it get the same answer, a snapshot is written when due.
    fn completed(
        self: &Arc<Self>,
        producer: &str,
        seq: u64,
        highest: u64,
        res: Result<Position, MlError>,
        done: AppendDone,
    ) {
        let (waiting, snapshot) = {
            let mut g = self.lock();
            match (g.as_mut(), &res) {
                (Some(d), Ok(pos)) => {
                    let waiting = d.stored(producer, seq, highest, *pos);
                    let snapshot = if self.snapshotting.load(Ordering::Acquire) {
                        None
                    } else {
                        d.take_snapshot(false)
                    };
                    (waiting, snapshot)
                }
                (Some(d), Err(_)) => (d.failed(producer, seq), None),
                (None, _) => (Vec::new(), None),
            }
        };
        for w in waiting {
            w(res.clone());
        }
        done(res);
        if let Some((at, map)) = snapshot {
            self.snapshotting.store(true, Ordering::Release);
            let me = self.clone();
            tokio::spawn(async move {
                me.write_snapshot(at, map).await;
                me.snapshotting.store(false, Ordering::Release);
            });
        }
    }

    async fn write_snapshot(&self, at: Position, properties: BTreeMap<String, i64>) {
        let mut state = CursorState::new(at);
        state.properties = properties;
        if let Err(e) = self.ml.persist_cursor(dedup::CURSOR, &state).await {
            tracing::warn!(topic = %self.ml.name, error = %e, "writing the deduplication snapshot failed; the next one retries");
        }
    }

    /// The final snapshot (unload): the next owner replays nothing.
    async fn close(&self) {
        let snapshot = {
            let mut g = self.lock();
            g.as_mut().and_then(|d| {
                d.close();
                d.take_snapshot(true)
            })
        };
        if let Some((at, map)) = snapshot {
            self.write_snapshot(at, map).await;
        }
    }
}

/// A compacted view read back from its ledger (topic load).
async fn load_view(ml: &ManagedLedger, c: CompactedLedger) -> Result<CompactedView, BrokerError> {
    let mut view = CompactedView {
        ledger_id: c.ledger_id,
        horizon: c.horizon,
        positions: BTreeMap::new(),
    };
    let mut first = 0u64;
    while first < c.entries {
        let last = (first + 999).min(c.entries - 1);
        for (i, e) in ml
            .read_side_ledger(c.ledger_id, first, last)
            .await?
            .into_iter()
            .enumerate()
        {
            if let Some((p, _)) = compaction::decode(e) {
                view.positions.insert(p, first + i as u64);
            }
        }
        first = last + 1;
    }
    Ok(view)
}

/// Subscription names the broker keeps for itself.
fn refuse_reserved(sub: &str) -> Result<(), BrokerError> {
    if sub == dedup::CURSOR {
        return Err(BrokerError::new(
            ServerError::NotAllowedError,
            format!("subscription name {sub} is reserved"),
        ));
    }
    Ok(())
}

/// The deduplication state of a topic being loaded: its snapshot (none:
/// deduplication was just turned on — it starts at the last entry), then
/// every entry after it read back.
async fn recover_dedup(
    ml: &Arc<ManagedLedger>,
    snapshot: Option<CursorState>,
) -> Result<Dedup, BrokerError> {
    let Some(snapshot) = snapshot else {
        ml.persist_cursor(dedup::CURSOR, &CursorState::new(ml.last_confirmed()))
            .await?;
        return Ok(Dedup::default());
    };
    let mut d = Dedup::from_snapshot(&snapshot.properties);
    let last = ml.last_confirmed();
    let mut next = ml.next_after(snapshot.mark_delete);
    let mut replayed = 0u64;
    while let Some(p) = next.filter(|p| *p <= last) {
        let data = ml.read(p).await?;
        match Payload::peek_metadata(&data) {
            Ok(md) => {
                let n = md.num_messages_in_batch.unwrap_or(1).max(1) as u64;
                let highest = md
                    .highest_sequence_id
                    .unwrap_or(0)
                    .max(md.sequence_id + n - 1);
                d.replayed(&md.producer_name, md.sequence_id, highest, p);
            }
            Err(e) => {
                tracing::warn!(topic = %ml.name, position = ?p, error = %e, "an entry's metadata does not parse; deduplication skips it")
            }
        }
        replayed += 1;
        next = ml.next_after(p);
    }
    tracing::info!(topic = %ml.name, replayed, "deduplication state recovered");
    Ok(d)
}

/// Traffic counters of a topic (rates come from their differences).
#[derive(Debug, Default)]
pub struct TopicStats {
    pub msgs_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub out: Arc<OutCounters>,
    /// The last sample `rates` took (none yet: the topic's load).
    sample: Mutex<Option<RateSample>>,
}

/// Per-second rates over the last sampling interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub msgs_in: f64,
    pub bytes_in: f64,
    pub msgs_out: f64,
    pub bytes_out: f64,
}

#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: std::time::Instant,
    counters: [u64; 4],
    rates: Rates,
}

/// Shortest interval a rate is computed over; asked more often, the last
/// rates are returned again.
const RATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl TopicStats {
    pub fn counters(&self) -> [u64; 4] {
        [
            self.msgs_in.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
            self.out.msgs.load(Ordering::Relaxed),
            self.out.bytes.load(Ordering::Relaxed),
        ]
    }

    /// Rates since the previous sample (at least `RATE_INTERVAL` ago); the
    /// first call samples and reports zero.
    pub fn rates(&self) -> Rates {
        let now = std::time::Instant::now();
        let counters = self.counters();
        let mut g = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        let Some(last) = *g else {
            *g = Some(RateSample {
                at: now,
                counters,
                rates: Rates::default(),
            });
            return Rates::default();
        };
        let secs = now.duration_since(last.at).as_secs_f64();
        if now.duration_since(last.at) < RATE_INTERVAL {
            return last.rates;
        }
        let d = |i: usize| counters[i].saturating_sub(last.counters[i]) as f64 / secs;
        let rates = Rates {
            msgs_in: d(0),
            bytes_in: d(1),
            msgs_out: d(2),
            bytes_out: d(3),
        };
        *g = Some(RateSample {
            at: now,
            counters,
            rates,
        });
        rates
    }
}

/// What an unload leaves for `disconnect`: the clients to tell.
pub struct Detached {
    producers: Vec<(u64, Arc<dyn ClientLink>)>,
    consumers: Vec<ConsumerConn>,
}

impl Topic {
    /// Opens the topic's storage and subscriptions under `policies`; with
    /// deduplication on, its state is recovered (snapshot, then the entries
    /// after it).
    pub async fn load(
        name: TopicName,
        cfg: ManagedLedgerConfig,
        stores: Stores,
        policies: Effective,
        sink: Option<Arc<dyn DeadLetterSink>>,
    ) -> Result<Arc<Topic>, BrokerError> {
        let dedup = policies.dedup;
        let sub_policy = tokio::sync::watch::Sender::new(self::sub_policy(&policies));
        let ml = ManagedLedger::open(&name.as_key(), cfg, stores).await?;
        ml.set_retention(policies.retention);
        let mut cursors = ml.open_cursors().await?;
        let snapshot = cursors
            .iter()
            .position(|(n, _)| n == dedup::CURSOR)
            .map(|i| cursors.remove(i).1);
        let ml_for_dedup = ml.clone();
        let dedup = match (dedup, snapshot) {
            (true, snapshot) => Some(recover_dedup(&ml, snapshot).await?),
            (false, Some(_)) => {
                ml.delete_cursor(dedup::CURSOR).await?;
                None
            }
            (false, None) => None,
        };
        let stats = TopicStats::default();
        // Rates are measured from the load on.
        stats.rates();
        let compacted = Arc::new(std::sync::RwLock::new(match ml.compacted().await {
            Some(c) => Some(Arc::new(load_view(&ml, c).await?)),
            None => None,
        }));
        let mut subs = HashMap::new();
        let delayed = Arc::new(DelayedIndex::new(
            ml.config().delayed_index_memory_entries,
            &ml.delayed_buckets().await,
        ));
        let ctx = SubContext {
            topic: name.to_string(),
            compacted: compacted.clone(),
            out: stats.out.clone(),
            policy: sub_policy.subscribe(),
            sink: sink.clone(),
            delayed: delayed.clone(),
        };
        // Cursors named `pulsar.…` are the broker's own (compaction).
        cursors.retain(|(n, _)| !n.starts_with("pulsar."));
        for (sub, state) in cursors {
            let h = subscription::spawn(sub.clone(), true, ml.clone(), state, ctx.clone());
            subs.insert(sub, h);
        }
        let topic = Arc::new(Topic {
            name,
            ml,
            producers: Mutex::default(),
            subs: tokio::sync::Mutex::new(subs),
            closing: AtomicBool::new(false),
            stats,
            dedup: Arc::new(DedupCell {
                state: Mutex::new(dedup),
                ml: ml_for_dedup,
                snapshotting: AtomicBool::new(false),
            }),
            policies: Mutex::new(policies),
            compacted,
            compaction: Mutex::new(CompactionStatus::default()),
            live_seq: AtomicU64::new(0),
            sub_policy,
            sink,
            delayed: delayed.clone(),
        });
        tokio::spawn(delayed::run(
            delayed,
            topic.ml.clone(),
            Arc::downgrade(&topic),
        ));
        Ok(topic)
    }

    /// How the last compaction went (or that one runs).
    pub fn compaction_status(&self) -> CompactionStatus {
        self.compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a compaction unless one runs; false if one does.
    pub fn start_compaction(self: &Arc<Self>) -> bool {
        {
            let mut g = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
            if *g == CompactionStatus::Running {
                return false;
            }
            *g = CompactionStatus::Running;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.compact().await;
            let status = match res {
                Ok(()) => CompactionStatus::Success,
                Err(e) => {
                    tracing::warn!(topic = %me.name, error = %e, "compaction failed");
                    CompactionStatus::Error(e.to_string())
                }
            };
            *me.compaction.lock().unwrap_or_else(|e| e.into_inner()) = status;
        });
        true
    }

    /// Compacts up to the last entry: the previous view and the entries
    /// after its horizon are read twice (keys, then the kept entries), the
    /// kept ones written to a new ledger, recorded, and the old one deleted.
    async fn compact(&self) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let old = self
            .compacted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let horizon = self.ml.last_confirmed();
        let from = old.as_ref().map(|v| v.horizon);
        // Every position to look at, oldest first: the old view's, then the
        // topic's after its horizon.
        let mut positions: Vec<Position> = old
            .as_ref()
            .map(|v| v.positions.keys().copied().collect())
            .unwrap_or_default();
        let mut next = match from {
            Some(h) => self.ml.next_after(h),
            None => self.ml.at_or_after(self.ml.before_first()),
        };
        while let Some(p) = next.filter(|p| *p <= horizon) {
            positions.push(p);
            next = self.ml.next_after(p);
        }
        let read = |p: Position| {
            let view = old.clone();
            async move { self.ml.read_through(view.as_deref(), p).await }
        };
        let mut plan = compaction::Plan::default();
        for p in &positions {
            let e = read(*p).await?;
            plan.add(*p, compaction::messages(&e));
        }
        let keys = plan.keys();
        let kept = plan.finish();
        let mut entries = Vec::with_capacity(kept.len());
        for (p, keep) in &kept {
            let e = read(*p).await?;
            entries.push(compaction::encode(*p, &compaction::rewrite(&e, keep)));
        }
        let (ledger_id, written) = self.ml.write_side_ledger("compacted", entries).await?;
        let record = CompactedLedger {
            ledger_id,
            horizon,
            entries: written,
        };
        let previous = self.ml.set_compacted(record).await?;
        let view = CompactedView {
            ledger_id,
            horizon,
            positions: kept
                .keys()
                .enumerate()
                .map(|(i, p)| (*p, i as u64))
                .collect(),
        };
        *self.compacted.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(view));
        // The entries after the horizon stay until the next compaction.
        self.ml
            .persist_cursor(compaction::CURSOR, &CursorState::new(horizon))
            .await?;
        if let Some(p) = previous {
            self.ml.delete_side_ledger(p.ledger_id).await;
        }
        tracing::info!(topic = %self.name, read = positions.len(), kept = written, keys, ms = started.elapsed().as_millis() as u64, "topic compacted");
        Ok(())
    }

    /// The last message a consumer can get: for one reading the compacted
    /// view, its last entry when nothing came after the horizon (the
    /// topic's last entry may have been compacted out).
    pub fn last_message(&self, read_compacted: bool) -> Position {
        let last = self.ml.last_confirmed();
        if !read_compacted {
            return last;
        }
        let view = self
            .compacted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match view {
            Some(v) if last <= v.horizon => v
                .positions
                .keys()
                .next_back()
                .copied()
                .unwrap_or(Position::new(0, -1)),
            _ => last,
        }
    }

    /// Before the first entry — of the compacted view too, whose entries
    /// may be in ledgers the topic no longer holds.
    fn earliest(&self) -> Position {
        let has_view = self
            .compacted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if has_view {
            Position::new(0, -1)
        } else {
            self.ml.before_first()
        }
    }

    pub fn policies(&self) -> Effective {
        self.policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What a new subscription of this topic shares with the others.
    fn sub_context(&self) -> SubContext {
        SubContext {
            topic: self.name.to_string(),
            compacted: self.compacted.clone(),
            out: self.stats.out.clone(),
            policy: self.sub_policy.subscribe(),
            sink: self.sink.clone(),
            delayed: self.delayed.clone(),
        }
    }

    /// The delayed-delivery index its subscriptions share.
    pub fn delayed_index(&self) -> &DelayedIndex {
        &self.delayed
    }

    /// Handles of every subscription (readers' too).
    pub async fn subscription_handles(&self) -> Vec<SubscriptionHandle> {
        self.live_subscriptions().await.into_values().collect()
    }

    fn dedup(&self) -> std::sync::MutexGuard<'_, Option<Dedup>> {
        self.dedup.lock()
    }

    /// Applies the policies in force (they changed).
    pub async fn apply(&self, p: Effective) -> Result<(), BrokerError> {
        self.ml.set_retention(p.retention);
        self.sub_policy.send_replace(sub_policy(&p));
        let dedup = p.dedup;
        *self.policies.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.set_dedup(dedup).await
    }

    /// The backlog quota the topic is over, if any: its slowest
    /// subscription's backlog by size, and by the age of its oldest
    /// message when `age` (that costs a read).
    async fn quota_exceeded(&self, age: bool) -> Option<(BacklogQuota, String)> {
        let p = self.policies();
        if p.size_quota.is_none() && p.age_quota.is_none() {
            return None;
        }
        let (_, slowest) = self.ml.slowest_subscription()?;
        let bytes = self.ml.bytes_after(slowest);
        let first = self
            .ml
            .next_after(slowest)
            .filter(|f| *f <= self.ml.last_confirmed());
        let age_ms = match first {
            Some(first) if age && p.age_quota.is_some() => {
                match self
                    .ml
                    .read(first)
                    .await
                    .map(|d| Payload::peek_metadata(&d))
                {
                    Ok(Ok(md)) => Some(ledger_now_ms().saturating_sub(md.publish_time)),
                    _ => None,
                }
            }
            _ => None,
        };
        over_quota(&p, bytes, age_ms)
    }

    /// Message TTL, backlog quotas and retention by age, checked now.
    pub async fn enforce_policies(self: &Arc<Self>) -> Result<(), BrokerError> {
        if self.is_closing() {
            return Ok(());
        }
        let p = self.policies();
        let now = ledger_now_ms();
        if let Some(ttl) = p.ttl_secs {
            let before = now.saturating_sub(ttl as u64 * 1000);
            for h in self.durable_subscriptions().await {
                h.ask(|reply| SubEvent::Expire {
                    publish_time_ms: before,
                    reply,
                })
                .await?;
            }
        }
        if let Some((quota, why)) = self.quota_exceeded(true).await {
            match quota.policy {
                BacklogPolicy::ProducerRequestHold | BacklogPolicy::ProducerException => {
                    if self.producer_count() > 0 {
                        tracing::warn!(topic = %self.name, reason = %why, "backlog quota exceeded: closing producers");
                        self.disconnect_producers();
                    }
                }
                BacklogPolicy::ConsumerBacklogEviction => self.evict(&p, now).await?,
            }
        }
        if let Some(threshold) = p.compaction_threshold.filter(|t| *t > 0) {
            let horizon = self
                .compacted
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|v| v.horizon)
                .unwrap_or_else(|| self.ml.before_first());
            if self.ml.bytes_after(horizon) > threshold as u64 && self.start_compaction() {
                tracing::info!(topic = %self.name, threshold, "compaction started: past the threshold");
            }
        }
        self.ml.trim().await?;
        Ok(())
    }

    /// Skips the oldest messages of every subscription over a quota.
    async fn evict(&self, p: &Effective, now: u64) -> Result<(), BrokerError> {
        let subs = self.live_subscriptions().await;
        for (name, md) in self.ml.subscription_positions() {
            let Some(h) = subs.get(&name) else { continue };
            if let Some(q) = p.size_quota.filter(|q| q.limit_size > 0) {
                let bytes = self.ml.bytes_after(md);
                let n = to_evict(self.ml.entries_after(md), bytes, q.limit_size as u64);
                if n > 0 {
                    tracing::warn!(topic = %self.name, subscription = %name, entries = n, bytes, "backlog over its size quota: evicting the oldest entries");
                    h.ask(|reply| SubEvent::Skip { entries: n, reply }).await?;
                }
            }
            if let Some(q) = p.age_quota.filter(|q| q.limit_time > 0) {
                let before = now.saturating_sub(q.limit_time as u64 * 1000);
                h.ask(|reply| SubEvent::Expire {
                    publish_time_ms: before,
                    reply,
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn live_subscriptions(&self) -> HashMap<String, SubscriptionHandle> {
        self.subs
            .lock()
            .await
            .iter()
            .filter(|(_, h)| !h.tx.is_closed())
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect()
    }

    /// Handles of the durable subscriptions (not readers').
    async fn durable_subscriptions(&self) -> Vec<SubscriptionHandle> {
        let names: std::collections::HashSet<String> = self
            .ml
            .subscription_positions()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        self.live_subscriptions()
            .await
            .into_iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(_, h)| h)
            .collect()
    }

    pub fn dedup_enabled(&self) -> bool {
        self.dedup().is_some()
    }

    /// Turns deduplication on (from now on: the state starts empty, its
    /// snapshot at the last entry) or off (the snapshot is dropped).
    pub async fn set_dedup(&self, on: bool) -> Result<(), BrokerError> {
        if on == self.dedup_enabled() {
            return Ok(());
        }
        if on {
            let at = self.ml.last_confirmed();
            self.ml
                .persist_cursor(dedup::CURSOR, &CursorState::new(at))
                .await?;
            let mut g = self.dedup();
            if g.is_none() {
                *g = Some(Dedup::default());
            }
        } else {
            if let Some(mut d) = self.dedup().take() {
                d.close();
            }
            self.ml.delete_cursor(dedup::CURSOR).await?;
        }
        tracing::info!(topic = %self.name, on, "deduplication changed");
        Ok(())
    }

    /// The producer's highest stored sequence id (-1: none, or
    /// deduplication off), for PRODUCER_SUCCESS.
    pub fn last_sequence_id(&self, producer: &str) -> i64 {
        self.dedup()
            .as_ref()
            .map_or(-1, |d| d.last_sequence(producer))
    }

    /// Appends a producer's message, deduplicated when that is on: a
    /// resend of a stored message is answered with its id, one of a
    /// message in flight when that is stored.
    pub async fn publish_from(
        &self,
        producer: &str,
        seq: u64,
        highest: u64,
        data: Bytes,
        done: AppendDone,
    ) {
        let check = self
            .dedup()
            .as_mut()
            .map(|d| d.check(producer, seq, highest));
        if !self.name.persistent {
            return self.publish_live(data, done).await;
        }
        match check {
            None => self.publish(data, done).await,
            Some(Check::Stored(id)) => {
                // Older than the window: Pulsar's answer, (-1, -1).
                done(Ok(id.unwrap_or(Position::new(u64::MAX, -1))))
            }
            Some(Check::InFlight) => {
                if let Some(d) = self.dedup().as_mut() {
                    d.wait(producer, seq, done);
                }
            }
            Some(Check::New) => {
                let cell = self.dedup.clone();
                let name = producer.to_string();
                self.publish(
                    data,
                    Box::new(move |res| cell.completed(&name, seq, highest, res, done)),
                )
                .await
            }
        }
    }

    fn producers(&self) -> std::sync::MutexGuard<'_, Producers> {
        self.producers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn refuse_if_closing(&self) -> Result<(), BrokerError> {
        if self.is_closing() {
            return Err(BrokerError::NotServedHere(format!(
                "topic {} is being unloaded",
                self.name
            )));
        }
        Ok(())
    }

    /// Adds a producer under its access mode. A WaitForExclusive producer
    /// that must wait gets `Joined::Waiting` and asks again once woken; an
    /// exclusive one gets the topic epoch it is bound to.
    pub async fn add_producer(&self, r: &ProducerRequest) -> Result<Joined, BrokerError> {
        let key = (r.conn_id, r.producer_id);
        let current_epoch = if r.mode.is_exclusive() {
            self.ml.producer_epoch().await
        } else {
            0
        };
        if let Some((quota, why)) = self.quota_exceeded(false).await {
            let code = match quota.policy {
                BacklogPolicy::ProducerRequestHold => {
                    Some(ServerError::ProducerBlockedQuotaExceededError)
                }
                BacklogPolicy::ProducerException => {
                    Some(ServerError::ProducerBlockedQuotaExceededException)
                }
                BacklogPolicy::ConsumerBacklogEviction => None,
            };
            if let Some(code) = code {
                return Err(BrokerError::new(code, why));
            }
        }
        let fenced = {
            // Checked under the producers' lock, which `close` takes to set
            // it: no producer joins after `close` collected them.
            let mut g = self.producers();
            self.refuse_if_closing()?;
            if self.ml.terminated().is_some() {
                return Err(BrokerError::new(
                    ServerError::TopicTerminatedError,
                    format!("topic {} is terminated", self.name),
                ));
            }
            if r.mode.is_exclusive() {
                producers::epoch_for(r.epoch, current_epoch)
                    .map_err(|why| BrokerError::new(ServerError::ProducerFenced, why))?;
            }
            let fenced = match g.decide(r.mode) {
                Admit::Refuse(code, why) => return Err(BrokerError::new(code, why)),
                Admit::Wait => return Ok(Joined::Waiting(g.wait())),
                Admit::FenceOthers => g.drain(),
                Admit::Now => Vec::new(),
            };
            g.insert(
                key,
                ProducerRef {
                    name: r.name.clone(),
                    link: r.link.clone(),
                    mode: r.mode,
                },
            );
            fenced
        };
        for ((_, pid), p) in fenced {
            tracing::info!(topic = %self.name, producer = %p.name, "producer fenced by an ExclusiveWithFencing producer");
            p.link.close_producer(pid, &Assigned::default());
        }
        if !r.mode.is_exclusive() {
            return Ok(Joined::Ready { epoch: None });
        }
        // The holder alone gets here: epochs change one at a time.
        let (epoch, new) = producers::epoch_for(r.epoch, self.ml.producer_epoch().await)
            .map_err(|why| BrokerError::new(ServerError::ProducerFenced, why))?;
        if new {
            if let Err(e) = self.ml.set_producer_epoch(epoch).await {
                self.remove_producer(r.conn_id, r.producer_id);
                return Err(e.into());
            }
            tracing::info!(topic = %self.name, producer = %r.name, epoch, "exclusive producer took the topic");
        }
        Ok(Joined::Ready { epoch: Some(epoch) })
    }

    pub fn remove_producer(&self, conn_id: u64, producer_id: u64) {
        self.producers().remove(&(conn_id, producer_id));
    }

    pub fn producer_count(&self) -> usize {
        self.producers().len()
    }

    /// Closes every producer (the topic was terminated: their reconnect is
    /// refused with TopicTerminated, which ends them).
    pub fn disconnect_producers(&self) {
        let producers = self.producers().drain();
        for ((_, pid), p) in producers {
            p.link.close_producer(pid, &Assigned::default());
        }
    }

    /// (producer id, name) of every producer.
    pub fn producer_names(&self) -> Vec<(u64, String)> {
        self.producers()
            .map
            .iter()
            .map(|((_, id), p)| (*id, p.name.clone()))
            .collect()
    }

    /// A message of a non-persistent topic: handed to each subscription
    /// at once (one whose queue is full does not get it), never stored.
    async fn publish_live(&self, data: Bytes, done: AppendDone) {
        self.stats.msgs_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let position = Position::new(0, self.live_seq.fetch_add(1, Ordering::Relaxed) as i64);
        // `try_send` does not wait: the lock is held only for the hand-over.
        for h in self.subs.lock().await.values() {
            let _ = h.tx.try_send(SubEvent::Live {
                position,
                data: data.clone(),
            });
        }
        done(Ok(position));
    }

    /// Appends a message; `done` gets its position once it is durable.
    pub async fn publish(&self, data: Bytes, done: AppendDone) {
        self.stats.msgs_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.ml.append(data, done).await
    }

    /// The subscription, created (durably) at `initial` if it does not exist.
    pub async fn subscription(
        &self,
        sub: &str,
        initial: InitialPosition,
    ) -> Result<SubscriptionHandle, BrokerError> {
        self.refuse_if_closing()?;
        refuse_reserved(sub)?;
        let mut subs = self.subs.lock().await;
        if let Some(h) = subs.get(sub).filter(|h| !h.tx.is_closed()) {
            return Ok(h.clone());
        }
        if !self.name.persistent {
            let h = subscription::live::spawn(self.stats.out.clone());
            subs.insert(sub.to_string(), h.clone());
            return Ok(h);
        }
        let start = match initial {
            InitialPosition::Earliest => self.earliest(),
            InitialPosition::Latest => self.ml.last_confirmed(),
        };
        let state = CursorState::new(start);
        self.ml.persist_cursor(sub, &state).await?;
        let h = subscription::spawn(
            sub.to_string(),
            true,
            self.ml.clone(),
            state,
            self.sub_context(),
        );
        subs.insert(sub.to_string(), h.clone());
        Ok(h)
    }

    /// A reader's subscription: not durable, its cursor (in memory only)
    /// with everything up to `mark_delete` taken as read. It ends with its
    /// last consumer. An existing one of that name is returned as it is.
    pub async fn reader_subscription(
        &self,
        sub: &str,
        mark_delete: Position,
    ) -> Result<SubscriptionHandle, BrokerError> {
        self.refuse_if_closing()?;
        refuse_reserved(sub)?;
        let mut subs = self.subs.lock().await;
        if let Some(h) = subs.get(sub).filter(|h| !h.tx.is_closed()) {
            return Ok(h.clone());
        }
        if !self.name.persistent {
            let h = subscription::live::spawn(self.stats.out.clone());
            subs.insert(sub.to_string(), h.clone());
            return Ok(h);
        }
        let start = if mark_delete <= self.ml.before_first() {
            self.earliest()
        } else {
            mark_delete
        };
        let h = subscription::spawn(
            sub.to_string(),
            false,
            self.ml.clone(),
            CursorState::new(start),
            self.sub_context(),
        );
        subs.insert(sub.to_string(), h.clone());
        Ok(h)
    }

    /// The subscription `sub`, if it exists.
    pub async fn existing_subscription(&self, sub: &str) -> Option<SubscriptionHandle> {
        self.subs
            .lock()
            .await
            .get(sub)
            .filter(|h| !h.tx.is_closed())
            .cloned()
    }

    pub async fn forget_subscription(&self, sub: &str) {
        self.subs.lock().await.remove(sub);
    }

    pub async fn subscription_names(&self) -> Vec<String> {
        self.subs
            .lock()
            .await
            .iter()
            .filter(|(_, h)| !h.tx.is_closed())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Every live subscription's state.
    pub async fn subscription_stats(&self) -> Vec<(String, SubStats)> {
        let handles: Vec<(String, SubscriptionHandle)> = self
            .subs
            .lock()
            .await
            .iter()
            .filter(|(_, h)| !h.tx.is_closed())
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for (name, h) in handles {
            let (reply, rx) = oneshot::channel();
            h.tell(SubEvent::Stats { reply }).await;
            if let Ok(s) = rx.await {
                out.push((name, s));
            }
        }
        out
    }

    /// Deletes the topic: refused while producers or consumers are
    /// connected unless `force` (then they are closed — and may create the
    /// topic again, as in Pulsar). Closes it as an unload does, then
    /// deletes its record and ledgers. The caller forgets the topic.
    pub async fn delete(&self, force: bool) -> Result<(), BrokerError> {
        if !force {
            let consumers: usize = self
                .subscription_stats()
                .await
                .iter()
                .map(|(_, s)| s.consumers.len())
                .sum();
            let producers = self.producer_count();
            if producers + consumers > 0 {
                return Err(BrokerError::new(
                    ServerError::NotAllowedError,
                    format!(
                        "topic {} has {producers} producers and {consumers} consumers connected; delete with force=true to close them",
                        self.name
                    ),
                ));
            }
        }
        let (detached, closed) = self.close().await;
        detached.disconnect(&Assigned::default());
        if let Err(e) = closed {
            tracing::warn!(topic = %self.name, error = %e, "closing before deletion failed; deleting all the same");
        }
        self.ml.delete_all().await?;
        Ok(())
    }

    /// First half of an unload: refuses new clients, completes what was
    /// queued, closes the open ledger and persists every cursor. Clients
    /// stay connected (their late sends are dropped, unacknowledged) until
    /// `disconnect`.
    pub async fn close(&self) -> (Detached, Result<(), MlError>) {
        {
            let _g = self.producers();
            self.closing.store(true, Ordering::SeqCst);
            self.delayed.stop();
        }
        let t0 = std::time::Instant::now();
        let closed = self.ml.close().await;
        self.dedup.close().await;
        let t1 = t0.elapsed();
        let handles: Vec<SubscriptionHandle> =
            self.subs.lock().await.drain().map(|(_, h)| h).collect();
        let mut consumers = Vec::new();
        for h in handles {
            let (reply, rx) = oneshot::channel();
            h.tell(SubEvent::Close { reply }).await;
            if let Ok(cs) = rx.await {
                consumers.extend(cs);
            }
        }
        let t2 = t0.elapsed();
        self.ml.close_cursor_ledgers().await;
        tracing::debug!(topic = %self.name, ledger_ms = t1.as_millis() as u64, cursors_ms = (t2 - t1).as_millis() as u64, cursor_ledgers_ms = (t0.elapsed() - t2).as_millis() as u64, "topic closed");
        let producers = {
            let mut g = self.producers();
            g.drop_waiters();
            g.drain()
                .into_iter()
                .map(|((_, pid), p)| (pid, p.link))
                .collect()
        };
        (
            Detached {
                producers,
                consumers,
            },
            closed,
        )
    }
}

impl Detached {
    /// Second half of an unload: CLOSE_PRODUCER / CLOSE_CONSUMER to every
    /// client, naming the new owner where there is one.
    pub fn disconnect(self, assigned: &Assigned) {
        for (pid, link) in self.producers {
            link.close_producer(pid, assigned);
        }
        for c in self.consumers {
            c.link.close_consumer(c.info.key.1, assigned);
        }
    }

    pub fn clients(&self) -> usize {
        self.producers.len() + self.consumers.len()
    }
}

/// The error for a request naming a producer or consumer the connection
/// does not have.
pub fn unknown(what: &str) -> BrokerError {
    let code = if what == "consumer" {
        ServerError::ConsumerNotFound
    } else {
        ServerError::UnknownError
    };
    BrokerError::new(code, format!("unknown {what}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::managed_ledger::store::{MemoryLedgers, MemoryMeta};

    fn entry(producer: &str, seq: u64) -> Bytes {
        let md = magnetar_proto::pulsar::MessageMetadata {
            producer_name: producer.into(),
            sequence_id: seq,
            publish_time: 1,
            ..Default::default()
        };
        Payload::build(md, b"x").headers_and_payload
    }

    fn dedup_on() -> Effective {
        Effective {
            dedup: true,
            ..Default::default()
        }
    }

    async fn send(t: &Topic, producer: &str, seq: u64) -> Position {
        let (tx, rx) = oneshot::channel();
        t.publish_from(
            producer,
            seq,
            seq,
            entry(producer, seq),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
        rx.await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn resends_are_stored_once_and_answered_with_the_original_id_also_after_a_reload() {
        let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
        let stores = Stores::new(Arc::new(l.clone()), Arc::new(m.clone()));
        let name = TopicName::parse("persistent://t/n/dedup").unwrap();
        let cfg = ManagedLedgerConfig {
            max_entries_per_ledger: 4,
            ..Default::default()
        };
        let t = Topic::load(name.clone(), cfg.clone(), stores.clone(), dedup_on(), None)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for seq in 0..10 {
            ids.push(send(&t, "p", seq).await);
        }
        assert_eq!(send(&t, "p", 3).await, ids[3], "a resend");
        assert_eq!(t.ml.entries(), 10, "stored once");
        assert_eq!(t.last_sequence_id("p"), 9);
        // Reloaded without a final snapshot (as after a crash): the state
        // comes back from the entries.
        drop(t);
        let t = Topic::load(name.clone(), cfg.clone(), stores.clone(), dedup_on(), None)
            .await
            .unwrap();
        assert_eq!(t.last_sequence_id("p"), 9);
        assert_eq!(send(&t, "p", 9).await, ids[9], "a resend after the reload");
        assert_eq!(t.ml.entries(), 10);
        let new = send(&t, "p", 10).await;
        assert!(new > ids[9]);
        // Unloaded cleanly: the snapshot covers everything.
        let (_, closed) = t.close().await;
        closed.unwrap();
        let t = Topic::load(name.clone(), cfg.clone(), stores.clone(), dedup_on(), None)
            .await
            .unwrap();
        assert_eq!(t.last_sequence_id("p"), 10);
        assert_eq!(t.ml.entries(), 11);
        // Turned off: everything is stored, the snapshot cursor is gone.
        t.set_dedup(false).await.unwrap();
        send(&t, "p", 0).await;
        assert_eq!(t.ml.entries(), 12);
        assert_eq!(t.last_sequence_id("p"), -1);
        assert!(t.subscription_names().await.is_empty());
    }
}
