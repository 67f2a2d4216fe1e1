//! One metadata node over real QUIC: KV, CAS, leases with ephemeral keys,
//! watches that resume, and restart from disk.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_metadata::{
    EventKind, MetadataClient, MetadataConfig, MetadataError, MetadataNode, Op, Txn,
};
use magnetar_proto::metadata_api::{MetaError, MetaRequest, MetaResponse};
use magnetar_proto::rpc::{client_endpoint, read_msg, write_msg, RpcClient};
use magnetar_proto::tls::TlsMaterial;

async fn start(dir: &std::path::Path) -> (std::sync::Arc<MetadataNode>, MetadataClient) {
    start_with(dir, |_| {}).await
}

async fn start_with(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut MetadataConfig),
) -> (std::sync::Arc<MetadataNode>, MetadataClient) {
    let tls = TlsMaterial::load_or_generate(&dir.join("tls")).unwrap();
    let mut cfg = MetadataConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    tweak(&mut cfg);
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

#[tokio::test]
async fn every_limit_is_enforced_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start_with(dir.path(), |cfg| {
        cfg.limits.max_key_bytes = 16;
        cfg.limits.max_value_bytes = 64;
        cfg.limits.max_txn_ops = 3;
        cfg.limits.max_watchers_per_connection = 2;
    })
    .await;
    fn limit<T: std::fmt::Debug>(r: Result<T, MetadataError>) -> String {
        match r {
            Err(MetadataError::Server(MetaError::Limit(why))) => why,
            other => panic!("expected a limit error, got {other:?}"),
        }
    }
    let why = limit(c.put("k", vec![0; 65]).await);
    assert!(why.contains("value 65 bytes"), "{why}");
    let why = limit(c.put(&"k".repeat(17), vec![]).await);
    assert!(why.contains("key 17 bytes"), "{why}");
    let put = |k: &str| Op::Put {
        key: k.into(),
        value: vec![],
        lease: None,
    };
    let why = limit(
        c.txn(Txn {
            compares: vec![],
            success: vec![put("a"), put("b"), put("c"), put("d")],
            failure: vec![],
        })
        .await,
    );
    assert!(why.contains("4 operations"), "{why}");
    // Within the limits everything works.
    c.put("k", vec![0; 64]).await.unwrap();

    // Watches: two per connection; the third is refused.
    let rpc = RpcClient::new(
        client_endpoint(&TlsMaterial::load_or_generate(&dir.path().join("tls")).unwrap()).unwrap(),
    );
    let mut streams = Vec::new();
    for i in 0..3 {
        let (mut send, mut recv) = rpc.open(node.local_addr()).await.unwrap();
        write_msg(
            &mut send,
            &MetaRequest::Watch {
                prefix: format!("w{i}/"),
                start_revision: 0,
            },
        )
        .await
        .unwrap();
        let first: MetaResponse = read_msg(&mut recv).await.unwrap().unwrap();
        streams.push((send, recv, first));
    }
    assert!(matches!(streams[0].2, MetaResponse::WatchStarted { .. }));
    assert!(matches!(streams[1].2, MetaResponse::WatchStarted { .. }));
    match &streams[2].2 {
        MetaResponse::Error(MetaError::Limit(why)) => {
            assert!(why.contains("the limit is 2"), "{why}")
        }
        other => panic!("third watch on one connection: {other:?}"),
    }
    node.shutdown().await;
}

/// A range larger than one message (twelve values of about 1 MB) is read in
/// pages: every key comes back, in order; a limit holds across pages; the
/// names alone come without values.
#[tokio::test]
async fn a_range_larger_than_a_message_comes_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start(dir.path()).await;
    let value = |i: usize| vec![i as u8; 1_000_000];
    for i in 0..12 {
        c.put(&format!("big/{i:02}"), value(i)).await.unwrap();
    }
    c.put("bigger", b"not under the prefix".to_vec())
        .await
        .unwrap();
    let all = c.range("big/", 0).await.unwrap();
    assert_eq!(all.len(), 12);
    for (i, kv) in all.iter().enumerate() {
        assert_eq!(
            (kv.key.as_str(), &kv.value),
            (format!("big/{i:02}").as_str(), &value(i))
        );
    }
    let some = c.range("big/", 5).await.unwrap();
    assert_eq!(some.len(), 5);
    assert_eq!(some[4].key, "big/04");
    let names = c.range_keys("big/").await.unwrap();
    assert_eq!(
        names,
        (0..12).map(|i| format!("big/{i:02}")).collect::<Vec<_>>()
    );
    // Asked for in one answer, it gets a clear error (the stream was cut).
    let rpc = RpcClient::new(
        client_endpoint(&TlsMaterial::load_or_generate(&dir.path().join("tls")).unwrap()).unwrap(),
    );
    let whole = MetaRequest::Range {
        prefix: "big/".into(),
        limit: 0,
    };
    match rpc.call::<_, MetaResponse>(node.local_addr(), &whole).await {
        Ok(MetaResponse::Error(MetaError::Limit(why))) => assert!(why.contains("pages"), "{why}"),
        other => panic!("{other:?}"),
    }
    node.shutdown().await;
}
