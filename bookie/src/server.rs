//! The bookie process: the journal behind the ledger protocol over QUIC, and
//! a registration in the metadata service (an ephemeral key on a lease).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_metadata::{Lease, MetadataClient};
use magnetar_proto::ledger::{
    AddRequest, BookieErrorCode, BookieRequest, BookieResponse, RangeEntry, MAX_ENTRY_BYTES,
    MAX_RANGE_BYTES, MAX_RANGE_ENTRIES,
};
use magnetar_proto::rpc::{respond, RpcError};
use magnetar_proto::tls::TlsMaterial;

use crate::registry::{BookieInfo, BOOKIES_PREFIX};
use crate::storage::{Storage, StorageError};

/// Longest a LAC long-poll is held.
pub const MAX_LONG_POLL_MS: u64 = 30_000;

/// A bookie's configuration: what `magnetar bookie --config` reads (TOML,
/// unknown keys refused) apart from its `metadata` and `[tls]` entries.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookieConfig {
    pub listen: SocketAddr,
    /// HTTP listener of `magnetar bookie`: `/metrics`, `/ready`, `/live`
    /// (default: port 8000 on the host of `listen`).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Address writers and readers use (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Rack or zone; placement spreads an ensemble across them.
    #[serde(default)]
    pub rack: Option<String>,
    /// TTL of the registration lease: a bookie that stops renewing it drops
    /// out of placement after this long.
    #[serde(default = "default_registration_ttl_ms")]
    pub registration_ttl_ms: u64,
    /// Disk usage (fraction of the data dir's filesystem) at which the
    /// bookie turns read-only: it refuses new adds (recovery adds still go
    /// through) and registers as not writable, so writers place around it.
    #[serde(default = "default_high_watermark")]
    pub disk_high_watermark: f64,
    /// Usage below which a read-only bookie becomes writable again.
    #[serde(default = "default_low_watermark")]
    pub disk_low_watermark: f64,
    /// On a large disk a ratio alone is too coarse (5 % of 2 TB is 100 GB
    /// left unused): the high watermark is reached only once free space
    /// is also below this many bytes (0: the ratio alone decides). Like
    /// Elasticsearch's `watermark.flood_stage.max_headroom`.
    #[serde(default = "default_high_max_headroom")]
    pub disk_high_max_headroom_bytes: u64,
    /// The low watermark's cap: a read-only bookie is writable again when
    /// its usage is below `disk_low_watermark` or its free space is at
    /// least this many bytes (0: the ratio alone decides).
    #[serde(default = "default_low_max_headroom")]
    pub disk_low_max_headroom_bytes: u64,
    #[serde(default = "default_disk_check_interval_ms")]
    pub disk_check_interval_ms: u64,
    /// Take part in auto-recovery: one bookie of the cluster is elected
    /// auditor and re-replicates the entries of bookies gone for longer
    /// than `auditor_grace_ms`.
    #[serde(default = "default_true")]
    pub auditor: bool,
    #[serde(default = "default_auditor_grace_ms")]
    pub auditor_grace_ms: u64,
    #[serde(default = "default_auditor_interval_ms")]
    pub auditor_interval_ms: u64,
    /// Journal segments roll at this size; compaction works segment by segment.
    #[serde(default = "default_journal_segment_bytes")]
    pub journal_segment_bytes: u64,
    /// How often the bookie drops ledgers deleted from the metadata service
    /// and compacts journal segments that are mostly garbage.
    #[serde(default = "default_gc_interval_ms")]
    pub gc_interval_ms: u64,
    /// A segment is compacted once at least this share of it is garbage.
    #[serde(default = "default_gc_min_garbage")]
    pub gc_min_garbage: f64,
    /// How often journaled adds move into a new entry log (sorted by
    /// ledger) and a checkpoint is taken, so a restart replays only the
    /// journal written since.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Memory for the journal's unflushed tail: a checkpoint copies adds
    /// from it instead of reading the journal back from disk, and runs
    /// early once it is half full. 0 turns it off.
    #[serde(default = "default_journal_cache_bytes")]
    pub journal_cache_bytes: u64,
}

