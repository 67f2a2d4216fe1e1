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

/// A namespace's record: Pulsar's `Policies` under its JSON field names.
/// Only fields the broker acts on are typed; the others are kept as they
/// are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NamespacePolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundles: Option<Bundles>,
    /// Whether first use creates a topic, and of which kind (the broker's
    /// default — create non-partitioned topics — when absent).
    #[serde(
        rename = "autoTopicCreationOverride",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_topic_creation: Option<AutoTopicCreation>,
    /// Producer deduplication for the namespace's topics.
    #[serde(
        rename = "deduplicationEnabled",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub deduplication_enabled: Option<bool>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Pulsar's `AutoTopicCreationOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoTopicCreation {
    pub allow_auto_topic_creation: bool,
    /// `non-partitioned` or `partitioned`.
    #[serde(default = "non_partitioned")]
    pub topic_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_num_partitions: Option<u32>,
}

fn non_partitioned() -> String {
    "non-partitioned".into()
}

impl AutoTopicCreation {
    /// Refuses what Pulsar refuses: an unknown type, a partitioned type
    /// without a positive partition count.
    pub fn validate(&self) -> Result<(), String> {
        match (self.topic_type.as_str(), self.default_num_partitions) {
            ("non-partitioned", _) => Ok(()),
            ("partitioned", Some(n)) if n > 0 => Ok(()),
            ("partitioned", _) => {
                Err("a partitioned topic type needs defaultNumPartitions > 0".into())
            }
            (t, _) => Err(format!(
                "topicType {t:?} is neither \"non-partitioned\" nor \"partitioned\""
            )),
        }
    }

    /// Partitions a topic created on first use gets (0: not partitioned),
    /// or `None` when first use may not create it.
    pub fn partitions_on_first_use(policy: Option<&AutoTopicCreation>) -> Option<u32> {
        match policy {
            None => Some(0),
            Some(p) if !p.allow_auto_topic_creation => None,
            Some(p) if p.topic_type == "partitioned" => Some(p.default_num_partitions.unwrap_or(1)),
            Some(_) => Some(0),
        }
    }
}

pub struct Namespaces {
    md: MetadataClient,
    default_bundles: usize,
    cache: Mutex<HashMap<String, (Arc<NamespacePolicies>, u64)>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<NamespacePolicies>, u64)>> {
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
        let (p, version) = self.get(ns).await?;
        let b = p.bundles.clone().unwrap_or_else(|| Bundles::even(1));
        Ok((b, version))
    }

    /// The namespace's record (cached; its bundles always set) and its
    /// version; the namespace must exist.
    pub async fn get(&self, ns: &str) -> Result<(Arc<NamespacePolicies>, u64), BrokerError> {
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
            if let Some(b) = &policies.bundles {
                // Refuse nonsense before anything relies on it.
                b.bounds()
                    .map_err(|e| BrokerError::NotServedHere(format!("namespace {ns}: {e}")))?;
                let entry = (Arc::new(policies), kv.version);
                self.lock().insert(ns.to_string(), entry.clone());
                return Ok(entry);
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

    /// Changes the namespace's record with `change` (by CAS, retried on a
    /// race); the namespace must exist.
    pub async fn update(
        &self,
        ns: &str,
        change: impl Fn(&mut NamespacePolicies),
    ) -> Result<(), BrokerError> {
        for _ in 0..5 {
            let Some((mut p, version)) = self.policies(ns).await? else {
                return Err(BrokerError::NamespaceNotFound(ns.to_string()));
            };
            change(&mut p);
            let value =
                serde_json::to_vec(&p).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
            let done = self
                .md
                .cas(&keys::namespace(ns), version, value, None)
                .await?;
            self.invalidate(ns);
            if done {
                return Ok(());
            }
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
    create_with(
        md,
        ns,
        NamespacePolicies {
            bundles: Some(Bundles::even(bundles)),
            ..Default::default()
        },
    )
    .await
}

/// Creates a namespace with its record (false if it exists).
pub async fn create_with(
    md: &MetadataClient,
    ns: &str,
    policies: NamespacePolicies,
) -> Result<bool, BrokerError> {
    let value =
        serde_json::to_vec(&policies).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    Ok(md.cas(&keys::namespace(ns), 0, value, None).await?)
}
