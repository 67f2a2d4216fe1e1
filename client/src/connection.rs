//! One TCP connection to a broker: the handshake, a writer task, and a reader
//! task that routes responses, receipts, messages and the broker's closes of
//! producers and consumers. When it ends, every route's channel closes: that
//! is how producers and consumers learn to reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_proto::frame::{
    self, base, encode_command, OutFrame, DEFAULT_MAX_MESSAGE_BYTES, FRAME_OVERHEAD_BYTES,
};
use magnetar_proto::pulsar::{base_command::Type, BaseCommand, CommandConnect, CommandPong};
use magnetar_proto::Payload;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::Error;

pub const CLIENT_PROTOCOL_VERSION: i32 = 12;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence after which the client pings the broker; as much again without
/// an answer closes the connection.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

type Responder = oneshot::Sender<Result<BaseCommand, Error>>;

#[derive(Default)]
struct Routes {
    requests: HashMap<u64, Responder>,
    producers: HashMap<u64, mpsc::UnboundedSender<BaseCommand>>,
    consumers: HashMap<u64, mpsc::UnboundedSender<(BaseCommand, Option<Payload>)>>,
    /// Requests the broker answered "queued" (a WaitForExclusive producer):
    /// their final answer comes later, with no timeout.
    queued: std::collections::HashSet<u64>,
    closed: bool,
}

pub struct Connection {
    /// The broker's largest message, as its CONNECTED said.
    pub max_message_size: usize,
    tx: mpsc::UnboundedSender<OutFrame>,
    routes: Arc<Mutex<Routes>>,
    next_request: AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock(r: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn request_id_of(cmd: &BaseCommand) -> Option<u64> {
    cmd.success
        .as_ref()
        .map(|c| c.request_id)
        .or(cmd.error.as_ref().map(|c| c.request_id))
        .or(cmd.producer_success.as_ref().map(|c| c.request_id))
        .or(cmd.lookup_topic_response.as_ref().map(|c| c.request_id))
        .or(cmd
            .partition_metadata_response
            .as_ref()
            .map(|c| c.request_id))
        .or(cmd
            .get_last_message_id_response
            .as_ref()
            .map(|c| c.request_id))
        .or(cmd.ack_response.as_ref().and_then(|c| c.request_id))
        .or(cmd
            .get_topics_of_namespace_response
            .as_ref()
            .map(|c| c.request_id))
}

fn set_request_id(cmd: &mut BaseCommand, id: u64) {
    if let Some(c) = cmd.producer.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.subscribe.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.close_producer.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.close_consumer.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.seek.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.unsubscribe.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.get_last_message_id.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.lookup_topic.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.partition_metadata.as_mut() {
        c.request_id = id;
    }
    if let Some(c) = cmd.ack.as_mut() {
        c.request_id = Some(id);
    }
    if let Some(c) = cmd.get_topics_of_namespace.as_mut() {
        c.request_id = id;
    }
}

impl Connection {
    /// Connects to a broker at `pulsar://host:port`, or over TLS with
    /// `tls` at `pulsar+ssl://host:port`, and says CONNECT.
    pub async fn connect(
        service_url: &str,
        auth: Option<&dyn crate::auth::Authentication>,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<Arc<Connection>, Error> {
        let (secure, addr) = if let Some(a) = service_url.strip_prefix("pulsar+ssl://") {
            (true, a)
        } else if let Some(a) = service_url.strip_prefix("pulsar://") {
            (false, a)
        } else {
            return Err(Error::Connection(format!(
                "unsupported service URL {service_url}"
            )));
        };
        let addr = addr.trim_end_matches('/');
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|e| Error::Connection(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        if !secure {
            let (rd, wr) = stream.into_split();
            return Self::start(rd, wr, auth).await;
        }
        let connector = tls.ok_or_else(|| {
            Error::Config(format!(
                "{service_url} is a TLS address; build the client with a pulsar+ssl:// URL"
            ))
        })?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = crate::tls::server_name(host)?;
        let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, stream))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(t) => Error::Tls(format!("{addr}: {t}")),
                    None => Error::Connection(format!("TLS handshake with {addr}: {e}")),
                },
            )?;
        let (rd, wr) = tokio::io::split(stream);
        Self::start(rd, wr, auth).await
    }

