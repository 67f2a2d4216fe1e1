//! A metadata node: Raft, its storage, the lease clock, and the QUIC API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_proto::metadata_api::{
    self as api, Limits, MetaError, MetaRequest, MetaResponse, RaftKind, Status, RANGE_PAGE_BYTES,
    RANGE_PAGE_KEYS,
};
use magnetar_proto::rpc::{respond, serve, write_msg, ConnInfo, RpcClient, RpcError};
use magnetar_proto::tls::TlsMaterial;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use tokio::sync::broadcast::error::RecvError;

use crate::lease::LeaseTracker;
use crate::network::{Blocked, Network};
use crate::state::{Command, CommandResult};
use crate::store::{LogStore, SmShared, StateMachine};
use crate::TypeConfig;

/// One metadata node's configuration: what `magnetar metadata --config`
/// reads (TOML, unknown keys refused) apart from its `[tls]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfig {
    /// This node's id (≥ 1). `magnetar metadata` takes 0 (or none) to mean
    /// "from the host name": `<name>-<n>` (a StatefulSet pod) is node n + 1.
    #[serde(default)]
    pub node_id: u64,
    pub listen: SocketAddr,
    /// HTTP listener of `magnetar metadata`: `/metrics`, `/ready`, `/live`
    /// (default: port 2389 on the host of `listen`).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Address peers and clients use to reach this node (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// The initial voters `(id, address)`, identical on every initial
    /// member; empty means "a cluster of just this node". A node not in the
    /// list waits to be added with `add-node`.
    #[serde(default)]
    pub initial_members: Vec<(u64, String)>,
    #[serde(default = "defaults::heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "defaults::election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "defaults::election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log behind it) after this many entries.
    #[serde(default = "defaults::snapshot_every_logs")]
    pub snapshot_every_logs: u64,
    /// Log entries kept behind a snapshot, so a node that was briefly down
    /// catches up from the log rather than by a snapshot install.
    #[serde(default = "defaults::logs_kept_after_snapshot")]
    pub logs_kept_after_snapshot: u64,
    #[serde(default = "defaults::lease_check_interval_ms")]
    pub lease_check_interval_ms: u64,
    /// How long a write or a linearizable read may wait for the leader to
    /// commit or confirm its leadership before it fails as unavailable.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub limits: Limits,
}

/// Defaults chosen for failover under 2 s. openraft starts an election
/// once the leader's lease (election_timeout_max) plus the node's election
/// timeout (random in min..max) passed without a heartbeat: 600–800 ms with
/// heartbeats every 50 ms. A client gives up on a silent node after 1 s
/// and asks another; a follower gives up forwarding to a silent leader
/// sooner (FORWARD_TIMEOUT), so the client hears "unavailable" and moves on.
mod defaults {
    pub fn heartbeat_interval_ms() -> u64 {
        50
    }
    pub fn election_timeout_min_ms() -> u64 {
        200
    }
    pub fn election_timeout_max_ms() -> u64 {
        400
    }
    pub fn snapshot_every_logs() -> u64 {
        10_000
    }
    pub fn logs_kept_after_snapshot() -> u64 {
        1_000
    }
    pub fn lease_check_interval_ms() -> u64 {
        100
    }
    pub fn request_timeout_ms() -> u64 {
        2_000
    }
}