fn default_journal_cache_bytes() -> u64 {
    crate::storage::tail_cache::DEFAULT_CACHE_BYTES
}

fn default_checkpoint_interval_ms() -> u64 {
    10_000
}

fn default_journal_segment_bytes() -> u64 {
    crate::storage::SEGMENT_BYTES
}

fn default_gc_interval_ms() -> u64 {
    60_000
}

fn default_gc_min_garbage() -> f64 {
    0.5
}

fn default_true() -> bool {
    true
}

fn default_auditor_grace_ms() -> u64 {
    60_000
}

fn default_auditor_interval_ms() -> u64 {
    5_000
}

fn default_registration_ttl_ms() -> u64 {
    10_000
}

fn default_high_watermark() -> f64 {
    0.95
}

fn default_low_watermark() -> f64 {
    0.90
}

fn default_high_max_headroom() -> u64 {
    2 << 30
}

fn default_low_max_headroom() -> u64 {
    4 << 30
}

fn default_disk_check_interval_ms() -> u64 {
    2_000
}

impl BookieConfig {
    /// Where the HTTP listener binds.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listen
            .unwrap_or_else(|| SocketAddr::new(self.listen.ip(), 8000))
    }

    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> BookieConfig {
        BookieConfig {
            listen,
            http_listen: None,
            advertise: None,
            data_dir,
            rack: None,
            registration_ttl_ms: default_registration_ttl_ms(),
            disk_high_watermark: default_high_watermark(),
            disk_low_watermark: default_low_watermark(),
            disk_high_max_headroom_bytes: default_high_max_headroom(),
            disk_low_max_headroom_bytes: default_low_max_headroom(),
            disk_check_interval_ms: default_disk_check_interval_ms(),
            auditor: true,
            auditor_grace_ms: default_auditor_grace_ms(),
            auditor_interval_ms: default_auditor_interval_ms(),
            journal_segment_bytes: default_journal_segment_bytes(),
            journal_cache_bytes: default_journal_cache_bytes(),
            gc_interval_ms: default_gc_interval_ms(),
            gc_min_garbage: default_gc_min_garbage(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
        }
    }
}

/// The data dir's filesystem: the fraction used and the bytes free (to
/// unprivileged writers, as `df` counts them).
#[derive(Debug, Clone, Copy)]
struct DiskSpace {
    usage: f64,
    /// Unknown when a test forces the usage: the ratio alone decides.
    free: Option<u64>,
}

fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let total = st.blocks() as f64;
    if total <= 0.0 {
        return Ok(DiskSpace {
            usage: 0.0,
            free: None,
        });
    }
    Ok(DiskSpace {
        usage: 1.0 - st.blocks_available() as f64 / total,
        free: Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64)),
    })
}

/// Whether a disk is past a watermark: its usage at or above `ratio`, and,
/// with a headroom cap (non-zero), its free space also below the cap.
fn past_watermark(space: DiskSpace, ratio: f64, max_headroom: u64) -> bool {
    space.usage >= ratio
        && match space.free {
            Some(free) if max_headroom > 0 => free < max_headroom,
            _ => true,
        }
}

/// A bookie keeps two files open per entry log (the log and its index)
/// besides its journal segments and connections: a terabyte of 256 MB
/// logs is eight thousand files, past the usual soft limit of 1,024. Like
/// most servers it raises its soft limit on open files to the hard one,
/// and says when that is still low. Returns the limit it runs with.
pub fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    let now = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    if now < LOW_OPEN_FILE_LIMIT {
        tracing::warn!(
            limit = now,
            "the open-file limit is low for a bookie (two files per entry log stay open): raise `ulimit -n` / LimitNOFILE"
        );
    }
    Some(now)
}

