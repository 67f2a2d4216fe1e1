//! Namespaces and their bundles, cached from the metadata service and
//! dropped from the cache whenever a namespace's record changes (a watch).
//! A namespace created without bundles gets the default split on first use,
//! written by CAS so that every broker agrees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use magnetar_metadata::MetadataClient;
use serde::{Deserialize, Serialize};

use super::bundle::Bundles;
use crate::{keys, BrokerError};

/// A namespace's record. Fields we do not know yet are kept as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamespacePolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundles: Option<Bundles>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

pub struct Namespaces {
    md: MetadataClient,
    default_bundles: usize,
    cache: Mutex<HashMap<String, (Bundles, u64)>>,
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(t) = self.watch.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

impl Namespaces {
    pub fn new(md: MetadataClient, default_bundles: usize) -> Arc<Namespaces> {
        let me = Arc::new(Namespaces {
            md,
            default_bundles,
            cache: Mutex::default(),
            watch: Mutex::default(),
        });
        let task = tokio::spawn(Self::watch(Arc::downgrade(&me), me.md.clone()));
        *me.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bundles, u64)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn watch(me: std::sync::Weak<Namespaces>, md: MetadataClient) {
        loop {
            let mut events = md.watch(keys::NAMESPACES_PREFIX, 0);
            while let Some(ev) = events.next().await {
                let Some(me) = me.upgrade() else { return };
                if let Some(ns) = ev.kv.key.strip_prefix(keys::NAMESPACES_PREFIX) {
                    me.lock().remove(ns);
                }
            }
            // The watch ended (history compacted): forget everything.
            let Some(me) = me.upgrade() else { return };
            me.lock().clear();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Drops a namespace from the cache (after we changed it).
    pub fn invalidate(&self, ns: &str) {
        self.lock().remove(ns);
    }

    /// The namespace's bundles and its record's version; the namespace
    /// must exist.
    pub async fn bundles(&self, ns: &str) -> Result<(Bundles, u64), BrokerError> {
        if let Some(b) = self.lock().get(ns) {
            return Ok(b.clone());
        }
        let key = keys::namespace(ns);
        for _ in 0..5 {
            let Some(kv) = self.md.get(&key).await? else {
                return Err(BrokerError::NamespaceNotFound(ns.to_string()));
            };
            let mut policies: NamespacePolicies =
                serde_json::from_slice(&kv.value).unwrap_or_default();
            if let Some(b) = policies.bundles.clone() {
                // Refuse nonsense before anything relies on it.
                b.bounds()
                    .map_err(|e| BrokerError::NotServedHere(format!("namespace {ns}: {e}")))?;
                self.lock().insert(ns.to_string(), (b.clone(), kv.version));
                return Ok((b, kv.version));
            }
            policies.bundles = Some(Bundles::even(self.default_bundles));
            let value = serde_json::to_vec(&policies)
                .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
            // Lost a race with another broker: read what it wrote.
            let _ = self.md.cas(&key, kv.version, value, None).await?;
        }
        Err(BrokerError::NotServedHere(format!(
            "namespace {ns} keeps changing"
        )))
    }

    /// The namespace's record and its version, if it exists.
    pub async fn policies(
        &self,
        ns: &str,
    ) -> Result<Option<(NamespacePolicies, u64)>, BrokerError> {
        Ok(self.md.get(&keys::namespace(ns)).await?.map(|kv| {
            (
                serde_json::from_slice(&kv.value).unwrap_or_default(),
                kv.version,
            )
        }))
    }
}

/// Creates a namespace with `bundles` bundles (nothing if it exists).
pub async fn create(md: &MetadataClient, ns: &str, bundles: usize) -> Result<bool, BrokerError> {
    let policies = NamespacePolicies {
        bundles: Some(Bundles::even(bundles)),
        other: Default::default(),
    };
    let value =
        serde_json::to_vec(&policies).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    Ok(md.cas(&keys::namespace(ns), 0, value, None).await?)
}
