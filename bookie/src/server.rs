//! The bookie process: the journal behind the ledger protocol over QUIC, and
//! a registration in the metadata service (an ephemeral key on a lease).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use magnetar_metadata::{Lease, MetadataClient};
use magnetar_proto::ledger::{BookieErrorCode, BookieRequest, BookieResponse, MAX_ENTRY_BYTES};
use magnetar_proto::rpc::{respond, RpcError};
use magnetar_proto::tls::TlsMaterial;
use serde::{Deserialize, Serialize};

use crate::journal::{Journal, JournalError};

/// Where bookies register; the key is `BOOKIES_PREFIX + <address>`.
pub const BOOKIES_PREFIX: &str = "/bookies/available/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookieInfo {
    pub addr: String,
    pub rack: Option<String>,
    pub writable: bool,
}

/// A bookie's configuration: what `magnetar bookie --config` reads (TOML,
/// unknown keys refused) apart from its `metadata` and `[tls]` entries.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookieConfig {
    pub listen: SocketAddr,
    /// Address writers and readers use (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Rack or zone; placement spreads an ensemble across them.
    #[serde(default)]
    pub rack: Option<String>,
    /// TTL of the registration lease: a bookie that stops renewing it drops
    /// out of placement after this long.
    #[serde(default = "default_registration_ttl_ms")]
    pub registration_ttl_ms: u64,
}

fn default_registration_ttl_ms() -> u64 {
    10_000
}

#[derive(Debug, thiserror::Error)]
pub enum BookieError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Transport(#[from] RpcError),
    #[error("registration: {0}")]
    Registration(String),
}

pub struct Bookie {
    pub journal: Journal,
    endpoint: quinn::Endpoint,
    addr: String,
    lease: Mutex<Option<Lease>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bookie {
    pub async fn start(
        cfg: BookieConfig,
        tls: &TlsMaterial,
        metadata: &MetadataClient,
    ) -> Result<Arc<Bookie>, BookieError> {
        let journal = Journal::open(&cfg.data_dir.join("journal"))?;
        let endpoint = magnetar_proto::rpc::server_endpoint(cfg.listen, tls).await?;
        let local = endpoint
            .local_addr()
            .map_err(|e| RpcError::Tls(e.to_string()))?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
        let served = journal.clone();
        let task = tokio::spawn(magnetar_proto::rpc::serve(
            endpoint.clone(),
            "bookie",
            move |req, send, _conn| {
                let journal = served.clone();
                async move { respond(send, &handle(&journal, req).await).await }
            },
        ));
        let lease = metadata
            .grant_lease(cfg.registration_ttl_ms)
            .await
            .map_err(|e| BookieError::Registration(e.to_string()))?;
        let info = BookieInfo {
            addr: addr.clone(),
            rack: cfg.rack.clone(),
            writable: true,
        };
        let value =
            serde_json::to_vec(&info).map_err(|e| BookieError::Registration(e.to_string()))?;
        let key = format!("{BOOKIES_PREFIX}{addr}");
        // A previous incarnation's key may linger until its lease expires: replace it.
        metadata
            .txn(magnetar_metadata::Txn {
                compares: vec![],
                success: vec![magnetar_metadata::Op::Put {
                    key,
                    value,
                    lease: Some(lease.id),
                }],
                failure: vec![],
            })
            .await
            .map_err(|e| BookieError::Registration(e.to_string()))?;
        tracing::info!(addr = %addr, "bookie started and registered");
        Ok(Arc::new(Bookie {
            journal,
            endpoint,
            addr,
            lease: Mutex::new(Some(lease)),
            task,
        }))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn shutdown(&self) {
        self.task.abort();
        self.endpoint.close(0u32.into(), b"shutdown");
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
    }
}

pub async fn handle(journal: &Journal, req: BookieRequest) -> BookieResponse {
    let res = match req {
        BookieRequest::Add {
            ledger_id,
            entry_id,
            master_key,
            lac,
            payload,
            digest,
            recovery,
        } => {
            if payload.len() > MAX_ENTRY_BYTES {
                Err(BookieErrorCode::TooLarge)
            } else {
                journal
                    .add(
                        ledger_id, entry_id, lac, master_key, payload, digest, recovery,
                    )
                    .await
                    .map(|_| BookieResponse::Added {
                        ledger_id,
                        entry_id,
                    })
            }
        }
        BookieRequest::Read {
            ledger_id,
            entry_id,
        } => journal
            .read(ledger_id, entry_id)
            .map(|e| BookieResponse::Entry {
                ledger_id,
                entry_id,
                lac: e.lac,
                payload: e.payload,
                digest: e.digest,
            }),
        BookieRequest::ReadLac { ledger_id } => {
            journal
                .lac(ledger_id)
                .map(|(lac, last_entry)| BookieResponse::Lac {
                    ledger_id,
                    lac,
                    last_entry,
                })
        }
        BookieRequest::Fence {
            ledger_id,
            master_key,
        } => match journal.fence(ledger_id, master_key).await {
            Ok(_) => journal
                .lac(ledger_id)
                .map(|(lac, last_entry)| BookieResponse::Lac {
                    ledger_id,
                    lac,
                    last_entry,
                }),
            Err(e) => Err(e),
        },
    };
    res.unwrap_or_else(BookieResponse::Error)
}
