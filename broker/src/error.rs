//! `BrokerError`: what a client request can fail with, mapped to a Pulsar
//! `ServerError` code on the wire.

use magnetar_proto::pulsar::ServerError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub code: ServerError,
    pub message: String,
}

impl BrokerError {
    pub fn new(code: ServerError, message: impl Into<String>) -> BrokerError {
        BrokerError {
            code,
            message: message.into(),
        }
    }
}
