//! The ledger writer: adds with quorum counting (`WriteState`), per-bookie
//! batching (`add_queue.rs`), ensemble changes when a bookie fails (swap,
//! shrink, or wait — decided by `placement::plan`), and close.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use magnetar_proto::ledger::{entry_digest, AddRequest, BookieErrorCode};
use tokio::sync::oneshot;

use super::add_queue::{AddOutcome, AddSink, AddTag};
use super::client::LedgerClient;
use super::error::LedgerError;
use super::meta::{LedgerMetadata, LedgerState};
use super::placement::swap_bookies;
use super::write_state::WriteState;

/// Ledgers created, and fragments started, on fewer bookies than their
/// ensemble size (no spare bookie was writable), since the process started.
pub static SHRUNK_ENSEMBLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
    pub(super) fn new(client: LedgerClient, meta: LedgerMetadata, version: u64) -> LedgerWriter {
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
        let started = std::time::Instant::now();
        async move {
            let res = rx
                .await
                .unwrap_or_else(|_| Err(LedgerError::WriterFailed(0, "writer dropped".into())));
            if res.is_ok() {
                LEDGER_ADD.record(started.elapsed().as_secs_f64());
            }
            res
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
            match super::placement::plan(&current, &failed, &replacements, qw) {
                super::placement::Change::Swap { .. } => {}
                super::placement::Change::Shrink { ensemble } => {
                    if !self
                        .shrink(meta, version, first_entry, &failed, ensemble)
                        .await
                    {
                        return;
                    }
                    self.lock().short_since = None;
                    continue;
                }
                super::placement::Change::Short { have, need } => {
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

/// Registered once, on first use (after the recorder is installed).
static LEDGER_ADD: std::sync::LazyLock<metrics::Histogram> =
    std::sync::LazyLock::new(|| metrics::histogram!(crate::metrics::LEDGER_ADD));
