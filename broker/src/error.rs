//! `BrokerError`: what a client request can fail with, with its typed
//! source, mapped to a Pulsar `ServerError` code on the wire. Every
//! conversion into it is here.

use std::sync::Arc;

use magnetar_metadata::MetadataError;
use magnetar_proto::pulsar::ServerError;
use magnetar_proto::TopicNameError;

use crate::managed_ledger::MlError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    InvalidTopicName(#[from] TopicNameError),
    #[error("namespace {0} does not exist")]
    NamespaceNotFound(String),
    #[error(transparent)]
    Storage(#[from] MlError),
    #[error("metadata service: {0}")]
    Metadata(Arc<MetadataError>),
    /// The topic is served elsewhere or is moving; the client looks it up
    /// again and retries.
    #[error("{0}")]
    NotServedHere(String),
    /// A request the protocol refuses (e.g. a second consumer of an
    /// Exclusive subscription), with the code Pulsar clients expect.
    #[error("{message}")]
    Refused { code: ServerError, message: String },
}

impl BrokerError {
    pub fn new(code: ServerError, message: impl Into<String>) -> BrokerError {
        BrokerError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The code on the wire. Retriable conditions map to ServiceNotReady,
    /// which clients retry with back-off.
    pub fn code(&self) -> ServerError {
        match self {
            BrokerError::InvalidTopicName(_) => ServerError::InvalidTopicName,
            BrokerError::NamespaceNotFound(_) => ServerError::TopicNotFound,
            BrokerError::Storage(MlError::Closed(_) | MlError::NotWritable(_)) => {
                ServerError::ServiceNotReady
            }
            BrokerError::Storage(MlError::Metadata(_)) => ServerError::MetadataError,
            BrokerError::Storage(MlError::Terminated(_)) => ServerError::TopicTerminatedError,
            BrokerError::Storage(_) => ServerError::PersistenceError,
            BrokerError::Metadata(_) => ServerError::MetadataError,
            BrokerError::NotServedHere(_) => ServerError::ServiceNotReady,
            BrokerError::Refused { code, .. } => *code,
        }
    }
}

impl From<MetadataError> for BrokerError {
    fn from(e: MetadataError) -> Self {
        BrokerError::Metadata(Arc::new(e))
    }
}