/// Below this many open files a bookie warns at start.
const LOW_OPEN_FILE_LIMIT: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum BookieError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Transport(#[from] RpcError),
    #[error("registration: {0}")]
    Registration(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("bookie identity: {0}")]
    Identity(String),
}

pub struct Bookie {
    pub storage: Storage,
    endpoint: quinn::Endpoint,
    addr: String,
    /// The registration lease, replaced when it is lost (see
    /// `keep_registered`).
    lease: Arc<Mutex<Option<Lease>>>,
    registrar: tokio::task::JoinHandle<()>,
    task: tokio::task::JoinHandle<()>,
    monitor: tokio::task::JoinHandle<()>,
    gc: tokio::task::JoinHandle<()>,
    checkpoints: tokio::task::JoinHandle<()>,
    auditor: Option<tokio::task::JoinHandle<()>>,
    read_only: Arc<AtomicBool>,
    /// Fault injection for tests: the disk usage the monitor sees.
    usage_override: Arc<Mutex<Option<f64>>>,
    data_dir: PathBuf,
}

impl Bookie {
    pub async fn start(
        cfg: BookieConfig,
        tls: &TlsMaterial,
        metadata: &MetadataClient,
    ) -> Result<Arc<Bookie>, BookieError> {
        raise_open_file_limit();
        let journal = Storage::open_with_cache(
            &cfg.data_dir.join("journal"),
            cfg.journal_segment_bytes,
            cfg.journal_cache_bytes,
        )?;
        let endpoint = magnetar_proto::rpc::server_endpoint(cfg.listen, tls).await?;
        let local = endpoint
            .local_addr()
            .map_err(|e| RpcError::Tls(e.to_string()))?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
        if !(0.0 < cfg.disk_low_watermark && cfg.disk_low_watermark <= cfg.disk_high_watermark) {
            return Err(BookieError::Config(format!(
                "disk watermarks must satisfy 0 < low ({}) <= high ({})",
                cfg.disk_low_watermark, cfg.disk_high_watermark
            )));
        }
        if cfg.disk_high_max_headroom_bytes > 0
            && cfg.disk_low_max_headroom_bytes > 0
            && cfg.disk_low_max_headroom_bytes < cfg.disk_high_max_headroom_bytes
        {
            return Err(BookieError::Config(format!(
                "disk headrooms must satisfy low ({}) >= high ({}) (0 turns one off)",
                cfg.disk_low_max_headroom_bytes, cfg.disk_high_max_headroom_bytes
            )));
        }
        let data_dir = cfg.data_dir.clone();
        match crate::identity::check(metadata, &addr, &cfg.data_dir).await? {
            crate::identity::Identity::New(id) => {
                tracing::info!(addr = %addr, instance = %id, "a new bookie: identity recorded")
            }
            crate::identity::Identity::Claimed(id) => {
                tracing::info!(addr = %addr, instance = %id, "the address takes this data dir's identity")
            }
            crate::identity::Identity::Known(id) => {
                tracing::debug!(addr = %addr, instance = %id, "identity checked")
            }
        }
        let served = journal.clone();
        let read_only = Arc::new(AtomicBool::new(false));
        let ro = read_only.clone();
        let task = tokio::spawn(magnetar_proto::rpc::serve(
            endpoint.clone(),
            "bookie",
            move |req, send, _conn| {
                let journal = served.clone();
                let ro = ro.clone();
                async move { respond(send, &handle(&journal, &ro, req).await).await }
            },
        ));
        let lease = metadata
            .grant_lease(cfg.registration_ttl_ms)
            .await
            .map_err(|e| BookieError::Registration(e.to_string()))?;
        let info = BookieInfo {
            addr: addr.clone(),
            rack: cfg.rack.clone(),
            writable: true,
        };
        register(metadata, &info, lease.id).await?;
        let lease_id = Arc::new(AtomicU64::new(lease.id));
        let lease = Arc::new(Mutex::new(Some(lease)));
        crate::metrics::register_bookie(&addr);
        tracing::info!(addr = %addr, "bookie started and registered");
        let usage_override = Arc::new(Mutex::new(None));
        let auditor = cfg.auditor.then(|| {
            let ledgers = crate::LedgerClient::new(
                metadata.clone(),
                magnetar_proto::rpc::RpcClient::new(endpoint.clone()),
            );
            tokio::spawn(crate::auditor::run(
                addr.clone(),
                lease_id.clone(),
                metadata.clone(),
                ledgers,
                crate::auditor::AuditorConfig {
                    grace: Duration::from_millis(cfg.auditor_grace_ms),
                    interval: Duration::from_millis(cfg.auditor_interval_ms.max(10)),
                },
            ))
        });
        let gc = tokio::spawn(gc_loop(
            journal.clone(),
            metadata.clone(),
            Duration::from_millis(cfg.gc_interval_ms.max(10)),
            cfg.gc_min_garbage,
        ));
        let checkpoints = tokio::spawn(checkpoint_loop(
            journal.clone(),
            Duration::from_millis(cfg.checkpoint_interval_ms.max(10)),
        ));
        let registrar = tokio::spawn(keep_registered(
            metadata.clone(),
            cfg.registration_ttl_ms,
            info.clone(),
            read_only.clone(),
            lease.clone(),
            lease_id.clone(),
        ));
        let monitor = tokio::spawn(disk_monitor(
            cfg.clone(),
            info,
            lease_id,
            metadata.clone(),
            read_only.clone(),
            usage_override.clone(),
            journal.clone(),
        ));
        Ok(Arc::new(Bookie {
            storage: journal,
            endpoint,
            addr,
            lease,
            registrar,
            task,
            monitor,
            gc,
            checkpoints,
            auditor,
            read_only,
            usage_override,
            data_dir,
        }))
    }

