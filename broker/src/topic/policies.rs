//! The policies in force for a topic: its own (Pulsar's topic policies,
//! JSON under `/topic-policies/<key>`; a partition follows its partitioned
//! topic's), else its namespace's, else the broker's default. Loaded topics
//! follow changes of either as they happen (`follow`); what is checked
//! over time — message TTL, backlog quotas, retention by age — runs every
//! so often (`enforce`). The decisions are pure (`effective`,
//! `retention_of`, `over_quota`, `to_evict`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use magnetar_metadata::MetadataClient;
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use super::TopicRegistry;
use crate::managed_ledger::trim::Retention;
use crate::ownership::namespaces::{
    BacklogQuota, DeadLetterPolicy, NamespacePolicies, RedeliveryBackoff, RetentionPolicies,
    AGE_QUOTA, SIZE_QUOTA,
};
use crate::{keys, BrokerError};

/// A topic's own policies (Pulsar's `TopicPolicies` field names); fields
/// the broker does not act on are kept as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policies: Option<RetentionPolicies>,
    #[serde(
        rename = "messageTTLInSeconds",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub message_ttl_in_seconds: Option<u32>,
    #[serde(
        rename = "backLogQuotaMap",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub backlog_quota_map: BTreeMap<String, BacklogQuota>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_policy: Option<DeadLetterPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction_threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery_backoff: Option<RedeliveryBackoff>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// What a loaded topic applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    pub dead_letter: Option<DeadLetterPolicy>,
    /// Compact once this many bytes came after the last compaction.
    pub compaction_threshold: Option<i64>,
    pub redelivery_backoff: Option<RedeliveryBackoff>,
    pub dedup: bool,
    /// `None`: no retention policy — Pulsar's default: nothing consumed is
    /// kept, nor anything of a topic without subscriptions.
    pub retention: Option<Retention>,
    /// Unacknowledged messages older than this are acknowledged for every
    /// subscription (0 or `None`: never).
    pub ttl_secs: Option<u32>,
    pub size_quota: Option<BacklogQuota>,
    pub age_quota: Option<BacklogQuota>,
}

/// Topic level over namespace level over the default (off, as in Pulsar).
pub fn effective(ns: &NamespacePolicies, topic: &TopicPolicies) -> Effective {
    let quota = |kind: &str| {
        topic
            .backlog_quota_map
            .get(kind)
            .or(ns.backlog_quota_map.get(kind))
            .copied()
    };
    Effective {
        dedup: topic
            .deduplication_enabled
            .or(ns.deduplication_enabled)
            .unwrap_or(false),
        retention: topic
            .retention_policies
            .or(ns.retention_policies)
            .map(retention_of),
        ttl_secs: topic
            .message_ttl_in_seconds
            .or(ns.message_ttl_in_seconds)
            .filter(|t| *t > 0),
        size_quota: quota(SIZE_QUOTA),
        age_quota: quota(AGE_QUOTA),
        dead_letter: topic
            .dead_letter_policy
            .clone()
            .or(ns.dead_letter_policy.clone()),
        compaction_threshold: topic.compaction_threshold.or(ns.compaction_threshold),
        redelivery_backoff: topic.redelivery_backoff.or(ns.redelivery_backoff),
    }
}

/// Pulsar's retention limits (-1: none) as the managed ledger's.
pub fn retention_of(p: RetentionPolicies) -> Retention {
    let limit = |v: i64, unit: u64| (v >= 0).then(|| v as u64 * unit);
    Retention {
        time_ms: limit(p.retention_time_in_minutes, 60_000),
        size_bytes: limit(p.retention_size_in_mb, 1 << 20),
    }
}

/// The quota a backlog of `bytes`, whose oldest message is `age_ms` old,
/// exceeds, and why.
pub fn over_quota(
    p: &Effective,
    bytes: u64,
    age_ms: Option<u64>,
) -> Option<(BacklogQuota, String)> {
    if let Some(q) = p.size_quota.filter(|q| q.limit_size > 0) {
        if bytes > q.limit_size as u64 {
            return Some((
                q,
                format!(
                    "backlog of {bytes} bytes is over the quota of {} bytes",
                    q.limit_size
                ),
            ));
        }
    }
    if let (Some(q), Some(age)) = (p.age_quota.filter(|q| q.limit_time > 0), age_ms) {
        if age > q.limit_time as u64 * 1000 {
            return Some((
                q,
                format!(
                    "the oldest unacknowledged message is {} s old, over the quota of {} s",
                    age / 1000,
                    q.limit_time
                ),
            ));
        }
    }
    None
}

