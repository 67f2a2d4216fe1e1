//! Metadata clusters of 3 and 5 nodes in one process, over real QUIC:
//! leader loss during CAS writes, partitions (through the transport's fault
//! filter), stale nodes catching up by log and by snapshot, leases across a
//! leader change, watches resuming after their node dies, membership change
//! and mis-configured peers.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use magnetar_metadata::server::StartError;
use magnetar_metadata::{EventKind, MetadataClient, MetadataConfig, MetadataNode, Op, Txn};
use magnetar_proto::metadata_api::{MetaError, MetaRequest, MetaResponse};
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;
use tokio::time::{timeout, Instant};

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    dir: tempfile::TempDir,
    tls: TlsMaterial,
    configs: BTreeMap<u64, MetadataConfig>,
    nodes: BTreeMap<u64, Arc<MetadataNode>>,
}

impl Cluster {
    fn config(dir: &std::path::Path, id: u64, addr: SocketAddr) -> MetadataConfig {
        let mut c = MetadataConfig::new(id, addr, dir.join(format!("node-{id}")));
        c.advertise = Some(addr.to_string());
        c
    }

    /// Configures `n` nodes (ids 1..=n) and starts them all at once.
    async fn start(n: u64, tweak: impl Fn(&mut MetadataConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsMaterial::load_or_generate(&dir.path().join("tls")).unwrap();
        let addrs: Vec<(u64, SocketAddr)> = (1..=n)
            .map(|id| (id, SocketAddr::from(([127, 0, 0, 1], free_port()))))
            .collect();
        let members: Vec<(u64, String)> =
            addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        let mut configs = BTreeMap::new();
        for (id, addr) in &addrs {
            let mut c = Self::config(dir.path(), *id, *addr);
            c.initial_members = members.clone();
            tweak(&mut c);
            configs.insert(*id, c);
        }
        let mut cluster = Cluster {
            dir,
            tls,
            configs,
            nodes: BTreeMap::new(),
        };
        let ids: Vec<u64> = cluster.configs.keys().copied().collect();
        let started =
            futures::future::join_all(ids.iter().map(|id| cluster.start_node_inner(*id))).await;
        for (id, node) in ids.into_iter().zip(started) {
            cluster.nodes.insert(id, node.unwrap());
        }
        cluster.wait_leader(Duration::from_secs(10)).await;
        cluster
    }

    async fn start_node_inner(&self, id: u64) -> Result<Arc<MetadataNode>, StartError> {
        MetadataNode::start(self.configs[&id].clone(), &self.tls).await
    }

    async fn start_node(&mut self, id: u64) {
        let node = self.start_node_inner(id).await.unwrap();
        self.nodes.insert(id, node);
    }

    async fn stop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    fn client(&self) -> MetadataClient {
        let endpoints = self.configs.values().map(|c| c.listen).collect();
        MetadataClient::new(
            RpcClient::new(client_endpoint(&self.tls).unwrap()),
            endpoints,
        )
    }

    /// A client that talks to these nodes only.
    fn client_of(&self, ids: &[u64]) -> MetadataClient {
        let endpoints = ids.iter().map(|id| self.configs[id].listen).collect();
        MetadataClient::new(
            RpcClient::new(client_endpoint(&self.tls).unwrap()),
            endpoints,
        )
    }

    /// The leader every running node agrees on.
    async fn wait_leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .values()
                .map(|n| n.raft.metrics().borrow().current_leader)
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if self.nodes.contains_key(l) && leaders.iter().all(|x| *x == Some(*l)) {
                    return *l;
                }
            }
            assert!(Instant::now() < deadline, "no leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_caught_up(&self, id: u64, revision: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.nodes[&id].local_revision() < revision {
            assert!(
                Instant::now() < deadline,
                "node {id} at revision {}, want {revision}",
                self.nodes[&id].local_revision()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
        drop(self.dir);
    }
}

/// Kills the leader in the middle of a stream of CAS increments and checks
/// that writing resumes quickly and that the counter equals the number of
/// acknowledged increments: none lost, none applied twice.
async fn leader_kill_during_cas(n: u64, kills: usize) {
    let mut cluster = Cluster::start(n, |_| {}).await;
    let c = cluster.client();
    assert!(c.cas("counter", 0, b"0".to_vec(), None).await.unwrap());
    let mut version = 1u64;
    let mut acked = 0u64;
    let mut outages = Vec::new();
    for round in 0..kills {
        for _ in 0..50 {
            let next = (acked + 1).to_string().into_bytes();
            assert!(c.cas("counter", version, next, None).await.unwrap());
            version += 1;
            acked += 1;
        }
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        cluster.stop_node(leader).await;
        let killed = Instant::now();
        let next = (acked + 1).to_string().into_bytes();
        assert!(
            c.cas("counter", version, next, None).await.unwrap(),
            "round {round}: the first CAS after the leader died must apply exactly once"
        );
        outages.push(killed.elapsed());
        version += 1;
        acked += 1;
        for _ in 0..50 {
            let next = (acked + 1).to_string().into_bytes();
            assert!(c.cas("counter", version, next, None).await.unwrap());
            version += 1;
            acked += 1;
        }
    }
    let kv = c.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.version, acked + 1, "one version per acknowledged CAS");
    assert_eq!(kv.value, acked.to_string().into_bytes());
    for o in &outages {
        // Election timeouts are 300–600 ms; "a few" of them.
        assert!(
            *o < Duration::from_secs(5),
            "first write after leader kill took {o:?}"
        );
    }
    eprintln!("{n} nodes: first write after leader kill took {outages:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_survive_leader_kill_during_cas_writes() {
    leader_kill_during_cas(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_survive_two_leader_kills_during_cas_writes() {
    leader_kill_during_cas(5, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_leader_stops_serving_and_rejoins() {
    let cluster = Cluster::start(3, |_| {}).await;
    let c = cluster.client();
    assert!(c.cas("k", 0, b"old".to_vec(), None).await.unwrap());
    let old = cluster.wait_leader(Duration::from_secs(5)).await;
    let others: Vec<u64> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|i| *i != old)
        .collect();
    cluster.nodes[&old].block_peers(&others);
    for o in &others {
        cluster.nodes[o].block_peers(&[old]);
    }
    // The majority side elects a leader and takes writes.
    let majority = cluster.client_of(&others);
    assert!(majority.cas("k", 1, b"new".to_vec(), None).await.unwrap());
    let new_leader = majority.status().await.unwrap().leader.unwrap();
    assert_ne!(new_leader, old);
    // The old leader must not answer a linearizable read (it would be stale).
    let raw = RpcClient::new(client_endpoint(&cluster.tls).unwrap());
    let old_addr = cluster.configs[&old].listen;
    let answer: MetaResponse = raw
        .call(
            old_addr,
            &MetaRequest::Forwarded(Box::new(MetaRequest::Get { key: "k".into() })),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            answer,
            MetaResponse::Error(MetaError::Unavailable(_) | MetaError::NotLeader { .. })
        ),
        "isolated old leader answered {answer:?}"
    );
    // Nor take a write.
    let answer: MetaResponse = raw
        .call(
            old_addr,
            &MetaRequest::Forwarded(Box::new(MetaRequest::Txn(Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: "k".into(),
                    value: b"split-brain".to_vec(),
                    lease: None,
                }],
                failure: vec![],
            }))),
        )
        .await
        .unwrap();
    assert!(
        matches!(answer, MetaResponse::Error(_)),
        "isolated old leader took a write: {answer:?}"
    );
    // Healed, it follows the new leader and catches up.
    for n in cluster.nodes.values() {
        n.block_peers(&[]);
    }
    let revision = majority.status().await.unwrap().revision;
    cluster
        .wait_caught_up(old, revision, Duration::from_secs(10))
        .await;
    assert_eq!(
        cluster.nodes[&old].local_get("k").unwrap().value,
        b"new".to_vec()
    );
    let via_old = cluster.client_of(&[old]);
    assert_eq!(
        via_old.get("k").await.unwrap().unwrap().value,
        b"new".to_vec(),
        "a follower forwards reads to the leader"
    );
    cluster.shutdown().await;
}