    /// Whether the bookie can take writes: registered on a live lease, its
    /// journal sound, its disk under the watermark.
    pub fn is_ready(&self) -> Result<(), String> {
        if self.is_read_only() {
            return Err("the bookie is read-only".into());
        }
        if self.storage.is_broken() {
            return Err("the journal failed a write".into());
        }
        let g = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(l) if !*l.lost.borrow() => Ok(()),
            _ => Err("the bookie's registration lease is lost".into()),
        }
    }

    /// The id of the registration lease held now.
    pub fn lease_id(&self) -> Option<u64> {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.id)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }

    /// Fault injection for tests: make the disk monitor see `usage`
    /// (a fraction) instead of the real disk; `None` restores the real one.
    pub fn set_disk_usage_override(&self, usage: Option<f64>) {
        *self
            .usage_override
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = usage;
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where it keeps its data.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub async fn shutdown(&self) {
        self.registrar.abort();
        self.task.abort();
        self.monitor.abort();
        self.gc.abort();
        self.checkpoints.abort();
        if let Some(a) = &self.auditor {
            a.abort();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
    }
}

/// When the registration lease is lost (the bookie was cut off from the
/// metadata service for longer than its TTL, or paused), takes a new one and
/// registers again — with its current writable state — so that writers
/// place ledgers on it again and its auditor campaigns under a live lease.
async fn keep_registered(
    metadata: MetadataClient,
    ttl_ms: u64,
    mut info: BookieInfo,
    read_only: Arc<AtomicBool>,
    slot: Arc<Mutex<Option<Lease>>>,
    lease_id: Arc<AtomicU64>,
) {
    loop {
        let lost = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.lost.clone());
        let Some(mut lost) = lost else { return };
        while !*lost.borrow_and_update() {
            if lost.changed().await.is_err() {
                break;
            }
        }
        tracing::warn!(addr = %info.addr, "registration lease lost; registering again");
        let mut backoff = Duration::from_millis(200);
        loop {
            info.writable = !read_only.load(Ordering::Relaxed);
            let res = async {
                let lease = metadata
                    .grant_lease(ttl_ms)
                    .await
                    .map_err(|e| BookieError::Registration(e.to_string()))?;
                register(&metadata, &info, lease.id).await?;
                Ok::<Lease, BookieError>(lease)
            }
            .await;
            match res {
                Ok(lease) => {
                    tracing::info!(addr = %info.addr, lease = lease.id, "registered again");
                    lease_id.store(lease.id, Ordering::SeqCst);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registering again failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Writes (or rewrites) the bookie's registration under its lease. A
/// previous incarnation's key may linger until its lease expires: replaced.
async fn register(
    metadata: &MetadataClient,
    info: &BookieInfo,
    lease: u64,
) -> Result<(), BookieError> {
    let value = serde_json::to_vec(info).map_err(|e| BookieError::Registration(e.to_string()))?;
    metadata
        .txn(magnetar_metadata::Txn {
            compares: vec![],
            success: vec![magnetar_metadata::Op::Put {
                key: format!("{BOOKIES_PREFIX}{}", info.addr),
                value,
                lease: Some(lease),
            }],
            failure: vec![],
        })
        .await
        .map(|_| ())
        .map_err(|e| BookieError::Registration(e.to_string()))
}

/// A checkpoint every `every`, or sooner when the journal's tail cache is
/// half full (then back to back while writes outpace them).
async fn checkpoint_loop(journal: Storage, every: Duration) {
    let mut next = tokio::time::Instant::now() + every;
    loop {
        // On the interval the adds are few (the cache is not half full):
        // spread over half of it, the next one starts on time. When the
        // cache is what asks, at once: the cache is bounded, and pacing it
        // would let the journal outrun it.
        let pace = if journal.checkpoint_due() {
            Duration::ZERO
        } else {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => every / 2,
                _ = journal.checkpoint_wanted() => Duration::ZERO,
            }
        };
        next = tokio::time::Instant::now() + every;
        let started = std::time::Instant::now();
        let res = journal.checkpoint_paced(pace).await;
        metrics::histogram!(crate::metrics::CHECKPOINT_DURATION)
            .record(started.elapsed().as_secs_f64());
        if let Ok(stats) = &res {
            metrics::counter!(crate::metrics::CHECKPOINT_ENTRIES)
                .increment(stats.entries_flushed as u64);
        }
        match res {
            Ok(stats) if stats.entries_flushed > 0 => tracing::debug!(?stats, "checkpoint"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; retrying next interval");
                // Not back to back on a failing disk.
                tokio::time::sleep_until(next).await;
            }
        }
    }
}

/// Garbage collection: ledgers this bookie holds that the metadata service
/// no longer knows were deleted (a ledger's metadata is created before its
/// first add reaches a bookie, so listing the journal's ledgers *before*
/// reading the metadata never mistakes a new ledger for a deleted one).
async fn gc_loop(journal: Storage, metadata: MetadataClient, every: Duration, min_garbage: f64) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let held = journal.ledger_ids();
        // Names only, a page at a time: the ledgers' metadata would be
        // megabytes per pass on a cluster with many ledgers.
        let live: std::collections::BTreeSet<u64> = match metadata
            .range_keys(crate::registry::LEDGERS_PREFIX)
            .await
        {
            Ok(keys) => keys
                .iter()
                .filter_map(|k| {
                    k.strip_prefix(crate::registry::LEDGERS_PREFIX)
                        .and_then(|id| id.parse().ok())
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "gc: cannot list the ledgers; no collection this pass");
                continue;
            }
        };
        let dead: Vec<u64> = held.into_iter().filter(|l| !live.contains(l)).collect();
        if !dead.is_empty() {
            tracing::info!(ledgers = dead.len(), "gc: dropping deleted ledgers");
            if let Err(e) = journal.delete_ledgers(dead).await {
                tracing::warn!(error = %e, "gc: could not record deletions");
                continue;
            }
        }
        if let Err(e) = journal.compact(min_garbage).await {
            tracing::warn!(error = %e, "gc: compaction failed");
        }
    }
}

/// Watches disk usage: above the high watermark the bookie turns read-only
/// and registers as not writable; below the low one it turns writable again.
/// A journal that failed a write (a disk full despite the watermarks, a
/// failing device) keeps the bookie read-only until it restarts, so that
/// writers stop placing ledgers on it.
async fn disk_monitor(
    cfg: BookieConfig,
    mut info: BookieInfo,
    lease: Arc<AtomicU64>,
    metadata: MetadataClient,
    read_only: Arc<AtomicBool>,
    usage_override: Arc<Mutex<Option<f64>>>,
    journal: Storage,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.disk_check_interval_ms.max(10)));
    loop {
        tick.tick().await;
        let forced = *usage_override.lock().unwrap_or_else(|e| e.into_inner());
        let space = match forced {
            Some(usage) => DiskSpace { usage, free: None },
            None => match disk_space(&cfg.data_dir) {
                Ok(space) => space,
                Err(e) => {
                    tracing::warn!(error = %e, dir = %cfg.data_dir.display(), "cannot read disk usage");
                    continue;
                }
            },
        };
        let ro = read_only.load(Ordering::Relaxed);
        let broken = journal.is_broken();
        let usage = space.usage;
        metrics::gauge!(crate::metrics::DISK_USAGE, "bookie" => info.addr.clone()).set(usage);
        let now_ro = broken
            || if ro {
                past_watermark(
                    space,
                    cfg.disk_low_watermark,
                    cfg.disk_low_max_headroom_bytes,
                )
            } else {
                past_watermark(
                    space,
                    cfg.disk_high_watermark,
                    cfg.disk_high_max_headroom_bytes,
                )
            };
        if now_ro != ro || info.writable == now_ro {
            read_only.store(now_ro, Ordering::Relaxed);
            info.writable = !now_ro;
            if broken && now_ro != ro {
                tracing::error!(
                    "bookie is now read-only: its journal failed a write; restart it once the disk is sound"
                );
            } else if now_ro != ro {
                tracing::warn!(
                    usage = format!("{:.1} %", usage * 100.0),
                    free_bytes = space.free,
                    high = cfg.disk_high_watermark,
                    low = cfg.disk_low_watermark,
                    "bookie is now {}",
                    if now_ro {
                        "read-only (disk above the high watermark)"
                    } else {
                        "writable (disk below the low watermark)"
                    }
                );
            }
            metrics::gauge!(crate::metrics::READ_ONLY, "bookie" => info.addr.clone())
                .set(if now_ro { 1.0 } else { 0.0 });
            if let Err(e) = register(&metadata, &info, lease.load(Ordering::SeqCst)).await {
                // Retried on the next tick: `info.writable` disagrees with the state until then.
                info.writable = now_ro;
                tracing::warn!(error = %e, "could not update the registration");
            }
        }
    }
}

