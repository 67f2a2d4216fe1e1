//! Pulsar's persistent-topics resource, `/admin/v2/persistent/{tenant}/{ns}`:
//! list the topics (partitions included) and `/partitioned` the partitioned
//! ones; per topic: create (`PUT`, non-partitioned), delete (`DELETE`,
//! `?force=true` closes its clients), `stats`, `unload`; partitioned topics
//! through `/partitions` (`PUT` create with N, `POST` grow to N, `GET`
//! `{"partitions": N}`, `DELETE` with every partition). Calls on one
//! topic's state are answered by its owner (a redirect from elsewhere).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use magnetar_proto::commands::Assigned;
use magnetar_proto::pulsar::command_subscribe::SubType;
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use super::http::{AdminContext, ApiError};
use super::namespaces::{parse_json, QuotaType};
use super::{error, here_or_redirect, owned, topic_name, Answer};
use crate::managed_ledger::MlInfo;
use crate::ownership::namespaces::{
    BacklogQuota, DeadLetterPolicy, RedeliveryBackoff, RetentionPolicies,
};
use crate::topic::partitioned::{self, CreateRefused, PartitionedMetadata};
use crate::topic::policies;
use crate::topic::Topic;
use crate::{keys, BrokerError};

type Ctx = State<Arc<AdminContext>>;

const NS: &str = "/admin/v2/persistent/{tenant}/{ns}";
const TOPIC: &str = "/admin/v2/persistent/{tenant}/{ns}/{topic}";

pub fn routes() -> Router<Arc<AdminContext>> {
    Router::new()
        .route(NS, get(list))
        .route(&format!("{NS}/partitioned"), get(list_partitioned))
        .route(TOPIC, put(create).delete(delete))
        .route(
            &format!("{TOPIC}/partitions"),
            put(create_partitioned)
                .post(grow_partitioned)
                .get(get_partitions)
                .delete(delete_partitioned),
        )
        .route(&format!("{TOPIC}/stats"), get(stats))
        .route(&format!("{TOPIC}/internalStats"), get(internal_stats))
        .route(
            &format!("{TOPIC}/partitioned-stats"),
            get(partitioned_stats),
        )
        .route(
            "/admin/v2/non-persistent/{tenant}/{ns}/{topic}/stats",
            get(non_persistent_stats),
        )
        .route(&format!("{TOPIC}/unload"), put(unload))
        .route(&format!("{TOPIC}/terminate"), post(terminate))
        .route(
            &format!("{TOPIC}/compaction"),
            put(compact).get(compaction_status),
        )
        .route(
            &format!("{TOPIC}/compactionThreshold"),
            get(get_threshold)
                .post(set_threshold)
                .delete(remove_threshold),
        )
        .route(
            &format!("{TOPIC}/retention"),
            get(get_retention)
                .post(set_retention)
                .delete(remove_retention),
        )
        .route(
            &format!("{TOPIC}/messageTTL"),
            get(get_ttl).post(set_ttl).delete(remove_ttl),
        )
        .route(
            &format!("{TOPIC}/backlogQuota"),
            post(set_quota).delete(remove_quota),
        )
        .route(&format!("{TOPIC}/backlogQuotaMap"), get(get_quotas))
        .route(
            &format!("{TOPIC}/redeliveryBackoff"),
            get(get_backoff).post(set_backoff).delete(remove_backoff),
        )
        .route(
            &format!("{TOPIC}/deadLetterPolicy"),
            get(get_dead_letter)
                .post(set_dead_letter)
                .delete(remove_dead_letter),
        )
        .route(
            &format!("{TOPIC}/deduplicationEnabled"),
            get(get_dedup).post(set_dedup).delete(remove_dedup),
        )
}

#[derive(Deserialize)]
struct NsPath {
    tenant: String,
    ns: String,
}

#[derive(Deserialize)]
struct TopicPath {
    tenant: String,
    ns: String,
    topic: String,
}

