//! Partitioned topics and the rule for creating a topic on first use.
//!
//! A partitioned topic is a record, `{"partitions": N}` under
//! `/partitioned-topics/<tenant>/<ns>/<domain>/<topic>`; each partition
//! `<topic>-partition-<i>` is an ordinary topic with its own bundle (and so
//! its own owner). Clients learn N from PARTITIONED_METADATA and route to
//! the partitions themselves.

use magnetar_metadata::MetadataClient;
use magnetar_proto::pulsar::ServerError;
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use crate::ownership::namespaces::{AutoTopicCreation, Namespaces};
use crate::{keys, BrokerError};

/// Most partitions a topic may have (a bound, not a Pulsar default).
pub const MAX_PARTITIONS: u32 = 10_000;

/// Pulsar's `PartitionedTopicMetadata` as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionedMetadata {
    pub partitions: u32,
}

fn corrupt(name: &TopicName, e: serde_json::Error) -> BrokerError {
    BrokerError::NotServedHere(format!(
        "partitioned metadata of {name} does not parse: {e}"
    ))
}

/// The partition count of `name` and its record's version, if it is a
/// partitioned topic.
pub async fn partitions(
    md: &MetadataClient,
    name: &TopicName,
) -> Result<Option<(u32, u64)>, BrokerError> {
    let Some(kv) = md.get(&keys::partitioned(&name.as_key())).await? else {
        return Ok(None);
    };
    let m: PartitionedMetadata = serde_json::from_slice(&kv.value).map_err(|e| corrupt(name, e))?;
    Ok(Some((m.partitions, kv.version)))
}

/// Whether a (non-partitioned) topic of that name holds data or state.
pub async fn topic_exists(md: &MetadataClient, name: &TopicName) -> Result<bool, BrokerError> {
    Ok(md
        .get(&keys::managed_ledger(&name.as_key()))
        .await?
        .is_some())
}

fn check_count(n: u32) -> Result<(), BrokerError> {
    if n == 0 || n > MAX_PARTITIONS {
        return Err(BrokerError::new(
            ServerError::NotAllowedError,
            format!("a partitioned topic has 1 to {MAX_PARTITIONS} partitions, not {n}"),
        ));
    }
    Ok(())
}

/// Why a create was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CreateRefused {
    /// A partitioned topic of that name exists.
    Exists,
    /// A non-partitioned topic of that name exists.
    NonPartitionedExists,
}

/// Creates `name` with `n` partitions; the namespace must exist.
pub async fn create(
    md: &MetadataClient,
    namespaces: &Namespaces,
    name: &TopicName,
    n: u32,
) -> Result<Result<(), CreateRefused>, BrokerError> {
    check_count(n)?;
    namespaces.get(&name.namespace()).await?;
    if name.partition_of().is_some() {
        return Err(BrokerError::new(
            ServerError::NotAllowedError,
            format!("{name} names a partition; a partitioned topic's name cannot end with -partition-<i>"),
        ));
    }
    if topic_exists(md, name).await? {
        return Ok(Err(CreateRefused::NonPartitionedExists));
    }
    let value =
        serde_json::to_vec(&PartitionedMetadata { partitions: n }).map_err(|e| corrupt(name, e))?;
    if md
        .cas(&keys::partitioned(&name.as_key()), 0, value, None)
        .await?
    {
        tracing::info!(topic = %name, partitions = n, "partitioned topic created");
        Ok(Ok(()))
    } else {
        Ok(Err(CreateRefused::Exists))
    }
}

/// Raises `name`'s partition count to `n` (never lowers it: a partition's
/// messages would be stranded).
pub async fn grow(md: &MetadataClient, name: &TopicName, n: u32) -> Result<(), BrokerError> {
    check_count(n)?;
    for _ in 0..5 {
        let Some((now, version)) = partitions(md, name).await? else {
            return Err(BrokerError::new(
                ServerError::TopicNotFound,
                format!("partitioned topic {name} does not exist"),
            ));
        };
        if n <= now {
            return Err(BrokerError::new(
                ServerError::NotAllowedError,
                format!("{name} has {now} partitions; the count can only grow, not become {n}"),
            ));
        }
        let value = serde_json::to_vec(&PartitionedMetadata { partitions: n })
            .map_err(|e| corrupt(name, e))?;
        if md
            .cas(&keys::partitioned(&name.as_key()), version, value, None)
            .await?
        {
            tracing::info!(topic = %name, from = now, to = n, "partitioned topic grown");
            return Ok(());
        }
    }
    Err(BrokerError::NotServedHere(format!(
        "partitioned topic {name} keeps changing; retry"
    )))
}