/// Checks that do not need the journal: size, and the read-only state
/// (recovery adds are still taken when read-only).
fn admit(read_only: &AtomicBool, add: &AddRequest) -> Result<(), BookieErrorCode> {
    if add.payload.len() > MAX_ENTRY_BYTES {
        return Err(BookieErrorCode::TooLarge);
    }
    if !add.recovery && read_only.load(Ordering::Relaxed) {
        return Err(BookieErrorCode::ReadOnly);
    }
    Ok(())
}

pub async fn handle(
    journal: &Storage,
    read_only: &AtomicBool,
    req: BookieRequest,
) -> BookieResponse {
    let res = match req {
        BookieRequest::Add(add) => {
            let (ledger_id, entry_id) = (add.ledger_id, add.entry_id);
            journal
                .add_batch(vec![add], |a| admit(read_only, a))
                .await
                .pop()
                .unwrap_or(Err(BookieErrorCode::Io))
                .map(|()| BookieResponse::Added {
                    ledger_id,
                    entry_id,
                })
        }
        BookieRequest::AddBatch(adds) => Ok(BookieResponse::AddedBatch(
            journal.add_batch(adds, |a| admit(read_only, a)).await,
        )),
        BookieRequest::Read {
            ledger_id,
            entry_id,
        } => journal
            .read(ledger_id, entry_id)
            .map(|e| BookieResponse::Entry {
                ledger_id,
                entry_id,
                lac: e.lac,
                payload: e.payload,
                digest: e.digest,
            }),
        BookieRequest::ReadLacLongPoll {
            ledger_id,
            previous_lac,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms.min(MAX_LONG_POLL_MS));
            let (lac, last_entry) = journal.wait_lac(ledger_id, previous_lac, timeout).await;
            Ok(BookieResponse::Lac {
                ledger_id,
                lac,
                last_entry,
            })
        }
        BookieRequest::ReadRange {
            ledger_id,
            first,
            last,
            step,
            max_bytes,
        } => {
            // Up to a megabyte of reads, some from disk: off the runtime.
            let journal = journal.clone();
            let max_bytes = max_bytes.min(MAX_RANGE_BYTES) as u64;
            tokio::task::spawn_blocking(move || {
                journal.read_range(ledger_id, first, last, step, max_bytes, MAX_RANGE_ENTRIES)
            })
            .await
            .unwrap_or(Err(BookieErrorCode::Io))
            .map(|entries| BookieResponse::Entries {
                ledger_id,
                entries: entries
                    .into_iter()
                    .map(|(entry_id, e)| RangeEntry {
                        entry_id,
                        lac: e.lac,
                        payload: e.payload,
                        digest: e.digest,
                    })
                    .collect(),
            })
        }
        BookieRequest::ReadLac { ledger_id } => {
            journal
                .lac(ledger_id)
                .map(|(lac, last_entry)| BookieResponse::Lac {
                    ledger_id,
                    lac,
                    last_entry,
                })
        }
        BookieRequest::Fence {
            ledger_id,
            master_key,
        } => match journal.fence(ledger_id, master_key).await {
            Ok(_) => journal
                .lac(ledger_id)
                .map(|(lac, last_entry)| BookieResponse::Lac {
                    ledger_id,
                    lac,
                    last_entry,
                }),
            Err(e) => Err(e),
        },
    };
    res.unwrap_or_else(BookieResponse::Error)
}