/// How long a restarted node may take to catch up. It takes 0.1–1.5 s
/// here; once in a CI run (2026-12-03) a node restarted in the middle of
/// the suite stayed at revision 0 for the 10 s the test then allowed, as
/// if the leader had kept its QUIC connection to the node's previous run
/// until the connection's 10 s idle timeout. The bound leaves room for
/// that; a node that never catches up still fails.
const RESTART_CATCH_UP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_nodes_catch_up_by_log_and_by_snapshot() {
    let mut cluster = Cluster::start(3, |c| {
        c.snapshot_every_logs = 100;
        c.logs_kept_after_snapshot = 0;
    })
    .await;
    let c = cluster.client();
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    let follower = *cluster.nodes.keys().find(|i| **i != leader).unwrap();
    // Briefly down: a few entries, caught up from the log.
    cluster.stop_node(follower).await;
    for i in 0..20 {
        c.put(&format!("a/{i}"), vec![1]).await.unwrap();
    }
    cluster.start_node(follower).await;
    let rev = c.status().await.unwrap().revision;
    cluster
        .wait_caught_up(follower, rev, RESTART_CATCH_UP)
        .await;
    // Down for long: the leader compacts its log past what the node has,
    // so it must be sent a snapshot.
    cluster.stop_node(follower).await;
    for i in 0..400 {
        c.put(&format!("b/{i:03}"), vec![2]).await.unwrap();
    }
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    let purged = cluster.nodes[&leader]
        .raft
        .metrics()
        .borrow()
        .purged
        .map(|l| l.index)
        .unwrap_or(0);
    cluster.start_node(follower).await;
    let applied_before = cluster.nodes[&follower]
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index)
        .unwrap_or(0);
    assert!(
        purged > applied_before,
        "test set-up: leader purged to {purged}, follower has {applied_before}"
    );
    let rev = c.status().await.unwrap().revision;
    cluster
        .wait_caught_up(follower, rev, RESTART_CATCH_UP)
        .await;
    assert!(cluster.nodes[&follower].local_get("b/399").is_some());
    assert!(cluster.nodes[&follower].local_get("a/0").is_some());
    cluster.shutdown().await;
}

