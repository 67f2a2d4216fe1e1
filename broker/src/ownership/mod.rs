//! Bundle ownership: which broker serves which bundle of topics.
//!
//! A bundle's owner holds its owner key, an ephemeral key on the owner's
//! registration lease; the key's creation revision is the ownership epoch.
//! A broker acquires a bundle by creating that key (compare-and-set, also
//! checking that the namespace's bundles did not change meanwhile),
//! releases it by deleting it, and loses it with its lease. It serves a
//! topic only while it owns the topic's bundle and its lease is valid
//! (`registration.rs`).
//!
//! Faster than a lease TTL where death is certain: when the owner's
//! advertised address refuses a TCP connection, nothing listens there — a
//! broker binds its listener before it takes a lease and keeps it bound
//! until its lease is gone, so a refusal means the process that holds the
//! lease is dead (a SIGSTOPped process still accepts connections; a dead
//! host refuses nothing, and then the TTL decides). That lease, by id, is
//! revoked at once and the bundle is free.

pub mod assign;
pub mod bundle;
pub mod namespaces;
pub mod registration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_metadata::{Compare, KeyValue, MetadataClient, Op, Txn};
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use crate::{keys, BrokerError};
use bundle::{topic_hash, BundleKey, BundleRange};
use namespaces::Namespaces;
use registration::{brokers, BrokerInfo, RegisteredBroker, Registration};

/// How long a TCP probe of another broker may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a probe that found a broker alive is believed.
const PROBE_VALID_FOR: Duration = Duration::from_millis(250);
/// Attempts of a lookup while ownership changes under it.
const LOOKUP_ATTEMPTS: usize = 5;

/// The value of an owner key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    pub broker_id: String,
    pub pulsar_url: String,
    /// The `pulsar+ssl://` URL, when the owner has a TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulsar_url_tls: Option<String>,
    pub http_url: Option<String>,
}

/// A bundle this broker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    pub lease: u64,
    /// The owner key's creation revision.
    pub epoch: u64,
    pub unloading: bool,
}

/// Where a topic is served: the answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupAnswer {
    /// Connect to this broker (final).
    Connect {
        url: String,
        url_tls: Option<String>,
        http_url: Option<String>,
    },
    /// Ask this broker again, authoritatively.
    Redirect {
        url: String,
        url_tls: Option<String>,
        http_url: Option<String>,
    },
}

/// A bundle's owner as found in the metadata service.
enum Found {
    Nobody,
    Owner(OwnerInfo, KeyValue),
}

pub struct Ownership {
    md: MetadataClient,
    pub registration: Arc<Registration>,
    pub namespaces: Arc<Namespaces>,
    owned: Mutex<HashMap<BundleKey, Owned>>,
    /// Recent probes of other brokers: pulsar URL -> when it answered.
    alive: Mutex<HashMap<String, Instant>>,
    fast_failover: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `tenant/ns/0x.._0x..` as a bundle key.
pub fn parse_bundle(name: &str) -> Result<BundleKey, BrokerError> {
    let (ns, range) = name
        .rsplit_once('/')
        .ok_or_else(|| BrokerError::NotServedHere(format!("bad bundle name {name}")))?;
    let range = BundleRange::parse(range).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    Ok(BundleKey {
        namespace: ns.to_string(),
        range,
    })
}

/// `host:port` of a `pulsar://host:port` URL.
fn address_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    Some(rest.trim_end_matches('/')).filter(|a| !a.is_empty())
}

impl Ownership {
    pub fn new(
        md: MetadataClient,
        registration: Arc<Registration>,
        namespaces: Arc<Namespaces>,
        fast_failover: bool,
    ) -> Ownership {
        Ownership {
            md,
            registration,
            namespaces,
            owned: Mutex::default(),
            alive: Mutex::default(),
            fast_failover,
        }
    }

    pub fn metadata(&self) -> &MetadataClient {
        &self.md
    }

    pub fn me(&self) -> BrokerInfo {
        self.registration.info()
    }

    fn me_as_owner(&self) -> OwnerInfo {
        let me = self.me();
        OwnerInfo {
            broker_id: me.broker_id,
            pulsar_url: me.pulsar_url,
            pulsar_url_tls: me.pulsar_url_tls,
            http_url: me.http_url,
        }
    }

