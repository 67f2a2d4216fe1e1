//! One client connection: the read loop (bounded frames, CRC-checked),
//! keep-alive, and routing of each command to its handler. A malformed
//! frame gets a log line and closes this connection only.
//!
//! Back-pressure: a SEND waits for room under the connection's pending-send
//! limits before the next frame is read, so a producer that outruns the
//! bookies finds the broker no longer reading its socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use magnetar_proto::frame::{self, Frame, FRAME_OVERHEAD_BYTES};
use magnetar_proto::pulsar::{base_command::Type, BaseCommand, ServerError};
use magnetar_proto::{commands, TopicName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use super::{consumer, handshake, lookup, producer, schema, ConnShared, ProtocolContext};
use crate::BrokerError;

/// What a request handler running on its own task needs of its
/// connection.
#[derive(Clone)]
pub struct ConnRef {
    pub ctx: Arc<ProtocolContext>,
    pub shared: Arc<ConnShared>,
    pub peer: SocketAddr,
}

/// Requests (lookups, producer and consumer creations) a connection has
/// running at once; past it the connection's socket is not read.
pub const MAX_CONCURRENT_REQUESTS: usize = 256;

/// One connection's state, owned by its read loop.
pub struct Conn {
    pub ctx: Arc<ProtocolContext>,
    pub shared: Arc<ConnShared>,
    pub peer: SocketAddr,
    /// Permits for sends not yet answered (count and KiB).
    pub pending_sends: Arc<Semaphore>,
    pub pending_kib: Arc<Semaphore>,
    /// The protocol version agreed in CONNECTED.
    pub version: i32,
    /// The client's role (its token's subject) when tokens are on.
    pub role: Option<String>,
    /// CONNECT was refused: the connection ends.
    pub refused: bool,
    /// Permits for requests running on their own tasks.
    requests: Arc<Semaphore>,
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts Pulsar connections on `listener`, over TLS when `tls` is given,
/// each served on a task of its own.
pub async fn accept(
    listener: TcpListener,
    ctx: Arc<ProtocolContext>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                match &tls {
                    None => {
                        let (rd, wr) = stream.into_split();
                        tokio::spawn(serve(ctx, rd, wr, peer));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let hs = tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(stream),
                            )
                            .await;
                            match hs {
                                Ok(Ok(s)) => {
                                    let (rd, wr) = tokio::io::split(s);
                                    serve(ctx, rd, wr, peer).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::info!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one client connection, read from `rd` and written to `wr`.
pub async fn serve<R, W>(ctx: Arc<ProtocolContext>, mut rd: R, wr: W, peer: SocketAddr)
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::new();
    let (tx, rx) = mpsc::channel::<frame::OutFrame>(ctx.limits.write_queue_frames.max(16));
    let writer = tokio::spawn(frame::write_loop(rx, wr));
    let limits = ctx.limits.clone();
    let mut conn = Conn {
        shared: Arc::new(ConnShared::new(ctx.next_id(), tx)),
        ctx,
        peer,
        pending_sends: Arc::new(Semaphore::new(limits.max_pending_sends.max(1))),
        pending_kib: Arc::new(Semaphore::new((limits.max_pending_send_bytes >> 10).max(1))),
        version: 0,
        role: None,
        refused: false,
        requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
    };
    let max_frame = limits.max_message_bytes + FRAME_OVERHEAD_BYTES;
    let idle = Duration::from_secs(limits.keepalive_secs.max(1));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut connected = false;
    let mut pinged = false;
    let mut stop = conn.ctx.stop.clone();
    'outer: loop {
        loop {
            match frame::decode(&mut buf, max_frame) {
                Ok(Some(f)) => {
                    pinged = false;
                    if !connected {
                        if f.command.r#type != Type::Connect as i32 {
                            tracing::warn!(%peer, "first frame is not CONNECT; closing");
                            break 'outer;
                        }
                        connected = true;
                    }
                    conn.handle(f).await;
                    if conn.refused {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed frame; closing connection");
                    break 'outer;
                }
            }
        }
        let read = tokio::select! {
            r = tokio::time::timeout(idle, rd.read_buf(&mut buf)) => r,
            _ = stop.changed() => break,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) if pinged => {
                tracing::info!(%peer, "no answer to keep-alive; closing");
                break;
            }
            Err(_) => {
                conn.shared.send(&handshake::ping()).await;
                pinged = true;
            }
        }
    }
    conn.close().await;
    drop(conn);
    // Frames still queued go out if the client still reads; not for ever.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

impl Conn {
    fn handle_ref(&self) -> ConnRef {
        ConnRef {
            ctx: self.ctx.clone(),
            shared: self.shared.clone(),
            peer: self.peer,
        }
    }

    /// Runs a request on a task of its own (it may wait for a topic to load
    /// or for the metadata service, and must not hold up the connection's
    /// other producers and consumers), within the connection's bound.
    async fn spawn<F, Fut>(&self, f: F) -> bool
    where
        F: FnOnce(ConnRef) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Ok(permit) = self.requests.clone().acquire_owned().await else {
            return true;
        };
        let fut = f(self.handle_ref());
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
        true
    }

    async fn close(&mut self) {
        producer::close_all(self);
        consumer::close_all(self).await;
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    /// Answers a request with SUCCESS or ERROR.
    pub async fn answer(&self, request_id: u64, res: Result<(), BrokerError>) {
        match res {
            Ok(()) => self.shared.send(&commands::success(request_id)).await,
            Err(e) => self.shared.send(&error_cmd(request_id, &e)).await,
        }
    }

    pub fn topic_name(name: &str) -> Result<TopicName, BrokerError> {
        Ok(TopicName::parse(name)?)
    }

    async fn handle(&mut self, f: Frame) {
        let Frame {
            command: cmd,
            payload,
            payload_error,
        } = f;
        let t = Type::try_from(cmd.r#type).ok();
        let known = t.is_some();
        let kind = cmd.r#type;
        let handled = match (t, cmd) {
            (Some(Type::Connect), c) => handshake::connect(self, c.connect).await,
            (Some(Type::Ping), _) => handshake::pong(self).await,
            (Some(Type::Pong), _) => true,
            (
                Some(Type::PartitionedMetadata),
                BaseCommand {
                    partition_metadata: Some(c),
                    ..
                },
            ) => self.spawn(|r| lookup::partitioned_metadata(r, c)).await,
            (
                Some(Type::GetTopicsOfNamespace),
                BaseCommand {
                    get_topics_of_namespace: Some(c),
                    ..
                },
            ) => self.spawn(|r| lookup::topics_of_namespace(r, c)).await,
            (
                Some(Type::Lookup),
                BaseCommand {
                    lookup_topic: Some(c),
                    ..
                },
            ) => self.spawn(|r| lookup::lookup(r, c)).await,
            (
                Some(Type::Producer),
                BaseCommand {
                    producer: Some(c), ..
                },
            ) => self.spawn(|r| producer::create(r, c)).await,
            (
                Some(Type::GetSchema),
                BaseCommand {
                    get_schema: Some(c),
                    ..
                },
            ) => self.spawn(|r| schema::get(r, c)).await,
            (
                Some(Type::GetOrCreateSchema),
                BaseCommand {
                    get_or_create_schema: Some(c),
                    ..
                },
            ) => self.spawn(|r| schema::get_or_create(r, c)).await,
            (Some(Type::Send), c) => producer::send(self, c.send, payload, payload_error).await,
            (Some(Type::CloseProducer), c) => producer::close(self, c.close_producer).await,
            (
                Some(Type::Subscribe),
                BaseCommand {
                    subscribe: Some(c), ..
                },
            ) => self.spawn(|r| consumer::subscribe(r, c)).await,
            (Some(Type::Flow), c) => consumer::flow(self, c.flow).await,
            (Some(Type::Ack), c) => consumer::ack(self, c.ack).await,
            (Some(Type::RedeliverUnacknowledgedMessages), c) => {
                consumer::redeliver(self, c.redeliver_unacknowledged_messages).await
            }
            (Some(Type::CloseConsumer), c) => consumer::close(self, c.close_consumer).await,
            (Some(Type::Unsubscribe), c) => consumer::unsubscribe(self, c.unsubscribe).await,
            (Some(Type::Seek), c) => consumer::seek(self, c.seek).await,
            (Some(Type::GetLastMessageId), c) => {
                consumer::last_message_id(self, c.get_last_message_id).await
            }
            _ => false,
        };
        if !handled {
            tracing::warn!(peer = %self.peer, r#type = kind, known, "unsupported or incomplete command");
            let e = BrokerError::new(
                ServerError::UnknownError,
                format!("command type {kind} is not supported"),
            );
            self.shared.send(&error_cmd(0, &e)).await;
        }
    }
}

pub fn error_cmd(request_id: u64, e: &BrokerError) -> magnetar_proto::pulsar::BaseCommand {
    count_error(e.code());
    commands::error(request_id, e.code(), e.to_string())
}

/// Counts an error sent to a client, by its `ServerError` name.
pub fn count_error(code: ServerError) {
    metrics::counter!(crate::metrics::ERRORS, "code" => code.as_str_name()).increment(1);
}

/// Counts the connection open while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> OpenConnection {
        metrics::counter!(crate::metrics::CONNECTIONS_OPENED).increment(1);
        metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
    }
}
