//! A peer that crashes (no CONNECTION_CLOSE): its host's ICMP port
//! unreachable ends the client's connection at once; and when the peer
//! comes back on its address, its new endpoint resets the old connection
//! with a token the client accepts. Either way the client dials anew
//! instead of calling into the dead connection until the idle timeout.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::time::Duration;

use magnetar_proto::rpc::{
    client_endpoint, respond, serve, server_endpoint, RpcClient, RpcError, NOT_LISTENING_BACKOFF,
};
use magnetar_proto::tls::TlsMaterial;

/// A server that answers `n` with `n + tag`, on `bind`, run by `rt`.
fn start(rt: &tokio::runtime::Runtime, bind: SocketAddr, tls: &TlsMaterial, tag: u64) {
    let ep = rt.block_on(server_endpoint(bind, tls)).unwrap();
    rt.spawn(serve(ep, "add", move |n: u64, send, _| async move {
        respond(send, &(n + tag)).await
    }));
}

/// A server's first run (answering `n + 1`) in a runtime of its own, so
/// that it can vanish the way a killed process does — every task dropped,
/// nothing sent — and a client (in `rt`) that has called it once. The
/// client's calls end only by their connection's fate (a 60 s timeout).
struct Setup {
    _dir: tempfile::TempDir,
    server_tls: TlsMaterial,
    addr: SocketAddr,
    server: tokio::runtime::Runtime,
    rt: tokio::runtime::Runtime,
    client: RpcClient,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    TlsMaterial::ensure_ca(&ca).unwrap();
    let server_tls = TlsMaterial::issue(&ca, &dir.path().join("server")).unwrap();
    let client_tls = TlsMaterial::issue(&ca, &dir.path().join("client")).unwrap();
    let addr: SocketAddr = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let server = tokio::runtime::Runtime::new().unwrap();
    start(&server, addr, &server_tls, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = RpcClient::new(rt.block_on(async { client_endpoint(&client_tls) }).unwrap());
    client.timeout = Duration::from_secs(60);
    let got: u64 = rt.block_on(client.call(addr, &41u64)).unwrap();
    assert_eq!(got, 42);
    Setup {
        _dir: dir,
        server_tls,
        addr,
        server,
        rt,
        client,
    }
}

#[test]
fn a_restarted_peer_resets_its_old_connections() {
    let Setup {
        _dir,
        server_tls,
        addr,
        server: first,
        rt,
        client,
    } = setup();
    first.shutdown_background();
    let second = tokio::runtime::Runtime::new().unwrap();
    start(&second, addr, &server_tls, 2);

    // The old connection is dead. A call on it ends with the reset (or, if
    // a keep-alive drew the reset first, goes out on a new connection);
    // before resets were accepted it waited out the 10 s idle timeout.
    match rt.block_on(client.call::<u64, u64>(addr, &40)) {
        Ok(got) => assert_eq!(got, 42, "answered by the restarted server"),
        Err(RpcError::Connection(quinn::ConnectionError::Reset)) => {}
        // Packets that reached the port while nothing was bound there: the
        // client leaves the peer alone for a moment.
        Err(RpcError::NotListening(a)) => {
            assert_eq!(a, addr);
            std::thread::sleep(NOT_LISTENING_BACKOFF);
        }
        Err(e) => panic!("the old connection ended otherwise than by a reset: {e}"),
    }
    let got: u64 = rt.block_on(client.call(addr, &40u64)).unwrap();
    assert_eq!(got, 42, "the next call reaches the restarted server");
}

/// A peer that crashes and stays down: its host answers the client's next
/// packets with ICMP port unreachable, and the call waiting on the dead
/// connection fails with that at once (before, it waited for the idle
/// timeout, 10 s). The next call dials anew.
#[test]
fn a_call_to_a_crashed_peer_fails_at_once() {
    let Setup {
        _dir,
        addr,
        server,
        rt,
        mut client,
        ..
    } = setup();
    server.shutdown_background();
    match rt.block_on(client.call::<u64, u64>(addr, &1)) {
        Err(RpcError::NotListening(a)) => assert_eq!(a, addr),
        other => panic!("expected the dead peer to be reported as not listening: {other:?}"),
    }
    // The peer stays gone: within the back-off the client does not dial it
    // again; after it, a new dial is refused or goes unanswered.
    client.connect_timeout = Duration::from_millis(500);
    assert!(rt.block_on(client.call::<u64, u64>(addr, &1)).is_err());
}