    /// The handshake over an open stream, then the reader and writer tasks.
    async fn start<R, W>(
        mut rd: R,
        mut wr: W,
        auth: Option<&dyn crate::auth::Authentication>,
    ) -> Result<Arc<Connection>, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut hello = base(Type::Connect);
        hello.connect = Some(CommandConnect {
            client_version: format!("magnetar-client {}", env!("CARGO_PKG_VERSION")),
            protocol_version: Some(CLIENT_PROTOCOL_VERSION),
            auth_method_name: auth.map(|a| a.method_name().to_string()),
            auth_data: match auth {
                Some(a) => Some(a.auth_data()?.into()),
                None => None,
            },
            ..Default::default()
        });
        let mut buf = BytesMut::new();
        encode_command(&hello, &mut buf);
        wr.write_all(&buf)
            .await
            .map_err(|e| Error::Connection(e.to_string()))?;
        let max = DEFAULT_MAX_MESSAGE_BYTES + FRAME_OVERHEAD_BYTES;
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) =
                    frame::decode(&mut rbuf, max).map_err(|e| Error::Protocol(e.to_string()))?
                {
                    return match f.command.connected {
                        Some(c) => Ok(c
                            .max_message_size
                            .filter(|m| *m > 0)
                            .map_or(DEFAULT_MAX_MESSAGE_BYTES, |m| m as usize)),
                        None => Err(f
                            .command
                            .error
                            .map(|e| Error::Server {
                                code: e.error,
                                message: e.message,
                            })
                            .unwrap_or(Error::Protocol("no CONNECTED".into()))),
                    };
                }
                if rd
                    .read_buf(&mut rbuf)
                    .await
                    .map_err(|e| Error::Connection(e.to_string()))?
                    == 0
                {
                    return Err(Error::Closed);
                }
            }
        })
        .await
        .map_err(|_| Error::Timeout)?;
        let max_message_size = connected?;
        let (tx, rx) = mpsc::unbounded_channel::<OutFrame>();
        let writer = tokio::spawn(frame::write_loop(rx, wr));
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let r = routes.clone();
        let ptx = tx.clone();
        let reader = tokio::spawn(async move {
            let res: Result<(), Error> = async {
                let mut pinged = false;
                loop {
                    while let Some(f) =
                        frame::decode(&mut rbuf, max).map_err(|e| Error::Protocol(e.to_string()))?
                    {
                        pinged = false;
                        route(&r, &ptx, f.command, f.payload);
                    }
                    // Keep-alive: silence gets a PING; silence after it ends
                    // the connection (a broker that froze or vanished).
                    match tokio::time::timeout(KEEPALIVE, rd.read_buf(&mut rbuf)).await {
                        Ok(read) => {
                            if read.map_err(|e| Error::Connection(e.to_string()))? == 0 {
                                return Err(Error::Closed);
                            }
                        }
                        Err(_) if pinged => {
                            return Err(Error::Connection("no answer to keep-alive".into()))
                        }
                        Err(_) => {
                            let mut ping = base(Type::Ping);
                            ping.ping = Some(magnetar_proto::pulsar::CommandPing {});
                            let mut buf = BytesMut::new();
                            encode_command(&ping, &mut buf);
                            let _ = ptx.send(buf.freeze().into());
                            pinged = true;
                        }
                    }
                }
            }
            .await;
            let err = res.err().unwrap_or(Error::Closed);
            tracing::debug!(error = %err, "connection to broker ended");
            let mut g = lock(&r);
            g.closed = true;
            for (_, s) in g.requests.drain() {
                let _ = s.send(Err(err.clone()));
            }
            g.producers.clear();
            g.consumers.clear();
        });
        Ok(Arc::new(Connection {
            max_message_size,
            tx,
            routes,
            next_request: AtomicU64::new(1),
            tasks: vec![writer, reader],
        }))
    }

    pub fn send(&self, cmd: &BaseCommand) -> Result<(), Error> {
        let mut buf = BytesMut::new();
        encode_command(cmd, &mut buf);
        self.tx.send(buf.freeze().into()).map_err(|_| Error::Closed)
    }

    /// Queues a command with a payload section (stored form), not copied.
    pub fn send_payload(
        &self,
        cmd: &BaseCommand,
        headers_and_payload: &Bytes,
    ) -> Result<(), Error> {
        let frame = OutFrame::with_payload(cmd, headers_and_payload.clone());
        self.tx.send(frame).map_err(|_| Error::Closed)
    }

    /// Sends a command carrying a request id and waits for its answer;
    /// an ERROR answer becomes `Error::Server`.
    pub async fn request(&self, mut cmd: BaseCommand) -> Result<BaseCommand, Error> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        set_request_id(&mut cmd, id);
        let (tx, rx) = oneshot::channel();
        {
            let mut g = lock(&self.routes);
            if g.closed {
                return Err(Error::Closed);
            }
            g.requests.insert(id, tx);
        }
        self.send(&cmd)?;
        let mut rx = rx;
        let resp = loop {
            match tokio::time::timeout(REQUEST_TIMEOUT, &mut rx).await {
                Ok(r) => break r.map_err(|_| Error::Closed)??,
                Err(_) if lock(&self.routes).queued.contains(&id) => continue,
                Err(_) => {
                    lock(&self.routes).requests.remove(&id);
                    return Err(Error::Timeout);
                }
            }
        };
        lock(&self.routes).queued.remove(&id);
        if let Some(e) = resp.error {
            return Err(Error::Server {
                code: e.error,
                message: e.message,
            });
        }
        if let Some(code) = resp.ack_response.as_ref().and_then(|a| a.error) {
            let message = resp
                .ack_response
                .as_ref()
                .and_then(|a| a.message.clone())
                .unwrap_or_default();
            return Err(Error::Server { code, message });
        }
        Ok(resp)
    }

    pub fn register_producer(&self, id: u64) -> mpsc::UnboundedReceiver<BaseCommand> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes).producers.insert(id, tx);
        rx
    }

    pub fn register_consumer(
        &self,
        id: u64,
    ) -> mpsc::UnboundedReceiver<(BaseCommand, Option<Payload>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes).consumers.insert(id, tx);
        rx
    }

    pub fn unregister_producer(&self, id: u64) {
        lock(&self.routes).producers.remove(&id);
    }

    pub fn unregister_consumer(&self, id: u64) {
        lock(&self.routes).consumers.remove(&id);
    }

    /// Whether the connection ended (its routes are gone).
    pub fn is_closed(&self) -> bool {
        lock(&self.routes).closed || self.tx.is_closed()
    }

    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut g = lock(&self.routes);
        g.closed = true;
        g.requests.clear();
        g.producers.clear();
        g.consumers.clear();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

