//! Message framing over QUIC streams: a body of many megabytes (arriving in
//! many chunks) decodes whole, and the connection loses no packet doing so;
//! a body with bytes after the message, or one shorter than its length
//! prefix, is refused as malformed — the server resets the stream and goes
//! on serving.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use magnetar_proto::rpc::{
    client_endpoint, encode, respond, serve, server_endpoint, RpcClient, MAX_UDP_PAYLOAD,
};
use magnetar_proto::tls::TlsMaterial;

/// A server on loopback that answers a byte vector with its length and a
/// checksum of what it decoded, and a client of it (both with certificates
/// of one CA kept in the returned directory).
async fn served() -> (
    tempfile::TempDir,
    quinn::Endpoint,
    std::net::SocketAddr,
    RpcClient,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    TlsMaterial::ensure_ca(&ca).unwrap();
    let server_tls = TlsMaterial::issue(&ca, &dir.path().join("server")).unwrap();
    let client_tls = TlsMaterial::issue(&ca, &dir.path().join("client")).unwrap();
    let ep = server_endpoint("127.0.0.1:0".parse().unwrap(), &server_tls)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(serve(
        ep.clone(),
        "sum",
        |req: Vec<u8>, send, _conn| async move {
            let sum = req.iter().map(|b| *b as u64).sum::<u64>();
            respond(send, &(req.len(), sum)).await
        },
    ));
    let client = RpcClient::new(client_endpoint(&client_tls).unwrap());
    (dir, ep, addr, client)
}

#[tokio::test]
async fn large_bodies_decode_and_malformed_ones_are_refused() {
    let (_dir, ep, addr, client) = served().await;

    let big: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let want = (big.len(), big.iter().map(|b| *b as u64).sum::<u64>());
    for _ in 0..4 {
        let got: (usize, u64) = client.call(addr, &big).await.unwrap();
        assert_eq!(got, want);
    }
    // Loopback loses nothing and carries 64 KiB packets: a loss here is the
    // sender's own doing (a GSO batch over 64 KiB, dropped silently), and
    // losses make quinn fall back to 1,200-byte packets.
    let path = client.connection_stats(addr).unwrap().path;
    assert_eq!(path.lost_packets, 0, "packets lost on loopback: {path:?}");
    assert_eq!(path.current_mtu, MAX_UDP_PAYLOAD, "{path:?}");

    // Bytes after the message, counted in the length prefix.
    let mut frame = encode(&vec![1u8, 2, 3]).unwrap();
    frame.extend_from_slice(&[9, 9]);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let (mut send, mut recv) = client.open(addr).await.unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    assert!(
        recv.read_to_end(1024).await.is_err(),
        "trailing bytes refused"
    );

    // A body shorter than its length prefix.
    let mut frame = encode(&vec![1u8, 2, 3]).unwrap();
    let len = (frame.len() - 4 + 10) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let (mut send, mut recv) = client.open(addr).await.unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    assert!(recv.read_to_end(1024).await.is_err(), "short body refused");

    // The server still serves.
    let got: (usize, u64) = client.call(addr, &vec![5u8; 10]).await.unwrap();
    assert_eq!(got, (10, 50));
    ep.close(0u32.into(), b"done");
}

/// Not a check: prints how long the first calls on a new connection take
/// (path MTU discovery probes during them) and the time for 400 small
/// calls, one at a time. Run with
/// `cargo test --release -p magnetar-proto --test rpc_framing -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn first_calls_on_a_new_connection() {
    let (_dir, ep, addr, client) = served().await;
    let started = std::time::Instant::now();
    let mut first = Vec::new();
    for i in 0..400 {
        let size = if i % 10 == 0 { 20_000 } else { 1_000 };
        let t = std::time::Instant::now();
        let got: (usize, u64) = client.call(addr, &vec![1u8; size]).await.unwrap();
        assert_eq!(got, (size, size as u64));
        if i < 3 {
            first.push(t.elapsed());
        }
    }
    let path = client.connection_stats(addr).unwrap().path;
    println!(
        "first calls {first:?}; 400 calls in {:?}; path MTU {}, lost {}",
        started.elapsed(),
        path.current_mtu,
        path.lost_packets
    );
    ep.close(0u32.into(), b"done");
}