impl MetadataConfig {
    /// Where the HTTP listener binds.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listen
            .unwrap_or_else(|| SocketAddr::new(self.listen.ip(), 2389))
    }

    pub fn new(node_id: u64, listen: SocketAddr, data_dir: PathBuf) -> MetadataConfig {
        MetadataConfig {
            node_id,
            listen,
            http_listen: None,
            advertise: None,
            data_dir,
            initial_members: Vec::new(),
            heartbeat_interval_ms: defaults::heartbeat_interval_ms(),
            election_timeout_min_ms: defaults::election_timeout_min_ms(),
            election_timeout_max_ms: defaults::election_timeout_max_ms(),
            snapshot_every_logs: defaults::snapshot_every_logs(),
            logs_kept_after_snapshot: defaults::logs_kept_after_snapshot(),
            lease_check_interval_ms: defaults::lease_check_interval_ms(),
            request_timeout_ms: defaults::request_timeout_ms(),
            limits: Limits::default(),
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
    #[error("configuration: {0}")]
    Config(String),
}

pub struct MetadataNode {
    pub node_id: u64,
    pub raft: Raft<TypeConfig>,
    sm: Arc<SmShared>,
    endpoint: quinn::Endpoint,
    /// Calls to other nodes (forwarding, membership checks).
    rpc: RpcClient,
    /// Fault injection: peers this node's outbound traffic cannot reach.
    blocked: Blocked,
    cfg: MetadataConfig,
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
            max_in_snapshot_log_to_keep: cfg.logs_kept_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let blocked = Blocked::default();
        let network = Network {
            rpc: RpcClient::new(endpoint.clone()),
            blocked: blocked.clone(),
        };
        let raft = Raft::new(cfg.node_id, Arc::new(raft_cfg), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let node = Arc::new(MetadataNode {
            node_id: cfg.node_id,
            raft,
            sm: shared,
            endpoint: endpoint.clone(),
            rpc: RpcClient::new(endpoint.clone()),
            blocked,
            cfg: cfg.clone(),
            leases: Mutex::default(),
            tasks: Mutex::default(),
        });
        let served = node.clone();
        let accept = tokio::spawn(serve(endpoint, "metadata", move |req, send, conn| {
            let node = served.clone();
            async move { node.serve_request(req, send, conn).await }
        }));
        let expiry = tokio::spawn(lease_loop(
            node.clone(),
            Duration::from_millis(cfg.lease_check_interval_ms),
        ));
        let gauges = node.clone();
        let record = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                gauges.record_metrics();
            }
        });
        node.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([accept, expiry, record]);
        if let Err(e) = node.bootstrap(&advertise).await {
            node.shutdown().await;
            return Err(e);
        }
        tracing::info!(node_id = cfg.node_id, addr = %local, "metadata node started");
        Ok(node)
    }

    /// Forms the cluster on first start. With no initial members the node
    /// is a cluster of one. Otherwise the nodes first check that a majority
    /// of them were configured with the same members (a node configured
    /// differently is a fatal, clearly reported error), then the member with
    /// the lowest id initializes Raft. A node that is not among the initial
    /// members waits to be added (`add-node`).
    async fn bootstrap(&self, advertise: &str) -> Result<(), StartError> {
        let raft_err = |e: RaftError<u64, openraft::error::InitializeError<u64, BasicNode>>| {
            StartError::Raft(e.to_string())
        };
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let members = normalized(&self.cfg.initial_members);
        if members.is_empty() {
            let one = BTreeMap::from([(
                self.node_id,
                BasicNode {
                    addr: advertise.to_string(),
                },
            )]);
            return self.raft.initialize(one).await.map_err(raft_err);
        }
        if !members.iter().any(|(id, _)| *id == self.node_id) {
            tracing::info!(
                node_id = self.node_id,
                "not an initial member: waiting to be added to the cluster"
            );
            return Ok(());
        }
        self.agree_on_members(&members).await?;
        if members.first().map(|(id, _)| *id) == Some(self.node_id) {
            let map: BTreeMap<u64, BasicNode> = members
                .into_iter()
                .map(|(id, addr)| (id, BasicNode { addr }))
                .collect();
            self.raft.initialize(map).await.map_err(raft_err)?;
        }
        Ok(())
    }

    /// Asks every other initial member whether it was configured with the
    /// same members, until a majority (counting this node) agrees.
    async fn agree_on_members(&self, members: &[(u64, String)]) -> Result<(), StartError> {
        let mut rpc = self.rpc.clone();
        rpc.timeout = Duration::from_secs(1);
        let majority = members.len() / 2 + 1;
        let mut agreed = BTreeSet::from([self.node_id]);
        let mut last_report = tokio::time::Instant::now();
        loop {
            let pending: Vec<&(u64, String)> = members
                .iter()
                .filter(|(id, _)| !agreed.contains(id))
                .collect();
            for (id, addr) in pending {
                let Some(sock) = magnetar_proto::resolve::socket_addr(addr) else {
                    // A name not resolvable yet (a pod not scheduled): later.
                    tracing::debug!(member = id, %addr, "member address does not resolve yet");
                    continue;
                };
                let req = MetaRequest::CheckMembers {
                    members: members.to_vec(),
                };
                match rpc.call::<_, MetaResponse>(sock, &req).await {
                    Ok(MetaResponse::Ok) => {
                        agreed.insert(*id);
                    }
                    Ok(MetaResponse::Error(MetaError::ConfigMismatch(why))) => {
                        return Err(StartError::Config(format!(
                            "peer {id} at {addr} disagrees on the initial members: {why}"
                        )));
                    }
                    Ok(other) => {
                        tracing::debug!(peer = id, answer = ?other, "member check");
                    }
                    Err(e) => tracing::debug!(peer = id, error = %e, "member check"),
                }
            }
            if agreed.len() >= majority {
                return Ok(());
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = tokio::time::Instant::now();
                tracing::info!(agreed = ?agreed, needed = majority, "waiting for initial members");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// This node's own applied value of `key` — a serializable read that
    /// may lag the leader (diagnostics and tests; clients read through the
    /// leader).
    pub fn local_get(&self, key: &str) -> Option<api::KeyValue> {
        self.sm.read(|kv| kv.get(key).cloned())
    }

    /// The revision this node has applied.
    pub fn local_revision(&self) -> u64 {
        self.sm.read(|kv| kv.revision)
    }

    /// Fault injection for tests: this node's Raft messages and forwarded
    /// requests to `peers` are dropped as if the network lost them.
    pub fn block_peers(&self, peers: &[u64]) {
        self.blocked.set(peers);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into())
    }

    /// Whether the node can serve: as leader, a majority acknowledged it
    /// within the last election timeout; as follower, it knows a leader
    /// (it forgets it when the leader's heartbeats stop).
    pub fn is_ready(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.state == ServerState::Leader {
            return m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= self.cfg.election_timeout_max_ms.max(1000));
        }
        m.current_leader.is_some()
    }

    /// Sets the node's gauges from Raft's metrics and the applied state.
    pub fn record_metrics(&self) {
        use crate::metrics::*;
        let node = self.node_id.to_string();
        let (term, last, applied, leader, state) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (
                m.current_term,
                m.last_log_index.unwrap_or(0),
                m.last_applied.map_or(0, |l| l.index),
                m.current_leader,
                m.state,
            )
        };
        let g = |name: &'static str, v: f64| metrics::gauge!(name, "node" => node.clone()).set(v);
        g(RAFT_TERM, term as f64);
        g(RAFT_LAST_LOG_INDEX, last as f64);
        g(RAFT_APPLIED_INDEX, applied as f64);
        g(RAFT_APPLY_LAG, last.saturating_sub(applied) as f64);
        let leads = state == ServerState::Leader && leader == Some(self.node_id);
        g(RAFT_IS_LEADER, if leads { 1.0 } else { 0.0 });
        g(RAFT_HAS_LEADER, if leader.is_some() { 1.0 } else { 0.0 });
        let (leases, keys, revision) = self
            .sm
            .read(|kv| (kv.leases.len(), kv.kv.len(), kv.revision));
        g(LEASES, leases as f64);
        g(KEYS, keys as f64);
        g(REVISION, revision as f64);
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

    fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| (leader, n.addr.clone()))
    }

    fn leader_addr(&self) -> Option<String> {
        self.leader().map(|(_, addr)| addr)
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.request_timeout_ms)
    }

    fn not_leader(&self) -> MetaResponse {
        MetaResponse::Error(MetaError::NotLeader {
            leader: self.leader_addr(),
        })
    }

    fn unavailable(&self, what: &str) -> MetaResponse {
        MetaResponse::Error(MetaError::Unavailable(format!(
            "{what} within {} ms (leader: {:?})",
            self.cfg.request_timeout_ms,
            self.leader_addr()
        )))
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, MetaResponse> {
        let res = tokio::time::timeout(self.request_timeout(), self.raft.client_write(cmd))
            .await
            .map_err(|_| self.unavailable("write not committed (outcome unknown)"))?;
        match res {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(self.not_leader())
            }
            Err(e) => Err(MetaResponse::Error(MetaError::Internal(e.to_string()))),
        }
    }

    /// Read-index: confirms with a quorum that this node still leads and
    /// waits until it applied everything committed before the read.
    async fn linearizable(&self) -> Result<(), MetaResponse> {
        let res = tokio::time::timeout(self.request_timeout(), self.raft.ensure_linearizable())
            .await
            .map_err(|_| self.unavailable("leadership not confirmed by a quorum"))?;
        match res {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(_)) => Err(self.not_leader()),
            Err(e) => Err(MetaResponse::Error(MetaError::Internal(e.to_string()))),
        }
    }

    async fn serve_request(
        &self,
        req: MetaRequest,
        mut send: quinn::SendStream,
        conn: Arc<ConnInfo>,
    ) {
        match req {
            MetaRequest::Watch {
                prefix,
                start_revision,
            } => {
                let limit = self.cfg.limits.max_watchers_per_connection;
                let guard = WatchSlot::take(conn.clone());
                if guard.count > limit {
                    tracing::warn!(peer = %conn.peer, limit, "watch refused: too many watches on one connection");
                    let err = MetaError::Limit(format!(
                        "{} watches on one connection; the limit is {limit}",
                        guard.count
                    ));
                    return respond(send, &MetaResponse::Error(err)).await;
                }
                if self.watch(prefix, start_revision, &mut send).await.is_ok() {
                    let _ = send.finish();
                }
            }
            req => respond(send, &self.handle(req).await).await,
        }
    }

    async fn handle(&self, req: MetaRequest) -> MetaResponse {
        let (req, forwarded) = match req {
            MetaRequest::Forwarded(inner) => (*inner, true),
            req => (req, false),
        };
        if !forwarded && needs_leader(&req) && !self.is_leader() {
            return match self.leader() {
                Some((id, addr)) => self.forward(id, addr, req).await,
                None => self.not_leader(),
            };
        }
        match self.handle_inner(req).await {
            Ok(r) | Err(r) => r,
        }
    }

    /// Passes a request on to the leader and returns its answer, tagged with
    /// the leader's address so the client can go there directly next time.
    async fn forward(&self, leader: u64, addr: String, req: MetaRequest) -> MetaResponse {
        let Some(sock) = magnetar_proto::resolve::socket_addr(&addr) else {
            return self.not_leader();
        };
        if self.blocked.contains(leader) {
            return MetaResponse::Error(MetaError::Unavailable(format!(
                "leader {leader} at {addr} unreachable (blocked)"
            )));
        }
        let mut rpc = self.rpc.clone();
        rpc.timeout = FORWARD_TIMEOUT;
        rpc.connect_timeout = FORWARD_TIMEOUT / 2;
        match rpc
            .call::<_, MetaResponse>(sock, &MetaRequest::Forwarded(Box::new(req)))
            .await
        {
            Ok(r @ MetaResponse::Error(MetaError::NotLeader { .. })) => r,
            Ok(response) => MetaResponse::Forwarded {
                leader: addr,
                response: Box::new(response),
            },
            Err(e) => MetaResponse::Error(MetaError::Unavailable(format!(
                "leader {leader} at {addr} unreachable: {e}"
            ))),
        }
    }

    async fn handle_inner(&self, req: MetaRequest) -> Result<MetaResponse, MetaResponse> {
        let limit = |what: String| MetaResponse::Error(MetaError::Limit(what));
        let limits = &self.cfg.limits;
        Ok(match req {
            MetaRequest::Get { key } => {
                self.linearizable().await?;
                MetaResponse::Get(self.sm.read(|kv| kv.get(&key).cloned()))
            }
            MetaRequest::Range { prefix, limit: n } => {
                self.linearizable().await?;
                let n = if n == 0 { usize::MAX } else { n as usize };
                // In one answer only what fits one message; else a clear
                // error (the stream would just be cut).
                let (kvs, more) = self
                    .sm
                    .read(|kv| kv.range_page(&prefix, None, n, false, RANGE_ANSWER_BYTES));
                if more && kvs.len() < n {
                    return Err(limit(format!(
                        "the range under {prefix:?} is over {RANGE_ANSWER_BYTES} bytes: read it in pages (RangePage)"
                    )));
                }
                MetaResponse::Range(kvs)
            }
            MetaRequest::RangePage {
                prefix,
                after,
                limit,
                keys_only,
            } => {
                self.linearizable().await?;
                let n = match limit {
                    0 => RANGE_PAGE_KEYS,
                    n => n.min(RANGE_PAGE_KEYS),
                } as usize;
                let (kvs, more) = self.sm.read(|kv| {
                    kv.range_page(&prefix, after.as_deref(), n, keys_only, RANGE_PAGE_BYTES)
                });
                MetaResponse::RangePage { kvs, more }
            }
            MetaRequest::Txn(_) | MetaRequest::TxnOnce { .. } => {
                let (txn, request) = match req {
                    MetaRequest::TxnOnce { request, txn } => (txn, Some(request)),
                    MetaRequest::Txn(txn) => (txn, None),
                    _ => unreachable!("matched above"),
                };
                let ops = txn.success.len() + txn.failure.len() + txn.compares.len();
                if ops > limits.max_txn_ops {
                    return Err(limit(format!(
                        "{ops} operations in one transaction; the limit is {}",
                        limits.max_txn_ops
                    )));
                }
                for c in &txn.compares {
                    if c.key.len() > limits.max_key_bytes {
                        return Err(limit(format!(
                            "key of {} bytes; the limit is {}",
                            c.key.len(),
                            limits.max_key_bytes
                        )));
                    }
                }
                for op in txn.success.iter().chain(&txn.failure) {
                    let (key, value) = match op {
                        api::Op::Put { key, value, .. } => (key, value.len()),
                        api::Op::Delete { key } | api::Op::Get { key } => (key, 0),
                    };
                    if key.len() > limits.max_key_bytes || value > limits.max_value_bytes {
                        return Err(limit(format!(
                            "key {} bytes / value {value} bytes; limits are {} / {}",
                            key.len(),
                            limits.max_key_bytes,
                            limits.max_value_bytes
                        )));
                    }
                }
                let cmd = match request {
                    Some(request) => Command::TxnOnce { request, txn },
                    None => Command::Txn(txn),
                };
                match self.write(cmd).await? {
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
                    state: format!("{:?}", m.state),
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
                    voters: m.membership_config.membership().voter_ids().collect(),
                })
            }
            MetaRequest::AddNode { id, addr } => self.add_node(id, addr).await?,
            MetaRequest::RemoveNode { id } => self.remove_node(id).await?,
            MetaRequest::CheckMembers { members } => {
                let ours = normalized(&self.cfg.initial_members);
                let theirs = normalized(&members);
                if ours == theirs {
                    MetaResponse::Ok
                } else {
                    tracing::error!(ours = ?ours, theirs = ?theirs, "a peer was configured with different initial members");
                    MetaResponse::Error(MetaError::ConfigMismatch(format!(
                        "node {} has initial members {ours:?}, the asking node {theirs:?}",
                        self.node_id
                    )))
                }
            }
            MetaRequest::Forwarded(_) => {
                MetaResponse::Error(MetaError::Internal("request forwarded twice".into()))
            }
            MetaRequest::Raft { kind, body } => {
                MetaResponse::Raft(self.raft_rpc(kind, &body).await?)
            }
            MetaRequest::Watch { .. } => {
                MetaResponse::Error(MetaError::Internal("watch handled on its stream".into()))
            }
        })
    }

    /// Adds `id` as a learner, waits for it to catch up, then makes it a
    /// voter. Adding a node that already votes is a no-op.
    async fn add_node(&self, id: u64, addr: String) -> Result<MetaResponse, MetaResponse> {
        let refuse = |why: String| MetaResponse::Error(MetaError::Membership(why));
        if magnetar_proto::resolve::socket_addr(&addr).is_none() {
            return Err(refuse(format!(
                "{addr:?} is not a socket address or a name that resolves"
            )));
        }
        let voters: BTreeSet<u64> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        if voters.contains(&id) {
            return Ok(MetaResponse::Ok);
        }
        tracing::info!(id, addr, "adding a metadata node as learner");
        self.raft
            .add_learner(id, BasicNode { addr }, true)
            .await
            .map_err(|e| self.membership_error(e))?;
        tracing::info!(id, "learner caught up; promoting to voter");
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(MetaResponse::Ok)
    }

    /// Removes voter `id`; the leader may remove itself and then steps down.
    async fn remove_node(&self, id: u64) -> Result<MetaResponse, MetaResponse> {
        let voters: BTreeSet<u64> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        if !voters.contains(&id) {
            return Ok(MetaResponse::Ok);
        }
        if voters.len() == 1 {
            return Err(MetaResponse::Error(MetaError::Membership(
                "cannot remove the last voter".into(),
            )));
        }
        tracing::info!(id, "removing a metadata node");
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(MetaResponse::Ok)
    }

    fn membership_error(
        &self,
        e: RaftError<u64, ClientWriteError<u64, BasicNode>>,
    ) -> MetaResponse {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.not_leader(),
            e => MetaResponse::Error(MetaError::Membership(e.to_string())),
        }
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
            // A watch with no events must still end with its connection
            // (the node shutting down, the client gone): it holds both.
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = send.stopped() => return Ok(()),
            };
            match next {
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

/// How long a follower waits for the leader's answer to a forwarded
/// request: less than a client's per-attempt budget (1 s), so that when the
/// leader just died the client hears "unavailable" and tries elsewhere.
/// A forwarded write that times out has an unknown outcome; clients retry
/// transactions under the same request id, so it applies at most once.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(800);

/// Most bytes of keys and values in one (unpaged) `Range` answer.
const RANGE_ANSWER_BYTES: usize = 6 * 1024 * 1024;

/// Requests only the leader can answer; a follower forwards them.
fn needs_leader(req: &MetaRequest) -> bool {
    matches!(
        req,
        MetaRequest::Get { .. }
            | MetaRequest::Range { .. }
            | MetaRequest::RangePage { .. }
            | MetaRequest::Txn(_)
            | MetaRequest::TxnOnce { .. }
            | MetaRequest::LeaseGrant { .. }
            | MetaRequest::LeaseKeepAlive { .. }
            | MetaRequest::LeaseRevoke { .. }
            | MetaRequest::AddNode { .. }
            | MetaRequest::RemoveNode { .. }
    )
}

fn normalized(members: &[(u64, String)]) -> Vec<(u64, String)> {
    let mut m = members.to_vec();
    m.sort();
    m.dedup();
    m
}

/// Counts a connection's open watches for as long as one is served.
struct WatchSlot {
    conn: Arc<ConnInfo>,
    count: usize,
}

impl WatchSlot {
    fn take(conn: Arc<ConnInfo>) -> WatchSlot {
        metrics::gauge!(crate::metrics::WATCHES).increment(1.0);
        let count = conn.long_streams.fetch_add(1, Ordering::Relaxed) + 1;
        WatchSlot { conn, count }
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::WATCHES).decrement(1.0);
        self.conn.long_streams.fetch_sub(1, Ordering::Relaxed);
    }
}
