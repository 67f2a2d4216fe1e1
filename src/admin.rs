//! `magnetar admin`: operating a cluster through its metadata service.

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
    /// Directory with ca.pem, node.pem and node-key.pem signed by the cluster CA.
    #[arg(long, env = "MAGNETAR_TLS_DIR")]
    tls_dir: PathBuf,
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

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(&args.tls_dir))
        .with_context(|| format!("loading certificates from {}", args.tls_dir.display()))?;
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
        AdminCmd::Bookies {
            cmd: BookiesCmd::List,
        } => {
            let bookies = client
                .range(magnetar_bookie::server::BOOKIES_PREFIX, 0)
                .await?;
            for kv in bookies {
                match serde_json::from_slice::<magnetar_bookie::server::BookieInfo>(&kv.value) {
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
