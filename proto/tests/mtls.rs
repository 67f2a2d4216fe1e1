//! Mutual TLS between tiers: a peer whose certificate is not signed by the
//! cluster CA is refused during the handshake with a clear error, and the
//! server goes on serving peers that present a valid one.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_proto::rpc::{client_endpoint, respond, serve, server_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster-ca");
    let other = dir.path().join("other-ca");
    TlsMaterial::ensure_ca(&cluster).unwrap();
    TlsMaterial::ensure_ca(&other).unwrap();
    let server_tls = TlsMaterial::issue(&cluster, &dir.path().join("server")).unwrap();
    let good_tls = TlsMaterial::issue(&cluster, &dir.path().join("good")).unwrap();
    let bad_tls = TlsMaterial::issue(&other, &dir.path().join("bad")).unwrap();

    let ep = server_endpoint("127.0.0.1:0".parse().unwrap(), &server_tls)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(serve(
        ep.clone(),
        "echo",
        |req: String, send, _conn| async move { respond(send, &format!("echo {req}")).await },
    ));

    let mut bad = RpcClient::new(client_endpoint(&bad_tls).unwrap());
    bad.timeout = Duration::from_secs(5);
    let err = bad
        .call::<_, String>(addr, &"hi".to_string())
        .await
        .unwrap_err()
        .to_string();
    eprintln!("foreign certificate refused: {err}");
    assert!(
        err.contains("certificate") || err.contains("handshake") || err.contains("UnknownIssuer"),
        "unclear error for a foreign certificate: {err}"
    );

    let good = RpcClient::new(client_endpoint(&good_tls).unwrap());
    let answer: String = good.call(addr, &"hi".to_string()).await.unwrap();
    assert_eq!(answer, "echo hi");
    ep.close(0u32.into(), b"done");
}
