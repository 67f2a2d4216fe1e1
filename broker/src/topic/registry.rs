//! The topics this broker has loaded. A topic is loaded only in a bundle
//! this broker owns (acquiring it if nobody does), once (concurrent loads
//! share the work), with a write gate that closes when the broker's lease
//! can no longer be trusted. Unloading a bundle closes its topics' storage
//! first, releases the bundle, then tells the clients where to go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use magnetar_proto::commands::Assigned;
use magnetar_proto::TopicName;
use tokio::sync::OnceCell;

use super::Topic;
use crate::managed_ledger::store::{MemoryLedgers, MemoryMeta};
use crate::managed_ledger::{ManagedLedgerConfig, Stores};
use crate::ownership::bundle::{topic_hash, BundleKey};
use crate::ownership::registration::RegisteredBroker;
use crate::ownership::Ownership;
use crate::subscription::DeadLetterSink;
use crate::BrokerError;

type Slot = Arc<OnceCell<Arc<Topic>>>;

/// Attempts to release a bundle before giving up (the key then goes with
/// the lease, or is adopted again).
const RELEASE_ATTEMPTS: usize = 3;

pub struct TopicRegistry {
    topics: Mutex<HashMap<TopicName, Slot>>,
    pub ownership: Arc<Ownership>,
    stores: Stores,
    ml_cfg: ManagedLedgerConfig,
    /// Where subscriptions send dead letters (none: not dead-lettered).
    sink: Option<Arc<dyn DeadLetterSink>>,
}

/// What an unload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unloaded {
    pub topics: usize,
    pub clients: usize,
}

impl TopicRegistry {
    pub fn new(
        ownership: Arc<Ownership>,
        stores: Stores,
        ml_cfg: ManagedLedgerConfig,
        sink: Option<Arc<dyn DeadLetterSink>>,
    ) -> Self {
        let reg = ownership.registration.clone();
        let stores = Stores {
            gate: Arc::new(move || reg.is_valid()),
            ..stores
        };
        TopicRegistry {
            topics: Mutex::default(),
            ownership,
            stores,
            ml_cfg,
            sink,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicName, Slot>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded topic, loading it if needed; its bundle must be ours.
    pub async fn get_or_load(&self, name: &TopicName) -> Result<Arc<Topic>, BrokerError> {
        let bundle = self.ownership.claim(name).await?;
        let cell = self.lock().entry(name.clone()).or_default().clone();
        let res = cell
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let own = &self.ownership;
                super::partitioned::check_may_load(own.metadata(), &own.namespaces, name).await?;
                let mut policies = super::policies::resolve(self, name, false).await?;
                // A non-persistent topic keeps nothing: its (unused) storage
                // is in memory, and nothing in it is deduplicated.
                let stores = if name.persistent {
                    self.stores.clone()
                } else {
                    policies.dedup = false;
                    Stores::new(Arc::new(MemoryLedgers::new()), Arc::new(MemoryMeta::new()))
                };
                let topic = Topic::load(
                    name.clone(),
                    self.ml_cfg.clone(),
                    stores,
                    policies,
                    self.sink.clone(),
                )
                .await;
                metrics::histogram!(crate::metrics::TOPIC_LOAD_DURATION)
                    .record(started.elapsed().as_secs_f64());
                topic
            })
            .await
            .cloned();
        match res {
            Ok(t) if t.is_closing() => Err(BrokerError::NotServedHere(format!(
                "topic {name} is being unloaded"
            ))),
            // An unload of the bundle began while the topic loaded; it did
            // not see the topic, so close it here.
            Ok(t) if !self.ownership.serves(&bundle) => {
                let (detached, _) = t.close().await;
                detached.disconnect(&Assigned::default());
                self.remove(&t);
                Err(BrokerError::NotServedHere(format!(
                    "bundle {bundle} of {name} is moving"
                )))
            }
            Ok(t) => Ok(t),
            Err(e) => {
                self.remove_slot(name, &cell);
                Err(e)
            }
        }
    }