/// Entries a subscription with `entries` unacknowledged entries holding
/// `bytes` skips to get under `limit` bytes (entries taken as equal in
/// size; rounded up).
pub fn to_evict(entries: u64, bytes: u64, limit: u64) -> u64 {
    if bytes <= limit || bytes == 0 {
        return 0;
    }
    let over = bytes - limit;
    ((entries as u128 * over as u128).div_ceil(bytes as u128)) as u64
}

/// Whose policies a topic follows: a partition its partitioned topic's.
fn owner_of(name: &TopicName) -> TopicName {
    name.partition_of()
        .map_or_else(|| name.clone(), |(base, _)| base)
}

fn key(name: &TopicName) -> String {
    keys::topic_policies(&owner_of(name).as_key())
}

pub async fn read(md: &MetadataClient, name: &TopicName) -> Result<TopicPolicies, BrokerError> {
    Ok(match md.get(&key(name)).await? {
        Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_default(),
        None => TopicPolicies::default(),
    })
}

/// Changes a topic's own policies by CAS (retried on a race).
pub async fn update(
    md: &MetadataClient,
    name: &TopicName,
    change: impl Fn(&mut TopicPolicies),
) -> Result<(), BrokerError> {
    let key = key(name);
    for _ in 0..5 {
        let (mut p, version) = match md.get(&key).await? {
            Some(kv) => (
                serde_json::from_slice(&kv.value).unwrap_or_default(),
                kv.version,
            ),
            None => (TopicPolicies::default(), 0),
        };
        change(&mut p);
        let value =
            serde_json::to_vec(&p).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        if md.cas(&key, version, value, None).await? {
            return Ok(());
        }
    }
    Err(BrokerError::NotServedHere(format!(
        "the policies of {name} keep changing; retry"
    )))
}

/// The policies in force for `name`, read now (`fresh`: the namespace's
/// record too, not the cache).
pub async fn resolve(
    registry: &TopicRegistry,
    name: &TopicName,
    fresh: bool,
) -> Result<Effective, BrokerError> {
    let own = &registry.ownership;
    let ns = name.namespace();
    let ns_policies = if fresh {
        own.namespaces
            .policies(&ns)
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| BrokerError::NamespaceNotFound(ns.clone()))?
    } else {
        (*own.namespaces.get(&ns).await?.0).clone()
    };
    let topic = read(own.metadata(), name).await?;
    Ok(effective(&ns_policies, &topic))
}

