//! Framing for Magnetar's internal protocols (ledger and metadata) over QUIC
//! streams: `[u32 length][bincode body]`, each length bounded before reading.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bincode::Options;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::tls::TlsMaterial;

/// Largest internal message: an entry of the maximum Pulsar frame plus headers.
pub const MAX_RPC_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
pub const SERVER_NAME: &str = "magnetar";
/// Largest UDP payload path MTU discovery tries: the IPv4 maximum, which
/// loopback carries (its MTU is 64 KiB). On a real network the probes
/// above the path's MTU are refused by the kernel (quinn-udp sets the
/// don't-fragment flag) or lost, and discovery settles at what the path
/// takes — 8,953 bytes on a 9,001-byte jumbo-frame VPC, 1,452 on a
/// 1,500-byte one.
pub const MAX_UDP_PAYLOAD: u16 = 65_507;
/// Largest UDP datagram the kernel takes in one send, GSO batches included.
const MAX_DATAGRAM_BYTES: usize = 65_507;
/// Socket buffers asked for on every QUIC endpoint.
pub const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream closed before a response arrived")]
    Closed,
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0} is not listening (ICMP port unreachable): the process there is gone")]
    NotListening(SocketAddr),
    #[error("tls: {0}")]
    Tls(String),
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_RPC_MESSAGE_BYTES as u64)
}

/// `[u32 length][body]` as a vector (for callers that build frames by hand).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, RpcError> {
    Ok(encode_frame(msg)?.to_vec())
}

/// `[u32 length][body]` in a buffer of the pool (see [`BufferPool`]); the
/// body is sized first, so that it is written once, after its length, into
/// room reserved for it.
fn encode_frame<T: Serialize>(msg: &T) -> Result<Bytes, RpcError> {
    let size = codec().serialized_size(msg).map_err(encode_error)? as usize;
    let mut buf = POOL.take(4 + size);
    buf.extend_from_slice(&(size as u32).to_be_bytes());
    codec()
        .serialize_into((&mut buf).writer(), msg)
        .map_err(encode_error)?;
    Ok(POOL.lend(buf))
}

fn encode_error(e: bincode::Error) -> RpcError {
    RpcError::Decode(e.to_string())
}

/// Buffers of large messages, kept for reuse: an add batch or a range
/// answer is about a megabyte, and a fresh buffer for each one cost page
/// faults — the allocator hands such freed blocks back to the kernel, and
/// zeroing the (huge) pages they come back as was a tenth of a ledger
/// client's CPU. A buffer returns here as soon as it is lent out; it is
/// taken again only once every `Bytes` of it (quinn's copy of a frame
/// until it is acknowledged, an add's payload until it is journaled) has
/// been dropped.
struct BufferPool {
    idle: Mutex<Vec<BytesMut>>,
}

/// Messages smaller than this get a buffer of their own.
const POOLED_MIN_BYTES: usize = 64 * 1024;
/// Buffers larger than this are not kept.
const POOLED_MAX_BYTES: usize = 2 * 1024 * 1024;
/// Most buffers kept (with [`POOLED_MAX_BYTES`]: 32 MiB at most).
const POOLED_BUFFERS: usize = 16;

static POOL: BufferPool = BufferPool {
    idle: Mutex::new(Vec::new()),
};

impl BufferPool {
    /// An empty buffer with room for `size` bytes: a kept one that is free
    /// again and large enough, or a new one.
    fn take(&self, size: usize) -> BytesMut {
        if (POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&size) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = idle.iter_mut().rposition(|b| b.try_reclaim(size)) {
                return idle.swap_remove(i);
            }
        }
        BytesMut::with_capacity(size)
    }

    /// Freezes what `buf` holds and keeps the buffer for reuse once the
    /// returned bytes (and every slice of them) are dropped.
    fn lend(&self, mut buf: BytesMut) -> Bytes {
        let size = buf.len();
        let out = buf.split().freeze();
        if (POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&size) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() == POOLED_BUFFERS {
                idle.remove(0);
            }
            idle.push(buf);
        }
        out
    }
}