#[cfg(test)]
mod tests {
    use super::{past_watermark, DiskSpace};

    const GIB: u64 = 1 << 30;

    fn disk(usage: f64, free: u64) -> DiskSpace {
        DiskSpace {
            usage,
            free: Some(free),
        }
    }

    #[test]
    fn a_large_disk_is_full_only_once_its_free_space_is_under_the_headroom() {
        // 252 GB at 96 %: 10 GB free is plenty.
        assert!(!past_watermark(disk(0.96, 10 * GIB), 0.95, 2 * GIB));
        assert!(past_watermark(disk(0.995, GIB), 0.95, 2 * GIB));
        // Under the ratio, free space does not matter.
        assert!(!past_watermark(disk(0.5, 0), 0.95, 2 * GIB));
    }

    #[test]
    fn a_small_disk_or_no_cap_leaves_the_ratio_alone_to_decide() {
        // 20 GB at 96 %: 800 MB free is under the cap.
        assert!(past_watermark(disk(0.96, 800 << 20), 0.95, 2 * GIB));
        assert!(past_watermark(disk(0.96, 10 * GIB), 0.95, 0));
        let forced = DiskSpace {
            usage: 0.97,
            free: None,
        };
        assert!(past_watermark(forced, 0.95, 2 * GIB));
    }
}
