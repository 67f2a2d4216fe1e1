//! Auto-recovery: one auditor in the cluster (elected by an ephemeral key
//! bound to its bookie's registration lease) notices bookies whose
//! registration has been gone longer than a grace period, and copies every
//! entry they held in closed ledgers to another bookie, then records the
//! replacement in the ledger's metadata by CAS — until every entry is back
//! at Qw copies.
//!
//! Open ledgers are left to their writer (it replaces failed bookies itself
//! while it writes; once closed, the auditor covers what remains).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use magnetar_metadata::MetadataClient;
use magnetar_proto::ledger::{
    entry_digest, AddRequest, BookieRequest, BookieResponse, MAX_BATCH_ADDS,
};

use crate::client::{LedgerClient, LedgerError, LedgerMetadata, LedgerState, LEDGERS_PREFIX};
use crate::server::{BookieInfo, BOOKIES_PREFIX};
use crate::write_state::write_set;

/// The key the elected auditor holds.
pub const AUDITOR_KEY: &str = "/auditor/leader";

#[derive(Debug, Clone)]
pub struct AuditorConfig {
    /// How long a bookie's registration must be gone before its data is
    /// copied elsewhere (a restart should not trigger copying).
    pub grace: Duration,
    pub interval: Duration,
}

impl Default for AuditorConfig {
    fn default() -> AuditorConfig {
        AuditorConfig {
            grace: Duration::from_secs(60),
            interval: Duration::from_secs(5),
        }
    }
}

/// With nothing to repair, the auditor reads every ledger's metadata only
/// this often (in rounds), or when a bookie it saw registered is gone: a
/// listing of all ledgers every round is megabytes on a large cluster.
const FULL_SCAN_EVERY_ROUNDS: u32 = 12;

/// What the auditor remembers between rounds.
#[derive(Default)]
struct Audit {
    /// Bookies named by some ledger and not registered, since when.
    missing_since: BTreeMap<String, Instant>,
    /// The bookies registered at the last round.
    seen: BTreeSet<String>,
    /// Rounds since the last scan of the ledgers (`None`: none yet).
    since_scan: Option<u32>,
}

/// A ledger with entries on bookies that are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderReplicated {
    pub ledger_id: u64,
    pub state: LedgerState,
    pub missing: Vec<String>,
}

/// Every ledger whose fragments name a bookie that is not registered now.
pub async fn under_replicated(
    metadata: &MetadataClient,
) -> Result<Vec<UnderReplicated>, LedgerError> {
    let alive = registered(metadata).await?;
    let mut out = Vec::new();
    for kv in metadata.range(LEDGERS_PREFIX, 0).await? {
        let Ok(meta) = serde_json::from_slice::<LedgerMetadata>(&kv.value) else {
            continue;
        };
        let missing: BTreeSet<String> = meta
            .fragments
            .iter()
            .flat_map(|f| f.bookies.iter())
            .filter(|b| !alive.contains(*b))
            .cloned()
            .collect();
        if !missing.is_empty() {
            out.push(UnderReplicated {
                ledger_id: meta.ledger_id,
                state: meta.state,
                missing: missing.into_iter().collect(),
            });
        }
    }
    Ok(out)
}

async fn registered(metadata: &MetadataClient) -> Result<BTreeSet<String>, LedgerError> {
    Ok(metadata
        .range(BOOKIES_PREFIX, 0)
        .await?
        .iter()
        .filter_map(|kv| serde_json::from_slice::<BookieInfo>(&kv.value).ok())
        .map(|b| b.addr)
        .collect())
}

/// Runs for as long as the task lives: campaigns for the auditor key with
/// `lease` (the bookie's registration lease) and audits while it holds it.
pub async fn run(
    me: String,
    lease: u64,
    metadata: MetadataClient,
    ledgers: LedgerClient,
    cfg: AuditorConfig,
) {
    let mut audit = Audit::default();
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        match metadata.get(AUDITOR_KEY).await {
            Ok(Some(kv)) if kv.value == me.as_bytes() => {}
            Ok(Some(_)) => {
                audit = Audit::default();
                continue;
            }
            Ok(None) => match metadata
                .cas(AUDITOR_KEY, 0, me.clone().into_bytes(), Some(lease))
                .await
            {
                Ok(true) => tracing::info!(auditor = %me, "elected auditor"),
                _ => continue,
            },
            Err(e) => {
                tracing::debug!(error = %e, "auditor: metadata unavailable");
                continue;
            }
        }
        if let Err(e) = audit_once(&metadata, &ledgers, &cfg, &mut audit).await {
            tracing::warn!(error = %e, "audit round failed; retrying next round");
        }
    }
}

async fn audit_once(
    metadata: &MetadataClient,
    ledgers: &LedgerClient,
    cfg: &AuditorConfig,
    audit: &mut Audit,
) -> Result<(), LedgerError> {
    let alive = registered(metadata).await?;
    let now = Instant::now();
    let one_gone = audit.seen.iter().any(|b| !alive.contains(b));
    audit.seen = alive;
    let due = audit
        .since_scan
        .is_none_or(|n| n + 1 >= FULL_SCAN_EVERY_ROUNDS);
    if !(due || one_gone || !audit.missing_since.is_empty()) {
        audit.since_scan = audit.since_scan.map(|n| n + 1);
        return Ok(());
    }
    audit.since_scan = Some(0);
    let found = under_replicated(metadata).await?;
    // Only bookies some ledger still names stay tracked.
    let named: BTreeSet<&String> = found.iter().flat_map(|u| u.missing.iter()).collect();
    audit.missing_since.retain(|b, _| named.contains(b));
    let missing_since = &mut audit.missing_since;
    for u in found {
        for b in &u.missing {
            missing_since.entry(b.clone()).or_insert(now);
        }
        if u.state != LedgerState::Closed {
            continue;
        }
        let lost: Vec<String> = u
            .missing
            .iter()
            .filter(|b| {
                missing_since
                    .get(*b)
                    .is_some_and(|t| t.elapsed() >= cfg.grace)
            })
            .cloned()
            .collect();
        for bookie in lost {
            replicate_away(ledgers, u.ledger_id, &bookie).await?;
        }
    }
    Ok(())
}