impl TopicPath {
    fn name(&self) -> Result<TopicName, ApiError> {
        topic_name(&self.tenant, &self.ns, &self.topic)
    }
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

fn fail(status: StatusCode, reason: impl Into<String>) -> Response {
    ApiError(status, reason.into()).into_response()
}

/// The topic, loaded at its owner (a redirect from elsewhere); 404 when it
/// does not exist (a non-persistent one exists only while loaded).
async fn existing(ctx: &AdminContext, name: &TopicName, uri: &Uri) -> Result<Arc<Topic>, Response> {
    here_or_redirect(ctx, name, &uri.to_string()).await?;
    let exists = ctx.topics.get(name).is_some()
        || (name.persistent
            && partitioned::topic_exists(&ctx.md, name)
                .await
                .map_err(error)?);
    if !exists {
        return Err(fail(
            StatusCode::NOT_FOUND,
            format!("topic {name} does not exist"),
        ));
    }
    owned(ctx, name, &uri.to_string()).await
}

/// A partitioned topic's partition count and this broker's HTTP address,
/// through which each partition is reached at its owner.
async fn partition_targets(
    ctx: &AdminContext,
    name: &TopicName,
) -> Result<(u32, String), Response> {
    let Some((n, _)) = partitioned::partitions(&ctx.md, name)
        .await
        .map_err(error)?
    else {
        return Err(fail(
            StatusCode::NOT_FOUND,
            format!("partitioned topic {name} does not exist"),
        ));
    };
    let Some(base) = ctx.topics.ownership.me().http_url else {
        return Err(fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "this broker has no HTTP address to reach the partitions' owners",
        ));
    };
    Ok((n, base))
}

/// The namespace must exist (404 otherwise).
async fn check_namespace(ctx: &AdminContext, ns: &str) -> Result<(), Response> {
    ctx.topics
        .ownership
        .namespaces
        .get(ns)
        .await
        .map(|_| ())
        .map_err(error)
}

/// Every topic of the namespace: those with storage, and every partition
/// of its partitioned topics.
async fn list(State(ctx): Ctx, Path(p): Path<NsPath>) -> Answer {
    let ns = format!("{}/{}", p.tenant, p.ns);
    check_namespace(&ctx, &ns).await?;
    let names = partitioned::topics_of_namespace(&ctx.md, &ns)
        .await
        .map_err(error)?;
    Ok(Json(names).into_response())
}

async fn list_partitioned(State(ctx): Ctx, Path(p): Path<NsPath>) -> Answer {
    let ns = format!("{}/{}", p.tenant, p.ns);
    check_namespace(&ctx, &ns).await?;
    let names: Vec<String> = partitioned::list(&ctx.md, &ns, true)
        .await
        .map_err(error)?
        .into_iter()
        .map(|(t, _)| t.to_string())
        .collect();
    Ok(Json(names).into_response())
}

