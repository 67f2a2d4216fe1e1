//! Peers that are not listening any more, as the kernel learns it from ICMP
//! "port unreachable": the fast way to notice a peer process that died.
//!
//! TCP tells a client at once that its server process died (the kernel
//! answers with a reset); QUIC over UDP, left to itself, notices only when
//! a call or the idle timeout runs out. But the dead process's host still
//! answers datagrams to its closed port with ICMP port unreachable (at once
//! on loopback and on a live host; a host that is down answers nothing and
//! the timeouts stay the only signal). Each endpoint's socket asks for
//! those errors (`IP_RECVERR`), a task reads them from the socket's error
//! queue, and [`RpcClient`](crate::rpc::RpcClient)s of that endpoint close
//! their connection to the peer, so that calls waiting on it fail at once
//! and the next call dials anew.
//!
//! ICMP is not authenticated. A forged "port unreachable" costs one
//! connection (the caller redials; a ledger writer moves to another
//! bookie), never data, so it is taken as a hint, as RFC 9000 §14.2.1
//! allows.
//!
//! The price: with `IP_RECVERR` each ICMP error also sets the socket's
//! pending error, and the next send on the socket — whatever its
//! destination — fails with it (quinn-udp logs "sendmsg error: Connection
//! refused", rate-limited, and QUIC resends the datagram as lost). So
//! [`RpcClient`](crate::rpc::RpcClient) does not dial a peer found not
//! listening again for [`NOT_LISTENING_BACKOFF`](crate::rpc::NOT_LISTENING_BACKOFF).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::sync::broadcast;

/// Destination unreachable / port unreachable, in ICMP and in ICMPv6.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
/// Control-message room per read of the error queue.
const CMSG_BYTES: usize = 512;

type Senders = HashMap<SocketAddr, broadcast::Sender<SocketAddr>>;

/// The live endpoints' announcements, by the endpoint's local address.
fn registry() -> &'static Mutex<Senders> {
    static REGISTRY: std::sync::OnceLock<Mutex<Senders>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, Senders> {
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

/// Peers found not listening by the endpoint bound to `local`, from now on
/// (None if that endpoint watches for none).
pub(crate) fn subscribe(local: SocketAddr) -> Option<broadcast::Receiver<SocketAddr>> {
    lock().get(&local).map(|s| s.subscribe())
}

/// Watches an endpoint's socket; dropped with the endpoint's socket, it
/// stops the watching task (which holds a duplicate of the socket) and
/// takes the endpoint out of the registry.
#[derive(Debug)]
pub(crate) struct Watch {
    local: SocketAddr,
    sender: broadcast::Sender<SocketAddr>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut g = lock();
        if g.get(&self.local)
            .is_some_and(|s| s.same_channel(&self.sender))
        {
            g.remove(&self.local);
        }
    }
}

/// Starts watching `socket` (bound, not yet handed to quinn) for ICMP port
/// unreachable. Returns None — and leaves the socket as it was — where that
/// cannot be set up (outside a tokio runtime, say); the socket then works
/// as before.
pub(crate) fn watch(socket: &socket2::Socket) -> Option<Watch> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let local = socket.local_addr().ok()?.as_socket()?;
    let dup: std::net::UdpSocket = socket.try_clone().ok()?.into();
    let asked = if local.is_ipv4() {
        setsockopt(&dup, sockopt::Ipv4RecvErr, &true)
    } else {
        setsockopt(&dup, sockopt::Ipv6RecvErr, &true)
    };
    if let Err(e) = asked {
        tracing::debug!(error = %e, "cannot ask for ICMP errors on a QUIC socket");
        return None;
    }
    let watched = match dup
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UdpSocket::from_std(dup))
    {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch a QUIC socket for ICMP errors");
            // Unread errors would take space from received datagrams.
            let off = if local.is_ipv4() {
                setsockopt(socket, sockopt::Ipv4RecvErr, &false)
            } else {
                setsockopt(socket, sockopt::Ipv6RecvErr, &false)
            };
            if let Err(e) = off {
                tracing::warn!(error = %e, "cannot turn ICMP errors off again on a QUIC socket");
            }
            return None;
        }
    };
    let (sender, _) = broadcast::channel(64);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    lock().insert(local, sender.clone());
    runtime.spawn(run(watched, sender.clone(), stopped));
    Some(Watch {
        local,
        sender,
        _stop: stop,
    })
}

async fn run(
    socket: tokio::net::UdpSocket,
    sender: broadcast::Sender<SocketAddr>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            ready = socket.ready(Interest::ERROR) => {
                if let Err(e) = ready {
                    tracing::warn!(error = %e, "watching a QUIC socket for ICMP errors failed");
                    return;
                }
            }
        }
        // Read to the end, then clear the readiness (an error queued
        // meanwhile sets it again).
        let mut peers = Vec::new();
        let _ = socket.try_io(Interest::ERROR, || {
            drain(&socket, &mut peers);
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        for peer in peers {
            tracing::debug!(%peer, "ICMP port unreachable: the peer is not listening");
            // Nobody listening is fine: no client of this endpoint cares.
            let _ = sender.send(peer);
        }
    }
}

/// Reads the socket's error queue to its end; adds to `peers` the
/// destinations that answered "port unreachable" (other errors — MTU probes too large,
/// hosts unreachable — are read and dropped: quinn has its own signals).
fn drain(socket: &tokio::net::UdpSocket, peers: &mut Vec<SocketAddr>) {
    let mut payload = [0u8; 64];
    // Room for the error and the offender's address, and for the other
    // control messages quinn asked for on the socket (packet info, TOS…).
    let mut cmsg = Vec::with_capacity(CMSG_BYTES);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut payload)];
        let msg = match recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "reading a QUIC socket's error queue");
                break;
            }
        };
        let Ok(cmsgs) = msg.cmsgs() else {
            continue;
        };
        let unreachable = cmsgs.into_iter().any(|c| match c {
            ControlMessageOwned::Ipv4RecvErr(e, _) => {
                e.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP
                    && e.ee_type == ICMP_DEST_UNREACH
                    && e.ee_code == ICMP_PORT_UNREACH
            }
            ControlMessageOwned::Ipv6RecvErr(e, _) => {
                e.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP6
                    && e.ee_type == ICMP6_DEST_UNREACH
                    && e.ee_code == ICMP6_PORT_UNREACH
            }
            _ => false,
        });
        let peer = msg.address.and_then(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(SocketAddr::V4((*v4).into()))
            } else {
                a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
            }
        });
        if let (true, Some(peer)) = (unreachable, peer) {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
    }
}
