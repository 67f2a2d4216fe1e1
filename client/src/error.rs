//! The SDK's error: what failed, whether trying again may help, and the
//! broker's error kind by name.

use magnetar_proto::pulsar::ServerError;

/// What went wrong; see [`Error::is_retriable`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The connection to a broker failed or ended.
    #[error("connection: {0}")]
    Connection(String),
    #[error("broker error {code}: {message}")]
    /// The broker refused: its `ServerError` code and message.
    Server {
        /// `ServerError` as a number; see [`Error::server_error`].
        code: i32,
        /// The broker's explanation.
        message: String,
    },
    /// The broker answered with something that does not parse or fit.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The producer, consumer or client was closed.
    #[error("closed")]
    Closed,
    /// The topic was terminated and every message of it was received.
    #[error("end of topic: the topic is terminated and every message was received")]
    EndOfTopic,
    /// The producer has as many messages waiting for receipts as it may
    /// (`max_pending_messages`), or the client's memory limit is reached.
    #[error("producer queue is full")]
    ProducerQueueFull,
    /// A value does not encode or a payload does not decode as its schema.
    #[error("schema: {0}")]
    Schema(String),
    /// A message larger than the broker takes, from a producer without
    /// chunking.
    #[error(
        "message of {size} bytes is larger than the broker's maximum of {limit} (enable chunking)"
    )]
    MessageTooBig {
        /// The message's size.
        size: usize,
        /// The broker's maximum.
        limit: usize,
    },
    /// The TLS handshake failed: the broker's certificate is not trusted or
    /// does not name it, or the two sides share no protocol.
    #[error("TLS: {0}")]
    Tls(String),
    /// A builder was given settings that cannot work together.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether trying again (after a lookup, with back-off) may succeed: the
    /// connection failed, or the broker is not ready for the topic yet (it
    /// is moving, or its owner's lease is being replaced).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Connection(_) | Error::Timeout | Error::Closed => true,
            Error::Server { code, .. } => matches!(
                ServerError::try_from(*code),
                Ok(ServerError::ServiceNotReady
                    | ServerError::MetadataError
                    | ServerError::TooManyRequests)
            ),
            Error::ProducerQueueFull => true,
            Error::Protocol(_)
            | Error::EndOfTopic
            | Error::Config(_)
            | Error::Tls(_)
            | Error::Schema(_)
            | Error::MessageTooBig { .. } => false,
        }
    }

    /// The broker's error code by name, where the broker sent one.
    pub fn server_error(&self) -> Option<ServerError> {
        match self {
            Error::Server { code, .. } => ServerError::try_from(*code).ok(),
            _ => None,
        }
    }
}