/// Creates a non-partitioned topic: an empty record, which the owner
/// opens on first use.
async fn create(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = p.name()?;
    check_namespace(&ctx, &name.namespace()).await?;
    if partitioned::partitions(&ctx.md, &name)
        .await
        .map_err(error)?
        .is_some()
    {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("{name} already exists as a partitioned topic"),
        ));
    }
    let value = serde_json::to_vec(&MlInfo::default())
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let created = ctx
        .md
        .cas(&keys::managed_ledger(&name.as_key()), 0, value, None)
        .await
        .map_err(|e| error(e.into()))?;
    if !created {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("topic {name} already exists"),
        ));
    }
    tracing::info!(topic = %name, "topic created");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete(
    State(ctx): Ctx,
    Path(p): Path<TopicPath>,
    Query(q): Query<Force>,
    uri: Uri,
) -> Answer {
    let name = p.name()?;
    check_namespace(&ctx, &name.namespace()).await?;
    if let Some((n, _)) = partitioned::partitions(&ctx.md, &name)
        .await
        .map_err(error)?
    {
        return Err(fail(
            StatusCode::CONFLICT,
            format!(
                "{name} is a partitioned topic ({n} partitions): delete it through …/partitions"
            ),
        ));
    }
    here_or_redirect(&ctx, &name, &uri.to_string()).await?;
    if !ctx.topics.delete(&name, q.force).await.map_err(error)? {
        return Err(fail(
            StatusCode::NOT_FOUND,
            format!("topic {name} does not exist"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The partition count of a body: a bare number, as Pulsar's tools send.
fn parse_count(body: &Bytes) -> Result<u32, ApiError> {
    let text = std::str::from_utf8(body).unwrap_or("").trim();
    text.parse::<u32>().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body must be a partition count, not {text:?}"),
        )
    })
}

async fn create_partitioned(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let name = p.name()?;
    let n = parse_count(&body)?;
    let own = &ctx.topics.ownership;
    match partitioned::create(&ctx.md, &own.namespaces, &name, n)
        .await
        .map_err(error)?
    {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(CreateRefused::Exists) => Err(fail(
            StatusCode::CONFLICT,
            format!("partitioned topic {name} already exists"),
        )),
        Err(CreateRefused::NonPartitionedExists) => Err(fail(
            StatusCode::CONFLICT,
            format!("{name} already exists as a non-partitioned topic"),
        )),
    }
}

async fn grow_partitioned(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let name = p.name()?;
    let n = parse_count(&body)?;
    partitioned::grow(&ctx.md, &name, n).await.map_err(error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_partitions(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = p.name()?;
    check_namespace(&ctx, &name.namespace()).await?;
    let partitions = partitioned::partitions(&ctx.md, &name)
        .await
        .map_err(error)?
        .map_or(0, |(n, _)| n);
    Ok(Json(PartitionedMetadata { partitions }).into_response())
}

/// Deletes every partition (each at its owner, through this API) and then
/// the record. A partition that cannot be deleted stops the deletion with
/// the record kept, so it can be retried.
async fn delete_partitioned(
    State(ctx): Ctx,
    Path(p): Path<TopicPath>,
    Query(q): Query<Force>,
) -> Answer {
    let name = p.name()?;
    let (n, base) = partition_targets(&ctx, &name).await?;
    let http = reqwest::Client::new();
    for i in 0..n {
        let part = name.partition(i);
        let url = format!(
            "{}/admin/v2/persistent/{}/{}/{}?force={}",
            base.trim_end_matches('/'),
            part.tenant,
            part.namespace,
            part.local,
            q.force
        );
        let resp = http
            .delete(&url)
            .send()
            .await
            .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("deleting {part}: {e}")))?;
        let status = resp.status();
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            let body = resp.text().await.unwrap_or_default();
            return Err(fail(
                status,
                format!("deleting {part} failed ({status}): {body}"),
            ));
        }
    }
    partitioned::delete_record(&ctx.md, &name)
        .await
        .map_err(error)?;
    tracing::info!(topic = %name, partitions = n, "partitioned topic deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Pulsar's `TopicStats` (the fields we have the quantity for).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TopicStatsJson {
    msg_rate_in: f64,
    msg_throughput_in: f64,
    msg_rate_out: f64,
    msg_throughput_out: f64,
    msg_in_counter: u64,
    bytes_in_counter: u64,
    msg_out_counter: u64,
    bytes_out_counter: u64,
    average_msg_size: f64,
    storage_size: u64,
    publishers: Vec<PublisherJson>,
    subscriptions: BTreeMap<String, SubscriptionJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublisherJson {
    producer_id: u64,
    producer_name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionJson {
    msg_backlog: u64,
    unacked_messages: u64,
    msg_delayed: u64,
    /// Messages of a non-persistent topic no consumer could take.
    msg_drop_counter: u64,
    #[serde(rename = "type")]
    sub_type: &'static str,
    is_durable: bool,
    consumers: Vec<ConsumerJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsumerJson {
    consumer_name: String,
}

fn type_name(t: SubType) -> &'static str {
    match t {
        SubType::Exclusive => "Exclusive",
        SubType::Shared => "Shared",
        SubType::Failover => "Failover",
        SubType::KeyShared => "Key_Shared",
    }
}

async fn stats(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = p.name()?;
    topic_stats(&ctx, name, uri).await
}

/// A non-persistent topic's stats: those of a loaded topic (it exists only
/// while loaded).
async fn non_persistent_stats(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = TopicName::parse(&format!(
        "non-persistent://{}/{}/{}",
        p.tenant, p.ns, p.topic
    ))
    .map_err(|e| error(BrokerError::from(e)))?;
    topic_stats(&ctx, name, uri).await
}

async fn topic_stats(ctx: &AdminContext, name: TopicName, uri: Uri) -> Answer {
    let topic = existing(ctx, &name, &uri).await?;
    let [msgs_in, bytes_in, msgs_out, bytes_out] = topic.stats.counters();
    let rates = topic.stats.rates();
    let subscriptions = topic
        .subscription_stats()
        .await
        .into_iter()
        .map(|(sub, s)| {
            let json = SubscriptionJson {
                msg_backlog: s.msg_backlog,
                unacked_messages: s.unacked,
                msg_delayed: s.delayed,
                msg_drop_counter: s.dropped,
                sub_type: type_name(s.sub_type),
                is_durable: s.durable,
                consumers: s
                    .consumers
                    .into_iter()
                    .map(|consumer_name| ConsumerJson { consumer_name })
                    .collect(),
            };
            (sub, json)
        })
        .collect();
    let stats = TopicStatsJson {
        msg_rate_in: rates.msgs_in,
        msg_throughput_in: rates.bytes_in,
        msg_rate_out: rates.msgs_out,
        msg_throughput_out: rates.bytes_out,
        msg_in_counter: msgs_in,
        bytes_in_counter: bytes_in,
        msg_out_counter: msgs_out,
        bytes_out_counter: bytes_out,
        average_msg_size: if msgs_in == 0 {
            0.0
        } else {
            bytes_in as f64 / msgs_in as f64
        },
        storage_size: topic.ml.size_bytes(),
        publishers: topic
            .producer_names()
            .into_iter()
            .map(|(producer_id, producer_name)| PublisherJson {
                producer_id,
                producer_name,
            })
            .collect(),
        subscriptions,
    };
    Ok(Json(stats).into_response())
}

/// The topic's own policies, changed by `change` (the namespace must exist).
async fn update_policies(
    ctx: &AdminContext,
    p: &TopicPath,
    change: impl Fn(&mut policies::TopicPolicies),
) -> Answer {
    let name = p.name()?;
    check_namespace(ctx, &name.namespace()).await?;
    policies::update(&ctx.md, &name, change)
        .await
        .map_err(error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn read_policies(
    ctx: &AdminContext,
    p: &TopicPath,
) -> Result<policies::TopicPolicies, Response> {
    let name = p.name()?;
    policies::read(&ctx.md, &name).await.map_err(error)
}

async fn get_backoff(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.redelivery_backoff).into_response())
}

async fn set_backoff(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let b: RedeliveryBackoff = parse_json(&body)?;
    b.validate()
        .map_err(|why| fail(StatusCode::PRECONDITION_FAILED, why))?;
    update_policies(&ctx, &p, |t| t.redelivery_backoff = Some(b)).await
}

async fn remove_backoff(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    update_policies(&ctx, &p, |t| t.redelivery_backoff = None).await
}

async fn get_dead_letter(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.dead_letter_policy).into_response())
}

async fn set_dead_letter(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let d: DeadLetterPolicy = parse_json(&body)?;
    d.validate()
        .map_err(|why| fail(StatusCode::PRECONDITION_FAILED, why))?;
    update_policies(&ctx, &p, |t| t.dead_letter_policy = Some(d.clone())).await
}

async fn remove_dead_letter(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    update_policies(&ctx, &p, |t| t.dead_letter_policy = None).await
}

async fn get_retention(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.retention_policies).into_response())
}

