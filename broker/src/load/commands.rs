//! Work for a bundle's owner: unload (to a chosen broker) and split. Any
//! broker — the load manager, or the one an admin call reached — writes a
//! command key under the owner's prefix (on its own lease: a command whose
//! issuer died goes with it); the owner watches its prefix, executes each
//! command and deletes its key, which is how the issuer learns it is done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use magnetar_metadata::{EventKind, MetadataClient, Op, Txn};
use serde::{Deserialize, Serialize};

use crate::ownership::{assign, OwnerInfo};
use crate::topic::TopicRegistry;
use crate::{keys, BrokerError};

/// How long an issuer waits for the owner to carry a command out.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Unload `bundle` (`tenant/ns/0x.._0x..`) to `destination` (a broker
    /// id), or to the broker the assignment picks.
    Unload {
        bundle: String,
        destination: Option<String>,
    },
    /// Split `bundle` in two halves (both stay with the owner).
    Split { bundle: String },
}

impl Command {
    pub fn bundle(&self) -> &str {
        match self {
            Command::Unload { bundle, .. } | Command::Split { bundle } => bundle,
        }
    }
}

pub use crate::ownership::parse_bundle;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Hands `cmd` to the broker `owner` and waits until it was carried out.
pub async fn submit(
    md: &MetadataClient,
    issuer_lease: u64,
    issuer: &str,
    owner: &str,
    cmd: &Command,
) -> Result<(), BrokerError> {
    let key = format!(
        "{}{}-{}-{}",
        keys::commands_of(owner),
        issuer.replace('/', "_"),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let value = serde_json::to_vec(cmd).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    let mut done = md.watch(&key, 0);
    md.txn(Txn {
        compares: vec![],
        success: vec![Op::Put {
            key: key.clone(),
            value,
            lease: Some(issuer_lease),
        }],
        failure: vec![],
    })
    .await?;
    let wait = async {
        while let Some(ev) = done.next().await {
            if ev.kind == EventKind::Delete {
                return true;
            }
        }
        false
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, wait).await {
        Ok(true) => Ok(()),
        _ => {
            let _ = md.delete(&key).await;
            Err(BrokerError::NotServedHere(format!(
                "broker {owner} did not carry out {cmd:?} in time"
            )))
        }
    }
}

/// Carries out one command addressed to us.
pub async fn execute(registry: &TopicRegistry, cmd: &Command) -> Result<(), BrokerError> {
    let own = &registry.ownership;
    match cmd {
        Command::Unload {
            bundle,
            destination,
        } => {
            let key = parse_bundle(bundle)?;
            let me = own.me().broker_id;
            let (brokers, owned) = own.cluster().await?;
            let next = match destination {
                Some(d) => brokers.iter().find(|b| &b.info.broker_id == d).cloned(),
                None => assign::choose(bundle, &brokers, &owned, Some(&me)).cloned(),
            };
            registry.unload_bundle(&key, next).await.map(|_| ())
        }
        Command::Split { bundle } => {
            let key = parse_bundle(bundle)?;
            own.split(&key).await.map(|_| ())
        }
    }
}

/// Watches our command prefix and carries out each command (those left
/// from before we started too), deleting its key when done.
pub async fn run_executor(registry: Arc<TopicRegistry>, md: MetadataClient) {
    let me = registry.ownership.me().broker_id;
    let prefix = keys::commands_of(&me);
    loop {
        let mut events = md.watch(&prefix, 0);
        match md.range(&prefix, 0).await {
            Ok(kvs) => {
                for kv in kvs {
                    run_one(&registry, &md, &kv.key, &kv.value).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading pending commands failed"),
        }
        while let Some(ev) = events.next().await {
            if ev.kind == EventKind::Put {
                run_one(&registry, &md, &ev.kv.key, &ev.kv.value).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_one(registry: &TopicRegistry, md: &MetadataClient, key: &str, value: &[u8]) {
    match serde_json::from_slice::<Command>(value) {
        Ok(cmd) => {
            let res = execute(registry, &cmd).await;
            match &res {
                Ok(()) => tracing::info!(?cmd, "command carried out"),
                Err(e) => tracing::warn!(?cmd, error = %e, "command failed"),
            }
        }
        Err(e) => tracing::warn!(key, error = %e, "command does not parse; dropped"),
    }
    if let Err(e) = md.delete(key).await {
        tracing::warn!(key, error = %e, "could not delete a carried-out command");
    }
}

/// The owner of `bundle`, if any.
pub async fn owner_of(md: &MetadataClient, bundle: &str) -> Result<Option<OwnerInfo>, BrokerError> {
    Ok(md
        .get(&keys::owner(bundle))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

/// Unloads or splits `bundle` wherever it is owned: here directly, at
/// another broker through a command. `Ok(false)`: nobody owns it (nothing
/// to unload; a split of an unowned bundle is done here).
pub async fn on_owner(
    registry: &TopicRegistry,
    md: &MetadataClient,
    cmd: Command,
) -> Result<bool, BrokerError> {
    let own = &registry.ownership;
    let me = own.me().broker_id;
    let owner = owner_of(md, cmd.bundle()).await?;
    match owner {
        Some(o) if o.broker_id == me => execute(registry, &cmd).await.map(|()| true),
        Some(o) => {
            let lease = own.registration.lease_id();
            submit(md, lease, &me, &o.broker_id, &cmd)
                .await
                .map(|()| true)
        }
        None => Ok(false),
    }
}
