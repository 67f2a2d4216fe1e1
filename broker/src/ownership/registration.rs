//! The broker's registration: an ephemeral key on its own lease holding its
//! URLs and its latest load report. The lease is also what every bundle it
//! owns hangs on, so this module answers "may I still act as an owner?":
//! only until shortly before the metadata service could expire the lease
//! (the send time of the last successful keep-alive plus the TTL, less a
//! margin). Past that the broker stops serving; a new owner may take over
//! only after expiry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_metadata::{Lease, MetadataClient, MetadataError, Op, Txn};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::keys;

/// Load of one bundle, as its owner reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BundleLoad {
    pub topics: u64,
    pub msg_rate_in: f64,
    pub msg_rate_out: f64,
    pub bytes_rate_in: f64,
    pub bytes_rate_out: f64,
}

/// What a broker reports about itself every few seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub topics: u64,
    pub bundles: u64,
    pub producers: u64,
    pub msg_rate_in: f64,
    pub msg_rate_out: f64,
    pub bytes_rate_in: f64,
    pub bytes_rate_out: f64,
    /// Per owned bundle (`tenant/ns/0x.._0x..`).
    pub bundle_loads: BTreeMap<String, BundleLoad>,
    pub updated_ms: u64,
}

/// A broker as the cluster sees it (the value of its registration key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub broker_id: String,
    pub pulsar_url: String,
    /// The `pulsar+ssl://` URL, when the broker has a TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulsar_url_tls: Option<String>,
    pub http_url: Option<String>,
    /// Set while it unloads everything before stopping: assign it nothing.
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub load: LoadReport,
}

/// A registered broker with the lease its keys hang on.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredBroker {
    pub info: BrokerInfo,
    pub lease: Option<u64>,
    /// Version of its registration key (to check it is still there).
    pub version: u64,
}

/// Every registered broker.
pub async fn brokers(md: &MetadataClient) -> Result<Vec<RegisteredBroker>, MetadataError> {
    Ok(md
        .range(keys::BROKERS_PREFIX, 0)
        .await?
        .into_iter()
        .filter_map(|kv| {
            let info = serde_json::from_slice::<BrokerInfo>(&kv.value).ok()?;
            Some(RegisteredBroker {
                info,
                lease: kv.lease,
                version: kv.version,
            })
        })
        .collect())
}

/// Our registration and the lease under it.
pub struct Registration {
    md: MetadataClient,
    info: Mutex<BrokerInfo>,
    ttl_ms: u64,
    lease: Mutex<Option<Lease>>,
    lease_id: AtomicU64,
    /// Until when we may act as an owner: nanoseconds after `base`.
    valid_until_ns: Arc<AtomicU64>,
    base: Instant,
}

impl Registration {
    pub fn new(md: MetadataClient, info: BrokerInfo, ttl_ms: u64) -> Registration {
        Registration {
            md,
            info: Mutex::new(info),
            ttl_ms,
            lease: Mutex::default(),
            lease_id: AtomicU64::new(0),
            valid_until_ns: Arc::default(),
            base: Instant::now(),
        }
    }

    /// How long before the earliest possible expiry the broker stops acting
    /// as an owner (covers clock rate differences and scheduling delays).
    pub fn margin(&self) -> Duration {
        Duration::from_millis((self.ttl_ms / 5).max(100))
    }

    pub fn broker_id(&self) -> String {
        self.info().broker_id
    }

    pub fn info(&self) -> BrokerInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lease our keys hang on now (0: none).
    pub fn lease_id(&self) -> u64 {
        self.lease_id.load(Ordering::SeqCst)
    }

    /// Whether we may still act as an owner (cheap: one atomic load).
    pub fn is_valid(&self) -> bool {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos() as u64;
        now < self.valid_until_ns.load(Ordering::Acquire)
    }

    fn set_valid_until(&self, until: Instant) {
        let at = until
            .checked_sub(self.margin())
            .unwrap_or(self.base)
            .saturating_duration_since(self.base)
            .as_nanos() as u64;
        self.valid_until_ns.store(at, Ordering::Release);
    }

    /// Grants a new lease and writes the registration under it. A previous
    /// lease of ours is revoked (its keys go with it).
    pub async fn register(&self) -> Result<u64, MetadataError> {
        let lease = self.md.grant_lease(self.ttl_ms).await?;
        let id = lease.id;
        self.set_valid_until(*lease.safe_until.borrow());
        let mut safe = lease.safe_until.clone();
        let valid = self.valid_until_ns.clone();
        let (base, margin) = (self.base, self.margin());
        // Mirror the lease's keep-alives into the atomic the data path reads.
        tokio::spawn(async move {
            while safe.changed().await.is_ok() {
                let until = *safe.borrow();
                let at = until
                    .checked_sub(margin)
                    .unwrap_or(base)
                    .saturating_duration_since(base)
                    .as_nanos() as u64;
                valid.store(at, Ordering::Release);
            }
        });
        let old = self
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(lease);
        self.lease_id.store(id, Ordering::SeqCst);
        self.publish().await?;
        if let Some(old) = old {
            let _ = old.revoke().await;
        }
        tracing::info!(broker = %self.broker_id(), lease = id, "broker registered");
        Ok(id)
    }

    /// Rewrites the registration key (after the load report or the
    /// draining flag changed).
    pub async fn publish(&self) -> Result<(), MetadataError> {
        let info = self.info();
        let value =
            serde_json::to_vec(&info).map_err(|e| MetadataError::Protocol(e.to_string()))?;
        let lease = self.lease_id();
        self.md
            .txn(Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: keys::broker(&info.broker_id),
                    value,
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await
            .map(|_| ())
    }

    pub fn set_load(&self, load: LoadReport) {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).load = load;
    }

    pub fn set_draining(&self, draining: bool) {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).draining = draining;
    }

    /// Resolves once we may no longer act as an owner: the lease's safe
    /// time (less the margin) passed without a keep-alive, or it is lost.
    pub async fn until_invalid(&self) {
        // One receiver each, marked seen as it is read: a fresh clone of the
        // lease's receivers would report every keep-alive since the lease
        // began as new, and this loop would spin.
        let (mut safe, mut lost) = {
            let g = self.lease.lock().unwrap_or_else(|e| e.into_inner());
            match &*g {
                Some(l) => (l.safe_until.clone(), l.lost.clone()),
                None => return,
            }
        };
        loop {
            if *lost.borrow_and_update() {
                return;
            }
            let deadline = safe
                .borrow_and_update()
                .checked_sub(self.margin())
                .unwrap_or_else(Instant::now);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.is_valid() {
                        return;
                    }
                }
                r = safe.changed() => if r.is_err() { return },
                r = lost.changed() => if r.is_err() || *lost.borrow() { return },
            }
        }
    }

    /// Stops renewing the lease without revoking it (a crash, in tests): it
    /// expires, or is revoked by a broker that finds this one gone.
    pub fn abandon(&self) {
        self.valid_until_ns.store(0, Ordering::Release);
        drop(self.lease.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Ends the registration (graceful stop): revokes the lease.
    pub async fn revoke(&self) {
        self.valid_until_ns.store(0, Ordering::Release);
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(l) = lease {
            if let Err(e) = l.revoke().await {
                tracing::warn!(error = %e, "revoking the broker's lease failed (it will expire)");
            }
        }
    }
}