/// Applies policy changes to loaded topics as they are written: a
/// namespace's record to its topics, a topic's policies to it (and its
/// partitions).
pub async fn follow(registry: Arc<TopicRegistry>) {
    let md = registry.ownership.metadata().clone();
    loop {
        let mut namespaces = md.watch(keys::NAMESPACES_PREFIX, 0);
        let mut topics = md.watch(keys::TOPIC_POLICIES_PREFIX, 0);
        loop {
            let ev = tokio::select! {
                ev = namespaces.next() => ev.map(|e| (true, e.kv.key)),
                ev = topics.next() => ev.map(|e| (false, e.kv.key)),
            };
            let Some((is_ns, key)) = ev else { break };
            let affected: Vec<_> = registry
                .loaded()
                .into_iter()
                .filter(|t| {
                    if is_ns {
                        key.strip_prefix(keys::NAMESPACES_PREFIX) == Some(&t.name.namespace())
                    } else {
                        key == self::key(&t.name)
                    }
                })
                .collect();
            for t in affected {
                let registry = registry.clone();
                tokio::spawn(async move {
                    match resolve(&registry, &t.name, true).await {
                        Ok(p) => {
                            if let Err(e) = t.apply(p).await {
                                tracing::warn!(topic = %t.name, error = %e, "applying changed policies failed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(topic = %t.name, error = %e, "reading changed policies failed")
                        }
                    }
                });
            }
        }
        // A watch ended (history compacted): watch again from now.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Every `every`: message TTL, backlog quotas and retention by age on
/// every loaded topic.
pub async fn enforce(registry: Arc<TopicRegistry>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        for t in registry.loaded() {
            if let Err(e) = t.enforce_policies().await {
                tracing::debug!(topic = %t.name, error = %e, "enforcing policies failed; next round retries");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::namespaces::BacklogPolicy;

    #[test]
    fn redelivery_back_off_grows_to_its_cap() {
        let b = RedeliveryBackoff {
            min_delay_ms: 100,
            max_delay_ms: 1_000,
            multiplier: 3.0,
        };
        let d: Vec<u64> = (1..=5).map(|n| b.delay_ms(n)).collect();
        assert_eq!(d, vec![100, 300, 900, 1_000, 1_000]);
        assert!(b.validate().is_ok());
        assert!(RedeliveryBackoff {
            multiplier: 0.5,
            ..b
        }
        .validate()
        .is_err());
    }

    #[test]
    fn retention_limits_convert_with_minus_one_as_none() {
        let r = retention_of(RetentionPolicies {
            retention_time_in_minutes: 2,
            retention_size_in_mb: -1,
        });
        assert_eq!(r.time_ms, Some(120_000));
        assert_eq!(r.size_bytes, None);
    }

    #[test]
    fn quotas_by_size_and_by_age() {
        let q = |size: i64, time: i64| BacklogQuota {
            limit_size: size,
            limit_time: time,
            policy: BacklogPolicy::ProducerException,
        };
        let p = Effective {
            size_quota: Some(q(1000, -1)),
            age_quota: Some(q(-1, 60)),
            ..Default::default()
        };
        assert!(over_quota(&p, 1000, Some(59_000)).is_none());
        assert!(over_quota(&p, 1001, None).is_some());
        assert!(over_quota(&p, 10, Some(61_000)).is_some());
        assert!(over_quota(&Effective::default(), u64::MAX, Some(u64::MAX)).is_none());
    }

    #[test]
    fn eviction_skips_enough_entries_to_get_under_the_limit() {
        assert_eq!(to_evict(100, 1000, 1000), 0);
        assert_eq!(to_evict(100, 1000, 500), 50);
        assert_eq!(to_evict(3, 1000, 999), 1, "rounded up");
        assert_eq!(to_evict(100, 1000, 0), 100);
    }

    #[test]
    fn each_policy_comes_from_the_topic_else_the_namespace() {
        let ns = NamespacePolicies {
            message_ttl_in_seconds: Some(60),
            retention_policies: Some(RetentionPolicies {
                retention_time_in_minutes: -1,
                retention_size_in_mb: -1,
            }),
            ..Default::default()
        };
        let topic = TopicPolicies {
            message_ttl_in_seconds: Some(5),
            ..Default::default()
        };
        let e = effective(&ns, &topic);
        assert_eq!(e.ttl_secs, Some(5));
        assert_eq!(
            e.retention,
            Some(Retention {
                time_ms: None,
                size_bytes: None
            })
        );
        assert_eq!(effective(&ns, &TopicPolicies::default()).ttl_secs, Some(60));
    }

    #[test]
    fn topic_level_overrides_namespace_level_overrides_the_default() {
        let ns = |d| NamespacePolicies {
            deduplication_enabled: d,
            ..Default::default()
        };
        let topic = |d| TopicPolicies {
            deduplication_enabled: d,
            ..Default::default()
        };
        assert!(!effective(&ns(None), &topic(None)).dedup);
        assert!(effective(&ns(Some(true)), &topic(None)).dedup);
        assert!(!effective(&ns(Some(true)), &topic(Some(false))).dedup);
        assert!(effective(&ns(None), &topic(Some(true))).dedup);
    }

    #[test]
    fn a_partition_follows_its_partitioned_topic() {
        let t = TopicName::parse("persistent://a/b/t").unwrap();
        assert_eq!(key(&t.partition(2)), key(&t));
    }
}