async fn set_retention(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let r: RetentionPolicies = parse_json(&body)?;
    r.validate()
        .map_err(|why| fail(StatusCode::PRECONDITION_FAILED, why))?;
    update_policies(&ctx, &p, |t| t.retention_policies = Some(r)).await
}

async fn remove_retention(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    update_policies(&ctx, &p, |t| t.retention_policies = None).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TtlQuery {
    #[serde(rename = "messageTTL")]
    message_ttl: Option<u32>,
}

async fn get_ttl(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.message_ttl_in_seconds).into_response())
}

/// Pulsar takes the TTL as `?messageTTL=N`; a number in the body works too.
async fn set_ttl(
    State(ctx): Ctx,
    Path(p): Path<TopicPath>,
    Query(q): Query<TtlQuery>,
    body: Bytes,
) -> Answer {
    let ttl = match q.message_ttl {
        Some(t) => t,
        None => parse_json(&body)?,
    };
    update_policies(&ctx, &p, |t| t.message_ttl_in_seconds = Some(ttl)).await
}

async fn remove_ttl(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    update_policies(&ctx, &p, |t| t.message_ttl_in_seconds = None).await
}

async fn get_quotas(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.backlog_quota_map).into_response())
}

async fn set_quota(
    State(ctx): Ctx,
    Path(p): Path<TopicPath>,
    Query(q): Query<QuotaType>,
    body: Bytes,
) -> Answer {
    let quota: BacklogQuota = parse_json(&body)?;
    let kind = q.kind();
    quota
        .validate(&kind)
        .map_err(|why| fail(StatusCode::PRECONDITION_FAILED, why))?;
    update_policies(&ctx, &p, |t| {
        t.backlog_quota_map.insert(kind.clone(), quota);
    })
    .await
}