pub async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), RpcError> {
    // Handed to quinn as is, not copied into its buffer.
    send.write_chunk(encode_frame(msg)?).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` when the peer finished the stream cleanly.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, RpcError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > MAX_RPC_MESSAGE_BYTES {
        return Err(RpcError::TooLarge {
            size,
            limit: MAX_RPC_MESSAGE_BYTES,
        });
    }
    // A body that came in one chunk is decoded where it is; a longer one is
    // gathered into one buffer first (one copy), because decoding through
    // a reader that walks the chunks field by field cost more than that.
    // Either way, fields marked `shared_bytes` come out as slices of it.
    let mut first: Option<Bytes> = None;
    let mut gathered = BytesMut::new();
    let mut got = 0;
    while got < size {
        let chunk = match recv.read_chunk(size - got, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return Err(quinn::ReadExactError::FinishedEarly(got).into()),
            Err(e) => return Err(quinn::ReadExactError::ReadError(e).into()),
        };
        got += chunk.len();
        if got == chunk.len() {
            if got == size {
                first = Some(chunk);
                break;
            }
            gathered = POOL.take(size);
        }
        gathered.extend_from_slice(&chunk);
    }
    let body = first.unwrap_or_else(|| POOL.lend(gathered));
    // The codec refuses bytes after the message.
    let msg = crate::shared_bytes::decode(&body, |b| codec().deserialize(b))
        .map_err(|e| RpcError::Decode(e.to_string()))?;
    Ok(Some(msg))
}

/// Stream reset code for a request that does not decode.
pub const RESET_BAD_REQUEST: u32 = 1;

/// Writes one answer and finishes the stream.
pub async fn respond<T: Serialize>(mut send: quinn::SendStream, msg: &T) {
    if write_msg(&mut send, msg).await.is_ok() {
        let _ = send.finish();
    }
}

/// What a service knows about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Long-lived streams (watches) the connection holds; the service counts
    /// them to enforce a per-connection limit.
    pub long_streams: std::sync::atomic::AtomicUsize,
}

/// Serves an internal protocol: for every bidirectional stream of every
/// connection to `endpoint`, in its own task, reads one request and hands it
/// with the stream's send half and the connection's [`ConnInfo`] to `handle`
/// (which answers once with [`respond`], or streams several answers). A
/// request that does not decode is logged and its stream reset. Returns when
/// the endpoint closes.
pub async fn serve<Req, F, Fut>(endpoint: quinn::Endpoint, service: &'static str, handle: F)
where
    Req: DeserializeOwned + Send + 'static,
    F: Fn(Req, quinn::SendStream, Arc<ConnInfo>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(service, error = %e, "connection refused during handshake");
                    return;
                }
            };
            let peer = conn.remote_address();
            let info = Arc::new(ConnInfo {
                peer,
                long_streams: Default::default(),
            });
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let handle = handle.clone();
                let info = info.clone();
                tokio::spawn(async move {
                    match read_msg::<Req>(&mut recv).await {
                        Ok(Some(req)) => handle(req, send, info).await,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(service, %peer, error = %e, "malformed request");
                            let _ = send.reset(RESET_BAD_REQUEST.into());
                        }
                    }
                });
            }
        });
    }
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into());
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Let path MTU discovery find the largest packets the path carries
    // (cloud VPCs: 9,001-byte jumbo frames; loopback: 64 KiB) — every
    // packet costs its header, AEAD set-up, acknowledgement and loss
    // tracking, and the peer's wake-up, so entry traffic wants few large
    // ones. Probes that do not fit are lost harmlessly.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    // Loss under congestion can look like a black hole and drop the MTU to
    // 1,200 bytes; look again soon rather than after quinn's minute.
    mtu.black_hole_cooldown(Duration::from_secs(5));
    t.mtu_discovery_config(Some(mtu));
    // Default quinn idle timeout; a dead peer is noticed within it.
    if let Ok(idle) = Duration::from_secs(10).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// An endpoint configuration whose connection IDs and stateless-reset
/// tokens are keyed by secrets derived from the node's TLS private key, so
/// that they are the same in every run of the node.
///
/// A node killed with SIGKILL sends no CONNECTION_CLOSE: its peers keep the
/// old connections and their calls go unanswered until the idle timeout.
/// When the node comes back on its address, its new endpoint answers the
/// old connections' packets with stateless resets — if it recognises their
/// connection IDs as its own (quinn drops packets whose ID fails its
/// generator's keyed check) — and a peer accepts a reset only if its token
/// matches the one the old endpoint issued. With quinn's defaults (random
/// keys per endpoint) neither holds; with these keys the peer drops the dead
/// connection at its next packet (a keep-alive within a second) and dials
/// anew.
fn keyed_endpoint_config(tls: &TlsMaterial) -> quinn::EndpointConfig {
    use aws_lc_rs::hmac;
    let secret = hmac::Key::new(hmac::HMAC_SHA256, tls.key.secret_der());
    let reset = hmac::sign(&secret, b"magnetar quic stateless-reset key v1");
    let cid = hmac::sign(&secret, b"magnetar quic connection-id key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg =
        quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// A UDP socket bound to `bind` as a QUIC endpoint that takes datagrams up
/// to [`MAX_UDP_PAYLOAD`] (quinn's default stops at 1472 bytes).
fn endpoint(
    server: Option<quinn::ServerConfig>,
    bind: SocketAddr,
    tls: &TlsMaterial,
) -> std::io::Result<quinn::Endpoint> {
    let mut cfg = keyed_endpoint_config(tls);
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Bursts of entry traffic overflow the default (~200 KiB) buffers; a
    // dropped datagram costs a QUIC loss-recovery round. The kernel caps
    // these at net.core.{r,w}mem_max; failing to raise them is not fatal.
    for (what, res) in [
        ("receive", socket.set_recv_buffer_size(UDP_BUFFER_BYTES)),
        ("send", socket.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(e) = res {
            tracing::debug!(error = %e, "cannot raise the UDP {what} buffer");
        }
    }
    socket.bind(&bind.into())?;
    let watch = crate::unreachable::watch(&socket);
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket.into())?;
    let socket = GsoSplit {
        socket,
        _watch: watch,
    };
    quinn::Endpoint::new_with_abstract_socket(cfg, server, Arc::new(socket), runtime)
}

/// The endpoint's socket, sending a segmentation-offload (GSO) batch that
/// exceeds one UDP datagram as several sends. quinn batches up to 10
/// packets of the path MTU; past 64 KiB (seven jumbo packets, or two of
/// loopback's) the kernel refuses the whole batch with `EMSGSIZE`, and
/// quinn-udp drops it silently (it takes that error for a lost MTU probe;
/// quinn PR #2199) — bursts of loss on every busy connection, and quinn's
/// black-hole detection falling back to 1,200-byte packets.
///
/// It also keeps the socket's watch for ICMP port unreachable
/// ([`crate::unreachable`]) alive for as long as the socket.
#[derive(Debug)]
struct GsoSplit {
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    _watch: Option<crate::unreachable::Watch>,
}

/// `contents` cut into sends of whole `segment`-byte packets that each fit
/// one datagram (a packet larger than that goes alone).
fn gso_sends(contents: &[u8], segment: usize) -> impl Iterator<Item = &[u8]> {
    let segment = segment.max(1);
    let per_send = (MAX_DATAGRAM_BYTES / segment).max(1) * segment;
    contents.chunks(per_send)
}

impl quinn::AsyncUdpSocket for GsoSplit {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.socket.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let segment = match transmit.segment_size {
            Some(s) if transmit.contents.len() > MAX_DATAGRAM_BYTES => s,
            _ => return self.socket.try_send(transmit),
        };
        for (i, part) in gso_sends(transmit.contents, segment).enumerate() {
            let t = quinn::udp::Transmit {
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                ..*transmit
            };
            match self.socket.try_send(&t) {
                Ok(()) => {}
                // Nothing sent yet: quinn waits until the socket is
                // writable and tries the whole batch again.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went out: the rest counts as lost and
                // QUIC's loss recovery resends it.
                Err(e) => {
                    tracing::debug!(error = %e, "part of a GSO batch not sent");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.socket.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.socket.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.socket.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.socket.may_fragment()
    }
}

/// A QUIC endpoint that accepts connections with mutual TLS.
pub async fn server_endpoint(
    bind: SocketAddr,
    tls: &TlsMaterial,
) -> Result<quinn::Endpoint, RpcError> {
    let crypto = tls.quic_server_config()?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    // A previous endpoint on this port (an in-process restart) may take a
    // moment to release its socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut ep = loop {
        match endpoint(Some(cfg.clone()), bind, tls) {
            Ok(ep) => break ep,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(RpcError::Connect {
                    addr: bind,
                    reason: e.to_string(),
                })
            }
        }
    };
    ep.set_default_client_config(client_config(tls)?);
    Ok(ep)
}

fn client_config(tls: &TlsMaterial) -> Result<quinn::ClientConfig, RpcError> {
    let crypto = tls.quic_client_config()?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A client endpoint bound to an ephemeral loopback-or-any port.
pub fn client_endpoint(tls: &TlsMaterial) -> Result<quinn::Endpoint, RpcError> {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut ep = endpoint(None, bind, tls).map_err(|e| RpcError::Connect {
        addr: bind,
        reason: e.to_string(),
    })?;
    ep.set_default_client_config(client_config(tls)?);
    Ok(ep)
}

/// How long after its host said nothing listens there a peer is not
/// dialled again (calls fail with [`RpcError::NotListening`] meanwhile).
pub const NOT_LISTENING_BACKOFF: Duration = Duration::from_millis(500);

/// Request/response calls over QUIC: one bidirectional stream per request,
/// one cached connection per peer, re-established when it dies.
#[derive(Clone)]
pub struct RpcClient {
    endpoint: quinn::Endpoint,
    conns: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    /// One connection attempt per peer at a time: concurrent calls to a
    /// peer without a connection wait for the one handshake.
    dialing: Arc<Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>>,
    /// Budget of a whole call (connect, request, answer).
    pub timeout: Duration,
    /// Budget of establishing a connection (within `timeout`): a peer that
    /// is down does not answer the handshake at all.
    pub connect_timeout: Duration,
    /// Peers whose host said nothing listens there any more, and when (until
    /// a new connection to them succeeds).
    gone: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
    /// Whether the task that closes connections to dead peers runs (it is
    /// started with the first connection, inside the runtime).
    watching: Arc<std::sync::atomic::AtomicBool>,
}

impl RpcClient {
    pub fn new(endpoint: quinn::Endpoint) -> RpcClient {
        RpcClient {
            endpoint,
            conns: Arc::default(),
            dialing: Arc::default(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            gone: Arc::default(),
            watching: Arc::default(),
        }
    }

    /// Closes the connection to a peer as soon as the endpoint's socket
    /// hears that nothing listens at its address (the process died): calls
    /// waiting on it fail with [`RpcError::NotListening`] rather than at
    /// their timeout. The task ends with the endpoint or with the client.
    fn close_on_port_unreachable(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(mut peers) = self
            .endpoint
            .local_addr()
            .ok()
            .and_then(crate::unreachable::subscribe)
        else {
            return;
        };
        let conns = Arc::downgrade(&self.conns);
        let dialing = Arc::downgrade(&self.dialing);
        let gone = Arc::downgrade(&self.gone);
        rt.spawn(async move {
            loop {
                let peer = match peers.recv().await {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let (Some(conns), Some(dialing), Some(gone)) =
                    (conns.upgrade(), dialing.upgrade(), gone.upgrade())
                else {
                    return;
                };
                let conn = conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&peer);
                // Only peers this client calls (a server's socket also hears
                // about its departed clients' ports).
                let ours = conn.is_some()
                    || dialing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(&peer);
                if ours {
                    let mut g = gone.lock().unwrap_or_else(|e| e.into_inner());
                    g.retain(|_, at| at.elapsed() < 4 * NOT_LISTENING_BACKOFF);
                    g.insert(peer, Instant::now());
                }
                if let Some(conn) = conn {
                    tracing::info!(%peer, "peer not listening (ICMP port unreachable); closing its connection");
                    conn.close(0u32.into(), b"peer not listening");
                }
            }
        });
    }

    fn cached(&self, addr: SocketAddr) -> Option<quinn::Connection> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, RpcError> {
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone();
        let dialing = gate.lock_owned().await;
        // Another call may have connected while this one waited.
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        // Not again right away: every datagram to a dead port draws another
        // ICMP error, and the socket's pending error fails the next send on
        // it, whatever its destination (QUIC resends it, as a loss).
        let gone_since = self
            .gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied();
        if gone_since.is_some_and(|t| t.elapsed() < NOT_LISTENING_BACKOFF) {
            return Err(RpcError::NotListening(addr));
        }
        let connecting =
            self.endpoint
                .connect(addr, SERVER_NAME)
                .map_err(|e| RpcError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
        let budget = self.connect_timeout.min(self.timeout);
        // The handshake runs on a task of its own: a caller that gives up
        // first (openraft cuts every AppendEntries off at its 50 ms
        // heartbeat interval) does not abort it, and the next call finds
        // the connection made — instead of every try starting a handshake
        // that is cut off the same way, for good, on a loaded machine.
        let (conns, gone) = (self.conns.clone(), self.gone.clone());
        let handshake = tokio::spawn(async move {
            let _dialing = dialing;
            let conn = tokio::time::timeout(budget, connecting)
                .await
                .map_err(|_| RpcError::Timeout(budget))??;
            conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr, conn.clone());
            gone.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
            Ok::<_, RpcError>(conn)
        });
        let conn = handshake.await.map_err(|e| RpcError::Connect {
            addr,
            reason: e.to_string(),
        })??;
        if !self
            .watching
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.close_on_port_unreachable();
        }
        Ok(conn)
    }

    /// Statistics of the connection to `addr`, if there is one (lost
    /// packets, path MTU, congestion window).
    pub fn connection_stats(&self, addr: SocketAddr) -> Option<quinn::ConnectionStats> {
        self.cached(addr).map(|c| c.stats())
    }

    /// Opens a raw stream pair to `addr` (for streaming calls such as watches).
    pub async fn open(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), RpcError> {
        let conn = self.connection(addr).await?;
        Ok(conn.open_bi().await?)
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        req: &Req,
    ) -> Result<Resp, RpcError> {
        let fut = async {
            let conn = self.connection(addr).await?;
            let answer = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_msg(&mut send, req).await?;
                let _ = send.finish();
                read_msg(&mut recv).await?.ok_or(RpcError::Closed)
            }
            .await;
            // A stream cut by the end of its connection reports why the
            // connection ended (the server refused our certificate, the
            // peer closed), not just "connection lost".
            match answer {
                Err(RpcError::Read(_) | RpcError::Write(_) | RpcError::Connection(_)) => {
                    match conn.close_reason() {
                        Some(quinn::ConnectionError::LocallyClosed)
                            if self
                                .gone
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .contains_key(&addr) =>
                        {
                            Err(RpcError::NotListening(addr))
                        }
                        Some(reason) => Err(RpcError::Connection(reason)),
                        None => answer,
                    }
                }
                answer => answer,
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| RpcError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ledger::{AddRequest, BookieErrorCode, BookieRequest, BookieResponse, RangeEntry};

    #[test]
    fn a_pooled_buffer_is_reused_only_once_every_slice_of_it_is_dropped() {
        let pool = BufferPool {
            idle: Mutex::new(Vec::new()),
        };
        let size = 300 * 1024;
        let mut buf = pool.take(size);
        buf.extend_from_slice(&vec![7u8; size]);
        let at = buf.as_ptr();
        let frame = pool.lend(buf);
        let payload = frame.slice(1000..2000);
        drop(frame);
        // A slice still holds it: a new buffer, and the slice stays intact.
        let other = pool.take(size);
        assert_ne!(other.as_ptr(), at);
        assert_eq!(payload[..], [7u8; 1000][..]);
        drop(payload);
        let again = pool.take(size);
        assert_eq!(again.as_ptr(), at, "the freed buffer is taken again");
        assert!(again.is_empty() && again.capacity() >= size);
        // Too large a request for it: a new one.
        let mut small = pool.take(POOLED_MIN_BYTES);
        small.extend_from_slice(&[1; POOLED_MIN_BYTES]);
        drop(pool.lend(small));
        assert!(pool.take(size).capacity() >= size);
        // Small and oversized messages are not pooled.
        drop(pool.lend(BytesMut::from(&[1u8; 10][..])));
        drop(pool.lend(BytesMut::from(&vec![1u8; POOLED_MAX_BYTES + 1][..])));
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
    }

    #[test]
    fn gso_batches_are_cut_into_sends_of_whole_packets_under_64_kib() {
        let sizes = |len: usize, segment: usize| -> Vec<usize> {
            gso_sends(&vec![0u8; len], segment)
                .map(<[u8]>::len)
                .collect()
        };
        // Ten jumbo packets (the last one short): seven, then the rest.
        assert_eq!(sizes(9 * 8953 + 100, 8953), vec![7 * 8953, 2 * 8953 + 100]);
        // Loopback's 64 KiB packets go one per send.
        assert_eq!(sizes(2 * 65_507, 65_507), vec![65_507, 65_507]);
        // Normal packets: 44 per send.
        assert_eq!(sizes(10 * 1452, 1452), vec![10 * 1452]);
        assert_eq!(sizes(50 * 1452, 1452), vec![45 * 1452, 5 * 1452]);
    }
    use crate::metadata_api::{KeyValue, MetaError, MetaRequest, MetaResponse};
    use bytes::Bytes;

    /// Decodes `body` as the RPC layer does; a panic fails the test.
    fn decode_as<T: DeserializeOwned + Serialize>(body: &[u8]) {
        let body = Bytes::copy_from_slice(body);
        let got: Result<T, _> = crate::shared_bytes::decode(&body, |b| codec().deserialize(b));
        if let Ok(msg) = got {
            encode(&msg).unwrap();
        }
    }

    /// Every variant's encoding, spoilt (bytes changed, cut short,
    /// lengthened) and random bytes: decoding gives a message or an error,
    /// never a panic or a runaway allocation.
    fn fuzz<T: DeserializeOwned + Serialize>(samples: &[T], seed: u64) {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for sample in samples {
            let good = encode(sample).unwrap()[4..].to_vec();
            decode_as::<T>(&good);
            for _ in 0..500 {
                let mut b = good.clone();
                match next() % 4 {
                    0 => {
                        let at = next() as usize % b.len();
                        b[at] = next() as u8;
                    }
                    1 => b.truncate(next() as usize % b.len()),
                    2 => b.extend((0..next() % 16).map(|_| next() as u8)),
                    _ => {
                        for _ in 0..4 {
                            let at = next() as usize % b.len();
                            b[at] = 0xff;
                        }
                    }
                }
                decode_as::<T>(&b);
            }
        }
        for _ in 0..2000 {
            let n = next() as usize % 64;
            let b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            decode_as::<T>(&b);
        }
    }

    #[test]
    fn ledger_protocol_decoders_survive_spoilt_input() {
        let add = AddRequest {
            ledger_id: 7,
            entry_id: 3,
            master_key: [1; 16],
            lac: 2,
            payload: Bytes::from_static(b"payload"),
            digest: 99,
            recovery: false,
        };
        let requests = vec![
            BookieRequest::Add(add.clone()),
            BookieRequest::AddBatch(vec![add.clone(), add]),
            BookieRequest::Read {
                ledger_id: 7,
                entry_id: 3,
            },
            BookieRequest::ReadLacLongPoll {
                ledger_id: 7,
                previous_lac: -1,
                timeout_ms: 10,
            },
            BookieRequest::ReadLac { ledger_id: 7 },
            BookieRequest::Fence {
                ledger_id: 7,
                master_key: [2; 16],
            },
            BookieRequest::ReadRange {
                ledger_id: 7,
                first: 0,
                last: 99,
                step: 3,
                max_bytes: 1 << 20,
            },
        ];
        fuzz(&requests, 0x9e37_79b9_7f4a_7c15);
        let entry = RangeEntry {
            entry_id: 3,
            lac: 2,
            payload: Bytes::from_static(b"x"),
            digest: 1,
        };
        let responses = vec![
            BookieResponse::Added {
                ledger_id: 7,
                entry_id: 3,
            },
            BookieResponse::Entry {
                ledger_id: 7,
                entry_id: 3,
                lac: 2,
                payload: Bytes::from_static(b"payload"),
                digest: 5,
            },
            BookieResponse::Lac {
                ledger_id: 7,
                lac: 2,
                last_entry: 3,
            },
            BookieResponse::AddedBatch(vec![Ok(()), Err(BookieErrorCode::Fenced)]),
            BookieResponse::Error(BookieErrorCode::NoSuchEntry),
            BookieResponse::Entries {
                ledger_id: 7,
                entries: vec![entry.clone(), entry],
            },
        ];
        fuzz(&responses, 0xd1b5_4a32_d192_ed03);
    }

    #[test]
    fn metadata_protocol_decoders_survive_spoilt_input() {
        let requests = vec![
            MetaRequest::Get { key: "/a".into() },
            MetaRequest::Range {
                prefix: "/a".into(),
                limit: 3,
            },
            MetaRequest::RangePage {
                prefix: "/a".into(),
                after: Some("/a/1".into()),
                limit: 0,
                keys_only: true,
            },
            MetaRequest::LeaseGrant { ttl_ms: 100 },
            MetaRequest::Watch {
                prefix: "/w".into(),
                start_revision: 4,
            },
            MetaRequest::Status,
        ];
        fuzz(&requests, 0x94d0_49bb_1331_11eb);
        let kv = KeyValue {
            key: "/a/1".into(),
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 1,
            lease: Some(4),
        };
        let responses = vec![
            MetaResponse::Get(Some(kv.clone())),
            MetaResponse::Range(vec![kv.clone()]),
            MetaResponse::RangePage {
                kvs: vec![kv],
                more: true,
            },
            MetaResponse::Lease { id: 1, ttl_ms: 100 },
            MetaResponse::Ok,
            MetaResponse::Error(MetaError::Limit("too big".into())),
        ];
        fuzz(&responses, 0xbf58_476d_1ce4_e5b9);
    }
}
