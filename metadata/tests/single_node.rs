//! One metadata node over real QUIC: KV, CAS, leases with ephemeral keys,
//! watches that resume, and restart from disk.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_metadata::{EventKind, MetadataClient, MetadataConfig, MetadataNode};
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

async fn start(dir: &std::path::Path) -> (std::sync::Arc<MetadataNode>, MetadataClient) {
    let tls = TlsMaterial::load_or_generate(&dir.join("tls")).unwrap();
    let cfg = MetadataConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    let node = MetadataNode::start(cfg, &tls).await.unwrap();
    assert!(node.wait_for_leader(Duration::from_secs(10)).await);
    let client = MetadataClient::new(
        RpcClient::new(client_endpoint(&tls).unwrap()),
        vec![node.local_addr()],
    );
    (node, client)
}

#[tokio::test]
async fn kv_cas_lease_watch_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start(dir.path()).await;
    assert!(c.cas("a/1", 0, b"x".to_vec(), None).await.unwrap());
    assert!(
        !c.cas("a/1", 0, b"y".to_vec(), None).await.unwrap(),
        "create-if-absent must fail the second time"
    );
    assert!(c.cas("a/1", 1, b"y".to_vec(), None).await.unwrap());
    let kv = c.get("a/1").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"y"[..], 2));

    let mut w = c.watch("eph/", 0);
    // Let the watch register before the changes it must see.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = c.grant_lease(500).await.unwrap();
    assert!(c
        .cas("eph/broker-1", 0, b"me".to_vec(), Some(lease.id))
        .await
        .unwrap());
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind, ev.kv.key.as_str()),
        (EventKind::Put, "eph/broker-1")
    );
    // Kept alive: survives several TTLs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(c.get("eph/broker-1").await.unwrap().is_some());
    // Stop keep-alives: gone after the TTL, and the watcher hears it.
    drop(lease);
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind, ev.kv.key.as_str()),
        (EventKind::Delete, "eph/broker-1")
    );
    assert!(c.get("eph/broker-1").await.unwrap().is_none());

    // Resume from a revision: exactly the events after it.
    let r1 = c.put("r/k", b"1".to_vec()).await.unwrap();
    let r2 = c.put("r/k", b"2".to_vec()).await.unwrap();
    let mut w2 = c.watch("r/", r1 + 1);
    let ev = tokio::time::timeout(Duration::from_secs(5), w2.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision, r2);
    assert_eq!(ev.kv.value, b"2");

    node.shutdown().await;
    drop(node);
    let (node, c) = start(dir.path()).await;
    let kv = c.get("a/1").await.unwrap().unwrap();
    assert_eq!(kv.value, b"y", "committed data survives restart");
    assert_eq!(c.range("a/", 0).await.unwrap().len(), 1);
    node.shutdown().await;
}
