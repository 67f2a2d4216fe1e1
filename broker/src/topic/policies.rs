//! The policies in force for a topic: its own (Pulsar's topic policies,
//! JSON under `/topic-policies/<key>`; a partition follows its partitioned
//! topic's), else its namespace's, else the broker's default. Loaded topics
//! follow changes of either as they happen (`follow`).

use std::sync::Arc;

use magnetar_metadata::MetadataClient;
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use super::TopicRegistry;
use crate::ownership::namespaces::NamespacePolicies;
use crate::{keys, BrokerError};

/// A topic's own policies (Pulsar's `TopicPolicies` field names); fields
/// the broker does not act on are kept as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication_enabled: Option<bool>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// What a loaded topic applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effective {
    pub dedup: bool,
}

/// Topic level over namespace level over the default (off, as in Pulsar).
pub fn effective(ns: &NamespacePolicies, topic: &TopicPolicies) -> Effective {
    Effective {
        dedup: topic
            .deduplication_enabled
            .or(ns.deduplication_enabled)
            .unwrap_or(false),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