    /// The bundle `topic` belongs to, and the namespace record's version.
    pub async fn bundle_of(&self, topic: &TopicName) -> Result<(BundleKey, u64), BrokerError> {
        let ns = topic.namespace();
        let (bundles, version) = self.namespaces.bundles(&ns).await?;
        let range = bundles
            .find(topic_hash(topic))
            .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        Ok((
            BundleKey {
                namespace: ns,
                range,
            },
            version,
        ))
    }

    /// Whether we own `bundle` (not unloading) with a valid lease.
    pub fn serves(&self, bundle: &BundleKey) -> bool {
        self.registration.is_valid()
            && lock(&self.owned)
                .get(bundle)
                .is_some_and(|o| !o.unloading && o.lease == self.registration.lease_id())
    }

    pub fn owned(&self) -> Vec<(BundleKey, Owned)> {
        lock(&self.owned)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Marks a bundle as unloading (new loads refused); false if not ours.
    pub fn start_unloading(&self, bundle: &BundleKey) -> bool {
        match lock(&self.owned).get_mut(bundle) {
            Some(o) if !o.unloading => {
                o.unloading = true;
                true
            }
            _ => false,
        }
    }

    /// Forgets every bundle (the lease is lost: its keys go with it).
    pub fn forget_all(&self) -> Vec<BundleKey> {
        lock(&self.owned).drain().map(|(k, _)| k).collect()
    }

    async fn find_owner(&self, bundle: &BundleKey) -> Result<Found, BrokerError> {
        let Some(kv) = self.md.get(&keys::owner(&bundle.to_string())).await? else {
            return Ok(Found::Nobody);
        };
        match serde_json::from_slice::<OwnerInfo>(&kv.value) {
            Ok(o) => Ok(Found::Owner(o, kv)),
            Err(e) => Err(BrokerError::NotServedHere(format!(
                "owner record of {bundle} does not parse: {e}"
            ))),
        }
    }

    /// Whether the broker at `url` certainly died: its address refuses
    /// connections (nothing listens there).
    async fn certainly_dead(&self, url: &str) -> bool {
        if !self.fast_failover {
            return false;
        }
        if lock(&self.alive)
            .get(url)
            .is_some_and(|t| t.elapsed() < PROBE_VALID_FOR)
        {
            return false;
        }
        let Some(addr) = address_of(url) else {
            return false;
        };
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                lock(&self.alive).insert(url.to_string(), Instant::now());
                false
            }
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            // No answer is not an answer: the lease's TTL decides.
            Err(_) => false,
        }
    }

    /// The current owner of `bundle`, after clearing an owner whose process
    /// is certainly gone (its lease revoked) or a key of our own previous
    /// lease. A key on our current lease that we do not know of (a release
    /// that failed half-way) is ours again.
    async fn live_owner(&self, bundle: &BundleKey) -> Result<Option<OwnerInfo>, BrokerError> {
        let Found::Owner(o, kv) = self.find_owner(bundle).await? else {
            return Ok(None);
        };
        if kv.lease.is_none() {
            // An owner key that can never expire (written on a lease that
            // was gone): nobody can hold it, so it is cleared.
            tracing::warn!(%bundle, owner = %o.broker_id, "owner key without a lease; clearing it");
            self.md
                .txn(Txn {
                    compares: vec![Compare {
                        key: kv.key.clone(),
                        version: kv.version,
                    }],
                    success: vec![Op::Delete {
                        key: kv.key.clone(),
                    }],
                    failure: vec![],
                })
                .await?;
            return Ok(None);
        }
        let mine = o.broker_id == self.me().broker_id;
        let lease = self.registration.lease_id();
        if mine && kv.lease == Some(lease) {
            lock(&self.owned).entry(bundle.clone()).or_insert(Owned {
                lease,
                epoch: kv.create_revision,
                unloading: false,
            });
        }
        let stale_self = mine && kv.lease != Some(self.registration.lease_id());
        if stale_self || (!mine && self.certainly_dead(&o.pulsar_url).await) {
            if let Some(lease) = kv.lease {
                tracing::warn!(%bundle, owner = %o.broker_id, lease, "owner's process is gone (its address refuses connections); revoking its lease");
                self.md.revoke_lease(lease).await?;
                return Ok(None);
            }
        }
        Ok(Some(o))
    }

    /// Acquires `bundle` for us if nobody owns it and the namespace's
    /// bundles are still at `ns_version`. `Ok(false)`: someone else was
    /// faster or the bundles changed.
    pub async fn acquire(&self, bundle: &BundleKey, ns_version: u64) -> Result<bool, BrokerError> {
        if !self.registration.is_valid() || self.me().draining {
            return Ok(false);
        }
        let lease = self.registration.lease_id();
        let key = keys::owner(&bundle.to_string());
        let value = serde_json::to_vec(&self.me_as_owner())
            .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        let res = self
            .md
            .txn(Txn {
                compares: vec![
                    Compare {
                        key: keys::namespace(&bundle.namespace),
                        version: ns_version,
                    },
                    Compare {
                        key: key.clone(),
                        version: 0,
                    },
                ],
                success: vec![Op::Put {
                    key,
                    value,
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await?;
        if !res.succeeded {
            // The bundles may have been split: read them again next time.
            self.namespaces.invalidate(&bundle.namespace);
            return Ok(false);
        }
        lock(&self.owned).insert(
            bundle.clone(),
            Owned {
                lease,
                epoch: res.revision,
                unloading: false,
            },
        );
        metrics::counter!(crate::metrics::BUNDLES_ACQUIRED).increment(1);
        tracing::info!(%bundle, epoch = res.revision, "bundle acquired");
        Ok(true)
    }

    /// Releases `bundle` and, if `next` is given, hands it to that broker:
    /// its owner key is re-created on `next`'s lease (a new epoch) in the
    /// same transaction, provided `next` is still registered as we saw it
    /// (a key put on a lease that is gone would never expire). `next`
    /// learns it owns the bundle when a client or a lookup arrives.
    pub async fn release(
        &self,
        bundle: &BundleKey,
        next: Option<&RegisteredBroker>,
    ) -> Result<(), BrokerError> {
        let name = bundle.to_string();
        let key = keys::owner(&name);
        let mut handed = None;
        // The next owner's registration changes with every load report it
        // publishes: read it again once if the first try missed.
        let mut next = next.cloned();
        for _ in 0..2 {
            let Some(n) = next.as_ref().filter(|n| n.lease.is_some()) else {
                break;
            };
            let owner = OwnerInfo {
                broker_id: n.info.broker_id.clone(),
                pulsar_url: n.info.pulsar_url.clone(),
                pulsar_url_tls: n.info.pulsar_url_tls.clone(),
                http_url: n.info.http_url.clone(),
            };
            let value = serde_json::to_vec(&owner)
                .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
            let res = self
                .md
                .txn(Txn {
                    compares: vec![Compare {
                        key: keys::broker(&n.info.broker_id),
                        version: n.version,
                    }],
                    success: vec![
                        Op::Delete { key: key.clone() },
                        Op::Put {
                            key: key.clone(),
                            value,
                            lease: n.lease,
                        },
                    ],
                    failure: vec![],
                })
                .await;
            match res {
                Ok(r) if r.succeeded => {
                    handed = Some(n.info.broker_id.clone());
                    break;
                }
                Ok(_) => {
                    let (id, lease) = (n.info.broker_id.clone(), n.lease);
                    next = brokers(&self.md)
                        .await?
                        .into_iter()
                        .find(|b| b.info.broker_id == id && b.lease == lease);
                    if next.is_none() {
                        tracing::info!(%bundle, next = %id, "the next owner is gone; releasing instead");
                    }
                }
                Err(e) => {
                    lock(&self.owned).remove(bundle);
                    return Err(e.into());
                }
            }
        }
        if handed.is_none() {
            let res = self
                .md
                .txn(Txn {
                    compares: vec![],
                    success: vec![Op::Delete { key }],
                    failure: vec![],
                })
                .await;
            if let Err(e) = res {
                lock(&self.owned).remove(bundle);
                return Err(e.into());
            }
        }
        lock(&self.owned).remove(bundle);
        metrics::counter!(crate::metrics::BUNDLES_RELEASED).increment(1);
        tracing::info!(%bundle, next = ?handed, "bundle released");
        Ok(())
    }

    /// Takes into our table every owner key on our current lease (bundles
    /// handed to us that no client asked for yet); returns them.
    pub async fn adopt_all(&self) -> Result<Vec<BundleKey>, BrokerError> {
        let lease = self.registration.lease_id();
        let mut out = Vec::new();
        for kv in self.md.range(keys::OWNERSHIP_PREFIX, 0).await? {
            if kv.lease != Some(lease) {
                continue;
            }
            let Some(name) = kv.key.strip_prefix(keys::OWNERSHIP_PREFIX) else {
                continue;
            };
            let Ok(bundle) = parse_bundle(name) else {
                continue;
            };
            lock(&self.owned).entry(bundle.clone()).or_insert(Owned {
                lease,
                epoch: kv.create_revision,
                unloading: false,
            });
            out.push(bundle);
        }
        Ok(out)
    }

    /// Replaces `parent` (ours) by its two halves in the namespace's bundles
    /// and in our ownership, in one transaction.
    pub async fn split(&self, parent: &BundleKey) -> Result<(BundleKey, BundleKey), BrokerError> {
        let owned = lock(&self.owned).get(parent).copied();
        let Some(owned) = owned.filter(|o| !o.unloading) else {
            return Err(BrokerError::NotServedHere(format!(
                "bundle {parent} is not owned here"
            )));
        };
        let ns = &parent.namespace;
        let Some((mut policies, version)) = self.namespaces.policies(ns).await? else {
            return Err(BrokerError::NamespaceNotFound(ns.clone()));
        };
        let bundles = policies.bundles.clone().ok_or_else(|| {
            BrokerError::NotServedHere(format!("namespace {ns} has no bundles yet"))
        })?;
        let split = bundles
            .split(parent.range)
            .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        let (lo, hi) = parent
            .range
            .split()
            .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        policies.bundles = Some(split);
        let value =
            serde_json::to_vec(&policies).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        let owner = serde_json::to_vec(&self.me_as_owner())
            .map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
        let child = |range: BundleRange| BundleKey {
            namespace: ns.clone(),
            range,
        };
        let (a, b) = (child(lo), child(hi));
        let res = self
            .md
            .txn(Txn {
                compares: vec![Compare {
                    key: keys::namespace(ns),
                    version,
                }],
                success: vec![
                    Op::Put {
                        key: keys::namespace(ns),
                        value,
                        lease: None,
                    },
                    Op::Delete {
                        key: keys::owner(&parent.to_string()),
                    },
                    Op::Put {
                        key: keys::owner(&a.to_string()),
                        value: owner.clone(),
                        lease: Some(owned.lease),
                    },
                    Op::Put {
                        key: keys::owner(&b.to_string()),
                        value: owner,
                        lease: Some(owned.lease),
                    },
                ],
                failure: vec![],
            })
            .await?;
        self.namespaces.invalidate(ns);
        if !res.succeeded {
            return Err(BrokerError::NotServedHere(format!(
                "namespace {ns} changed while splitting {parent}; retry"
            )));
        }
        {
            let mut g = lock(&self.owned);
            g.remove(parent);
            for k in [&a, &b] {
                g.insert(
                    k.clone(),
                    Owned {
                        lease: owned.lease,
                        epoch: res.revision,
                        unloading: false,
                    },
                );
            }
        }
        tracing::info!(bundle = %parent, into = %format!("{} + {}", a.range, b.range), "bundle split");
        Ok((a, b))
    }

    /// How many bundles each registered broker owns, and the brokers.
    pub async fn cluster(
        &self,
    ) -> Result<(Vec<RegisteredBroker>, HashMap<String, usize>), BrokerError> {
        let brokers = brokers(&self.md).await?;
        let mut owned: HashMap<String, usize> = HashMap::new();
        for kv in self.md.range(keys::OWNERSHIP_PREFIX, 0).await? {
            if let Ok(o) = serde_json::from_slice::<OwnerInfo>(&kv.value) {
                *owned.entry(o.broker_id).or_default() += 1;
            }
        }
        Ok((brokers, owned))
    }

    /// The broker an unowned bundle should go to.
    async fn target_for(
        &self,
        bundle: &BundleKey,
    ) -> Result<Option<RegisteredBroker>, BrokerError> {
        let (brokers, owned) = self.cluster().await?;
        Ok(assign::choose(&bundle.to_string(), &brokers, &owned, None).cloned())
    }

    /// Answers a lookup: the owner, or the broker the bundle is assigned to
    /// (acquiring it here if that is us or the lookup is authoritative).
    /// An authoritative lookup is never redirected.
    pub async fn lookup(
        &self,
        topic: &TopicName,
        authoritative: bool,
    ) -> Result<LookupAnswer, BrokerError> {
        let me = self.me();
        for _ in 0..LOOKUP_ATTEMPTS {
            let (bundle, version) = self.bundle_of(topic).await?;
            if self.serves(&bundle) {
                return Ok(LookupAnswer::Connect {
                    url: me.pulsar_url,
                    url_tls: me.pulsar_url_tls,
                    http_url: me.http_url,
                });
            }
            if let Some(o) = self.live_owner(&bundle).await? {
                if o.broker_id != me.broker_id {
                    return Ok(LookupAnswer::Connect {
                        url: o.pulsar_url,
                        url_tls: o.pulsar_url_tls,
                        http_url: o.http_url,
                    });
                }
                // Our key on our lease: handed to us (now adopted), or ours
                // and unloading.
                if self.serves(&bundle) {
                    return Ok(LookupAnswer::Connect {
                        url: me.pulsar_url,
                        url_tls: me.pulsar_url_tls,
                        http_url: me.http_url,
                    });
                }
                return Err(BrokerError::NotServedHere(format!(
                    "bundle {bundle} is moving"
                )));
            }
            let target = self.target_for(&bundle).await?;
            let here = match &target {
                Some(t) => t.info.broker_id == me.broker_id,
                None => true,
            };
            if here || authoritative {
                if me.draining {
                    return Err(BrokerError::NotServedHere("this broker is stopping".into()));
                }
                if self.acquire(&bundle, version).await? {
                    return Ok(LookupAnswer::Connect {
                        url: me.pulsar_url,
                        url_tls: me.pulsar_url_tls,
                        http_url: me.http_url,
                    });
                }
                continue;
            }
            if let Some(t) = target {
                return Ok(LookupAnswer::Redirect {
                    url: t.info.pulsar_url,
                    url_tls: t.info.pulsar_url_tls,
                    http_url: t.info.http_url,
                });
            }
        }
        Err(BrokerError::NotServedHere(format!(
            "ownership of {topic}'s bundle keeps changing; retry"
        )))
    }

    /// Checks that `topic` may be served here, acquiring its bundle if it is
    /// unowned (a client sent straight here, e.g. by a close naming us).
    pub async fn claim(&self, topic: &TopicName) -> Result<BundleKey, BrokerError> {
        for _ in 0..LOOKUP_ATTEMPTS {
            let (bundle, version) = self.bundle_of(topic).await?;
            if self.serves(&bundle) {
                return Ok(bundle);
            }
            match self.live_owner(&bundle).await? {
                Some(o) if o.broker_id != self.me().broker_id => {
                    return Err(BrokerError::NotServedHere(format!(
                        "topic {topic} is served by {}",
                        o.pulsar_url
                    )));
                }
                // Handed to us (now adopted), or ours and unloading.
                Some(_) if self.serves(&bundle) => return Ok(bundle),
                Some(_) => {
                    return Err(BrokerError::NotServedHere(format!(
                        "bundle {bundle} is moving"
                    )))
                }
                None => {
                    if self.me().draining {
                        return Err(BrokerError::NotServedHere("this broker is stopping".into()));
                    }
                    if self.acquire(&bundle, version).await? {
                        return Ok(bundle);
                    }
                }
            }
        }
        Err(BrokerError::NotServedHere(format!(
            "ownership of {topic}'s bundle keeps changing; retry"
        )))
    }

    /// Every owner key: bundle name -> owner.
    pub async fn owners(&self) -> Result<Vec<(String, OwnerInfo)>, BrokerError> {
        Ok(self
            .md
            .range(keys::OWNERSHIP_PREFIX, 0)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(keys::OWNERSHIP_PREFIX)?.to_string();
                Some((name, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect())
    }
}
