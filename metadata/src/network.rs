//! Raft messages between metadata nodes, carried over the same QUIC API as
//! client requests (`MetaRequest::Raft`).

use magnetar_proto::metadata_api::{MetaRequest, MetaResponse, RaftKind};
use magnetar_proto::rpc::RpcClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::TypeConfig;

/// Peers a node cannot reach: fault injection for partition tests.
#[derive(Clone, Default)]
pub struct Blocked(Arc<RwLock<BTreeSet<u64>>>);

impl Blocked {
    pub fn set(&self, peers: &[u64]) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = peers.iter().copied().collect();
    }

    pub fn contains(&self, peer: u64) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }
}

#[derive(Clone)]
pub struct Network {
    pub rpc: RpcClient,
    pub blocked: Blocked,
}

pub struct Peer {
    rpc: RpcClient,
    target: u64,
    addr: String,
    blocked: Blocked,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            rpc: self.rpc.clone(),
            target,
            addr: node.addr.clone(),
            blocked: self.blocked.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl Peer {
    async fn send<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &self,
        kind: RaftKind,
        req: &Req,
        timeout: std::time::Duration,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>> {
        if self.blocked.contains(self.target) {
            // Like a lost packet: the caller sees the peer as unreachable
            // only after its timeout, as on a real partition.
            tokio::time::sleep(timeout).await;
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "peer {} blocked",
                self.target
            )))));
        }
        let addr = magnetar_proto::resolve::socket_addr(&self.addr).ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "address {} does not resolve",
                self.addr
            ))))
        })?;
        let body = bincode::serialize(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&Msg(e.to_string()))))?;
        let mut rpc = self.rpc.clone();
        rpc.timeout = timeout;
        let resp: MetaResponse = rpc
            .call(addr, &MetaRequest::Raft { kind, body })
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let MetaResponse::Raft(bytes) = resp else {
            return Err(RPCError::Network(NetworkError::new(&Msg(format!(
                "unexpected answer {resp:?}"
            )))));
        };
        let res: Result<Resp, RaftError<u64, E>> = bincode::deserialize(&bytes)
            .map_err(|e| RPCError::Network(NetworkError::new(&Msg(e.to_string()))))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// The most bytes of entries one AppendEntries carries (a single larger
/// entry still goes alone).
const APPEND_BYTES_BUDGET: u64 = 32 * 1024;

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        // openraft cuts every AppendEntries off at its heartbeat interval
        // (50 ms). A batch for a follower far behind may not make it in
        // that time on a loaded machine — and the retry, the same batch,
        // would not either, for good. Batches over a byte budget are sent
        // back to be split (openraft retries at once with fewer entries).
        if rpc.entries.len() > 1 {
            let size = bincode::serialized_size(&rpc).unwrap_or(0);
            if size > APPEND_BYTES_BUDGET {
                let fit = (rpc.entries.len() as u64 * APPEND_BYTES_BUDGET / size).max(1);
                return Err(PayloadTooLarge::new_entries_hint(fit).into());
            }
        }
        let ttl = option.hard_ttl();
        self.send(RaftKind::AppendEntries, &rpc, ttl).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.send(RaftKind::InstallSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.send(RaftKind::Vote, &rpc, option.hard_ttl()).await
    }
}
