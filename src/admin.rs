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
}

#[derive(Subcommand)]
enum NamespacesCmd {
    /// A namespace's bundle boundaries.
    Bundles { namespace: String },
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
}

/// `GET` or `PUT` `path` on the broker; the body of a success, the
/// broker's reason otherwise.
async fn http(args: &AdminArgs, put: bool, path: &str) -> anyhow::Result<String> {
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let req = if put {
        client.put(&url)
    } else {
        client.get(&url)
    };
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
        AdminCmd::Topics {
            cmd: TopicsCmd::Lookup { topic },
        } => {
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
        AdminCmd::Namespaces {
            cmd: NamespacesCmd::Bundles { namespace },
        } => {
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
        _ => return Ok(false),
    }
    Ok(true)
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
    }
    Ok(())
}