async fn remove_quota(
    State(ctx): Ctx,
    Path(p): Path<TopicPath>,
    Query(q): Query<QuotaType>,
) -> Answer {
    let kind = q.kind();
    update_policies(&ctx, &p, |t| {
        t.backlog_quota_map.remove(&kind);
    })
    .await
}

async fn get_dedup(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = p.name()?;
    let policies = policies::read(&ctx.md, &name).await.map_err(error)?;
    Ok(Json(policies.deduplication_enabled).into_response())
}

async fn set_dedup(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let name = p.name()?;
    let on = super::namespaces::parse_bool(&body)?;
    check_namespace(&ctx, &name.namespace()).await?;
    policies::update(&ctx.md, &name, |p| p.deduplication_enabled = Some(on))
        .await
        .map_err(error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove_dedup(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = p.name()?;
    policies::update(&ctx.md, &name, |p| p.deduplication_enabled = None)
        .await
        .map_err(error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Starts a compaction at the owner (a no-op while one runs).
async fn compact(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = p.name()?;
    let topic = existing(&ctx, &name, &uri).await?;
    if !topic.start_compaction() {
        return Err(fail(
            StatusCode::CONFLICT,
            format!("a compaction of {name} is already running"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Pulsar's `LongRunningProcessStatus`.
async fn compaction_status(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    use crate::topic::compaction::Status;
    let name = p.name()?;
    here_or_redirect(&ctx, &name, &uri.to_string()).await?;
    let status = ctx
        .topics
        .get(&name)
        .map(|t| t.compaction_status())
        .unwrap_or_default();
    let (status, error) = match status {
        Status::NotRun => ("NOT_RUN", String::new()),
        Status::Running => ("RUNNING", String::new()),
        Status::Success => ("SUCCESS", String::new()),
        Status::Error(e) => ("ERROR", e),
    };
    Ok(Json(serde_json::json!({ "status": status, "lastError": error })).into_response())
}

async fn get_threshold(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    Ok(Json(read_policies(&ctx, &p).await?.compaction_threshold).into_response())
}

async fn set_threshold(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let t: i64 = parse_json(&body)?;
    update_policies(&ctx, &p, |x| x.compaction_threshold = Some(t)).await
}

async fn remove_threshold(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    update_policies(&ctx, &p, |x| x.compaction_threshold = None).await
}

/// Pulsar's `MessageIdImpl` as JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageIdJson {
    ledger_id: i64,
    entry_id: i64,
    partition_index: i32,
}

/// Terminates the topic: later sends fail with TopicTerminated, consumers
/// that read everything get end-of-topic. Answers the last message's id.
async fn terminate(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = p.name()?;
    if partitioned::partitions(&ctx.md, &name)
        .await
        .map_err(error)?
        .is_some()
    {
        return Err(fail(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{name} is a partitioned topic: terminate its partitions"),
        ));
    }
    let topic = existing(&ctx, &name, &uri).await?;
    let last = topic
        .ml
        .terminate()
        .await
        .map_err(|e| error(BrokerError::from(e)))?;
    topic.disconnect_producers();
    Ok(Json(MessageIdJson {
        ledger_id: last.ledger_id as i64,
        entry_id: last.entry_id,
        partition_index: name.partition_of().map_or(-1, |(_, i)| i as i32),
    })
    .into_response())
}

fn position(p: crate::managed_ledger::cursor::Position) -> String {
    format!("{}:{}", p.ledger_id, p.entry_id)
}

/// Pulsar's `PersistentTopicInternalStats` (the fields we have).
async fn internal_stats(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = p.name()?;
    let topic = existing(&ctx, &name, &uri).await?;
    let ml = &topic.ml;
    let ledgers = ml.ledgers();
    let current = ledgers.last().cloned();
    let cursors: serde_json::Map<String, serde_json::Value> = topic
        .subscription_stats()
        .await
        .into_iter()
        .map(|(sub, s)| {
            (
                sub,
                serde_json::json!({
                    "markDeletePosition": position(s.mark_delete),
                    // Pulsar's form: "[(l:e..l:e], ...]", first ranges only.
                    "individuallyDeletedMessages": format!("[{}]", s.acked_ranges.iter()
                        .map(|(a, b)| format!("({}..{}]", position(a.prev()), position(*b)))
                        .collect::<Vec<_>>().join(", ")),
                    "individuallyAckedEntries": s.acked_after_mark,
                    "messagesConsumedCounter": 0,
                    "numberOfEntriesSinceFirstNotAckedMessage": s.msg_backlog,
                    "state": if s.durable { "Open" } else { "NonDurable" },
                }),
            )
        })
        .collect();
    Ok(Json(serde_json::json!({
        "entriesAddedCounter": topic.stats.counters()[0],
        "numberOfEntries": ml.entries(),
        "totalSize": ml.size_bytes(),
        "currentLedgerEntries": current.as_ref().map_or(0, |l| l.entries),
        "currentLedgerSize": current.as_ref().map_or(0, |l| l.size_bytes),
        "lastConfirmedEntry": position(ml.last_confirmed()),
        "state": if ml.terminated().is_some() { "Terminated" } else { "LedgerOpened" },
        "ledgers": ledgers.iter().map(|l| serde_json::json!({
            "ledgerId": l.ledger_id,
            "entries": l.entries,
            "size": l.size_bytes,
            "offloaded": false,
        })).collect::<Vec<_>>(),
        "cursors": cursors,
        // Ours: the topic's delayed-delivery index (`topic::delayed`).
        "delayedIndex": {
            "waiting": topic.delayed_index().len(),
            "inMemory": topic.delayed_index().in_memory(),
            "buckets": topic.delayed_index().buckets(),
        },
        "compactedLedger": ml.compacted().await.map(|c| serde_json::json!({
            "ledgerId": c.ledger_id,
            "entries": c.entries,
            "horizon": position(c.horizon),
        })),
    }))
    .into_response())
}

/// Pulsar's `PartitionedTopicStats`: the sums over the partitions, and each
/// partition's stats under `partitions` (each asked of its owner through
/// this API).
async fn partitioned_stats(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = p.name()?;
    let (n, base) = partition_targets(&ctx, &name).await?;
    let http = reqwest::Client::new();
    let mut parts = serde_json::Map::new();
    let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
    const SUMMED: [&str; 9] = [
        "msgRateIn",
        "msgThroughputIn",
        "msgRateOut",
        "msgThroughputOut",
        "msgInCounter",
        "bytesInCounter",
        "msgOutCounter",
        "bytesOutCounter",
        "storageSize",
    ];
    for i in 0..n {
        let part = name.partition(i);
        let url = format!(
            "{}/admin/v2/persistent/{}/{}/{}/stats",
            base.trim_end_matches('/'),
            part.tenant,
            part.namespace,
            part.local
        );
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("stats of {part}: {e}")))?;
        if resp.status() == StatusCode::NOT_FOUND {
            continue; // never used yet
        }
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| fail(StatusCode::BAD_GATEWAY, format!("stats of {part}: {e}")))?;
        for k in SUMMED {
            *sums.entry(k).or_default() += v[k].as_f64().unwrap_or(0.0);
        }
        parts.insert(part.to_string(), v);
    }
    let mut out = serde_json::Map::new();
    for (k, v) in sums {
        let v = if k.ends_with("Counter") || k == "storageSize" {
            serde_json::json!(v as u64)
        } else {
            serde_json::json!(v)
        };
        out.insert(k.to_string(), v);
    }
    out.insert("metadata".into(), serde_json::json!({ "partitions": n }));
    out.insert("partitions".into(), serde_json::Value::Object(parts));
    Ok(Json(serde_json::Value::Object(out)).into_response())
}

/// Closes the topic here (storage first); its clients reconnect and load
/// it again — on this broker, which still owns the bundle.
async fn unload(State(ctx): Ctx, Path(p): Path<TopicPath>, uri: Uri) -> Answer {
    let name = p.name()?;
    here_or_redirect(&ctx, &name, &uri.to_string()).await?;
    let Some(topic) = ctx.topics.get(&name) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let (detached, closed) = topic.close().await;
    ctx.topics.remove(&topic);
    detached.disconnect(&Assigned::default());
    closed.map_err(|e| error(BrokerError::from(e)))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
