//! A metadata node: Raft, its storage, the lease clock, and the QUIC API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_proto::metadata_api::{
    self as api, MetaError, MetaRequest, MetaResponse, RaftKind, Status,
};
use magnetar_proto::rpc::{respond, serve, write_msg, RpcClient, RpcError};
use magnetar_proto::tls::TlsMaterial;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use tokio::sync::broadcast::error::RecvError;

use crate::lease::LeaseTracker;
use crate::network::Network;
use crate::state::{Command, CommandResult};
use crate::store::{LogStore, SmShared, StateMachine};
use crate::TypeConfig;

#[derive(Debug, Clone)]
pub struct MetadataConfig {
    pub node_id: u64,
    pub listen: SocketAddr,
    /// Address peers and clients use to reach this node (default: `listen`).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// The initial voters `(id, address)`; empty means "just this node".
    pub initial_members: Vec<(u64, String)>,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log behind it) after this many entries.
    pub snapshot_every_logs: u64,
    pub lease_check_interval_ms: u64,
}

impl MetadataConfig {
    pub fn new(node_id: u64, listen: SocketAddr, data_dir: PathBuf) -> MetadataConfig {
        MetadataConfig {
            node_id,
            listen,
            advertise: None,
            data_dir,
            initial_members: Vec::new(),
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every_logs: 10_000,
            lease_check_interval_ms: 100,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("transport: {0}")]
    Transport(#[from] RpcError),
}

pub struct MetadataNode {
    pub node_id: u64,
    pub raft: Raft<TypeConfig>,
    sm: Arc<SmShared>,
    endpoint: quinn::Endpoint,
    leases: Mutex<LeaseTracker>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl MetadataNode {
    pub async fn start(
        cfg: MetadataConfig,
        tls: &TlsMaterial,
    ) -> Result<Arc<MetadataNode>, StartError> {
        let log = LogStore::open(&cfg.data_dir.join("raft"))
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let sm = StateMachine::open(&cfg.data_dir.join("raft"))
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let shared = sm.shared.clone();
        let endpoint = magnetar_proto::rpc::server_endpoint(cfg.listen, tls).await?;
        let local = endpoint
            .local_addr()
            .map_err(|e| StartError::Transport(RpcError::Tls(e.to_string())))?;
        let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
        let raft_cfg = openraft::Config {
            cluster_name: "magnetar".into(),
            heartbeat_interval: cfg.heartbeat_interval_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_logs),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let network = Network {
            rpc: RpcClient::new(endpoint.clone()),
        };
        let raft = Raft::new(cfg.node_id, Arc::new(raft_cfg), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let members = if cfg.initial_members.is_empty() {
            vec![(cfg.node_id, advertise.clone())]
        } else {
            cfg.initial_members.clone()
        };
        let first = members.iter().map(|(id, _)| *id).min();
        if !raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
            && first == Some(cfg.node_id)
        {
            let map: BTreeMap<u64, BasicNode> = members
                .into_iter()
                .map(|(id, addr)| (id, BasicNode { addr }))
                .collect();
            raft.initialize(map)
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }
        let node = Arc::new(MetadataNode {
            node_id: cfg.node_id,
            raft,
            sm: shared,
            endpoint: endpoint.clone(),
            leases: Mutex::default(),
            tasks: Mutex::default(),
        });
        let served = node.clone();
        let accept = tokio::spawn(serve(endpoint, "metadata", move |req, send| {
            let node = served.clone();
            async move { node.serve_request(req, send).await }
        }));
        let expiry = tokio::spawn(lease_loop(
            node.clone(),
            Duration::from_millis(cfg.lease_check_interval_ms),
        ));
        node.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([accept, expiry]);
        tracing::info!(node_id = cfg.node_id, addr = %local, "metadata node started");
        Ok(node)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into())
    }

    /// Waits until some node leads (standalone: this one).
    pub async fn wait_for_leader(&self, timeout: Duration) -> bool {
        let mut m = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if m.borrow().current_leader.is_some() {
                return true;
            }
            if tokio::time::timeout_at(deadline, m.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    pub async fn shutdown(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let _ = self.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutdown");
        // Let peers learn of the close before the socket goes away.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    fn not_leader(&self) -> MetaResponse {
        MetaResponse::Error(MetaError::NotLeader {
            leader: self.leader_addr(),
        })
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, MetaResponse> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(self.not_leader())
            }
            Err(e) => Err(MetaResponse::Error(MetaError::Internal(e.to_string()))),
        }
    }

    async fn linearizable(&self) -> Result<(), MetaResponse> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(_)) => Err(self.not_leader()),
            Err(e) => Err(MetaResponse::Error(MetaError::Internal(e.to_string()))),
        }
    }