fn route(
    routes: &Mutex<Routes>,
    tx: &mpsc::UnboundedSender<OutFrame>,
    cmd: BaseCommand,
    payload: Option<Payload>,
) {
    let t = Type::try_from(cmd.r#type).ok();
    match t {
        Some(Type::Ping) => {
            let mut pong = base(Type::Pong);
            pong.pong = Some(CommandPong {});
            let mut buf = BytesMut::new();
            encode_command(&pong, &mut buf);
            let _ = tx.send(buf.freeze().into());
        }
        Some(Type::SendReceipt) | Some(Type::SendError) => {
            let pid = cmd
                .send_receipt
                .as_ref()
                .map(|r| r.producer_id)
                .or(cmd.send_error.as_ref().map(|e| e.producer_id));
            if let Some(s) = pid.and_then(|p| lock(routes).producers.get(&p).cloned()) {
                let _ = s.send(cmd);
            }
        }
        Some(Type::Message) => {
            let cid = cmd.message.as_ref().map(|m| m.consumer_id);
            if let Some(s) = cid.and_then(|c| lock(routes).consumers.get(&c).cloned()) {
                let _ = s.send((cmd, payload));
            }
        }
        // The broker closed a producer or consumer (its topic moved): the
        // route goes, the owner reconnects.
        Some(Type::CloseProducer) => {
            let pid = cmd.close_producer.as_ref().map(|c| c.producer_id);
            if let Some(s) = pid.and_then(|p| lock(routes).producers.remove(&p)) {
                let _ = s.send(cmd);
            }
        }
        Some(Type::ReachedEndOfTopic) => {
            let cid = cmd.reached_end_of_topic.as_ref().map(|c| c.consumer_id);
            if let Some(s) = cid.and_then(|c| lock(routes).consumers.get(&c).cloned()) {
                let _ = s.send((cmd, None));
            }
        }
        Some(Type::CloseConsumer) => {
            let cid = cmd.close_consumer.as_ref().map(|c| c.consumer_id);
            if let Some(s) = cid.and_then(|c| lock(routes).consumers.remove(&c)) {
                let _ = s.send((cmd, None));
            }
        }
        _ => match request_id_of(&cmd) {
            // "Queued, wait": the final answer comes later.
            Some(id)
                if cmd
                    .producer_success
                    .as_ref()
                    .is_some_and(|s| s.producer_ready == Some(false)) =>
            {
                lock(routes).queued.insert(id);
            }
            Some(id) => {
                if let Some(s) = lock(routes).requests.remove(&id) {
                    let _ = s.send(Ok(cmd));
                }
            }
            None => tracing::debug!(r#type = cmd.r#type, "unrouted command from broker"),
        },
    }
}
