//! The topics this broker has loaded. A topic is loaded once (concurrent
//! loads of one topic share the work), only in a namespace that exists, and
//! removed again when it is unloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use magnetar_metadata::MetadataClient;
use magnetar_proto::TopicName;
use tokio::sync::OnceCell;

use super::Topic;
use crate::managed_ledger::{ManagedLedgerConfig, Stores};
use crate::{keys, BrokerError};

type Slot = Arc<OnceCell<Arc<Topic>>>;

pub struct TopicRegistry {
    topics: Mutex<HashMap<TopicName, Slot>>,
    metadata: MetadataClient,
    stores: Stores,
    ml_cfg: ManagedLedgerConfig,
}

impl TopicRegistry {
    pub fn new(metadata: MetadataClient, stores: Stores, ml_cfg: ManagedLedgerConfig) -> Self {
        TopicRegistry {
            topics: Mutex::default(),
            metadata,
            stores,
            ml_cfg,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicName, Slot>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded topic, loading it if needed.
    pub async fn get_or_load(&self, name: &TopicName) -> Result<Arc<Topic>, BrokerError> {
        if !name.persistent {
            return Err(BrokerError::new(
                magnetar_proto::pulsar::ServerError::TopicNotFound,
                "non-persistent topics are not supported yet",
            ));
        }
        let cell = self.lock().entry(name.clone()).or_default().clone();
        let res = cell
            .get_or_try_init(|| async {
                let ns = name.namespace();
                if self.metadata.get(&keys::namespace(&ns)).await?.is_none() {
                    return Err(BrokerError::NamespaceNotFound(ns));
                }
                Topic::load(name.clone(), self.ml_cfg.clone(), self.stores.clone()).await
            })
            .await
            .cloned();
        match res {
            Ok(t) if t.is_closing() => Err(BrokerError::NotServedHere(format!(
                "topic {name} is being unloaded"
            ))),
            Ok(t) => Ok(t),
            Err(e) => {
                self.remove_slot(name, &cell);
                Err(e)
            }
        }
    }

    /// Forgets `name` if it still maps to `cell` (a newer load stays).
    fn remove_slot(&self, name: &TopicName, cell: &Slot) {
        let mut g = self.lock();
        if g.get(name).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            g.remove(name);
        }
    }

    /// The topic if it is loaded (or loading finished).
    pub fn get(&self, name: &TopicName) -> Option<Arc<Topic>> {
        self.lock().get(name).and_then(|c| c.get().cloned())
    }

    /// Forgets an unloaded topic.
    pub fn remove(&self, topic: &Arc<Topic>) {
        let mut g = self.lock();
        if g.get(&topic.name)
            .and_then(|c| c.get())
            .is_some_and(|t| Arc::ptr_eq(t, topic))
        {
            g.remove(&topic.name);
        }
    }

    /// Every loaded topic.
    pub fn loaded(&self) -> Vec<Arc<Topic>> {
        self.lock()
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
