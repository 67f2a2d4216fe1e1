//! A loaded topic: its managed ledger and its subscriptions.

use std::collections::HashMap;
use std::sync::Arc;

use magnetar_proto::pulsar::ServerError;
use magnetar_proto::TopicName;

use crate::managed_ledger::cursor::CursorState;
use crate::managed_ledger::ManagedLedger;
use crate::subscription::{self, SubscriptionHandle};
use crate::{Broker, BrokerError};

pub struct Topic {
    pub name: TopicName,
    pub ml: Arc<ManagedLedger>,
    subs: tokio::sync::Mutex<HashMap<String, SubscriptionHandle>>,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    Earliest,
    Latest,
}

impl Topic {
    pub async fn load(name: TopicName, broker: &Broker) -> Result<Arc<Topic>, BrokerError> {
        let ml = ManagedLedger::open(
            &name.as_key(),
            broker.cfg.managed_ledger.clone(),
            broker.ledgers.clone(),
            broker.metadata.clone(),
        )
        .await
        .map_err(|e| {
            BrokerError::new(
                ServerError::PersistenceError,
                format!("cannot open {name}: {e}"),
            )
        })?;
        let cursors = ml
            .open_cursors()
            .await
            .map_err(|e| BrokerError::new(ServerError::PersistenceError, e.to_string()))?;
        let mut subs = HashMap::new();
        for (sub, state) in cursors {
            subs.insert(sub.clone(), subscription::spawn(sub, ml.clone(), state));
        }
        Ok(Arc::new(Topic {
            name,
            ml,
            subs: tokio::sync::Mutex::new(subs),
        }))
    }

    /// The subscription, created (durably) at `initial` if it does not exist.
    pub async fn subscription(
        &self,
        sub: &str,
        initial: InitialPosition,
    ) -> Result<SubscriptionHandle, BrokerError> {
        let mut subs = self.subs.lock().await;
        if let Some(h) = subs.get(sub) {
            if !h.tx.is_closed() {
                return Ok(h.clone());
            }
        }
        let start = match initial {
            InitialPosition::Earliest => self.ml.before_first(),
            InitialPosition::Latest => self.ml.last_confirmed(),
        };
        let state = CursorState::new(start);
        self.ml
            .persist_cursor(sub, &state)
            .await
            .map_err(|e| BrokerError::new(ServerError::PersistenceError, e.to_string()))?;
        let h = subscription::spawn(sub.to_string(), self.ml.clone(), state);
        subs.insert(sub.to_string(), h.clone());
        Ok(h)
    }

    pub async fn forget_subscription(&self, sub: &str) {
        self.subs.lock().await.remove(sub);
    }
}
