//! Namespaces and their bundles, cached from the metadata service and
//! dropped from the cache whenever a namespace's record changes (a watch).
//! A namespace created without bundles gets the default split on first use,
//! written by CAS so that every broker agrees.

use std::collections::{BTreeMap, HashMap};
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policies: Option<RetentionPolicies>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl_in_seconds: Option<u32>,
    /// By type: `destination_storage` (size), `message_age` (time).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backlog_quota_map: BTreeMap<String, BacklogQuota>,
    /// Broker-side dead-lettering (Magnetar's; Pulsar leaves it to clients).
    #[serde(
        rename = "deadLetterPolicy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dead_letter_policy: Option<DeadLetterPolicy>,
    /// Broker-side redelivery back-off (Magnetar's).
    #[serde(
        rename = "redeliveryBackoff",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub redelivery_backoff: Option<RedeliveryBackoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_compatibility_strategy: Option<Strategy>,
    /// Bytes after the last compaction that start the next (Pulsar's
    /// `compaction_threshold`; 0 or absent: only on request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction_threshold: Option<i64>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Pulsar's `RetentionPolicies`: how long and how much consumed data is
/// kept; -1 is without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicies {
    pub retention_time_in_minutes: i64,
    #[serde(rename = "retentionSizeInMB")]
    pub retention_size_in_mb: i64,
}

impl RetentionPolicies {
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_time_in_minutes < -1 || self.retention_size_in_mb < -1 {
            return Err("retention limits are -1 (none) or at least 0".into());
        }
        Ok(())
    }
}

/// Broker-side dead-lettering: an entry redelivered more than
/// `maxRedeliverCount` times goes to the dead-letter topic instead, for
/// every client — also one without a dead-letter policy of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterPolicy {
    pub max_redeliver_count: u32,
    /// Default: `<topic>-<subscription>-DLQ`, as Pulsar's clients name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

impl DeadLetterPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_redeliver_count == 0 {
            return Err("maxRedeliverCount must be at least 1".into());
        }
        if let Some(t) = &self.dead_letter_topic {
            magnetar_proto::TopicName::parse(t).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Broker-side redelivery back-off: a message given back (negative ack,
/// ack timeout, a consumer gone) waits `minDelayMs × multiplier^(n-1)`
/// (at most `maxDelayMs`) before its n-th redelivery — for every client,
/// as Pulsar's clients' `MultiplierRedeliveryBackoff` does for nacks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedeliveryBackoff {
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    #[serde(default = "double")]
    pub multiplier: f64,
}

fn double() -> f64 {
    2.0
}

impl Eq for RedeliveryBackoff {}

impl RedeliveryBackoff {
    pub fn validate(&self) -> Result<(), String> {
        if self.min_delay_ms > self.max_delay_ms
            || self.multiplier.is_nan()
            || self.multiplier < 1.0
        {
            return Err(
                "redeliveryBackoff needs minDelayMs <= maxDelayMs and multiplier >= 1".into(),
            );
        }
        Ok(())
    }

    /// The wait before the `n`-th redelivery (n >= 1).
    pub fn delay_ms(&self, n: u32) -> u64 {
        let f = self.multiplier.powi(n.saturating_sub(1).min(64) as i32);
        ((self.min_delay_ms as f64) * f).min(self.max_delay_ms as f64) as u64
    }
}

/// What happens when a topic's backlog is over its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BacklogPolicy {
    /// New producers are refused with a retriable error and existing ones
    /// closed: their messages wait in the clients.
    ProducerRequestHold,
    /// Producers fail (a non-retriable error).
    ProducerException,
    /// The oldest messages of the subscriptions over the quota are skipped.
    ConsumerBacklogEviction,
}

/// Pulsar's `BacklogQuota`: a size (bytes) or an age (seconds) limit; -1
/// is without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BacklogQuota {
    #[serde(default = "no_limit", alias = "limit")]
    pub limit_size: i64,
    #[serde(default = "no_limit")]
    pub limit_time: i64,
    pub policy: BacklogPolicy,
}

fn no_limit() -> i64 {
    -1
}

/// The quota types of a `backlog_quota_map`.
pub const SIZE_QUOTA: &str = "destination_storage";
pub const AGE_QUOTA: &str = "message_age";

impl BacklogQuota {
    /// A quota of `kind` must set its limit (bytes or seconds, > 0).
    pub fn validate(&self, kind: &str) -> Result<(), String> {
        let limit = match kind {
            SIZE_QUOTA => self.limit_size,
            AGE_QUOTA => self.limit_time,
            other => {
                return Err(format!(
                    "backlogQuotaType {other:?} is neither {SIZE_QUOTA} nor {AGE_QUOTA}"
                ))
            }
        };
        if limit <= 0 {
            return Err(format!("a {kind} quota needs a positive limit"));
        }
        Ok(())
    }
}

/// Pulsar's schema compatibility strategies (`UNDEFINED` means `FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    Undefined,
    AlwaysIncompatible,
    AlwaysCompatible,
    Backward,
    Forward,
    Full,
    BackwardTransitive,
    ForwardTransitive,
    FullTransitive,
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
