//! Three `magnetar metadata --config` processes: kill -9 the leader during a
//! stream of CAS writes. Writing resumes through the survivors, no
//! acknowledged write is lost, none applies twice, and the killed node
//! catches up when it comes back. Then `magnetar admin metadata` adds a
//! fourth node process and removes the leader, as an operator would.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::time::Duration;

use magnetar_metadata::MetadataClient;
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;
use magnetar_tests::{admin, free_tcp_port, free_udp_port, init_logs, Member};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_metadata_leader() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    TlsMaterial::ensure_ca(&ca).unwrap();
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_udp_port())))
        .collect();
    let members: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[{}, \"{a}\"]", i + 1))
        .collect();
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        nodes.push(spawn_node(dir.path(), &ca, i as u64 + 1, *addr, &members));
    }
    let tls = TlsMaterial::issue(&ca, &dir.path().join("client")).unwrap();
    let c = MetadataClient::new(
        RpcClient::new(client_endpoint(&tls).unwrap()),
        addrs.clone(),
    );
    // Formed: the first write goes through.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.cas("counter", 0, b"0".to_vec(), None).await {
            Ok(true) => break,
            r => assert!(Instant::now() < deadline, "cluster did not form: {r:?}"),
        }
    }
    let mut version = 1;
    let mut acked = 0u64;
    let cas_next = async |version: &mut u64, acked: &mut u64| {
        let v = (*acked + 1).to_string().into_bytes();
        assert!(c.cas("counter", *version, v, None).await.unwrap());
        *version += 1;
        *acked += 1;
    };
    for _ in 0..100 {
        cas_next(&mut version, &mut acked).await;
    }
    let leader = c.status().await.unwrap().leader.unwrap();
    nodes[(leader - 1) as usize].kill9();
    let killed = Instant::now();
    cas_next(&mut version, &mut acked).await;
    let outage = killed.elapsed();
    for _ in 0..100 {
        cas_next(&mut version, &mut acked).await;
    }
    let kv = c.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.version, acked + 1, "one version per acknowledged CAS");
    assert_eq!(kv.value, acked.to_string().into_bytes());
    eprintln!("first write after kill -9 of the leader: {outage:?}");
    assert!(outage < Duration::from_secs(10), "took {outage:?}");

    // The killed node comes back and catches up.
    nodes[(leader - 1) as usize].restart();
    let revision = c.status().await.unwrap().revision;
    let back = addrs[(leader - 1) as usize];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = c.status_of(back).await {
            if s.revision >= revision && s.leader.is_some() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An operator adds a fourth node and removes the current leader.
    let addr4 = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    nodes.push(spawn_node(dir.path(), &ca, 4, addr4, &members));
    let client_tls = dir.path().join("client");
    let out = admin(
        &client_tls,
        &addrs,
        &[
            "metadata",
            "add-node",
            "--id",
            "4",
            "--addr",
            &addr4.to_string(),
        ],
    );
    assert!(out.contains("node 4"), "{out}");
    let mut all = addrs.clone();
    all.push(addr4);
    let status = admin(&client_tls, &all, &["metadata", "status"]);
    assert!(status.contains("voters=[1, 2, 3, 4]"), "{status}");
    let leader = c.status().await.unwrap().leader.unwrap();
    admin(
        &client_tls,
        &all,
        &["metadata", "remove-node", "--id", &leader.to_string()],
    );
    nodes[(leader - 1) as usize].kill9();
    all.remove((leader - 1) as usize);
    let c = MetadataClient::new(RpcClient::new(client_endpoint(&tls).unwrap()), all.clone());
    assert!(c
        .cas("after-removal", 0, b"1".to_vec(), None)
        .await
        .unwrap());
    let s = c.status().await.unwrap();
    assert_eq!(s.voters.len(), 3, "{s:?}");
    assert!(!s.voters.contains(&leader));
}

/// Starts `magnetar metadata` node `id` with its own directory, certificate
/// and config naming `members` as the initial members.
fn spawn_node(
    dir: &std::path::Path,
    ca: &std::path::Path,
    id: u64,
    addr: SocketAddr,
    members: &[String],
) -> Member {
    let node_dir = dir.join(format!("metadata-{id}"));
    TlsMaterial::issue(ca, &node_dir.join("tls")).unwrap();
    let config = node_dir.join("metadata.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = {id}\nlisten = \"{addr}\"\nhttp_listen = \"127.0.0.1:{}\"\n\
             data_dir = \"{}\"\ninitial_members = [{}]\n[tls]\ndir = \"{}\"\n",
            free_tcp_port(),
            node_dir.join("data").display(),
            members.join(", "),
            node_dir.join("tls").display()
        ),
    )
    .unwrap();
    Member::spawn("metadata", &config, &node_dir.join("metadata.log"))
}