/// A follower far behind is sent full batches of entries, each far more
/// than a heartbeat. Found by the chaos suite: with the heartbeat interval
/// (50 ms) as the deadline of every AppendEntries, a batch of a few hundred
/// kilobytes never reached the follower in time on a loaded machine, each
/// retry was cut off the same way, and the cluster could commit nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_far_behind_catches_up_through_large_batches() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut cluster = Cluster::start(3, |_| {}).await;
    let c = cluster.client();
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    let follower = *cluster.nodes.keys().find(|i| **i != leader).unwrap();
    cluster.stop_node(follower).await;
    let value = vec![7u8; 4096];
    for chunk in 0..15 {
        let keys: Vec<String> = (0..100).map(|i| format!("big/{chunk:02}/{i:03}")).collect();
        let puts: Vec<_> = keys.iter().map(|k| c.put(k, value.clone())).collect();
        for p in puts {
            p.await.unwrap();
        }
    }
    cluster.start_node(follower).await;
    let rev = c.status().await.unwrap().revision;
    cluster
        .wait_caught_up(follower, rev, Duration::from_secs(20))
        .await;
    assert!(cluster.nodes[&follower].local_get("big/14/099").is_some());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_survive_a_leader_change_and_expire_without_keepalive() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let c = cluster.client();
    let mut w = c.watch("eph/", 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = c.grant_lease(3_000).await.unwrap();
    assert!(c
        .cas("eph/kept", 0, b"1".to_vec(), Some(kept.id))
        .await
        .unwrap());
    let dropped = c.grant_lease(1_000).await.unwrap();
    assert!(c
        .cas("eph/dropped", 0, b"1".to_vec(), Some(dropped.id))
        .await
        .unwrap());
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    cluster.stop_node(leader).await;
    drop(dropped);
    // Several TTLs of the kept lease across the leader change.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        c.get("eph/kept").await.unwrap().is_some(),
        "a kept-alive lease must survive a leader change"
    );
    assert!(
        !*kept.lost.borrow(),
        "the holder was told its lease is lost"
    );
    assert!(c.get("eph/dropped").await.unwrap().is_none());
    // The watcher saw both puts and exactly one delete: the dropped key's.
    let mut seen = Vec::new();
    while let Ok(Some(ev)) = timeout(Duration::from_millis(500), w.next()).await {
        seen.push((ev.kind, ev.kv.key));
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Put, "eph/kept".to_string()),
            (EventKind::Put, "eph/dropped".to_string()),
            (EventKind::Delete, "eph/dropped".to_string()),
        ]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_exactly_after_its_node_dies() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let c = cluster.client();
    c.put("w/start", vec![0]).await.unwrap();
    let start = c.status().await.unwrap().revision;
    // The watcher's client knows the leader; its watch goes there.
    let watcher = cluster.client();
    watcher.get("w/start").await.unwrap();
    let mut w = watcher.watch("w/", start + 1);
    let mut expected = Vec::new();
    let write = |i: usize| {
        let c = c.clone();
        async move {
            // Three keys per revision: a resume must not split or repeat it.
            let ops = (0..3)
                .map(|k| Op::Put {
                    key: format!("w/{i:04}/{k}"),
                    value: vec![1],
                    lease: None,
                })
                .collect();
            let r = c
                .txn(Txn {
                    compares: vec![],
                    success: ops,
                    failure: vec![],
                })
                .await
                .unwrap();
            (0..3)
                .map(|k| (r.revision, format!("w/{i:04}/{k}")))
                .collect::<Vec<_>>()
        }
    };
    for i in 0..100 {
        expected.extend(write(i).await);
    }
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    cluster.stop_node(leader).await;
    for i in 100..200 {
        expected.extend(write(i).await);
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(ev)) => got.push((ev.revision, ev.kv.key)),
            other => panic!(
                "watch stalled after {} of {} events: {other:?}",
                got.len(),
                expected.len()
            ),
        }
    }
    assert_eq!(got, expected);
    // Nothing extra.
    assert!(timeout(Duration::from_millis(500), w.next()).await.is_err());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_change_adds_a_voter_and_removes_the_leader() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let c = cluster.client();
    for i in 0..50 {
        c.put(&format!("m/{i}"), vec![1]).await.unwrap();
    }
    // Node 4: configured with the cluster's initial members, which do not
    // include it, so it waits to be added.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg4 = Cluster::config(cluster.dir.path(), 4, addr);
    cfg4.initial_members = cluster.configs[&1].initial_members.clone();
    cluster.configs.insert(4, cfg4);
    cluster.start_node(4).await;
    c.add_node(4, &addr.to_string()).await.unwrap();
    let status = c.status().await.unwrap();
    assert_eq!(status.voters, vec![1, 2, 3, 4]);
    let rev = status.revision;
    cluster
        .wait_caught_up(4, rev, Duration::from_secs(10))
        .await;
    // Remove the leader itself: the others elect a new one and go on.
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    c.remove_node(leader).await.unwrap();
    cluster.stop_node(leader).await;
    cluster.configs.remove(&leader);
    let c = cluster.client();
    assert!(c.cas("after", 0, b"1".to_vec(), None).await.unwrap());
    let status = c.status().await.unwrap();
    assert_eq!(status.voters.len(), 3);
    assert!(!status.voters.contains(&leader));
    assert_ne!(status.leader, Some(leader));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_configured_with_different_members_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsMaterial::load_or_generate(&dir.path().join("tls")).unwrap();
    let a1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let a2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let a3 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut c1 = Cluster::config(dir.path(), 1, a1);
    c1.initial_members = vec![
        (1, a1.to_string()),
        (2, a2.to_string()),
        (3, a3.to_string()),
    ];
    let mut c2 = Cluster::config(dir.path(), 2, a2);
    // Node 2 believes in a different third member.
    c2.initial_members = vec![
        (1, a1.to_string()),
        (2, a2.to_string()),
        (4, a3.to_string()),
    ];
    let (r1, r2) = tokio::join!(
        timeout(Duration::from_secs(10), MetadataNode::start(c1, &tls)),
        timeout(Duration::from_secs(10), MetadataNode::start(c2, &tls)),
    );
    // Whichever asks first gets the clear error; the other may have asked
    // only after the first gave up, and then it is still waiting for a
    // majority that agrees — never forming a cluster either way.
    let mut refused = 0;
    for r in [r1, r2] {
        match r {
            Ok(Err(StartError::Config(msg))) => {
                assert!(msg.contains("disagrees"), "{msg}");
                refused += 1;
            }
            Ok(Err(e)) => panic!("wrong error: {e}"),
            Ok(Ok(_)) => panic!("a node started with a conflicting member list"),
            Err(_still_waiting) => {}
        }
    }
    assert!(
        refused >= 1,
        "no node reported the conflicting configuration"
    );
}
