//! `magnetar admin`: operating a cluster — brokers, topics and bundles
//! through a broker's admin REST API (`--url`), the metadata and bookie
//! tiers through the metadata service (`--metadata`, `--tls-dir`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use magnetar_proto::tls::TlsMaterial;

/// Prints a line; a reader that went away (`| head`) ends the command
/// quietly instead of panicking on a broken pipe.
macro_rules! emit {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e.into());
        }
    }};
}

#[derive(Args)]
pub struct AdminArgs {
    /// Metadata endpoints, comma separated.
    #[arg(
        long,
        env = "MAGNETAR_METADATA",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    metadata: Vec<SocketAddr>,
    /// Directory with ca.pem, node.pem and node-key.pem signed by the cluster
    /// CA (for the metadata, bookies and ledgers commands).
    #[arg(long, env = "MAGNETAR_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// A broker's HTTP URL (for the brokers, topics, namespaces and bundles
    /// commands); any broker answers.
    #[arg(
        long,
        env = "MAGNETAR_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// The cluster's name (as the brokers are configured).
    #[arg(long, env = "MAGNETAR_CLUSTER", default_value = "magnetar")]
    cluster: String,
    /// Print the broker's JSON answers as they are instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// The metadata cluster.
    Metadata {
        #[command(subcommand)]
        cmd: MetadataCmd,
    },
    /// Registered bookies.
    Bookies {
        #[command(subcommand)]
        cmd: BookiesCmd,
    },
    /// Ledgers.
    Ledgers {
        #[command(subcommand)]
        cmd: LedgersCmd,
    },
    /// Brokers (admin REST API).
    Brokers {
        #[command(subcommand)]
        cmd: BrokersCmd,
    },
    /// Topics (admin REST API).
    Topics {
        #[command(subcommand)]
        cmd: TopicsCmd,
    },
    /// A topic's schema versions (admin REST API).
    Schemas {
        #[command(subcommand)]
        cmd: SchemasCmd,
    },
    /// Tenants (admin REST API).
    Tenants {
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
    /// Namespaces (admin REST API).
    Namespaces {
        #[command(subcommand)]
        cmd: NamespacesCmd,
    },
    /// Bundles of a namespace (admin REST API).
    Bundles {
        #[command(subcommand)]
        cmd: BundlesCmd,
    },
}

#[derive(Subcommand)]
enum BrokersCmd {
    /// The active brokers.
    List,
    /// A round trip through the broker the URL names.
    Health,
}

#[derive(Subcommand)]
enum TopicsCmd {
    /// The broker that serves a topic (assigning one if none does).
    Lookup { topic: String },
    /// The topics of a namespace (`tenant/ns`), partitions included.
    List { namespace: String },
    /// The partitioned topics of a namespace.
    ListPartitioned { namespace: String },
    /// Creates a topic; with `--partitions N` a partitioned one.
    Create {
        topic: String,
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Deletes a topic (a partitioned one with `--partitioned`); `--force`
    /// closes its clients.
    Delete {
        topic: String,
        #[arg(long)]
        partitioned: bool,
        #[arg(long)]
        force: bool,
    },
    /// Rates, counters, storage and subscriptions of a topic.
    Stats { topic: String },
    /// No more messages: later sends fail, consumers reach the end.
    Terminate { topic: String },
    /// Closes the topic on its broker; clients reconnect.
    Unload { topic: String },
    /// A topic's partition count (0: not partitioned).
    Partitions { topic: String },
    /// Raises a partitioned topic's partition count.
    UpdatePartitions { topic: String, partitions: u32 },
    /// A topic-level policy (overrides the namespace's).
    GetPolicy { topic: String, policy: Policy },
    /// Sets a topic-level policy; VALUE is the JSON the REST path takes.
    SetPolicy {
        topic: String,
        policy: Policy,
        value: String,
    },
    /// Removes a topic-level policy (the namespace's applies again).
    RemovePolicy { topic: String, policy: Policy },
}

#[derive(Subcommand)]
enum SchemasCmd {
    /// The latest version (or `--version N`).
    Get {
        topic: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Adds a version: `--type JSON|AVRO|PROTOBUF|STRING|…` and the
    /// definition (a file with `@path`).
    Upload {
        topic: String,
        #[arg(long = "type")]
        schema_type: String,
        definition: String,
    },
    /// Deletes every version.
    Delete { topic: String },
}

#[derive(Subcommand)]
enum TenantsCmd {
    List,
    Get {
        tenant: String,
    },
    Create {
        tenant: String,
    },
    /// Refused while the tenant has namespaces.
    Delete {
        tenant: String,
    },
}

#[derive(Subcommand)]
enum NamespacesCmd {
    /// A namespace's bundle boundaries.
    Bundles { namespace: String },
    /// The namespaces of a tenant.
    List { tenant: String },
    /// Creates `tenant/ns`, with `--bundles N` bundles.
    Create {
        namespace: String,
        #[arg(long)]
        bundles: Option<usize>,
    },
    /// Refused while the namespace has topics.
    Delete { namespace: String },
    /// Every policy of a namespace (JSON).
    Policies { namespace: String },
    /// Sets a namespace policy; VALUE is the JSON the REST path takes, e.g.
    /// `retention '{"retentionTimeInMinutes":60,"retentionSizeInMB":-1}'`,
    /// `message-ttl 3600`, `deduplication true`,
    /// `backlog-quota '{"limitSize":1073741824,"policy":"producer_request_hold"}'`,
    /// `dead-letter '{"maxRedeliverCount":5}'`,
    /// `auto-topic-creation '{"allowAutoTopicCreation":false}'`.
    SetPolicy {
        namespace: String,
        policy: Policy,
        value: String,
    },
    /// Removes a namespace policy (the default applies again).
    RemovePolicy { namespace: String, policy: Policy },
}

/// The policies `set-policy` knows, by their REST path segments.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Policy {
    Retention,
    MessageTtl,
    Deduplication,
    BacklogQuota,
    DeadLetter,
    RedeliveryBackoff,
    AutoTopicCreation,
}

impl Policy {
    /// (path for GET, path for POST/DELETE) under a namespace or a topic.
    fn paths(self, topic: bool) -> anyhow::Result<(&'static str, &'static str)> {
        Ok(match (self, topic) {
            (Policy::Retention, _) => ("retention", "retention"),
            (Policy::MessageTtl, _) => ("messageTTL", "messageTTL"),
            (Policy::Deduplication, false) => ("deduplication", "deduplication"),
            (Policy::Deduplication, true) => ("deduplicationEnabled", "deduplicationEnabled"),
            (Policy::BacklogQuota, _) => ("backlogQuotaMap", "backlogQuota"),
            (Policy::DeadLetter, _) => ("deadLetterPolicy", "deadLetterPolicy"),
            (Policy::RedeliveryBackoff, _) => ("redeliveryBackoff", "redeliveryBackoff"),
            (Policy::AutoTopicCreation, false) => ("autoTopicCreation", "autoTopicCreation"),
            (Policy::AutoTopicCreation, true) => {
                anyhow::bail!("auto-topic-creation is a namespace policy")
            }
        })
    }
}

#[derive(Subcommand)]
enum BundlesCmd {
    /// Moves a bundle off its owner (to `--destination`, a broker id, or to
    /// the least loaded broker): its clients reconnect there.
    Unload {
        namespace: String,
        range: String,
        #[arg(long)]
        destination: Option<String>,
    },
    /// Splits a bundle in two halves.
    Split { namespace: String, range: String },
    /// Every owned bundle and its owner (from the metadata service: needs
    /// --metadata and --tls-dir).
    Owners,
}

#[derive(Subcommand)]
enum LedgersCmd {
    /// Ledgers with entries on bookies that are not registered now (the
    /// auditor copies them elsewhere once the grace period passed).
    UnderReplicated,
}

#[derive(Subcommand)]
enum MetadataCmd {
    /// A line per endpoint: its id, role, leader, term and progress.
    Status,
    /// Adds a running node (started with the cluster's initial members,
    /// which do not include it): learner first, voter once caught up.
    AddNode {
        #[arg(long)]
        id: u64,
        /// The address peers and clients reach it at.
        #[arg(long)]
        addr: String,
    },
    /// Removes a voter; removing the leader makes it step down.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum BookiesCmd {
    /// A line per registered bookie: address, rack, writable.
    List,
    /// Retires a bookie that is stopped for good or lost its disk: copies
    /// every entry it held (closed ledgers at once, open ones once their
    /// writers close them), then frees its address for a new bookie.
    Decommission {
        /// The bookie's address as ledgers name it (`host:port`).
        addr: String,
        /// Give up after this many seconds (run it again to go on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

/// `GET` or `PUT` `path` on the broker; the body of a success, the
/// broker's reason otherwise.
async fn http(args: &AdminArgs, put: bool, path: &str) -> anyhow::Result<String> {
    call(args, if put { "PUT" } else { "GET" }, path, None).await
}

/// `method` on `path` with a JSON `body`; the body of a success, the
/// broker's reason otherwise.
async fn call(
    args: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<String> {
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut req = client.request(method, &url);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.with_context(|| format!("calling {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(String::from))
            .unwrap_or(body);
        anyhow::bail!("{status}: {reason}");
    }
    Ok(body)
}

/// A topic's REST path: `persistent/tenant/ns/topic`.
fn topic_path(topic: &str) -> anyhow::Result<String> {
    let t = magnetar_proto::TopicName::parse(topic)?;
    let domain = if t.persistent {
        "persistent"
    } else {
        "non-persistent"
    };
    Ok(format!("{domain}/{}/{}/{}", t.tenant, t.namespace, t.local))
}

async fn run_http(args: &AdminArgs) -> anyhow::Result<bool> {
    match &args.cmd {
        AdminCmd::Brokers {
            cmd: BrokersCmd::List,
        } => {
            let body = http(args, false, &format!("/admin/v2/brokers/{}", args.cluster)).await?;
            for b in serde_json::from_str::<Vec<String>>(&body)? {
                emit!("{b}");
            }
        }
        AdminCmd::Brokers {
            cmd: BrokersCmd::Health,
        } => emit!("{}", http(args, false, "/admin/v2/brokers/health").await?),
        AdminCmd::Bundles {
            cmd:
                BundlesCmd::Unload {
                    namespace,
                    range,
                    destination,
                },
        } => {
            let q = destination
                .as_ref()
                .map(|d| format!("?destinationBroker={d}"))
                .unwrap_or_default();
            http(
                args,
                true,
                &format!("/admin/v2/namespaces/{namespace}/{range}/unload{q}"),
            )
            .await?;
            emit!("unloaded {namespace}/{range}");
        }
        AdminCmd::Bundles {
            cmd: BundlesCmd::Split { namespace, range },
        } => {
            http(
                args,
                true,
                &format!("/admin/v2/namespaces/{namespace}/{range}/split"),
            )
            .await?;
            emit!("split {namespace}/{range}");
        }
        AdminCmd::Tenants { cmd } => tenants(args, cmd).await?,
        AdminCmd::Schemas { cmd } => schemas(args, cmd).await?,
        AdminCmd::Namespaces { cmd } => namespaces(args, cmd).await?,
        AdminCmd::Topics { cmd } => topics(args, cmd).await?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Prints a JSON answer: as it is with `--json`, else a list a line per
/// item, an object a line per field.
fn show(args: &AdminArgs, body: &str) -> anyhow::Result<()> {
    if args.json || body.trim().is_empty() {
        if !body.trim().is_empty() {
            emit!("{body}");
        }
        return Ok(());
    }
    match serde_json::from_str::<serde_json::Value>(body)? {
        serde_json::Value::Array(items) => {
            for i in items {
                match i {
                    serde_json::Value::String(s) => emit!("{s}"),
                    other => emit!("{other}"),
                }
            }
        }
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                emit!("{k:<24} {v}");
            }
        }
        other => emit!("{other}"),
    }
    Ok(())
}

async fn schemas(args: &AdminArgs, cmd: &SchemasCmd) -> anyhow::Result<()> {
    let base = |topic: &str| -> anyhow::Result<String> {
        let t = magnetar_proto::TopicName::parse(topic)?;
        Ok(format!(
            "/admin/v2/schemas/{}/{}/{}",
            t.tenant, t.namespace, t.local
        ))
    };
    match cmd {
        SchemasCmd::Get { topic, version } => {
            let path = match version {
                Some(v) => format!("{}/schema/{v}", base(topic)?),
                None => format!("{}/schema", base(topic)?),
            };
            show(args, &call(args, "GET", &path, None).await?)?
        }
        SchemasCmd::Upload {
            topic,
            schema_type,
            definition,
        } => {
            let def = match definition.strip_prefix('@') {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
                }
                None => definition.clone(),
            };
            let body = serde_json::json!({"type": schema_type, "schema": def, "properties": {}});
            let answer = call(
                args,
                "POST",
                &format!("{}/schema", base(topic)?),
                Some(body.to_string()),
            )
            .await?;
            show(args, &answer)?;
        }
        SchemasCmd::Delete { topic } => {
            call(args, "DELETE", &format!("{}/schema", base(topic)?), None).await?;
            emit!("deleted the schemas of {topic}");
        }
    }
    Ok(())
}

async fn tenants(args: &AdminArgs, cmd: &TenantsCmd) -> anyhow::Result<()> {
    let b = "/admin/v2/tenants";
    match cmd {
        TenantsCmd::List => show(args, &call(args, "GET", b, None).await?)?,
        TenantsCmd::Get { tenant } => show(
            args,
            &call(args, "GET", &format!("{b}/{tenant}"), None).await?,
        )?,
        TenantsCmd::Create { tenant } => {
            call(args, "PUT", &format!("{b}/{tenant}"), None).await?;
            emit!("created tenant {tenant}");
        }
        TenantsCmd::Delete { tenant } => {
            call(args, "DELETE", &format!("{b}/{tenant}"), None).await?;
            emit!("deleted tenant {tenant}");
        }
    }
    Ok(())
}

async fn namespaces(args: &AdminArgs, cmd: &NamespacesCmd) -> anyhow::Result<()> {
    let b = "/admin/v2/namespaces";
    match cmd {
        NamespacesCmd::Bundles { namespace } => {
            let body = http(
                args,
                false,
                &format!("/admin/v2/namespaces/{namespace}/bundles"),
            )
            .await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let b: Vec<&str> = v["boundaries"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            for w in b.windows(2) {
                emit!("{}_{}", w[0], w[1]);
            }
        }
        NamespacesCmd::List { tenant } => show(
            args,
            &call(args, "GET", &format!("{b}/{tenant}"), None).await?,
        )?,
        NamespacesCmd::Create { namespace, bundles } => {
            let body = bundles.map(|n| format!(r#"{{"bundles":{{"numBundles":{n}}}}}"#));
            call(args, "PUT", &format!("{b}/{namespace}"), body).await?;
            emit!("created namespace {namespace}");
        }
        NamespacesCmd::Delete { namespace } => {
            call(args, "DELETE", &format!("{b}/{namespace}"), None).await?;
            emit!("deleted namespace {namespace}");
        }
        NamespacesCmd::Policies { namespace } => show(
            args,
            &call(args, "GET", &format!("{b}/{namespace}"), None).await?,
        )?,
        NamespacesCmd::SetPolicy {
            namespace,
            policy,
            value,
        } => {
            let (_, set) = policy.paths(false)?;
            call(
                args,
                "POST",
                &format!("{b}/{namespace}/{set}"),
                Some(value.clone()),
            )
            .await?;
            emit!("set {set} of {namespace}");
        }
        NamespacesCmd::RemovePolicy { namespace, policy } => {
            let (_, set) = policy.paths(false)?;
            call(args, "DELETE", &format!("{b}/{namespace}/{set}"), None).await?;
            emit!("removed {set} of {namespace}");
        }
    }
    Ok(())
}

async fn topics(args: &AdminArgs, cmd: &TopicsCmd) -> anyhow::Result<()> {
    let t =
        |topic: &str| -> anyhow::Result<String> { Ok(format!("/admin/v2/{}", topic_path(topic)?)) };
    match cmd {
        TopicsCmd::Lookup { topic } => {
            let body = http(
                args,
                false,
                &format!("/lookup/v2/topic/{}", topic_path(topic)?),
            )
            .await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            emit!(
                "{} {}",
                v["brokerUrl"].as_str().unwrap_or("?"),
                v["httpUrl"].as_str().unwrap_or("-")
            );
        }
        TopicsCmd::List { namespace } => show(
            args,
            &call(
                args,
                "GET",
                &format!("/admin/v2/persistent/{namespace}"),
                None,
            )
            .await?,
        )?,
        TopicsCmd::ListPartitioned { namespace } => show(
            args,
            &call(
                args,
                "GET",
                &format!("/admin/v2/persistent/{namespace}/partitioned"),
                None,
            )
            .await?,
        )?,
        TopicsCmd::Create { topic, partitions } => {
            match partitions {
                Some(n) => {
                    call(
                        args,
                        "PUT",
                        &format!("{}/partitions", t(topic)?),
                        Some(n.to_string()),
                    )
                    .await?
                }
                None => call(args, "PUT", &t(topic)?, None).await?,
            };
            emit!("created {topic}");
        }
        TopicsCmd::Delete {
            topic,
            partitioned,
            force,
        } => {
            let path = if *partitioned {
                format!("{}/partitions?force={force}", t(topic)?)
            } else {
                format!("{}?force={force}", t(topic)?)
            };
            call(args, "DELETE", &path, None).await?;
            emit!("deleted {topic}");
        }
        TopicsCmd::Stats { topic } => show(
            args,
            &call(args, "GET", &format!("{}/stats", t(topic)?), None).await?,
        )?,
        TopicsCmd::Terminate { topic } => {
            let id = call(args, "POST", &format!("{}/terminate", t(topic)?), None).await?;
            show(args, &id)?;
        }
        TopicsCmd::Unload { topic } => {
            call(args, "PUT", &format!("{}/unload", t(topic)?), None).await?;
            emit!("unloaded {topic}");
        }
        TopicsCmd::Partitions { topic } => show(
            args,
            &call(args, "GET", &format!("{}/partitions", t(topic)?), None).await?,
        )?,
        TopicsCmd::UpdatePartitions { topic, partitions } => {
            call(
                args,
                "POST",
                &format!("{}/partitions", t(topic)?),
                Some(partitions.to_string()),
            )
            .await?;
            emit!("{topic} has {partitions} partitions");
        }
        TopicsCmd::GetPolicy { topic, policy } => {
            let (get, _) = policy.paths(true)?;
            show(
                args,
                &call(args, "GET", &format!("{}/{get}", t(topic)?), None).await?,
            )?
        }
        TopicsCmd::SetPolicy {
            topic,
            policy,
            value,
        } => {
            let (_, set) = policy.paths(true)?;
            call(
                args,
                "POST",
                &format!("{}/{set}", t(topic)?),
                Some(value.clone()),
            )
            .await?;
            emit!("set {set} of {topic}");
        }
        TopicsCmd::RemovePolicy { topic, policy } => {
            let (_, set) = policy.paths(true)?;
            call(args, "DELETE", &format!("{}/{set}", t(topic)?), None).await?;
            emit!("removed {set} of {topic}");
        }
    }
    Ok(())
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if run_http(&args).await? {
        return Ok(());
    }
    let Some(tls_dir) = &args.tls_dir else {
        anyhow::bail!("this command talks to the metadata service: give --tls-dir");
    };
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(tls_dir))
        .with_context(|| format!("loading certificates from {}", tls_dir.display()))?;
    let client = crate::metadata_client(&tls, args.metadata.clone())?;
    match args.cmd {
        AdminCmd::Metadata {
            cmd: MetadataCmd::Status,
        } => {
            let mut reachable = 0;
            for addr in &args.metadata {
                match client.status_of(*addr).await {
                    Ok(s) => {
                        reachable += 1;
                        emit!(
                            "node {} {addr} state={} leader={} term={} revision={} applied={} voters={:?}",
                            s.node_id,
                            s.state,
                            s.leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
                            s.term,
                            s.revision,
                            s.last_applied,
                            s.voters
                        );
                    }
                    Err(e) => emit!("node ? {addr} unreachable: {e}"),
                }
            }
            if reachable == 0 {
                anyhow::bail!("no metadata node answered");
            }
        }
        AdminCmd::Metadata {
            cmd: MetadataCmd::AddNode { id, addr },
        } => {
            client
                .add_node(id, &addr)
                .await
                .with_context(|| format!("adding node {id} at {addr}"))?;
            emit!("node {id} at {addr} is a voter");
        }
        AdminCmd::Metadata {
            cmd: MetadataCmd::RemoveNode { id },
        } => {
            client
                .remove_node(id)
                .await
                .with_context(|| format!("removing node {id}"))?;
            emit!("node {id} removed");
        }
        AdminCmd::Ledgers {
            cmd: LedgersCmd::UnderReplicated,
        } => {
            let list = magnetar_bookie::auditor::under_replicated(&client).await?;
            if list.is_empty() {
                emit!("no under-replicated ledgers");
            }
            for u in list {
                emit!(
                    "ledger {} state={:?} missing={}",
                    u.ledger_id,
                    u.state,
                    u.missing.join(",")
                );
            }
        }
        AdminCmd::Bundles {
            cmd: BundlesCmd::Owners,
        } => {
            for kv in client.range("/ownership/", 0).await? {
                let owner = serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .ok()
                    .and_then(|v| v["broker_id"].as_str().map(String::from))
                    .unwrap_or_else(|| "?".into());
                emit!(
                    "{} {owner} epoch={}",
                    kv.key.trim_start_matches("/ownership/"),
                    kv.create_revision
                );
            }
        }
        AdminCmd::Brokers { .. }
        | AdminCmd::Tenants { .. }
        | AdminCmd::Schemas { .. }
        | AdminCmd::Topics { .. }
        | AdminCmd::Namespaces { .. }
        | AdminCmd::Bundles { .. } => {}
        AdminCmd::Bookies {
            cmd: BookiesCmd::List,
        } => {
            let bookies = client
                .range(magnetar_bookie::registry::BOOKIES_PREFIX, 0)
                .await?;
            for kv in bookies {
                match serde_json::from_slice::<magnetar_bookie::registry::BookieInfo>(&kv.value) {
                    Ok(b) => emit!(
                        "{} rack={} {}",
                        b.addr,
                        b.rack.as_deref().unwrap_or("-"),
                        if b.writable { "writable" } else { "read-only" }
                    ),
                    Err(e) => emit!("{} unreadable registration: {e}", kv.key),
                }
            }
        }
        AdminCmd::Bookies {
            cmd: BookiesCmd::Decommission { addr, timeout_secs },
        } => {
            let mut last = None;
            magnetar_bookie::auditor::decommission(
                &client,
                &addr,
                std::time::Duration::from_secs(timeout_secs),
                |n, open| {
                    if last != Some((n, open)) {
                        last = Some((n, open));
                        eprintln!(
                            "{n} ledgers hold entries on {addr} ({open} open: copied once their \
                             writers close them, at a roll-over or when their bundles are unloaded)"
                        );
                    }
                },
            )
            .await
            .with_context(|| format!("decommissioning {addr}"))?;
            emit!("{addr} decommissioned: no ledger names it; its address is free");
        }
    }
    Ok(())
}