/// Removes `name`'s record (its partitions are deleted by the caller).
pub async fn delete_record(md: &MetadataClient, name: &TopicName) -> Result<bool, BrokerError> {
    Ok(md.delete(&keys::partitioned(&name.as_key())).await?)
}

/// The partitioned topics of a namespace in a domain, by name.
pub async fn list(
    md: &MetadataClient,
    namespace: &str,
    persistent: bool,
) -> Result<Vec<(TopicName, u32)>, BrokerError> {
    let domain = if persistent {
        "persistent"
    } else {
        "non-persistent"
    };
    let prefix = keys::partitioned(&format!("{namespace}/{domain}/"));
    let mut out = Vec::new();
    for kv in md.range(&prefix, 0).await? {
        let Some(local) = kv.key.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(name) = TopicName::parse(&format!(
            "{domain}://{namespace}/{}",
            crate::topic::decode_key(local)
        )) else {
            continue;
        };
        let m: PartitionedMetadata =
            serde_json::from_slice(&kv.value).map_err(|e| corrupt(&name, e))?;
        out.push((name, m.partitions));
    }
    Ok(out)
}

/// Every persistent topic of `namespace`: those with storage, and every
/// partition of its partitioned topics, sorted.
pub async fn topics_of_namespace(
    md: &MetadataClient,
    namespace: &str,
) -> Result<Vec<String>, BrokerError> {
    let prefix = keys::managed_ledger(&format!("{namespace}/persistent/"));
    let stored = md.range_keys(&prefix).await?;
    let mut names: Vec<String> = stored
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .map(|local| {
            format!(
                "persistent://{namespace}/{}",
                crate::topic::decode_key(local)
            )
        })
        .collect();
    for (t, n) in list(md, namespace, true).await? {
        names.extend((0..n).map(|i| t.partition(i).to_string()));
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// What PARTITIONED_METADATA answers for `name`: its partition count (0 for
/// a partition or a non-partitioned topic). A topic that does not exist in
/// a namespace whose policy creates partitioned topics on first use is
/// created here with the policy's count.
pub async fn metadata_for(
    md: &MetadataClient,
    namespaces: &Namespaces,
    name: &TopicName,
) -> Result<u32, BrokerError> {
    let (policies, _) = namespaces.get(&name.namespace()).await?;
    if name.partition_of().is_some() {
        return Ok(0);
    }
    if let Some((n, _)) = partitions(md, name).await? {
        return Ok(n);
    }
    let first_use =
        AutoTopicCreation::partitions_on_first_use(policies.auto_topic_creation.as_ref());
    match first_use {
        Some(n) if n > 0 && name.persistent && !topic_exists(md, name).await? => {
            match create(md, namespaces, name, n).await? {
                Ok(()) => Ok(n),
                // Created meanwhile, by another client's first use.
                Err(CreateRefused::Exists) => Ok(partitions(md, name).await?.map_or(0, |p| p.0)),
                Err(CreateRefused::NonPartitionedExists) => Ok(0),
            }
        }
        _ => Ok(0),
    }
}

/// Refuses to load `name` where Pulsar would: a partitioned topic's own
/// name (clients use its partitions), a partition beyond the count, or a
/// topic that does not exist in a namespace that forbids creating topics on
/// first use.
pub async fn check_may_load(
    md: &MetadataClient,
    namespaces: &Namespaces,
    name: &TopicName,
) -> Result<(), BrokerError> {
    let (policies, _) = namespaces.get(&name.namespace()).await?;
    let not_found = |why: String| BrokerError::new(ServerError::TopicNotFound, why);
    if let Some((base, i)) = name.partition_of() {
        match partitions(md, &base).await? {
            Some((n, _)) if i < n => return Ok(()),
            Some((n, _)) => {
                return Err(not_found(format!(
                    "{base} has {n} partitions; there is no partition {i}"
                )))
            }
            None => {}
        }
    } else if let Some((n, _)) = partitions(md, name).await? {
        return Err(BrokerError::new(
            ServerError::NotAllowedError,
            format!("{name} is a partitioned topic with {n} partitions: use its partitions ({name}-partition-0 …)"),
        ));
    }
    let first_use =
        AutoTopicCreation::partitions_on_first_use(policies.auto_topic_creation.as_ref());
    if first_use == Some(0) || topic_exists(md, name).await? {
        return Ok(());
    }
    Err(not_found(format!(
        "topic {name} does not exist, and namespace {} does not create topics on first use",
        name.namespace()
    )))
}