    async fn serve_request(&self, req: MetaRequest, mut send: quinn::SendStream) {
        match req {
            MetaRequest::Watch {
                prefix,
                start_revision,
            } => {
                if self.watch(prefix, start_revision, &mut send).await.is_ok() {
                    let _ = send.finish();
                }
            }
            req => respond(send, &self.handle(req).await).await,
        }
    }

    async fn handle(&self, req: MetaRequest) -> MetaResponse {
        match self.handle_inner(req).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn handle_inner(&self, req: MetaRequest) -> Result<MetaResponse, MetaResponse> {
        let limit = |what: String| MetaResponse::Error(MetaError::Limit(what));
        Ok(match req {
            MetaRequest::Get { key } => {
                self.linearizable().await?;
                MetaResponse::Get(self.sm.read(|kv| kv.get(&key).cloned()))
            }
            MetaRequest::Range { prefix, limit: n } => {
                self.linearizable().await?;
                let n = if n == 0 { usize::MAX } else { n as usize };
                MetaResponse::Range(self.sm.read(|kv| kv.range(&prefix, n)))
            }
            MetaRequest::Txn(txn) => {
                let ops = txn.success.len() + txn.failure.len() + txn.compares.len();
                if ops > api::MAX_TXN_OPS {
                    return Err(limit(format!(
                        "{ops} operations in one transaction; the limit is {}",
                        api::MAX_TXN_OPS
                    )));
                }
                for op in txn.success.iter().chain(&txn.failure) {
                    let (key, value) = match op {
                        api::Op::Put { key, value, .. } => (key, value.len()),
                        api::Op::Delete { key } | api::Op::Get { key } => (key, 0),
                    };
                    if key.len() > api::MAX_KEY_BYTES || value > api::MAX_VALUE_BYTES {
                        return Err(limit(format!(
                            "key {} bytes / value {value} bytes; limits are {} / {}",
                            key.len(),
                            api::MAX_KEY_BYTES,
                            api::MAX_VALUE_BYTES
                        )));
                    }
                }
                match self.write(Command::Txn(txn)).await? {
                    CommandResult::Txn(r) => MetaResponse::Txn(r),
                    other => MetaResponse::Error(MetaError::Internal(format!(
                        "unexpected result {other:?}"
                    ))),
                }
            }
            MetaRequest::LeaseGrant { ttl_ms } => {
                if !(100..=3_600_000).contains(&ttl_ms) {
                    return Err(limit(format!(
                        "lease TTL {ttl_ms} ms is outside 100..=3600000"
                    )));
                }
                match self.write(Command::LeaseGrant { ttl_ms }).await? {
                    CommandResult::Lease { id, ttl_ms } => {
                        self.leases
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .keep_alive(id, ttl_ms, Instant::now());
                        MetaResponse::Lease { id, ttl_ms }
                    }
                    other => MetaResponse::Error(MetaError::Internal(format!(
                        "unexpected result {other:?}"
                    ))),
                }
            }
            MetaRequest::LeaseKeepAlive { id } => {
                if !self.is_leader() {
                    return Err(self.not_leader());
                }
                match self.sm.read(|kv| kv.leases.get(&id).map(|l| l.ttl_ms)) {
                    Some(ttl_ms) => {
                        self.leases
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .keep_alive(id, ttl_ms, Instant::now());
                        MetaResponse::Lease { id, ttl_ms }
                    }
                    None => MetaResponse::Error(MetaError::LeaseNotFound(id)),
                }
            }
            MetaRequest::LeaseRevoke { id } => match self.write(Command::LeaseRevoke { id }).await?
            {
                CommandResult::LeaseNotFound(id) => {
                    MetaResponse::Error(MetaError::LeaseNotFound(id))
                }
                _ => MetaResponse::Ok,
            },
            MetaRequest::Status => {
                let m = self.raft.metrics();
                let m = m.borrow().clone();
                MetaResponse::Status(Status {
                    node_id: self.node_id,
                    leader: m.current_leader,
                    term: m.current_term,
                    revision: self.sm.read(|kv| kv.revision),
                    last_applied: self.sm.last_applied(),
                    members: m
                        .membership_config
                        .membership()
                        .nodes()
                        .map(|(id, n)| (*id, n.addr.clone()))
                        .collect(),
                })
            }
            MetaRequest::Raft { kind, body } => {
                MetaResponse::Raft(self.raft_rpc(kind, &body).await?)
            }
            MetaRequest::Watch { .. } => {
                MetaResponse::Error(MetaError::Internal("watch handled on its stream".into()))
            }
        })
    }

    async fn raft_rpc(&self, kind: RaftKind, body: &[u8]) -> Result<Vec<u8>, MetaResponse> {
        let bad = |e: bincode::Error| {
            MetaResponse::Error(MetaError::Internal(format!("bad raft message: {e}")))
        };
        let out = match kind {
            RaftKind::AppendEntries => bincode::serialize(
                &self
                    .raft
                    .append_entries(bincode::deserialize(body).map_err(bad)?)
                    .await,
            ),
            RaftKind::Vote => bincode::serialize(
                &self
                    .raft
                    .vote(bincode::deserialize(body).map_err(bad)?)
                    .await,
            ),
            RaftKind::InstallSnapshot => bincode::serialize(
                &self
                    .raft
                    .install_snapshot(bincode::deserialize(body).map_err(bad)?)
                    .await,
            ),
        };
        out.map_err(|e| MetaResponse::Error(MetaError::Internal(e.to_string())))
    }

    async fn watch(
        &self,
        prefix: String,
        start: u64,
        send: &mut quinn::SendStream,
    ) -> Result<(), RpcError> {
        // From 0 means "from now on": no history to replay.
        let (mut rx, past, oldest, revision) =
            self.sm.subscribe(if start == 0 { u64::MAX } else { start });
        if start > 0 && start < oldest && start <= revision {
            return write_msg(send, &MetaResponse::Error(MetaError::Compacted(oldest))).await;
        }
        write_msg(send, &MetaResponse::WatchStarted { revision }).await?;
        for ev in past.into_iter().filter(|e| e.kv.key.starts_with(&prefix)) {
            write_msg(send, &MetaResponse::Event(ev)).await?;
        }
        loop {
            match rx.recv().await {
                Ok(ev) if ev.revision >= start && ev.kv.key.starts_with(&prefix) => {
                    write_msg(send, &MetaResponse::Event(ev)).await?
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    // The client resumes from its last revision out of the history.
                    return write_msg(send, &MetaResponse::Error(MetaError::Compacted(0))).await;
                }
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }
}

async fn lease_loop(node: Arc<MetadataNode>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let leader = node.is_leader();
        let expired = {
            let mut t = node.leases.lock().unwrap_or_else(|e| e.into_inner());
            t.set_leader(leader);
            node.sm.read(|kv| t.expired(&kv.leases, Instant::now()))
        };
        if !expired.is_empty() {
            tracing::info!(leases = ?expired, "leases expired");
            if let Err(e) = node.write(Command::LeaseExpire { ids: expired }).await {
                tracing::warn!(error = ?e, "could not commit lease expiry");
            }
        }
    }
}