/// Copies every entry of `ledger_id` that `gone` held to a replacement
/// bookie, fragment by fragment, and records each replacement by CAS.
async fn replicate_away(
    ledgers: &LedgerClient,
    ledger_id: u64,
    gone: &str,
) -> Result<(), LedgerError> {
    loop {
        let (mut meta, version) = ledgers.metadata(ledger_id).await?;
        let Some(fi) = meta
            .fragments
            .iter()
            .position(|f| f.bookies.iter().any(|b| b == gone))
        else {
            return Ok(());
        };
        let frag = meta.fragments[fi].clone();
        let pos = frag.bookies.iter().position(|b| b == gone).unwrap_or(0);
        let last = match meta.fragments.get(fi + 1) {
            Some(next) => next.first_entry as i64 - 1,
            None => meta.last_entry_id,
        };
        let target = ledgers.place_replacement(&frag.bookies).await?;
        let mut copied = 0u64;
        // The entries `gone` held: those of the stripes (ids equal mod E)
        // whose write set includes its position.
        let width = frag.bookies.len().max(1);
        let step = width as u64;
        if last >= frag.first_entry as i64 {
            let last = last as u64;
            for start in (frag.first_entry..=last).take(step as usize) {
                if write_set(width, meta.write_quorum.min(width), start).any(|p| p == pos) {
                    copied += copy_stripe(ledgers, &meta, gone, &target, start, last, step).await?;
                }
            }
        }
        meta.fragments[fi].bookies[pos] = target.clone();
        if ledgers.store_metadata(&meta, version).await? {
            tracing::info!(
                ledger_id,
                gone,
                target,
                fragment = fi,
                entries = copied,
                "re-replicated a lost bookie's entries"
            );
        }
        // On a CAS conflict the metadata changed under us: read it again.
    }
}

/// Copies entries `start`, `start + step`, … up to `last` to `target`: read
/// from the surviving replicas a `ReadRange` at a time (as catch-up reads
/// are, next replica after a delay) and stored with one `AddBatch` per
/// answer (recovery adds, with the LAC each was stored with, so the digest
/// is the same). An entry no range answer brings is read on its own.
/// Returns how many were copied.
async fn copy_stripe(
    ledgers: &LedgerClient,
    meta: &LedgerMetadata,
    gone: &str,
    target: &str,
    start: u64,
    last: u64,
    step: u64,
) -> Result<u64, LedgerError> {
    let sources: Vec<String> = meta
        .bookies_for(start)
        .into_iter()
        .filter(|b| b != gone)
        .collect();
    let ledger_id = meta.ledger_id;
    let add = |entry_id: u64, lac: i64, payload: bytes::Bytes, digest: u32| AddRequest {
        ledger_id,
        entry_id,
        master_key: meta.master_key,
        lac,
        payload,
        digest,
        recovery: true,
    };
    let mut copied = 0;
    let mut next = start;
    while next <= last {
        let mut batch: Vec<AddRequest> = ledgers
            .range_read(ledger_id, &sources, next, last, step)
            .await
            .into_iter()
            .take(MAX_BATCH_ADDS)
            .map(|e| add(e.entry_id, e.lac, e.payload, e.digest))
            .collect();
        if batch.is_empty() {
            // No range answer: this entry alone, from any survivor.
            let (lac, payload) = read_with_lac(ledgers, meta, next, gone).await?;
            let digest = entry_digest(ledger_id, next, lac, &payload);
            batch.push(add(next, lac, payload, digest));
        }
        let n = batch.len() as u64;
        let first = batch[0].entry_id;
        match ledgers
            .call(target, &BookieRequest::AddBatch(batch))
            .await?
        {
            BookieResponse::AddedBatch(results) if results.iter().all(|r| r.is_ok()) => {}
            other => {
                return Err(LedgerError::Unreadable(
                    ledger_id,
                    first,
                    format!("copy to {target}: {other:?}"),
                ))
            }
        }
        copied += n;
        next = match next.checked_add(n * step) {
            Some(n) => n,
            None => break,
        };
    }
    Ok(copied)
}

/// Reads an entry from a surviving replica, with the LAC it was stored with
/// (the copy must carry the same digest input).
async fn read_with_lac(
    ledgers: &LedgerClient,
    meta: &LedgerMetadata,
    entry: u64,
    gone: &str,
) -> Result<(i64, bytes::Bytes), LedgerError> {
    let mut errors = Vec::new();
    for b in meta.bookies_for(entry).into_iter().filter(|b| b != gone) {
        let req = BookieRequest::Read {
            ledger_id: meta.ledger_id,
            entry_id: entry,
        };
        match ledgers.call(&b, &req).await {
            Ok(BookieResponse::Entry {
                ledger_id,
                entry_id,
                lac,
                payload,
                digest,
            }) if ledger_id == meta.ledger_id
                && entry_id == entry
                && entry_digest(ledger_id, entry_id, lac, &payload) == digest =>
            {
                return Ok((lac, payload));
            }
            Ok(other) => errors.push(format!("{b}: {other:?}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(LedgerError::Unreadable(
        meta.ledger_id,
        entry,
        errors.join("; "),
    ))
}