    /// Deletes a topic this broker owns (see `Topic::delete`); false if it
    /// has no storage to delete.
    pub async fn delete(&self, name: &TopicName, force: bool) -> Result<bool, BrokerError> {
        let own = &self.ownership;
        if self.get(name).is_none()
            && !super::partitioned::topic_exists(own.metadata(), name).await?
        {
            return Ok(false);
        }
        let topic = self.get_or_load(name).await?;
        let res = topic.delete(force).await;
        if res.is_ok() || topic.is_closing() {
            self.remove(&topic);
        }
        res.map(|()| true)
    }

    /// Forgets `name` if it still maps to `cell` (a newer load stays).
    fn remove_slot(&self, name: &TopicName, cell: &Slot) {
        let mut g = self.lock();
        if g.get(name).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            g.remove(name);
        }
    }

    /// The topic if it is loaded.
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

    /// Loaded topics of `bundle`.
    pub fn in_bundle(&self, bundle: &BundleKey) -> Vec<Arc<Topic>> {
        self.loaded()
            .into_iter()
            .filter(|t| {
                t.name.namespace() == bundle.namespace && bundle.range.contains(topic_hash(&t.name))
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes `topics` (in parallel), then runs `between`, then sends every
    /// client a close naming `assigned`.
    async fn close_topics(
        &self,
        topics: Vec<Arc<Topic>>,
        between: impl std::future::Future<Output = ()>,
        assigned: impl Fn() -> Assigned,
    ) -> Unloaded {
        let closed = join_all(topics.iter().map(|t| t.close())).await;
        between.await;
        let assigned = assigned();
        let mut done = Unloaded::default();
        for (t, (detached, res)) in topics.iter().zip(closed) {
            if let Err(e) = res {
                tracing::warn!(topic = %t.name, error = %e, "closing the topic's ledger failed; the next owner recovers it");
            }
            done.topics += 1;
            done.clients += detached.clients();
            detached.disconnect(&assigned);
            self.remove(t);
        }
        done
    }

    /// Unloads a bundle we own: new loads stop, its topics' storage closes
    /// (queued messages are stored, cursors persisted), the bundle is
    /// released — assigned to `next` if given — and producers and consumers
    /// are told to reconnect, to `next` where their protocol has the field.
    pub async fn unload_bundle(
        &self,
        bundle: &BundleKey,
        next: Option<RegisteredBroker>,
    ) -> Result<Unloaded, BrokerError> {
        if !self.ownership.start_unloading(bundle) {
            // Handed to us and never asked for yet: ours all the same.
            let adopted = self.ownership.adopt_all().await?;
            if !adopted.contains(bundle) || !self.ownership.start_unloading(bundle) {
                return Err(BrokerError::NotServedHere(format!(
                    "bundle {bundle} is not owned here"
                )));
            }
        }
        let started = std::time::Instant::now();
        let topics = self.in_bundle(bundle);
        let release = async {
            for attempt in 1..=RELEASE_ATTEMPTS {
                match self.ownership.release(bundle, next.as_ref()).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(%bundle, attempt, error = %e, "releasing the bundle failed")
                    }
                }
            }
        };
        let url = next.as_ref().map(|n| n.info.pulsar_url.clone());
        let url_tls = next.as_ref().and_then(|n| n.info.pulsar_url_tls.clone());
        let done = self
            .close_topics(topics, release, || Assigned {
                url: url.clone(),
                url_tls: url_tls.clone(),
            })
            .await;
        metrics::histogram!(crate::metrics::UNLOAD_DURATION)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(%bundle, topics = done.topics, clients = done.clients, next = ?url, ms = started.elapsed().as_millis() as u64, "bundle unloaded");
        Ok(done)
    }

    /// The lease is lost: every bundle is gone with it. Topics close (their
    /// writes are already refused by the gate) and clients are told to look
    /// their topics up again.
    pub async fn drop_all(&self) -> Unloaded {
        let bundles = self.ownership.forget_all();
        let topics = self.loaded();
        tracing::warn!(
            bundles = bundles.len(),
            topics = topics.len(),
            "ownership lost; closing every topic"
        );
        self.close_topics(topics, async {}, Assigned::default).await
    }
}
