//! Mutual TLS between tiers: a peer whose certificate is not signed by the
//! cluster CA, or that presents none, is refused during the handshake with a
//! clear error on both sides of the refusal, and the server goes on serving
//! peers that present a valid one.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::time::Duration;

use magnetar_proto::rpc::{
    client_endpoint, respond, serve, server_endpoint, RpcClient, SERVER_NAME,
};
use magnetar_proto::tls::{TlsMaterial, ALPN};

/// A server of the cluster CA answering `echo <request>`.
async fn echo_server(tls: &TlsMaterial) -> (quinn::Endpoint, std::net::SocketAddr) {
    let ep = server_endpoint("127.0.0.1:0".parse().unwrap(), tls)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(serve(
        ep.clone(),
        "echo",
        |req: String, send, _conn| async move { respond(send, &format!("echo {req}")).await },
    ));
    (ep, addr)
}

/// A peer with `tls` still gets answers from the server at `addr`; then
/// the server closes.
async fn still_serves(ep: quinn::Endpoint, addr: std::net::SocketAddr, tls: &TlsMaterial) {
    let good = RpcClient::new(client_endpoint(tls).unwrap());
    let answer: String = good.call(addr, &"hi".to_string()).await.unwrap();
    assert_eq!(answer, "echo hi");
    ep.close(0u32.into(), b"done");
}

/// The error of a call with `tls` to `addr`, which must fail.
async fn refused_call(tls: &TlsMaterial, addr: std::net::SocketAddr) -> String {
    let mut client = RpcClient::new(client_endpoint(tls).unwrap());
    client.timeout = Duration::from_secs(5);
    client
        .call::<_, String>(addr, &"hi".to_string())
        .await
        .unwrap_err()
        .to_string()
}

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

    let (ep, addr) = echo_server(&server_tls).await;

    let err = refused_call(&bad_tls, addr).await;
    eprintln!("foreign certificate refused: {err}");
    assert!(
        err.contains("certificate") || err.contains("handshake") || err.contains("UnknownIssuer"),
        "unclear error for a foreign certificate: {err}"
    );

    // Our own client with a certificate from another CA while it trusts
    // the cluster CA (so the server's certificate passes): the server
    // refuses it, and the call's error says so.
    let misissued = TlsMaterial {
        ca: server_tls.ca.clone(),
        ..bad_tls
    };
    let err = refused_call(&misissued, addr).await;
    eprintln!("certificate of another CA refused by the server: {err}");
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "unclear error for a certificate the server refused: {err}"
    );

    still_serves(ep, addr, &good_tls).await;
}

/// A peer that trusts the cluster CA but presents no certificate of its own
/// (a TLS client without client authentication) gets no answer: the server
/// refuses the handshake, and the peer sees a certificate error, not a hang.
#[tokio::test]
async fn a_peer_without_a_certificate_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("cluster-ca");
    TlsMaterial::ensure_ca(&ca).unwrap();
    let server_tls = TlsMaterial::issue(&ca, &dir.path().join("server")).unwrap();
    let good_tls = TlsMaterial::issue(&ca, &dir.path().join("good")).unwrap();
    let (ep, addr) = echo_server(&server_tls).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_tls.ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut anonymous = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    anonymous.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));

    // TLS 1.3: the client finishes its side before the server has checked
    // it, so the refusal shows at the first use of a stream, and the
    // connection's close reason says why.
    let conn = anonymous.connect(addr, SERVER_NAME).unwrap().await.unwrap();
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"\0\0\0\x03abc").await?;
        send.finish()?;
        recv.read_to_end(1024).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("a peer without a certificate must be refused, not left hanging")
        .expect_err("a peer without a certificate got an answer");
    let err = conn.close_reason().expect("refused").to_string();
    eprintln!("no certificate refused: {err}");
    assert!(
        err.contains("certificate"),
        "unclear error for a missing certificate: {err}"
    );

    still_serves(ep, addr, &good_tls).await;
}
