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

use crate::identity::DECOMMISSIONING_PREFIX;
use crate::ledger::replicate::holds_entries_on;
use crate::ledger::{LedgerClient, LedgerError, LedgerMetadata, LedgerState};
use crate::registry::{BookieInfo, AUDITOR_KEY, BOOKIES_PREFIX, LEDGERS_PREFIX};

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

/// Every ledger with entries on a bookie that is not registered now (a
/// fragment that names it but holds none of its entries does not count).
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
            .filter(|b| !alive.contains(*b) && holds_entries_on(&meta, b))
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

/// Bookies an operator is decommissioning: copied at once, no grace.
async fn decommissioning(metadata: &MetadataClient) -> Result<BTreeSet<String>, LedgerError> {
    Ok(metadata
        .range_keys(DECOMMISSIONING_PREFIX)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(DECOMMISSIONING_PREFIX).map(String::from))
        .collect())
}

/// Decommissions the bookie at `addr` (stopped for good, or its disk lost;
/// a registration that is still live is given 30 s to expire):
/// the auditor copies every entry it held in closed ledgers at once; once
/// no ledger names it, its identity is dropped and the address is free for
/// a new bookie. `progress` hears how many ledgers still name it (open ones
/// wait for their writers to close them, at a roll-over or an unload).
pub async fn decommission(
    metadata: &MetadataClient,
    addr: &str,
    within: Duration,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), LedgerError> {
    use crate::identity::COOKIES_PREFIX;
    // A bookie just stopped keeps its registration until its lease
    // expires (10 s by default): wait that long, not more.
    let stopped_by = Instant::now() + Duration::from_secs(30);
    while registered(metadata).await?.contains(addr) {
        if Instant::now() >= stopped_by {
            return Err(LedgerError::Metadata(format!(
                "the bookie at {addr} is running: stop it before decommissioning it"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let marker = format!("{DECOMMISSIONING_PREFIX}{addr}");
    metadata.put(&marker, Vec::new()).await?;
    let deadline = Instant::now() + within;
    loop {
        if registered(metadata).await?.contains(addr) {
            return Err(LedgerError::Metadata(format!(
                "the bookie at {addr} registered again: decommissioning stopped"
            )));
        }
        let naming: Vec<UnderReplicated> = under_replicated(metadata)
            .await?
            .into_iter()
            .filter(|u| u.missing.iter().any(|b| b == addr))
            .collect();
        if naming.is_empty() {
            break;
        }
        let open = naming
            .iter()
            .filter(|u| u.state != LedgerState::Closed)
            .count();
        progress(naming.len(), open);
        if Instant::now() >= deadline {
            return Err(LedgerError::Metadata(format!(
                "{} ledgers still hold entries on {addr} ({open} open); run the command again to go on",
                naming.len()
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    metadata.delete(&format!("{COOKIES_PREFIX}{addr}")).await?;
    metadata.delete(&marker).await?;
    Ok(())
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
    lease: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
                .cas(
                    AUDITOR_KEY,
                    0,
                    me.clone().into_bytes(),
                    Some(lease.load(std::sync::atomic::Ordering::SeqCst)),
                )
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
    let decommissioning = decommissioning(metadata).await?;
    let due = audit
        .since_scan
        .is_none_or(|n| n + 1 >= FULL_SCAN_EVERY_ROUNDS);
    let busy = !audit.missing_since.is_empty() || !decommissioning.is_empty();
    if !(due || one_gone || busy) {
        audit.since_scan = audit.since_scan.map(|n| n + 1);
        return Ok(());
    }
    audit.since_scan = Some(0);
    let found = under_replicated(metadata).await?;
    metrics::gauge!(crate::metrics::UNDER_REPLICATED).set(found.len() as f64);
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
                decommissioning.contains(*b)
                    || missing_since
                        .get(*b)
                        .is_some_and(|t| t.elapsed() >= cfg.grace)
            })
            .cloned()
            .collect();
        for bookie in lost {
            while ledgers
                .replicate_fragment(u.ledger_id, &bookie)
                .await?
                .is_some()
            {}
        }
    }
    Ok(())
}
